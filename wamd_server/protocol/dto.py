"""REST request and response bodies (the wire contract shared with the desktop)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from wamd_server.protocol.events import DeviceStatusName

T = TypeVar("T")

Role = Literal["admin", "staff"]


class Request(BaseModel):
    """Request bodies: unknown fields and wrong types are errors, not silently coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    db: Literal["ok", "error"]
    bus: Literal["local", "redis", "error"]
    version: str
    transport: str


class LoginRequest(Request):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class UserOut(BaseModel):
    id: str
    email: str
    name: str
    role: Role
    is_active: bool
    created_at: datetime
    last_login_at: datetime | None = None


class LoginResponse(BaseModel):
    token: str
    user: UserOut


class MeOut(UserOut):
    device_ids: list[str] | None = None  # staff: the devices granted; admins see all (null)


class UserCreate(Request):
    email: str = Field(min_length=3, max_length=320)
    password: str = Field(min_length=8, max_length=1024)
    role: Role = "staff"
    name: str = Field(default="", max_length=200)


class UserPatch(Request):
    name: str | None = Field(default=None, max_length=200)
    role: Role | None = None
    is_active: bool | None = None
    password: str | None = Field(default=None, min_length=8, max_length=1024)


class GrantsIn(Request):
    device_ids: list[str] = Field(max_length=10_000)


class GrantsOut(BaseModel):
    device_ids: list[str]


class DeviceOut(BaseModel):
    id: str
    name: str
    phone: str | None
    jid: str | None
    status: DeviceStatusName
    status_reason: str | None
    last_seen_at: datetime | None
    min_delay_s: float
    max_delay_s: float
    hourly_cap: int
    daily_cap: int
    created_at: datetime


class DeviceCreate(Request):
    name: str = Field(min_length=1, max_length=100)


class DevicePatchIn(Request):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    min_delay_s: float | None = Field(default=None, ge=0, le=3600)
    max_delay_s: float | None = Field(default=None, ge=0, le=3600)
    hourly_cap: int | None = Field(default=None, ge=1, le=10_000)
    daily_cap: int | None = Field(default=None, ge=1, le=100_000)


class PairRequest(Request):
    method: Literal["qr", "code"]
    phone: str | None = Field(default=None, min_length=5, max_length=32)


class PairOut(BaseModel):
    status: DeviceStatusName
    pair_code: str | None = None


class QrOut(BaseModel):
    code: str
    expires_at: datetime


class RefreshOut(BaseModel):
    status: Literal["online", "connecting", "offline", "banned", "qr_required"]


class Ok(BaseModel):
    ok: bool = True
