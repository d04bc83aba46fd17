"""Lead use cases: validation, who sees which leads, CSV import (streamed, upserting) and export (streamed).

Leads belong to the user who created or imported them and are unique per owner and phone (E.164 digits).
Admins see every lead; staff see only their own; a lead a caller may not see does not exist for them (404).
"""

from __future__ import annotations

import csv
import enum
import io
import logging
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol
from uuid import UUID

from wamd_server.domain.errors import Conflict, DomainError, InvalidInput, NotFound
from wamd_server.domain.leads import LeadDraft, LeadQuery, LeadRepository
from wamd_server.domain.models import Lead, TargetStatus, User
from wamd_server.domain.ports import BusEvent, Clock, DeviceRepository, EventBus
from wamd_server.protocol.events import LEADS_IMPORT_PROGRESS
from wamd_server.services.csv_records import Record, RecordSplitter
from wamd_server.services.csv_text import LABELS, SNIFF_BYTES, UTF8, RowDecoder, encoding_option
from wamd_server.services.devices import scope_of
from wamd_server.services.phones import normalise_phone

log = logging.getLogger(__name__)

MAX_NAME = 200
MAX_NICHE = 100
MAX_NOTES = 5000
MAX_TRIGGER = 100
MAX_TRIGGERS = 50
MAX_FIELDS = 50
MAX_FIELD_KEY = 100
MAX_FIELD_VALUE = 2000
MAX_PHONE_TEXT = 64
MAX_REPORTED_FAILURES = 1000  # the answer lists this many failed rows; `failed_count` counts them all
IMPORT_BATCH = 500
PROGRESS_EVERY = 5000
EXPORT_CHUNK = 64 * 1024
UTF8_BOM = b"\xef\xbb\xbf"

# The columns of an export, in order; custom fields follow. Custom field names must differ from these.
EXPORT_COLUMNS = ("name", "phone", "niche", "target_status", "triggers", "device_id", "notes", "opted_out_at")
RESERVED_KEYS = frozenset(EXPORT_COLUMNS)

# Headers recognised on import (compared after lower-casing and turning punctuation and spaces into "_").
HEADER_ALIASES: Mapping[str, tuple[str, ...]] = {
    "name": ("name", "full_name", "fullname", "nama", "customer_name", "contact_name"),
    "phone": (
        "phone",
        "phone_number",
        "phone_no",
        "number",
        "mobile",
        "mobile_number",
        "mobile_no",
        "whatsapp",
        "whatsapp_number",
        "whatsapp_no",
        "tel",
        "telephone",
        "no_telefon",
        "no_tel",
        "no_hp",
    ),
    "niche": ("niche",),
    "target_status": ("target_status", "status", "target_sta"),
    "triggers": ("triggers", "trigger"),
    "notes": ("notes", "note", "journey"),
    "device_id": ("device_id",),
    "opted_out_at": ("opted_out_at",),
}
IMPORT_TARGETS = tuple(HEADER_ALIASES)
ALIAS_TARGET = {alias: target for target, aliases in HEADER_ALIASES.items() for alias in aliases}
TRIGGER_SPLIT = re.compile(r"[,;]")
NOT_TEXT_SIGNATURES = (
    (b"PK\x03\x04", "an Excel workbook or a zip file"),
    (b"\xd0\xcf\x11\xe0", "an Excel 97-2003 workbook"),
    (b"%PDF", "a PDF document"),
    (b"\xff\xfe", "UTF-16 text"),
    (b"\xfe\xff", "UTF-16 text"),
)


class Unset(enum.Enum):
    UNSET = "unset"


UNSET: Final = Unset.UNSET


class ImportTooLarge(DomainError):
    """The upload passed the body limit; `details` tell what was stored before it did."""

    code = "payload_too_large"


@dataclass
class LeadInput:
    """A new lead as a caller gives it (validated by `LeadService.create`)."""

    phone: str
    name: str = ""
    niche: str = ""
    target_status: str = "prospect"
    triggers: Sequence[str] = ()
    device_id: UUID | None = None
    notes: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass
class LeadChanges:
    """A PATCH: what is UNSET stays. `device_id=None` takes the owner device away; `opted_out` sets or clears
    the opt-out."""

    name: str | Unset = UNSET
    phone: str | Unset = UNSET
    niche: str | Unset = UNSET
    target_status: str | Unset = UNSET
    triggers: Sequence[str] | Unset = UNSET
    device_id: UUID | Unset | None = UNSET
    notes: str | Unset = UNSET
    fields: Mapping[str, str] | Unset = UNSET
    opted_out: bool | Unset = UNSET


