"""Message templates: placeholders, spintax, escapes, greetings in a time zone, determinism and validation."""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest

from wamd_server.services.templating import (
    DEFAULT_GREETINGS,
    MAX_DEPTH,
    Greetings,
    GreetingSlot,
    placeholders,
    regreet,
    render,
    render_with_greeting,
    seeded_rng,
    validate,
)

KL = ZoneInfo("Asia/Kuala_Lumpur")
NEW_YORK = ZoneInfo("America/New_York")
NOON_KL = datetime(2024, 6, 3, 4, 30, tzinfo=UTC)  # 12:30 in Kuala Lumpur


@dataclass
class FakeLead:
    name: str = "Aisyah binti Ahmad"
    phone: str = "60123456789"
    fields: Mapping[str, str] = field(default_factory=lambda: {"Company Name": "Kedai Runcit", "city": "Ipoh"})


def r(template: str, lead: FakeLead | None = None, seed: int = 0, **kw: object) -> str:
    options: dict[str, object] = {"now": NOON_KL, "tz": KL, "rng": random.Random(seed)}
    options.update(kw)
    return render(template, FakeLead() if lead is None else lead, **options)  # type: ignore[arg-type]


def outcomes(template: str, seeds: int = 200, **kw: object) -> set[str]:
    return {r(template, seed=seed, **kw) for seed in range(seeds)}


# --- placeholders ----------------------------------------------------------------------------------------


def test_builtin_placeholders() -> None:
    assert r("{name}|{first_name}|{phone}") == "Aisyah binti Ahmad|Aisyah|+60123456789"
    assert r("{greeting}") == "Selamat tengah hari"
    assert r("{greeting}", language="en") == "Good afternoon"
    assert r("{phone}", FakeLead(phone="+60123456789")) == "+60123456789"


def test_custom_fields_are_case_insensitive_and_spaces_count_as_underscores() -> None:
    assert r("{city} {CITY} {City}") == "Ipoh Ipoh Ipoh"
    assert r("{company_name} / {Company-Name} / { company_name }") == "Kedai Runcit / Kedai Runcit / Kedai Runcit"
    # built-in names win over a field with the same key
    assert r("{name}", FakeLead(fields={"NAME": "from field"})) == "Aisyah binti Ahmad"


def test_unknown_placeholders_are_left_exactly_as_written() -> None:
    for template in ("{not_a_field}", "{ Not_A_Field }", "Kod: {kod-promo}!", "{x}{y}", "{ }", "{}", "{see above}"):
        assert r(template) == template


def test_values_are_inserted_as_text_not_parsed() -> None:
    lead = FakeLead(name="Ali {a|b} {{x}}", fields={"note": "{name}"})
    assert r("{name}: {note}", lead) == "Ali {a|b} {{x}}: {name}"


def test_a_missing_name_uses_the_fallback_word_and_tidies_the_space_before_it() -> None:
    nameless = FakeLead(name="")
    assert r("Hi {name}, apa khabar?", nameless) == "Hi, apa khabar?"
    assert r("{greeting} {name}\nSaya Ali.", nameless) == "Selamat tengah hari\nSaya Ali."
    assert r("{name} sila balas", nameless) == "sila balas"
    assert r("Hi {first_name}!", nameless) == "Hi!"
    assert r("Hi {name} dan kawan", nameless) == "Hi dan kawan"
    # a name that is only a phone number or punctuation counts as missing
    assert r("Hi {name}.", FakeLead(name="+60 12-345 6789")) == "Hi."
    assert r("Hi {name}.", FakeLead(name="  Ali   Baba ")) == "Hi Ali Baba."
    # configurable: per call, or per language through the greetings
    assert r("Hi {name}, ok", nameless, name_fallback="there") == "Hi there, ok"
    custom = Greetings(DEFAULT_GREETINGS.slots, name_fallback={"ms": "tuan/puan", "en": "there"})
    assert r("Hai {name}", nameless, greetings=custom) == "Hai tuan/puan"
    assert r("Hi {first_name}", nameless, greetings=custom, language="en") == "Hi there"


