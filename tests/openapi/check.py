#!/usr/bin/env python3
"""Checks podcache's OpenAPI document against answers recorded from real
nodes (tests/openapi.rs writes them).

    check.py DOCUMENT ANSWERS

1. The document is a valid OpenAPI 3.1 document (openapi-spec-validator).
2. Its security is consistent: an operation documents 401 exactly when it
   may need a bearer token, and 403 exactly when it needs a `write` one.
3. Every recorded answer is found in the document and agrees with it: the
   path (or the document's fallback answers for unknown paths and methods),
   the operation, the status, the content type, the required headers, and
   the body against the response's JSON Schema (jsonschema, Draft 2020-12,
   `$ref`s resolved within the document). Streams (`text/event-stream`,
   `application/x-ndjson`) are split into their items and checked against
   the media type's `x-sequence-schema`. Every query parameter and header a
   request sent must be declared; the parameters and bodies of successful
   requests must match their schemas.
4. Coverage, so that the document cannot drift from the code: every
   operation, every documented status of every operation (but those marked
   `x-not-exercised` with a reason), every parameter, the fallback answers
   and every `oneOf` branch of a sequence's items were seen at least once.

Every mismatch is listed; the exit code is 1 when there is any.
"""

import json
import re
import sys
import urllib.parse

try:
    import jsonschema
    import referencing
    from openapi_spec_validator import validate as validate_spec
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator
except ImportError as err:  # the Rust test turns this into a clear failure
    print(
        f"check.py: {err}: the venv lacks jsonschema or openapi-spec-validator; "
        "run `.venv-interop/bin/pip install -r tests/interop/requirements.txt`",
        file=sys.stderr,
    )
    sys.exit(3)

METHODS = ("get", "put", "post", "delete", "head", "patch", "options", "trace")
BASE = "urn:podcache:openapi"
# Request headers that are HTTP plumbing or covered by `security`, not
# parameters.
PLUMBING = {"authorization", "content-type", "content-length", "host", "accept", "connection"}


def pointer(*parts):
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class Document:
    def __init__(self, doc):
        self.doc = doc
        resource = referencing.jsonschema.DRAFT202012.create_resource(doc)
        self.registry = referencing.Registry().with_resource(BASE, resource)
        self.validators = {}
        self.templates = []
        for template in doc.get("paths", {}):
            names = re.findall(r"\{([^}]+)\}", template)
            regex = "^" + re.sub(r"\\\{[^}]+\\\}", "([^/]*)", re.escape(template)) + "$"
            self.templates.append((template, names, re.compile(regex)))
        # As OpenAPI says: concrete paths match before templated ones.
        self.templates.sort(key=lambda t: (len(t[1]), t[0]))

    def at(self, ptr):
        node = self.doc
        for raw in ptr.split("/")[1:]:
            part = raw.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def deref(self, node, ptr):
        """Follows `$ref`s (components) to the object and its pointer."""
        seen = 0
        while isinstance(node, dict) and "$ref" in node:
            target = node["$ref"]
            if not target.startswith("#/"):
                raise ValueError(f"only local $refs are supported, got {target}")
            ptr = target[1:]
            node = self.at(ptr)
            seen += 1
            if seen > 32:
                raise ValueError(f"$ref loop at {ptr}")
        return node, ptr

    def errors(self, instance, ptr):
        """Schema errors of `instance` against the schema at `ptr`."""
        validator = self.validators.get(ptr)
        if validator is None:
            ref = BASE + "#" + urllib.parse.quote(ptr, safe="/~")
            validator = jsonschema.Draft202012Validator(
                {"$ref": ref},
                registry=self.registry,
                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
            )
            self.validators[ptr] = validator
        out = []
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            out.append(f"at {where}: {e.message[:300]}")
        return out

    def match(self, path):
        for template, names, regex in self.templates:
            m = regex.match(path)
            if m:
                return template, dict(zip(names, (urllib.parse.unquote(v) for v in m.groups())))
        return None, None


def media_key(content, content_type):
    """The content key for a content type: exact, `type/*`, `*/*`."""
    essence = (content_type or "").split(";")[0].strip().lower()
    if essence in content:
        return essence
    major = essence.split("/")[0] + "/*"
    if major in content:
        return major
    if "*/*" in content:
        return "*/*"
    return None


