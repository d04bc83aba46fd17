"""Route declarations with the facts OpenAPI needs, and the authentication guard every route passes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from wamd_server.domain.errors import Forbidden, Unauthorized
from wamd_server.domain.models import User
from wamd_server.web.context import CTX

Auth = Literal["public", "user", "admin"]
RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

USER = web.RequestKey("wamd_user", User)
TOKEN = web.RequestKey("wamd_token", str)


@dataclass(frozen=True)
class QueryParam:
    name: str
    description: str
    type: str = "string"


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: RouteHandler
    summary: str
    tag: str
    auth: Auth = "user"
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    query: Sequence[QueryParam] = ()
    content_type: str = "application/json"  # of the response
    request_content_type: str = "application/json"


@dataclass
class RouteTable:
    endpoints: list[Endpoint] = field(default_factory=list)

    def route(self, method: str, path: str, **meta: Any) -> Callable[[RouteHandler], RouteHandler]:
        def register(handler: RouteHandler) -> RouteHandler:
            self.endpoints.append(Endpoint(method=method, path=path, handler=handler, **meta))
            return handler

        return register

    def get(self, path: str, **meta: Any) -> Callable[[RouteHandler], RouteHandler]:
        return self.route("GET", path, **meta)

    def post(self, path: str, **meta: Any) -> Callable[[RouteHandler], RouteHandler]:
        return self.route("POST", path, **meta)

    def put(self, path: str, **meta: Any) -> Callable[[RouteHandler], RouteHandler]:
        return self.route("PUT", path, **meta)

    def patch(self, path: str, **meta: Any) -> Callable[[RouteHandler], RouteHandler]:
        return self.route("PATCH", path, **meta)

    def delete(self, path: str, **meta: Any) -> Callable[[RouteHandler], RouteHandler]:
        return self.route("DELETE", path, **meta)


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return token.strip()


def guarded(endpoint: Endpoint) -> RouteHandler:
    """Wrap a handler with its authentication rule; the caller is then at `request[USER]`."""
    if endpoint.auth == "public":
        return endpoint.handler

    async def handler(request: web.Request) -> web.StreamResponse:
        token = bearer_token(request)
        user = await request.app[CTX].auth.user_for_token(token)
        if endpoint.auth == "admin" and not user.is_admin:
            raise Forbidden("this needs an admin account")
        request[USER] = user
        request[TOKEN] = token
        return await endpoint.handler(request)

    return handler


def install(app: web.Application, endpoints: Sequence[Endpoint]) -> None:
    for endpoint in endpoints:
        app.router.add_route(endpoint.method, endpoint.path, guarded(endpoint))
