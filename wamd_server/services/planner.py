"""The campaign planner (one leader at a time): launches due campaigns into the outbox and follows them.

Launching asks the campaign's type (a plugin) to plan it through a `PlanContext`; every message is inserted with
the source key `campaign:<campaign>:<lead>`, so launching again after a crash adds only what is missing. While a
campaign runs, the planner publishes its progress (counted from the outbox) and completes it when nothing is left.

Leads without an owner device that no device could take at the launch (every device of the campaign banned,
logged out or paused) are not dropped: the campaign counts them (`leads_waiting`, with a reason shown) and stays
running; the planner plans it again, for the leads that existed at its start, once a device can take them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from wamd_server.domain.models import Campaign, CampaignStatus, Device, DeviceStatus, Lead, SourceKind
from wamd_server.domain.ports import BusEvent, Clock, EventBus
from wamd_server.plugin_api.manager import PluginHost
from wamd_server.plugin_api.types import CampaignTypeSpec
from wamd_server.protocol import events as ev

log = logging.getLogger(__name__)

LEAD_PAGE = 1000
# Devices that may take a lead without an owner: linked and not in trouble.
DISTRIBUTABLE = frozenset({DeviceStatus.ONLINE, DeviceStatus.CONNECTING, DeviceStatus.OFFLINE})
# A device that cannot send for this long hands its queued messages to leads without an owner to others.
STRANDED_AFTER = timedelta(minutes=5)
# How often a running campaign looks for stranded messages: soon enough next to five minutes, and it reads every
# device of the campaign (thousands, each planner round of a large broadcast before).
RESCUE_EVERY = timedelta(seconds=30)
MOVE_BATCH = 1000
# Following running campaigns counts all their rows (reading each: no index holds `status`, see `tables.outbox`). A
# count that takes longer than FOLLOW_FREE_S (a campaign of hundreds of thousands of rows, a busy database) is
# repeated only once the planner has spent 1 / FOLLOW_BUDGET times as long since: at most that share of its time
# goes to counting (a 200,000-row broadcast is counted every few seconds), small campaigns every round.
FOLLOW_FREE_S = 0.05
FOLLOW_BUDGET = 0.02


def _unable_since(device: Device, now: datetime) -> timedelta:
    """How long the device has been unable to send: not online (since it was last seen), or online with its queue
    paused (since the pause); zero when it can send."""
    if device.status is not DeviceStatus.ONLINE:
        since = device.last_seen_at
    elif device.queue_paused_reason:
        since = device.queue_paused_at
    else:
        return timedelta(0)
    return now - since if since is not None else timedelta.max


@dataclass(frozen=True)
class Planned:
    lead: Lead
    device_id: UUID
    text: str
    greeting: str | None = None  # where `text` holds its greeting, put in again at the send


class CampaignStore(Protocol):
    async def get(self, campaign_id: UUID, owner: UUID | None) -> Campaign | None: ...

    async def with_status(
        self, statuses: Sequence[CampaignStatus], due_by: datetime | None = None
    ) -> list[Campaign]: ...

    async def transition(
        self, campaign_id: UUID, from_statuses: Sequence[CampaignStatus], now: datetime, **values: Any
    ) -> bool: ...

    async def target_leads(
        self, campaign: Campaign, limit: int, after: UUID | None, created_by: datetime | None = None
    ) -> list[Lead]: ...

    async def stranded_rows(
        self, campaign_id: UUID, stuck_devices: Sequence[UUID], limit: int
    ) -> list[tuple[UUID, Lead]]: ...

    async def move_rows(self, moves: dict[UUID, UUID], now: datetime) -> int: ...


class OutboxWriter(Protocol):
    async def enqueue(self, messages: Sequence[Any], now: datetime) -> int: ...

    async def cancel_source(self, source_id: UUID, reason: str, now: datetime) -> int: ...

    async def tally_many(self, source_ids: Sequence[UUID]) -> dict[UUID, Any]: ...

    async def device_history(self, device_ids: Sequence[UUID], since: datetime) -> dict[UUID, dict[str, int]]: ...

    async def distribution_report(self, campaign_id: UUID, plugin: str) -> dict[str, Any] | None: ...

    async def save_distribution_report(
        self, campaign_id: UUID, plugin: str, report: dict[str, Any], now: datetime
    ) -> None: ...


class DistributionReports(Protocol):
    """Where lead distribution plugins' reports are read back (their web routes get it as
    `ApiContext.distribution_reports`); they are written through `PlanContext.save_distribution_report`."""

    async def distribution_report(self, campaign_id: UUID, plugin: str) -> dict[str, Any] | None: ...


# template, lead, at, rng, language -> text, where the text holds its greeting (`templating.render_with_greeting`)
Render = Callable[[str, Lead, datetime, random.Random, str], tuple[str, str | None]]
DevicesOf = Callable[[Campaign], Awaitable[list[Device]]]
NewMessageFactory = Callable[..., Any]


class PlanContext:
    """What a campaign type's `plan` may use."""

    def __init__(
        self, planner: CampaignPlanner, campaign: Campaign, rescue: bool = False, leads_by: datetime | None = None
    ) -> None:
        self._planner = planner
        self.campaign = campaign
        self.rescue = rescue  # distributing messages moved off a device that cannot send (see `rescue`)
        self.queued_devices: set[UUID] = set()
        self.waiting = 0  # leads given to `distribute` while no device could take them
        self._leads_by = leads_by  # planning again: only the leads that existed at the campaign's start

    async def leads(self, after: UUID | None, limit: int = LEAD_PAGE) -> list[Lead]:
        """The next page of target leads (matching niche, target status and devices; never opted out)."""
        return await self._planner.campaigns.target_leads(self.campaign, limit, after, self._leads_by)

    async def devices(self) -> list[Device]:
        """Devices the campaign may send from: its `device_ids`, else every device its owner may use."""
        return await self._planner.devices_of(self.campaign)

    async def distribute(self, leads: list[Lead], devices: list[Device]) -> dict[UUID, UUID]:
        """Give leads without an owner device a sender: a `wamd_distribute_leads` plugin decides, else round
        robin over the devices that can take them (never banned, logged out or paused)."""
        usable = [d for d in devices if d.status in DISTRIBUTABLE and not d.queue_paused_reason]
        if not leads:
            return {}
        if not usable:
            if not self.rescue:
                self.waiting += len(leads)  # the planner plans the campaign again when a device can take them
            return {}
        decided = await self._planner.plugins.call_first(
            "wamd_distribute_leads", campaign=self.campaign, leads=leads, devices=usable, ctx=self
        )
        if isinstance(decided, dict):
            allowed = {d.id for d in usable}
            return {lead: device for lead, device in decided.items() if device in allowed}
        return {lead.id: usable[(i + self._planner.rr_offset) % len(usable)].id for i, lead in enumerate(leads)}

    async def device_history(self, days: float, device_ids: Sequence[UUID] | None = None) -> dict[UUID, dict[str, int]]:
        """Each device's record over the last `days` days (default: every device of the campaign):
        `{device_id: {"sent": n, "failed": n, "replied": n}}`, from the outbox and the stored messages
        (`replied`: recipients who wrote to the device after its message)."""
        ids = list(device_ids) if device_ids is not None else [d.id for d in await self.devices()]
        since = self._planner.clock.now() - timedelta(days=days)
        return await self._planner.outbox.device_history(ids, since)

    async def distribution_report(self, plugin: str) -> dict[str, Any] | None:
        """The report `plugin` saved for this campaign with `save_distribution_report` (None: none yet)."""
        return await self._planner.outbox.distribution_report(self.campaign.id, plugin)

    async def save_distribution_report(self, plugin: str, report: dict[str, Any]) -> None:
        """Store (replace) `plugin`'s JSON report on how it distributed this campaign's leads; it lasts as long
        as the campaign."""
        await self._planner.outbox.save_distribution_report(self.campaign.id, plugin, report, self._planner.clock.now())

    def planned(self, lead: Lead, device_id: UUID) -> Planned:
        return Planned(lead, device_id, *self._rendered(lead))

    def render(self, lead: Lead) -> str:
        return self._rendered(lead)[0]

    def _rendered(self, lead: Lead) -> tuple[str, str | None]:
        c = self.campaign
        rng = random.Random(f"{c.id}:{lead.id}")  # the same lead always gets the same rendering
        return self._planner.render(c.message, lead, c.scheduled_at, rng, str(c.options.get("language", "ms")))

    async def enqueue(self, planned: Sequence[Planned]) -> int:
        c = self.campaign
        messages = [
            self._planner.new_message(
                device_id=p.device_id,
                recipient=p.lead.phone,
                text=p.text,
                source_kind=SourceKind.CAMPAIGN,
                source_key=f"campaign:{c.id}:{p.lead.id}",
                scheduled_at=c.scheduled_at,
                user_id=c.user_id,
                lead_id=p.lead.id,
                media_id=c.image_media_id,
                source_id=c.id,
                min_delay_s=c.min_delay_s,
                max_delay_s=c.max_delay_s,
                greeting=p.greeting,
            )
            for p in planned
        ]
        self.queued_devices.update(p.device_id for p in planned)
        return await self._planner.outbox.enqueue(messages, self._planner.clock.now())