def test_rendering_without_a_lead() -> None:
    assert render("{greeting} {name}, {phone}.", None, now=NOON_KL, tz=KL) == "Selamat tengah hari,."


# --- spintax ---------------------------------------------------------------------------------------------


def test_spintax_picks_each_option() -> None:
    assert outcomes("{Hi|Hello|Hey} there") == {"Hi there", "Hello there", "Hey there"}


def test_nested_spintax() -> None:
    assert outcomes("{Hi|Hello {there|friend}}!") == {"Hi!", "Hello there!", "Hello friend!"}
    assert outcomes("{a|{b|{c|d}}}") == {"a", "b", "c", "d"}
    assert outcomes("{d|{a|b} c}") == {"d", "a c", "b c"}


def test_placeholders_inside_spintax_render_after_the_choice() -> None:
    # the seed system ran spintax first and sent the literal word "name"
    assert outcomes("{Hi {name}|Hello {name}}") == {"Hi Aisyah binti Ahmad", "Hello Aisyah binti Ahmad"}
    assert outcomes("{ {name}|{first_name}}") == {" Aisyah binti Ahmad", "Aisyah"}
    # `{{` is always an escape, so an option cannot open with a group right after the brace; validation says so
    assert r("{{name}|{first_name}}") == "{name}|Aisyah}"
    assert [i.code for i in validate("{{name}|{first_name}}")] == ["unbalanced_brace", "unbalanced_brace"]
    assert outcomes("{Salam|{greeting}} {city}") == {"Salam Ipoh", "Selamat tengah hari Ipoh"}


def test_empty_options_are_allowed() -> None:
    assert outcomes("Terima kasih{!|}") == {"Terima kasih!", "Terima kasih"}


def test_escaped_braces() -> None:
    assert r("{{name}}") == "{name}"
    assert r("{{literal}} and }} and {{") == "{literal} and } and {"
    assert r("{{{name}}}") == "{Aisyah binti Ahmad}"
    assert outcomes("{Say {{hi}}|Bye}") == {"Say {hi}", "Bye"}
    assert r('JSON: {{"a": 1}}') == 'JSON: {"a": 1}'


def test_a_group_without_pipe_keeps_its_braces_and_renders_inside() -> None:
    assert r("{Hi {first_name}}") == "{Hi Aisyah}"


def test_unbalanced_braces_are_left_as_text() -> None:
    for template in ("x } y { z", "{a|b", "a|b}", "}{", "{", "}", "{{{", "|||"):
        assert r(template) == template.replace("{{", "{")
    assert outcomes("{a|b {c|d}") == {"{a|b c", "{a|b d"}


def test_deep_nesting_never_raises() -> None:
    deep = "{a|" * (MAX_DEPTH + 10) + "x" + "}" * (MAX_DEPTH + 10)
    assert "a" in outcomes(deep)
    plain = "{a " * (MAX_DEPTH + 10) + "x" + "}" * (MAX_DEPTH + 10)  # groups without '|' keep their braces
    assert r(plain) == plain
    assert any(issue.code == "too_deep" for issue in validate(deep))


def test_rendering_never_raises_on_any_template() -> None:
    rng = random.Random(7)
    alphabet = ["{", "}", "|", "{{", "}}", "a", " ", "{name}", "{x}", "\n", ",", "\x00"]
    for _ in range(2000):
        template = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        text = render(template, FakeLead(name=""), now=NOON_KL, tz=KL, rng=random.Random(1))
        assert isinstance(text, str)
        validate(template)


# --- what must never change ------------------------------------------------------------------------------

PROTECTED = [
    "https://example.com/promo?id=123&ref=a_b-c#top",
    "http://bit.ly/3xYzAbC",
    "www.kedai-runcit.my/p/0012",
    "ali.baba+sales@example.co.my",
    "60123456789",
    "+60 12-345 6789",
    "RM1,299.00",
    "50%",
    "PROMO2024",
    "X7K-99Q-ZZ1",
    "0.5",
    "2024-06-03",
    "12:30",
]


