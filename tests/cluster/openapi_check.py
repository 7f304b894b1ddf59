#!/usr/bin/env python3
"""Check a node's OpenAPI document, and real answers against it.

Usage: openapi_check.py DOCUMENT.json OBSERVED.json

1. The document must be valid OpenAPI 3.1 (openapi-spec-validator, the
   Python reference validator).
2. Every schema example validates against its schema (strictly).
3. OBSERVED is a list of {"method", "path" (the documented template),
   "status", "content_type", "body"}: each answer must be one the document
   names for that operation and status, with that content type, and a JSON
   body must validate against the documented schema. Objects are checked
   strictly: a field the document does not name fails, so the description
   cannot drift from what nodes send.

Prints every failure and exits 1 if there is one.
"""

import copy
import json
import sys

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate


def strict(schema):
    """The schema with unknown object fields refused, recursively."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def main():
    with open(sys.argv[1]) as f:
        document = json.load(f)
    with open(sys.argv[2]) as f:
        observed = json.load(f)
    validate(document)
    components = strict(copy.deepcopy(document.get("components", {})))
    failures = []
    for seen in observed:
        where = f'{seen["method"]} {seen["path"]} -> {seen["status"]}'
        operation = document["paths"].get(seen["path"], {}).get(seen["method"].lower())
        if operation is None:
            failures.append(f"{where}: not in the document")
            continue
        response = operation["responses"].get(str(seen["status"]))
        if response is None:
            failures.append(f"{where}: the document names no such status ({sorted(operation['responses'])})")
            continue
        content = response.get("content", {})
        media = seen["content_type"].split(";")[0].strip()
        documented = {m.split(";")[0].strip(): v for m, v in content.items()}
        if media not in documented:
            failures.append(f"{where}: content type {media!r}, documented {sorted(documented)}")
            continue
        if media != "application/json":
            continue
        schema = strict(documented[media].get("schema", {}))
        schema = dict(schema, components=components)
        errors = sorted(Draft202012Validator(schema).iter_errors(seen["body"]), key=lambda e: list(e.path))
        for e in errors[:5]:
            path = "/".join(str(p) for p in e.absolute_path)
            failures.append(f"{where}: at /{path}: {e.message[:300]}")
    # Every example in the document fits the schema it illustrates.
    examples = 0
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        found = list(schema.get("examples", []))
        if "example" in schema:
            found.append(schema["example"])
        for example in found:
            examples += 1
            check = dict(strict(schema), components=components)
            for e in list(Draft202012Validator(check).iter_errors(example))[:3]:
                path = "/".join(str(p) for p in e.absolute_path)
                failures.append(f"the example of {name}: at /{path}: {e.message[:300]}")
    if examples < 20:
        failures.append(f"only {examples} schema examples in the document")
    for f in failures:
        print(f)
    print(f"{len(observed)} answers checked, {len(failures)} failures", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
