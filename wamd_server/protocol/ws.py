"""WebSocket messages (`GET /api/ws`): first `auth`, then commands answered by `result`; events pushed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

COMMANDS = ("subscribe_events", "unsubscribe_events", "ping")


class AuthMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=512)


class Command(BaseModel):
    """Any command: `id` correlates the answer; further fields depend on `type`."""

    model_config = ConfigDict(extra="allow")
    id: int = Field(ge=0)
    type: str = Field(min_length=1, max_length=64)


class SubscribeEvents(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event_types: list[str] | None = None
    device_id: str | None = None


class UnsubscribeEvents(BaseModel):
    model_config = ConfigDict(extra="ignore")
    subscription: int


def result(msg_id: int, value: Any = None) -> dict[str, Any]:
    return {"id": msg_id, "type": "result", "success": True, "result": value}


def error(msg_id: int | None, code: str, message: str) -> dict[str, Any]:
    return {"id": msg_id, "type": "result", "success": False, "error": {"code": code, "message": message}}


def event(subscription: int, payload: dict[str, Any]) -> dict[str, Any]:
    return {"id": subscription, "type": "event", "event": payload}
