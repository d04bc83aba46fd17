"""Opt-out: a lead who answers with a stop word (STOP, BERHENTI, …) is never messaged again.

Built in as a plugin on the `wamd_message_received` hook, like any other reaction to incoming messages.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Protocol
from uuid import UUID

from wamd_server.domain.models import Device, InboundMessage
from wamd_server.domain.ports import BusEvent, Clock, EventBus
from wamd_server.plugin_api import hookimpl
from wamd_server.protocol.events import OPTED_OUT

log = logging.getLogger(__name__)

DEFAULT_WORDS = ("STOP", "BERHENTI", "UNSUBSCRIBE", "STOP ALL", "BERHENTI LANGGAN")


class OptOutLeads(Protocol):
    async def opt_out_phone(self, phone: str, at: datetime) -> list[UUID]: ...


class OptOutOutbox(Protocol):
    async def cancel_for_recipient(self, recipient: str, reason: str, now: datetime) -> int: ...


def normalise(text: str) -> str:
    """Case, surrounding punctuation and repeated spaces do not matter: 'stop!!' and ' Stop ' are STOP."""
    return re.sub(r"\s+", " ", re.sub(r"^[\W_]+|[\W_]+$", "", text.strip())).upper()


class OptOutPlugin:
    def __init__(
        self, leads: OptOutLeads, outbox: OptOutOutbox, bus: EventBus, clock: Clock, words: Iterable[str]
    ) -> None:
        self._leads = leads
        self._outbox = outbox
        self._bus = bus
        self._clock = clock
        self.words = frozenset(normalise(w) for w in words if normalise(w))

    def is_stop(self, text: str) -> bool:
        return normalise(text) in self.words

    @hookimpl
    async def wamd_message_received(self, device: Device, message: InboundMessage) -> None:
        if message.from_me or message.is_group or not message.sender_phone or not self.is_stop(message.text):
            return
        now = self._clock.now()
        leads = await self._leads.opt_out_phone(message.sender_phone, now)
        cancelled = await self._outbox.cancel_for_recipient(message.sender_phone, "the recipient opted out", now)
        # Every worker's dispatcher stops sending to this phone now, not at its next reload.
        await self._bus.publish(BusEvent(OPTED_OUT, {"phone": message.sender_phone}))
        log.info("+%s opted out (%d leads, %d queued messages cancelled)", message.sender_phone, len(leads), cancelled)
