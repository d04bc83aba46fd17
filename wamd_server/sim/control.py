"""Control API of the simulated network: what a tester (or the demo) does on the phones' side.

`control_routes(network)` returns plain `(method, path, handler)` tuples, so the standalone `wamd-sim`
registers them as they are and the wamd web app can wrap each handler with its own admin check.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from wamd_server.sim.errors import SimError, SimInvalid
from wamd_server.sim.network import SimNetwork
from wamd_server.sim.schemas import (
    ContactSendBody,
    ErrorDetail,
    ErrorOut,
    FaultsBody,
    InboxCountsOut,
    InboxItemOut,
    InboxOut,
    JidOut,
    OkOut,
    PairCodeBody,
    QrOut,
    ReadBody,
    ReadOut,
    ScanBody,
    StatsOut,
    UnlinkBody,
    UnlinkOut,
    WaIdOut,
    describe,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]
BodyT = TypeVar("BodyT", bound=BaseModel)

PREFIX = "/api/sim"


def error_response(status: int, code: str, message: str) -> web.Response:
    body = ErrorOut(error=ErrorDetail(code=code, message=message))
    return web.json_response(body.model_dump(), status=status)


def _answer(model: BaseModel) -> web.Response:
    return web.json_response(model.model_dump())


async def read_body(request: web.Request, model: type[BodyT]) -> BodyT:
    """Parse and validate a JSON body (empty counts as `{}`); raises `SimInvalid` with a clear message."""
    raw = await request.read()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise SimInvalid("the body is not valid JSON", code="bad_json") from None
    if not isinstance(data, dict):
        raise SimInvalid("the body must be a JSON object", code="bad_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SimInvalid(describe(exc)) from None


def _guard(handler: Handler) -> Handler:
    """Turn every failure into the JSON error envelope; an unexpected one is logged, never shown."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except SimError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("sim control %s %s failed", request.method, request.path)
            return error_response(500, "internal_error", "the simulator failed to handle this request")

    return guarded


def control_routes(network: SimNetwork) -> list[Route]:
    """The control API routes bound to `network`."""

    async def scan(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, ScanBody)
        return _answer(JidOut(jid=await network.scan(body.qr, body.phone)))

    async def pair_code(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, PairCodeBody)
        return _answer(JidOut(jid=await network.pair_with_code(body.code, body.phone)))

    async def send(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, ContactSendBody)
        wa_id = await network.contact_send(body.from_phone, body.to_phone, body.text, body.push_name)
        return _answer(WaIdOut(wa_id=wa_id))

    async def inbox(request: web.Request) -> web.StreamResponse:
        items = network.inbox(request.match_info["phone"])
        return _answer(InboxOut(items=[InboxItemOut.model_validate(item) for item in items]))

    async def inbox_counts(request: web.Request) -> web.StreamResponse:
        return _answer(InboxCountsOut(counts=network.inbox_counts()))

    async def unlink(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, UnlinkBody)
        return _answer(UnlinkOut(unlinked=await network.unlink(body.phone, body.jid)))

    async def faults(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, FaultsBody)
        await network.set_faults(
            body.phone,
            disconnect=body.disconnect,
            ban_seconds=body.ban_seconds,
            fail_rate=body.fail_rate,
            latency_ms=body.latency_ms,
            not_on_whatsapp=body.not_on_whatsapp,
            unresponsive=body.unresponsive,
        )
        return _answer(OkOut())

    async def read(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, ReadBody)
        return _answer(ReadOut(read=await network.read(body.phone, body.from_phone)))

    async def reset(request: web.Request) -> web.StreamResponse:
        await network.reset()
        return _answer(OkOut())

    async def stats(request: web.Request) -> web.StreamResponse:
        return _answer(StatsOut.model_validate(network.stats()))

    async def qr(request: web.Request) -> web.StreamResponse:
        code, expires_at = network.current_qr(request.match_info["sid"])
        return _answer(QrOut(code=code, expires_at=expires_at.isoformat()))

    routes: list[Route] = [
        ("POST", f"{PREFIX}/scan", scan),
        ("POST", f"{PREFIX}/pair-code", pair_code),
        ("POST", f"{PREFIX}/send", send),
        ("GET", f"{PREFIX}/inbox/{{phone}}", inbox),
        ("GET", f"{PREFIX}/inbox-counts", inbox_counts),
        ("POST", f"{PREFIX}/unlink", unlink),
        ("POST", f"{PREFIX}/faults", faults),
        ("POST", f"{PREFIX}/read", read),
        ("POST", f"{PREFIX}/reset", reset),
        ("GET", f"{PREFIX}/stats", stats),
        ("GET", f"{PREFIX}/qr/{{sid}}", qr),
    ]
    return [(method, path, _guard(handler)) for method, path, handler in routes]
