import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from postback_worker.domain.events import (
    ClickEvent,
    ConversionEvent,
    FieldError,
    ValidationError,
    parse_batch,
    parse_click,
    parse_conversion,
)

NOW = datetime(2026, 11, 26, 20, 30, tzinfo=UTC)
T10 = datetime(2026, 11, 20, 10, tzinfo=UTC)


def conversion(**fields: object) -> ConversionEvent:
    return parse_conversion({"transaction_id": "tx_1", **fields}, now=NOW)


def field_errors(call: Any) -> dict[str, str]:
    with pytest.raises(ValidationError) as exc:
        call()
    return {e.field: e.message for e in exc.value.errors}


def test_conversion_defaults() -> None:
    event = conversion()
    assert re.fullmatch(r"cv_[0-9A-Z]{26}", event.id)
    assert (event.goal_id, event.status, event.payout, event.offer_id) == (
        "",
        "approved",
        None,
        None,
    )
    assert event.occurred_at == NOW
    assert event.received_at == NOW


@pytest.mark.parametrize(
    ("field", "raw", "expected"),
    [
        ("id", "evt-1:a.b_c", "evt-1:a.b_c"),
        ("transaction_id", " tx 9 ", "tx 9"),
        ("offer_id", 12, "12"),
        ("offer_id", "off-1", "off-1"),
        ("goal_id", 3, "3"),
        ("payout", "12.50", "12.50"),
        ("payout", 12, "12"),
        ("payout", 12.5, "12.5"),
        ("payout", "1e3", "1000"),
        ("payout", 0, "0"),
        ("payout", "-0", "0"),
        ("payout", "", None),
        ("sale_amount", "99.99", "99.99"),
        ("sale_amount", 2**40, str(2**40)),
        ("currency", "eur", "EUR"),
        ("status", "Pending", "pending"),
        ("status", "on_hold", "on_hold"),
        ("status", None, "approved"),
        ("adv_sub", "order-7", "order-7"),
        ("ip", "203.0.113.7", "203.0.113.7"),
        ("ip", "2001:DB8::1", "2001:db8::1"),
        ("device_id", "gaid-1", "gaid-1"),
        ("occurred_at", "2026-11-20T10:00:00Z", T10),
        ("occurred_at", "2026-11-20T12:00:00+02:00", T10),
        ("occurred_at", "2026-11-20T10:00:00", T10),
        ("occurred_at", 1795725000, NOW),
        ("occurred_at", 1795725000.5, NOW + timedelta(milliseconds=500)),
        ("occurred_at", "1795725000", NOW),
    ],
)
def test_conversion_field_parsing(field: str, raw: object, expected: object) -> None:
    value = getattr(conversion(**{field: raw}), field)
    assert value == expected
    if isinstance(value, datetime):
        assert value.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({}, "transaction_id", "is required"),
        ({"transaction_id": ""}, "transaction_id", "is required"),
        ({"transaction_id": "  "}, "transaction_id", "is required"),
        ({"transaction_id": "x" * 256}, "transaction_id", "must be at most 255 characters"),
        ({"transaction_id": {"a": 1}}, "transaction_id", "must be a string"),
        ({"transaction_id": True}, "transaction_id", "must be a string"),
        ({"id": "has space"}, "id", "must be 1 to 64 characters of A-Z a-z 0-9 _ . : -"),
        ({"id": "é"}, "id", "must be 1 to 64 characters of A-Z a-z 0-9 _ . : -"),
        ({"id": "a" * 65}, "id", "must be at most 64 characters"),
        ({"offer_id": ["1"]}, "offer_id", "must be a string"),
        ({"offer_id": 1.5}, "offer_id", "must be a string"),
        ({"payout": "abc"}, "payout", "must be a number"),
        ({"payout": "1_000"}, "payout", "must be a number"),
        ({"payout": "NaN"}, "payout", "must be a number"),
        ({"payout": float("inf")}, "payout", "must be a finite number"),
        ({"payout": -1}, "payout", "must not be negative"),
        ({"payout": True}, "payout", "must be a number"),
        ({"payout": [1]}, "payout", "must be a number"),
        ({"sale_amount": 2**40 + 1}, "sale_amount", f"must be at most {2**40}"),
        ({"sale_amount": "1e-30"}, "sale_amount", "must have at most 20 decimal places"),
        ({"currency": "EURO"}, "currency", "must be at most 3 characters"),
        ({"currency": "E1R"}, "currency", "must be a 3-letter currency code"),
        ({"status": "ok!"}, "status", "must be 1 to 32 letters or underscores"),
        ({"status": "a" * 33}, "status", "must be at most 32 characters"),
        ({"ip": "999.1.1.1"}, "ip", "must be an IPv4 or IPv6 address"),
        ({"ip": "localhost"}, "ip", "must be an IPv4 or IPv6 address"),
        ({"occurred_at": "yesterday"}, "occurred_at", "must be an ISO 8601 time or unix seconds"),
        ({"occurred_at": 1e20}, "occurred_at", "must be an ISO 8601 time or unix seconds"),
        ({"occurred_at": True}, "occurred_at", "must be an ISO 8601 time or unix seconds"),
        ({"adv_sub": "y" * 256}, "adv_sub", "must be at most 255 characters"),
        ({"clickid": "x"}, "clickid", "unknown field"),
    ],
)
def test_conversion_field_errors(data: dict[str, object], field: str, message: str) -> None:
    data = {"transaction_id": "tx", **data} if "transaction_id" not in data and data else data
    errors = field_errors(lambda: parse_conversion(data, now=NOW))
    assert errors == {field: message}


