"""Leads: CRUD, CSV import (streamed multipart) and export (streamed CSV)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from aiohttp import BodyPartReader, MultipartReader, web

from wamd_server.domain.errors import DomainError, InvalidInput
from wamd_server.domain.leads import LeadQuery
from wamd_server.domain.models import Lead, User
from wamd_server.protocol import dto
from wamd_server.services.leads import ImportOptions, ImportReport, LeadChanges, LeadInput
from wamd_server.web.context import CTX
from wamd_server.web.inputs import (
    PayloadTooLarge,
    json_body,
    page,
    page_params,
    parse_uuids,
    path_id,
    time_id_cursor,
    user_of,
)
from wamd_server.web.routes.users import PAGING
from wamd_server.web.routing import QueryParam, RouteTable

routes = RouteTable()

CHUNK = 64 * 1024
OPTION_PARTS = ("mapping", "default_niche", "default_target_status", "device_id", "import_id", "encoding")
MAX_OPTION_BYTES = 64 * 1024
FILTERS = (
    QueryParam("niche", "only this niche (ignoring case)"),
    QueryParam("target_status", "prospect or customer"),
    QueryParam("trigger", "only leads whose triggers include this one"),
    QueryParam("device_id", "only leads of this owner device"),
    QueryParam("search", "part of the name or of the phone"),
    QueryParam("opted_out", "true: only opted-out leads; false: only reachable ones", "boolean"),
)


class UnsupportedMediaType(DomainError):
    code = "unsupported_media_type"


def lead_out(lead: Lead) -> dict[str, Any]:
    assert lead.created_at is not None and lead.updated_at is not None
    return dto.LeadOut(
        id=str(lead.id),
        name=lead.name,
        phone=lead.phone,
        niche=lead.niche,
        target_status=lead.target_status.value,
        triggers=lead.triggers,
        device_id=str(lead.device_id) if lead.device_id else None,
        notes=lead.notes,
        fields=lead.fields,
        opted_out_at=lead.opted_out_at,
        created_at=lead.created_at,
        updated_at=lead.updated_at,
    ).model_dump(mode="json")


def query_of(request: web.Request, user: User) -> LeadQuery:
    q = request.query
    return request.app[CTX].leads.query_for(
        user,
        niche=q.get("niche"),
        target_status=q.get("target_status"),
        trigger=q.get("trigger"),
        device_id=q.get("device_id"),
        search=q.get("search"),
        opted_out=q.get("opted_out"),
    )


def lead_path_id(request: web.Request) -> UUID:
    return path_id(request, what="lead")


# Registered before /api/leads/{id}, which would otherwise take "export" and "import" for ids.


@routes.get(
    "/api/leads/export",
    summary="Export the leads (same filters as the list) as CSV, streamed",
    tag="leads",
    query=FILTERS,
    content_type="text/csv",
)
async def export_leads(request: web.Request) -> web.StreamResponse:
    service = request.app[CTX].leads
    query = query_of(request, user_of(request))  # a bad filter answers 400 before the CSV starts
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{service.export_filename()}"',
            "Cache-Control": "no-store",
        }
    )
    await response.prepare(request)
    async for chunk in service.export_csv(query):
        await response.write(chunk)
    await response.write_eof()
    return response


@routes.post(
    "/api/leads/import",
    summary="Import leads from a CSV (multipart: options first, then `file`), upserting by phone",
    tag="leads",
    body=dto.LeadImportForm,
    response=dto.ImportResult,
    request_content_type="multipart/form-data",
)
async def import_leads(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    limit = ctx.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    if request.content_type != "multipart/form-data":
        raise UnsupportedMediaType("send the CSV as multipart/form-data with a part named 'file'", {"field": "file"})
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise malformed(exc) from None
    options: dict[str, str] = {}
    used = 0
    while True:
        part = await next_part(reader)
        if part is None:
            raise InvalidInput("the multipart body has no part named 'file'", {"field": "file"})
        if part.name == "file":
            break
        if part.name not in OPTION_PARTS:
            expected = ", ".join(("file", *OPTION_PARTS))
            raise InvalidInput(f"unknown form field {part.name!r} (expected {expected})", {"field": part.name})
        if part.name in options:
            raise InvalidInput(f"the form field {part.name!r} is given twice", {"field": part.name})
        raw = await read_option(part)
        used += len(raw)
        try:
            options[part.name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{part.name} must be UTF-8 text", {"field": part.name}) from None

    import_options = ImportOptions(
        mapping=parse_mapping(options.get("mapping")),
        default_niche=options.get("default_niche"),
        default_target_status=options.get("default_target_status"),
        device_id=options.get("device_id"),
        import_id=options.get("import_id"),
        encoding=options.get("encoding"),
    )
    # The service counts the file's bytes against what is left of the limit (ImportTooLarge: also a 413).
    report = await ctx.leads.import_csv(user_of(request), file_chunks(part), import_options, max_bytes=limit - used)
    with contextlib.suppress(ValueError, AssertionError):  # parts after the file are not read: drain them
        await reader.release()
    return web.json_response(import_result(report))


def import_result(report: ImportReport) -> dict[str, Any]:
    return dto.ImportResult(
        import_id=report.import_id,
        rows=report.rows,
        created=report.created,
        updated=report.updated,
        failed=[dto.ImportFailure(row=f.row, error=f.error, field=f.field) for f in report.failed],
        failed_count=report.failed_count,
        encoding=report.encoding,
    ).model_dump(mode="json")


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"uploads are limited to {limit // (1024 * 1024)} MiB (WAMD_MAX_BODY_MB)", {"limit_bytes": limit}
    )


def malformed(exc: BaseException) -> InvalidInput:
    return InvalidInput(f"the multipart body is malformed: {exc}", {"field": "file"})


async def next_part(reader: MultipartReader) -> BodyPartReader | None:
    try:
        part = await reader.next()
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise malformed(exc) from None
    if part is None:
        return None
    if not isinstance(part, BodyPartReader):
        raise InvalidInput("nested multipart bodies are not supported", {"field": "file"})
    return part


async def read_option(part: BodyPartReader) -> bytes:
    data = bytearray()
    try:
        while chunk := await part.read_chunk(CHUNK):
            data += chunk
            if len(data) > MAX_OPTION_BYTES:
                raise InvalidInput(
                    f"the form field {part.name!r} is longer than {MAX_OPTION_BYTES // 1024} KiB", {"field": part.name}
                )
    except (ValueError, AssertionError) as exc:
        raise malformed(exc) from None
    return bytes(data)


async def file_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    """The file part's bytes as they arrive (the service counts them against the limit)."""
    while True:
        try:
            chunk = await part.read_chunk(CHUNK)
        except (ValueError, AssertionError) as exc:
            raise malformed(exc) from None
        if not chunk:
            return
        yield chunk