class CampaignPlanner:
    def __init__(
        self,
        *,
        campaigns: CampaignStore,
        outbox: OutboxWriter,
        devices_of: DevicesOf,
        plugins: PluginHost,
        bus: EventBus,
        clock: Clock,
        render: Render,
        new_message: NewMessageFactory,
        types: Callable[[], Awaitable[dict[str, CampaignTypeSpec]]],
    ) -> None:
        self.campaigns = campaigns
        self.outbox = outbox
        self.devices_of = devices_of
        self.plugins = plugins
        self.bus = bus
        self.clock = clock
        self.render = render
        self.new_message = new_message
        self.types = types
        self.rr_offset = 0
        self._last_progress: dict[UUID, tuple[int, int, int, int]] = {}
        self._follow_after = 0.0  # monotonic time before which `follow` does not count again
        self._rescued_at: dict[UUID, datetime] = {}  # last look for stranded messages, per running campaign

    async def tick(self) -> None:
        now = self.clock.now()
        for campaign in await self.campaigns.with_status([CampaignStatus.SCHEDULED], due_by=now):
            try:
                await self.launch(campaign)
            except Exception:
                log.exception("campaign %s: launch failed; trying again next round", campaign.id)
        await self.follow()

    async def launch(self, campaign: Campaign) -> int:
        spec = (await self.types()).get(campaign.type)
        if spec is None or spec.plan is None:
            await self.campaigns.transition(
                campaign.id,
                [CampaignStatus.SCHEDULED],
                self.clock.now(),
                status=CampaignStatus.CANCELLED,
                status_reason=f"no plugin provides the campaign type {campaign.type!r}",
            )
            return 0
        ctx = PlanContext(self, campaign)
        queued = await spec.plan(campaign, ctx)
        self.rr_offset += 1
        started = await self.campaigns.transition(
            campaign.id,
            [CampaignStatus.SCHEDULED],
            self.clock.now(),
            status=CampaignStatus.RUNNING,
            started_at=self.clock.now(),
            **_waiting_values(ctx.waiting),
        )
        if not started:
            await self._settle_if_ended(campaign.id)
        await self._queued(ctx)
        log.info("campaign %s: %d messages queued%s", campaign.id, queued, "" if started else " (state changed)")
        if ctx.waiting:
            log.warning("campaign %s: %d leads wait for a device that can send", campaign.id, ctx.waiting)
        return int(queued)

    async def place_waiting(self, campaign: Campaign) -> int:
        """Plan a running campaign again for its leads that waited for a device (see the module's docstring),
        once one of its devices can take leads; messages already queued are not added twice (source keys).
        Returns how many leads still wait."""
        devices = await self.devices_of(campaign)
        if not any(d.status in DISTRIBUTABLE and not d.queue_paused_reason for d in devices):
            return campaign.leads_waiting
        spec = (await self.types()).get(campaign.type)
        if spec is None or spec.plan is None:
            return campaign.leads_waiting
        ctx = PlanContext(self, campaign, leads_by=campaign.started_at)
        queued = await spec.plan(campaign, ctx)
        self.rr_offset += 1
        if not await self.campaigns.transition(
            campaign.id, [CampaignStatus.RUNNING], self.clock.now(), **_waiting_values(ctx.waiting)
        ):
            await self._settle_if_ended(campaign.id)
        await self._queued(ctx)
        log.info("campaign %s: %d messages queued for leads that waited for a device", campaign.id, queued)
        return ctx.waiting

    async def _settle_if_ended(self, campaign_id: UUID) -> None:
        """The campaign was cancelled or deleted while it was being planned: what the planning queued after the
        cancel's own clean-up is cancelled too (else it stayed queued, or went out for a deleted campaign)."""
        campaign = await self.campaigns.get(campaign_id, None)
        if campaign is None or campaign.status is CampaignStatus.CANCELLED:
            reason = "campaign deleted" if campaign is None else "campaign cancelled"
            await self.outbox.cancel_source(campaign_id, reason, self.clock.now())

    async def _queued(self, ctx: PlanContext) -> None:
        if ctx.queued_devices:
            await self.bus.publish(
                BusEvent(ev.OUTBOX_QUEUED, {"device_ids": sorted(str(d) for d in ctx.queued_devices)})
            )

    async def rescue(self, campaign: Campaign) -> int:
        """Lead distribution at send time: messages to leads without an owner device, waiting on a device that
        has been unable to send for a while (banned, logged out, offline, queue paused), move to devices of the
        campaign that can, as the campaign's lead distribution chooses (a plugin's per-device limits hold; a lead
        it leaves out stays where it is, to be tried again). Leads with an owner device keep waiting for it
        (their conversation lives there)."""
        devices = await self.devices_of(campaign)
        now = self.clock.now()
        stuck = [d.id for d in devices if _unable_since(d, now) > STRANDED_AFTER]
        usable = [d for d in devices if d.status is DeviceStatus.ONLINE and not d.queue_paused_reason]
        if not stuck or not usable:
            return 0
        rows = await self.campaigns.stranded_rows(campaign.id, stuck, MOVE_BATCH)
        chosen = await PlanContext(self, campaign, rescue=True).distribute([lead for _, lead in rows], usable)
        moved = await self.campaigns.move_rows({row: chosen[lead.id] for row, lead in rows if lead.id in chosen}, now)
        if moved:
            log.info("campaign %s: %d messages moved off devices that cannot send", campaign.id, moved)
            targets = sorted({str(chosen[lead.id]) for _, lead in rows if lead.id in chosen})
            await self.bus.publish(BusEvent(ev.OUTBOX_QUEUED, {"device_ids": targets}))
        return moved

    async def follow(self) -> None:
        if time.monotonic() < self._follow_after:
            return
        running = await self.campaigns.with_status([CampaignStatus.RUNNING, CampaignStatus.PAUSED])
        started = time.monotonic()
        tallies = await self.outbox.tally_many([c.id for c in running])
        took = time.monotonic() - started
        self._follow_after = started + took / FOLLOW_BUDGET if took > FOLLOW_FREE_S else 0.0
        now = self.clock.now()
        self._rescued_at = {c.id: self._rescued_at[c.id] for c in running if c.id in self._rescued_at}
        for campaign in running:
            waiting = campaign.leads_waiting  # as read before this round (placing them changes the tally)
            if campaign.status is CampaignStatus.RUNNING and (tallies[campaign.id].remaining_send or waiting):
                last = self._rescued_at.get(campaign.id)
                if last is None or now - last >= RESCUE_EVERY:
                    self._rescued_at[campaign.id] = now
                    await self.rescue(campaign)
                    if waiting:
                        try:
                            await self.place_waiting(campaign)
                        except Exception:  # a plugin's or the database's: the other campaigns are followed
                            log.exception("campaign %s: placing the leads that wait failed", campaign.id)
            tally = tallies[campaign.id]
            numbers = (tally.should_send, tally.done_send, tally.failed_send, tally.remaining_send)
            # (Leads placed just now are counted by the next round, which completes the campaign when all is sent.)
            finished = campaign.status is CampaignStatus.RUNNING and tally.remaining_send == 0 and not waiting
            if finished:
                await self.campaigns.transition(
                    campaign.id,
                    [CampaignStatus.RUNNING],
                    self.clock.now(),
                    status=CampaignStatus.COMPLETED,
                    finished_at=self.clock.now(),
                )
            if self._last_progress.get(campaign.id) != numbers or finished:
                self._last_progress[campaign.id] = numbers
                await self.publish_progress(campaign, tally, "completed" if finished else campaign.status.value)

    async def publish_progress(self, campaign: Campaign, tally: Any, status: str) -> None:
        payload = ev.CampaignProgressEvent(
            campaign_id=str(campaign.id),
            status=status,
            should_send=tally.should_send,
            done_send=tally.done_send,
            failed_send=tally.failed_send,
            remaining_send=tally.remaining_send,
        )
        await self.bus.publish(
            BusEvent(ev.CAMPAIGN_PROGRESS, payload.model_dump(mode="json"), user_id=campaign.user_id)
        )


def _waiting_values(waiting: int) -> dict[str, Any]:
    reason = f"{waiting} leads without an owner device wait for a device that can send" if waiting else None
    return {"leads_waiting": waiting, "status_reason": reason}


class PlannerLoop:
    """Runs the planner every `interval_s` while this process holds the leader lock."""

    def __init__(self, planner: CampaignPlanner, is_leader: Callable[[], Awaitable[bool]], interval_s: float) -> None:
        self.planner = planner
        self._is_leader = is_leader
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="campaign-planner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                if await self._is_leader():
                    await self.planner.tick()
            except Exception:
                log.exception("planner round failed")
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self._interval_s)