def test_conversion_reports_every_bad_field_with_prefix() -> None:
    data = {"payout": "x", "currency": "euro!", "ip": "nope", "extra": 1}
    errors = field_errors(lambda: parse_conversion(data, now=NOW, prefix="events[3]."))
    assert set(errors) == {
        "events[3].transaction_id",
        "events[3].payout",
        "events[3].currency",
        "events[3].ip",
        "events[3].extra",
    }


@pytest.mark.parametrize(
    ("kwargs", "data", "ok"),
    [
        ({"allow_unknown": True}, {"transaction_id": "t", "aff_click_id": "x"}, True),
        ({"allow_unknown": False}, {"transaction_id": "t", "aff_click_id": "x"}, False),
        ({"max_field_length": 10}, {"transaction_id": "t" * 10}, True),
        ({"max_field_length": 10}, {"transaction_id": "t" * 11}, False),
    ],
)
def test_conversion_options(kwargs: dict[str, Any], data: dict[str, object], ok: bool) -> None:
    if ok:
        parse_conversion(data, now=NOW, **kwargs)
    else:
        with pytest.raises(ValidationError):
            parse_conversion(data, now=NOW, **kwargs)


@pytest.mark.parametrize("data", [[], "tx", None, 5])
def test_conversion_must_be_object(data: Any) -> None:
    assert field_errors(lambda: parse_conversion(data, now=NOW)) == {"event": "must be an object"}
    errors = field_errors(lambda: parse_conversion(data, now=NOW, prefix="events[1]."))
    assert errors == {"events[1]": "must be an object"}


def test_conversion_message_round_trip() -> None:
    event = conversion(id="e1", offer_id=5, payout="1.20", currency="usd", ip="10.0.0.1",
                       occurred_at="2026-11-26T19:00:00.250+01:00")  # fmt: skip
    message = event.to_message()
    assert message["occurred_at"] == "2026-11-26T18:00:00.250000Z"
    assert message["received_at"] == "2026-11-26T20:30:00Z"
    assert message["payout"] == "1.20"
    assert message["adv_sub"] is None
    assert ConversionEvent.from_message(message) == event


def test_field_error_to_dict() -> None:
    assert FieldError("payout", "must be a number").to_dict() == {
        "field": "payout",
        "message": "must be a number",
    }


def test_validation_error_str() -> None:
    err = ValidationError([FieldError("a", "x"), FieldError("b", "y")])
    assert str(err) == "a: x; b: y"
    assert isinstance(err, ValueError)


CLICK = {"offer_id": 42, "aff_id": "7"}
ID_MESSAGE = "must be 1 to 64 characters of A-Z a-z 0-9 _ . : -"
FUTURE_MESSAGE = "must not be more than 5 minutes in the future"


