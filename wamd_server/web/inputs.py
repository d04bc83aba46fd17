"""Reading request input: JSON bodies into pydantic models, path ids, pagination."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ValidationError

from wamd_server.domain.errors import DomainError, InvalidInput, NotFound
from wamd_server.domain.models import User
from wamd_server.web.errors import validation_details
from wamd_server.web.routing import USER

M = TypeVar("M", bound=BaseModel)

JSON_BODY_LIMIT = 1024 * 1024  # JSON routes; uploads have their own limit
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class PayloadTooLarge(DomainError):
    code = "payload_too_large"


class InvalidJson(DomainError):
    code = "invalid_json"


async def json_body(request: web.Request, model: type[M]) -> M:
    if request.content_length is not None and request.content_length > JSON_BODY_LIMIT:
        raise PayloadTooLarge(f"JSON bodies are limited to {JSON_BODY_LIMIT // 1024} KiB")
    # StreamReader.read(n) answers with what has arrived so far (up to n bytes), so read until the end.
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(JSON_BODY_LIMIT + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > JSON_BODY_LIMIT:
            raise PayloadTooLarge(f"JSON bodies are limited to {JSON_BODY_LIMIT // 1024} KiB")
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidJson("a JSON body is required")
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise InvalidJson("the body is not valid JSON") from None
        if any(err["type"] == "model_type" for err in exc.errors()) and not raw.lstrip().startswith(b"{"):
            raise InvalidInput("the body must be a JSON object") from None
        raise InvalidInput("the request is not valid", validation_details(exc)) from None
    field = _nul_field(body.model_dump())
    if field is not None:  # Postgres text cannot hold NUL; no field of ours has a use for it
        raise InvalidInput("text must not contain NUL (\\u0000) characters", {"field": field or None})
    return body


def _nul_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string containing NUL in a parsed body, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        here = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and "\x00" in key:
            return here
        found = _nul_field(item, here)
        if found is not None:
            return found
    return None


def user_of(request: web.Request) -> User:
    return request[USER]


def path_id(request: web.Request, name: str = "id", *, what: str = "device") -> UUID:
    try:
        return UUID(request.match_info[name])
    except ValueError:
        raise NotFound(f"{what} not found") from None


def parse_uuids(values: Sequence[str], field: str) -> list[UUID]:
    out = []
    for value in values:
        try:
            out.append(UUID(value))
        except ValueError:
            raise InvalidInput(f"not an id: {value!r}", {"field": field}) from None
    return out


def page_params(request: web.Request) -> tuple[int, str | None]:
    """`limit` and the decoded `cursor` (the sort key of the previous page's last item)."""
    raw_limit = request.query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw_limit)
    except ValueError:
        raise InvalidInput(f"limit must be a whole number, got {raw_limit!r}", {"field": "limit"}) from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}", {"field": "limit"})
    cursor = request.query.get("cursor")
    if not cursor:
        return limit, None
    try:
        return limit, base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:
        raise bad_cursor() from None


def bad_cursor() -> InvalidInput:
    return InvalidInput("cursor is not one this server gave out", {"field": "cursor"})


def id_cursor(raw: str | None) -> UUID | None:
    """A cursor that is an item id (lists ordered by id)."""
    if raw is None:
        return None
    try:
        return UUID(raw)
    except ValueError:
        raise bad_cursor() from None


def time_id_cursor(raw: str | None) -> tuple[datetime, UUID] | None:
    """A cursor that is `created_at|id` (lists ordered by creation): it stays valid if that item is deleted."""
    if raw is None:
        return None
    try:
        at, _, item = raw.partition("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError(at)
        return when, UUID(item)
    except ValueError:
        raise bad_cursor() from None


def page(items: Sequence[Any], limit: int, last_key: str | None) -> dict[str, Any]:
    """A list answer; `next_cursor` (the last item's sort key, opaque to clients) only when the page was full."""
    cursor = None
    if len(items) == limit and last_key is not None:
        cursor = base64.urlsafe_b64encode(last_key.encode()).decode().rstrip("=")
    return {"items": list(items), "next_cursor": cursor}
