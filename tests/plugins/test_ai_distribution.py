"""The AI lead distribution plugin (`plugins/wamd_ai_distribution`): the Thompson-sampling allocation on its own,
then a campaign end to end on the in-process simulator, with devices whose records differ."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from wamd_ai_distribution.bandit import Arm, History, allocate, expected_score
from wamd_ai_distribution.plugin import (
    PLUGIN,
    Settings,
    opted_in,
    settings_from,
    skip_reason,
    wamd_distribute_leads,
)

from tests.conftest import Server, ServerFactory, eventually
from tests.server.test_campaigns import linked_devices
from wamd_server.domain.models import Campaign, CampaignStatus, Device, DeviceStatus, Lead
from wamd_server.services.clock import AcceleratedClock

GOOD = History(sent=200, failed=2, replied=30)
BAD = History(sent=60, failed=60, replied=1)
NEW = History()


def lead_ids(count: int) -> list[uuid.UUID]:
    return [uuid.UUID(int=n + 1) for n in range(count)]


def shares(arms: list[Arm], leads: int, seed: int, reply_weight: float = 1.0) -> dict[uuid.UUID, int]:
    allocation = allocate(lead_ids(leads), arms, random.Random(seed), reply_weight)
    return {device_id: outcome.assigned for device_id, outcome in allocation.outcomes.items()}


# --- the allocation ------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_allocation() -> None:
    arms = [Arm(uuid.uuid4(), GOOD), Arm(uuid.uuid4(), BAD), Arm(uuid.uuid4(), NEW)]
    leads = lead_ids(300)
    first = allocate(leads, arms, random.Random("campaign-1"))
    again = allocate(leads, arms, random.Random("campaign-1"))
    other = allocate(leads, arms, random.Random("campaign-2"))
    assert first.assignment == again.assignment
    assert first.assignment != other.assignment
    assert set(first.assignment) == set(leads)


def test_the_per_device_limit_holds_and_what_does_not_fit_stays_unassigned() -> None:
    good, bad, new = Arm(uuid.uuid4(), GOOD, 10), Arm(uuid.uuid4(), BAD, 25), Arm(uuid.uuid4(), NEW, 5)
    for seed in range(20):
        allocation = allocate(lead_ids(100), [good, bad, new], random.Random(seed))
        got = {d: o.assigned for d, o in allocation.outcomes.items()}
        assert got == {good.device_id: 10, bad.device_id: 25, new.device_id: 5}  # 40 places for 100 leads
        assert len(allocation.unassigned) == 60
        assert set(allocation.assignment) | set(allocation.unassigned) == set(lead_ids(100))
        # the good device wins far more draws than it can take: the rest is turned away to the others
        assert allocation.outcomes[good.device_id].turned_away > 0

    roomy = [Arm(good.device_id, GOOD, 30), Arm(bad.device_id, BAD, 30), Arm(new.device_id, NEW, None)]
    allocation = allocate(lead_ids(100), roomy, random.Random(7))
    assert not allocation.unassigned
    assert allocation.outcomes[good.device_id].assigned == 30  # full
    assert allocation.outcomes[bad.device_id].assigned <= 30


def test_a_bad_delivery_record_gets_fewer_leads_than_a_good_one() -> None:
    good, bad = uuid.uuid4(), uuid.uuid4()
    totals = {good: 0, bad: 0}
    for seed in range(50):
        got = shares([Arm(good, GOOD), Arm(bad, BAD)], 40, seed)
        totals[good] += got[good]
        totals[bad] += got[bad]
    assert totals[good] + totals[bad] == 50 * 40
    assert totals[bad] < 0.05 * totals[good]
    assert expected_score(BAD, 1.0) < expected_score(GOOD, 1.0)


def test_replies_count_when_deliveries_are_alike() -> None:
    answered, ignored = uuid.uuid4(), uuid.uuid4()
    answered_history = History(sent=100, failed=0, replied=40)
    ignored_history = History(sent=100, failed=0, replied=0)
    got = shares([Arm(answered, answered_history), Arm(ignored, ignored_history)], 500, seed=3)
    assert got[answered] > 0.9 * 500
    # with replies weighed at 0 the two are alike and share the leads
    even = shares([Arm(answered, answered_history), Arm(ignored, ignored_history)], 500, seed=3, reply_weight=0.0)
    assert 150 < even[answered] < 350


def test_new_devices_are_explored() -> None:
    good, new = uuid.uuid4(), uuid.uuid4()
    for seed in range(20):
        got = shares([Arm(good, GOOD), Arm(uuid.uuid4(), GOOD), Arm(new, NEW)], 200, seed)
        assert 0 < got[new] < 100  # some leads, not most


# --- devices and options ---------------------------------------------------------------------------------------


def device(status: DeviceStatus, **fields: Any) -> Device:
    return Device(id=uuid.uuid4(), name=status.value, status=status, created_at=datetime.now(UTC), **fields)


def test_only_online_devices_with_a_running_queue_take_leads() -> None:
    assert skip_reason(device(DeviceStatus.ONLINE)) is None
    banned = device(DeviceStatus.BANNED, status_reason="banned until 12:00")
    assert skip_reason(banned) == "banned (banned until 12:00)"
    assert skip_reason(device(DeviceStatus.LOGGED_OUT)) == "logged out"
    paused = device(DeviceStatus.ONLINE, queue_paused_reason="paused by a user")
    assert skip_reason(paused) == "send queue paused (paused by a user)"
    assert skip_reason(device(DeviceStatus.OFFLINE)) == "not online (offline)"
    assert skip_reason(device(DeviceStatus.CONNECTING)) == "not online (connecting)"
    assert skip_reason(device(DeviceStatus.UNPAIRED)) == "not linked to a phone"


def test_options() -> None:
    assert opted_in({"distribution": "ai"})
    assert not opted_in({}) and not opted_in({"distribution": "round_robin"})
    assert settings_from({"distribution": "ai"}) == Settings()
    chosen = settings_from({"per_device_limit": 50, "history_days": 3.5, "reply_weight": 0})
    assert (chosen.per_device_limit, chosen.history_days, chosen.reply_weight, chosen.notes) == (50, 3.5, 0.0, ())
    bad = settings_from({"per_device_limit": 2.5, "history_days": -1, "reply_weight": "lots"})
    assert (bad.per_device_limit, bad.history_days, bad.reply_weight) == (None, 14.0, 1.0)
    assert len(bad.notes) == 3 and "per_device_limit=2.5" in bad.notes[0]
    assert settings_from({"per_device_limit": True}).per_device_limit is None
    assert settings_from({"history_days": 10_000}).history_days == 14.0


# --- the hook's pages -------------------------------------------------------------------------------------------


@dataclass
class Planning:
    """The part of the planner's context the plugin reads and writes (`DistributionContext`), kept in memory."""

    everyone: list[Device]
    rescue: bool = False
    report: dict[str, Any] | None = None
    saves: int = 0

    async def devices(self) -> list[Device]:
        return self.everyone

    async def device_history(self, days: float, device_ids: Any = None) -> dict[uuid.UUID, dict[str, int]]:
        return {}

    async def distribution_report(self, plugin: str) -> dict[str, Any] | None:
        return self.report

    async def save_distribution_report(self, plugin: str, report: dict[str, Any]) -> None:
        self.report, self.saves = report, self.saves + 1