@dataclass
class ImportOptions:
    """How to read a CSV. `mapping` maps a header of the file to a lead field (`name`, `phone`, `niche`,
    `target_status`, `triggers`, `notes`, `device_id`, `opted_out_at`), to `fields.<key>` (a custom field),
    or to None (ignore the column); columns it does not name are recognised by their header, and the rest
    become custom fields. The defaults apply to rows whose cell is empty."""

    mapping: Mapping[str, str | None] | None = None
    default_niche: str | None = None
    default_target_status: str | None = None
    device_id: str | None = None
    import_id: str | None = None
    encoding: str | None = None  # "utf-8", "windows-1252", or None / "auto": decided from the file (csv_text.py)


@dataclass(frozen=True)
class RowFailure:
    row: int  # 1-based data row as in the file (the header is row 0; blank lines count but are skipped)
    error: str
    field: str | None = None


@dataclass
class ImportReport:
    import_id: str
    rows: int = 0  # data rows read (blank lines not counted)
    created: int = 0
    updated: int = 0
    failed_count: int = 0
    failed: list[RowFailure] = field(default_factory=list)  # the first MAX_REPORTED_FAILURES
    encoding: str = UTF8  # what the file was read as

    def fail(self, row: int, error: str, field_: str | None = None) -> None:
        self.failed_count += 1
        if len(self.failed) < MAX_REPORTED_FAILURES:
            self.failed.append(RowFailure(row, error, field_))

    def summary(self) -> dict[str, Any]:
        return {
            "import_id": self.import_id,
            "rows": self.rows,
            "created": self.created,
            "updated": self.updated,
            "failed": self.failed_count,
        }


# --- validation -----------------------------------------------------------------------------------------


def _text(value: str, name: str, limit: int) -> str:
    value = value.strip()
    if "\x00" in value:
        raise InvalidInput(f"{name} must not contain NUL characters", {"field": name})
    if len(value) > limit:
        raise InvalidInput(f"{name} must be at most {limit} characters (it has {len(value)})", {"field": name})
    return value


def clean_target_status(value: str, name: str = "target_status") -> TargetStatus:
    text = value.strip().lower()
    try:
        return TargetStatus(text)
    except ValueError:
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise InvalidInput(f"{name} must be prospect or customer, not {shown!r}", {"field": name}) from None


def clean_triggers(values: Sequence[str] | str) -> list[str]:
    """Trimmed, without empties and repeats, in order. A string is split at commas and semicolons."""
    items = TRIGGER_SPLIT.split(values) if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidInput("triggers must be strings", {"field": "triggers"})
        text = item.strip()
        if not text:
            if isinstance(values, str):
                continue
            raise InvalidInput("a trigger must not be empty", {"field": "triggers"})
        if len(text) > MAX_TRIGGER:
            raise InvalidInput(
                f"a trigger must be at most {MAX_TRIGGER} characters ({text[:20]!r}… has {len(text)})",
                {"field": "triggers"},
            )
        if TRIGGER_SPLIT.search(text) or "\x00" in text:
            raise InvalidInput(f"a trigger must not contain , or ; ({text!r})", {"field": "triggers"})
        if text not in out:
            out.append(text)
    if len(out) > MAX_TRIGGERS:
        raise InvalidInput(f"a lead has at most {MAX_TRIGGERS} triggers (got {len(out)})", {"field": "triggers"})
    return out


def clean_field_key(key: str) -> str:
    text = key.strip()
    if not text:
        raise InvalidInput("a custom field name must not be empty", {"field": "fields"})
    if len(text) > MAX_FIELD_KEY:
        raise InvalidInput(f"a custom field name must be at most {MAX_FIELD_KEY} characters", {"field": "fields"})
    if text.lower() in RESERVED_KEYS:
        raise InvalidInput(f"{text!r} is a lead field, not a custom field name", {"field": "fields"})
    if "\x00" in text:
        raise InvalidInput("custom field names must not contain NUL characters", {"field": "fields"})
    return text


