"""The OpenAPI 3.1 document, generated from the route table and the msgspec structs."""

from __future__ import annotations

from typing import Any

import msgspec

from api.routes import ENDPOINTS
from api.schemas import ALIASES


def _ref_template() -> str:
    return "#/components/schemas/{name}"


def _decimals_as_numbers(node: Any) -> Any:
    """msgspec documents Decimal as a string; this API reads and writes it as a JSON number."""
    if isinstance(node, dict):
        if node.get("format") == "decimal":
            node = {k: v for k, v in node.items() if k != "format"} | {"type": "number"}
        return {k: _decimals_as_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_decimals_as_numbers(v) for v in node]
    return node


OPTIONAL_BODIES = {"/imports", "/loans/{loan_id}/repayments"}


def document() -> dict[str, Any]:
    types: list[Any] = []
    for endpoint in ENDPOINTS:
        if endpoint.request is not None:
            types.append(endpoint.request)
        types += [body for body, _ in endpoint.responses.values()]
    schemas, components = _decimals_as_numbers(list(msgspec.json.schema_components(types, ref_template=_ref_template())))
    for struct, aliases in ALIASES.items():  # accepted as their fields are, so documented as such
        component = components[struct.__name__]
        for alias, name in aliases.items():
            component["properties"][alias] = {
                **component["properties"][name],
                "description": f"An alias of `{name}` (both: only with one value)",
            }
            if name in component.get("required", ()):  # one of the two is
                component["required"].remove(name)
                component.setdefault("allOf", []).append({"anyOf": [{"required": [name]}, {"required": [alias]}]})
    resolved = iter(schemas)
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        operation: dict[str, Any] = {"summary": endpoint.summary, "operationId": endpoint.handler.__name__}
        if endpoint.parameters:
            operation["parameters"] = list(endpoint.parameters)
        if endpoint.request is not None:
            operation["requestBody"] = {
                "required": endpoint.path not in OPTIONAL_BODIES,
                "content": {"application/json": {"schema": next(resolved)}},
            }
        operation["responses"] = {
            str(status): {"description": description, "content": {endpoint.media_type: {"schema": next(resolved)}}}
            for status, (_, description) in endpoint.responses.items()
        }
        operation["responses"]["405"] = {"description": "Method not allowed"}
        if endpoint.request is not None:
            operation["responses"]["413"] = {"description": "A body over 1 MiB (payload_too_large)"}
            operation["responses"]["415"] = {"description": "A body whose Content-Type is not JSON (unsupported_media_type)"}
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Credit approval ledger",
            "version": "1.0.0",
            "description": "Every path is also served with a trailing slash and under /api.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }


def encoded() -> bytes:
    return msgspec.json.encode(document())