async def test_pages_planned_again_replace_their_record_and_moves_keep_their_own() -> None:
    owner = uuid.uuid4()
    campaign = Campaign(
        id=uuid.uuid4(), user_id=owner, type="broadcast", title="t", message="m", scheduled_at=datetime.now(UTC),
        status=CampaignStatus.RUNNING, options={"distribution": "ai", "per_device_limit": 3},
    )  # fmt: skip
    sender = device(DeviceStatus.ONLINE)
    leads = [Lead(id=lead_id, user_id=owner, phone=f"6019{n:07d}") for n, lead_id in enumerate(lead_ids(3))]
    planning = Planning([sender])
    first = await wamd_distribute_leads(campaign, leads, [sender], planning)
    # The same page again (a restart during the launch): its earlier record does not count against the limit.
    again = await wamd_distribute_leads(campaign, leads, [sender], planning)
    assert first == again == {lead.id: sender.id for lead in leads}
    assert planning.report is not None and planning.report["leads"]["total"] == 3

    planning.rescue = True
    saves = planning.saves
    assert await wamd_distribute_leads(campaign, leads[:1], [sender], planning) == {}  # the device is full
    assert planning.saves == saves  # nothing written while no device has room
    roomy = device(DeviceStatus.ONLINE)
    planning.everyone.append(roomy)
    for _ in range(2):  # the same lead moved twice: each move keeps a page, both count against the limit
        assert await wamd_distribute_leads(campaign, leads[:1], [sender, roomy], planning) == {leads[0].id: roomy.id}
    report = planning.report
    assert report["leads"] == {"total": 3, "assigned": 3, "unassigned": 0, "round_robin": 0, "moved": 2}
    assert {d["device_id"]: d["assigned"] for d in report["devices"]} == {str(sender.id): 3, str(roomy.id): 2}


