"""Request bodies and escaping: table-driven validation, property tests with hypothesis."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postback_worker.domain.macros import TemplateError, render, render_body, validate_body
from postback_worker.domain.masking import load_headers, mask_body, mask_headers

# Any text, including quotes, braces, backslashes, &, =, #, line breaks and lone surrogates.
VALUES = st.text(alphabet=st.characters(), max_size=40)

URL = "https://p.example/pb?tid={transaction_id}&sub={aff_sub}&p={payout}"
FORM = "tid={transaction_id}&sub={aff_sub}&p={payout}"
JSON_T = ('{"tid": "{transaction_id}", "n": 3, "nested": {"sub": "s-{aff_sub}-x"}, '
          '"list": ["{payout}", true, null], "empty": {}}')


def _clean(value: str) -> str:
    return value.encode("utf-8", errors="replace").decode("utf-8")


@settings(max_examples=300, deadline=None)
@given(tid=VALUES, sub=VALUES, payout=VALUES)
def test_url_values_never_add_or_change_parameters(tid: str, sub: str, payout: str) -> None:
    url = render(URL, {"transaction_id": tid, "aff_sub": sub, "payout": payout})
    parts = urlsplit(url)
    assert (parts.netloc, parts.path, parts.fragment) == ("p.example", "/pb", "")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    assert [k for k, _ in pairs] == ["tid", "sub", "p"]
    if all(v == _clean(v) for v in (tid, sub, payout)):
        assert [v for _, v in pairs] == [tid, sub, payout]


@settings(max_examples=300, deadline=None)
@given(tid=VALUES, sub=VALUES, payout=VALUES)
def test_form_values_never_add_fields(tid: str, sub: str, payout: str) -> None:
    body = render_body(FORM, "form", {"transaction_id": tid, "aff_sub": sub, "payout": payout})
    pairs = parse_qsl(body, keep_blank_values=True)
    assert [k for k, _ in pairs] == ["tid", "sub", "p"]
    if all(v == _clean(v) for v in (tid, sub, payout)):
        assert [v for _, v in pairs] == [tid, sub, payout]


@settings(max_examples=300, deadline=None)
@given(tid=VALUES, sub=VALUES, payout=VALUES)
def test_json_values_land_inside_their_strings_only(tid: str, sub: str, payout: str) -> None:
    body = render_body(JSON_T, "json", {"transaction_id": tid, "aff_sub": sub,
                                        "payout": payout})
    doc = json.loads(body)  # always a valid document
    assert doc == {"tid": _clean(tid), "n": 3, "nested": {"sub": f"s-{_clean(sub)}-x"},
                   "list": [_clean(payout), True, None], "empty": {}}


@pytest.mark.parametrize(
    ("template", "fmt", "codes"),
    [
        ('{"tid": "{transaction_id}"}', "json", []),
        ('{"tid": "{transaction_id}", "p": 1.5, "ok": true}', "json", []),
        ('{"tid": {transaction_id}}', "json", ["json_macro"]),
        ('{"{transaction_id}": "x"}', "json", ["json_macro"]),
        ('{"tid": "{tid}"}', "json", ["unknown_macro"]),
        ('{"tid": "[transaction_id]"}', "json", ["lookalike"]),
        ('{"tid": "{transaction_id}",}', "json", ["json"]),
        ('{"tid": "{transaction_id"}', "json", ["braces"]),
        ("", "json", ["empty"]),
        ("tid={transaction_id}&p={payout}", "form", []),
        ("tid={transaction_id}&tid=2", "form", ["duplicate"]),
        ("tid=#s2#", "form", ["lookalike"]),
        ("tid={transaction_id}&note=a b", "form", ["whitespace"]),
        ("tid={transaction_id}", "xml", ["format"]),
    ],
)
def test_body_validation(template: str, fmt: str, codes: list[str]) -> None:
    assert [p.code for p in validate_body(template, fmt) if p.severity == "error"] == codes


def test_a_broken_body_template_cannot_render() -> None:
    with pytest.raises(TemplateError, match="outside a JSON string"):
        render_body('{"tid": {transaction_id}}', "json", {"transaction_id": "1"})


@pytest.mark.parametrize(
    ("body", "fmt", "shown"),
    [
        ("tid=1&api_key=s3cret", "form", "tid=1&api_key=***"),
        ('{"tid": "1", "auth": {"token": "s3cret"}}', "json",
         '{"tid": "1", "auth": "***"}'),
        ('{"tid": "1", "x": [{"secret": "s"}]}', "json", '{"tid": "1", "x": [{"secret": "***"}]}'),
        ("not json", "json", "***"),
        (None, "json", None),
    ],
)
def test_mask_body(body: str | None, fmt: str, shown: str | None) -> None:
    assert mask_body(body, fmt) == shown


def test_headers_are_shown_by_name_only() -> None:
    stored = json.dumps({"X-Api-Key": "k-123", "X-Account": "acme"})
    assert mask_headers(load_headers(stored)) == {"X-Api-Key": "***", "X-Account": "***"}
    assert load_headers(None) == {} and load_headers("[1]") == {} and load_headers("{") == {}
