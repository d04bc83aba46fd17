"""Campaigns end to end on the in-process simulated network: planning, sending, reports."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import delete, update

from tests.conftest import Server, ServerFactory, eventually, truncate_all
from wamd_server.infra.db.engine import create_engine
from wamd_server.infra.db.tables import messages, outbox
from wamd_server.services import campaigns as campaign_service
from wamd_server.services.clock import AcceleratedClock, SystemClock
from wamd_server.services.queue import QueueControl
from wamd_server.sim.network import SimNetwork

FAST = {"min_delay_s": 0, "max_delay_s": 0, "hourly_cap": 10_000, "daily_cap": 100_000, "typing": False}


async def linked_devices(server: Server, count: int, first_phone: int = 60123100000) -> list[dict[str, Any]]:
    ws = await server.ws()
    devices = []
    for n in range(count):
        device = await server.create_device(f"Sender {n}")
        await server.pair_by_qr(device["id"], str(first_phone + n), ws)
        devices.append(await server.ok("PATCH", f"/api/devices/{device['id']}", json=FAST))
    return devices


async def make_leads(
    server: Server, count: int, devices: list[dict[str, Any]], niche: str = "property"
) -> list[dict[str, Any]]:
    leads = []
    for n in range(count):
        body = {
            "name": f"Lead {n}",
            "phone": f"+6019{n:07d}",
            "niche": niche,
            "target_status": "prospect",
            "device_id": devices[n % len(devices)]["id"],
        }
        leads.append(await server.ok("POST", "/api/leads", json=body))
    return leads


async def test_broadcast_sends_each_lead_one_message_from_its_owner_device(server: Server) -> None:
    devices = await linked_devices(server, 3)
    leads = await make_leads(server, 12, devices)
    campaign = await server.ok(
        "POST",
        "/api/campaigns",
        json={"title": "Promo", "message": "Hi {name}, {see|view} https://x.example/a?b=1 now", "niche": "property"},
    )
    assert campaign["status"] == "scheduled"

    async def done() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return report["done_send"] == 12

    await eventually(done, timeout=30)
    report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
    assert (report["should_send"], report["failed_send"], report["remaining_send"]) == (12, 0, 0)
    assert sum(d["done_send"] for d in report["devices"]) == 12
    device_phones = {d["id"]: d["phone"] for d in devices}
    for lead in leads:
        inbox = await server.sim("GET", f"/inbox/{lead['phone']}")
        assert len(inbox["items"]) == 1, inbox
        message = inbox["items"][0]
        assert message["from_phone"] == device_phones[lead["device_id"]]
        assert message["text"].startswith(f"Hi {lead['name']}, ")
        assert "https://x.example/a?b=1" in message["text"]

    async def completed() -> bool:
        return (await server.ok("GET", f"/api/campaigns/{campaign['id']}"))["status"] == "completed"

    await eventually(completed, timeout=10)


async def test_a_ban_pauses_the_device_queue_at_once(server: Server) -> None:
    devices = await linked_devices(server, 1)
    device = devices[0]
    ws = await server.ws()
    started = asyncio.get_running_loop().time()
    await server.sim("POST", "/faults", {"phone": device["phone"], "ban_seconds": 600})
    await ws.wait_event("device.status", device["id"], lambda e: e["status"] == "banned")

    async def paused() -> bool:
        rows = (await server.ok("GET", "/api/queue"))["items"]
        return any(r["device_id"] == device["id"] and r["pause_kind"] == "ban" for r in rows)

    await eventually(paused, timeout=5)
    assert asyncio.get_running_loop().time() - started < 1.0
    # Nothing queued for it goes out while banned.
    await make_leads(server, 2, devices)
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "During ban", "message": "Hi"})

    async def planned() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return report["should_send"] == 2

    await eventually(planned)
    report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
    assert (report["done_send"], report["remaining_send"]) == (0, 2)


async def test_a_logout_pauses_the_queue_until_the_device_is_paired_again(server: Server) -> None:
    [device] = await linked_devices(server, 1)
    ws = await server.ws()
    await server.sim("POST", "/unlink", {"phone": device["phone"]})  # logged out from the phone
    await ws.wait_event("device.status", device["id"], lambda e: e["status"] == "logged_out")

    async def paused() -> bool:
        rows = (await server.ok("GET", "/api/queue"))["items"]
        return any(r["device_id"] == device["id"] and r["pause_kind"] == "logout" for r in rows)

    await eventually(paused)
    queue = next(r for r in (await server.ok("GET", "/api/queue"))["items"] if r["device_id"] == device["id"])
    assert queue["paused_reason"] == "the device was logged out; pair it again"
    leads = await make_leads(server, 2, [device])
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "After logout", "message": "Hi {name}"})
    report_path = f"/api/campaigns/{campaign['id']}/report"

    async def planned() -> bool:
        return (await server.ok("GET", report_path))["should_send"] == 2

    await eventually(planned)
    assert (await server.ok("GET", report_path))["done_send"] == 0

    await server.pair_by_qr(device["id"], device["phone"], ws)  # paired again: the pause lifts itself

    async def sent() -> bool:
        return (await server.ok("GET", report_path))["done_send"] == 2

    await eventually(sent)
    queue = next(r for r in (await server.ok("GET", "/api/queue"))["items"] if r["device_id"] == device["id"])
    assert queue["paused_reason"] is None
    for lead in leads:
        assert len((await server.sim("GET", f"/inbox/{lead['phone']}"))["items"]) == 1


async def test_a_message_that_keeps_failing_is_given_up_after_five_attempts(
    make_server: ServerFactory, database_url: str
) -> None:
    # The retries wait 30 s, 2, 10 and 30 minutes: 42.5 minutes pass in about 4 s here.
    server = await make_server(database_url, clock=AcceleratedClock(600))
    [device] = await linked_devices(server, 1)
    [lead] = await make_leads(server, 1, [device])
    await server.sim("POST", "/faults", {"phone": device["phone"], "fail_rate": 1.0})
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "Doomed", "message": "Hi"})
    report_path = f"/api/campaigns/{campaign['id']}/report"

    async def failed() -> bool:
        return (await server.ok("GET", report_path))["failed_send"] == 1

    await eventually(failed, timeout=30)
    [row] = (await server.ok("GET", f"/api/campaigns/{campaign['id']}/recipients?status=failed"))["items"]
    assert row["attempts"] == 5 and row["error"].startswith("gave up after 5 attempts: "), row
    assert (await server.sim("GET", f"/inbox/{lead['phone']}"))["items"] == []


async def test_a_greeting_is_that_of_the_moment_the_message_is_sent(
    make_server: ServerFactory, database_url: str
) -> None:
    # A paced campaign launched at 11:59 (Kuala Lumpur) whose second message goes out two minutes later: that one
    # says good afternoon, though both were written at the launch. Two minutes pass in two seconds here.
    kl = ZoneInfo("Asia/Kuala_Lumpur")
    clock = AcceleratedClock(60, start=datetime(2026, 12, 1, 11, 55, tzinfo=kl).astimezone(UTC))
    server = await make_server(database_url, clock=clock)
    [device] = await linked_devices(server, 1)
    await server.ok("PATCH", f"/api/devices/{device['id']}", json={"min_delay_s": 120, "max_delay_s": 120})
    leads = await make_leads(server, 2, [device])
    launch = datetime(2026, 12, 1, 11, 59, tzinfo=kl)
    assert clock.now() < launch, "setting up took too long for this test's timeline"
    body = {
        "title": "Greeted",
        "message": "{greeting} {name}, https://x.example/a?b=1",
        "scheduled_at": launch.isoformat(),
    }
    campaign = await server.ok("POST", "/api/campaigns", json=body)

    async def both_sent() -> bool:
        return (await server.ok("GET", f"/api/campaigns/{campaign['id']}/report"))["done_send"] == 2

    await eventually(both_sent, timeout=30)
    sent = (await server.ok("GET", f"/api/campaigns/{campaign['id']}/recipients?status=sent"))["items"]
    by_lead = {r["lead_id"]: datetime.fromisoformat(r["sent_at"]).astimezone(kl) for r in sent}
    for lead in leads:
        [message] = (await server.sim("GET", f"/inbox/{lead['phone']}"))["items"]
        at = by_lead[lead["id"]]
        greeting = "Selamat pagi" if at.hour < 12 else "Selamat tengah hari"
        assert message["text"] == f"{greeting} {lead['name']}, https://x.example/a?b=1", (message, at)
        chat = f"/api/devices/{device['id']}/chats/{lead['phone'].lstrip('+')}@s.whatsapp.net/messages"
        assert [m["text"] for m in (await server.ok("GET", chat))["items"]] == [message["text"]]
    assert max(by_lead.values()).hour == 12  # the second went out after noon, greeting as it should


async def test_messages_left_sending_by_a_crash_go_out_again_with_their_ids(
    make_server: ServerFactory, database_url: str
) -> None:
    network = SimNetwork()
    first = await make_server(database_url, sim_network=network)
    [device] = await linked_devices(first, 1)
    # Paced: one message now, the next an hour later; the rest wait in the queue.
    await first.ok("PATCH", f"/api/devices/{device['id']}", json={"min_delay_s": 3600, "max_delay_s": 3600})
    leads = await make_leads(first, 3, [device])
    campaign = await first.ok("POST", "/api/campaigns", json={"title": "Crash", "message": "Hi {name}"})
    report_path = f"/api/campaigns/{campaign['id']}/report"

    async def one_sent() -> bool:
        return (await first.ok("GET", report_path))["done_send"] == 1

    await eventually(one_sent)
    await first.ok("PATCH", f"/api/devices/{device['id']}", json=FAST)
    await first.close()
    # What a crash between claiming and recording leaves: the rows claimed `sending` (maybe sent, maybe not).
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            claimed = (
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.device_id == uuid.UUID(device["id"]), outbox.c.status == "queued")
                    .values(status="sending", attempts=outbox.c.attempts + 1)
                    .returning(outbox.c.recipient, outbox.c.wa_message_id)
                )
            ).all()
    finally:
        await engine.dispose()
    assert len(claimed) == 2

    second = await make_server(database_url, sim_network=network)  # the device reconnects with its session

    async def all_sent() -> bool:
        return (await second.ok("GET", report_path))["done_send"] == 3

    await eventually(all_sent)
    for recipient, wa_id in claimed:  # sent again, with the id each had when the crash came
        assert [m["wa_id"] for m in network.inbox(recipient)] == [wa_id]
    assert all(len(network.inbox(lead["phone"])) == 1 for lead in leads)


async def test_typing_shows_before_each_paced_send(make_server: ServerFactory, database_url: str) -> None:
    server = await make_server(database_url, clock=AcceleratedClock(20))
    paced, unpaced = await linked_devices(server, 2)  # typing off for both
    await server.ok("PATCH", f"/api/devices/{paced['id']}", json={"min_delay_s": 2, "max_delay_s": 2, "typing": True})
    await make_leads(server, 4, [paced, unpaced])
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "Typing", "message": "Hi {name}"})

    async def done() -> bool:
        return (await server.ok("GET", f"/api/campaigns/{campaign['id']}/report"))["done_send"] == 4

    await eventually(done)
    network = server.runtime.sim_network
    assert network is not None
    assert network.stats()["typing_shown"] == 2  # one for each of the paced device's two sends, none unpaced


async def test_opted_out_leads_receive_nothing(server: Server) -> None:
    devices = await linked_devices(server, 1)
    leads = await make_leads(server, 3, devices)
    quitter = leads[1]
    ws = await server.ws()
    network = server.runtime.sim_network
    assert network is not None
    await network.contact_send(quitter["phone"], devices[0]["phone"], "stop!")
    await ws.wait_event("message.new", devices[0]["id"])

    async def opted_out() -> bool:
        lead = await server.ok("GET", f"/api/leads/{quitter['id']}")
        return lead["opted_out_at"] is not None

    await eventually(opted_out)
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "After STOP", "message": "Hi {name}"})

    async def done() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return report["remaining_send"] == 0 and report["should_send"] > 0

    await eventually(done, timeout=20)
    assert (await server.sim("GET", f"/inbox/{quitter['phone']}"))["items"] == []
    for lead in (leads[0], leads[2]):
        assert len((await server.sim("GET", f"/inbox/{lead['phone']}"))["items"]) == 1
    report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
    assert (report["should_send"], report["done_send"]) == (2, 2)


async def test_an_opt_out_cancels_waiting_messages_however_it_is_made_and_can_be_taken_back(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url)
    [device] = await linked_devices(server, 1)
    await server.ok("POST", f"/api/queue/{device['id']}/pause")  # the campaign's messages wait in the queue
    replied, marked, kept = await make_leads(server, 3, [device])
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "Held", "message": "Hi {name}"})
    path = f"/api/campaigns/{campaign['id']}"

    async def planned() -> bool:
        return (await server.ok("GET", f"{path}/report"))["should_send"] == 3

    await eventually(planned)
    network = server.runtime.sim_network
    assert network is not None
    # A contact who is no lead writes "stop" in a chat: nothing to opt out; what staff wrote to them still goes.
    stranger = "60177777777"
    stranger_chat = f"/api/devices/{device['id']}/chats/{stranger}@s.whatsapp.net/messages"
    await server.ok("POST", stranger_chat, json={"text": "A word by hand"})
    await network.contact_send(stranger, device["phone"], "stop")
    await network.contact_send(replied["phone"], device["phone"], "Berhenti")  # a default stop word (Malay)
    await server.ok("PATCH", f"/api/leads/{marked['id']}", json={"opted_out": True})  # by hand

    async def both_cancelled() -> bool:
        items = (await server.ok("GET", f"{path}/recipients?status=cancelled"))["items"]
        return sorted(r["lead_id"] for r in items) == sorted([replied["id"], marked["id"]])

    await eventually(both_cancelled)
    cancelled = (await server.ok("GET", f"{path}/recipients?status=cancelled"))["items"]
    assert {r["error"] for r in cancelled} == {"the recipient opted out"}

    # Taken back: the lead may be written to again (a campaign's cancelled message stays cancelled).
    await server.ok("PATCH", f"/api/leads/{marked['id']}", json={"opted_out": False})
    marked_chat = f"/api/devices/{device['id']}/chats/{marked['phone'].lstrip('+')}@s.whatsapp.net/messages"
    await server.ok("POST", marked_chat, json={"text": "A word by hand"})
    await server.ok("POST", f"/api/queue/{device['id']}/resume")

    async def all_out() -> bool:
        return all(len(network.inbox(p)) == 1 for p in (kept["phone"], marked["phone"], stranger))

    await eventually(all_out)
    assert [m["text"] for m in network.inbox(kept["phone"])] == ["Hi Lead 2"]
    assert [m["text"] for m in network.inbox(marked["phone"])] == ["A word by hand"]
    assert [m["text"] for m in network.inbox(stranger)] == ["A word by hand"]
    assert network.inbox(replied["phone"]) == []


async def test_the_summary_counts_every_campaign_of_the_range(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(campaign_service, "SUMMARY_PAGE", 2)  # five campaigns make three pages
    devices = await linked_devices(server, 1)
    await make_leads(server, 3, devices)
    created = []
    for n in range(5):
        body = {"title": f"C{n}", "message": "Hi {name}", "scheduled_at": f"2026-01-0{n + 1}T09:00:00+08:00"}
        created.append(await server.ok("POST", "/api/campaigns", json=body))

    async def all_done() -> bool:
        for c in created:
            report = await server.ok("GET", f"/api/campaigns/{c['id']}/report")
            if report["done_send"] != 3:
                return False
        return True

    await eventually(all_done, timeout=20)
    summary = await server.ok("GET", "/api/campaigns/summary")
    assert summary["campaigns"]["total"] == 5
    assert summary["broadcast_stats"] == {
        "total_should_send": 15,
        "total_done_send": 15,
        "total_failed_send": 0,
        "total_remaining_send": 0,
    }
    assert [c["title"] for c in summary["recent_campaigns"]] == ["C4", "C3", "C2", "C1", "C0"]
    assert all(c["done_send"] == 3 for c in summary["recent_campaigns"])


@pytest.mark.parametrize("trouble", ["ban", "queue paused"])
async def test_messages_of_leads_without_owner_move_off_a_device_that_cannot_send(
    make_server: ServerFactory, database_url: str, trouble: str
) -> None:
    clock = AcceleratedClock(300)  # five minutes of being stuck pass in a second
    server = await make_server(database_url, clock=clock)
    devices = await linked_devices(server, 2)
    slow, fast = devices
    # The slow device sends one message, then waits an hour (twelve seconds here) before the next; a pause or a
    # ban during that wait keeps the next one from going out.
    await server.ok("PATCH", f"/api/devices/{slow['id']}", json={"min_delay_s": 3600, "max_delay_s": 3600})
    for n in range(10):
        await server.ok("POST", "/api/leads", json={"name": f"Free {n}", "phone": f"+6019{n:07d}", "niche": "free"})
    campaign = await server.ok(
        "POST", "/api/campaigns", json={"title": "Free", "message": "Hi {name}", "niche": "free"}
    )

    async def half_planned() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        per_device = {d["device_id"]: d for d in report["devices"]}
        return slow["id"] in per_device and per_device[slow["id"]]["done_send"] >= 1

    await eventually(half_planned, timeout=20)
    if trouble == "ban":
        await server.sim("POST", "/faults", {"phone": slow["phone"], "ban_seconds": 86_400})
    else:  # online all along: the five minutes count from the pause
        await server.ok("POST", f"/api/queue/{slow['id']}/pause")
    # Usually one; two when the machine was slow enough for the hour (twelve seconds) to pass before the trouble
    # (and one more if a send was under way when it began).
    report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
    sent_before = {d["device_id"]: d["done_send"] for d in report["devices"]}[slow["id"]]

    async def finished() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return report["remaining_send"] == 0

    await eventually(finished, timeout=30)
    report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
    assert (report["should_send"], report["done_send"]) == (10, 10)
    by_device = {d["device_id"]: d["done_send"] for d in report["devices"]}
    # Five each planned; what the slow device had not sent when the trouble began moved to the fast one.
    sent_by_slow = by_device[slow["id"]]
    assert by_device[fast["id"]] == 10 - sent_by_slow
    assert 1 <= sent_before <= sent_by_slow <= sent_before + 1 < 5
    network = server.runtime.sim_network
    assert network is not None
    assert all(len(network.inbox(f"6019{n:07d}")) == 1 for n in range(10))


async def test_leads_without_owner_wait_for_a_device_that_can_take_them(
    make_server: ServerFactory, database_url: str
) -> None:
    # Every device's queue paused at the launch: the leads without an owner device are counted and the campaign
    # waits for a device instead of completing without them.
    clock = AcceleratedClock(100)
    server = await make_server(database_url, clock=clock)
    devices = await linked_devices(server, 2)
    for device in devices:
        await server.ok("POST", f"/api/queue/{device['id']}/pause")
    for n in range(6):
        await server.ok("POST", "/api/leads", json={"name": f"Free {n}", "phone": f"+6019{n:07d}", "niche": "wait"})
    campaign = await server.ok(
        "POST", "/api/campaigns", json={"title": "Wait", "message": "Hi {name}", "niche": "wait"}
    )
    path = f"/api/campaigns/{campaign['id']}"

    async def waiting() -> bool:
        return (await server.ok("GET", path))["leads_waiting"] == 6

    await eventually(waiting)
    started = clock.now()
    late = await server.ok("POST", "/api/leads", json={"name": "Late", "phone": "+60199999999", "niche": "wait"})

    async def looked_again_twice() -> bool:  # the planner's rounds are a real second apart: 100 s here
        return (clock.now() - started).total_seconds() > 300

    await eventually(looked_again_twice)
    waited = await server.ok("GET", path)
    assert waited["status"] == "running"
    assert waited["status_reason"] == "6 leads without an owner device wait for a device that can send"
    assert (await server.ok("GET", f"{path}/report"))["should_send"] == 0

    await server.ok("POST", f"/api/queue/{devices[1]['id']}/resume")

    async def completed() -> bool:
        return (await server.ok("GET", path))["status"] == "completed"

    await eventually(completed)
    done = await server.ok("GET", path)
    assert (done["leads_waiting"], done["status_reason"]) == (0, None)
    report = await server.ok("GET", f"{path}/report")
    assert (report["should_send"], report["done_send"]) == (6, 6)
    assert {d["device_id"]: d["done_send"] for d in report["devices"]} == {devices[1]["id"]: 6}
    network = server.runtime.sim_network
    assert network is not None
    assert all(len(network.inbox(f"6019{n:07d}")) == 1 for n in range(6))
    assert network.inbox(late["phone"].lstrip("+")) == []  # not a target: created after the campaign started


async def test_failed_sends_retry_fail_or_pause_the_queue(make_server: ServerFactory, database_url: str) -> None:
    # Ten minutes of retry backoff pass in a few seconds; pacing is off, so on Postgres these rows go through
    # locked batches, on SQLite through claims: the outcomes must be the same.
    server = await make_server(database_url, clock=AcceleratedClock(200))
    device = (await linked_devices(server, 1))[0]
    leads = await make_leads(server, 5, [device])
    await server.sim("POST", "/faults", {"phone": device["phone"], "fail_rate": 1.0})
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "Trouble", "message": "Hi {name}"})
    report_path = f"/api/campaigns/{campaign['id']}/report"

    async def paused() -> bool:
        rows = (await server.ok("GET", "/api/queue"))["items"]
        return any(r["device_id"] == device["id"] and r["pause_kind"] == "failures" for r in rows)

    await eventually(paused, timeout=20)
    # Five transient failures in a row paused the queue; those messages wait for their retry, none was lost.
    report = await server.ok("GET", report_path)
    assert (report["should_send"], report["done_send"], report["failed_send"], report["remaining_send"]) == (
        5,
        0,
        0,
        5,
    ), report
    queue = next(r for r in (await server.ok("GET", "/api/queue"))["items"] if r["device_id"] == device["id"])
    assert "5 sends in a row failed" in queue["paused_reason"], queue

    await server.sim("POST", "/faults", {"phone": device["phone"], "fail_rate": 0.0})
    await server.ok("POST", f"/api/queue/{device['id']}/resume")

    async def settled(path: str) -> bool:
        report = await server.ok("GET", path)
        return report["should_send"] > 0 and report["remaining_send"] == 0

    await eventually(lambda: settled(report_path), timeout=30)
    report = await server.ok("GET", report_path)
    assert (report["should_send"], report["done_send"], report["failed_send"]) == (5, 5, 0), report
    sent = (await server.ok("GET", f"/api/campaigns/{campaign['id']}/recipients?status=sent"))["items"]
    # Each failed once and went out on its retry, with the id it was given when it was queued.
    assert sorted((r["lead_id"], r["attempts"]) for r in sent) == sorted((lead["id"], 2) for lead in leads)
    for lead in leads:
        inbox = (await server.sim("GET", f"/inbox/{lead['phone']}"))["items"]
        assert len(inbox) == 1, inbox
        assert inbox[0]["wa_id"] == next(r["wa_message_id"] for r in sent if r["lead_id"] == lead["id"])

    # A recipient who is not on WhatsApp fails at once, for good, with the reason; nothing is retried. Such
    # failures are no fault of the device: they do not count toward the five failed sends in a row. Twenty in a
    # row pause the queue for a look at the lead list (many numbers not on WhatsApp look like spam to WhatsApp).
    missing = []
    for n in range(20):
        body = {"name": f"Nobody {n}", "phone": f"+601999999{n:02d}", "niche": "gone", "device_id": device["id"]}
        missing.append(await server.ok("POST", "/api/leads", json=body))
        await server.sim("POST", "/faults", {"phone": missing[-1]["phone"], "not_on_whatsapp": True})
    second = await server.ok("POST", "/api/campaigns", json={"title": "Gone", "message": "Hi", "niche": "gone"})
    await eventually(lambda: settled(f"/api/campaigns/{second['id']}/report"), timeout=30)
    report = await server.ok("GET", f"/api/campaigns/{second['id']}/report")
    assert (report["should_send"], report["done_send"], report["failed_send"]) == (20, 0, 20), report
    failed = (await server.ok("GET", f"/api/campaigns/{second['id']}/recipients?status=failed"))["items"]
    assert sorted((r["lead_id"], r["attempts"]) for r in failed) == sorted((m["id"], 1) for m in missing)
    assert all("not on WhatsApp" in r["error"] for r in failed), failed
    for lead in missing:
        assert (await server.sim("GET", f"/inbox/{lead['phone']}"))["items"] == []

    async def paused_for_the_list() -> bool:
        queue = next(r for r in (await server.ok("GET", "/api/queue"))["items"] if r["device_id"] == device["id"])
        return queue["paused_reason"] == "20 recipients in a row are not on WhatsApp; check the lead list"

    await eventually(paused_for_the_list)


async def test_sends_missing_from_the_chat_history_are_added_when_the_device_starts_sending(
    make_server: ServerFactory, pg_url: str
) -> None:
    # Unpaced sends on Postgres join the chat history a moment after they went out; a crash in that moment
    # leaves sent rows without their history message (removed here by hand): the device's lane adds them when it
    # starts again.
    truncate_all(pg_url)
    server = await make_server(pg_url)
    [device] = await linked_devices(server, 1)
    leads = await make_leads(server, 5, [device])
    campaign = await server.ok(
        "POST", "/api/campaigns", json={"title": "Later", "message": "Hi {name}", "niche": "property"}
    )
    history = f"/api/devices/{device['id']}/chats"

    async def sent_and_stored() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        chats = (await server.ok("GET", history))["items"]
        return report["done_send"] == 5 and len(chats) == 5

    await eventually(sent_and_stored, timeout=30)
    engine = server.runtime.engine
    assert engine is not None and server.runtime.dispatcher is not None
    jid = f"{leads[0]['phone'].lstrip('+')}@s.whatsapp.net"
    async with engine.begin() as conn:
        await conn.execute(delete(messages).where(messages.c.chat_jid == jid))
    chat = f"{history}/{jid}/messages"
    assert (await server.ok("GET", chat))["items"] == []

    server.runtime.dispatcher.stop(uuid.UUID(device["id"]))
    server.runtime.dispatcher.start(uuid.UUID(device["id"]))

    async def restored() -> bool:
        return len((await server.ok("GET", chat))["items"]) == 1

    await eventually(restored, timeout=10)
    [message] = (await server.ok("GET", chat))["items"]
    assert message["from_me"] and message["text"] == f"Hi {leads[0]['name']}"
    network = server.runtime.sim_network
    assert network is not None and len(network.inbox(leads[0]["phone"].lstrip("+"))) == 1  # not sent again


class PausedWhileBatchReads:
    """Around the dispatcher's locked batches: the first one finds its device's queue paused (paused just before it
    reads the device) and the queue is resumed, waking the lane, after the batch ended and before the lane looks
    again: the moment a user's resume can fall into."""

    def __init__(self, inner: Any, server: Server) -> None:
        self.inner = inner
        self.server = server
        self.batches = 0
        self.first_rows = 0  # what the first batch found due (and did not send: the queue was paused)

    @contextlib.asynccontextmanager
    async def batch(self, device_id: uuid.UUID, now: Any, limit: int) -> AsyncIterator[Any]:
        self.batches += 1
        first = self.batches == 1
        repo = self.server.runtime.device_repo
        assert repo is not None
        if first:
            await QueueControl(repo, SystemClock()).pause(device_id, "user", "by a test")
        async with self.inner.batch(device_id, now, limit) as locked:
            if first:
                self.first_rows = len(locked.items)
            yield locked
        if first:
            await self.server.ok("POST", f"/api/queue/{device_id}/resume")


