"""Chats: the chat list of a device, a chat's history, manual sends and reading."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from wamd_server.domain.errors import InvalidInput
from wamd_server.protocol import dto
from wamd_server.web.context import CTX
from wamd_server.web.inputs import DEFAULT_LIMIT, MAX_LIMIT, json_body, parse_uuids, path_id, user_of
from wamd_server.web.routing import QueryParam, RouteTable

routes = RouteTable()
BEFORE = QueryParam("before", "only items older than this time (ISO 8601): the previous page's oldest")
LIMIT = QueryParam("limit", f"page size, 1..{MAX_LIMIT} (default {DEFAULT_LIMIT})", "integer")


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidInput(f"limit must be a whole number from 1 to {MAX_LIMIT}", {"field": "limit"})
    return int(raw)


def _before(request: web.Request) -> datetime | None:
    raw = request.query.get("before")
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidInput("before must be an ISO 8601 time with an offset", {"field": "before"}) from None
    if value.tzinfo is None:
        raise InvalidInput("before must be an ISO 8601 time with an offset", {"field": "before"})
    return value


def _page(items: list[dict[str, Any]], limit: int, time_key: str) -> dict[str, Any]:
    last = items[-1][time_key] if len(items) == limit and items else None
    return {"items": items, "next_cursor": last}


@routes.get(
    "/api/devices/{id}/chats",
    summary="The device's chats, most recent first",
    tag="chats",
    response=dto.Page[dto.ChatOut],
    query=(QueryParam("search", "name, number or last message"), LIMIT, BEFORE),
)
async def list_chats(request: web.Request) -> web.Response:
    limit = _limit(request)
    rows = await request.app[CTX].chats.chats(
        user_of(request), path_id(request), request.query.get("search") or None, limit, _before(request)
    )
    items = [dto.ChatOut.model_validate(r, from_attributes=False).model_dump(mode="json") for r in rows]
    return web.json_response(_page(items, limit, "last_message_at"))


@routes.get(
    "/api/devices/{id}/chats/{jid}/messages",
    summary="A chat's messages, newest first",
    tag="chats",
    response=dto.Page[dto.ChatMessageOut],
    query=(LIMIT, BEFORE),
)
async def chat_messages(request: web.Request) -> web.Response:
    limit = _limit(request)
    rows = await request.app[CTX].chats.messages(
        user_of(request), path_id(request), request.match_info["jid"], limit, _before(request)
    )
    items = [
        dto.ChatMessageOut(
            wa_id=r["wa_message_id"],
            chat_jid=r["chat_jid"],
            from_me=r["from_me"],
            sender_jid=r["sender_jid"],
            sender_phone=r["sender_phone"],
            push_name=r["push_name"],
            text=r["text"],
            media_type=r["media_type"],
            status=r["status"],
            timestamp=r["sent_at"],
        ).model_dump(mode="json")
        for r in rows
    ]
    return web.json_response(_page(items, limit, "timestamp"))


@routes.post(
    "/api/devices/{id}/chats/{jid}/messages",
    summary="Send a message in this chat (through the outbox)",
    tag="chats",
    body=dto.ChatSend,
    response=dto.ChatSendOut,
    status=202,
)
async def send_message(request: web.Request) -> web.Response:
    device_id = path_id(request)
    user = user_of(request)
    await request.app[CTX].devices.get(user, device_id)
    body = await json_body(request, dto.ChatSend)
    media_id = parse_uuids([body.image_media_id], "image_media_id")[0] if body.image_media_id else None
    if media_id is not None:
        await request.app[CTX].media.get(user, media_id)  # 404 for an image the caller may not use
    sent = await request.app[CTX].chats.send(
        user, device_id, request.match_info["jid"], body.text, body.client_id, media_id
    )
    return web.json_response(sent, status=202)


@routes.post(
    "/api/devices/{id}/chats/{jid}/read",
    summary="Mark the chat read (sends read receipts)",
    tag="chats",
    response=dto.ChatReadOut,
)
async def read_chat(request: web.Request) -> web.Response:
    count = await request.app[CTX].chats.read(user_of(request), path_id(request), request.match_info["jid"])
    return web.json_response({"read": count})
