"""WebSocket API (`GET /api/ws`): authenticate, subscribe, receive the events of devices you may see."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from uuid import UUID

from aiohttp import WSMsgType, web
from pydantic import ValidationError

from wamd_server.domain.errors import DomainError
from wamd_server.protocol import ws as proto
from wamd_server.protocol.events import EVENT_TYPES
from wamd_server.web.context import CTX
from wamd_server.web.hub import HUB, Connection, Subscription
from wamd_server.web.routing import RouteTable

log = logging.getLogger(__name__)

routes = RouteTable()

AUTH_TIMEOUT_S = 10.0
MAX_MESSAGE = 64 * 1024


@routes.get(
    "/api/ws",
    summary="WebSocket: send {type: auth, token} first, then commands (subscribe_events, ping)",
    tag="events",
    auth="public",
    content_type="application/json",
)
async def websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    conn = await _authenticate(request, ws)
    if conn is None:
        return ws
    hub = request.app[HUB]
    hub.connections.add(conn)
    writer = asyncio.create_task(_write(conn))
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            reply = await _handle(request, conn, msg.data)
            if reply is not None:
                conn.send(reply)
    finally:
        hub.connections.discard(conn)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    return ws


async def _authenticate(request: web.Request, ws: web.WebSocketResponse) -> Connection | None:
    ctx = request.app[CTX]
    try:
        first = await ws.receive(timeout=AUTH_TIMEOUT_S)
        message = proto.AuthMessage.model_validate_json(first.data if first.type == WSMsgType.TEXT else "")
        user = await ctx.auth.user_for_token(message.token)
    except (TimeoutError, ValidationError, DomainError) as exc:
        reason = "authentication timed out" if isinstance(exc, TimeoutError) else "invalid authentication"
        if not ws.closed:
            await ws.send_json({"type": "auth_invalid", "message": reason})
            await ws.close(code=4001, message=reason.encode())
        return None
    granted = None if user.is_admin else await ctx.user_repo.granted_device_ids(user.id)
    await ws.send_json({"type": "auth_ok", "version": ctx.version})
    return Connection(ws, user, granted, request.transport, message.token)


async def _write(conn: Connection) -> None:
    while True:
        message = await conn.queue.get()
        try:
            await conn.ws.send_json(message)
        except (ConnectionError, RuntimeError):  # the client went away; the handler ends the connection
            return


async def _handle(request: web.Request, conn: Connection, raw: str) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
        command = proto.Command.model_validate(data)
    except (ValueError, ValidationError):
        return proto.error(None, "invalid_message", "expected a JSON object with an integer id and a type")
    extra = command.model_extra or {}
    if command.type == "ping":
        return {"id": command.id, "type": "pong"}
    if command.type == "subscribe_events":
        return await _subscribe(request, conn, command.id, extra)
    if command.type == "unsubscribe_events":
        try:
            sub = proto.UnsubscribeEvents.model_validate(extra)
        except ValidationError:
            return proto.error(command.id, "invalid_input", "subscription (an integer) is required")
        if conn.subscriptions.pop(sub.subscription, None) is None:
            return proto.error(command.id, "not_found", "no such subscription")
        return proto.result(command.id)
    return proto.error(command.id, "unknown_command", f"unknown command {command.type!r}")


async def _subscribe(request: web.Request, conn: Connection, msg_id: int, extra: dict[str, Any]) -> dict[str, Any]:
    try:
        sub = proto.SubscribeEvents.model_validate(extra)
    except ValidationError:
        return proto.error(msg_id, "invalid_input", "event_types must be a list of strings, device_id a string")
    types = None
    if sub.event_types is not None:
        unknown = sorted(set(sub.event_types) - set(EVENT_TYPES))
        if unknown:
            return proto.error(msg_id, "invalid_input", f"unknown event types: {', '.join(unknown)}")
        types = frozenset(sub.event_types)
    device_id = None
    if sub.device_id is not None:
        try:
            device_id = UUID(sub.device_id)
        except ValueError:
            return proto.error(msg_id, "not_found", "device not found")
        if conn.granted is not None and device_id not in conn.granted:
            return proto.error(msg_id, "not_found", "device not found")
        try:  # a device that does not exist is not found for admins either (as at GET /api/devices/{id})
            await request.app[CTX].devices.get(conn.user, device_id)
        except DomainError:
            return proto.error(msg_id, "not_found", "device not found")
    if msg_id in conn.subscriptions:
        return proto.error(msg_id, "invalid_input", "this id is already used by a subscription")
    conn.subscriptions[msg_id] = Subscription(types, device_id)
    return proto.result(msg_id)
