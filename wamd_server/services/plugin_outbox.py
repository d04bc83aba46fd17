"""Messages a plugin sends (an auto-reply, an integration): through the outbox like every other message, so
pacing, caps, quiet hours, opt-outs and exactly-once sending apply to them too.

A plugin gets this as the ``ctx`` of ``wamd_message_received`` (see `plugin_api/hookspecs.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from wamd_server.domain.errors import InvalidInput
from wamd_server.domain.models import SourceKind
from wamd_server.domain.ports import BusEvent, Clock, EventBus
from wamd_server.protocol.events import OUTBOX_QUEUED
from wamd_server.services.send_first import SendFirstBounds, due_first

MAX_TEXT = 4096
MAX_KEY = 200
PHONE = re.compile(r"\+?[0-9]{6,15}")  # international digits, as in a JID (what `message.sender_phone` holds)


class OutboxInserts(SendFirstBounds, Protocol):
    async def enqueue(self, messages: Sequence[Any], now: datetime) -> int: ...


class PluginOutbox:
    def __init__(self, outbox: OutboxInserts, new_message: Callable[..., Any], bus: EventBus, clock: Clock) -> None:
        self._outbox = outbox
        self._new_message = new_message
        self._bus = bus
        self._clock = clock

    async def send(
        self,
        device_id: UUID,
        to_phone: str,
        text: str,
        key: str,
        *,
        at: datetime | None = None,
        paced: bool = True,
        user_id: UUID | None = None,
    ) -> bool:
        """Queue `text` for `to_phone` (digits, or +E.164) from the device, once per `key`: a key already used
        adds nothing (a redelivered event, a retried hook), and False is returned. `at`: not before then
        (timezone-aware; default now). `paced` False sends without the device's gap and, without `at`, before
        the device's waiting messages (as a reply typed by hand); caps and quiet hours still apply. `user_id`:
        the user the message is sent for (reports), if any."""
        if not isinstance(to_phone, str) or not PHONE.fullmatch(to_phone.strip()):
            raise InvalidInput(f"not a phone number: {to_phone!r}", {"field": "to_phone"})
        phone = to_phone.strip().lstrip("+")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            raise InvalidInput(f"a plugin's message needs 1 to {MAX_TEXT} characters", {"field": "text"})
        if not isinstance(key, str) or not key or len(key) > MAX_KEY:
            raise InvalidInput(f"a plugin's message key needs 1 to {MAX_KEY} characters", {"field": "key"})
        if at is not None and at.tzinfo is None:
            raise InvalidInput("at must carry a time zone", {"field": "at"})
        now = self._clock.now()
        if at is None:  # unpaced: a reply, before the device's waiting messages (as one typed by hand)
            at = now if paced else await due_first(self._outbox, device_id, now)
        message = self._new_message(
            device_id=device_id,
            recipient=phone,
            text=text,
            source_kind=SourceKind.PLUGIN,
            source_key=f"plugin:{key}",
            scheduled_at=at,
            user_id=user_id,
            min_delay_s=None if paced else 0.0,
            max_delay_s=None if paced else 0.0,
        )
        added = await self._outbox.enqueue([message], now)
        if added:
            await self._bus.publish(BusEvent(OUTBOX_QUEUED, {"device_ids": [str(device_id)]}))
        return bool(added)