def parse_sse(text):
    """The complete events of a (possibly cut) SSE stream, as
    {"event", "id"?, "data"} with data parsed as JSON."""
    text = text.replace("\r\n", "\n")
    frames = text.split("\n\n")
    frames.pop()  # what follows the last blank line is incomplete (or empty)
    events, problems = [], []
    for frame in frames:
        fields = {}
        data = []
        for line in frame.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                fields[name] = value
        if not fields and not data:
            continue  # a keep-alive comment
        event = {"event": fields.pop("event", "message")}
        if "id" in fields:
            event["id"] = fields.pop("id")
        for name in fields:
            event[name] = fields[name]
        try:
            event["data"] = json.loads("\n".join(data))
        except ValueError as e:
            problems.append(f"event {event['event']!r}: data is not JSON ({e}): {data!r:.200}")
            event["data"] = "\n".join(data)
        events.append(event)
    return events, problems


def parse_ndjson(text):
    items, problems = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except ValueError as e:
            problems.append(f"line {n} is not JSON ({e}): {line[:200]!r}")
    return items, problems


def coerce(value, schema):
    """A query or path value as its schema's type."""
    kind = schema.get("type")
    if kind == "integer":
        try:
            return int(value)
        except ValueError:
            return value
    if kind == "boolean":
        return {"true": True, "false": False}.get(value, value)
    return value


