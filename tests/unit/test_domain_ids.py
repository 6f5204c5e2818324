import re

import pytest

from postback_worker.domain.ids import new_id

ZERO = bytes(10)
ONES = b"\xff" * 10


@pytest.mark.parametrize(
    ("prefix", "now_ms", "rand", "expected"),
    [
        ("cv", 0, ZERO, "cv_" + "0" * 26),
        ("tx", 1, ZERO, "tx_" + "0" * 9 + "1" + "0" * 16),
        ("cv", 0, ONES, "cv_" + "0" * 10 + "Z" * 16),
        ("pb", 2**48 - 1, ZERO, "pb_7" + "Z" * 9 + "0" * 16),
        ("cv", 32, b"\x00" * 9 + b"\x1f", "cv_" + "0" * 8 + "10" + "0" * 15 + "Z"),
    ],
)
def test_new_id_encoding(prefix: str, now_ms: int, rand: bytes, expected: str) -> None:
    assert new_id(prefix, now_ms=now_ms, rand=rand) == expected


@pytest.mark.parametrize("prefix", ["cv", "tx", "postback", ""])
def test_new_id_shape(prefix: str) -> None:
    value = new_id(prefix)
    assert len(value) == len(prefix) + 27
    assert re.fullmatch(re.escape(prefix) + r"_[0-9A-HJKMNP-TV-Z]{26}", value)


@pytest.mark.parametrize(
    ("earlier", "later"),
    [(0, 1), (1_700_000_000_000, 1_700_000_000_001), (31, 32), (2**40, 2**47)],
)
def test_new_id_sorts_by_time_whatever_the_randomness(earlier: int, later: int) -> None:
    assert new_id("cv", now_ms=earlier, rand=ONES) < new_id("cv", now_ms=later, rand=ZERO)


def test_new_id_random_part_differs() -> None:
    assert len({new_id("cv", now_ms=5) for _ in range(100)}) == 100


@pytest.mark.parametrize(
    ("now_ms", "rand"), [(-1, ZERO), (2**48, ZERO), (0, b"\x00" * 9), (0, b"\x00" * 11)]
)
def test_new_id_rejects_bad_input(now_ms: int, rand: bytes) -> None:
    with pytest.raises(ValueError):
        new_id("cv", now_ms=now_ms, rand=rand)
