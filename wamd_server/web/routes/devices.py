"""Devices: CRUD, pairing by QR or phone code, logout and refresh."""

from __future__ import annotations

from aiohttp import web

from wamd_server.domain.errors import InvalidInput
from wamd_server.domain.models import Device, DevicePatch
from wamd_server.domain.ports import BusEvent
from wamd_server.protocol import dto
from wamd_server.protocol.events import ACCESS_CHANGED
from wamd_server.web.context import CTX
from wamd_server.web.inputs import json_body, page, page_params, path_id, time_id_cursor, user_of
from wamd_server.web.routes.users import PAGING
from wamd_server.web.routing import RouteTable

routes = RouteTable()


def device_out(device: Device) -> dict[str, object]:
    return dto.DeviceOut(
        id=str(device.id),
        name=device.name,
        phone=device.phone,
        jid=device.jid,
        status=device.status.value,
        status_reason=device.status_reason,
        last_seen_at=device.last_seen_at,
        min_delay_s=device.min_delay_s,
        max_delay_s=device.max_delay_s,
        hourly_cap=device.hourly_cap,
        daily_cap=device.daily_cap,
        quiet_start=device.quiet_start,
        quiet_end=device.quiet_end,
        warmup_days=device.warmup_days,
        typing=device.typing,
        queue_paused_reason=device.queue_paused_reason,
        created_at=device.created_at,
    ).model_dump(mode="json")


@routes.get(
    "/api/devices", summary="Devices the caller may see", tag="devices", response=dto.Page[dto.DeviceOut], query=PAGING
)
async def list_devices(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    devices = await request.app[CTX].devices.list_page(user_of(request), limit, time_id_cursor(cursor))
    last = f"{devices[-1].created_at.isoformat()}|{devices[-1].id}" if devices else None
    return web.json_response(page([device_out(d) for d in devices], limit, last))


@routes.post(
    "/api/devices",
    summary="Create a device (then pair it)",
    tag="devices",
    body=dto.DeviceCreate,
    response=dto.DeviceOut,
    status=201,
)
async def create_device(request: web.Request) -> web.Response:
    user = user_of(request)
    body = await json_body(request, dto.DeviceCreate)
    device = await request.app[CTX].devices.create(user, body.name)
    if not user.is_admin:  # staff get a grant on what they create
        await request.app[CTX].bus.publish(BusEvent(ACCESS_CHANGED, {"user_id": str(user.id)}))
    return web.json_response(device_out(device), status=201)


@routes.get("/api/devices/{id}", summary="One device", tag="devices", response=dto.DeviceOut)
async def get_device(request: web.Request) -> web.Response:
    device = await request.app[CTX].devices.get(user_of(request), path_id(request))
    return web.json_response(device_out(device))


@routes.patch(
    "/api/devices/{id}",
    summary="Rename a device or change its pacing",
    tag="devices",
    body=dto.DevicePatchIn,
    response=dto.DeviceOut,
)
async def patch_device(request: web.Request) -> web.Response:
    device_id = path_id(request)
    user = user_of(request)
    await request.app[CTX].devices.get(user, device_id)  # 404 before validating the body
    body = await json_body(request, dto.DevicePatchIn)
    device = await request.app[CTX].devices.update(user, device_id, DevicePatch(**body.model_dump()))
    return web.json_response(device_out(device))


@routes.delete(
    "/api/devices/{id}",
    summary="Delete a device: unlink it and remove its session (admins)",
    tag="devices",
    response=dto.Ok,
)
async def delete_device(request: web.Request) -> web.Response:
    await request.app[CTX].devices.delete(user_of(request), path_id(request))
    return web.json_response({"ok": True})


@routes.post(
    "/api/devices/{id}/pair",
    summary="Pair by QR (codes as device.qr events) or by phone code",
    tag="devices",
    body=dto.PairRequest,
    response=dto.PairOut,
)
async def pair_device(request: web.Request) -> web.Response:
    device_id = path_id(request)
    user = user_of(request)
    service = request.app[CTX].devices
    await service.get(user, device_id)
    body = await json_body(request, dto.PairRequest)
    if body.method == "qr":
        if body.phone is not None:
            raise InvalidInput("phone is only for method 'code'", {"field": "phone"})
        device = await service.pair_qr(user, device_id)
        return web.json_response(dto.PairOut(status=device.status.value).model_dump(mode="json"))
    if not body.phone:
        raise InvalidInput("phone is required for method 'code'", {"field": "phone"})
    code = await service.pair_code(user, device_id, body.phone)
    return web.json_response(dto.PairOut(status="pairing", pair_code=code).model_dump(mode="json"))


@routes.get(
    "/api/devices/{id}/qr", summary="The current QR code of a pairing device", tag="devices", response=dto.QrOut
)
async def device_qr(request: web.Request) -> web.Response:
    code, expires_at = await request.app[CTX].devices.current_qr(user_of(request), path_id(request))
    return web.json_response(dto.QrOut(code=code, expires_at=expires_at).model_dump(mode="json"))


@routes.post(
    "/api/devices/{id}/logout",
    summary="Unlink the device from WhatsApp (keeps phone and JID)",
    tag="devices",
    response=dto.DeviceOut,
)
async def logout_device(request: web.Request) -> web.Response:
    device = await request.app[CTX].devices.logout(user_of(request), path_id(request))
    return web.json_response(device_out(device))


@routes.post(
    "/api/devices/{id}/refresh", summary="Reconnect from the stored session", tag="devices", response=dto.RefreshOut
)
async def refresh_device(request: web.Request) -> web.Response:
    status = await request.app[CTX].devices.refresh(user_of(request), path_id(request))
    return web.json_response({"status": status})