def clean_fields(values: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput("custom fields map names to text", {"field": "fields"})
        name = clean_field_key(key)
        if len(value) > MAX_FIELD_VALUE:
            raise InvalidInput(
                f"custom field {name!r} must be at most {MAX_FIELD_VALUE} characters", {"field": "fields"}
            )
        if "\x00" in value:
            raise InvalidInput("custom fields must not contain NUL characters", {"field": "fields"})
        out[name] = value
    if len(out) > MAX_FIELDS:
        raise InvalidInput(f"a lead has at most {MAX_FIELDS} custom fields (got {len(out)})", {"field": "fields"})
    return out


def header_key(header: str) -> str:
    """'Phone Number' → 'phone_number', 'No. Telefon' → 'no_telefon'."""
    return re.sub(r"[^0-9a-z]+", "_", header.strip().lower()).strip("_")


def parse_time(value: str, name: str) -> datetime:
    text = value.strip()
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise InvalidInput(f"{name} must be a date and time such as 2024-05-01T10:00:00Z", {"field": name}) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


# --- CSV reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    index: int
    header: str
    target: str | None  # a lead field, "fields" (custom field named `key`) or None (ignored)
    key: str = ""


class _LineFeed:
    """An iterator `csv.reader` pulls one prepared record from (records are complete, so it never waits)."""

    def __init__(self) -> None:
        self.line: str | None = None

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        if self.line is None:
            raise StopIteration
        line, self.line = self.line, None
        return line


def sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > counts[","] else ","


def plan_columns(headers: list[str], mapping: Mapping[str, str | None] | None) -> list[Column]:
    """Decide what each column of the file holds. Explicit mapping first, then exact lead-field names,
    then aliases; a column whose field is taken, and any other column, becomes a custom field."""
    stripped = [h.strip() for h in headers]
    seen: dict[str, int] = {}
    for index, header in enumerate(stripped):
        if header and header.lower() in seen:
            raise InvalidInput(f"the column {header!r} appears twice in the header", {"field": "file"})
        seen[header.lower()] = index

    plan: dict[int, Column] = {}
    taken: dict[str, int] = {}
    for source, target in (mapping or {}).items():
        found = next((i for i, h in enumerate(stripped) if h == source.strip()), None)
        if found is None:
            found = seen.get(source.strip().lower())
        if found is None:
            raise InvalidInput(f"mapping names a column the file does not have: {source!r}", {"field": "mapping"})
        index = found
        if target is None or not target.strip():
            plan[index] = Column(index, stripped[index], None)
            continue
        wanted = target.strip()
        if wanted.startswith("fields."):
            try:
                key = clean_field_key(wanted.removeprefix("fields."))
            except InvalidInput as exc:
                raise InvalidInput(f"mapping of {source!r}: {exc.message}", {"field": "mapping"}) from None
            plan[index] = Column(index, stripped[index], "fields", key)
            continue
        wanted = ALIAS_TARGET.get(header_key(wanted), wanted) if wanted not in IMPORT_TARGETS else wanted
        if wanted not in IMPORT_TARGETS:
            raise InvalidInput(
                f"mapping of {source!r} must be one of {', '.join(IMPORT_TARGETS)}, fields.<name> or null",
                {"field": "mapping"},
            )
        if wanted in taken:
            raise InvalidInput(f"mapping puts two columns into {wanted}", {"field": "mapping"})
        taken[wanted] = index
        plan[index] = Column(index, stripped[index], wanted)

    for exact in (True, False):
        candidates: dict[str, list[int]] = {}
        for index, header in enumerate(stripped):
            if index in plan:
                continue
            key = header_key(header)
            target = key if exact and key in IMPORT_TARGETS else (None if exact else ALIAS_TARGET.get(key))
            if target is not None and target not in taken:
                candidates.setdefault(target, []).append(index)
        for target, indexes in candidates.items():
            if len(indexes) > 1:
                names = " and ".join(repr(stripped[i]) for i in indexes)
                raise InvalidInput(
                    f"the columns {names} could both be the {target}; say which with mapping", {"field": "mapping"}
                )
            taken[target] = indexes[0]
            plan[indexes[0]] = Column(indexes[0], stripped[indexes[0]], target)

    custom = 0
    for index, header in enumerate(stripped):
        if index in plan:
            continue
        if not header:
            plan[index] = Column(index, header, None)  # a column without a header is ignored
            continue
        if header_key(header) in RESERVED_KEYS or header.lower() in RESERVED_KEYS:
            raise InvalidInput(
                f"the column {header!r} is not used because another column is the {header_key(header)}; "
                "map it to fields.<name> or to null",
                {"field": "mapping"},
            )
        try:
            key = clean_field_key(header)
        except InvalidInput as exc:
            shown = header if len(header) <= 40 else header[:40] + "…"
            raise InvalidInput(
                f"the column {shown!r} cannot be a custom field: {exc.message}", {"field": "file"}
            ) from None
        plan[index] = Column(index, header, "fields", key)
        custom += 1
    if "phone" not in taken:
        shown = ", ".join(repr(h) for h in stripped[:20])
        raise InvalidInput(
            f"the file has no phone column (its header is {shown}); name it phone or map one with mapping",
            {"field": "file"},
        )
    if custom > MAX_FIELDS:
        raise InvalidInput(
            f"{custom} columns would become custom fields (a lead has at most {MAX_FIELDS}); "
            "map the ones you do not need to null",
            {"field": "mapping"},
        )
    return [plan[i] for i in range(len(stripped))]


class RowError(Exception):
    def __init__(self, message: str, field_: str | None = None, *, counted: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.field = field_
        self.counted = counted  # False once the row is already counted in `rows`


@dataclass
class _ImportRun:
    user: User
    columns: list[Column]
    delimiter: str
    default_niche: str | None
    default_status: TargetStatus | None
    default_device: UUID | None
    report: ImportReport
    decoder: RowDecoder
    feed: _LineFeed = field(default_factory=_LineFeed)
    reader: Any = None
    device_ok: dict[UUID, bool] = field(default_factory=dict)
    batch: list[LeadDraft] = field(default_factory=list)
    next_progress: int = PROGRESS_EVERY

    def __post_init__(self) -> None:
        self.reader = csv.reader(self.feed, delimiter=self.delimiter)


# --- the service ----------------------------------------------------------------------------------------


class OptOutFollowUp(Protocol):
    """What follows a lead marked opted out by hand, or taken back (`services/optout.py` `OptOutActions`)."""

    async def opted_out(self, phone: str, now: datetime) -> int: ...

    async def opted_back_in(self, phone: str) -> None: ...


class LeadService:
    def __init__(
        self,
        leads: LeadRepository,
        devices: DeviceRepository,
        bus: EventBus,
        clock: Clock,
        *,
        phone_region: str = "MY",
        batch_size: int = IMPORT_BATCH,
        progress_every: int = PROGRESS_EVERY,
        opt_outs: OptOutFollowUp | None = None,
    ) -> None:
        self._leads = leads
        self._devices = devices
        self._bus = bus
        self._clock = clock
        self._opt_outs = opt_outs
        self._region = phone_region
        self._batch_size = batch_size
        self._progress_every = progress_every

    # --- reading ---------------------------------------------------------------------------------------

    def query_for(
        self,
        user: User,
        *,
        niche: str | None = None,
        target_status: str | None = None,
        trigger: str | None = None,
        device_id: str | None = None,
        search: str | None = None,
        opted_out: str | None = None,
    ) -> LeadQuery:
        """The caller's view of the leads (all for admins, their own for staff) narrowed by list filters as
        they arrive in a query string; empty filters are ignored."""
        device: UUID | None = None
        if device_id:
            try:
                device = UUID(device_id)
            except ValueError:
                raise InvalidInput(f"device_id is not an id: {device_id!r}", {"field": "device_id"}) from None
        flag: bool | None = None
        if opted_out:
            lowered = opted_out.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise InvalidInput("opted_out must be true or false", {"field": "opted_out"})
            flag = lowered in ("true", "1")
        return LeadQuery(
            owner_id=None if user.is_admin else user.id,
            niche=niche.strip() if niche else None,
            target_status=clean_target_status(target_status) if target_status else None,
            trigger=trigger.strip() if trigger else None,
            device_id=device,
            search=search.strip() if search and search.strip() else None,
            opted_out=flag,
        )

    async def list_page(
        self, user: User, query: LeadQuery, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Lead]:
        return await self._leads.list_page(self._scoped(user, query), limit, after)

    async def get(self, user: User, lead_id: UUID) -> Lead:
        lead = await self._leads.get(lead_id, None if user.is_admin else user.id)
        if lead is None:
            raise NotFound("lead not found")
        return lead

    # --- writing ---------------------------------------------------------------------------------------

    async def create(self, user: User, data: LeadInput) -> Lead:
        now = self._clock.now()
        lead = Lead(
            id=uuid.uuid4(),
            user_id=user.id,
            phone=self.clean_phone(data.phone),
            name=_text(data.name, "name", MAX_NAME),
            niche=_text(data.niche, "niche", MAX_NICHE),
            target_status=clean_target_status(data.target_status),
            triggers=clean_triggers(list(data.triggers)),
            device_id=await self._usable_device(user, data.device_id),
            notes=_text(data.notes, "notes", MAX_NOTES),
            fields=clean_fields(data.fields),
            created_at=now,
            updated_at=now,
        )
        added = await self._leads.add(lead)
        if added is None:
            existing = await self._leads.by_phone(user.id, lead.phone)
            details: dict[str, Any] = {"field": "phone"}
            if existing is not None:
                details["lead_id"] = str(existing.id)
            raise Conflict(f"you already have a lead with the phone {lead.phone}", details)
        return added

    async def update(self, user: User, lead_id: UUID, changes: LeadChanges) -> Lead:
        lead = await self.get(user, lead_id)
        values: dict[str, Any] = {}
        if not isinstance(changes.name, Unset):
            values["name"] = _text(changes.name, "name", MAX_NAME)
        if not isinstance(changes.phone, Unset):
            values["phone"] = self.clean_phone(changes.phone)
        if not isinstance(changes.niche, Unset):
            values["niche"] = _text(changes.niche, "niche", MAX_NICHE)
        if not isinstance(changes.target_status, Unset):
            values["target_status"] = clean_target_status(changes.target_status).value
        if not isinstance(changes.triggers, Unset):
            values["triggers"] = clean_triggers(list(changes.triggers))
        if not isinstance(changes.device_id, Unset):
            values["device_id"] = await self._usable_device(user, changes.device_id)
        if not isinstance(changes.notes, Unset):
            values["notes"] = _text(changes.notes, "notes", MAX_NOTES)
        if not isinstance(changes.fields, Unset):
            values["fields"] = clean_fields(changes.fields)
        if not isinstance(changes.opted_out, Unset) and changes.opted_out != (lead.opted_out_at is not None):
            values["opted_out_at"] = self._clock.now() if changes.opted_out else None
        if not values:
            return lead
        values["updated_at"] = self._clock.now()
        updated = await self._leads.update(lead_id, values)
        if updated is None:
            raise NotFound("lead not found")
        if self._opt_outs is not None and "opted_out_at" in values:
            if values["opted_out_at"] is not None:
                await self._opt_outs.opted_out(updated.phone, values["opted_out_at"])
            else:
                await self._opt_outs.opted_back_in(updated.phone)
        return updated

    async def delete(self, user: User, lead_id: UUID) -> None:
        await self.get(user, lead_id)
        await self._leads.delete(lead_id)

    # --- for planners and the opt-out path (no caller: the system sees every lead) -----------------------

    def iterate(self, query: LeadQuery, chunk: int = 1000) -> AsyncIterator[Lead]:
        """Every lead matching `query`, in creation order, read `chunk` at a time."""
        return self._leads.iterate(query, chunk)

    async def opt_out(self, phone: str, at: datetime | None = None) -> list[UUID]:
        """A contact asked to receive nothing more: mark every lead with this phone (digits, as in a JID) of
        every owner; returns the ids newly marked (already opted-out leads keep their first time)."""
        digits = "".join(ch for ch in phone if ch.isdigit())
        if not digits:
            return []
        return await self._leads.opt_out_phone(digits, at or self._clock.now())

    # --- export ----------------------------------------------------------------------------------------

    def export_filename(self) -> str:
        return f"leads-{self._clock.now().strftime('%Y%m%d-%H%M%S')}.csv"

    async def export_csv(self, query: LeadQuery) -> AsyncIterator[bytes]:
        """The leads of `query` (build it with `query_for`) as UTF-8 CSV with a BOM (so spreadsheet programs
        read it as UTF-8), in chunks of about 64 KiB. Two passes: the custom field names, then the rows."""
        keys = await self._leads.field_keys(query)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow([*EXPORT_COLUMNS, *keys])
        yield UTF8_BOM + buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
        async for lead in self._leads.iterate(query):
            writer.writerow(
                [
                    lead.name,
                    lead.phone,
                    lead.niche,
                    lead.target_status.value,
                    ",".join(lead.triggers),
                    str(lead.device_id) if lead.device_id else "",
                    lead.notes,
                    lead.opted_out_at.isoformat() if lead.opted_out_at else "",
                    *(lead.fields.get(k, "") for k in keys),
                ]
            )
            if buffer.tell() >= EXPORT_CHUNK:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        if buffer.tell():
            yield buffer.getvalue().encode()

    # --- import ----------------------------------------------------------------------------------------

    async def import_csv(
        self,
        user: User,
        chunks: AsyncIterable[bytes],
        options: ImportOptions,
        *,
        max_bytes: int | None = None,
    ) -> ImportReport:
        """Read a CSV as it arrives and upsert its rows into the caller's leads by phone, a batch at a time.

        Rows that fail validation are reported (`row` as in the file, with a sentence) and nothing of them is
        stored; a phone repeated in the file updates the lead its earlier row made (the later values win).
        An empty cell never erases an existing value; it gives a new lead the default. Progress goes to the
        caller's WebSocket as `leads.import.progress` every `progress_every` rows and at the end.
        Problems with the file as a whole (not text, no phone column, bad options) raise `InvalidInput`
        before anything is stored; passing `max_bytes` raises `ImportTooLarge` (batches already stored stay,
        the error's details say how many).
        """
        report = ImportReport(import_id=self._import_id(options.import_id))
        try:
            decoder = RowDecoder(encoding_option(options.encoding))
        except ValueError as exc:
            raise InvalidInput(str(exc), {"field": "encoding"}) from None
        defaults = await self._import_defaults(user, options)
        splitter = RecordSplitter()
        run: _ImportRun | None = None
        row = 0  # data rows seen, blank ones included (the numbering users see in a spreadsheet)
        received = 0
        first = True
        try:
            async for chunk in _coalesced(chunks, SNIFF_BYTES):
                received += len(chunk)
                if max_bytes is not None and received > max_bytes:
                    raise ImportTooLarge(
                        f"the file is larger than the upload limit of {max_bytes // (1024 * 1024)} MiB",
                        {"limit_bytes": max_bytes, "stored": report.summary()},
                    )
                if first:
                    first = False
                    chunk = _check_text(chunk, decoder)
                for record in splitter.feed(chunk):
                    if run is None:
                        run = self._start(user, record, options, defaults, report, splitter, decoder)
                        continue
                    row += 1
                    await self._row(run, row, record)
            for record in splitter.finish():
                if run is None:
                    run = self._start(user, record, options, defaults, report, splitter, decoder)
                    continue
                row += 1
                await self._row(run, row, record)
            if run is None:
                raise InvalidInput("the file is empty; it needs a header row and a row per lead", {"field": "file"})
            await self._flush(run)
            report.encoding = decoder.encoding
        except Exception as exc:
            if run is not None:  # tell the progress listeners the import ended
                await self._progress(user, report, done=True, error=_reason(exc))
            raise
        await self._progress(user, report, done=True)
        return report

    def _import_id(self, given: str | None) -> str:
        if given is None or not given.strip():
            return str(uuid.uuid4())
        text = given.strip()
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", text):
            raise InvalidInput("import_id must be 1 to 64 letters, digits or . _ : -", {"field": "import_id"})
        return text

    async def _import_defaults(
        self, user: User, options: ImportOptions
    ) -> tuple[str | None, TargetStatus | None, UUID | None]:
        niche = _text(options.default_niche, "default_niche", MAX_NICHE) if options.default_niche else None
        status = None
        if options.default_target_status and options.default_target_status.strip():
            status = clean_target_status(options.default_target_status, "default_target_status")
        device = None
        if options.device_id and options.device_id.strip():
            try:
                wanted = UUID(options.device_id.strip())
            except ValueError:
                raise InvalidInput("unknown device", {"field": "device_id"}) from None
            device = await self._usable_device(user, wanted)
        return niche or None, status, device

    def _start(
        self,
        user: User,
        record: Record,
        options: ImportOptions,
        defaults: tuple[str | None, TargetStatus | None, UUID | None],
        report: ImportReport,
        splitter: RecordSplitter,
        decoder: RowDecoder,
    ) -> _ImportRun:
        """Read the header row and plan the columns (any problem here stops the import before it stores)."""
        if record.problem is not None:
            raise InvalidInput(f"the header row cannot be read: {record.problem}", {"field": "file"})
        if b"\x00" in record.data:
            raise InvalidInput("the file is not text (it contains NUL bytes); upload a CSV file", {"field": "file"})
        try:
            text = decoder.decode(record.data)
        except ValueError:
            raise InvalidInput(
                f"the header row is not {LABELS[decoder.encoding]} text; save the file as CSV UTF-8", {"field": "file"}
            ) from None
        if not text.strip():
            raise InvalidInput("the first row of the file must be the header (it is empty)", {"field": "file"})
        delimiter = sniff_delimiter(text)
        splitter.delimiters = delimiter.encode()
        try:
            headers = next(csv.reader([text], delimiter=delimiter))
        except csv.Error as exc:
            raise InvalidInput(f"the header row cannot be read: {exc}", {"field": "file"}) from None
        columns = plan_columns(headers, options.mapping)
        niche, status, device = defaults
        return _ImportRun(user, columns, delimiter, niche, status, device, report, decoder)

    async def _row(self, run: _ImportRun, row: int, record: Record) -> None:
        try:
            cells = self._cells(run, record)
            if cells is None:
                return  # a blank line: skipped, but it keeps its number
            run.report.rows += 1
            draft = await self._draft(run, cells)
        except RowError as exc:
            if exc.counted:
                run.report.rows += 1
            run.report.fail(row, exc.message, exc.field)
            await self._maybe_progress(run)
            return
        run.batch.append(draft)
        if len(run.batch) >= self._batch_size:
            await self._flush(run)

    def _cells(self, run: _ImportRun, record: Record) -> list[str] | None:
        if record.problem is not None:
            raise RowError(record.problem)
        data = record.data
        if not data.strip():
            return None
        if b"\x00" in data:
            raise RowError("the row contains a NUL byte (is the file text?)")
        try:
            text = run.decoder.decode(data)
        except ValueError as exc:
            raise RowError(str(exc)) from None
        run.feed.line = text
        try:
            cells: list[str] = next(run.reader)
        except csv.Error as exc:
            raise RowError(f"the row cannot be read as CSV: {exc}") from None
        except StopIteration:
            return None
        if not any(c.strip() for c in cells):
            return None
        expected = len(run.columns)
        if len(cells) > expected and not any(c.strip() for c in cells[expected:]):
            cells = cells[:expected]
        if len(cells) != expected:
            raise RowError(f"the row has {len(cells)} values but the header has {expected} columns")
        return cells

    async def _draft(self, run: _ImportRun, cells: list[str]) -> LeadDraft:
        draft = LeadDraft(phone="")
        custom: dict[str, str] = {}
        for column in run.columns:
            if column.target is None:
                continue
            value = cells[column.index].strip()
            target = column.target
            if target == "fields":
                if value:
                    if len(value) > MAX_FIELD_VALUE:
                        raise RowError(f"{column.header} is longer than {MAX_FIELD_VALUE} characters", column.header)
                    custom[column.key] = value
                continue
            try:
                await self._set(run, draft, target, value)
            except InvalidInput as exc:
                raise RowError(exc.message, target, counted=False) from None
        if not draft.phone:
            raise RowError("the phone is missing", "phone", counted=False)
        if draft.niche is None and run.default_niche:
            draft.niche = run.default_niche
        if draft.target_status is None and run.default_status is not None:
            draft.target_status = run.default_status
        if draft.device_id is None and run.default_device is not None:
            draft.device_id = run.default_device
        if custom:
            draft.fields = custom
        return draft

    async def _set(self, run: _ImportRun, draft: LeadDraft, target: str, value: str) -> None:
        if target == "phone":
            draft.phone = self.clean_phone(value) if value else ""
        elif not value:
            return
        elif target == "name":
            draft.name = _text(value, "name", MAX_NAME)
        elif target == "niche":
            draft.niche = _text(value, "niche", MAX_NICHE)
        elif target == "target_status":
            draft.target_status = clean_target_status(value)
        elif target == "triggers":
            draft.triggers = clean_triggers(value) or None
        elif target == "notes":
            draft.notes = _text(value, "notes", MAX_NOTES)
        elif target == "device_id":
            try:
                wanted = UUID(value)
            except ValueError:
                raise InvalidInput(f"device_id {value[:40]!r} is not a device id", {"field": "device_id"}) from None
            try:
                draft.device_id = await self._usable_device(run.user, wanted, run.device_ok)
            except InvalidInput:
                raise InvalidInput(
                    f"unknown device: {wanted} is not a device you may use", {"field": "device_id"}
                ) from None
        elif target == "opted_out_at":
            draft.opted_out_at = parse_time(value, "opted_out_at")

    async def _flush(self, run: _ImportRun) -> None:
        if run.batch:
            counts = await self._leads.upsert_many(run.user.id, run.batch, self._clock.now())
            run.report.created += counts.created
            run.report.updated += counts.updated
            run.batch = []
        await self._maybe_progress(run)

    async def _maybe_progress(self, run: _ImportRun) -> None:
        done = run.report.created + run.report.updated + run.report.failed_count
        if done >= run.next_progress:
            while run.next_progress <= done:
                run.next_progress += self._progress_every
            await self._progress(run.user, run.report, done=False)

    async def _progress(self, user: User, report: ImportReport, *, done: bool, error: str | None = None) -> None:
        data: dict[str, Any] = {**report.summary(), "done": done}
        if error is not None:
            data["error"] = error
        try:
            await self._bus.publish(BusEvent(type=LEADS_IMPORT_PROGRESS, data=data, user_id=user.id))
        except Exception:  # progress is a courtesy; the import itself must not fail for it
            log.warning("could not publish import progress", exc_info=True)

    # --- helpers ---------------------------------------------------------------------------------------

    def clean_phone(self, raw: str) -> str:
        text = raw.strip()
        if not text:
            raise InvalidInput("phone is required", {"field": "phone"})
        if len(text) > MAX_PHONE_TEXT:
            raise InvalidInput(f"phone is too long to be a phone number ({len(text)} characters)", {"field": "phone"})
        try:
            return normalise_phone(text, self._region)
        except InvalidInput as exc:
            # Digits that are no number of the region may be E.164 without '+' (as exports and JIDs write them).
            digits = re.sub(r"[\s.()-]", "", text)
            if digits.isdigit() and not digits.startswith("0"):
                try:
                    return normalise_phone("+" + digits, self._region)
                except InvalidInput:
                    pass
            if not any(ch.isdigit() for ch in text):
                raise InvalidInput(
                    f"phone {text!r} has no digits: it is not a phone number", {"field": "phone"}
                ) from None
            raise InvalidInput(
                f"phone {text!r} is not a valid phone number (without a country code it is read as {self._region})",
                {"field": "phone"},
            ) from exc

    async def _usable_device(
        self, user: User, device_id: UUID | None, cache: dict[UUID, bool] | None = None
    ) -> UUID | None:
        if device_id is None:
            return None
        visible = cache.get(device_id) if cache is not None else None
        if visible is None:
            visible = await self._devices.get(device_id, scope_of(user)) is not None
            if cache is not None and len(cache) < 10_000:
                cache[device_id] = visible
        if not visible:
            raise InvalidInput("unknown device", {"field": "device_id", "device_id": str(device_id)})
        return device_id

    @staticmethod
    def _scoped(user: User, query: LeadQuery) -> LeadQuery:
        """Staff only ever see their own leads, whatever the query says."""
        if user.is_admin or query.owner_id == user.id:
            return query
        return replace(query, owner_id=user.id)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DomainError):
        return exc.message
    return "the import stopped before the end of the file"


def _check_text(first: bytes, decoder: RowDecoder) -> bytes:
    """Refuse files that are plainly not CSV text; drop a UTF-8 byte order mark (the file is then UTF-8); let the
    decoder decide the encoding from the file's start."""
    for signature, kind in NOT_TEXT_SIGNATURES:
        if first.startswith(signature):
            raise InvalidInput(f"the file is {kind}, not CSV; save it as CSV UTF-8 and upload that", {"field": "file"})
    if first.startswith(UTF8_BOM):
        decoder.settle_utf8()
    first = first.removeprefix(UTF8_BOM)
    decoder.sniff(first)
    return first


async def _coalesced(chunks: AsyncIterable[bytes], first_size: int) -> AsyncIterator[bytes]:
    """The chunks as they come, except that the first holds at least `first_size` bytes (or the whole file),
    so the file's signature can be checked and its encoding told."""
    head = bytearray()
    started = False
    async for chunk in chunks:
        if started:
            yield chunk
            continue
        head += chunk
        if len(head) >= first_size:
            started = True
            yield bytes(head)
            head.clear()
    if not started and head:
        yield bytes(head)