# --- end to end ---------------------------------------------------------------------------------------------------


async def wait_done(server: Server, campaign_id: str, should: int, timeout: float = 60) -> dict[str, Any]:
    async def done() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign_id}/report")
        return bool(report["should_send"] == should and report["remaining_send"] == 0)

    await eventually(done, timeout=timeout, what=f"campaign {campaign_id} sent")
    report: dict[str, Any] = await server.ok("GET", f"/api/campaigns/{campaign_id}/report")
    return report


async def add_lead(server: Server, phone: str, niche: str, device_id: str | None) -> dict[str, Any]:
    body = {"name": f"Lead {phone[-3:]}", "phone": phone, "niche": niche, "device_id": device_id}
    lead: dict[str, Any] = await server.ok("POST", "/api/leads", json=body)
    return lead


async def test_a_campaign_spreads_unowned_leads_by_record_and_explains_it(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url)
    good, bad, new, paused, banned = await linked_devices(server, 5, first_phone=60123300000)
    network = server.runtime.sim_network
    assert network is not None

    # History: a plain broadcast from `good` (6 leads, 3 of whom reply) and `bad` (4 of 5 not on WhatsApp).
    good_leads = [await add_lead(server, f"6019100{n:04d}", "history", good["id"]) for n in range(6)]
    bad_leads = [await add_lead(server, f"6019200{n:04d}", "history", bad["id"]) for n in range(5)]
    for lead in bad_leads[1:]:
        await server.sim("POST", "/faults", {"phone": lead["phone"], "not_on_whatsapp": True})
    history = await server.ok("POST", "/api/campaigns", json={"title": "Before", "message": "Hi", "niche": "history"})
    before = await wait_done(server, history["id"], 11)
    assert (before["done_send"], before["failed_send"]) == (7, 4)
    for lead in good_leads[:3]:
        await network.contact_send(lead["phone"], good["phone"], "Yes, tell me more")

    async def replies_stored() -> bool:
        for lead in good_leads[:3]:
            page = await server.ok("GET", f"/api/devices/{good['id']}/chats/{lead['phone']}@s.whatsapp.net/messages")
            if not any(not m["from_me"] for m in page["items"]):
                return False
        return True

    await eventually(replies_stored, what="the replies are stored")

    # One device paused by its user, one banned: neither may take a lead.
    await server.ok("POST", f"/api/queue/{paused['id']}/pause")
    ws = await server.ws()
    await server.sim("POST", "/faults", {"phone": banned["phone"], "ban_seconds": 600})
    await ws.wait_event("device.status", banned["id"], lambda e: e["status"] == "banned")

    leads = [await add_lead(server, f"6019300{n:04d}", "ai", None) for n in range(24)]
    campaign = await server.ok(
        "POST",
        "/api/campaigns",
        json={
            "title": "AI spread",
            "message": "Hi {name}",
            "niche": "ai",
            "options": {"distribution": "ai", "per_device_limit": 12},
        },
    )
    sent = await wait_done(server, campaign["id"], 24)
    assert (sent["done_send"], sent["failed_send"]) == (24, 0)
    for lead in leads:  # every lead exactly one message
        assert len((await server.sim("GET", f"/inbox/{lead['phone']}"))["items"]) == 1, lead
    per_device = {d["device_id"]: d["should_send"] for d in sent["devices"]}
    assert set(per_device) <= {good["id"], bad["id"], new["id"]}
    assert all(n <= 12 for n in per_device.values())

    path = f"/api/plugins/ai-distribution/campaigns/{campaign['id']}/report"
    report = await server.ok("GET", path)
    assert report["plugin"] == PLUGIN and report["campaign_id"] == campaign["id"]
    assert report["leads"] == {"total": 24, "assigned": 24, "unassigned": 0, "round_robin": 0, "moved": 0}
    assert report["settings"]["per_device_limit"] == 12 and report["settings"]["limit_source"] == "option"
    assert report["summary"].startswith("24 leads without an owner device: 24 assigned over 3 online devices")
    by_id = {d["device_id"]: d for d in report["devices"]}
    assert set(by_id) == {good["id"], bad["id"], new["id"], paused["id"], banned["id"]}
    for device_id, entry in by_id.items():
        assert entry["assigned"] == per_device.get(device_id, 0)
        assert entry["explanation"]

    g, b, n = by_id[good["id"]], by_id[bad["id"]], by_id[new["id"]]
    assert g["history"] == {"sent": 6, "failed": 0, "replied": 3}
    assert b["history"] == {"sent": 1, "failed": 4, "replied": 0}
    assert n["history"] == {"sent": 0, "failed": 0, "replied": 0}
    assert g["posterior"] == {"delivery": [7.0, 1.0], "reply": [4.0, 4.0]}
    assert g["expected_score"] > n["expected_score"] > b["expected_score"]
    assert g["assigned"] == 12 and g["limit_reached"] is True and g["limit"] == 12
    assert "limit of 12 is reached" in g["explanation"] and "3 replied" in g["explanation"]
    assert b["assigned"] < g["assigned"]
    assert n["assigned"] > 0 and "uninformative prior" in n["explanation"]
    for entry in (g, b, n):
        assert 0 <= entry["sampled_mean"] <= 1
        # a device's leads: those it drew highest for and could take, plus those whose best device was full
        overflow = entry["assigned"] - (entry["top_draws"] - entry["turned_away"])
        assert overflow >= 0
        assert ("best device still under its limit" in entry["explanation"]) == (overflow > 0)
    assert sum(e["top_draws"] for e in (g, b, n)) == 24  # every lead turned away by one device went to another
    assert by_id[paused["id"]]["eligible"] is False
    assert by_id[paused["id"]]["skipped_reason"] == "send queue paused (paused by a user)"
    assert by_id[banned["id"]]["skipped_reason"].startswith("banned")
    assert by_id[banned["id"]]["explanation"].startswith("skipped: banned")

    # Only the campaign's owner and admins see it; a campaign without the option has no report.
    _, staff_token = await server.create_user("ai-staff@example.com")
    hidden = await server.call("GET", path, staff_token)
    assert hidden.status == 404 and hidden.body["error"]["code"] == "not_found"
    assert (await server.call("GET", path)).status == 401
    for other in (str(uuid.uuid4()), "not-a-uuid", history["id"]):
        missing = await server.call("GET", f"/api/plugins/ai-distribution/campaigns/{other}/report", server.admin_token)
        assert missing.status == 404, other
    paths = (await server.ok("GET", "/api/openapi.json"))["paths"]
    assert "get" in paths["/api/plugins/ai-distribution/campaigns/{id}/report"]

    # The report is stored with the campaign: another server on the same database serves it.
    other_server = await make_server(database_url)
    assert await other_server.ok("GET", path) == report


