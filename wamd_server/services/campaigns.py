"""Campaign use cases for API callers: create and edit, start/pause/resume/cancel, retry failed, reports.

Every number in a report comes from the outbox, the one place where a message's fate is recorded, so the
summary, the per-device report and the recipient list always agree.
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from wamd_server.domain.errors import Conflict, InvalidInput, NotFound
from wamd_server.domain.models import Campaign, CampaignStatus, OutboxStatus, User
from wamd_server.domain.ports import BusEvent, Clock, DeviceRepository, EventBus
from wamd_server.plugin_api.types import CampaignTypeSpec
from wamd_server.protocol.events import OUTBOX_QUEUED
from wamd_server.services.devices import scope_of

EDITABLE = frozenset({CampaignStatus.DRAFT, CampaignStatus.SCHEDULED, CampaignStatus.PAUSED})
TARGETS = ("prospect", "customer", "all")
SUMMARY_PAGE = 1000  # campaigns counted per query of the summary


@dataclass
class CampaignDraft:
    type: str
    title: str
    message: str
    scheduled_at: datetime
    image_media_id: UUID | None = None
    niche: str | None = None
    target_status: str = "all"
    device_ids: list[UUID] = field(default_factory=list)
    min_delay_s: float | None = None
    max_delay_s: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    draft: bool = False


class CampaignRepo(Protocol):
    async def add(self, campaign: Campaign, now: datetime) -> Campaign: ...

    async def get(self, campaign_id: UUID, owner: UUID | None) -> Campaign | None: ...

    async def list_page(
        self,
        owner: UUID | None,
        limit: int,
        after: tuple[datetime, UUID] | None,
        *,
        scheduled_from: datetime | None = None,
        scheduled_to: datetime | None = None,
        status: str | None = None,
    ) -> list[Campaign]: ...

    async def update(self, campaign_id: UUID, now: datetime, **values: Any) -> Campaign | None: ...

    async def transition(
        self, campaign_id: UUID, from_statuses: Sequence[CampaignStatus], now: datetime, **values: Any
    ) -> bool: ...

    async def delete(self, campaign_id: UUID) -> bool: ...

    async def count_by_status(
        self, owner: UUID | None, start: datetime | None, end: datetime | None
    ) -> dict[str, int]: ...


class OutboxReports(Protocol):
    async def tally(self, source_id: UUID) -> Any: ...

    async def tally_many(self, source_ids: Sequence[UUID]) -> dict[UUID, Any]: ...

    async def tally_by_device(self, source_id: UUID) -> list[tuple[UUID, str, str | None, Any]]: ...

    async def recipients(
        self,
        source_id: UUID,
        *,
        status: OutboxStatus | None,
        device_id: UUID | None,
        limit: int,
        after: tuple[datetime, UUID] | None,
    ) -> list[dict[str, Any]]: ...

    async def cancel_source(self, source_id: UUID, reason: str, now: datetime) -> int: ...

    async def devices_sending(self, source_id: UUID) -> list[UUID]: ...

    async def retry_failed(self, source_id: UUID, device_id: UUID | None, now: datetime) -> int: ...


MediaVisible = Callable[[User, UUID], Awaitable[bool]]


class CampaignService:
    def __init__(
        self,
        campaigns: CampaignRepo,
        outbox: OutboxReports,
        devices: DeviceRepository,
        bus: EventBus,
        clock: Clock,
        *,
        types: Callable[[], Awaitable[dict[str, CampaignTypeSpec]]],
        validate_template: Callable[[str], list[str]],
        media_visible: MediaVisible,
        wake_planner: Callable[[], None] = lambda: None,
    ) -> None:
        self._campaigns = campaigns
        self._outbox = outbox
        self._devices = devices
        self._bus = bus
        self._clock = clock
        self._types = types
        self._validate_template = validate_template
        self._media_visible = media_visible
        self._wake_planner = wake_planner

    async def types(self) -> list[CampaignTypeSpec]:
        return sorted((await self._types()).values(), key=lambda t: t.name)

    async def get(self, user: User, campaign_id: UUID) -> Campaign:
        campaign = await self._campaigns.get(campaign_id, None if user.is_admin else user.id)
        if campaign is None:
            raise NotFound("campaign not found")
        return campaign

    async def list_page(
        self, user: User, limit: int, after: tuple[datetime, UUID] | None, **filters: Any
    ) -> list[Campaign]:
        return await self._campaigns.list_page(None if user.is_admin else user.id, limit, after, **filters)

    async def create(self, user: User, draft: CampaignDraft) -> Campaign:
        await self._check(user, draft)
        status = CampaignStatus.DRAFT if draft.draft else CampaignStatus.SCHEDULED
        campaign = Campaign(
            id=UUID(int=0),
            user_id=user.id,
            type=draft.type,
            title=draft.title.strip(),
            message=draft.message,
            scheduled_at=draft.scheduled_at,
            status=status,
            image_media_id=draft.image_media_id,
            niche=(draft.niche or "").strip() or None,
            target_status=draft.target_status,
            device_ids=list(dict.fromkeys(draft.device_ids)),
            min_delay_s=draft.min_delay_s,
            max_delay_s=draft.max_delay_s,
            options=draft.options,
        )
        created = await self._campaigns.add(campaign, self._clock.now())
        self._wake_planner()
        return created

    async def update(self, user: User, campaign_id: UUID, changes: dict[str, Any]) -> Campaign:
        campaign = await self.get(user, campaign_id)
        if campaign.status not in EDITABLE:
            raise Conflict(f"a {campaign.status.value} campaign cannot be edited")
        merged = CampaignDraft(
            type=campaign.type,
            title=changes.get("title", campaign.title),
            message=changes.get("message", campaign.message),
            scheduled_at=changes.get("scheduled_at", campaign.scheduled_at),
            image_media_id=changes.get("image_media_id", campaign.image_media_id),
            niche=changes.get("niche", campaign.niche),
            target_status=changes.get("target_status", campaign.target_status),
            device_ids=changes.get("device_ids", campaign.device_ids),
            min_delay_s=changes.get("min_delay_s", campaign.min_delay_s),
            max_delay_s=changes.get("max_delay_s", campaign.max_delay_s),
            options=changes.get("options", campaign.options),
        )
        await self._check(user, merged)
        if campaign.started_at is not None and set(changes) & {"message", "niche", "target_status", "device_ids"}:
            raise Conflict("message and targeting cannot change once the campaign has started")
        values = {key: getattr(merged, key) for key in changes}
        if "niche" in values:
            values["niche"] = (values["niche"] or "").strip() or None
        updated = await self._campaigns.update(campaign_id, self._clock.now(), **values)
        assert updated is not None
        self._wake_planner()
        return updated

    async def delete(self, user: User, campaign_id: UUID) -> None:
        campaign = await self.get(user, campaign_id)
        if campaign.status is CampaignStatus.RUNNING:
            raise Conflict("cancel the campaign before deleting it")
        await self._outbox.cancel_source(campaign_id, "campaign deleted", self._clock.now())
        await self._campaigns.delete(campaign_id)

    async def start(self, user: User, campaign_id: UUID) -> Campaign:
        """Launch now (a draft, or a scheduled campaign ahead of its time)."""
        campaign = await self.get(user, campaign_id)
        now = self._clock.now()
        ok = await self._campaigns.transition(
            campaign_id,
            [CampaignStatus.DRAFT, CampaignStatus.SCHEDULED],
            now,
            status=CampaignStatus.SCHEDULED,
            scheduled_at=min(campaign.scheduled_at, now),
        )
        if not ok:
            raise Conflict(f"a {campaign.status.value} campaign cannot be started")
        self._wake_planner()
        return await self.get(user, campaign_id)

    async def pause(self, user: User, campaign_id: UUID) -> Campaign:
        paused = await self._move(
            user, campaign_id, [CampaignStatus.SCHEDULED, CampaignStatus.RUNNING], CampaignStatus.PAUSED, "paused"
        )
        await self._wake_sending(campaign_id)
        return paused

    async def resume(self, user: User, campaign_id: UUID) -> Campaign:
        campaign = await self.get(user, campaign_id)
        target = CampaignStatus.RUNNING if campaign.started_at else CampaignStatus.SCHEDULED
        resumed = await self._move(user, campaign_id, [CampaignStatus.PAUSED], target, "resumed")
        await self._announce_queued()
        return resumed

    async def cancel(self, user: User, campaign_id: UUID) -> Campaign:
        campaign = await self._move(
            user,
            campaign_id,
            [CampaignStatus.DRAFT, CampaignStatus.SCHEDULED, CampaignStatus.RUNNING, CampaignStatus.PAUSED],
            CampaignStatus.CANCELLED,
            "cancelled",
        )
        await self._outbox.cancel_source(campaign_id, "campaign cancelled", self._clock.now())
        await self._wake_sending(campaign_id)
        return campaign

    async def retry_failed(self, user: User, campaign_id: UUID, device_id: UUID | None) -> int:
        campaign = await self.get(user, campaign_id)
        if campaign.status in (CampaignStatus.CANCELLED, CampaignStatus.DRAFT):
            raise Conflict(f"a {campaign.status.value} campaign has nothing to retry")
        count = await self._outbox.retry_failed(campaign_id, device_id, self._clock.now())
        if count and campaign.status is CampaignStatus.COMPLETED:
            await self._campaigns.transition(
                campaign_id,
                [CampaignStatus.COMPLETED],
                self._clock.now(),
                status=CampaignStatus.RUNNING,
                finished_at=None,
            )
        await self._announce_queued()
        return count

    async def report(self, user: User, campaign_id: UUID) -> dict[str, Any]:
        campaign = await self.get(user, campaign_id)
        tally = await self._outbox.tally(campaign_id)
        devices = await self._outbox.tally_by_device(campaign_id)
        return {
            "campaign_id": str(campaign.id),
            "status": campaign.status.value,
            **numbers(tally),
            "devices": [
                {"device_id": str(device_id), "name": name, "jid": jid, **numbers(t)}
                for device_id, name, jid, t in devices
            ],
        }

    async def recipients(
        self,
        user: User,
        campaign_id: UUID,
        *,
        status: OutboxStatus | None,
        device_id: UUID | None,
        limit: int,
        after: tuple[datetime, UUID] | None,
    ) -> list[dict[str, Any]]:
        await self.get(user, campaign_id)
        return await self._outbox.recipients(campaign_id, status=status, device_id=device_id, limit=limit, after=after)

    async def summary(self, user: User, start: datetime | None, end: datetime | None) -> dict[str, Any]:
        owner = None if user.is_admin else user.id
        counts = await self._campaigns.count_by_status(owner, start, end)
        totals = {"total_should_send": 0, "total_done_send": 0, "total_failed_send": 0, "total_remaining_send": 0}
        recent: list[Campaign] = []  # the ten scheduled last
        tallies: dict[UUID, Any] = {}
        after: tuple[datetime, UUID] | None = None
        # Every campaign in the range, a page at a time, counted as its report counts it.
        while page := await self._campaigns.list_page(
            owner, SUMMARY_PAGE, after, scheduled_from=start, scheduled_to=end
        ):
            page_tallies = await self._outbox.tally_many([c.id for c in page])
            for tally in page_tallies.values():
                totals["total_should_send"] += tally.should_send
                totals["total_done_send"] += tally.done_send
                totals["total_failed_send"] += tally.failed_send
                totals["total_remaining_send"] += tally.remaining_send
            recent = heapq.nlargest(10, [*recent, *page], key=lambda c: c.scheduled_at)
            tallies = {c.id: page_tallies[c.id] if c.id in page_tallies else tallies[c.id] for c in recent}
            if len(page) < SUMMARY_PAGE:
                break
            last = page[-1]
            assert last.created_at is not None
            after = (last.created_at, last.id)
        return {
            "campaigns": {"total": sum(counts.values()), **{s.value: counts.get(s.value, 0) for s in CampaignStatus}},
            "broadcast_stats": totals,
            "recent_campaigns": [
                {
                    "id": str(c.id),
                    "title": c.title,
                    "status": c.status.value,
                    "scheduled_at": c.scheduled_at.isoformat(),
                    **numbers(tallies[c.id]),
                }
                for c in recent
            ],
        }

    async def _move(
        self, user: User, campaign_id: UUID, sources: list[CampaignStatus], target: CampaignStatus, verb: str
    ) -> Campaign:
        campaign = await self.get(user, campaign_id)
        if not await self._campaigns.transition(campaign_id, sources, self._clock.now(), status=target):
            raise Conflict(f"a {campaign.status.value} campaign cannot be {verb}")
        self._wake_planner()
        return await self.get(user, campaign_id)

    async def _wake_sending(self, campaign_id: UUID) -> None:
        """Devices with a message of the campaign waiting out its gap (up to an hour) look at the campaign now."""
        devices = await self._outbox.devices_sending(campaign_id)
        if devices:
            await self._bus.publish(BusEvent(OUTBOX_QUEUED, {"device_ids": [str(d) for d in devices]}))

    async def _announce_queued(self) -> None:
        await self._bus.publish(BusEvent(OUTBOX_QUEUED, {"device_ids": []}))

    async def _check(self, user: User, draft: CampaignDraft) -> None:
        if draft.type not in await self._types():
            raise InvalidInput(f"unknown campaign type {draft.type!r}", {"field": "type"})
        if not draft.title.strip():
            raise InvalidInput("title must not be empty", {"field": "title"})
        if not draft.message.strip() and draft.image_media_id is None:
            raise InvalidInput("a campaign needs a message or an image", {"field": "message"})
        problems = self._validate_template(draft.message)
        if problems:
            raise InvalidInput(f"the message template has problems: {'; '.join(problems)}", {"field": "message"})
        if draft.target_status not in TARGETS:
            raise InvalidInput("target_status must be prospect, customer or all", {"field": "target_status"})
        if draft.scheduled_at.tzinfo is None:
            raise InvalidInput("scheduled_at needs a time zone", {"field": "scheduled_at"})
        low, high = draft.min_delay_s, draft.max_delay_s
        if (low is None) != (high is None):
            raise InvalidInput("give both min_delay_s and max_delay_s, or neither", {"field": "min_delay_s"})
        if low is not None and high is not None and low > high:
            raise InvalidInput("min_delay_s must not exceed max_delay_s", {"field": "min_delay_s"})
        scope = scope_of(user)
        for device_id in draft.device_ids:
            if await self._devices.get(device_id, scope) is None:
                raise InvalidInput("unknown device", {"field": "device_ids", "device_id": str(device_id)})
        if draft.image_media_id is not None and not await self._media_visible(user, draft.image_media_id):
            raise InvalidInput("unknown image", {"field": "image_media_id"})


def numbers(tally: Any) -> dict[str, int]:
    return {
        "should_send": tally.should_send,
        "done_send": tally.done_send,
        "failed_send": tally.failed_send,
        "remaining_send": tally.remaining_send,
    }
