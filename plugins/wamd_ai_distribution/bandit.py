"""Thompson sampling over devices: which online device should message a lead without an owner device.

Each device is an arm with two Beta posteriors built from its recent record (no I/O here: the plugin passes the
counts in):

- delivery: ``Beta(1 + sent, 1 + failed)``, the chance a message it sends goes out;
- reply: ``Beta(1 + replied, 1 + sent - replied)``, the chance a lead it messages writes back.

``Beta(1, 1)`` is the uniform prior: a device without history is as likely to be good as bad, so its draws
spread widely and it wins some leads (exploration); a device with a long record draws close to its rates.

For every lead, one draw per device gives ``score = delivery * (1 + w * reply) / (1 + w)`` (``w`` is the reply
weight: what a reply is worth next to a delivery; the score stays in 0..1). The lead goes to the device with the
highest score among those still under their limit, so over many leads each device gets about the share of
leads on which it is the best device given what is known. The same random generator (seeded by the caller)
gives the same allocation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

PRIOR = (1.0, 1.0)  # Beta(1, 1): uniform, where a device without history starts


@dataclass(frozen=True)
class History:
    """A device's recent record: messages sent and failed, and leads who replied after its message."""

    sent: int = 0
    failed: int = 0
    replied: int = 0

    @property
    def delivery(self) -> tuple[float, float]:
        """Beta parameters of the delivery rate."""
        return PRIOR[0] + self.sent, PRIOR[1] + self.failed

    @property
    def reply(self) -> tuple[float, float]:
        """Beta parameters of the reply rate (per message sent)."""
        replied = min(self.replied, self.sent)
        return PRIOR[0] + replied, PRIOR[1] + self.sent - replied

    @property
    def empty(self) -> bool:
        return self.sent == 0 and self.failed == 0


def beta_mean(params: tuple[float, float]) -> float:
    a, b = params
    return a / (a + b)


def combine(delivery: float, reply: float, reply_weight: float) -> float:
    """One score in 0..1 from a delivery and a reply rate."""
    return delivery * (1.0 + reply_weight * reply) / (1.0 + reply_weight)


def expected_score(history: History, reply_weight: float) -> float:
    """The score from the posterior means (the two rates are independent, so this is the mean score)."""
    return combine(beta_mean(history.delivery), beta_mean(history.reply), reply_weight)


@dataclass(frozen=True)
class Arm:
    device_id: UUID
    history: History
    capacity: int | None = None  # leads it may still take; None: no limit


@dataclass
class ArmOutcome:
    """What happened to one device over an allocation."""

    draws: int = 0  # Thompson draws made for it (one per lead)
    draw_sum: float = 0.0
    top: int = 0  # leads on which its draw was the highest of all devices
    assigned: int = 0
    turned_away: int = 0  # leads on which it drew highest but had reached its limit

    @property
    def sampled_mean(self) -> float | None:
        return self.draw_sum / self.draws if self.draws else None


@dataclass
class Allocation:
    assignment: dict[UUID, UUID] = field(default_factory=dict)  # lead -> device
    outcomes: dict[UUID, ArmOutcome] = field(default_factory=dict)  # device -> outcome
    unassigned: list[UUID] = field(default_factory=list)  # leads no device could take (every one at its limit)


def draw(history: History, rng: random.Random, reply_weight: float) -> float:
    return combine(rng.betavariate(*history.delivery), rng.betavariate(*history.reply), reply_weight)


def allocate(leads: Sequence[UUID], arms: Sequence[Arm], rng: random.Random, reply_weight: float = 1.0) -> Allocation:
    """Give each lead a device by Thompson sampling, never more than an arm's capacity."""
    result = Allocation(outcomes={arm.device_id: ArmOutcome() for arm in arms})
    left = {arm.device_id: arm.capacity for arm in arms}

    def has_room(device_id: UUID) -> bool:
        room = left[device_id]
        return room is None or room > 0

    for index, lead in enumerate(leads):
        if not any(has_room(arm.device_id) for arm in arms):
            result.unassigned.extend(leads[index:])  # every device is at its limit: no need to draw for the rest
            break
        scored = []
        for arm in arms:
            score = draw(arm.history, rng, reply_weight)
            outcome = result.outcomes[arm.device_id]
            outcome.draws += 1
            outcome.draw_sum += score
            scored.append((score, arm.device_id))
        best = max(scored)
        chosen = max(s for s in scored if has_room(s[1]))
        result.outcomes[best[1]].top += 1
        if chosen != best:
            result.outcomes[best[1]].turned_away += 1
        device_id = chosen[1]
        result.assignment[lead] = device_id
        result.outcomes[device_id].assigned += 1
        room = left[device_id]
        if room is not None:
            left[device_id] = room - 1
    return result
