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
from wamd_server.protocol.events import OPTED_IN, OPTED_OUT

log = logging.getLogger(__name__)

DEFAULT_WORDS = ("STOP", "BERHENTI", "UNSUBSCRIBE", "STOP ALL", "BERHENTI LANGGAN")


class OptOutLeads(Protocol):
    async def opt_out_phone(self, phone: str, at: datetime) -> list[UUID]: ...


class OptOutOutbox(Protocol):
    async def cancel_for_recipient(self, recipient: str, reason: str, now: datetime) -> int: ...

    async def is_opted_out(self, phone: str) -> bool: ...


def normalise(text: str) -> str:
    """Case, surrounding punctuation and repeated spaces do not matter: 'stop!!' and ' Stop ' are STOP."""
    return re.sub(r"\s+", " ", re.sub(r"^[\W_]+|[\W_]+$", "", text.strip())).upper()


OPTED_OUT_REASON = "the recipient opted out"


class OptOutActions:
    """What follows an opt-out however it was made (a stop word, or a lead marked by hand): the phone's waiting
    messages are cancelled and every worker's dispatcher stops sending to it at once, not at its next reload; and
    what follows taking one back (the dispatchers send to the phone again, unless another lead with the phone,
    of another user, is still opted out: the dispatchers keep opt-outs per phone)."""

    def __init__(self, outbox: OptOutOutbox, bus: EventBus) -> None:
        self._outbox = outbox
        self._bus = bus

    async def opted_out(self, phone: str, now: datetime) -> int:
        cancelled = await self._outbox.cancel_for_recipient(phone, OPTED_OUT_REASON, now)
        await self._bus.publish(BusEvent(OPTED_OUT, {"phone": phone}))
        return cancelled

    async def opted_back_in(self, phone: str) -> None:
        if not await self._outbox.is_opted_out(phone):
            await self._bus.publish(BusEvent(OPTED_IN, {"phone": phone}))


class OptOutPlugin:
    def __init__(self, leads: OptOutLeads, actions: OptOutActions, clock: Clock, words: Iterable[str]) -> None:
        self._leads = leads
        self._actions = actions
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
        if not leads:
            # Not a lead, or one that had opted out already: a contact in a chat who is no lead may write "stop"
            # and still be answered by hand.
            return
        cancelled = await self._actions.opted_out(message.sender_phone, now)
        log.info("+%s opted out (%d leads, %d queued messages cancelled)", message.sender_phone, len(leads), cancelled)
