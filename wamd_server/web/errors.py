"""JSON error envelopes and the middleware that turns every failure into one."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from wamd_server.domain import errors

log = logging.getLogger(__name__)

STATUS_BY_CODE = {
    "invalid_input": 400,
    "invalid_json": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "device_busy": 409,
    "qr_required": 409,
    "not_connected": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "not_on_whatsapp": 422,
    "rate_limited": 429,
    "transport_error": 502,
    "unavailable": 503,
}

HTTP_CODES = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, details: Any = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return web.json_response({"error": body}, status=status)


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or None, "problem": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


def domain_response(exc: errors.DomainError) -> web.Response:
    status = STATUS_BY_CODE.get(exc.code, 400)
    response = error_response(status, exc.code, exc.message, exc.details)
    if isinstance(exc, errors.RateLimited):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.DomainError as exc:
        return domain_response(exc)
    except ValidationError as exc:
        return error_response(400, "invalid_input", "the request is not valid", validation_details(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "error")
        message = exc.reason if exc.status != 413 else "the request body is too large"
        response = error_response(exc.status, code, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ConnectionError:
        # The client went away mid-request: nobody is left to answer, and it is not a server fault.
        log.info("client disconnected during %s %s", request.method, request.path)
        return error_response(400, "client_disconnected", "the client disconnected")
    except Exception:
        ref = secrets.token_hex(4)
        log.exception("unhandled error on %s %s (ref %s)", request.method, request.path, ref)
        return error_response(500, "internal_error", f"internal error; the server log has details (ref {ref})")
