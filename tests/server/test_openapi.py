"""`/api/openapi.json` describes exactly the routes the server has, and how to call them."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from typing import Any

from tests.conftest import Server

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
PATH_PARAM = re.compile(r"\{(\w+)\}")


async def spec_of(server: Server) -> dict[str, Any]:
    reply = await server.call("GET", "/api/openapi.json")  # public: no token
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    spec: dict[str, Any] = reply.body
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"] and spec["info"]["version"]
    return spec


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): op
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    }


def server_routes(server: Server) -> set[tuple[str, str]]:
    assert server.runtime.app is not None
    routes = set()
    for route in server.runtime.app.router.routes():
        if route.method == "HEAD":
            continue
        assert route.resource is not None
        routes.add((route.method, route.resource.canonical))
    return routes


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    prefix = "#/components/schemas/"
    assert ref.startswith(prefix), ref
    resolved: dict[str, Any] = spec["components"]["schemas"][ref[len(prefix) :]]
    return resolved


def refs_in(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs_in(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs_in(value)]
    return []


def concrete(path: str) -> str:
    """The path with every parameter filled in with something harmless."""
    return PATH_PARAM.sub(lambda m: "60123000001" if m.group(1) == "phone" else str(uuid.uuid4()), path)


async def test_the_spec_lists_exactly_the_routes_that_exist(server: Server) -> None:
    documented = set(operations(await spec_of(server)))
    existing = server_routes(server)
    assert existing - documented == set(), "routes missing from the spec"
    assert documented - existing == set(), "the spec lists routes that do not exist"
    # the contract's core routes are there
    for route in [
        ("GET", "/api/health"),
        ("POST", "/api/auth/login"),
        ("POST", "/api/auth/logout"),
        ("GET", "/api/me"),
        ("GET", "/api/users"),
        ("POST", "/api/users"),
        ("PATCH", "/api/users/{id}"),
        ("DELETE", "/api/users/{id}"),
        ("PUT", "/api/users/{id}/devices"),
        ("GET", "/api/devices"),
        ("POST", "/api/devices"),
        ("GET", "/api/devices/{id}"),
        ("PATCH", "/api/devices/{id}"),
        ("DELETE", "/api/devices/{id}"),
        ("POST", "/api/devices/{id}/pair"),
        ("GET", "/api/devices/{id}/qr"),
        ("POST", "/api/devices/{id}/logout"),
        ("POST", "/api/devices/{id}/refresh"),
        ("GET", "/api/ws"),
        ("GET", "/api/openapi.json"),
    ]:
        assert route in documented, route


async def test_every_operation_has_a_summary_and_a_unique_operation_id(server: Server) -> None:
    ops = operations(await spec_of(server))
    for key, op in ops.items():
        assert isinstance(op.get("summary"), str) and op["summary"].strip(), key
        assert op.get("operationId"), key
    counts = Counter(op["operationId"] for op in ops.values())
    duplicates = {
        op_id: sorted(f"{m} {p}" for (m, p), op in ops.items() if op["operationId"] == op_id)
        for op_id, n in counts.items()
        if n > 1
    }
    assert duplicates == {}, "operationId must be unique among all operations (OpenAPI 3)"


async def test_protected_operations_declare_bearer_security(server: Server) -> None:
    spec = await spec_of(server)
    schemes = spec["components"]["securitySchemes"]
    bearer_names = {name for name, s in schemes.items() if s.get("type") == "http" and s.get("scheme") == "bearer"}
    assert bearer_names, schemes

    for (method, path), op in operations(spec).items():
        declared = bool(op.get("security"))
        if declared:
            for requirement in op["security"]:
                assert set(requirement) <= bearer_names, (method, path, requirement)
        # what the server does without a token decides whether the route is protected
        reply = await server.call(method, concrete(path))
        protected = reply.status == 401
        assert declared == protected, (method, path, reply.status, reply.body)
        if protected:
            assert reply.body["error"]["code"] == "unauthorized"
            assert "401" in op["responses"], (method, path)


async def test_parameters_bodies_and_responses_are_described(server: Server) -> None:
    spec = await spec_of(server)
    ops = operations(spec)
    for (method, path), op in ops.items():
        names = set(PATH_PARAM.findall(path))
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == names, (method, path)
        assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path"), (method, path)
        success = [code for code in op["responses"] if code.startswith("2")]
        assert success, (method, path)
        for code, response in op["responses"].items():
            assert response.get("description"), (method, path, code)

    # every reference points at a schema that is there
    schemas = spec["components"]["schemas"]
    for ref in refs_in(spec):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref

    for route in (("GET", "/api/devices"), ("GET", "/api/users")):
        query = {p["name"] for p in ops[route].get("parameters", []) if p["in"] == "query"}
        assert {"limit", "cursor"} <= query, route
        page = resolve(spec, ops[route]["responses"]["200"]["content"]["application/json"]["schema"])
        assert {"items", "next_cursor"} <= set(page["properties"]), route

    body_routes = [
        ("POST", "/api/auth/login", {"email", "password"}),
        ("POST", "/api/users", {"email", "password", "role", "name"}),
        ("PATCH", "/api/users/{id}", {"name", "role", "is_active", "password"}),
        ("PUT", "/api/users/{id}/devices", {"device_ids"}),
        ("POST", "/api/devices", {"name"}),
        (
            "PATCH",
            "/api/devices/{id}",
            {
                "name",
                "min_delay_s",
                "max_delay_s",
                "hourly_cap",
                "daily_cap",
                "quiet_start",
                "quiet_end",
                "warmup_days",
                "typing",
            },
        ),
        ("POST", "/api/devices/{id}/pair", {"method", "phone"}),
    ]
    for method, path, fields in body_routes:
        body = ops[(method, path)]["requestBody"]["content"]["application/json"]["schema"]
        assert set(resolve(spec, body)["properties"]) == fields, (method, path)

    created = ops[("POST", "/api/devices")]["responses"]["201"]["content"]["application/json"]["schema"]
    device_fields = set(resolve(spec, created)["properties"])
    assert {"id", "name", "phone", "jid", "status", "hourly_cap", "daily_cap", "created_at"} <= device_fields

    error = resolve(
        spec, ops[("GET", "/api/devices/{id}")]["responses"]["404"]["content"]["application/json"]["schema"]
    )
    assert set(error["properties"]) == {"error"}
