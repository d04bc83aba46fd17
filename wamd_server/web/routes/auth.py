"""Login, logout and the caller's own account."""

from __future__ import annotations

from aiohttp import web

from wamd_server.domain.models import User
from wamd_server.domain.ports import BusEvent
from wamd_server.protocol import dto
from wamd_server.protocol.events import ACCESS_CHANGED
from wamd_server.web.context import CTX
from wamd_server.web.inputs import json_body, user_of
from wamd_server.web.routing import TOKEN, RouteTable

routes = RouteTable()


def user_out(user: User) -> dto.UserOut:
    return dto.UserOut(
        id=str(user.id),
        email=user.email,
        name=user.name,
        role=user.role.value,
        is_active=user.is_active,
        created_at=user.created_at,
        last_login_at=user.last_login_at,
    )


def client_address(request: web.Request) -> str:
    if request.app[CTX].config.trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-For", "")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.remote or "unknown"


@routes.post(
    "/api/auth/login",
    summary="Log in with email and password; returns a bearer token",
    tag="auth",
    auth="public",
    body=dto.LoginRequest,
    response=dto.LoginResponse,
)
async def login(request: web.Request) -> web.Response:
    body = await json_body(request, dto.LoginRequest)
    token, user = await request.app[CTX].auth.login(body.email, body.password, client_address(request))
    return web.json_response(dto.LoginResponse(token=token, user=user_out(user)).model_dump(mode="json"))


@routes.post("/api/auth/logout", summary="End this token's session", tag="auth", response=dto.Ok)
async def logout(request: web.Request) -> web.Response:
    await request.app[CTX].auth.logout(request[TOKEN])
    # WebSockets opened with this token close too.
    await request.app[CTX].bus.publish(BusEvent(ACCESS_CHANGED, {"user_id": str(user_of(request).id)}))
    return web.json_response({"ok": True})


@routes.get("/api/me", summary="The caller's account", tag="auth", response=dto.MeOut)
async def me(request: web.Request) -> web.Response:
    user = user_of(request)
    granted = None if user.is_admin else await request.app[CTX].user_repo.granted_device_ids(user.id)
    out = dto.MeOut(
        **user_out(user).model_dump(), device_ids=None if granted is None else sorted(str(d) for d in granted)
    )
    return web.json_response(out.model_dump(mode="json"))