def parse_mapping(raw: str | None) -> dict[str, str | None] | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise InvalidInput("mapping must be a JSON object {header: field}", {"field": "mapping"}) from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items()
    ):
        raise InvalidInput(
            'mapping must be a JSON object of CSV headers to lead fields, e.g. {"Mobile": "phone"}',
            {"field": "mapping"},
        )
    return value


# --- CRUD ------------------------------------------------------------------------------------------------


@routes.get(
    "/api/leads",
    summary="Leads the caller may see (staff: their own), in creation order",
    tag="leads",
    response=dto.Page[dto.LeadOut],
    query=(*PAGING, *FILTERS),
)
async def list_leads(request: web.Request) -> web.Response:
    user = user_of(request)
    limit, cursor = page_params(request)
    query = query_of(request, user)
    leads = await request.app[CTX].leads.list_page(user, query, limit, time_id_cursor(cursor))
    last = leads[-1] if leads else None
    key = f"{last.created_at.isoformat()}|{last.id}" if last is not None and last.created_at else None
    return web.json_response(page([lead_out(lead) for lead in leads], limit, key))


@routes.post(
    "/api/leads",
    summary="Create a lead (409 if the caller already has one with this phone)",
    tag="leads",
    body=dto.LeadCreate,
    response=dto.LeadOut,
    status=201,
)
async def create_lead(request: web.Request) -> web.Response:
    body = await json_body(request, dto.LeadCreate)
    device_id = parse_uuids([body.device_id], "device_id")[0] if body.device_id is not None else None
    data = LeadInput(
        phone=body.phone,
        name=body.name,
        niche=body.niche,
        target_status=body.target_status,
        triggers=body.triggers,
        device_id=device_id,
        notes=body.notes,
        fields=body.fields,
    )
    lead = await request.app[CTX].leads.create(user_of(request), data)
    return web.json_response(lead_out(lead), status=201)


@routes.get("/api/leads/{id}", summary="One lead", tag="leads", response=dto.LeadOut)
async def get_lead(request: web.Request) -> web.Response:
    lead = await request.app[CTX].leads.get(user_of(request), lead_path_id(request))
    return web.json_response(lead_out(lead))


@routes.patch("/api/leads/{id}", summary="Change a lead", tag="leads", body=dto.LeadPatch, response=dto.LeadOut)
async def patch_lead(request: web.Request) -> web.Response:
    user = user_of(request)
    lead_id = lead_path_id(request)
    service = request.app[CTX].leads
    await service.get(user, lead_id)  # 404 before validating the body
    body = await json_body(request, dto.LeadPatch)
    changes = LeadChanges()
    for name in body.model_fields_set:
        value = getattr(body, name)
        if name == "device_id":
            changes.device_id = parse_uuids([value], "device_id")[0] if value is not None else None
        elif value is None:
            raise InvalidInput(f"{name} must not be null", {"field": name})
        else:
            setattr(changes, name, value)
    lead = await service.update(user, lead_id, changes)
    return web.json_response(lead_out(lead))


@routes.delete("/api/leads/{id}", summary="Delete a lead", tag="leads", response=dto.Ok)
async def delete_lead(request: web.Request) -> web.Response:
    await request.app[CTX].leads.delete(user_of(request), lead_path_id(request))
    return web.json_response({"ok": True})
