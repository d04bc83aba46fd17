"""AI lead distribution (`wamd_distribute_leads`): a bandit that learns from deliveries and replies.

A campaign opts in through its options (any campaign type that distributes leads, such as ``broadcast``)::

    {"distribution": "ai",          # required: without it the default round robin applies
     "per_device_limit": 200,       # optional: most leads without an owner one device gets in this campaign
                                    #   (default: each device's own daily_cap)
     "history_days": 14,            # optional: days of delivery and reply record to weigh (default 14, <= 365)
     "reply_weight": 1.0}           # optional: what a reply is worth next to a delivery (default 1; 0: ignore)

Leads go only to devices that are online with a running send queue (the planner already leaves out banned,
logged-out and paused devices; the states are read again here). Each device's record over ``history_days``
(messages sent and failed, and leads who replied on that device after its message) gives Beta posteriors, and
every lead goes to the device with the highest Thompson draw among those under their limit (see `bandit.py`).
A device without history starts from the uniform prior, so it still gets some leads (exploration). Draws are
seeded by the campaign id and the page's first lead: the same inputs give the same allocation. When no device
is online the plugin steps aside (returns None) and the default round robin spreads the leads.

The report (``GET /api/plugins/ai-distribution/campaigns/{id}/report``, stored with the campaign) explains each
device's share::

    {"plugin": "ai_distribution", "campaign_id": "…", "strategy": "thompson_sampling",
     "summary": "24 leads without an owner device: 24 assigned over 3 online devices …",
     "settings": {"per_device_limit": 12, "limit_source": "option", "history_days": 14, "reply_weight": 1.0,
                  "prior": [1.0, 1.0], "notes": []},
     "leads": {"total": 24, "assigned": 24, "unassigned": 0, "round_robin": 0, "moved": 0},
     "devices": [{"device_id": "…", "name": "Sender 0", "status": "online", "eligible": true,
                  "skipped_reason": null, "history": {"sent": 6, "failed": 0, "replied": 3},
                  "posterior": {"delivery": [7.0, 1.0], "reply": [4.0, 4.0]}, "delivery_rate": 0.875,
                  "reply_rate": 0.5, "expected_score": 0.6562, "sampled_mean": 0.66, "top_draws": 17,
                  "assigned": 12, "limit": 12, "limit_reached": true, "turned_away": 5,
                  "explanation": "last 14 days: 6 sent, 0 failed, 3 replied → …"},
                 {"device_id": "…", "name": "Sender 3", "status": "online", "eligible": false,
                  "skipped_reason": "send queue paused (paused by a user)", "assigned": 0,
                  "explanation": "skipped: send queue paused (paused by a user)"}],
     "pages": {"<first lead id>": {"leads": 24, "unassigned": 0, "devices": {"<device id>": {…}}}}}

``top_draws`` counts the leads on which the device drew highest, ``turned_away`` those among them it could not
take because it had reached its limit, ``unassigned`` the leads no device could take (every one at its limit);
they stay without a message in this campaign. Pages (the planner hands leads over 1000 at a time) count
against the same limits; a page planned again after a restart replaces its own record. Messages the planner
moves at send time off a device that cannot send (`ctx.rescue`) are distributed the same way, within the same
limits (a lead no device can take stays where it is); they are counted as ``leads.moved``, not as new leads.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from wamd_ai_distribution.bandit import PRIOR, Allocation, Arm, History, allocate, beta_mean, expected_score
from wamd_ai_distribution.routes import report_route
from wamd_server.domain.models import Campaign, Device, DeviceStatus, Lead
from wamd_server.plugin_api import hookimpl
from wamd_server.plugin_api.types import WebRoute

PLUGIN = "ai_distribution"
MOVED_PAGE = "moved:"  # key prefix of the pages of messages moved at send time (`ctx.rescue`)
DEFAULT_HISTORY_DAYS = 14.0
DEFAULT_REPLY_WEIGHT = 1.0
MAX_HISTORY_DAYS = 365.0
OUTCOME_FIELDS = ("draws", "draw_sum", "top", "assigned", "turned_away")


class DistributionContext(Protocol):
    """What this plugin uses of the planner's `PlanContext` (see the `wamd_distribute_leads` hookspec)."""

    rescue: bool

    async def devices(self) -> list[Device]: ...

    async def device_history(
        self, days: float, device_ids: Sequence[UUID] | None = None
    ) -> dict[UUID, dict[str, int]]: ...

    async def distribution_report(self, plugin: str) -> dict[str, Any] | None: ...

    async def save_distribution_report(self, plugin: str, report: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Settings:
    per_device_limit: int | None = None  # None: each device's daily cap
    history_days: float = DEFAULT_HISTORY_DAYS
    reply_weight: float = DEFAULT_REPLY_WEIGHT
    notes: tuple[str, ...] = ()  # options that were ignored, and why


def opted_in(options: Mapping[str, object]) -> bool:
    return options.get("distribution") == "ai"


def _number(
    options: Mapping[str, object], name: str, notes: list[str], *, whole: bool, zero_ok: bool, most: float = math.inf
) -> float | None:
    value = options.get(name)
    if value is None:
        return None
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if zero_ok else value > 0)
        and value <= most
        and (not whole or float(value).is_integer())
    ):
        return float(value)
    kind = "a whole number" if whole else "a number"
    bounds = (">= 0" if zero_ok else "> 0") + (f" and <= {most:g}" if math.isfinite(most) else "")
    notes.append(f"ignored {name}={value!r}: expected {kind} {bounds}")
    return None


