from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest

from postback_worker.domain.macros import (
    KNOWN_MACROS,
    TemplateError,
    TemplateProblem,
    macro_names,
    macro_values,
    render,
    validate_template,
)

GOOD = "https://partner.example/cb?tid={transaction_id}&p={payout}"


def errors(template: str) -> list[TemplateProblem]:
    return [p for p in validate_template(template) if p.severity == "error"]


def warnings(template: str) -> list[str]:
    return [p.message for p in validate_template(template) if p.severity == "warning"]


def test_known_macros_match_design_list() -> None:
    design = {
        "transaction_id", "offer_id", "affiliate_id", "aff_sub", "aff_sub2", "aff_sub3",
        "aff_sub4", "aff_sub5", "source", "adv_sub", "goal_id", "payout", "sale_amount",
        "currency", "status", "conversion_id", "postback_id", "datetime", "date", "time",
        "timestamp", "ip", "device_id", "random", "revenue", "event", "previous_status",
    }  # fmt: skip
    assert design == KNOWN_MACROS


@pytest.mark.parametrize(
    "template",
    [
        GOOD,
        "http://localhost:8080/cb?tid={transaction_id}",
        "https://user@partner.example:8443/p/{offer_id}?t={transaction_id}&s={aff_sub5}",
        "https://partner.example/cb?tid={transaction_id}&t={timestamp}&c=caf%C3%A9%20x",
        "HTTPS://partner.example/?tid={transaction_id}",
    ],
)
def test_valid_templates_have_no_errors(template: str) -> None:
    assert errors(template) == []


@pytest.mark.parametrize(
    ("template", "position", "fragment", "fix"),
    [
        ("", 0, "template is empty", "https://partner.example/pb?tid={transaction_id}"),
        ("   ", 0, "template is empty", "https://partner.example/pb?tid={transaction_id}"),
        ("partner.example/cb?tid={transaction_id}", 0, "missing scheme", "https://"),
        ("ftp://partner.example/{transaction_id}", 0, "unsupported scheme 'ftp'", "https://"),
        ("javascript://x/{transaction_id}", 0, "unsupported scheme 'javascript'", "https://"),
        ("https:///cb?tid={transaction_id}", 8, "missing host", "https://partner.example/..."),
        ("https://?tid={transaction_id}", 8, "missing host", "https://partner.example/..."),
        ("https://p.example/cb?tid={transaction_id}&x=a b", 45, "whitespace", "%20"),
        ("https://p.example/cb?tid={transaction_id}\t", 41, "whitespace", "%20"),
        ("https://p.example/cb?tid={transaction_id}&p={payout", 44, "unclosed '{'", "}"),
        ("https://p.example/cb?tid={transaction_id}&p=payout}", 50, "unmatched '}'", "{"),
        (
            "https://p.example/cb?tid={transaction_id}&p={}",
            44,
            "empty macro {}",
            "{transaction_id}",
        ),
        (
            "https://p.example/cb?tid={transacton_id}",
            25,
            "unknown macro {transacton_id}; did you mean {transaction_id}?",
            "{transaction_id}",
        ),
        (
            "https://p.example/cb?tid={transaction_id}&p={Payout}",
            44,
            "unknown macro {Payout}; did you mean {payout}?",
            "{payout}",
        ),
        (
            "https://p.example/cb?tid={transaction_id}&s={sub2}",
            44,
            "unknown macro {sub2}; did you mean {aff_sub2}?",
            "{aff_sub2}",
        ),
        ("https://p.example/cb?tid={transaction_id}&x={zzqq}", 44, "unknown macro {zzqq}", ""),
    ],
)
def test_errors(template: str, position: int, fragment: str, fix: str) -> None:
    found = [p for p in errors(template) if fragment in p.message]
    assert found, validate_template(template)
    assert found[0].position == position
    assert found[0].fix == fix


