"""Template previews (`POST /api/templates/preview`) and media (`POST /api/media`, `GET /api/media/{id}`)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import Reply, Server, ServerFactory
from wamd_server.domain.models import Lead
from wamd_server.infra.db.leads import SqlLeadRepository
from wamd_server.infra.db.tables import media

MiB = 1024 * 1024
PREVIEW = "/api/templates/preview"


def engine_of(server: Server) -> AsyncEngine:
    assert server.runtime.engine is not None
    return server.runtime.engine


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply.body
    error: dict[str, Any] = reply.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


async def add_lead(server: Server, owner_id: str, name: str, phone: str, fields: dict[str, str]) -> str:
    """Leads are stored through the repository (the leads API is another module's)."""
    now = datetime.now(UTC)
    lead = Lead(
        id=uuid.uuid4(),
        user_id=uuid.UUID(owner_id),
        phone=phone,
        name=name,
        fields=fields,
        created_at=now,
        updated_at=now,
    )
    stored = await SqlLeadRepository(engine_of(server)).add(lead)
    assert stored is not None
    return str(stored.id)


async def admin_id(server: Server) -> str:
    me = await server.ok("GET", "/api/me")
    return str(me["id"])


# --- template preview ------------------------------------------------------------------------------------


async def test_preview_with_a_stored_lead(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    lead_id = await add_lead(server, staff_id, "Aisyah binti Ahmad", "60123456789", {"Company Name": "Kedai Runcit"})
    body = {
        "template": "{greeting} {first_name}! {Hi|Hello} {name} ({phone}) dari {company_name}. {kod}",
        "lead_id": lead_id,
        "at": "2024-06-03T08:15:00+08:00",
        "seed": 42,
    }
    for token in (staff, server.admin_token):  # the owner, and admins, may preview for the lead
        out = await server.ok("POST", PREVIEW, token, json=body)
        assert out["text"].startswith("Selamat pagi Aisyah! H")
        assert out["text"].endswith(" Aisyah binti Ahmad (+60123456789) dari Kedai Runcit. {kod}")
        assert out["language"] == "ms"
        assert datetime.fromisoformat(out["at"]) == datetime(2024, 6, 3, 0, 15, tzinfo=UTC)
        assert [(w["code"], w["severity"], w["position"]) for w in out["warnings"]] == [
            ("unknown_placeholder", "warning", body["template"].index("{kod}"))
        ]
    # the same seed gives the same text; English greetings on request
    again = await server.ok("POST", PREVIEW, staff, json=body)
    assert again["text"] == out["text"]
    english = await server.ok("POST", PREVIEW, staff, json={**body, "language": "en", "template": "{greeting}"})
    assert english["text"] == "Good morning"


async def test_preview_with_an_inline_lead_or_none(server: Server) -> None:
    out = await server.ok(
        "POST",
        PREVIEW,
        json={
            "template": "Hi {name}, kod {{PROMO}}: https://x.my/p?a=1&b={code} {a|",
            "lead": {"name": "", "phone": "012-345 6789", "fields": {"CODE": "Z9"}},
            "at": "2024-06-03T21:00:00+08:00",
        },
    )
    assert out["text"] == "Hi, kod {PROMO}: https://x.my/p?a=1&b=Z9 {a|"
    assert [w["code"] for w in out["warnings"]] == ["unbalanced_brace"]
    assert out["warnings"][0]["severity"] == "error"

    out = await server.ok("POST", PREVIEW, json={"template": "{phone}{greeting}", "at": "2024-06-03T13:00:00Z"})
    assert out["text"] == "Selamat malam"  # 21:00 in Kuala Lumpur
    out = await server.ok("POST", PREVIEW, json={"template": "{x}"})
    assert out["text"] == "{x}" and "custom field" in out["warnings"][0]["message"]


async def test_greeting_texts_come_from_the_configuration(make_server: ServerFactory, tmp_path: Path) -> None:
    texts = '{"en": {"06:00": "Morning", "17:00": "Evening"}}'
    server = await make_server(f"sqlite+aiosqlite:///{tmp_path / 'greet.db'}", WAMD_GREETINGS=texts)
    body = {"template": "{greeting}", "language": "en", "at": "2024-06-03T13:00:00Z"}  # 21:00 in Kuala Lumpur
    assert (await server.ok("POST", PREVIEW, json=body))["text"] == "Evening"
    body["at"] = "2024-06-03T02:00:00Z"  # 10:00
    assert (await server.ok("POST", PREVIEW, json=body))["text"] == "Morning"
    body["language"] = "ms"  # not configured: the defaults
    assert (await server.ok("POST", PREVIEW, json=body))["text"] == "Selamat pagi"


async def test_preview_of_a_lead_the_caller_may_not_see_is_not_found(server: Server) -> None:
    owner_id, _ = await server.create_user("owner@example.com")
    _, other = await server.create_user("other@example.com")
    lead_id = await add_lead(server, owner_id, "Ali", "60123000001", {})
    admins_lead = await add_lead(server, await admin_id(server), "Abu", "60123000002", {})
    for token, target in ((other, lead_id), (other, admins_lead), (other, str(uuid.uuid4())), (None, lead_id)):
        reply = await server.call(
            "POST", PREVIEW, token or server.admin_token, json={"template": "x", "lead_id": target}
        )
        if token is None:
            assert reply.status == 200  # the admin sees every lead
            continue
        error = assert_error(reply, 404, "not_found")
        assert error["message"] == "lead not found"


async def test_preview_rejects_bad_input(server: Server) -> None:
    cases: list[tuple[Any, str | None]] = [
        ({}, "template"),
        ({"template": ""}, "template"),
        ({"template": 5}, "template"),
        ({"template": "x", "extra": 1}, "extra"),
        ({"template": "x", "lead_id": "not-an-id"}, "lead_id"),
        ({"template": "x", "lead_id": str(uuid.uuid4()), "lead": {"name": "A"}}, "lead"),
        ({"template": "x", "lead": {"phone": "12"}}, "lead.phone"),
        ({"template": "x", "lead": {"fields": {"a": 1}}}, "lead.fields.a"),
        ({"template": "x", "language": "fr"}, "language"),
        ({"template": "x", "at": "2024-06-03T08:00:00"}, "at"),
        ({"template": "x", "at": "yesterday"}, "at"),
        ({"template": "x", "seed": -1}, "seed"),
        ({"template": "x" * 70_000}, "template"),
    ]
    for body, field in cases:
        reply = await server.call("POST", PREVIEW, server.admin_token, json=body)
        error = assert_error(reply, 400, "invalid_input")
        details = error.get("details")
        fields = [d["field"] for d in details] if isinstance(details, list) else [details["field"]]
        assert field in fields, (body, error)
    reply = await server.call("POST", PREVIEW, server.admin_token, data=b"{nope", headers={"Content-Type": "x"})
    assert_error(reply, 400, "invalid_json")


# --- media -----------------------------------------------------------------------------------------------


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    image = Image.new(mode, (width, height), "white" if mode != "1" else 0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def noisy_jpeg(width: int, height: int) -> bytes:
    """A photo-like worst case: noise compresses badly, so this is large."""
    image = Image.frombytes("RGB", (width, height), random.Random(1).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def form(data: bytes, name: str = "file", filename: str = "photo.jpg") -> aiohttp.FormData:
    payload = aiohttp.FormData()
    payload.add_field(name, data, filename=filename, content_type="application/octet-stream")
    return payload


async def upload(server: Server, data: bytes, token: str | None = None, **kw: Any) -> Reply:
    return await server.call("POST", "/api/media", token or server.admin_token, data=form(data, **kw))


async def fetch(server: Server, path: str, token: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """A binary GET (`Server.call` decodes text)."""
    async with server.http.get(server.url + path, headers={"Authorization": f"Bearer {token}", **headers}) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def media_rows(server: Server) -> int:
    async with engine_of(server).connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(media))).scalar_one())


async def test_upload_and_download_round_trip_with_caching_headers(server: Server) -> None:
    _, staff = await server.create_user("staff@example.com")
    small = png(120, 80)
    reply = await upload(server, small, staff, filename="logo.png")
    assert reply.status == 201, reply.body
    item = reply.body
    assert item == {
        "id": item["id"],
        "mime": "image/png",
        "size": len(small),
        "width": 120,
        "height": 80,
        "sha256": hashlib.sha256(small).hexdigest(),
    }  # small PNGs are kept byte for byte

    status, headers, data = await fetch(server, f"/api/media/{item['id']}", staff)
    assert status == 200 and data == small
    assert headers["content-type"] == "image/png"
    assert headers["etag"] == f'"{item["sha256"]}"'
    cache = headers["cache-control"]
    assert "private" in cache and "max-age=" in cache and "immutable" in cache
    assert headers["x-content-type-options"] == "nosniff"
    assert int(headers["content-length"]) == len(small)

    again = await server.call(
        "GET", f"/api/media/{item['id']}", staff, headers={"If-None-Match": f'"{item["sha256"]}"'}
    )
    assert again.status == 304 and not again.body
    assert {k.lower(): v for k, v in again.headers.items()}["etag"] == f'"{item["sha256"]}"'
    status, _, data = await fetch(server, f"/api/media/{item['id']}", staff, **{"If-None-Match": '"other"'})
    assert status == 200 and data == small

    # the same image again is the same media
    assert (await upload(server, small, staff)).body["id"] == item["id"]
    assert await media_rows(server) == 1


async def test_large_images_are_reencoded_smaller(server: Server) -> None:
    big = noisy_jpeg(2400, 1600)
    assert len(big) > MiB
    reply = await upload(server, big)
    assert reply.status == 201, reply.body
    item = reply.body
    assert item["mime"] == "image/jpeg"
    assert max(item["width"], item["height"]) <= 1000 and (item["width"], item["height"]) == (1000, 667)
    assert item["size"] <= 350 * 1024 < len(big)
    _, _, stored = await fetch(server, f"/api/media/{item['id']}", server.admin_token)
    assert hashlib.sha256(stored).hexdigest() == item["sha256"] and len(stored) == item["size"]
    with Image.open(io.BytesIO(stored)) as image:
        assert image.format == "JPEG" and image.size == (1000, 667)

    # other formats become JPEG, transparency on white
    rgba = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    out = io.BytesIO()
    rgba.save(out, format="WEBP")
    reply = await upload(server, out.getvalue(), filename="x.webp")
    assert reply.status == 201 and reply.body["mime"] == "image/jpeg", reply.body
    assert (reply.body["width"], reply.body["height"]) == (50, 40)


async def test_non_images_and_broken_images_are_rejected(server: Server) -> None:
    reply = await upload(server, b"%PDF-1.4 not an image at all")
    error = assert_error(reply, 415, "unsupported_media_type")
    assert "not an image" in error["message"]
    reply = await upload(server, b"<svg xmlns='http://www.w3.org/2000/svg'/>", filename="x.svg")
    assert_error(reply, 415, "unsupported_media_type")
    truncated = noisy_jpeg(300, 200)[:2000]
    assert_error(await upload(server, truncated), 400, "invalid_input")
    assert_error(await upload(server, b""), 400, "invalid_input")
    # a decompression bomb: 50 megapixels in a tiny PNG, refused before decoding
    bomb = png(10_000, 5_000, mode="1")
    assert len(bomb) < MiB
    error = assert_error(await upload(server, bomb), 400, "invalid_input")
    assert "pixels" in error["message"]
    # not multipart, or no part named file
    reply = await server.call("POST", "/api/media", server.admin_token, data=png(2, 2))
    assert_error(reply, 400, "invalid_input")
    error = assert_error(await upload(server, png(2, 2), name="image"), 400, "invalid_input")
    assert "file" in error["message"]
    reply = await server.call(
        "POST",
        "/api/media",
        server.admin_token,
        data=b"garbage",
        headers={"Content-Type": "multipart/form-data; boundary=zzz"},
    )
    assert_error(reply, 400, "invalid_input")
    assert await media_rows(server) == 0


async def test_media_is_visible_to_its_uploader_and_admins_only(server: Server) -> None:
    _, uploader = await server.create_user("uploader@example.com")
    _, other = await server.create_user("other@example.com")
    item = (await upload(server, png(10, 10), uploader)).body
    path = f"/api/media/{item['id']}"
    assert (await fetch(server, path, uploader))[0] == 200
    assert (await fetch(server, path, server.admin_token))[0] == 200
    error = assert_error(await server.call("GET", path, other), 404, "not_found")
    assert error["message"] == "media not found"
    assert_error(await server.call("GET", f"/api/media/{uuid.uuid4()}", uploader), 404, "not_found")
    assert_error(await server.call("GET", "/api/media/not-an-id", uploader), 404, "not_found")
    assert_error(await server.call("GET", path), 401, "unauthorized")
    # the same bytes uploaded by someone else are their own media
    mine = (await upload(server, png(10, 10), other)).body
    assert mine["id"] != item["id"] and mine["sha256"] == item["sha256"]
    assert (await fetch(server, f"/api/media/{mine['id']}", other))[0] == 200


async def chunked(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_uploads_over_the_configured_size_are_refused(make_server: ServerFactory, tmp_path: Path) -> None:
    server = await make_server(f"sqlite+aiosqlite:///{tmp_path / 'limit.db'}", WAMD_MAX_BODY_MB="1")
    too_big = os.urandom(MiB + MiB // 2)
    # with a Content-Length: refused before reading
    error = assert_error(await upload(server, too_big), 413, "payload_too_large")
    assert "WAMD_MAX_BODY_MB" in error["message"]
    # chunked (no Content-Length): refused while the part streams in
    boundary = "wamdtestboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    pieces = [head] + [too_big[i : i + 64 * 1024] for i in range(0, len(too_big), 64 * 1024)]
    pieces.append(f"\r\n--{boundary}--\r\n".encode())
    reply = await server.call(
        "POST",
        "/api/media",
        server.admin_token,
        data=chunked(pieces),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_error(reply, 413, "payload_too_large")
    assert await media_rows(server) == 0
    # under the limit is fine
    assert (await upload(server, png(64, 64))).status == 201
