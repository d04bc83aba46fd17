"""Wire shapes of the simulator: control API bodies and answers, and link protocol requests.

Every input is validated here, so the network core only ever sees well-formed values.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

MAX_TEXT = 65_536


def normalize_phone(value: Any) -> Any:
    """Accept `+60 12-345 6789` as well as `60123456789`: WhatsApp numbers are the digits only."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        if value.isdigit():
            return value  # already digits only (every request of a client does this once per message)
        return "".join(ch for ch in value.strip() if ch not in "+ -()")
    return value


Phone = Annotated[
    str,
    BeforeValidator(normalize_phone),
    StringConstraints(pattern=r"^[1-9][0-9]{5,14}$"),
    Field(description="digits with country code, no +"),
]
Sid = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Jid = Annotated[str, StringConstraints(min_length=3, max_length=128)]
MessageId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]


def describe(exc: ValidationError) -> str:
    """One readable line out of a pydantic error: `phone: String should match pattern ...; text: ...`."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


# --- control API: requests -----------------------------------------------------------------------------


class ScanBody(_Body):
    qr: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    phone: Phone


class PairCodeBody(_Body):
    code: Annotated[str, StringConstraints(min_length=8, max_length=16)]
    phone: Phone


class ContactSendBody(_Body):
    from_phone: Phone
    to_phone: Phone
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]
    push_name: Annotated[str, StringConstraints(max_length=100)] | None = None


class UnlinkBody(_Body):
    phone: Phone
    jid: Jid | None = None


class FaultsBody(_Body):
    phone: Phone | None = None
    disconnect: bool = False
    ban_seconds: Annotated[int, Field(ge=0, le=30 * 86_400)] | None = None
    fail_rate: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    latency_ms: Annotated[int, Field(ge=0, le=600_000)] | None = None
    not_on_whatsapp: bool | None = None
    unresponsive: bool | None = None


class ReadBody(_Body):
    phone: Phone
    from_phone: Phone


# --- control API: answers ------------------------------------------------------------------------------


class JidOut(BaseModel):
    jid: str


class WaIdOut(BaseModel):
    wa_id: str


class InboxItemOut(BaseModel):
    wa_id: str
    from_phone: str
    text: str
    has_media: bool
    at: str


class InboxCountsOut(BaseModel):
    counts: dict[str, int]


class InboxOut(BaseModel):
    items: list[InboxItemOut]


class UnlinkOut(BaseModel):
    unlinked: list[str]


class OkOut(BaseModel):
    ok: bool = True


class ReadOut(BaseModel):
    read: int


class QrOut(BaseModel):
    code: str
    expires_at: str


class StatsOut(BaseModel):
    connections: dict[str, int]
    double_connections: dict[str, int]
    double_connection_total: int
    messages_sent: int
    messages_delivered: int
    redeliveries: int
    send_failures: int
    offline_queued: int
    offline_dropped: int
    reads_by_devices: int
    typing_shown: int
    online: list[str]
    linked: int
    pairing: int


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


# --- link protocol: requests ---------------------------------------------------------------------------


class _LinkRequest(BaseModel):
    # Unknown fields are ignored so an older simulator keeps working with a newer client.
    model_config = ConfigDict(extra="ignore")
    req: int | None = None
    sid: Sid


class PairQrRequest(_LinkRequest):
    op: Literal["pair_qr"]


class PairCodeRequest(_LinkRequest):
    op: Literal["pair_code"]
    phone: Phone


class ConnectRequest(_LinkRequest):
    op: Literal["connect"]
    jid: Jid
    secret: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class DisconnectRequest(_LinkRequest):
    op: Literal["disconnect"]


class LogoutRequest(_LinkRequest):
    op: Literal["logout"]
    jid: Jid
    secret: Annotated[str, StringConstraints(max_length=256)]


class MediaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mime: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    size: Annotated[int, Field(ge=0)]
    caption: Text = ""


class SendRequest(_LinkRequest):
    op: Literal["send"]
    to: Jid
    id: MessageId
    text: Text = ""
    media: MediaSpec | None = None


class ReadRequest(_LinkRequest):
    op: Literal["read"]
    chat: Jid
    ids: Annotated[list[MessageId], Field(min_length=1, max_length=1000)]


class TypingRequest(_LinkRequest):
    op: Literal["typing"]
    chat: Jid
    state: Literal["composing", "paused"]


class PingRequest(_LinkRequest):
    """Is this session still served? (the client's health probe)"""

    op: Literal["ping"]


LinkRequest = Annotated[
    PairQrRequest
    | PairCodeRequest
    | ConnectRequest
    | DisconnectRequest
    | LogoutRequest
    | SendRequest
    | ReadRequest
    | TypingRequest
    | PingRequest,
    Field(discriminator="op"),
]
LINK_REQUEST: TypeAdapter[LinkRequest] = TypeAdapter(LinkRequest)