def settings_from(options: Mapping[str, object]) -> Settings:
    """The campaign's distribution options; a bad value falls back to the default, with a note in the report."""
    notes: list[str] = []
    limit = _number(options, "per_device_limit", notes, whole=True, zero_ok=False)
    days = _number(options, "history_days", notes, whole=False, zero_ok=False, most=MAX_HISTORY_DAYS)
    weight = _number(options, "reply_weight", notes, whole=False, zero_ok=True)
    return Settings(
        per_device_limit=int(limit) if limit is not None else None,
        history_days=days if days is not None else DEFAULT_HISTORY_DAYS,
        reply_weight=weight if weight is not None else DEFAULT_REPLY_WEIGHT,
        notes=tuple(notes),
    )


def skip_reason(device: Device) -> str | None:
    """Why a device takes no leads now (None: it may)."""
    detail = f" ({device.status_reason})" if device.status_reason else ""
    if device.status is DeviceStatus.BANNED:
        return "banned" + detail
    if device.status is DeviceStatus.LOGGED_OUT:
        return "logged out" + detail
    if device.queue_paused_reason:
        return f"send queue paused ({device.queue_paused_reason})"
    if device.status in (DeviceStatus.UNPAIRED, DeviceStatus.PAIRING):
        return "not linked to a phone"
    if device.status is not DeviceStatus.ONLINE:
        return f"not online ({device.status.value})"
    return None


def _history(counts: Mapping[str, int] | None) -> History:
    counts = counts or {}
    return History(sent=counts.get("sent", 0), failed=counts.get("failed", 0), replied=counts.get("replied", 0))


def _days(days: float) -> str:
    return f"{days:g} day" + ("" if days == 1 else "s")


def _pct(rate: float) -> str:
    return f"{rate:.0%}"


