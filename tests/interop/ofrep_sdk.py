#!/usr/bin/env python3
"""Reads podcache's flags with the OpenFeature Python SDK and its OFREP
provider (PyPI: openfeature-sdk, openfeature-provider-ofrep), as a service
would. Driven by tests/ofrep.rs, which starts three nodes with
`--ofrep-type`, writes the flags on node 0 and passes:

    ofrep_sdk.py '{"nodes": [url0, url1, url2], "type": T,
                   "read_token": "...", "write_token": "..."}'

Every check failing prints what was seen and exits 1; at the end it prints
one line "OK <what was checked>".
"""

import json
import sys
import time
import urllib.request

from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

cfg = json.loads(sys.argv[1])
failures = []


def check(ok, what, seen):
    if not ok:
        failures.append(f"{what}: saw {seen!r}")


def client_for(node, token):
    domain = f"node{node}-{'token' if token else 'none'}"
    headers = (lambda: {"Authorization": f"Bearer {token}"}) if token else None
    api.set_provider(
        OFREPProvider(cfg["nodes"][node], headers_factory=headers, timeout=5), domain=domain
    )
    return api.get_client(domain)


ctx = EvaluationContext(targeting_key="user-1", attributes={"plan": "pro", "country": "CA"})

# Nodes 1 and 2 did not take the writes: they serve what replication
# brought them.
for node in (1, 2):
    c = client_for(node, cfg["read_token"])
    where = f"node {node}"

    d = c.get_boolean_details("dark-mode", False, ctx)
    check(d.value is True and d.reason == Reason.STATIC and d.error_code is None,
          f"{where}: boolean flag", d)
    check(isinstance(d.variant, str) and "@" in d.variant, f"{where}: variant is the version", d)

    d = c.get_string_details("banner", "none", ctx)
    check(d.value == "hello" and d.reason == Reason.STATIC, f"{where}: string flag", d)

    d = c.get_integer_details("max-items", 0, ctx)
    check(d.value == 25 and d.error_code is None, f"{where}: integer flag", d)

    d = c.get_float_details("ratio", 0.0, ctx)
    check(d.value == 0.75 and d.error_code is None, f"{where}: float flag", d)

    d = c.get_object_details("theme", {}, ctx)
    check(d.value == {"colour": "blue", "sizes": [1, 2]} and d.error_code is None,
          f"{where}: object flag", d)

    d = c.get_string_details("checkout", "old", ctx)
    check(d.value == "new" and d.variant == "new" and d.reason == Reason.DEFAULT
          and d.flag_metadata.get("targetingIgnored") is True and d.error_code is None,
          f"{where}: flagd definition with targeting", d)

    d = c.get_boolean_details("no-such-flag", True, ctx)
    check(d.value is True and d.error_code == ErrorCode.FLAG_NOT_FOUND
          and d.reason == Reason.ERROR, f"{where}: missing flag", d)

    # The SDK checks the type itself: the server answers the value.
    d = c.get_boolean_details("banner", False, ctx)
    check(d.value is False and d.error_code == ErrorCode.TYPE_MISMATCH,
          f"{where}: type mismatch", d)

    # A disabled flag has no value: the code default.
    d = c.get_boolean_details("kill-switch", True, ctx)
    check(d.value is True, f"{where}: disabled flag", d)
    disabled = d

    # Without the token the node refuses; the SDK answers the default.
    d = client_for(node, None).get_boolean_details("dark-mode", False, ctx)
    check(d.value is False and d.error_code == ErrorCode.GENERAL, f"{where}: no token", d)

# A change written on node 0 reaches node 2's evaluations.
request = urllib.request.Request(
    f"{cfg['nodes'][0]}/v1/cache/{cfg['type']}/banner",
    data=b"changed",
    method="PUT",
    headers={"Authorization": f"Bearer {cfg['write_token']}"},
)
with urllib.request.urlopen(request, timeout=10) as answer:
    check(answer.status == 200, "the write on node 0", answer.status)
c = client_for(2, cfg["read_token"])
deadline = time.monotonic() + 15
seen = None
while time.monotonic() < deadline:
    seen = c.get_string_details("banner", "none", ctx)
    if seen.value == "changed":
        break
    time.sleep(0.02)  # polling interval, bounded by the deadline
check(seen is not None and seen.value == "changed" and seen.reason == Reason.STATIC,
      "node 2 sees the change written on node 0", seen)

if failures:
    for f in failures:
        print(f"FAIL {f}")
    sys.exit(1)
print(f"OK boolean, string, integer, float, object, flagd, missing, type mismatch, "
      f"disabled ({disabled.reason}, {disabled.error_code}), no token, change seen on node 2")
