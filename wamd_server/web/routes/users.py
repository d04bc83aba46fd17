"""User administration (admins only) and device grants for staff."""

from __future__ import annotations

from aiohttp import web

from wamd_server.domain.models import Role
from wamd_server.domain.ports import BusEvent
from wamd_server.protocol import dto
from wamd_server.protocol.events import ACCESS_CHANGED
from wamd_server.web.context import CTX
from wamd_server.web.inputs import id_cursor, json_body, page, page_params, parse_uuids, path_id, user_of
from wamd_server.web.routes.auth import user_out
from wamd_server.web.routing import QueryParam, RouteTable

routes = RouteTable()
PAGING = (QueryParam("limit", "page size, 1..1000 (default 100)", "integer"), QueryParam("cursor", "next_cursor"))


async def access_changed(request: web.Request, user_id: object) -> None:
    await request.app[CTX].bus.publish(BusEvent(ACCESS_CHANGED, {"user_id": str(user_id)}))


@routes.get("/api/users", summary="List users", tag="users", auth="admin", response=dto.Page[dto.UserOut], query=PAGING)
async def list_users(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    users = await request.app[CTX].users.list_page(limit, id_cursor(cursor))
    items = [user_out(u).model_dump(mode="json") for u in users]
    return web.json_response(page(items, limit, str(users[-1].id) if users else None))


@routes.post(
    "/api/users",
    summary="Create a user",
    tag="users",
    auth="admin",
    body=dto.UserCreate,
    response=dto.UserOut,
    status=201,
)
async def create_user(request: web.Request) -> web.Response:
    body = await json_body(request, dto.UserCreate)
    user = await request.app[CTX].users.create(body.email, body.password, Role(body.role), body.name)
    return web.json_response(user_out(user).model_dump(mode="json"), status=201)


@routes.get("/api/users/{id}", summary="One user", tag="users", auth="admin", response=dto.UserOut)
async def get_user(request: web.Request) -> web.Response:
    user = await request.app[CTX].users.get(path_id(request, what="user"))
    return web.json_response(user_out(user).model_dump(mode="json"))


@routes.patch(
    "/api/users/{id}",
    summary="Change a user's name, role, password or activity",
    tag="users",
    auth="admin",
    body=dto.UserPatch,
    response=dto.UserOut,
)
async def patch_user(request: web.Request) -> web.Response:
    user_id = path_id(request, what="user")
    body = await json_body(request, dto.UserPatch)
    user = await request.app[CTX].users.update(
        user_of(request),
        user_id,
        name=body.name,
        role=Role(body.role) if body.role else None,
        is_active=body.is_active,
        password=body.password,
    )
    await access_changed(request, user_id)
    return web.json_response(user_out(user).model_dump(mode="json"))


@routes.delete("/api/users/{id}", summary="Delete a user", tag="users", auth="admin", response=dto.Ok)
async def delete_user(request: web.Request) -> web.Response:
    user_id = path_id(request, what="user")
    await request.app[CTX].users.delete(user_of(request), user_id)
    await access_changed(request, user_id)
    return web.json_response({"ok": True})


@routes.get(
    "/api/users/{id}/devices", summary="Devices granted to a user", tag="users", auth="admin", response=dto.GrantsOut
)
async def get_grants(request: web.Request) -> web.Response:
    granted = await request.app[CTX].users.grants(path_id(request, what="user"))
    return web.json_response({"device_ids": sorted(str(d) for d in granted)})


@routes.put(
    "/api/users/{id}/devices",
    summary="Set the devices a staff user may see",
    tag="users",
    auth="admin",
    body=dto.GrantsIn,
    response=dto.GrantsOut,
)
async def put_grants(request: web.Request) -> web.Response:
    user_id = path_id(request, what="user")
    body = await json_body(request, dto.GrantsIn)
    granted = await request.app[CTX].users.set_grants(user_id, parse_uuids(body.device_ids, "device_ids"))
    await access_changed(request, user_id)
    return web.json_response({"device_ids": sorted(str(d) for d in granted)})
