"""What the simulated network remembers: accounts, their linked devices, inboxes, faults and counters.

Plain slotted records: a benchmark keeps thousands of them alive, so they stay small and lazy.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from wamd_server.domain.ids import USER_SERVER

if TYPE_CHECKING:
    from wamd_server.sim.link import Session

Frame = dict[str, Any]


def device_jid(phone: str, n: int) -> str:
    return f"{phone}:{n}@{USER_SERVER}"


class InboxItem(NamedTuple):
    """One message a phone received, keyed by its id as a phone keys messages. A tuple of plain values: the garbage
    collector stops tracking it after one look (a benchmark keeps hundreds of thousands)."""

    wa_id: str
    from_phone: str
    text: str
    has_media: bool
    at: datetime
    read: bool = False

    def public(self) -> dict[str, Any]:
        return {
            "wa_id": self.wa_id,
            "from_phone": self.from_phone,
            "text": self.text,
            "has_media": self.has_media,
            "at": self.at.isoformat(),
        }


@dataclass(slots=True, eq=False)
class LinkedDevice:
    """A companion device linked to an account; `secret` is what it proves itself with on connect."""

    phone: str
    n: int
    secret: str
    jid: str = ""
    session: Session | None = None
    # Events for when the device is offline; created on first need (most devices never need one).
    pending: deque[Frame] | None = None

    def __post_init__(self) -> None:
        self.jid = device_jid(self.phone, self.n)


@dataclass(slots=True, eq=False)
class Account:
    phone: str
    devices: dict[int, LinkedDevice] = field(default_factory=dict)
    next_n: int = 1  # device numbers are never reused, so stale credentials never match a newer device
    banned_until: float = 0.0  # time.monotonic() deadline; 0 = not banned
    ban_code: str = "send_to_too_many_people"

    def ban_remaining_s(self) -> float:
        return max(0.0, self.banned_until - time.monotonic()) if self.banned_until else 0.0


@dataclass(slots=True)
class PhoneFaults:
    """Faults of one phone; None means "as the global faults say"."""

    fail_rate: float | None = None
    latency_ms: int | None = None
    not_on_whatsapp: bool | None = None
    unresponsive: bool | None = None  # the phone's sessions stop answering requests (a hung connection)


@dataclass(slots=True)
class GlobalFaults:
    fail_rate: float = 0.0
    latency_ms: int = 0
    not_on_whatsapp: bool = False
    unresponsive: bool = False


@dataclass(slots=True)
class SimStats:
    connections: dict[str, int] = field(default_factory=dict)
    double_connections: dict[str, int] = field(default_factory=dict)
    double_connection_total: int = 0
    messages_sent: int = 0  # sends from linked devices the server acked
    messages_delivered: int = 0  # distinct messages that reached a phone's inbox
    redeliveries: int = 0  # the same message id again to the same phone
    send_failures: int = 0  # sends refused by an injected fault (fail_rate)
    offline_queued: int = 0  # events kept for an offline linked device
    offline_dropped: int = 0  # events lost because a device's offline queue was full
    reads_by_devices: int = 0  # message ids linked devices marked as read
    typing_shown: int = 0  # "typing…" indicators linked devices showed in a chat (composing)
