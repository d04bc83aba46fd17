"""CSV import: every bad row reported with its number and nothing of it stored, the good rows upserted by phone;
headers recognised, options, progress events to the importer only, bad uploads as clear 4xx, and a
100,000-row file in one request with bounded memory."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import EVENT_TIMEOUT, Server, ServerFactory
from tests.server.test_leads import all_leads, assert_error, create
from wamd_server.domain.leads import LeadQuery
from wamd_server.infra.db.leads import SqlLeadRepository


def form(file: Any, filename: str = "leads.csv", **options: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in options.items():  # options first: the file is read as it arrives
        data.add_field(name, value)
    data.add_field("file", file, filename=filename, content_type="text/csv")
    return data


async def upload(server: Server, content: Any, token: str | None = None, **options: str) -> dict[str, Any]:
    result: dict[str, Any] = await server.ok("POST", "/api/leads/import", token, data=form(content, **options))
    assert result["failed_count"] == len(result["failed"])
    return result


def by_phone(leads: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {lead["phone"]: lead for lead in leads}


async def test_bad_rows_are_reported_and_the_good_rows_imported(server: Server) -> None:
    unknown_device = str(uuid.uuid4())
    lines = [
        b"name,phone,niche,target_status,trigger,device_id,notes,city",
        b"Good One,012-300 0001,Skincare,Customer,welcome;promo,,first \xe2\x9c\x93,KL",  # 1: UTF-8 beyond ASCII
        b"Missing Phone,,Skincare,prospect,,,,",  # 2
        b"Short Phone,12,Skincare,prospect,,,,",  # 3
        b"Text Phone,call me maybe,Skincare,prospect,,,,",  # 4
        b"Bad Status,0123000005,Skincare,vip,,,,",  # 5
        b"N" * 201 + b",0123000006,Skincare,prospect,,,,",  # 6
        b"Long Trigger,0123000007,Skincare,prospect,ok;" + b"t" * 101 + b",,,",  # 7
        b"Unknown Device,0123000008,Skincare,prospect,,%s,," % unknown_device.encode(),  # 8
        b"Too Many,0123000009,Skincare,prospect,,,,KL,surprise",  # 9
        b"Too Few,0123000010,Skincare",  # 10
        b"Nul,0123000011,Skin\x00care,prospect,,,,",  # 11
        b"Latin-1,0123000012,Caf\xe9,prospect,,,,",  # 12: not UTF-8, in a file that is
        b'Blank Phone,"   ",Skincare,prospect,,,,',  # 13
        b"",  # 14: blank, skipped
        b'"Good, Two",+44 20 7946 0958,Property,,"a, b",,"two\r\nlines",Penang',  # 15
        b"Not An Id,0123000016,Skincare,prospect,,device-7,,",  # 16
        b"Bad Time,0123000017,Skincare,prospect,,,,",  # 17 (good: opted_out_at is not a column here)
        b",0123000018,,,,,,",  # 18: only a phone
        b"Good Three,0123000019,Skincare,prospect,,,,,",  # 19: an empty extra cell is fine
    ]
    result = await upload(server, b"\r\n".join(lines) + b"\r\n")
    failed = {f["row"]: f for f in result["failed"]}
    expected_fields = {
        2: "phone",
        3: "phone",
        4: "phone",
        5: "target_status",
        6: "name",
        7: "triggers",
        8: "device_id",
        9: None,
        10: None,
        11: None,
        12: None,
        13: "phone",
        16: "device_id",
    }
    assert sorted(failed) == sorted(expected_fields), result
    for row, field in expected_fields.items():
        assert failed[row]["field"] == field, failed[row]
        assert failed[row]["error"][0].islower() and len(failed[row]["error"]) > 15, failed[row]
    assert "missing" in failed[2]["error"] and "prospect or customer" in failed[5]["error"]
    assert "not a valid phone number" in failed[3]["error"] and "not a phone number" in failed[4]["error"]
    assert "200" in failed[6]["error"] and "100" in failed[7]["error"]
    assert "unknown device" in failed[8]["error"] and "9 values" in failed[9]["error"]
    assert "3 values" in failed[10]["error"] and "NUL" in failed[11]["error"] and "UTF-8" in failed[12]["error"]
    assert (result["created"], result["updated"], result["rows"]) == (5, 0, 18)

    leads = by_phone(await all_leads(server))
    assert sorted(leads) == ["442079460958", "60123000001", "60123000017", "60123000018", "60123000019"]
    one = leads["60123000001"]
    assert (one["name"], one["niche"], one["target_status"]) == ("Good One", "Skincare", "customer")
    assert (
        one["triggers"] == ["welcome", "promo"] and one["notes"] == "first \u2713" and one["fields"] == {"city": "KL"}
    )
    two = leads["442079460958"]
    assert two["name"] == "Good, Two" and two["triggers"] == ["a", "b"] and two["notes"] == "two\r\nlines"
    assert two["target_status"] == "prospect" and two["fields"] == {"city": "Penang"}
    assert leads["60123000018"]["name"] == "" and leads["60123000018"]["fields"] == {}


async def test_import_upserts_by_phone_and_keeps_what_a_file_leaves_empty(server: Server) -> None:
    existing = await create(
        server, phone="0123000001", name="Old", niche="Skincare", notes="keep me", fields={"city": "KL", "age": "30"}
    )
    content = (
        "phone,name,target_status,notes,age\n"
        "0123000001,,customer,,31\n"  # updates the existing lead: empty cells keep its values
        "0123000002,First,prospect,n1,\n"
        "+60 12-300 0002,Second,,n2,40\n"  # the same phone again: later values win, the target status stays
        "0123000003,Third,customer,,\n"
    )
    result = await upload(server, content.encode())
    assert (result["created"], result["updated"], result["failed"]) == (2, 2, [])

    leads = by_phone(await all_leads(server))
    updated = leads["60123000001"]
    assert updated["id"] == existing["id"]
    assert (updated["name"], updated["niche"], updated["notes"]) == ("Old", "Skincare", "keep me")
    assert updated["target_status"] == "customer"  # the import sets it (the seed's import lost it)
    assert updated["fields"] == {"city": "KL", "age": "31"}  # merged
    second = leads["60123000002"]
    assert (second["name"], second["notes"], second["target_status"]) == ("Second", "n2", "prospect")
    assert second["fields"] == {"age": "40"}
    assert leads["60123000003"]["target_status"] == "customer"

    again = await upload(server, content.encode())  # importing the same file again creates nothing
    assert (again["created"], again["updated"]) == (0, 4)
    assert len(await all_leads(server)) == 3


async def test_headers_are_recognised_in_common_spellings_and_formats(server: Server) -> None:
    content = (
        "\ufeffNama;No. Telefon;Target Sta;Trigger;Journey;Kota;\r\n"
        'Siti;012-300 0001;CUSTOMER;"welcome, vip";"said ""yes""; call back";Ipoh;\r\n'
        "\r\n"
        "Ali;012 300 0002;;vip;;;\r\n"
    ).encode()
    result = await upload(server, content)
    assert (result["created"], result["failed"], result["rows"]) == (2, [], 2)
    leads = by_phone(await all_leads(server))
    siti = leads["60123000001"]
    assert (siti["name"], siti["target_status"], siti["triggers"]) == ("Siti", "customer", ["welcome", "vip"])
    assert siti["notes"] == 'said "yes"; call back' and siti["fields"] == {"Kota": "Ipoh"}
    assert leads["60123000002"]["triggers"] == ["vip"] and leads["60123000002"]["fields"] == {}

    tabs = b"WhatsApp\tname\tstatus\n60123000003\tTab\tprospect\n"
    assert (await upload(server, tabs))["created"] == 1


async def test_a_windows_1252_file_from_excel_imports_with_its_accents(server: Server) -> None:
    """Excel on Windows saves "CSV (Comma delimited)" as Windows-1252: read as such once a row is not UTF-8,
    rows before it (plain ASCII) included; a byte Windows-1252 does not have fails its row only."""
    lines = [
        "name,phone,niche,notes".encode("cp1252"),
        "Ali,0123000001,Kedai,ok".encode("cp1252"),  # ASCII: the same in both encodings
        "José Núñez,0123000002,Café,price €25 \u2013 deposit".encode("cp1252"),
        b"Broken \x81,0123000003,Caf\xe9,",  # 0x81 is not a Windows-1252 character
        "Zoë,0123000004,Café,".encode("cp1252"),
    ]
    result = await upload(server, b"\r\n".join(lines) + b"\r\n")
    assert (result["created"], result["rows"], result["encoding"]) == (3, 4, "windows-1252"), result
    assert [(f["row"], f["field"]) for f in result["failed"]] == [(3, None)]
    assert "not Windows-1252 text" in result["failed"][0]["error"]
    leads = by_phone(await all_leads(server))
    assert leads["60123000002"]["name"] == "José Núñez" and leads["60123000002"]["niche"] == "Café"
    assert leads["60123000002"]["notes"] == "price €25 \u2013 deposit" and leads["60123000004"]["name"] == "Zoë"
    assert leads["60123000001"]["name"] == "Ali"

    # Told Windows-1252, a file is read so even where its bytes would also be UTF-8 ("é" in UTF-8 is "Ã©" there).
    forced = await upload(server, "name,phone\nAndré,0123000005\n".encode(), encoding="windows-1252")
    assert (forced["created"], forced["encoding"]) == (1, "windows-1252")
    assert by_phone(await all_leads(server))["60123000005"]["name"] == "Andr\u00c3\u00a9"
    utf8 = await upload(server, "name,phone\nJosé,0123000006\n".encode())
    assert (utf8["created"], utf8["encoding"]) == (1, "utf-8")
    assert by_phone(await all_leads(server))["60123000006"]["name"] == "José"

    # A UTF-8 file with a character cut short: that row fails, the file is not taken for Windows-1252.
    cut = b"name,phone\nTrunc \xe2\x80,0123000007\n" + "Zoë,0123000008\n".encode()
    result = await upload(server, cut)
    assert (result["created"], result["encoding"], [f["row"] for f in result["failed"]]) == (1, "utf-8", [1])
    assert by_phone(await all_leads(server))["60123000008"]["name"] == "Zoë"
    # Past the file's start (the first read, 64 KiB or more), plain ASCII so far: Windows-1252 from the first row
    # that is not UTF-8; a UTF-8 row after that fails instead of being read wrong.
    late = b"name,phone\n" + b"".join(b"Lead,0125%06d\n" % n for n in range(10_000))  # 160 KB
    late += "Café,0123000009\n".encode("cp1252") + "Zoë,0123000010\n".encode()
    result = await upload(server, late)
    failed = [f["row"] for f in result["failed"]]
    assert (result["created"], result["encoding"], failed) == (10_001, "windows-1252", [10_002])
    assert "UTF-8 text but the file is Windows-1252" in result["failed"][0]["error"]
    assert by_phone(await all_leads(server))["60123000009"]["name"] == "Café"


async def test_mapping_and_defaults(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    device = await server.create_device("Sender")
    hidden = await server.create_device("Hidden")
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [device["id"]]})
    content = (
        b"Mobile,Phone,Segment,Ignore me,Remarks\n0123000001,03-2222 3333,Property,x,vip client\n0123000002,,,y,\n"
    )
    mapping = {"Mobile": "phone", "Phone": "fields.home_phone", "Segment": "niche", "Ignore me": None}
    result = await upload(
        server,
        content,
        staff,
        mapping=json.dumps(mapping),
        default_niche="Walk-in",
        default_target_status="customer",
        device_id=device["id"],
        import_id="upload-1",
    )
    assert (result["created"], result["failed"], result["import_id"]) == (2, [], "upload-1")
    leads = by_phone(await all_leads(server, staff))
    first, second = leads["60123000001"], leads["60123000002"]
    assert first["niche"] == "Property" and second["niche"] == "Walk-in"
    assert first["fields"] == {"home_phone": "03-2222 3333", "Remarks": "vip client"} and second["fields"] == {}
    assert first["target_status"] == second["target_status"] == "customer"
    assert first["device_id"] == second["device_id"] == device["id"]

    bad_options: list[tuple[dict[str, str], str]] = [
        ({"mapping": "{not json"}, "mapping"),
        ({"mapping": '["phone"]'}, "mapping"),
        ({"mapping": '{"Nope": "phone"}'}, "mapping"),
        ({"mapping": '{"Mobile": "colour"}'}, "mapping"),
        ({"mapping": '{"Mobile": "phone", "Segment": "phone"}'}, "mapping"),
        ({"mapping": '{"Segment": "phone"}'}, "mapping"),  # then the Phone column would be left unused
        ({"default_target_status": "vip"}, "default_target_status"),
        ({"default_niche": "n" * 101}, "default_niche"),
        ({"device_id": hidden["id"]}, "device_id"),
        ({"device_id": "nope"}, "device_id"),
        ({"import_id": "has spaces"}, "import_id"),
        ({"colour": "red"}, "colour"),
    ]
    for options, field in bad_options:
        reply = await server.call("POST", "/api/leads/import", staff, data=form(content, **options))
        error = assert_error(reply, 400, "invalid_input")
        assert error["details"]["field"] == field, (options, error)
    assert len(await all_leads(server, staff)) == 2  # none of them stored anything


async def test_bad_uploads_get_clear_errors_and_store_nothing(make_server: ServerFactory, database_url: str) -> None:
    server = await make_server(database_url, WAMD_MAX_BODY_MB="1")
    token = server.admin_token
    ok_csv = b"name,phone\nA,0123000001\n"

    no_file = aiohttp.FormData(default_to_multipart=True)
    no_file.add_field("default_niche", "x")
    error = assert_error(await server.call("POST", "/api/leads/import", token, data=no_file), 400, "invalid_input")
    assert error["details"]["field"] == "file" and "file" in error["message"]

    reply = await server.call("POST", "/api/leads/import", token, json={"file": "name,phone"})
    assert_error(reply, 415, "unsupported_media_type")
    reply = await server.call(
        "POST", "/api/leads/import", token, data=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data"}
    )
    assert_error(reply, 400, "invalid_input")  # no boundary
    reply = await server.call(
        "POST",
        "/api/leads/import",
        token,
        data=b"garbage without any boundary",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert_error(reply, 400, "invalid_input")

    for content, words in [
        (b"", "empty"),
        (b"\xef\xbb\xbf", "empty"),
        (b"name,mobile_phone_of_friend\nA,0123000001\n", "no phone column"),
        (b"name,phone,Phone\nA,1,2\n", "twice"),
        (b"PK\x03\x04\x14\x00\x06\x00" + b"\x00" * 100, "Excel"),
        (b"\xff\xfen\x00a\x00m\x00e\x00", "UTF-16"),
        (b"na\x00me,phone\n", "not text"),
        (b'name,phone,notes\nA,0123000001,"never closed\n', None),
    ]:
        reply = await server.call("POST", "/api/leads/import", token, data=form(content))
        if words is None:  # an unclosed quote fails that row, not the file
            assert reply.status == 200 and "not closed" in reply.body["failed"][0]["error"], reply.body
            continue
        error = assert_error(reply, 400, "invalid_input")
        assert words in error["message"], (content, error)

    for content, encoding, words in [
        (b"n\xe9me,phone\nA,0123000001\n", "utf-8", "not UTF-8 text"),  # told UTF-8: a Windows-1252 header fails
        (b"\xef\xbb\xbfn\xe9me,phone\nA,0123000001\n", "auto", "not UTF-8 text"),  # the byte order mark says UTF-8
        (b"n\x81me,phone\nA,0123000001\n", "auto", "not Windows-1252 text"),  # neither (0x81 is unassigned)
        (ok_csv, "latin-9", "encoding must be one of auto, utf-8, windows-1252"),
    ]:
        reply = await server.call("POST", "/api/leads/import", token, data=form(content, encoding=encoding))
        error = assert_error(reply, 400, "invalid_input")
        assert words in error["message"], (content, error)
        assert error["details"]["field"] == ("encoding" if encoding == "latin-9" else "file")

    assert await all_leads(server) == []

    big = b"name,phone\n" + b"x" * (1024 * 1024 + 10) + b",0123000001\n"
    error = assert_error(
        await server.call("POST", "/api/leads/import", token, data=form(big)), 413, "payload_too_large"
    )
    assert "MiB" in error["message"]
    assert await all_leads(server) == []  # refused by its Content-Length before anything was read

    async def streamed() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse it by
        yield ok_csv
        for _ in range(40):
            yield b"".join(b"Name %d,0124%06d\n" % (i, i) for i in range(2000))

    reply = await server.call("POST", "/api/leads/import", token, data=form(streamed()))
    error = assert_error(reply, 413, "payload_too_large")
    # the batches stored before the limit was passed stay, and the answer says how many
    stored = error["details"]["stored"]
    assert stored["created"] > 0 and stored["failed"] == 0
    assert len(await all_leads(server)) == stored["created"]


async def test_progress_events_reach_the_importer_only(server: Server) -> None:
    _, alice = await server.create_user("alice@example.com")
    _, bob = await server.create_user("bob@example.com")
    alice_ws = await server.ws(alice, event_types=["leads.import.progress"])
    bob_ws = await server.ws(bob, event_types=["leads.import.progress"])
    admin_ws = await server.ws(event_types=["leads.import.progress"])

    content = b"name,phone\n" + b"".join(b"Lead %d,0123%06d\n" % (i, i) for i in range(12_000)) + b"bad,x\n"
    result = await upload(server, content, alice, import_id="alice-import")
    assert (result["created"], result["failed_count"]) == (12_000, 1)

    seen = []
    while True:
        event = await alice_ws.wait_event("leads.import.progress", test=lambda e: e["import_id"] == "alice-import")
        seen.append(event)
        if event["done"]:
            break
    assert [e["rows"] for e in seen] == [5000, 10000, 12_001]
    assert all(e["created"] + e["updated"] + e["failed"] <= e["rows"] for e in seen)
    assert (seen[-1]["created"], seen[-1]["updated"], seen[-1]["failed"]) == (12_000, 0, 1)

    # Bob's and the admin's own imports come after Alice's on the same ordered bus: the first progress event
    # each of them receives is of their own import, so none of Alice's reached them.
    for ws, token, import_id in ((bob_ws, bob, "bob-import"), (admin_ws, server.admin_token, "admin-import")):
        await upload(server, b"phone\n0123999999\n", token, import_id=import_id)
        message = await asyncio.wait_for(ws.events.get(), EVENT_TIMEOUT)
        event = message["event"]
        assert (event["type"], event["import_id"], event["done"]) == ("leads.import.progress", import_id, True)


Checkpoint = Callable[[int], Awaitable[None]]


async def rows_source(
    count: int, checkpoint: Checkpoint | None = None, first: int = 0, note: bytes = b"note"
) -> AsyncIterator[bytes]:
    """A CSV generated as it is sent, ~64 KiB at a time (the test never holds the file). Before the rows from
    each multiple of 20,000 on, it awaits `checkpoint(rows sent so far)`."""
    pending = [b"name,phone,niche,target_status,trigger,notes,source\n"]
    size = len(pending[0])
    for i in range(count):
        if checkpoint is not None and i and i % 20_000 == 0:
            yield b"".join(pending)
            pending, size = [], 0
            await checkpoint(i)
        if i % 10_000 == 9999:
            phone = b"not a phone"
        elif i >= 95_000:
            phone = b"012%07d" % (first + i - 95_000)  # the first 5,000 phones again: updates
        else:
            phone = b"012%07d" % (first + i)
        line = b'Lead %d,%s,Niche %d,prospect,"welcome,t%d",%s %d,fair\n' % (i, phone, i % 7, i % 3, note, i)
        pending.append(line)
        size += len(line)
        if size >= 64 * 1024:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


async def test_a_100k_row_import_in_one_request_is_processed_as_it_arrives(server: Server) -> None:
    ws = await server.ws(event_types=["leads.import.progress"])

    async def processed(rows_sent: int) -> None:
        # The server reports rows stored while the rest of the file does not exist yet: it cannot have read the
        # whole upload first (if it did, this would wait forever and the test fail). It may lag by what is in
        # flight (a read chunk of ~900 rows), so the report at the previous multiple of 5,000 is awaited.
        await ws.wait_event("leads.import.progress", test=lambda e: e["rows"] >= rows_sent - 5000, timeout=30)

    result = await upload(server, rows_source(100_000, processed))
    assert (result["created"], result["updated"], result["failed_count"]) == (94_991, 4_999, 10)
    assert result["rows"] == 100_000
    assert sorted(f["row"] for f in result["failed"]) == [i + 1 for i in range(9999, 100_000, 10_000)]
    assert all("not a phone number" in f["error"] for f in result["failed"])

    assert server.runtime.engine is not None
    repo = SqlLeadRepository(server.runtime.engine)
    assert await repo.count(LeadQuery()) == 94_991
    assert await repo.count(LeadQuery(trigger="t1")) > 30_000
    done = await ws.wait_event("leads.import.progress", test=lambda e: e["done"])
    assert (done["rows"], done["created"], done["updated"], done["failed"]) == (100_000, 94_991, 4_999, 10)


async def test_import_memory_does_not_grow_with_the_file(server: Server) -> None:
    """Python's allocation tracker: importing a 10 MB file takes about the memory of importing a 1 MB one (the
    server holds a batch of rows, never the upload or all its rows; holding the file alone would add 9 MB)."""
    note = b"x" * 1000
    await upload(server, rows_source(600, first=9_000_000, note=note))  # warm up caches and pools

    async def peak_of(count: int, first: int) -> tuple[int, int]:
        size = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in rows_source(count, first=first, note=note):
                size += len(chunk)
                yield chunk

        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            result = await upload(server, counted())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result["created"] + result["updated"] + result["failed_count"] == count
        return peak - before, size

    small_peak, small_size = await peak_of(1_000, 0)
    large_peak, large_size = await peak_of(10_000, 100_000)
    assert large_size - small_size > 9_000_000
    assert large_peak - small_peak < (large_size - small_size) // 3, (small_peak, large_peak)
    assert large_peak < large_size // 2, (large_peak, large_size)
