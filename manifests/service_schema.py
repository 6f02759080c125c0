"""A model's input schema as the service publishes it, checked with `jsonschema`.

The project's own rules know what it has learnt about the models; the service's
schema is what the service itself will accept, so a row that breaks it is refused
before anything is spent instead of failing (or being billed) at submit time.

The document behind a model's `schema` URL is OpenAPI: the input object is looked
for where Atlas's own MCP client looks (`components.schemas.Input`), then as the
JSON request body of the operation that takes a prompt, and only then is the
document taken as a JSON schema itself. Like that client, unknown properties are
refused even where the document forgets to say so: a typo in a parameter costs money.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError, ValidationError


class SchemaUnusable(ValueError):
    """The document holds no input schema this project can check rows against."""


def input_schema(document: object) -> dict[str, Any]:
    """The input object schema in a model's schema document, with the document's
    `components` kept beside it so that its `$ref`s still resolve."""
    if not isinstance(document, Mapping):
        raise SchemaUnusable("the schema document is not a JSON object")
    components = document.get("components")
    schemas = components.get("schemas") if isinstance(components, Mapping) else None
    found: Any = schemas.get("Input") if isinstance(schemas, Mapping) else None
    if not isinstance(found, Mapping):
        found = _request_body_schema(document)
    if found is None and ("properties" in document or document.get("type") == "object"):
        found = document
    if not isinstance(found, Mapping):
        raise SchemaUnusable("no input schema (components.schemas.Input, a JSON request body, or properties)")
    found = _resolve(found, document)
    if not isinstance(found.get("properties"), Mapping):
        raise SchemaUnusable("the input schema lists no properties")
    schema = dict(found)
    properties = dict(schema["properties"])
    for name in schema.get("required") or []:  # named as required yet not declared: let it exist
        properties.setdefault(str(name), {})
    schema["properties"] = properties
    schema["additionalProperties"] = False
    if isinstance(components, Mapping) and found is not document:
        schema["components"] = components
    return schema


def _request_body_schema(document: Mapping[str, Any]) -> Any:
    paths = document.get("paths")
    if not isinstance(paths, Mapping):
        return None
    for operations in paths.values():
        for operation in operations.values() if isinstance(operations, Mapping) else ():
            try:
                schema = operation["requestBody"]["content"]["application/json"]["schema"]
            except (KeyError, TypeError):
                continue
            resolved = _resolve(schema, document) if isinstance(schema, Mapping) else None
            if resolved is not None and "prompt" in (resolved.get("properties") or {}):
                return resolved
    return None


def _resolve(schema: Mapping[str, Any], document: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local `$ref` (`#/a/b`) at the top of a schema, a few hops at most."""
    for _ in range(5):
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        target: Any = document
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, Mapping) else None
        if not isinstance(target, Mapping):
            raise SchemaUnusable(f"{ref} does not resolve in the schema document")
        schema = target
    return schema


@dataclass(frozen=True)
class ServiceSchema:
    """One model's input schema, ready to check request bodies against."""

    model: str
    schema: dict[str, Any]

    @classmethod
    def from_document(cls, model: str, document: object) -> ServiceSchema:
        schema = input_schema(document)
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            raise SchemaUnusable(f"the input schema is not a valid JSON schema ({exc.message})") from None
        return cls(model, schema)

    def problems(self, body: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
        """(field, message) for every way `body` breaks the schema, fields named as in a manifest."""
        instance = dict(body)
        if "model" in self.schema["properties"]:
            instance.setdefault("model", self.model)
        validator_class = jsonschema.validators.validator_for(self.schema)
        validator = validator_class(self.schema, format_checker=validator_class.FORMAT_CHECKER)
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
            yield from _explain(error)


def _explain(error: ValidationError) -> Iterator[tuple[str, str]]:
    if error.validator == "additionalProperties" and not error.absolute_path:
        known = set(error.schema.get("properties") or {}) if isinstance(error.schema, Mapping) else set()
        takes = ", ".join(sorted(known - {"model", "prompt", "images", "size"})) or "none"
        for name in sorted(set(error.instance) - known):
            yield f"params.{name}", f"not accepted by the service's schema; its parameters are: {takes}"
        return
    if error.validator == "required" and isinstance(error.instance, Mapping):
        for name in error.validator_value:
            if name not in error.instance:
                yield _field([*error.absolute_path, name]), "is required by the service's schema"
        return
    yield _field(list(error.absolute_path)), f"the service's schema says: {error.message}"


def _field(path: list[Any]) -> str:
    """A JSON path in the request body as the manifest names it: images[1], params.seed."""
    if not path:
        return "params"
    head, rest = str(path[0]), path[1:]
    if head == "images" and rest and isinstance(rest[0], int):
        return f"images[{rest[0] + 1}]"
    if head in ("prompt", "images", "size"):
        return head
    return "params." + ".".join(str(p) for p in path)
