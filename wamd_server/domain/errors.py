"""Domain errors. Each carries a stable code; the web layer maps codes to HTTP statuses."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error a caller may see. `code` is stable and part of the wire contract."""

    code = "error"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(DomainError):
    code = "invalid_input"


class NotFound(DomainError):
    code = "not_found"


class Unauthorized(DomainError):
    code = "unauthorized"


class Forbidden(DomainError):
    code = "forbidden"


class Conflict(DomainError):
    code = "conflict"


class RateLimited(DomainError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, {"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


class DeviceBusy(Conflict):
    """The device is in a state that does not allow the requested action (e.g. pairing an online device)."""

    code = "device_busy"


class TransportError(DomainError):
    """The WhatsApp link failed an operation. `retryable` tells a sender whether to try again."""

    code = "transport_error"

    def __init__(self, message: str, *, retryable: bool = True, details: Any = None) -> None:
        super().__init__(message, details)
        self.retryable = retryable


class NotConnected(TransportError):
    code = "not_connected"


class SessionMissing(TransportError):
    """No stored WhatsApp session for the device: it must be paired again (QR or phone code)."""

    code = "qr_required"

    def __init__(self, message: str = "no stored session; pair the device again") -> None:
        super().__init__(message, retryable=False)


class RecipientNotOnWhatsApp(TransportError):
    code = "not_on_whatsapp"

    def __init__(self, message: str = "the recipient is not on WhatsApp") -> None:
        super().__init__(message, retryable=False)


class Unavailable(DomainError):
    """A dependency (worker, transport, network) cannot serve the request right now."""

    code = "unavailable"
