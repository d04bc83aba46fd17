"""Campaigns: types, CRUD, start/pause/resume/cancel/retry-failed, reports."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from aiohttp import web

from wamd_server.domain.errors import InvalidInput
from wamd_server.domain.models import Campaign, OutboxStatus
from wamd_server.protocol import dto
from wamd_server.services.campaigns import CampaignDraft
from wamd_server.web.context import CTX
from wamd_server.web.inputs import json_body, page, page_params, parse_uuids, path_id, time_id_cursor, user_of
from wamd_server.web.routing import QueryParam, RouteTable

routes = RouteTable()

PAGING = (QueryParam("limit", "page size, 1..1000 (default 100)", "integer"), QueryParam("cursor", "next_cursor"))
RANGE = (
    QueryParam("from", "scheduled at or after (ISO 8601; a date alone is local midnight)"),
    QueryParam("to", "scheduled before (ISO 8601; a date alone is local midnight)"),
)


def campaign_out(c: Campaign) -> dict[str, Any]:
    return dto.CampaignOut(
        id=str(c.id),
        type=c.type,
        title=c.title,
        message=c.message,
        image_media_id=str(c.image_media_id) if c.image_media_id else None,
        niche=c.niche,
        target_status=c.target_status,
        device_ids=[str(d) for d in c.device_ids],
        scheduled_at=c.scheduled_at,
        min_delay_s=c.min_delay_s,
        max_delay_s=c.max_delay_s,
        status=c.status.value,
        status_reason=c.status_reason,
        options=c.options,
        created_at=c.created_at,
        started_at=c.started_at,
        finished_at=c.finished_at,
        leads_waiting=c.leads_waiting,
    ).model_dump(mode="json")


def local(request: web.Request, value: datetime | None) -> datetime | None:
    """A time without an offset is local time in the configured zone."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=request.app[CTX].config.timezone)


def query_time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        return local(request, datetime.fromisoformat(raw))
    except ValueError:
        raise InvalidInput(f"{name} must be an ISO 8601 date or time, got {raw!r}", {"field": name}) from None


def optional_id(value: str | None, field: str) -> UUID | None:
    return parse_uuids([value], field)[0] if value else None


@routes.get(
    "/api/campaign-types",
    summary="Campaign types offered by the plugins",
    tag="campaigns",
    response=dto.Page[dto.CampaignTypeOut],
)
async def campaign_types(request: web.Request) -> web.Response:
    types = await request.app[CTX].campaigns.types()
    items = [
        dto.CampaignTypeOut(
            name=t.name, title=t.title, description=t.description, options_schema=t.options_schema
        ).model_dump()
        for t in types
    ]
    return web.json_response({"items": items, "next_cursor": None})


@routes.get(
    "/api/campaigns/summary",
    summary="Campaign counts and send totals, by scheduled time",
    tag="campaigns",
    response=dto.CampaignSummary,
    query=RANGE,
)
async def campaigns_summary(request: web.Request) -> web.Response:
    summary = await request.app[CTX].campaigns.summary(
        user_of(request), query_time(request, "from"), query_time(request, "to")
    )
    return web.json_response(dto.CampaignSummary.model_validate(summary).model_dump(mode="json"))


