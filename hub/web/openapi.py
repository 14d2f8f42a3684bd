"""The OpenAPI 3.1 description, generated from the route table and its pydantic models.

Generated, not written by hand, so it cannot drift from what the handlers accept: a route's
query model becomes its parameters and its body model its request schema.
"""

from __future__ import annotations

from typing import Any

from kiri import __version__
from kiri.hub.web.common import Route

_NO_BRACES = str.maketrans("", "", "{}")

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "status", "message"], "properties": {
        "code": {"type": "string", "description": "stable name, e.g. invalid_params, not_found, unauthorized"},
        "status": {"type": "integer"},
        "message": {"type": "string"},
        "rpc_code": {"type": "integer", "description": "the JSON-RPC code of the same error over TCP"},
        "data": {},
    }}},
}


def _parameters(route: Route) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": typ}}
        for name, typ in route.path_params.items()
    ]
    if route.query is not None:
        schema = route.query.model_json_schema()
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            if name in route.path_params:
                continue
            out.append({"name": name, "in": "query", "required": name in required, "schema": prop,
                        **({"description": prop["description"]} if "description" in prop else {})})
    return out


def spec(routes: list[Route], token_required: bool) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.method.lower() + "_" + r.path.strip("/").replace("/", "_").translate(_NO_BRACES),
            "tags": [r.tag],
            "parameters": _parameters(r),
            "responses": {
                "200": {"description": "OK", "content": {r.produces: {"schema": {}}}},
                "400": {"description": "bad parameters or body",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "401": {"description": "missing or wrong bearer token",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "404": {"description": "no such thing",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }
        if r.write:
            op["responses"]["201"] = {"description": "created", "content": {"application/json": {"schema": {}}}}
        if r.body is not None:
            schema = r.body.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[r.body.__name__] = schema
            op["requestBody"] = {"required": False, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{r.body.__name__}"}}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "kiri hub", "version": __version__,
                 "description": "The kiri hub's JSON API. Reads never write; writes run through the same "
                                "validation and transactions as the TCP protocol."},
        "paths": paths,
        "components": {"schemas": components},
    }
    if token_required:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