def test_urls_numbers_emails_and_codes_pass_through_untouched() -> None:
    """Property-style: random templates mixing protected text with spintax and placeholders, many seeds."""
    rng = random.Random(2024)
    pieces = ["{Hi|Hello|Salam}", "{name}", "{greeting}", "{a|{b|c}}", "{city}", "{{", "}}", "!", ", ", "\n", " "]
    for case in range(300):
        tokens = rng.sample(PROTECTED, 4)
        parts: list[str] = []
        for token in tokens:
            parts += [rng.choice(pieces), " ", token, " ", rng.choice(pieces)]
        template = "".join(parts)
        for seed in range(5):
            text = render(template, FakeLead(), now=NOON_KL, tz=KL, rng=random.Random(case * 10 + seed))
            for token in tokens:
                assert token in text, (template, text)
            assert not any(ch in text for ch in "\u200b\u200c\u200d\u2060\ufeff"), text
            assert all(ord(ch) < 128 for ch in text), text  # no homoglyphs: ASCII in, ASCII out


def test_text_without_template_syntax_is_returned_byte_for_byte() -> None:
    rng = random.Random(5)
    alphabet = string.ascii_letters + string.digits + string.punctuation.replace("{", "").replace("}", "") + " \n\t"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        assert r(text, seed=rng.randint(0, 10**6)) == text


# --- greetings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "ms", "en"),
    [
        ("00:00", "Selamat malam", "Good evening"),
        ("04:59", "Selamat malam", "Good evening"),
        ("05:00", "Selamat pagi", "Good morning"),
        ("11:59", "Selamat pagi", "Good morning"),
        ("12:00", "Selamat tengah hari", "Good afternoon"),
        ("13:59", "Selamat tengah hari", "Good afternoon"),
        ("14:00", "Selamat petang", "Good afternoon"),
        ("17:59", "Selamat petang", "Good afternoon"),
        ("18:00", "Selamat petang", "Good evening"),
        ("18:59", "Selamat petang", "Good evening"),
        ("19:00", "Selamat malam", "Good evening"),
        ("23:59", "Selamat malam", "Good evening"),
    ],
)
def test_greeting_boundaries_in_kuala_lumpur_and_london(local: str, ms: str, en: str) -> None:
    at = time.fromisoformat(local)
    for zone in (KL, ZoneInfo("Europe/London")):
        now = datetime(2024, 1, 15, at.hour, at.minute, tzinfo=zone).astimezone(UTC)  # stored as UTC
        assert render("{greeting}", None, now=now, tz=zone) == ms
        assert render("{greeting}", None, now=now, tz=zone, language="en") == en


def test_greeting_uses_the_zone_not_utc() -> None:
    # 23:30 UTC is 07:30 the next morning in Kuala Lumpur: no hand-written +8h, and no UTC hours either
    late_utc = datetime(2024, 6, 3, 23, 30, tzinfo=UTC)
    assert render("{greeting}", None, now=late_utc, tz=KL) == "Selamat pagi"
    assert render("{greeting}", None, now=late_utc, tz=ZoneInfo("UTC")) == "Selamat malam"


