"""Parses a /metrics answer with the Python prometheus_client parsers.

usage: parse_metrics.py prometheus|openmetrics < TEXT

Prints one JSON object: family name -> {"type", "samples": [[name, labels,
value], ...]}. Exits non-zero (with the parser's error) when the text does
not parse: the classic text format with `prometheus_client.parser`,
OpenMetrics with the strict `prometheus_client.openmetrics.parser`.
"""

import json
import sys

from prometheus_client import parser as classic
from prometheus_client.openmetrics import parser as openmetrics


def main():
    kind = sys.argv[1]
    text = sys.stdin.read()
    parse = classic if kind == "prometheus" else openmetrics
    families = {}
    for family in parse.text_string_to_metric_families(text):
        families[family.name] = {
            "type": family.type,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
    print(json.dumps(families))


if __name__ == "__main__":
    main()
