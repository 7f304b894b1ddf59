#!/usr/bin/env python3
"""Check a node's OpenAPI document, and real answers against it.

Usage: openapi_check.py DOCUMENT.json OBSERVED.json

1. The document must be valid OpenAPI 3.1 (openapi-spec-validator, the
   Python reference validator).
2. Every schema in components.schemas has an example, and every request
   and response body has one (on its media type, its schema or the schema
   its $ref names), except a binary body (application/octet-stream,
   application/wasm, a `format: binary` string): a file's bytes are not
   something JSON can show. Every example validates against its schema
   (strictly).
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


def examples_of(obj):
    """The examples an OpenAPI object (a schema or a media type) gives."""
    found = list(obj.get("examples", [])) if isinstance(obj.get("examples"), list) else []
    if isinstance(obj.get("examples"), dict):
        # A media type's examples: name -> Example Object.
        found += [e["value"] for e in obj["examples"].values() if "value" in e]
    if "example" in obj:
        found.append(obj["example"])
    return found


def binary(media, schema):
    return media in ("application/octet-stream", "application/wasm") or schema.get("format") == "binary"


def example_failures(document, components):
    """Every schema and every body has an example, and each one fits."""
    failures = []
    schemas = document.get("components", {}).get("schemas", {})

    def fits(what, schema, example):
        check = dict(strict(schema), components=components)
        for e in list(Draft202012Validator(check).iter_errors(example))[:3]:
            path = "/".join(str(p) for p in e.absolute_path)
            failures.append(f"{what}: at /{path}: {e.message[:300]}")

    for name, schema in schemas.items():
        found = examples_of(schema)
        if not found:
            failures.append(f"the schema {name} has no example")
        for example in found:
            fits(f"the example of {name}", schema, example)

    def has_example(schema):
        if examples_of(schema):
            return True
        ref = schema.get("$ref", "")
        return ref.startswith("#/components/schemas/") and bool(examples_of(schemas.get(ref.split("/")[-1], {})))

    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            bodies = [("request", operation.get("requestBody", {}))]
            bodies += [(f"response {status}", r) for status, r in operation["responses"].items()]
            for which, body in bodies:
                for media, content in body.get("content", {}).items():
                    where = f"{method.upper()} {path} {which} ({media})"
                    schema = content.get("schema", {})
                    media_examples = examples_of(content)
                    if not media_examples and not has_example(schema) and not binary(media.split(";")[0].strip(), schema):
                        failures.append(f"{where}: no example")
                    # A text body's example is a string, a JSON body's the JSON.
                    for example in media_examples:
                        fits(f"the example of {where}", schema, example)
    return failures


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
    failures += example_failures(document, components)
    for f in failures:
        print(f)
    print(f"{len(observed)} answers checked, {len(failures)} failures", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
