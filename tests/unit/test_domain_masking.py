"""mask_url: userinfo passwords and secret-looking query values, table-driven."""

from __future__ import annotations

import pytest

from postback_worker.domain.masking import mask_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # nothing secret-looking: unchanged
        ("http://127.0.0.1:8080/pb?tid=tx1&payout=1.00&pb=pb_01J", None),
        ("https://p.example/pb", None),
        ("https://p.example/token/pb?tid=1", None),  # a path segment is not a parameter
        # secret-looking names, any case, anywhere in the query
        ("https://p.example/pb?tid=1&token=abc", "https://p.example/pb?tid=1&token=***"),
        ("https://p.example/pb?API_KEY=abc&x=1", "https://p.example/pb?API_KEY=***&x=1"),
        ("https://p.example/pb?Signature=s&hash=h",
         "https://p.example/pb?Signature=***&hash=***"),
        ("https://p.example/pb?auth_token=", "https://p.example/pb?auth_token="),  # no value
        # non-ASCII names the case-insensitive pattern matches (long s, Kelvin sign)
        ("https://p.example/pb?\u017fig=1&a=2", "https://p.example/pb?\u017fig=***&a=2"),
        ("https://p.example/pb?\u212aey=1", "https://p.example/pb?\u212aey=***"),
        # userinfo
        ("https://user:pw@p.example/pb?tid=1", "https://user:***@p.example/pb?tid=1"),
        ("https://tok@p.example/pb", "https://***@p.example/pb"),
        # a fragment is kept
        ("https://p.example/pb?key=k#frag", "https://p.example/pb?key=***#frag"),
    ],
)
def test_mask_url(url: str, shown: str | None) -> None:
    assert mask_url(url) == (url if shown is None else shown)