async def test_a_resume_right_after_a_batch_found_the_queue_paused_is_not_lost(
    make_server: ServerFactory, pg_url: str
) -> None:
    # The lane goes by what its locked batch read (paused) without reading the device again; the resume that came
    # meanwhile must still wake it (else the messages wait for the lane's idle poll, a minute).
    truncate_all(pg_url)
    server = await make_server(pg_url)
    [device] = await linked_devices(server, 1)
    leads = await make_leads(server, 3, [device])
    dispatcher = server.runtime.dispatcher
    assert dispatcher is not None and dispatcher.locked is not None
    assert dispatcher.settings.idle_poll_s >= 60
    probe = dispatcher.locked = PausedWhileBatchReads(dispatcher.locked, server)
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "Resumed", "message": "Hi {name}"})

    async def done() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return report["done_send"] == 3

    await eventually(done, timeout=15)
    assert probe.first_rows == 3 and probe.batches >= 2  # the first found the messages, paused: sent nothing
    for lead in leads:
        assert len((await server.sim("GET", f"/inbox/{lead['phone']}"))["items"]) == 1


async def test_a_lane_held_by_quiet_hours_sends_once_they_are_lifted_and_it_is_woken(
    make_server: ServerFactory, pg_url: str
) -> None:
    # Quiet hours around the present hold an unpaced device's message; the user lifts them and wakes the lane (a
    # queue resume): the lane must look at the device again instead of waiting by the quiet hours it knew.
    truncate_all(pg_url)
    server = await make_server(pg_url, WAMD_TIMEZONE="UTC")
    [device] = await linked_devices(server, 1)
    [lead] = await make_leads(server, 1, [device])
    now = datetime.now(UTC)
    quiet = {"quiet_start": f"{(now.hour - 1) % 24:02d}:00", "quiet_end": f"{(now.hour + 2) % 24:02d}:00"}
    await server.ok("PATCH", f"/api/devices/{device['id']}", json=quiet)
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "Quiet", "message": "Hi {name}"})

    async def queued() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return report["should_send"] == 1

    await eventually(queued)
    assert (await server.sim("GET", f"/inbox/{lead['phone']}"))["items"] == []  # held by the quiet hours

    async def held() -> bool:  # back in the queue (a lane claims it for a moment before it finds it held)
        return bool((await server.ok("GET", "/api/queue"))["items"][0]["queued"] == 1)

    await eventually(held)
    [row] = (await server.ok("GET", "/api/queue"))["items"]
    quiet_end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
    assert datetime.fromisoformat(row["next_send_at"]) == quiet_end  # not "now"
    await server.ok("PATCH", f"/api/devices/{device['id']}", json={"quiet_start": "", "quiet_end": ""})
    await server.ok("POST", f"/api/queue/{device['id']}/resume")

    async def delivered() -> bool:
        return len((await server.sim("GET", f"/inbox/{lead['phone']}"))["items"]) == 1

    await eventually(delivered, timeout=15)