def test_greeting_follows_daylight_saving_time() -> None:
    # New York springs forward on 2024-03-10 (EST -5 → EDT -4) and falls back on 2024-11-03.
    assert render("{greeting}", None, now=datetime(2024, 3, 10, 8, 59, tzinfo=UTC), tz=NEW_YORK) == "Selamat malam"
    assert render("{greeting}", None, now=datetime(2024, 3, 10, 9, 0, tzinfo=UTC), tz=NEW_YORK) == "Selamat pagi"
    # a fixed -4 would already say "pagi" at 09:00 UTC on 2024-11-03; it is 04:00 EST
    assert render("{greeting}", None, now=datetime(2024, 11, 3, 9, 59, tzinfo=UTC), tz=NEW_YORK) == "Selamat malam"
    assert render("{greeting}", None, now=datetime(2024, 11, 3, 10, 0, tzinfo=UTC), tz=NEW_YORK) == "Selamat pagi"
    # the repeated hour (01:00-02:00 twice) is night both times
    for minute_utc in (5 * 60 + 30, 6 * 60 + 30):
        now = datetime(2024, 11, 3, minute_utc // 60, minute_utc % 60, tzinfo=UTC)
        assert render("{greeting}", None, now=now, tz=NEW_YORK) == "Selamat malam"


def test_greetings_are_configurable() -> None:
    custom = Greetings(
        {
            "ms": (GreetingSlot(time(6), "Pagi"), GreetingSlot(time(15), "Petang")),
            "id": (GreetingSlot(time(0), "Halo"),),
        }
    )
    six = datetime(2024, 1, 1, 6, tzinfo=KL)
    assert render("{greeting}", None, now=six, tz=KL, greetings=custom) == "Pagi"
    assert render("{greeting}", None, now=six.replace(hour=5), tz=KL, greetings=custom) == "Petang"
    assert render("{greeting}", None, now=six, tz=KL, greetings=custom, language="id") == "Halo"
    assert render("{greeting}", None, now=six, tz=KL, greetings=custom, language="fr") == "Pagi"  # the default
    with pytest.raises(ValueError, match="ascending"):
        Greetings({"ms": (GreetingSlot(time(12), "b"), GreetingSlot(time(6), "a"))})
    with pytest.raises(ValueError, match="default language"):
        Greetings({"en": (GreetingSlot(time(6), "a"),)})


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        render("{greeting}", None, now=datetime(2024, 1, 1, 12), tz=KL)


# --- determinism -----------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_message() -> None:
    template = "{Hi|Hello|Hey} {name}, {we have|there is} {a {new|fresh}|an} offer {today|this week}{!|.}"
    for seed in range(50):
        assert r(template, seed=seed) == r(template, seed=seed)
    assert len(outcomes(template)) > 10
    key = ("campaign-1", "lead-9")
    first = render(template, FakeLead(), now=NOON_KL, tz=KL, rng=seeded_rng(*key))
    assert render(template, FakeLead(), now=NOON_KL, tz=KL, rng=seeded_rng(*key)) == first
    others = {render(template, FakeLead(), now=NOON_KL, tz=KL, rng=seeded_rng("campaign-1", i)) for i in range(40)}
    assert len(others) > 5


def test_unchosen_options_draw_nothing_from_the_generator() -> None:
    # the choice of the second group does not depend on what was nested in the first group's other option
    a = [r("{x|y {1|2|3}} {A|B|C|D}", seed=s) for s in range(30)]
    b = [r("{x|y} {A|B|C|D}", seed=s) for s in range(30)]
    assert [t.split()[0] == "x" for t in a] == [t.split()[0] == "x" for t in b]
    assert [t.split()[-1] for t in a if t.startswith("x")] == [t.split()[-1] for t in b if t.startswith("x")]


# --- validation ------------------------------------------------------------------------------------------


def codes(template: str, **kw: object) -> list[tuple[str, str, int]]:
    return [(i.code, i.severity, i.position) for i in validate(template, **kw)]  # type: ignore[arg-type]


def test_validation_reports_problems_by_position() -> None:
    assert codes("{greeting} {Hi|Hello} {name}, {first_name} {phone} {{x}}") == []
    assert codes("Hi {name") == [("unbalanced_brace", "error", 3)]
    assert codes("Hi name}") == [("unbalanced_brace", "error", 7)]
    assert codes("{a||b} {c|}") == [("empty_option", "warning", 0), ("empty_option", "warning", 7)]
    assert codes("{Hi|Hello {nope}}") == [("unknown_placeholder", "warning", 10)]
    assert codes("{Hi|Hello {nope}}", known_fields=["NOPE"]) == []
    assert codes("{city} {Company Name}", known_fields=["City"]) == []  # `{Company Name}` is not a placeholder
    assert codes("{company_name} {town}", known_fields=["Company Name"]) == [("unknown_placeholder", "warning", 15)]


def test_validation_messages_say_what_happens() -> None:
    (issue,) = validate("Promo {kod}")
    assert "{kod}" in issue.message and "custom field" in issue.message
    (issue,) = validate("Promo {kod}", known_fields=[])
    assert "stays as written" in issue.message


def test_placeholders_lists_every_key_once() -> None:
    assert placeholders("{greeting} {Hi {name}|Yo {First_Name}} {name} {{skip}} {Company-Name}") == [
        "greeting",
        "name",
        "first_name",
        "company_name",
    ]


# --- the greeting of the send -----------------------------------------------------------------------------

MORNING_KL = datetime(2024, 6, 3, 1, 0, tzinfo=UTC)  # 09:00 in Kuala Lumpur
EVENING_KL = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)  # 20:00


