"""Message templates: placeholders, spintax and time-of-day greetings. Pure: no I/O, no framework.

Syntax (what campaign and sequence messages may contain):

- Placeholders: `{name}`, `{first_name}`, `{phone}` (shown as +E.164), `{greeting}` and custom fields `{key}`
  from `lead.fields`. Keys are case-insensitive, and `-` or spaces in a field's key count as `_` (a CSV column
  "Company Name" is `{company_name}`). Built-in names win over custom fields with the same key. A placeholder
  nobody knows is left exactly as written, so `{not_a_field}` is never eaten. Values are inserted as they are:
  braces inside a lead's name or field are not template syntax.
- Names: whitespace is collapsed; a name without any letter (empty, or a phone number stored as a name) counts
  as missing and renders as the language's fallback word (`Greetings.name_fallback`, default "" in every
  language; set e.g. {"ms": "tuan/puan"} for a neutral word). When a placeholder renders empty, one run of
  spaces before it goes too if punctuation, a line break or the end follows ("Hi {name}, …" → "Hi, …").
- Spintax: `{a|b|c}` picks one option. A brace group is spintax only if it has `|` at its own level; options
  nest (`{Hi|Hello {there|friend}}`) and may hold placeholders, rendered after the choice
  (`{Hi {name}|Hello {name}}`). Options may be empty (`{!|}`), though `validate` warns about it.
- Escapes: `{{` is a literal `{`, `}}` a literal `}` (`{{name}}` renders `{name}`). Inside a group, `}}` closes
  the group (then the outer one) unless an escaped `{{` in the same group is waiting for its `}}`. An option
  cannot start with a nested group right after the opening brace (`{{` is an escape): write `{d|{a|b} c}`.
- A group that is neither spintax nor a placeholder (`{see above}`, `{}`) keeps its braces; groups inside it are
  still rendered. Unbalanced braces are left as text; rendering never raises on any template. `validate`
  reports those problems for the API (errors: unbalanced braces, nesting deeper than `MAX_DEPTH`; warnings:
  empty spintax options, unknown placeholders).
- Nothing outside placeholders and spintax is touched: URLs, numbers, e-mail addresses and codes pass through
  byte for byte (no homoglyphs, no zero-width characters, no spacing changes; cf. the seed system's bugs).

Greetings (`{greeting}`): the text of the slot the local time falls in, in the time zone given (an IANA zone via
`zoneinfo`, so daylight saving is handled; never a hand-written offset). Defaults (`DEFAULT_GREETINGS`):

    ms: 05:00 Selamat pagi · 12:00 Selamat tengah hari · 14:00 Selamat petang · 19:00 Selamat malam
    en: 05:00 Good morning · 12:00 Good afternoon     · 18:00 Good evening

A slot runs from its start to the next slot's start; before the first start it is still the last slot of the
previous day (04:59 is "Selamat malam"). Unknown languages use `Greetings.default_language` ("ms").

Determinism: every random choice is drawn from the `random.Random` given, depth first and left to right, and
only for the options actually chosen, so a seeded generator (see `seeded_rng`) reproduces a rendering exactly.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Literal, Protocol, TypeAlias
from zoneinfo import ZoneInfo

__all__ = [
    "BUILTIN_PLACEHOLDERS",
    "DEFAULT_GREETINGS",
    "MAX_DEPTH",
    "GreetingSlot",
    "Greetings",
    "IssueCode",
    "Severity",
    "TemplateIssue",
    "TemplateLead",
    "normalise_key",
    "placeholders",
    "render",
    "seeded_rng",
    "validate",
]

MAX_DEPTH = 20  # nesting deeper than this is literal text (and a validation error)
BUILTIN_PLACEHOLDERS = frozenset({"name", "first_name", "phone", "greeting"})

Severity = Literal["error", "warning"]
IssueCode = Literal["unbalanced_brace", "too_deep", "empty_option", "unknown_placeholder"]


class TemplateLead(Protocol):
    """What rendering reads from a lead (`domain.models.Lead` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def phone(self) -> str: ...  # E.164 digits, with or without '+'

    @property
    def fields(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class GreetingSlot:
    start: time  # local wall-clock time this greeting starts
    text: str


def _slots(*pairs: tuple[str, str]) -> tuple[GreetingSlot, ...]:
    return tuple(GreetingSlot(time.fromisoformat(start), text) for start, text in pairs)


@dataclass(frozen=True, eq=False)
class Greetings:
    """Greeting texts by language and time of day, and the word used for a lead without a name."""

    slots: Mapping[str, Sequence[GreetingSlot]]
    name_fallback: Mapping[str, str] = field(default_factory=dict)  # language → word; missing: ""
    default_language: str = "ms"
    # Each language's texts, looked up once per paced greeting message (`regreet`), so built once here.
    _texts: Mapping[str, frozenset[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.default_language not in self.slots:
            raise ValueError(f"no greetings for the default language {self.default_language!r}")
        for language, slots in self.slots.items():
            starts = [slot.start for slot in slots]
            if not starts:
                raise ValueError(f"no greeting slots for {language!r}")
            if any(s.tzinfo is not None for s in starts) or starts != sorted(set(starts)):
                raise ValueError(f"greeting slots of {language!r} must start at distinct, ascending local times")
        texts = {language: frozenset(slot.text for slot in slots) for language, slots in self.slots.items()}
        object.__setattr__(self, "_texts", texts)  # frozen

    @property
    def languages(self) -> frozenset[str]:
        return frozenset(self.slots)

    def language(self, language: str | None) -> str:
        """The language used for `language` (the default when unknown)."""
        return language if language is not None and language in self.slots else self.default_language

    def text_at(self, local: time, language: str | None = None) -> str:
        """The greeting for a local wall-clock time."""
        slots = self.slots[self.language(language)]
        local = local.replace(tzinfo=None, fold=0)
        chosen = slots[-1]  # before the first start: still the previous day's last slot
        for slot in slots:
            if slot.start <= local:
                chosen = slot
        return chosen.text

    def greeting(self, now: datetime, tz: ZoneInfo, language: str | None = None) -> str:
        """The greeting for the instant `now` (timezone-aware) as lived in `tz`."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        return self.text_at(now.astimezone(tz).time(), language)

    def texts(self, language: str | None = None) -> frozenset[str]:
        return self._texts[self.language(language)]

    def fallback_name(self, language: str | None = None) -> str:
        return self.name_fallback.get(self.language(language), "")

    def with_texts(self, texts: Mapping[str, Sequence[tuple[str, str]]]) -> Greetings:
        """These greetings with the slots of the languages in `texts` ((local start "HH:MM", text) pairs)
        replaced or added (`WAMD_GREETINGS`)."""
        slots = {**self.slots, **{language: _slots(*pairs) for language, pairs in texts.items()}}
        return Greetings(slots, self.name_fallback, self.default_language)


DEFAULT_GREETINGS = Greetings(
    slots={
        "ms": _slots(
            ("05:00", "Selamat pagi"),
            ("12:00", "Selamat tengah hari"),
            ("14:00", "Selamat petang"),
            ("19:00", "Selamat malam"),
        ),
        "en": _slots(("05:00", "Good morning"), ("12:00", "Good afternoon"), ("18:00", "Good evening")),
    },
    name_fallback={"ms": "", "en": ""},
)


@dataclass(frozen=True)
class TemplateIssue:
    code: IssueCode
    severity: Severity
    message: str
    position: int  # index into the template (0-based, in characters)


def seeded_rng(*parts: object) -> random.Random:
    """A generator seeded from `parts` (e.g. campaign id and lead id): the same parts, the same rendering."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def normalise_key(key: str) -> str:
    """How placeholder and field keys compare: case-insensitive, `-` and spaces as `_`."""
    return re.sub(r"[\s\-]+", "_", key.strip()).casefold()


# --- parsing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Group:
    start: int  # index of '{'
    end: int  # index of the matching '}'
    options: tuple[tuple[_Node, ...], ...]  # one option: a placeholder or a plain brace group


_Node: TypeAlias = _Text | _Group


@dataclass
class _Frame:
    start: int
    options: list[list[_Node]]
    escaped: int = 0  # `{{` escapes in this group still waiting for their `}}`
    deep: int = 0  # literal `{` (beyond MAX_DEPTH) waiting for their `}`


@dataclass(frozen=True)
class _Parsed:
    nodes: tuple[_Node, ...]
    issues: tuple[TemplateIssue, ...]


_SPECIAL = re.compile(r"[{}|]")
_KEY = re.compile(r"\s*([^\W\d][\w\-]{0,63})\s*")


@functools.lru_cache(maxsize=256)
def _parse(template: str) -> _Parsed:
    root: list[_Node] = []
    stack: list[_Frame] = []
    issues: list[TemplateIssue] = []
    buf: list[str] = []

    def current() -> list[_Node]:
        return stack[-1].options[-1] if stack else root

    def flush() -> None:
        if buf:
            current().append(_Text("".join(buf)))
            buf.clear()

    def close(at: int) -> None:
        flush()
        frame = stack.pop()
        group = _Group(frame.start, at, tuple(tuple(option) for option in frame.options))
        current().append(group)

    i, n = 0, len(template)
    while i < n:
        match = _SPECIAL.search(template, i)
        if match is None:
            buf.append(template[i:])
            break
        j = match.start()
        if j > i:
            buf.append(template[i:j])
        char, pair = template[j], template[j : j + 2]
        if pair == "{{":
            buf.append("{")
            if stack:
                stack[-1].escaped += 1
            i = j + 2
        elif char == "{":
            if len(stack) >= MAX_DEPTH:
                buf.append("{")
                stack[-1].deep += 1
                issues.append(_issue("too_deep", j, f"braces nest deeper than {MAX_DEPTH} levels"))
            else:
                flush()
                stack.append(_Frame(j, [[]]))
            i = j + 1
        elif char == "|":
            if stack:
                flush()
                stack[-1].options.append([])
            else:
                buf.append("|")
            i = j + 1
        elif not stack:  # '}' outside any group
            buf.append("}")
            if pair == "}}":
                i = j + 2
            else:
                issues.append(_issue("unbalanced_brace", j, "'}' without an opening '{' (write }} for a literal })"))
                i = j + 1
        elif pair == "}}" and stack[-1].escaped:
            buf.append("}")
            stack[-1].escaped -= 1
            i = j + 2
        elif stack[-1].deep:
            buf.append("}")
            stack[-1].deep -= 1
            i = j + 1
        else:
            close(j)
            i = j + 1
    flush()
    while stack:  # never closed: the brace is text, its options' separators too
        frame = stack.pop()
        issues.append(_issue("unbalanced_brace", frame.start, "'{' is never closed (write {{ for a literal {)"))
        target = current()
        target.append(_Text("{"))
        for k, option in enumerate(frame.options):
            if k:
                target.append(_Text("|"))
            target.extend(option)
    issues.sort(key=lambda issue: issue.position)
    return _Parsed(tuple(root), tuple(issues))


def _issue(code: IssueCode, position: int, message: str) -> TemplateIssue:
    severity: Severity = "error" if code in ("unbalanced_brace", "too_deep") else "warning"
    return TemplateIssue(code, severity, message, position)


def _placeholder_key(group: _Group) -> str | None:
    """The normalised key when the group is a placeholder candidate (`{word}`), else None."""
    if len(group.options) != 1 or len(group.options[0]) != 1:
        return None
    only = group.options[0][0]
    if not isinstance(only, _Text):
        return None
    match = _KEY.fullmatch(only.text)
    return normalise_key(match.group(1)) if match else None


# --- rendering -------------------------------------------------------------------------------------------

_EMPTY = "\x00"  # marks a placeholder that rendered empty, for tidying the spaces around it
_EMPTY_BEFORE_BREAK = re.compile(r"[ \t]+\x00(?=\s|[,.!?;:)\]]|$)")
_EMPTY_AT_LINE_START = re.compile(r"(?m)^\x00[ \t]*")


@dataclass
class _Context:
    template: str
    lead: TemplateLead | None
    now: datetime
    tz: ZoneInfo
    language: str
    rng: random.Random
    greetings: Greetings
    name_fallback: str | None
    mark_empty: bool
    greeting_mark: str | None = None  # rendered in place of `{greeting}` (see `render_with_greeting`)
    _fields: dict[str, str] | None = None

    def fields(self) -> dict[str, str]:
        if self._fields is None:
            raw = self.lead.fields if self.lead is not None else {}
            self._fields = {normalise_key(str(k)): "" if v is None else str(v) for k, v in raw.items()}
        return self._fields

    def name(self) -> str:
        name = " ".join((self.lead.name if self.lead is not None else "").split())
        if any(ch.isalpha() for ch in name):
            return name
        return self.name_fallback if self.name_fallback is not None else self.greetings.fallback_name(self.language)

    def value(self, key: str) -> str | None:
        if key == "name":
            return self.name()
        if key == "first_name":
            name = self.name()
            return name.split()[0] if name.strip() else name
        if key == "phone":
            digits = (self.lead.phone if self.lead is not None else "").strip().lstrip("+")
            return f"+{digits}" if digits else ""
        if key == "greeting":
            return self.greeting_mark or self.greetings.greeting(self.now, self.tz, self.language)
        return self.fields().get(key)


def _render_nodes(nodes: Sequence[_Node], ctx: _Context, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif len(node.options) > 1:
            _render_nodes(ctx.rng.choice(node.options), ctx, out)
        else:
            key = _placeholder_key(node)
            value = ctx.value(key) if key is not None else None
            if value is not None:
                value = value.replace("\x00", "")
                if ctx.greeting_mark and key != "greeting":
                    value = value.replace(ctx.greeting_mark, "")
                out.append(value if value or not ctx.mark_empty else _EMPTY)
            elif key is not None:  # unknown placeholder: exactly as written
                out.append(ctx.template[node.start : node.end + 1])
            else:  # a plain brace group: braces kept, its inside rendered
                out.append("{")
                _render_nodes(node.options[0], ctx, out)
                out.append("}")


def render(
    template: str,
    lead: TemplateLead | None,
    *,
    now: datetime,
    tz: ZoneInfo,
    language: str = "ms",
    rng: random.Random | None = None,
    greetings: Greetings | None = None,
    name_fallback: str | None = None,
    greeting_mark: str | None = None,
) -> str:
    """The message for `lead` at the instant `now` (timezone-aware; greetings use its local time in `tz`).

    `rng` decides spintax (a fresh unseeded generator when None); `greetings` defaults to `DEFAULT_GREETINGS`;
    `name_fallback` overrides the greetings' fallback word for a missing name. Never raises on any template.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    chosen = greetings or DEFAULT_GREETINGS
    ctx = _Context(
        template=template,
        lead=lead,
        now=now,
        tz=tz,
        language=chosen.language(language),
        rng=rng if rng is not None else random.Random(),
        greetings=chosen,
        name_fallback=name_fallback,
        mark_empty=_EMPTY not in template,
        greeting_mark=greeting_mark,
    )
    out: list[str] = []
    _render_nodes(_parse(template).nodes, ctx, out)
    text = "".join(out)
    if ctx.mark_empty and _EMPTY in text:
        text = _EMPTY_AT_LINE_START.sub("", _EMPTY_BEFORE_BREAK.sub("", text)).replace(_EMPTY, "")
    return text


_GREETING_MARK = "\x02"


def render_with_greeting(
    template: str,
    lead: TemplateLead | None,
    *,
    now: datetime,
    tz: ZoneInfo,
    language: str = "ms",
    rng: random.Random | None = None,
    greetings: Greetings | None = None,
) -> tuple[str, str | None]:
    """`render`, and where the text holds its greeting, for `regreet`: "<language>:<length>:<start>,<start>…"
    (None: no greeting). A message queued now and sent hours later then greets with the time it is sent."""
    chosen = greetings or DEFAULT_GREETINGS
    mark = _GREETING_MARK if "greeting" in template.casefold() and _GREETING_MARK not in template else None
    marked = render(template, lead, now=now, tz=tz, language=language, rng=rng, greetings=chosen, greeting_mark=mark)
    if mark is None or mark not in marked:  # no greeting, or in a spintax option not chosen
        return marked, None
    lang = chosen.language(language)
    greeting = chosen.greeting(now, tz, lang)
    parts = marked.split(_GREETING_MARK)
    starts, at = [], len(parts[0])
    for part in parts[1:]:
        starts.append(at)
        at += len(greeting) + len(part)
    return greeting.join(parts), f"{lang}:{len(greeting)}:" + ",".join(map(str, starts))


def regreet(text: str, where: str, now: datetime, tz: ZoneInfo, greetings: Greetings | None = None) -> str:
    """`text` (from `render_with_greeting`) with the greeting of the instant `now`; the same string when that is
    the greeting it holds, or when the text no longer holds a greeting at those places (edited since)."""
    chosen = greetings or DEFAULT_GREETINGS
    try:
        language, length_text, starts_text = where.split(":")
        length, starts = int(length_text), [int(s) for s in starts_text.split(",")]
    except ValueError:
        return text
    old = text[starts[0] : starts[0] + length]
    if old not in chosen.texts(language) or any(text[s : s + length] != old for s in starts):
        return text
    new = chosen.greeting(now, tz, language)
    if new == old:
        return text
    pieces, last = [], 0
    for start in starts:
        pieces += [text[last:start], new]
        last = start + length
    pieces.append(text[last:])
    return "".join(pieces)


# --- inspection ------------------------------------------------------------------------------------------


def _walk(nodes: Sequence[_Node]) -> Iterable[_Group]:
    for node in nodes:
        if isinstance(node, _Group):
            yield node
            for option in node.options:
                yield from _walk(option)


def placeholders(template: str) -> list[str]:
    """The normalised keys of every placeholder in the template (in every spintax option), in order, once."""
    keys = (_placeholder_key(group) for group in _walk(_parse(template).nodes))
    return list(dict.fromkeys(key for key in keys if key is not None))


def validate(template: str, *, known_fields: Iterable[str] | None = None) -> list[TemplateIssue]:
    """Problems in a template, by position: errors (unbalanced braces, nesting too deep) and warnings (empty
    spintax options, unknown placeholders). `known_fields` are the custom field keys a lead has; None when no
    lead is at hand (then every custom placeholder is reported, as it is filled only for leads having it)."""
    parsed = _parse(template)
    issues = list(parsed.issues)
    known = None if known_fields is None else {normalise_key(k) for k in known_fields}
    for group in _walk(parsed.nodes):
        if len(group.options) > 1:
            if any(_is_blank(option) for option in group.options):
                issues.append(_issue("empty_option", group.start, "a spintax option is empty"))
            continue
        key = _placeholder_key(group)
        if key is None or key in BUILTIN_PLACEHOLDERS:
            continue
        written = template[group.start : group.end + 1]
        if known is None:
            message = (
                f"{written} is not a built-in placeholder: it is filled from a lead's custom field {key!r} "
                "and left as written for leads without one"
            )
            issues.append(_issue("unknown_placeholder", group.start, message))
        elif key not in known:
            message = f"{written} is neither a built-in placeholder nor a field of this lead: it stays as written"
            issues.append(_issue("unknown_placeholder", group.start, message))
    issues.sort(key=lambda issue: issue.position)
    return issues


def _is_blank(option: Sequence[_Node]) -> bool:
    return all(isinstance(node, _Text) and not node.text.strip() for node in option)