async def test_the_queue_shows_when_caps_let_the_next_message_go_and_nothing_while_it_waits_for_a_resume(
    server: Server,
) -> None:
    [device] = await linked_devices(server, 1)
    await server.ok("PATCH", f"/api/devices/{device['id']}", json={"hourly_cap": 1})
    leads = await make_leads(server, 2, [device])
    before = datetime.now(UTC)
    campaign = await server.ok("POST", "/api/campaigns", json={"title": "Capped", "message": "Hi {name}"})

    async def one_sent() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return (report["should_send"], report["done_send"]) == (2, 1)

    await eventually(one_sent)
    after = datetime.now(UTC)

    async def held_row() -> dict[str, Any]:
        """The device's queue once the second message is back in it: a lane that looks at it again (when woken)
        claims it for a moment (`sending` on SQLite) before it finds it held."""
        rows: list[dict[str, Any]] = []

        async def back() -> bool:
            rows[:] = (await server.ok("GET", "/api/queue"))["items"]
            return bool(rows[0]["queued"] == 1)

        await eventually(back)
        return rows[0]

    row = await held_row()
    assert (row["sent_last_hour"], row["hourly_cap"]) == (1, 1)
    # The hourly cap lets the next go an hour after the first, not when it was due.
    next_send = datetime.fromisoformat(row["next_send_at"])
    assert before + timedelta(hours=1) < next_send <= after + timedelta(hours=1, seconds=1)
    inboxes = [(await server.sim("GET", f"/inbox/{lead['phone']}"))["items"] for lead in leads]
    assert sorted(len(items) for items in inboxes) == [0, 1]

    # A daily cap of one: not before the next local midnight (nor within the hour of the first send).
    await server.ok("PATCH", f"/api/devices/{device['id']}", json={"daily_cap": 1})
    tz = server.runtime.config.timezone
    midnight = datetime.combine(datetime.now(tz).date() + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    next_send = datetime.fromisoformat((await held_row())["next_send_at"])
    assert (
        max(midnight, before + timedelta(hours=1)) <= next_send <= max(midnight, after + timedelta(hours=1, seconds=1))
    )

    # While the device's queue or the campaign is paused, the message waits for a resume: no time is shown.
    await server.ok("POST", f"/api/queue/{device['id']}/pause")
    assert (await held_row())["next_send_at"] is None
    await server.ok("POST", f"/api/queue/{device['id']}/resume")
    assert (await held_row())["next_send_at"] is not None
    await server.ok("POST", f"/api/campaigns/{campaign['id']}/pause")
    assert (await held_row())["next_send_at"] is None