@pytest.mark.parametrize(
    ("template", "raw", "fix"),
    [
        ("https://p.example/cb?tid=[transaction_id]", "[transaction_id]", "{transaction_id}"),
        ("https://p.example/cb?tid={transaction_id}&s=#s2#", "#s2#", "{aff_sub2}"),
        ("https://p.example/cb?tid={transaction_id}&p=%payout%", "%payout%", "{payout}"),
        ("https://p.example/cb?tid={transaction_id}&s=%s%", "%s%", ""),
        ("https://p.example/cb?tid={transaction_id}&s=%aff_sub%", "%aff_sub%", "{aff_sub}"),
        ("https://p.example/cb?tid={transaction_id}&p={{payout}}", "{{payout}}", "{payout}"),
        ("https://p.example/cb?tid={transaction_id}&p=${payout}", "${payout}", "{payout}"),
        ("https://p.example/cb?tid={transaction_id}&c=#tid#", "#tid#", "{transaction_id}"),
    ],
)
def test_lookalike_syntaxes_are_errors(template: str, raw: str, fix: str) -> None:
    problems = errors(template)
    assert len(problems) == 1, problems
    assert problems[0].message.startswith(f"{raw} is another tracker's macro syntax")
    assert problems[0].position == template.index(raw)
    assert problems[0].fix == fix
    if fix:
        assert f"use {fix}" in problems[0].message


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (GOOD, []),
        ("http://p.example/?tid={transaction_id}", ["plain http"]),
        ("https://p.example/?p={payout}", ["no {transaction_id} macro"]),
        ("http://p.example/?p={payout}", ["plain http", "no {transaction_id} macro"]),
    ],
)
def test_warnings(template: str, expected: list[str]) -> None:
    found = warnings(template)
    assert len(found) == len(expected)
    for fragment, message in zip(expected, found, strict=True):
        assert fragment in message
    assert errors(template) == []


def test_errors_sorted_before_warnings() -> None:
    problems = validate_template("http://p.example/?p={payot}")
    assert [p.severity for p in problems] == ["error", "warning", "warning"]


@pytest.mark.parametrize(
    ("template", "names"),
    [
        (GOOD, ["transaction_id", "payout"]),
        ("https://x/{a}/{b}?c={a}", ["a", "b", "a"]),
        ("https://x/", []),
    ],
)
def test_macro_names(template: str, names: list[str]) -> None:
    assert macro_names(template) == names


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("abc-123_x.y~z", "abc-123_x.y~z"),
        ("a&b=c d", "a%26b%3Dc%20d"),
        ("a&b", "a%26b"),
        ("x=1", "x%3D1"),
        ("two words", "two%20words"),
        ("café", "caf%C3%A9"),
        ("é", "%C3%A9"),
        ("frag#ment", "frag%23ment"),
        ("a/b", "a%2Fb"),
        ("?q", "%3Fq"),
        ("100%", "100%25"),
        ("+1", "%2B1"),
        ("{payout}", "%7Bpayout%7D"),
        ("", ""),
        (None, ""),
    ],
)
def test_render_encodes_values(value: str | None, encoded: str) -> None:
    template = "https://p.example/cb?tid={transaction_id}&s={aff_sub}"
    url = render(template, {"transaction_id": "T1", "aff_sub": value})
    assert url == f"https://p.example/cb?tid=T1&s={encoded}"
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    assert set(query) == {"tid", "s"}
    assert query["s"] == [value or ""]


def test_render_missing_value_is_empty_and_repeats_work() -> None:
    template = "https://p.example/{offer_id}/cb?tid={transaction_id}&again={transaction_id}&x=1"
    assert render(template, {"transaction_id": "a b"}) == (
        "https://p.example//cb?tid=a%20b&again=a%20b&x=1"
    )