def test_click_defaults() -> None:
    event = parse_click(CLICK, now=NOW)
    assert re.fullmatch(r"tx_[0-9A-Z]{26}", event.transaction_id)
    assert (event.offer_id, event.aff_id, event.clicked_at) == ("42", "7", NOW)
    assert event.aff_sub is None and event.user_agent is None


@pytest.mark.parametrize(
    ("field", "raw", "expected"),
    [
        ("transaction_id", "abc-123", "abc-123"),
        ("aff_sub", "s1", "s1"),
        ("aff_sub5", 5, "5"),
        ("source", "email", "email"),
        ("ip", "::ffff:1.2.3.4", "::ffff:102:304"),
        ("device_id", "idfa", "idfa"),
        ("user_agent", "M" * 1024, "M" * 1024),
        ("clicked_at", "2026-11-26T20:34:59Z", datetime(2026, 11, 26, 20, 34, 59, tzinfo=UTC)),
        ("clicked_at", "2026-11-26T20:35:00Z", datetime(2026, 11, 26, 20, 35, tzinfo=UTC)),
        ("clicked_at", 1795700000, datetime(2026, 11, 26, 13, 33, 20, tzinfo=UTC)),
    ],
)
def test_click_field_parsing(field: str, raw: object, expected: object) -> None:
    assert getattr(parse_click({**CLICK, field: raw}, now=NOW), field) == expected


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        ({}, {"offer_id": "is required", "aff_id": "is required"}),
        ({"aff_id": "7"}, {"offer_id": "is required"}),
        ({**CLICK, "transaction_id": "a b"}, {"transaction_id": ID_MESSAGE}),
        ({**CLICK, "clicked_at": "2026-11-26T20:35:01Z"}, {"clicked_at": FUTURE_MESSAGE}),
        ({**CLICK, "ip": "1.2.3"}, {"ip": "must be an IPv4 or IPv6 address"}),
        ({**CLICK, "user_agent": "M" * 1025}, {"user_agent": "must be at most 1024 characters"}),
        ({**CLICK, "aff_sub3": {"x": 1}}, {"aff_sub3": "must be a string"}),
        ({**CLICK, "source": "s" * 256}, {"source": "must be at most 255 characters"}),
        ({**CLICK, "payout": 1}, {"payout": "unknown field"}),
    ],
)  # fmt: skip
def test_click_errors(data: dict[str, object], errors: dict[str, str]) -> None:
    assert field_errors(lambda: parse_click(data, now=NOW)) == errors


def test_parse_batch_ok_and_single_object() -> None:
    events = parse_batch([{"transaction_id": "a"}, {"transaction_id": "b"}],
                         parse_conversion, max_items=2, now=NOW)  # fmt: skip
    assert [e.transaction_id for e in events] == ["a", "b"]
    single = parse_batch(CLICK, parse_click, max_items=1, now=NOW)
    assert len(single) == 1 and isinstance(single[0], ClickEvent)


def test_parse_batch_passes_options() -> None:
    items = [{"transaction_id": "a", "extra": 1}]
    assert parse_batch(items, parse_conversion, max_items=5, now=NOW, allow_unknown=True)
    errors = field_errors(lambda: parse_batch(items, parse_conversion, max_items=5, now=NOW))
    assert errors == {"events[0].extra": "unknown field"}


@pytest.mark.parametrize(
    ("items", "errors"),
    [
        ("nope", {"events": "must be a list"}),
        (None, {"events": "must be a list"}),
        ([], {"events": "must contain at least one event"}),
        ([{"transaction_id": "a"}] * 5, {"events": "at most 4 events per request"}),
        (
            [{"transaction_id": "a"}, {"payout": "x"}, {"transaction_id": "c"}, 7],
            {
                "events[1].transaction_id": "is required",
                "events[1].payout": "must be a number",
                "events[3]": "must be an object",
            },
        ),
        ({"payout": -1, "transaction_id": "t"}, {"payout": "must not be negative"}),
    ],
)
def test_parse_batch_errors(items: object, errors: dict[str, str]) -> None:
    call = lambda: parse_batch(items, parse_conversion, max_items=4, now=NOW)  # noqa: E731
    assert field_errors(call) == errors
