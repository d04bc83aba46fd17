"""Campaign options and actions through the REST API, checked in the simulated phones' inboxes: target status,
devices, an image, the campaign's own delays, scheduled times without an offset, and the actions start, pause,
resume, cancel and retry-failed."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import Reply, Server, ServerFactory, eventually
from tests.server.test_campaigns import linked_devices
from tests.server.test_templates_and_media import png, upload
from wamd_server.services.clock import AcceleratedClock


async def add_lead(
    server: Server, n: int, niche: str, target_status: str = "prospect", device: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": f"Lead {n}", "phone": f"+6019{n:07d}", "niche": niche}
    body["target_status"] = target_status
    if device is not None:
        body["device_id"] = device["id"]
    lead: dict[str, Any] = await server.ok("POST", "/api/leads", json=body)
    return lead


async def create(server: Server, **body: Any) -> dict[str, Any]:
    campaign: dict[str, Any] = await server.ok("POST", "/api/campaigns", json={"title": "Promo", **body})
    return campaign


async def inbox(server: Server, phone: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await server.sim("GET", f"/inbox/{phone.lstrip('+')}"))["items"]
    return items


async def texts(server: Server, phone: str) -> list[str]:
    return sorted(m["text"] for m in await inbox(server, phone))


async def report(server: Server, campaign: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
    return body


async def recipients(server: Server, campaign: dict[str, Any], status: str = "") -> list[dict[str, Any]]:
    query = f"?status={status}" if status else ""
    items: list[dict[str, Any]] = (await server.ok("GET", f"/api/campaigns/{campaign['id']}/recipients{query}"))[
        "items"
    ]
    return items


async def status_of(server: Server, campaign: dict[str, Any]) -> str:
    return str((await server.ok("GET", f"/api/campaigns/{campaign['id']}"))["status"])


async def until_status(server: Server, campaign: dict[str, Any], status: str, timeout: float = 15) -> None:
    async def reached() -> bool:
        return await status_of(server, campaign) == status

    await eventually(reached, timeout, f"campaign {campaign['title']} {status}")


async def until_planned(server: Server, campaign: dict[str, Any], should: int) -> None:
    async def planned() -> bool:
        return bool((await report(server, campaign))["should_send"] == should)

    await eventually(planned, what=f"{should} messages of {campaign['title']} queued")


async def until_settled(server: Server, campaign: dict[str, Any], should: int, timeout: float = 20) -> None:
    """Every message planned and none left waiting (sent, failed or cancelled)."""

    async def settled() -> bool:
        numbers = await report(server, campaign)
        return bool(numbers["should_send"] == should and numbers["remaining_send"] == 0)

    await eventually(settled, timeout, f"{campaign['title']}: {should} messages settled")


def numbers_of(body: dict[str, Any]) -> tuple[int, int, int, int]:
    return body["should_send"], body["done_send"], body["failed_send"], body["remaining_send"]


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def send_marker(server: Server, device: dict[str, Any], phone: str = "60177777777") -> None:
    """A message typed by hand, queued after the campaign's: once it has arrived, the device's lane has been through
    its queue, so campaign messages that were due and not held would have gone out before it."""
    chat = f"/api/devices/{device['id']}/chats/{phone}@s.whatsapp.net/messages"
    await server.ok("POST", chat, json={"text": "marker"})

    async def arrived() -> bool:
        return await texts(server, phone) == ["marker"]

    await eventually(arrived, what="the marker message arrived")


def assert_conflict(reply: Reply, *messages: str) -> None:
    """A 409 with one of `messages` (more than one where the campaign may have moved on meanwhile)."""
    assert reply.status == 409, (reply.status, reply.body)
    assert reply.body["error"]["code"] == "conflict", reply.body
    assert reply.body["error"]["message"] in messages, reply.body


# --- targeting -------------------------------------------------------------------------------------------


async def test_target_status_picks_customers_prospects_or_both(server: Server) -> None:
    [device] = await linked_devices(server, 1)
    prospects = [await add_lead(server, n, "ts", "prospect", device) for n in range(2)]
    customers = [await add_lead(server, n, "ts", "customer", device) for n in range(2, 5)]
    await add_lead(server, 9, "other", "customer", device)  # another niche: no campaign's
    campaigns = {}
    for target in ("customer", "prospect", "all"):
        body = {"title": target, "message": f"{target} for {{name}}", "niche": "ts", "target_status": target}
        campaigns[target] = await create(server, **body)
        assert campaigns[target]["target_status"] == target
    for target, count in (("customer", 3), ("prospect", 2), ("all", 5)):
        await until_settled(server, campaigns[target], count)
        assert numbers_of(await report(server, campaigns[target])) == (count, count, 0, 0)
    for lead in prospects:
        assert await texts(server, lead["phone"]) == [f"all for {lead['name']}", f"prospect for {lead['name']}"]
    for lead in customers:
        assert await texts(server, lead["phone"]) == [f"all for {lead['name']}", f"customer for {lead['name']}"]
    assert await texts(server, "+60190000009") == []


async def test_device_ids_limit_a_campaign_to_those_devices_and_to_leads_without_owner(server: Server) -> None:
    chosen, other = await linked_devices(server, 2)
    of_chosen = [await add_lead(server, n, "dev", device=chosen) for n in range(2)]
    of_other = [await add_lead(server, n, "dev", device=other) for n in range(2, 4)]
    free = [await add_lead(server, n, "dev") for n in range(4, 7)]
    campaign = await create(server, message="Hi {name}", niche="dev", device_ids=[chosen["id"]])
    assert campaign["device_ids"] == [chosen["id"]]
    await until_settled(server, campaign, 5)
    numbers = await report(server, campaign)
    assert numbers_of(numbers) == (5, 5, 0, 0)
    assert [(d["device_id"], d["done_send"]) for d in numbers["devices"]] == [(chosen["id"], 5)]
    # Leads without an owner go from the campaign's device, never from the other one.
    for lead in of_chosen + free:
        [message] = await inbox(server, lead["phone"])
        assert (message["from_phone"], message["text"]) == (chosen["phone"], f"Hi {lead['name']}")
    for lead in of_other:
        assert await inbox(server, lead["phone"]) == []
    await until_status(server, campaign, "completed")


async def test_an_image_goes_with_the_message(server: Server) -> None:
    [device] = await linked_devices(server, 1)
    lead = await add_lead(server, 0, "img", device=device)
    uploaded = await upload(server, png(64, 48), filename="offer.png")
    assert uploaded.status == 201, uploaded.body
    image_id = uploaded.body["id"]
    campaign = await create(server, message="Offer for {name}", niche="img", image_media_id=image_id)
    assert campaign["image_media_id"] == image_id
    await until_settled(server, campaign, 1)
    [message] = await inbox(server, lead["phone"])
    assert (message["has_media"], message["text"], message["from_phone"]) == (True, "Offer for Lead 0", device["phone"])
    # The device's chat history shows it as an image too (on Postgres it is stored a moment after the send).
    chat = f"/api/devices/{device['id']}/chats/{lead['phone'].lstrip('+')}@s.whatsapp.net/messages"

    async def stored() -> bool:
        return len((await server.ok("GET", chat))["items"]) == 1

    await eventually(stored)
    [history] = (await server.ok("GET", chat))["items"]
    assert (history["from_me"], history["media_type"], history["text"]) == (True, "image", "Offer for Lead 0")

    unknown = await server.call(
        "POST",
        "/api/campaigns",
        server.admin_token,
        {"title": "Ghost", "message": "Hi", "image_media_id": "00000000-0000-4000-8000-000000000000"},
    )
    assert unknown.status == 400, (unknown.status, unknown.body)
    assert unknown.body["error"]["code"] == "invalid_input" and unknown.body["error"]["details"] == {
        "field": "image_media_id"
    }


async def test_bad_options_are_refused_and_create_nothing(server: Server) -> None:
    [device] = await linked_devices(server, 1)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"min_delay_s": 60, "max_delay_s": 30}, "min_delay_s"),
        ({"min_delay_s": 30}, "min_delay_s"),  # both or neither
        ({"max_delay_s": 3601}, "max_delay_s"),
        ({"target_status": "vip"}, "target_status"),
        ({"device_ids": ["00000000-0000-4000-8000-000000000000"]}, "device_ids"),
        ({"device_ids": ["not-an-id"]}, "device_ids"),
        ({"scheduled_at": "tomorrow"}, "scheduled_at"),
    ]
    for options, field in bad:
        body = {"title": "Bad", "message": "Hi", "device_ids": [device["id"]], **options}
        reply = await server.call("POST", "/api/campaigns", server.admin_token, body)
        assert reply.status == 400, (options, reply.status, reply.body)
        error = reply.body["error"]
        details = error.get("details")
        fields = [d["field"] for d in details] if isinstance(details, list) else [(details or {}).get("field")]
        assert field in fields, (options, error)
    assert (await server.ok("GET", "/api/campaigns"))["items"] == []


# --- pacing and time -------------------------------------------------------------------------------------


async def test_the_campaign_own_delay_spaces_each_device_sends(make_server: ServerFactory, database_url: str) -> None:
    # A minute of gap passes in 0.6 s. One device is unpaced, the other waits an hour between sends: the campaign's
    # own min..max replaces both.
    server = await make_server(database_url, clock=AcceleratedClock(100))
    unpaced, hourly = await linked_devices(server, 2)
    await server.ok("PATCH", f"/api/devices/{hourly['id']}", json={"min_delay_s": 3600, "max_delay_s": 3600})
    for n in range(8):
        await add_lead(server, n, "gap", device=(unpaced, hourly)[n % 2])
    campaign = await create(server, message="Hi {name}", niche="gap", min_delay_s=40, max_delay_s=60)
    assert (campaign["min_delay_s"], campaign["max_delay_s"]) == (40, 60)
    await until_settled(server, campaign, 8, timeout=30)
    assert numbers_of(await report(server, campaign)) == (8, 8, 0, 0)
    sent: dict[str, list[datetime]] = defaultdict(list)
    for row in await recipients(server, campaign, "sent"):
        sent[row["device_id"]].append(at(row["sent_at"]))
    assert sorted(sent) == sorted([unpaced["id"], hourly["id"]])
    for device_id, times in sent.items():
        times.sort()
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        assert len(gaps) == 3, (device_id, gaps)
        assert all(gap >= 40 for gap in gaps), (device_id, gaps)
        assert all(gap < 600 for gap in gaps), (device_id, gaps)  # not the hourly device's own hour


async def test_a_send_with_the_campaign_own_delay_is_counted_when_it_is_made(
    make_server: ServerFactory, database_url: str
) -> None:
    # Half a minute of gap passes in 3 s. The report counts from the outbox; a message the phone has got must count
    # as sent within a second (README: a locked batch shows its rows as queued "at most a second"), not only once
    # the next message's gap has passed.
    server = await make_server(database_url, clock=AcceleratedClock(10))
    [device] = await linked_devices(server, 1)
    leads = [await add_lead(server, n, "count", device=device) for n in range(3)]
    campaign = await create(server, message="Hi {name}", niche="count", min_delay_s=30, max_delay_s=30)

    async def first_delivered() -> bool:
        return sum([len(await inbox(server, lead["phone"])) for lead in leads]) >= 1

    await eventually(first_delivered)

    async def counted() -> bool:
        return bool((await report(server, campaign))["done_send"] >= 1)

    await eventually(counted, timeout=1.5, what="the delivered message counted as sent")


async def test_a_scheduled_time_without_offset_is_local_time(server: Server) -> None:
    # WAMD_TIMEZONE defaults to Asia/Kuala_Lumpur, UTC+08:00 all year.
    local = await create(server, message="Hi", scheduled_at="2031-03-04T09:30:00")
    assert at(local["scheduled_at"]) == datetime(2031, 3, 4, 1, 30, tzinfo=UTC)
    assert at((await server.ok("GET", f"/api/campaigns/{local['id']}"))["scheduled_at"]) == at(local["scheduled_at"])
    explicit = await create(server, message="Hi", scheduled_at="2031-03-04T09:30:00+00:00")
    assert at(explicit["scheduled_at"]) == datetime(2031, 3, 4, 9, 30, tzinfo=UTC)
    moved = await server.ok("PATCH", f"/api/campaigns/{local['id']}", json={"scheduled_at": "2031-03-05T03:00:00"})
    assert at(moved["scheduled_at"]) == datetime(2031, 3, 4, 19, 0, tzinfo=UTC)  # still the 4th in UTC
    # The list's range is local too: the 4th, local, ends at 16:00 UTC.
    listed = await server.ok("GET", "/api/campaigns?from=2031-03-04&to=2031-03-05")
    assert [c["id"] for c in listed["items"]] == [explicit["id"]]
    assert all(c["status"] == "scheduled" for c in (local, explicit, moved))


async def test_a_scheduled_time_without_offset_follows_the_configured_zone(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url, WAMD_TIMEZONE="Europe/London")
    summer = await create(server, message="Hi", scheduled_at="2031-07-01T09:00:00")  # British Summer Time
    winter = await create(server, message="Hi", scheduled_at="2031-01-01T09:00:00")
    assert at(summer["scheduled_at"]) == datetime(2031, 7, 1, 8, 0, tzinfo=UTC)
    assert at(winter["scheduled_at"]) == datetime(2031, 1, 1, 9, 0, tzinfo=UTC)


# --- actions ---------------------------------------------------------------------------------------------


async def test_start_launches_a_draft_or_a_future_campaign_now(server: Server) -> None:
    [device] = await linked_devices(server, 1)
    leads = [await add_lead(server, n, "start", device=device) for n in range(2)]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    draft = await create(server, title="Draft", message="Draft for {name}", niche="start", draft=True)
    future = await create(server, title="Future", message="Future for {name}", niche="start", scheduled_at=tomorrow)
    assert (draft["status"], future["status"]) == ("draft", "scheduled")
    # A campaign for now, created after them, completes: the planner went over both meanwhile and left them be.
    now = await create(server, title="Now", message="Now for {name}", niche="start")
    await until_status(server, now, "completed")
    assert await status_of(server, draft) == "draft"
    assert await status_of(server, future) == "scheduled"
    assert numbers_of(await report(server, draft)) == numbers_of(await report(server, future)) == (0, 0, 0, 0)
    for lead in leads:
        assert await texts(server, lead["phone"]) == [f"Now for {lead['name']}"]

    before = datetime.now(UTC)
    started = await server.ok("POST", f"/api/campaigns/{draft['id']}/start")
    assert started["status"] in ("scheduled", "running", "completed")
    pulled = await server.ok("POST", f"/api/campaigns/{future['id']}/start")
    assert before <= at(pulled["scheduled_at"]) <= datetime.now(UTC)  # now instead of tomorrow
    for campaign in (draft, future):
        await until_status(server, campaign, "completed")
        assert numbers_of(await report(server, campaign)) == (2, 2, 0, 0)
    for lead in leads:
        name = lead["name"]
        assert await texts(server, lead["phone"]) == [f"Draft for {name}", f"Future for {name}", f"Now for {name}"]

    # A completed campaign cannot be started, paused, resumed or cancelled; it stays as it was.
    for verb, past in (("start", "started"), ("pause", "paused"), ("resume", "resumed"), ("cancel", "cancelled")):
        reply = await server.call("POST", f"/api/campaigns/{draft['id']}/{verb}", server.admin_token)
        assert_conflict(reply, f"a completed campaign cannot be {past}")
    assert await status_of(server, draft) == "completed"
    assert numbers_of(await report(server, draft)) == (2, 2, 0, 0)
    missing = await server.call("POST", "/api/campaigns/00000000-0000-4000-8000-000000000000/start", server.admin_token)
    assert (missing.status, missing.body["error"]["code"]) == (404, "not_found")


async def test_pause_holds_queued_messages_and_resume_lets_them_go(server: Server) -> None:
    [device] = await linked_devices(server, 1)
    leads = [await add_lead(server, n, "hold", device=device) for n in range(3)]
    # The device's queue is paused so that the campaign's messages wait in it when the campaign is paused.
    await server.ok("POST", f"/api/queue/{device['id']}/pause")
    campaign = await create(server, message="Hi {name}", niche="hold")
    await until_planned(server, campaign, 3)
    paused = await server.ok("POST", f"/api/campaigns/{campaign['id']}/pause")
    assert paused["status"] == "paused"
    assert_conflict(
        await server.call("POST", f"/api/campaigns/{campaign['id']}/pause", server.admin_token),
        "a paused campaign cannot be paused",
    )
    await server.ok("POST", f"/api/queue/{device['id']}/resume")
    await send_marker(server, device)
    for lead in leads:
        assert await inbox(server, lead["phone"]) == []
    assert numbers_of(await report(server, campaign)) == (3, 0, 0, 3)
    assert sorted(r["status"] for r in await recipients(server, campaign)) == ["queued"] * 3
    assert await status_of(server, campaign) == "paused"  # the planner does not complete a paused campaign

    resumed = await server.ok("POST", f"/api/campaigns/{campaign['id']}/resume")
    assert resumed["status"] == "running"
    assert_conflict(
        await server.call("POST", f"/api/campaigns/{campaign['id']}/resume", server.admin_token),
        "a running campaign cannot be resumed",
        "a completed campaign cannot be resumed",  # its three messages may all be out already
    )
    await until_status(server, campaign, "completed")
    assert numbers_of(await report(server, campaign)) == (3, 3, 0, 0)
    for lead in leads:
        assert await texts(server, lead["phone"]) == [f"Hi {lead['name']}"]


async def first_of_a_gapped_campaign_sent(
    server: Server, niche: str, count: int, gap_s: float
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], Callable[[], Awaitable[int]]]:
    """An unpaced device sends `count` leads a campaign with a gap of its own; returns once its first message
    arrived: the device, the leads, the campaign, and a count of the messages delivered so far."""
    [device] = await linked_devices(server, 1)
    leads = [await add_lead(server, n, niche, device=device) for n in range(count)]
    campaign = await create(server, message="Hi {name}", niche=niche, min_delay_s=gap_s, max_delay_s=gap_s)

    async def delivered() -> int:
        return sum([len(await inbox(server, lead["phone"])) for lead in leads])

    async def first_sent() -> bool:
        return await delivered() >= 1

    await eventually(first_sent)
    return device, leads, campaign, delivered


async def test_pausing_a_paced_campaign_stops_its_sends_between_gaps(
    make_server: ServerFactory, database_url: str
) -> None:
    # An unpaced device sends a campaign with a gap of its own (a minute, 0.6 s here). Paused after its first send,
    # the campaign must hold the rest: at most the message already waiting out its gap may still go.
    server = await make_server(database_url, clock=AcceleratedClock(100))
    device, leads, campaign, delivered = await first_of_a_gapped_campaign_sent(server, "paced", 6, 60)
    await server.ok("POST", f"/api/campaigns/{campaign['id']}/pause")
    at_pause = await delivered()
    await send_marker(server, device)
    after = await delivered()
    assert after <= at_pause + 1, f"{after} delivered, {at_pause} when the campaign was paused"

    await server.ok("POST", f"/api/campaigns/{campaign['id']}/resume")
    await until_status(server, campaign, "completed", timeout=20)
    assert numbers_of(await report(server, campaign)) == (6, 6, 0, 0)
    for lead in leads:
        assert len(await inbox(server, lead["phone"])) == 1


async def test_cancel_cancels_every_message_not_sent(server: Server) -> None:
    [device] = await linked_devices(server, 1)
    leads = [await add_lead(server, n, "cancel", device=device) for n in range(3)]
    await server.ok("POST", f"/api/queue/{device['id']}/pause")  # the messages wait in the queue
    campaign = await create(server, message="Hi {name}", niche="cancel")
    await until_planned(server, campaign, 3)
    cancelled = await server.ok("POST", f"/api/campaigns/{campaign['id']}/cancel")
    assert cancelled["status"] == "cancelled"
    # Cancelled messages were never due: the report leaves them out of should_send.
    assert numbers_of(await report(server, campaign)) == (0, 0, 0, 0)
    rows = await recipients(server, campaign)
    assert sorted((r["lead_id"], r["status"], r["error"]) for r in rows) == sorted(
        (lead["id"], "cancelled", "campaign cancelled") for lead in leads
    )
    await server.ok("POST", f"/api/queue/{device['id']}/resume")
    await send_marker(server, device)
    for lead in leads:
        assert await inbox(server, lead["phone"]) == []

    # Nothing brings a cancelled campaign back; it stays as it was.
    path = f"/api/campaigns/{campaign['id']}"
    for verb, past in (("start", "started"), ("pause", "paused"), ("resume", "resumed"), ("cancel", "cancelled")):
        assert_conflict(
            await server.call("POST", f"{path}/{verb}", server.admin_token), f"a cancelled campaign cannot be {past}"
        )
    assert_conflict(
        await server.call("POST", f"{path}/retry-failed", server.admin_token),
        "a cancelled campaign has nothing to retry",
    )
    assert await status_of(server, campaign) == "cancelled"
    assert numbers_of(await report(server, campaign)) == (0, 0, 0, 0)

    # A campaign cancelled before its time never sends.
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    later = await create(server, title="Later", message="Later", niche="cancel", scheduled_at=tomorrow)
    assert (await server.ok("POST", f"/api/campaigns/{later['id']}/cancel"))["status"] == "cancelled"
    assert_conflict(
        await server.call("POST", f"/api/campaigns/{later['id']}/start", server.admin_token),
        "a cancelled campaign cannot be started",
    )
    assert numbers_of(await report(server, later)) == (0, 0, 0, 0)


async def test_cancelling_a_paced_campaign_answers_at_once_and_stops_its_sends(
    make_server: ServerFactory, database_url: str
) -> None:
    # An unpaced device sends a campaign with a gap of its own (an hour, six minutes here), cancelled after its
    # first send: the cancel must not wait out a gap (it did, behind the rows a batch held locked), and at most the
    # message already waiting out its gap may still go.
    server = await make_server(database_url, clock=AcceleratedClock(10))
    device, _, campaign, delivered = await first_of_a_gapped_campaign_sent(server, "stop", 3, 3600)
    async with asyncio.timeout(60):  # far less than the six minutes of a gap
        assert (await server.ok("POST", f"/api/campaigns/{campaign['id']}/cancel"))["status"] == "cancelled"
    at_cancel = await delivered()
    await send_marker(server, device)
    after = await delivered()
    assert after <= at_cancel + 1, f"{after} delivered, {at_cancel} when the campaign was cancelled"
    rows = await recipients(server, campaign)
    assert sorted(r["status"] for r in rows) == sorted(["sent"] * after + ["cancelled"] * (3 - after))
    assert (await report(server, campaign))["remaining_send"] == 0


async def test_retry_failed_queues_failed_messages_again_with_their_ids(server: Server) -> None:
    first, second = await linked_devices(server, 2)
    reachable = await add_lead(server, 0, "retry", device=first)
    gone_first = await add_lead(server, 1, "retry", device=first)
    gone_second = await add_lead(server, 2, "retry", device=second)
    for lead in (gone_first, gone_second):
        await server.sim("POST", "/faults", {"phone": lead["phone"], "not_on_whatsapp": True})
    draft = await create(server, title="Draft", message="Hi", niche="retry", draft=True)
    assert_conflict(
        await server.call("POST", f"/api/campaigns/{draft['id']}/retry-failed", server.admin_token),
        "a draft campaign has nothing to retry",
    )
    campaign = await create(server, message="Hi {name}", niche="retry")
    path = f"/api/campaigns/{campaign['id']}"
    await until_status(server, campaign, "completed")
    assert numbers_of(await report(server, campaign)) == (3, 1, 2, 0)
    failed = {r["lead_id"]: r for r in await recipients(server, campaign, "failed")}
    assert sorted(failed) == sorted([gone_first["id"], gone_second["id"]])
    assert all("not on WhatsApp" in r["error"] for r in failed.values()), failed

    # Still not on WhatsApp: retried, they fail again at once, for good.
    assert await server.ok("POST", f"{path}/retry-failed") == {"retried": 2}
    await until_status(server, campaign, "completed")
    assert numbers_of(await report(server, campaign)) == (3, 1, 2, 0)
    again = await recipients(server, campaign, "failed")
    assert sorted((r["lead_id"], r["attempts"]) for r in again) == sorted((lead, 1) for lead in failed)

    # Now on WhatsApp: a retry of one device's messages sends only those, with the ids they were given at first.
    for lead in (gone_first, gone_second):
        await server.sim("POST", "/faults", {"phone": lead["phone"], "not_on_whatsapp": False})
    assert await server.ok("POST", f"{path}/retry-failed", json={"device_id": first["id"]}) == {"retried": 1}
    await until_status(server, campaign, "completed")
    assert numbers_of(await report(server, campaign)) == (3, 2, 1, 0)
    [message] = await inbox(server, gone_first["phone"])
    assert (message["wa_id"], message["text"]) == (failed[gone_first["id"]]["wa_message_id"], "Hi Lead 1")
    assert await inbox(server, gone_second["phone"]) == []

    assert await server.ok("POST", f"{path}/retry-failed") == {"retried": 1}
    await until_status(server, campaign, "completed")
    assert numbers_of(await report(server, campaign)) == (3, 3, 0, 0)
    [message] = await inbox(server, gone_second["phone"])
    assert message["wa_id"] == failed[gone_second["id"]]["wa_message_id"]
    assert len(await inbox(server, reachable["phone"])) == 1  # never sent twice
    assert await server.ok("POST", f"{path}/retry-failed") == {"retried": 0}  # nothing left to retry
    assert await status_of(server, campaign) == "completed"


async def test_retry_failed_sends_a_message_that_ran_out_of_attempts_once_the_fault_is_gone(
    make_server: ServerFactory, database_url: str
) -> None:
    # The four retry delays (about 42 minutes) pass in under three seconds.
    server = await make_server(database_url, clock=AcceleratedClock(1000))
    [device] = await linked_devices(server, 1)
    lead = await add_lead(server, 0, "flaky", device=device)
    await server.sim("POST", "/faults", {"phone": device["phone"], "fail_rate": 1.0})
    campaign = await create(server, message="Hi {name}", niche="flaky")
    await until_status(server, campaign, "completed", timeout=20)
    assert numbers_of(await report(server, campaign)) == (1, 0, 1, 0)
    [failed] = await recipients(server, campaign, "failed")
    assert failed["attempts"] == 5 and failed["error"].startswith("gave up after 5 attempts"), failed

    async def queue_paused() -> bool:  # five failed sends in a row pause the device's queue too
        [queue] = (await server.ok("GET", "/api/queue"))["items"]
        return bool(queue["pause_kind"] == "failures")

    await eventually(queue_paused)

    await server.sim("POST", "/faults", {"phone": device["phone"], "fail_rate": 0.0})
    assert await server.ok("POST", f"/api/campaigns/{campaign['id']}/retry-failed") == {"retried": 1}
    assert await status_of(server, campaign) == "running"
    assert numbers_of(await report(server, campaign)) == (1, 0, 0, 1)
    await server.ok("POST", f"/api/queue/{device['id']}/resume")
    await until_status(server, campaign, "completed")
    assert numbers_of(await report(server, campaign)) == (1, 1, 0, 0)
    [sent] = await recipients(server, campaign, "sent")
    assert (sent["wa_message_id"], sent["attempts"]) == (failed["wa_message_id"], 1)
    [message] = await inbox(server, lead["phone"])
    assert (message["wa_id"], message["text"]) == (failed["wa_message_id"], "Hi Lead 0")