@pytest.mark.parametrize(
    "template",
    [
        "https://p.example/cb?tid={transaction_id}&x={unknown}",
        "https://p.example/cb?tid=[transaction_id]",
        "ftp://p.example/cb?tid={transaction_id}",
        "",
        "https://p.example/cb?tid={transaction_id",
    ],
)
def test_render_refuses_invalid_template(template: str) -> None:
    with pytest.raises(TemplateError) as exc:
        render(template, {"transaction_id": "T1"})
    assert exc.value.problems
    assert all(p.severity == "error" for p in exc.value.problems)
    assert str(exc.value).startswith(f"position {exc.value.problems[0].position}: ")


def test_template_error_lists_every_problem() -> None:
    err = TemplateError([TemplateProblem(3, "one"), TemplateProblem(9, "two")])
    assert str(err) == "position 3: one; position 9: two"
    assert isinstance(err, ValueError)


def test_render_allows_warnings() -> None:
    assert render("http://p.example/?p={payout}", {"payout": "1.5"}) == "http://p.example/?p=1.5"


NOW = datetime(2026, 11, 26, 20, 30, 0, tzinfo=UTC)
CONVERSION = {
    "id": "cv_1",
    "transaction_id": "tx_1",
    "offer_id": "42",
    "goal_id": "",
    "payout": Decimal("12.50"),
    "sale_amount": 99,
    "currency": "EUR",
    "status": "approved",
    "adv_sub": None,
    "ip": None,
    "device_id": "dev-c",
}
CLICK = {
    "aff_id": "7",
    "aff_sub": "s1",
    "aff_sub2": None,
    "aff_sub5": "s5",
    "source": "mail",
    "ip": "203.0.113.9",
    "device_id": "dev-k",
}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("transaction_id", "tx_1"),
        ("offer_id", "42"),
        ("goal_id", ""),
        ("payout", "12.50"),
        ("sale_amount", "99"),
        ("currency", "EUR"),
        ("status", "approved"),
        ("adv_sub", ""),
        ("conversion_id", "cv_1"),
        ("ip", "203.0.113.9"),
        ("device_id", "dev-c"),
        ("affiliate_id", "7"),
        ("aff_sub", "s1"),
        ("aff_sub2", ""),
        ("aff_sub3", ""),
        ("aff_sub5", "s5"),
        ("source", "mail"),
        ("postback_id", "pb_1"),
        ("datetime", "2026-11-26T20:30:00Z"),
        ("date", "2026-11-26"),
        ("time", "20:30:00"),
        ("timestamp", "1795725000"),
        ("random", "r4nd"),
    ],
)
def test_macro_values(name: str, expected: str) -> None:
    values = macro_values(
        conversion=CONVERSION, click=CLICK, postback_id="pb_1", now=NOW, random_value="r4nd"
    )
    assert values[name] == expected


def test_macro_values_cover_every_macro_and_prefer_conversion_ip() -> None:
    conversion = {**CONVERSION, "ip": "198.51.100.1"}
    values = macro_values(
        conversion=conversion, click=CLICK, postback_id="pb", now=NOW, random_value="r"
    )
    assert set(values) == KNOWN_MACROS
    assert values["ip"] == "198.51.100.1"


@pytest.mark.parametrize(
    "now",
    [
        datetime(2026, 11, 26, 22, 30, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 11, 26, 20, 30),
    ],
)
def test_macro_values_time_is_utc(now: datetime) -> None:
    values = macro_values(conversion={}, click={}, postback_id="p", now=now, random_value="r")
    assert values["datetime"] == "2026-11-26T20:30:00Z"
    assert values["timestamp"] == "1795725000"


@pytest.mark.parametrize("name, given, expected", [
    ("event", "reversal", "reversal"),
    ("previous_status", "approved", "approved"),
    ("revenue", "12.5", "12.5"),
    ("event", None, ""),
])
def test_lifecycle_macro_values(name: str, given: str | None, expected: str) -> None:
    values = macro_values(conversion={**CONVERSION, name: given}, click=CLICK, postback_id="p",
                          now=NOW, random_value="r")
    assert values[name] == expected
    assert render(f"https://p.example/?x={{{name}}}", values) == f"https://p.example/?x={expected}"
