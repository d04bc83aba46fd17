"""Leads over the API: E.164 phones, validation naming the field, one lead per owner and phone, who sees which
leads, filters and pagination, CSV export (and the import of what was exported), the opt-out path."""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

import aiohttp

from tests.conftest import Reply, Server
from wamd_server.web.context import CTX


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply.body
    error: dict[str, Any] = reply.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


def field_of(error: dict[str, Any]) -> str | None:
    """The field an error names: `details.field` (server checks) or the first pydantic problem."""
    details = error.get("details")
    if isinstance(details, dict):
        return details.get("field")
    if isinstance(details, list) and details:
        return str(details[0]["field"])
    return None


async def create(server: Server, token: str | None = None, **body: Any) -> dict[str, Any]:
    lead: dict[str, Any] = await server.ok("POST", "/api/leads", token, json=body)
    return lead


async def all_leads(
    server: Server, token: str | None = None, query: str = "", limit: int = 1000
) -> list[dict[str, Any]]:
    """Every lead of a list, walking the pages; each lead must come once."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        sep = "&" if query else ""
        path = f"/api/leads?{query}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        body = await server.ok("GET", path, token)
        assert len(body["items"]) <= limit
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    ids = [lead["id"] for lead in items]
    assert len(ids) == len(set(ids)), "a lead came twice"
    return items


async def export(server: Server, token: str | None = None, query: str = "") -> tuple[list[dict[str, str]], Reply]:
    reply = await server.call("GET", f"/api/leads/export{'?' + query if query else ''}", token or server.admin_token)
    assert reply.status == 200, reply.body
    text = reply.body
    assert isinstance(text, str)
    return list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""))), reply


async def test_crud_with_e164_phones(server: Server) -> None:
    lead = await create(
        server,
        phone="012-345 6789",
        name="  Aisyah  ",
        niche="Skincare",
        triggers=[" welcome ", "promo", "welcome"],
        notes="met at the fair",
        fields={"city": "Kuala Lumpur"},
    )
    assert lead["phone"] == "60123456789"  # WAMD_PHONE_REGION defaults to MY
    assert lead["name"] == "Aisyah"
    assert lead["target_status"] == "prospect"
    assert lead["triggers"] == ["welcome", "promo"]  # trimmed, repeats dropped, in order
    assert lead["fields"] == {"city": "Kuala Lumpur"}
    assert lead["device_id"] is None and lead["opted_out_at"] is None
    assert set(lead) >= {"id", "name", "phone", "niche", "target_status", "triggers", "device_id", "notes", "fields"}
    assert set(lead) >= {"opted_out_at", "created_at", "updated_at"}

    uk = await create(server, phone="+44 20 7946 0958")
    assert uk["phone"] == "442079460958"
    assert (await create(server, phone="0060 11-2345 6789"))["phone"] == "601123456789"

    assert await server.ok("GET", f"/api/leads/{lead['id']}") == lead
    patched = await server.ok(
        "PATCH",
        f"/api/leads/{lead['id']}",
        json={"target_status": "customer", "phone": "+60 12-345 6780", "triggers": [], "opted_out": True},
    )
    assert patched["target_status"] == "customer"
    assert patched["phone"] == "60123456780"
    assert patched["triggers"] == []
    assert patched["opted_out_at"] is not None
    assert patched["name"] == "Aisyah" and patched["fields"] == {"city": "Kuala Lumpur"}  # untouched
    back = await server.ok("PATCH", f"/api/leads/{lead['id']}", json={"opted_out": False, "notes": ""})
    assert back["opted_out_at"] is None and back["notes"] == ""

    assert await server.ok("DELETE", f"/api/leads/{lead['id']}") == {"ok": True}
    assert_error(await server.call("GET", f"/api/leads/{lead['id']}", server.admin_token), 404, "not_found")
    assert_error(await server.call("DELETE", f"/api/leads/{lead['id']}", server.admin_token), 404, "not_found")


async def test_invalid_input_is_a_400_naming_the_field_and_stores_nothing(server: Server) -> None:
    admin = server.admin_token
    cases: list[tuple[dict[str, Any], str]] = [
        ({"phone": "not a number"}, "phone"),
        ({"phone": "12"}, "phone"),
        ({"phone": "   "}, "phone"),
        ({"phone": ""}, "phone"),
        ({"name": "x"}, "phone"),  # missing
        ({"phone": "0123456789", "name": "n" * 201}, "name"),
        ({"phone": "0123456789", "niche": "n" * 101}, "niche"),
        ({"phone": "0123456789", "notes": "n" * 5001}, "notes"),
        ({"phone": "0123456789", "target_status": "vip"}, "target_status"),
        ({"phone": "0123456789", "triggers": ["t" * 101]}, "triggers"),
        ({"phone": "0123456789", "triggers": [f"t{i}" for i in range(51)]}, "triggers"),
        ({"phone": "0123456789", "triggers": ["ok", "  "]}, "triggers"),
        ({"phone": "0123456789", "triggers": ["a,b"]}, "triggers"),
        ({"phone": "0123456789", "fields": {f"k{i}": "v" for i in range(51)}}, "fields"),
        ({"phone": "0123456789", "fields": {"phone": "x"}}, "fields"),
        ({"phone": "0123456789", "fields": {"": "x"}}, "fields"),
        ({"phone": "0123456789", "device_id": "not-an-id"}, "device_id"),
        ({"phone": "0123456789", "device_id": str(uuid.uuid4())}, "device_id"),
        ({"phone": "0123456789", "name": "nul\u0000"}, "name"),
        ({"phone": "0123456789", "surprise": 1}, "surprise"),
    ]
    for body, field in cases:
        error = assert_error(await server.call("POST", "/api/leads", admin, json=body), 400, "invalid_input")
        assert field_of(error) == field, (body, error)
    assert await all_leads(server) == []

    lead = await create(server, phone="0123456789")
    for body, field in [
        ({"phone": "nope"}, "phone"),
        ({"name": None}, "name"),
        ({"target_status": "vip"}, "target_status"),
        ({"device_id": str(uuid.uuid4())}, "device_id"),
    ]:
        reply = await server.call("PATCH", f"/api/leads/{lead['id']}", admin, json=body)
        error = assert_error(reply, 400, "invalid_input")
        assert field_of(error) == field, (body, error)
    assert await server.ok("GET", f"/api/leads/{lead['id']}") == lead


async def test_one_lead_per_owner_and_phone(server: Server) -> None:
    _, staff = await server.create_user("staff@example.com")
    first = await create(server, phone="012-345 6789")
    # the same number in another notation is the same lead
    error = assert_error(
        await server.call("POST", "/api/leads", server.admin_token, json={"phone": "+60 12 345 6789"}), 409, "conflict"
    )
    assert error["details"]["field"] == "phone" and error["details"]["lead_id"] == first["id"]
    # another owner may have a lead with that phone
    theirs = await create(server, staff, phone="0123456789")
    assert theirs["phone"] == first["phone"] and theirs["id"] != first["id"]
    # changing a phone to one the owner already has is a conflict too
    other = await create(server, phone="0123456780")
    reply = await server.call("PATCH", f"/api/leads/{other['id']}", server.admin_token, json={"phone": "0123456789"})
    assert_error(reply, 409, "conflict")
    assert (await server.ok("GET", f"/api/leads/{other['id']}"))["phone"] == "60123456780"


async def test_staff_see_only_their_own_leads_and_admins_see_all(server: Server) -> None:
    _, alice = await server.create_user("alice@example.com")
    _, bob = await server.create_user("bob@example.com")
    mine = await create(server, alice, phone="0123000001", name="Alice's")
    bobs = await create(server, bob, phone="0123000002", name="Bob's")
    admins = await create(server, phone="0123000003", name="Admin's")

    assert [lead["id"] for lead in await all_leads(server, alice)] == [mine["id"]]
    assert [lead["id"] for lead in await all_leads(server, bob)] == [bobs["id"]]
    assert [lead["id"] for lead in await all_leads(server)] == [mine["id"], bobs["id"], admins["id"]]
    assert (await server.ok("GET", f"/api/leads/{bobs['id']}"))["name"] == "Bob's"  # admins see every lead
    assert (await server.ok("PATCH", f"/api/leads/{bobs['id']}", json={"niche": "set by admin"}))["niche"]

    for other in (bobs, admins):
        base = f"/api/leads/{other['id']}"
        for method, body in (("GET", None), ("PATCH", {"name": "mine now"}), ("DELETE", None)):
            error = assert_error(await server.call(method, base, alice, json=body), 404, "not_found")
            assert error["message"] == "lead not found"
    for bad in ("not-an-id", str(uuid.uuid4())):
        assert_error(await server.call("GET", f"/api/leads/{bad}", alice), 404, "not_found")
    # nothing changed, and the exports follow the same rule
    assert (await server.ok("GET", f"/api/leads/{bobs['id']}"))["name"] == "Bob's"
    rows, _ = await export(server, alice)
    assert [r["phone"] for r in rows] == [mine["phone"]]
    rows, _ = await export(server)
    assert len(rows) == 3


async def test_the_owner_device_must_be_one_the_caller_may_see(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    granted = await server.create_device("Granted")
    hidden = await server.create_device("Hidden")
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [granted["id"]]})

    lead = await create(server, staff, phone="0123000001", device_id=granted["id"])
    assert lead["device_id"] == granted["id"]
    for device_id in (hidden["id"], str(uuid.uuid4())):
        reply = await server.call("POST", "/api/leads", staff, json={"phone": "0123000002", "device_id": device_id})
        error = assert_error(reply, 400, "invalid_input")
        assert error["message"] == "unknown device" and error["details"]["field"] == "device_id"
        reply = await server.call("PATCH", f"/api/leads/{lead['id']}", staff, json={"device_id": device_id})
        assert_error(reply, 400, "invalid_input")
    unassigned = await server.ok("PATCH", f"/api/leads/{lead['id']}", staff, json={"device_id": None})
    assert unassigned["device_id"] is None
    # admins may use any device
    assert (await create(server, phone="0123000003", device_id=hidden["id"]))["device_id"] == hidden["id"]
    # a deleted device leaves its leads without an owner device
    await server.ok("DELETE", f"/api/devices/{hidden['id']}")
    assert (await all_leads(server, query=f"device_id={hidden['id']}")) == []


async def test_filters_and_pagination(server: Server) -> None:
    device = await server.create_device("Sender")
    made = []
    for i in range(23):
        made.append(
            await create(
                server,
                phone=f"0123{i:06d}",
                name=f"Lead {i} {'Siti' if i % 5 == 0 else 'Tan'}",
                niche="Skincare" if i % 2 else "Property",
                target_status="customer" if i % 3 == 0 else "prospect",
                triggers=["welcome", f"t{i % 4}"] if i % 4 else [],
                device_id=device["id"] if i < 6 else None,
            )
        )
    await server.ok("PATCH", f"/api/leads/{made[7]['id']}", json={"opted_out": True})
    ids = [lead["id"] for lead in made]

    for limit in (1, 4, 7, 23, 100):
        assert [lead["id"] for lead in await all_leads(server, limit=limit)] == ids  # every lead once, in order

    async def listed(query: str) -> list[str]:
        return [lead["id"] for lead in await all_leads(server, query=query, limit=5)]

    assert await listed("niche=skincare") == [m["id"] for i, m in enumerate(made) if i % 2]
    assert await listed("target_status=customer") == [m["id"] for i, m in enumerate(made) if i % 3 == 0]
    assert await listed("trigger=welcome") == [m["id"] for i, m in enumerate(made) if i % 4]
    assert await listed("trigger=t3") == [m["id"] for i, m in enumerate(made) if i % 4 == 3]
    assert await listed("trigger=t") == []  # a whole trigger, not a part of one
    assert await listed(f"device_id={device['id']}") == ids[:6]
    assert await listed("search=siti") == [m["id"] for i, m in enumerate(made) if i % 5 == 0]
    assert await listed("search=0123000012") == [made[12]["id"]]
    assert await listed("search=100%25") == []  # % is a character, not a wildcard
    assert await listed("opted_out=true") == [made[7]["id"]]
    assert len(await listed("opted_out=false")) == 22
    assert await listed("niche=Property&target_status=customer&trigger=welcome") == [
        m["id"] for i, m in enumerate(made) if i % 2 == 0 and i % 3 == 0 and i % 4
    ]
    for query, field in [
        ("target_status=vip", "target_status"),
        ("device_id=nope", "device_id"),
        ("opted_out=maybe", "opted_out"),
        ("limit=0", "limit"),
        ("cursor=garbage", "cursor"),
    ]:
        error = assert_error(await server.call("GET", f"/api/leads?{query}", server.admin_token), 400, "invalid_input")
        assert field_of(error) == field
        if field not in ("limit", "cursor"):  # the export has no pages
            reply = await server.call("GET", f"/api/leads/export?{query}", server.admin_token)
            assert_error(reply, 400, "invalid_input")


async def test_export_is_csv_and_imports_back_the_same(server: Server) -> None:
    _, staff = await server.create_user("staff@example.com")
    device = await server.create_device("Sender")
    await create(
        server,
        phone="0123000001",
        name='Nur "Ain", the first',
        niche="Skincare",
        target_status="customer",
        triggers=["welcome", "promo"],
        notes="line one\nline two, with a comma",
        fields={"city": "Kuala Lumpur", "source": "fair"},
        device_id=device["id"],
    )
    await create(server, phone="+44 20 7946 0958", name="Émile", fields={"referrer": "Siti"})
    await create(server, phone="0123000003")
    opted = await create(server, phone="0123000004", name="Gone")
    await server.ok("PATCH", f"/api/leads/{opted['id']}", json={"opted_out": True})

    rows, reply = await export(server)
    assert reply.headers["Content-Type"].startswith("text/csv")
    assert 'attachment; filename="leads-' in reply.headers["Content-Disposition"]
    assert list(rows[0]) == [
        "name",
        "phone",
        "niche",
        "target_status",
        "triggers",
        "device_id",
        "notes",
        "opted_out_at",
        "city",
        "referrer",
        "source",
    ]
    assert rows[0]["name"] == 'Nur "Ain", the first' and rows[0]["notes"] == "line one\nline two, with a comma"
    assert rows[0]["triggers"] == "welcome,promo" and rows[0]["device_id"] == device["id"]
    assert rows[1]["phone"] == "442079460958" and rows[1]["referrer"] == "Siti" and rows[1]["city"] == ""
    assert rows[3]["opted_out_at"] != "" and rows[2]["opted_out_at"] == ""
    filtered, _ = await export(server, query="niche=skincare")
    assert [r["phone"] for r in filtered] == ["60123000001"]

    # the export imports back into another account as the same leads (the device is not theirs: map it away)
    form = aiohttp.FormData()
    form.add_field("mapping", '{"device_id": null}')
    form.add_field("file", reply.body.encode(), filename="leads.csv", content_type="text/csv")
    result = await server.ok("POST", "/api/leads/import", staff, data=form)
    assert (result["created"], result["updated"], result["failed"]) == (4, 0, [])

    def comparable(lead: dict[str, Any]) -> tuple[Any, ...]:
        return (
            lead["name"],
            lead["phone"],
            lead["niche"],
            lead["target_status"],
            lead["triggers"],
            lead["notes"],
            lead["fields"],
            lead["opted_out_at"],
        )

    admins = [comparable(lead) for lead in await all_leads(server) if lead["phone"]]
    theirs = await all_leads(server, staff)
    originals = [lead for lead in await all_leads(server) if lead not in theirs]
    assert sorted(comparable(lead) for lead in theirs) == sorted(comparable(lead) for lead in originals)
    assert len(admins) == 8  # the admin sees both copies


async def test_opt_out_marks_every_lead_with_the_phone(server: Server) -> None:
    _, staff = await server.create_user("staff@example.com")
    a = await create(server, phone="0123000001")
    b = await create(server, staff, phone="+60 12-300 0001")
    c = await create(server, phone="0123000002")
    assert server.runtime.app is not None
    service = server.runtime.app[CTX].leads

    marked = await service.opt_out("60123000001")
    assert sorted(map(str, marked)) == sorted([a["id"], b["id"]])
    assert await service.opt_out("60123000001") == []  # already opted out: the first time stays
    assert (await server.ok("GET", f"/api/leads/{a['id']}"))["opted_out_at"] is not None
    assert (await server.ok("GET", f"/api/leads/{c['id']}"))["opted_out_at"] is None
    assert [lead["id"] for lead in await all_leads(server, query="opted_out=false")] == [c["id"]]