@routes.get(
    "/api/campaigns",
    summary="Campaigns",
    tag="campaigns",
    response=dto.Page[dto.CampaignOut],
    query=(*PAGING, *RANGE, QueryParam("status", "only campaigns in this status")),
)
async def list_campaigns(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    found = await request.app[CTX].campaigns.list_page(
        user_of(request),
        limit,
        time_id_cursor(cursor),
        scheduled_from=query_time(request, "from"),
        scheduled_to=query_time(request, "to"),
        status=request.query.get("status") or None,
    )
    last = f"{found[-1].created_at.isoformat()}|{found[-1].id}" if found and found[-1].created_at else None
    return web.json_response(page([campaign_out(c) for c in found], limit, last))


@routes.post(
    "/api/campaigns",
    summary="Create a campaign (scheduled unless draft)",
    tag="campaigns",
    body=dto.CampaignCreate,
    response=dto.CampaignOut,
    status=201,
)
async def create_campaign(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await json_body(request, dto.CampaignCreate)
    draft = CampaignDraft(
        type=body.type,
        title=body.title,
        message=body.message,
        scheduled_at=local(request, body.scheduled_at) or ctx.clock.now(),
        image_media_id=optional_id(body.image_media_id, "image_media_id"),
        niche=body.niche,
        target_status=body.target_status,
        device_ids=parse_uuids(body.device_ids, "device_ids"),
        min_delay_s=body.min_delay_s,
        max_delay_s=body.max_delay_s,
        options=body.options,
        draft=body.draft,
    )
    campaign = await ctx.campaigns.create(user_of(request), draft)
    return web.json_response(campaign_out(campaign), status=201)


@routes.get("/api/campaigns/{id}", summary="One campaign", tag="campaigns", response=dto.CampaignOut)
async def get_campaign(request: web.Request) -> web.Response:
    campaign = await request.app[CTX].campaigns.get(user_of(request), path_id(request, what="campaign"))
    return web.json_response(campaign_out(campaign))


@routes.patch(
    "/api/campaigns/{id}",
    summary="Edit a draft, scheduled or paused campaign",
    tag="campaigns",
    body=dto.CampaignPatch,
    response=dto.CampaignOut,
)
async def patch_campaign(request: web.Request) -> web.Response:
    campaign_id = path_id(request, what="campaign")
    user = user_of(request)
    await request.app[CTX].campaigns.get(user, campaign_id)
    body = await json_body(request, dto.CampaignPatch)
    changes: dict[str, Any] = {}
    for key in body.model_fields_set:
        value = getattr(body, key)
        if key == "device_ids":
            value = parse_uuids(value or [], "device_ids")
        elif key == "image_media_id":
            value = optional_id(value, "image_media_id")
        elif key == "scheduled_at":
            if value is None:
                raise InvalidInput("scheduled_at cannot be empty", {"field": "scheduled_at"})
            value = local(request, value)
        elif key in ("title", "message", "target_status", "options") and value is None:
            raise InvalidInput(f"{key} cannot be empty", {"field": key})
        changes[key] = value
    campaign = await request.app[CTX].campaigns.update(user, campaign_id, changes)
    return web.json_response(campaign_out(campaign))


@routes.delete("/api/campaigns/{id}", summary="Delete a campaign that is not running", tag="campaigns", response=dto.Ok)
async def delete_campaign(request: web.Request) -> web.Response:
    await request.app[CTX].campaigns.delete(user_of(request), path_id(request, what="campaign"))
    return web.json_response({"ok": True})


def _action(verb: str, summary: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        service = request.app[CTX].campaigns
        campaign = await getattr(service, verb)(user_of(request), path_id(request, what="campaign"))
        return web.json_response(campaign_out(campaign))

    handler.__name__ = f"{verb}_campaign"
    routes.post(f"/api/campaigns/{{id}}/{verb}", summary=summary, tag="campaigns", response=dto.CampaignOut)(handler)


_action("start", "Launch the campaign now")
_action("pause", "Pause sending (queued messages wait)")
_action("resume", "Resume a paused campaign")
_action("cancel", "Cancel the campaign and every message not sent yet")


@routes.post(
    "/api/campaigns/{id}/retry-failed",
    summary="Queue failed messages again (same message ids)",
    tag="campaigns",
    body=dto.RetryFailedIn,
    response=dto.RetryFailedOut,
)
async def retry_failed(request: web.Request) -> web.Response:
    campaign_id = path_id(request, what="campaign")
    user = user_of(request)
    await request.app[CTX].campaigns.get(user, campaign_id)
    body = await json_body(request, dto.RetryFailedIn) if request.can_read_body else dto.RetryFailedIn()
    count = await request.app[CTX].campaigns.retry_failed(user, campaign_id, optional_id(body.device_id, "device_id"))
    return web.json_response({"retried": count})


@routes.get(
    "/api/campaigns/{id}/report",
    summary="Should/done/failed/remaining, in total and per device",
    tag="campaigns",
    response=dto.CampaignReport,
)
async def campaign_report(request: web.Request) -> web.Response:
    report = await request.app[CTX].campaigns.report(user_of(request), path_id(request, what="campaign"))
    return web.json_response(dto.CampaignReport.model_validate(report).model_dump(mode="json"))


@routes.get(
    "/api/campaigns/{id}/recipients",
    summary="Each recipient's message and its fate",
    tag="campaigns",
    response=dto.Page[dto.RecipientOut],
    query=(
        *PAGING,
        QueryParam("status", "queued|sending|sent|failed|cancelled"),
        QueryParam("device_id", "only this device's messages"),
    ),
)
async def campaign_recipients(request: web.Request) -> web.Response:
    campaign_id = path_id(request, what="campaign")
    limit, cursor = page_params(request)
    raw_status = request.query.get("status")
    try:
        status = OutboxStatus(raw_status) if raw_status else None
    except ValueError:
        raise InvalidInput(f"unknown status {raw_status!r}", {"field": "status"}) from None
    rows = await request.app[CTX].campaigns.recipients(
        user_of(request),
        campaign_id,
        status=status,
        device_id=optional_id(request.query.get("device_id"), "device_id"),
        limit=limit,
        after=time_id_cursor(cursor),
    )
    items = [
        dto.RecipientOut(
            id=str(r["id"]),
            device_id=str(r["device_id"]),
            lead_id=str(r["lead_id"]) if r["lead_id"] else None,
            lead_name=r["lead_name"],
            recipient=r["recipient"],
            status=r["status"],
            attempts=r["attempts"],
            error=r["last_error"],
            wa_message_id=r["wa_message_id"],
            scheduled_at=r["scheduled_at"],
            sent_at=r["sent_at"],
        ).model_dump(mode="json")
        for r in rows
    ]
    last = f"{rows[-1]['created_at'].isoformat()}|{rows[-1]['id']}" if rows else None
    return web.json_response(page(items, limit, last))