class Checker:
    def __init__(self, doc):
        self.d = Document(doc)
        self.mismatches = []
        self.seen_ops = set()
        self.seen_status = set()
        self.seen_params = set()
        self.seen_fallbacks = set()
        self.branches = {}  # pointer of a oneOf -> set of branch indexes seen

    def fail(self, answer, message):
        what = f"{answer['method']} {answer['path']} -> {answer['status']}"
        self.mismatches.append(f"{what} [{answer.get('note', '')}]: {message}")

    # -- the document on its own ------------------------------------------

    def check_document(self):
        try:
            validate_spec(self.d.doc, cls=OpenAPIV31SpecValidator)
        except Exception as e:  # any validation error
            self.mismatches.append(f"the document is not valid OpenAPI 3.1: {str(e)[:2000]}")
            return False
        if not str(self.d.doc.get("openapi", "")).startswith("3.1."):
            self.mismatches.append(f"openapi is {self.d.doc.get('openapi')!r}, expected 3.1.x")
        for template, item in self.d.doc["paths"].items():
            for method in METHODS:
                if method not in item:
                    continue
                op = item[method]
                security = op.get("security", self.d.doc.get("security", []))
                roles = [r for req in security for r in req.get("bearerAuth", [])]
                bearer = any("bearerAuth" in req for req in security)
                codes = op["responses"].keys()
                where = f"{method.upper()} {template}"
                if bearer != ("401" in codes):
                    self.mismatches.append(
                        f"{where}: security {'names' if bearer else 'lacks'} bearerAuth but 401 is "
                        f"{'not ' if bearer else ''}documented"
                    )
                # 403: a read token that writes, or a token whose types=
                # leave out the operation's type (`x-forbidden-type`).
                refuses = "write" in roles or op.get("x-forbidden-type") is True
                if refuses != ("403" in codes):
                    self.mismatches.append(
                        f"{where}: 403 must be documented exactly when a write token is needed "
                        f"or the operation is marked x-forbidden-type"
                    )
        return True

    # -- one answer -------------------------------------------------------

    def operation(self, answer):
        split = urllib.parse.urlsplit(answer["path"])
        template, values = self.d.match(split.path)
        if template is None:
            return None, None, None, "UnknownPath"
        item = self.d.doc["paths"][template]
        method = answer["method"].lower()
        if method not in item and method == "head" and "get" in item:
            method = "get"  # every GET also answers HEAD
        if method not in item:
            return template, None, values, "MethodNotAllowed"
        return template, method, values, None

    def check_answer(self, answer):
        template, method, values, fallback = self.operation(answer)
        if fallback:
            self.seen_fallbacks.add(fallback)
            ptr = pointer("components", "responses", fallback)
            expected = {"UnknownPath": 404, "MethodNotAllowed": 405}[fallback]
            if answer["status"] != expected:
                self.fail(answer, f"{fallback} (no such {'path' if template is None else 'method'} in the document) answers {expected}")
            self.check_response(answer, self.d.at(ptr), ptr)
            return
        item = self.d.doc["paths"][template]
        op = item[method]
        op_ptr = pointer("paths", template, method)
        counted = not (answer["method"] == "HEAD" and method == "get")
        if counted:
            self.seen_ops.add((template, method))
        self.check_parameters(answer, template, method, item, op, values)
        status = str(answer["status"])
        responses = op["responses"]
        key = status if status in responses else ("default" if "default" in responses else None)
        if key is None:
            self.fail(answer, f"status {status} is not documented for {method.upper()} {template} "
                              f"(documented: {', '.join(responses)})")
            return
        if counted:
            self.seen_status.add((template, method, key))
        response, ptr = self.d.deref(responses[key], op_ptr + pointer("responses", key))
        self.check_response(answer, response, ptr)
        if 200 <= answer["status"] < 300 and "requestBody" in op:
            self.check_request_body(answer, op, op_ptr)

    def check_parameters(self, answer, template, method, item, op, values):
        declared = {}
        for base, params in (
            (pointer("paths", template, "parameters"), item.get("parameters", [])),
            (pointer("paths", template, method, "parameters"), op.get("parameters", [])),
        ):
            for i, raw in enumerate(params):
                param, _ = self.d.deref(raw, base + pointer(i))
                declared[(param["in"], param["name"].lower() if param["in"] == "header" else param["name"])] = param
        ok = 200 <= answer["status"] < 300
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(answer["path"]).query, keep_blank_values=True)
        sent = [("query", name, value) for name, value in query]
        sent += [("header", name.lower(), value) for name, value in answer.get("request_headers", {}).items()
                 if name.lower() not in PLUMBING]
        sent += [("path", name, value) for name, value in values.items()]
        for where, name, value in sent:
            param = declared.get((where, name))
            if param is None and answer["status"] == 400:
                continue  # the code refusing a parameter that does not belong
            if param is None:
                self.fail(answer, f"the request's {where} parameter {name!r} is not declared for "
                                  f"{method.upper()} {template}")
                continue
            if answer["method"] != "HEAD" or method == "head":
                self.seen_params.add((template, method, where, param["name"]))
            if ok and "schema" in param:
                schema, ptr = self.d.deref(param["schema"], "")
                instance = coerce(value, schema)
                schema_ptr = ptr or self.schema_pointer_of(template, method, param)
                for e in self.d.errors(instance, schema_ptr):
                    self.fail(answer, f"{where} parameter {name}={value!r} does not match its schema: {e}")

    def schema_pointer_of(self, template, method, param):
        for base, params in (
            (pointer("paths", template, "parameters"), self.d.doc["paths"][template].get("parameters", [])),
            (pointer("paths", template, method, "parameters"), self.d.doc["paths"][template][method].get("parameters", [])),
        ):
            for i, raw in enumerate(params):
                p, ptr = self.d.deref(raw, base + pointer(i))
                if p is param:
                    return ptr + "/schema"
        raise KeyError(param["name"])

    def check_response(self, answer, response, ptr):
        headers = {k.lower(): v for k, v in answer.get("response_headers", {}).items()}
        for name, raw in response.get("headers", {}).items():
            header, hptr = self.d.deref(raw, ptr + pointer("headers", name))
            value = headers.get(name.lower())
            if value is None:
                if header.get("required"):
                    self.fail(answer, f"the required header {name} is missing")
                continue
            if "schema" in header:
                for e in self.d.errors(value, hptr + "/schema"):
                    self.fail(answer, f"header {name}: {value!r}: {e}")
        content = response.get("content")
        body = answer["body"]
        if not content:
            if body:
                self.fail(answer, f"the response documents no body, got {body[:200]!r}")
            return
        key = media_key(content, answer.get("content_type"))
        if key is None:
            self.fail(answer, f"content type {answer.get('content_type')!r} is not documented "
                              f"(documented: {', '.join(content)})")
            return
        if answer["method"] == "HEAD":
            if body:
                self.fail(answer, "a HEAD answer has a body")
            return
        self.check_body(answer, body, content[key], ptr + pointer("content", key), "body")

    def check_body(self, answer, body, media, mptr, what):
        if what == "body" and answer.get("stream"):
            pass  # a stream read in part: its complete items are checked
        elif not body and "schema" in media and media["schema"].get("type") != "string":
            self.fail(answer, f"the {what} is empty")
            return
        key = mptr.rsplit("/", 1)[1].replace("~1", "/")
        if "x-sequence-schema" in media:
            if key == "text/event-stream":
                items, problems = parse_sse(body)
            else:
                items, problems = parse_ndjson(body)
            for p in problems:
                self.fail(answer, f"{what}: {p}")
            seq_ptr = mptr + "/x-sequence-schema"
            for e in self.d.errors(items, seq_ptr):
                self.fail(answer, f"{what} items {e}")
            self.note_branches(items, seq_ptr)
            if "schema" in media:
                for e in self.d.errors(body, mptr + "/schema"):
                    self.fail(answer, f"{what}: {e}")
            return
        if "schema" not in media:
            return
        schema, _ = self.d.deref(media["schema"], mptr + "/schema")
        if key == "application/json" or key.endswith("+json"):
            try:
                instance = json.loads(body)
            except ValueError as e:
                self.fail(answer, f"the {what} is not JSON ({e}): {body[:200]!r}")
                return
        else:
            instance = body
        for e in self.d.errors(instance, mptr + "/schema"):
            self.fail(answer, f"{what} {e}")

    def check_request_body(self, answer, op, op_ptr):
        request_body, rptr = self.d.deref(op["requestBody"], op_ptr + "/requestBody")
        body = answer.get("request_body", "")
        if not body and not request_body.get("required"):
            return
        key = media_key(request_body["content"], answer.get("request_content_type"))
        if key is None:
            self.fail(answer, f"request content type {answer.get('request_content_type')!r} is not "
                              f"documented (documented: {', '.join(request_body['content'])})")
            return
        self.check_body(answer, body, request_body["content"][key], rptr + pointer("content", key), "request body")

    def note_branches(self, items, seq_ptr):
        seq, _ = self.d.deref(self.d.at(seq_ptr), seq_ptr)
        if "items" not in seq:
            return
        item_schema, item_ptr = self.d.deref(seq["items"], seq_ptr + "/items")
        if "oneOf" not in item_schema:
            return
        seen = self.branches.setdefault(item_ptr, set())
        for item in items:
            for i in range(len(item_schema["oneOf"])):
                if not self.d.errors(item, item_ptr + pointer("oneOf", i)):
                    seen.add(i)

    # -- coverage ---------------------------------------------------------

    def check_coverage(self):
        skipped = []
        for template, item in self.d.doc["paths"].items():
            path_params = item.get("parameters", [])
            for method in METHODS:
                if method not in item:
                    continue
                op = item[method]
                where = f"{method.upper()} {template}"
                if (template, method) not in self.seen_ops:
                    self.mismatches.append(f"{where} is documented but was never exercised")
                    continue
                for code, raw in op["responses"].items():
                    response, _ = self.d.deref(raw, "")
                    if (template, method, code) in self.seen_status:
                        continue
                    reason = raw.get("x-not-exercised") or response.get("x-not-exercised")
                    if reason:
                        skipped.append(f"{where} {code}: {reason}")
                    else:
                        self.mismatches.append(f"{where} documents {code}, which no answer produced")
                for raw in path_params + op.get("parameters", []):
                    param, _ = self.d.deref(raw, "")
                    if (template, method, param["in"], param["name"]) not in self.seen_params:
                        self.mismatches.append(f"{where}: the {param['in']} parameter {param['name']!r} was never sent")
        for fallback in ("UnknownPath", "MethodNotAllowed"):
            if fallback not in self.seen_fallbacks:
                self.mismatches.append(f"components.responses.{fallback} was never produced")
        for item_ptr, seen in self.branches.items():
            schema = self.d.at(item_ptr)
            for i, branch in enumerate(schema["oneOf"]):
                if i not in seen:
                    name = branch.get("title") or branch.get("$ref") or i
                    self.mismatches.append(f"no item of a stream matched {item_ptr} oneOf {name}")
        return skipped


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    with open(sys.argv[1], encoding="utf-8") as f:
        doc = json.load(f)
    with open(sys.argv[2], encoding="utf-8") as f:
        answers = json.load(f)
    checker = Checker(doc)
    skipped = []
    if checker.check_document():
        for answer in answers:
            try:
                checker.check_answer(answer)
            except Exception as e:  # a broken document must be reported, not crash
                checker.fail(answer, f"cannot check: {type(e).__name__}: {e}")
        skipped = checker.check_coverage()
    operations = sum(1 for item in doc.get("paths", {}).values() for m in METHODS if m in item)
    for s in skipped:
        print(f"not exercised, as documented: {s}")
    if checker.mismatches:
        print(f"{len(checker.mismatches)} mismatches between {sys.argv[1]} and {len(answers)} answers:")
        for m in checker.mismatches:
            print(f"  - {m}")
        sys.exit(1)
    print(f"{len(answers)} answers agree with the {operations} operations of {sys.argv[1]}; "
          f"every operation, status and parameter was exercised")


if __name__ == "__main__":
    main()
