"""Bus events on the wire (Redis): JSON with ids and times as strings."""

from __future__ import annotations

import json
from datetime import datetime
from uuid import UUID

from wamd_server.domain.ports import BusEvent


def encode(event: BusEvent) -> str:
    return json.dumps(
        {
            "type": event.type,
            "data": event.data,
            "device_id": str(event.device_id) if event.device_id else None,
            "user_id": str(event.user_id) if event.user_id else None,
            "at": event.at.isoformat() if event.at else None,
        },
        separators=(",", ":"),
        default=str,
    )


def decode(raw: str | bytes) -> BusEvent:
    obj = json.loads(raw)
    return BusEvent(
        type=obj["type"],
        data=obj["data"],
        device_id=UUID(obj["device_id"]) if obj.get("device_id") else None,
        user_id=UUID(obj["user_id"]) if obj.get("user_id") else None,
        at=datetime.fromisoformat(obj["at"]) if obj.get("at") else None,
    )