async def test_messages_moved_off_a_device_that_cannot_send_stay_within_the_limits(
    make_server: ServerFactory, database_url: str
) -> None:
    """The planner's rescue moves messages of owner-less leads off a device that has not been able to send for
    five minutes; with AI distribution the moves go through the plugin, so its per-device limit still holds."""
    server = await make_server(database_url, clock=AcceleratedClock(300))  # five minutes pass in a second
    slow, fast, spare = await linked_devices(server, 3, first_phone=60123400000)
    # The slow device sends one message, then waits an hour (twelve seconds here, the longest delay there is)
    # before the next; the spare takes no part yet.
    await server.ok("PATCH", f"/api/devices/{slow['id']}", json={"min_delay_s": 3600, "max_delay_s": 3600})
    await server.ok("POST", f"/api/queue/{spare['id']}/pause")
    for n in range(10):
        await add_lead(server, f"6019400{n:04d}", "moving", None)
    options = {"distribution": "ai", "per_device_limit": 5}  # 10 leads, 2 devices: 5 each
    body = {"title": "Moving", "message": "Hi {name}", "niche": "moving", "options": options}
    campaign = await server.ok("POST", "/api/campaigns", json=body)
    report_path = f"/api/campaigns/{campaign['id']}/report"
    ai_path = f"/api/plugins/ai-distribution/campaigns/{campaign['id']}/report"

    async def per_device() -> dict[str, tuple[int, int]]:
        report = await server.ok("GET", report_path)
        return {d["device_id"]: (d["should_send"], d["done_send"]) for d in report["devices"]}

    await wait_sent(server, report_path, slow["id"], 1)
    await server.sim("POST", "/faults", {"phone": slow["phone"], "ban_seconds": 86_400})

    await wait_sent(server, report_path, fast["id"], 5)
    # The fast device is at its limit: the banned device's four messages stay where they are (had the planner
    # moved any to it, the fast device would hold more than 5 below).
    assert await per_device() == {slow["id"]: (5, 1), fast["id"]: (5, 5)}

    await server.ok("POST", f"/api/queue/{spare['id']}/resume")
    await wait_sent(server, report_path, spare["id"], 4)
    assert await per_device() == {slow["id"]: (1, 1), fast["id"]: (5, 5), spare["id"]: (4, 4)}
    ai = await server.ok("GET", ai_path)
    assert ai["leads"] == {"total": 10, "assigned": 10, "unassigned": 0, "round_robin": 0, "moved": 4}
    assert "4 moved at send time" in ai["summary"]
    network = server.runtime.sim_network
    assert network is not None
    assert all(len(network.inbox(f"6019400{n:04d}")) == 1 for n in range(10))


async def wait_sent(server: Server, report_path: str, device_id: str, done: int) -> None:
    async def sent() -> bool:
        per_device = {d["device_id"]: d for d in (await server.ok("GET", report_path))["devices"]}
        return per_device.get(device_id, {}).get("done_send") == done

    await eventually(sent, timeout=20, what=f"{done} messages sent from {device_id}")


@pytest.mark.parametrize("options", [{}, {"distribution": "round_robin"}])
async def test_without_the_option_the_default_round_robin_applies(server: Server, options: dict[str, Any]) -> None:
    devices = await linked_devices(server, 2, first_phone=60123400000)
    for n in range(4):
        await add_lead(server, f"6019400{n:04d}", "plain", None)
    campaign = await server.ok(
        "POST", "/api/campaigns", json={"title": "Plain", "message": "Hi", "niche": "plain", "options": options}
    )
    sent = await wait_done(server, campaign["id"], 4)
    assert sorted(d["should_send"] for d in sent["devices"]) == [2, 2]
    assert {d["device_id"] for d in sent["devices"]} == {d["id"] for d in devices}
    path = f"/api/plugins/ai-distribution/campaigns/{campaign['id']}/report"
    assert (await server.call("GET", path, server.admin_token)).status == 404
