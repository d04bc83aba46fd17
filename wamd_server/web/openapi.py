"""`/api/openapi.json`, built from the route table, so it lists exactly the routes that exist."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from wamd_server.protocol.dto import ErrorBody
from wamd_server.web.routing import Endpoint

PATH_PARAM = re.compile(r"\{(\w+)\}")
REF = "#/components/schemas/{model}"

ERROR_STATUSES = {
    "400": "Invalid input",
    "401": "Missing or invalid token",
    "403": "Not allowed for this role",
    "404": "Not found (or not visible to the caller)",
    "409": "Conflicts with the current state",
    "413": "Body too large",
    "429": "Too many attempts",
}


def build_spec(endpoints: Sequence[Endpoint], version: str) -> dict[str, Any]:
    models: list[type[BaseModel]] = [ErrorBody]
    for ep in endpoints:
        models += [m for m in (ep.body, ep.response) if m is not None]
    unique = list(dict.fromkeys(models))
    keys, schema = models_json_schema([(m, "validation") for m in unique], ref_template=REF)
    refs = {model: keys[(model, "validation")] for model in unique}

    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        paths.setdefault(ep.path, {})[ep.method.lower()] = _operation(ep, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "wamd API", "version": version},
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def operation_id(ep: Endpoint) -> str:
    """Unique by construction: one operation per method and path (`GET /api/devices/{id}` → get_devices_id)."""
    words = re.sub(r"[^a-z0-9]+", "_", ep.path.lower().removeprefix("/api")).strip("_")
    return f"{ep.method.lower()}_{words or 'root'}"


def _operation(ep: Endpoint, refs: dict[type[BaseModel], Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": ep.summary,
        "tags": [ep.tag],
        "operationId": operation_id(ep),
    }
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in PATH_PARAM.findall(ep.path)
    ]
    params += [
        {"name": q.name, "in": "query", "required": False, "description": q.description, "schema": {"type": q.type}}
        for q in ep.query
    ]
    if params:
        op["parameters"] = params
    if ep.body is not None:
        op["requestBody"] = {"required": True, "content": {ep.request_content_type: {"schema": refs[ep.body]}}}
    ok: dict[str, Any] = {"description": "Success"}
    if ep.response is not None:
        ok["content"] = {ep.content_type: {"schema": refs[ep.response]}}
    responses: dict[str, Any] = {str(ep.status): ok}
    error = {"content": {"application/json": {"schema": refs[ErrorBody]}}}
    for status, text in ERROR_STATUSES.items():
        if ep.auth == "public" and status in ("401", "403"):
            continue
        responses[status] = {"description": text, **error}
    op["responses"] = responses
    if ep.auth != "public":
        op["security"] = [{"bearer": []}]
    return op