def test_a_greeting_is_put_in_again_at_the_send_and_nothing_else_moves() -> None:
    lead = FakeLead(name="Ali \x02 Selamat pagi")  # a name holding the mark and a greeting stays as it is
    template = "{greeting} {name}! {Hi|Hello}, kod 0123 https://x.my/?a=1 {greeting}."
    text, where = render_with_greeting(template, lead, now=MORNING_KL, tz=KL, rng=random.Random(4))  # type: ignore[arg-type]
    assert text == r(template, lead, seed=4, now=MORNING_KL).replace("\x02", "")  # as `render` would write it
    assert where is not None and where.startswith("ms:12:")
    evening = regreet(text, where, EVENING_KL, KL)
    assert evening == text.replace("Selamat pagi", "Selamat malam", 1).replace(
        "https://x.my/?a=1 Selamat pagi", "https://x.my/?a=1 Selamat malam"
    )
    assert "Ali  Selamat pagi!" in evening  # the name untouched
    assert regreet(text, where, MORNING_KL, KL) is text  # the same greeting: the same text


def test_texts_without_a_greeting_or_changed_since_are_left_alone() -> None:
    assert render_with_greeting("Hi {name}", FakeLead(), now=MORNING_KL, tz=KL)[1] is None  # type: ignore[arg-type]
    assert render_with_greeting("{Greeting}", None, now=MORNING_KL, tz=KL) == ("Selamat pagi", "ms:12:0")
    assert render_with_greeting("{{greeting}}", FakeLead(), now=MORNING_KL, tz=KL) == ("{greeting}", None)  # type: ignore[arg-type]
    # In a spintax option not chosen: nothing to put in again.
    texts = {
        render_with_greeting("{Hey|{greeting}} x", None, now=MORNING_KL, tz=KL, rng=random.Random(n)) for n in range(20)
    }
    assert texts == {("Selamat pagi x", "ms:12:0"), ("Hey x", None)}
    text, where = render_with_greeting("{greeting} {name}", FakeLead(), now=MORNING_KL, tz=KL)  # type: ignore[arg-type]
    assert where is not None
    edited = "Hello " + text  # a plugin edited the text: the places no longer hold the greeting
    assert regreet(edited, where, EVENING_KL, KL) is edited
    assert regreet(text, "nonsense", EVENING_KL, KL) is text


def test_the_configured_greetings_are_used_at_the_send() -> None:
    greetings = DEFAULT_GREETINGS.with_texts({"en": (("06:00", "Morning"), ("18:00", "Evening"))})
    text, where = render_with_greeting("{greeting}!", None, now=MORNING_KL, tz=KL, language="en", greetings=greetings)
    assert (text, where) == ("Morning!", "en:7:0")
    assert regreet(text, where, EVENING_KL, KL, greetings) == "Evening!"