def _totals(pages: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per device (id string): the outcome fields summed over every page."""
    totals: dict[str, dict[str, float]] = {}
    for page in pages.values():
        for device_id, outcome in (page.get("devices") or {}).items():
            total = totals.setdefault(device_id, dict.fromkeys(OUTCOME_FIELDS, 0.0))
            for name in OUTCOME_FIELDS:
                total[name] += float(outcome.get(name, 0))
    return totals


def page_record(leads: int, allocation: Allocation | None) -> dict[str, Any]:
    if allocation is None:  # no device online: the default round robin took this page
        return {"leads": leads, "unassigned": 0, "round_robin": leads, "devices": {}}
    return {
        "leads": leads,
        "unassigned": len(allocation.unassigned),
        "round_robin": 0,
        "devices": {
            str(device_id): {
                "draws": o.draws,
                "draw_sum": round(o.draw_sum, 6),
                "top": o.top,
                "assigned": o.assigned,
                "turned_away": o.turned_away,
            }
            for device_id, o in allocation.outcomes.items()
        },
    }


def explain_eligible(history: History, settings: Settings, total: Mapping[str, float], limit: int) -> str:
    days = _days(settings.history_days)
    if history.empty:
        record = f"no sends in the last {days}: uninformative prior Beta({PRIOR[0]:g}, {PRIOR[1]:g}), so it is explored"
    else:
        record = (
            f"last {days}: {history.sent} sent, {history.failed} failed, {history.replied} replied → "
            f"delivery ≈ {_pct(beta_mean(history.delivery))}, reply ≈ {_pct(beta_mean(history.reply))}"
        )
    draws, top, assigned = int(total["draws"]), int(total["top"]), int(total["assigned"])
    turned_away = int(total["turned_away"])
    parts = [record, f"expected score {expected_score(history, settings.reply_weight):.2f}"]
    if draws:
        parts.append(f"mean Thompson draw {total['draw_sum'] / draws:.2f}")
        parts.append(f"highest draw for {top} of {draws} leads")
    share = f"got {assigned}" + (f": its limit of {limit} is reached" if assigned >= limit else f" (limit {limit})")
    if turned_away:
        share += f"; {turned_away} leads it drew highest for went to other devices as it was full"
    overflow = assigned - (top - turned_away)  # leads whose best device was full
    if overflow > 0:
        share += f"; {overflow} of its leads came to it as the best device still under its limit"
    parts.append(share)
    return "; ".join(parts)


def build_report(
    campaign: Campaign,
    settings: Settings,
    devices: Sequence[Device],
    reasons: Mapping[UUID, str | None],
    history: Mapping[UUID, History],
    limits: Mapping[UUID, int],
    pages: dict[str, Any],
) -> dict[str, Any]:
    totals = _totals(pages)
    zero = dict.fromkeys(OUTCOME_FIELDS, 0.0)
    entries: list[dict[str, Any]] = []
    for device in devices:
        total = totals.get(str(device.id), zero)
        assigned = int(total["assigned"])
        entry: dict[str, Any] = {
            "device_id": str(device.id),
            "name": device.name,
            "status": device.status.value,
            "eligible": reasons[device.id] is None,
            "skipped_reason": reasons[device.id],
            "assigned": assigned,
        }
        if reasons[device.id] is not None:
            earlier = f"; got {assigned} leads earlier in this campaign while it could send" if assigned else ""
            entry["explanation"] = f"skipped: {reasons[device.id]}{earlier}"
            entries.append(entry)
            continue
        h, limit = history[device.id], limits[device.id]
        draws = int(total["draws"])
        entry.update(
            history={"sent": h.sent, "failed": h.failed, "replied": h.replied},
            posterior={"delivery": list(h.delivery), "reply": list(h.reply)},
            delivery_rate=round(beta_mean(h.delivery), 4),
            reply_rate=round(beta_mean(h.reply), 4),
            expected_score=round(expected_score(h, settings.reply_weight), 4),
            sampled_mean=round(total["draw_sum"] / draws, 4) if draws else None,
            top_draws=int(total["top"]),
            limit=limit,
            limit_reached=assigned >= limit,
            turned_away=int(total["turned_away"]),
            explanation=explain_eligible(h, settings, total, limit),
        )
        entries.append(entry)
    entries.sort(key=lambda e: (not e["eligible"], -e["assigned"], e["name"], e["device_id"]))

    planned = [p for key, p in pages.items() if not key.startswith(MOVED_PAGE)]
    leads = sum(int(p["leads"]) for p in planned)
    unassigned = sum(int(p["unassigned"]) for p in planned)
    round_robin = sum(int(p.get("round_robin", 0)) for p in planned)
    assigned = leads - unassigned - round_robin
    moved = sum(
        int(p["leads"]) - int(p["unassigned"]) - int(p.get("round_robin", 0))
        for key, p in pages.items()
        if key.startswith(MOVED_PAGE)
    )
    online = sum(1 for e in entries if e["eligible"])
    summary = (
        f"{leads} leads without an owner device: {assigned} assigned over {online} online devices by Thompson "
        f"sampling on their delivery and reply record of the last {_days(settings.history_days)}"
    )
    if unassigned:
        summary += f"; {unassigned} left without a device (every device reached its limit)"
    if round_robin:
        summary += f"; {round_robin} left to the default round robin (no device was online)"
    if moved:
        summary += f"; {moved} moved at send time off devices that could not send, within the same limits"
    skipped = len(entries) - online
    if skipped:
        summary += f"; {skipped} devices skipped"
    return {
        "plugin": PLUGIN,
        "campaign_id": str(campaign.id),
        "strategy": "thompson_sampling",
        "summary": summary,
        "settings": {
            "per_device_limit": settings.per_device_limit,
            "limit_source": "option" if settings.per_device_limit is not None else "daily_cap",
            "history_days": settings.history_days,
            "reply_weight": settings.reply_weight,
            "prior": list(PRIOR),
            "notes": list(settings.notes),
        },
        "leads": {
            "total": leads,
            "assigned": assigned,
            "unassigned": unassigned,
            "round_robin": round_robin,
            "moved": moved,
        },
        "devices": entries,
        "pages": pages,
    }


@hookimpl
async def wamd_distribute_leads(
    campaign: Campaign, leads: list[Lead], devices: list[Device], ctx: DistributionContext
) -> dict[UUID, UUID] | None:
    if not opted_in(campaign.options) or not leads:
        return None
    settings = settings_from(campaign.options)
    offered = {d.id for d in devices}
    # The campaign's devices as they are now (the planner's list dates from the start of the launch); those it
    # did not offer are in the report with the reason.
    current = {d.id: d for d in await ctx.devices()}
    everyone = [current.get(d.id, d) for d in devices] + [d for d in current.values() if d.id not in offered]
    not_offered = "it could not send when " + ("these messages were moved" if ctx.rescue else "this launch began")
    reasons = {d.id: skip_reason(d) or (None if d.id in offered else not_offered) for d in everyone}
    eligible = [d for d in everyone if reasons[d.id] is None]

    previous = await ctx.distribution_report(PLUGIN) or {}
    pages = dict(previous.get("pages") or {})
    if ctx.rescue:
        # Messages moved at send time off a device that cannot send: their leads were counted once already
        # (against the device they leave), so their pages count against the limits but not as leads of the
        # campaign, and each move keeps a page of its own (a lead may be moved twice).
        page = f"{MOVED_PAGE}{sum(key.startswith(MOVED_PAGE) for key in pages)}:{leads[0].id}"
    else:
        page = str(leads[0].id)
        pages.pop(page, None)  # planned again after a restart: this page's earlier record goes
    limits = {d.id: settings.per_device_limit or d.daily_cap for d in eligible}
    used = _totals(pages)
    room = {d.id: max(limits[d.id] - int(used.get(str(d.id), {}).get("assigned", 0)), 0) for d in eligible}
    if ctx.rescue and not any(room.values()):
        return {}  # nothing read or written: the planner asks again every half minute while devices are full
    if not eligible:
        pages[page] = page_record(len(leads), None)
        report = build_report(campaign, settings, everyone, reasons, {}, {}, pages)
        await ctx.save_distribution_report(PLUGIN, report)
        return None

    counts = await ctx.device_history(settings.history_days, [d.id for d in eligible])
    history = {d.id: _history(counts.get(d.id)) for d in eligible}
    arms = [Arm(d.id, history[d.id], room[d.id]) for d in eligible]
    rng = random.Random(f"{campaign.id}:{page}")
    # Thousands of draws per page: off the event loop.
    allocation = await asyncio.to_thread(allocate, [lead.id for lead in leads], arms, rng, settings.reply_weight)
    pages[page] = page_record(len(leads), allocation)
    report = build_report(campaign, settings, everyone, reasons, history, limits, pages)
    await ctx.save_distribution_report(PLUGIN, report)
    return allocation.assignment


@hookimpl
def wamd_web_routes() -> list[WebRoute]:
    return [report_route(PLUGIN)]
