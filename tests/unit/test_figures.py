"""Pure pieces of the figures: duration buckets, range splitting, histogram percentiles."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from postback_worker.ops.visibility.figures import bucket_quantile, nearest_rank
from postback_worker.store.figures import bound_of, duration_bucket, split
from postback_worker.store.rollups import DURATION_BOUNDS

T = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("ms", "bucket"),
    [(0.0, 0.0), (-1.0, 0.0), (None, 0.0), (0.001, 0.001), (0.3, 0.3), (0.734, 0.74),
     (0.07, 0.07), (0.0701, 0.071),
     (1.0, 1.0), (9.99, 10.0), (10.0, 10.0), (20.1, 21.0), (99.99, 100.0), (100.0, 100.0),
     (123.456, 130.0), (1000.5, 1100.0), (9999.0, 10000.0)],
)
def test_duration_bucket_rounds_up_to_two_significant_digits(ms: float | None,
                                                            bucket: float) -> None:
    assert duration_bucket(ms) == bucket


@pytest.mark.parametrize(
    ("since", "until", "step", "inner", "edges"),
    [
        # whole hours only
        (T, T + timedelta(hours=2), 3600, (T, T + timedelta(hours=2)), []),
        # partial at both ends
        (T - timedelta(minutes=10), T + timedelta(hours=1, minutes=5), 3600,
         (T, T + timedelta(hours=1)),
         [(T - timedelta(minutes=10), T), (T + timedelta(hours=1),
                                           T + timedelta(hours=1, minutes=5))]),
        # inside one hour: all rows
        (T + timedelta(minutes=1), T + timedelta(minutes=59), 3600, None,
         [(T + timedelta(minutes=1), T + timedelta(minutes=59))]),
        # minutes, with seconds and microseconds at the ends
        (T + timedelta(seconds=30), T + timedelta(minutes=2, microseconds=5), 60,
         (T + timedelta(minutes=1), T + timedelta(minutes=2)),
         [(T + timedelta(seconds=30), T + timedelta(minutes=1)),
          (T + timedelta(minutes=2), T + timedelta(minutes=2, microseconds=5))]),
    ],
)
def test_split_into_whole_steps_and_edges(since: datetime, until: datetime, step: int,
                                          inner: tuple[datetime, datetime] | None,
                                          edges: list[tuple[datetime, datetime]]) -> None:
    assert split(since, until, step) == (inner, edges)


@pytest.mark.parametrize(
    ("values", "q"),
    [([], 0.5), ([5.0], 0.99), ([1.0, 2.0, 2.0, 3.0], 0.5), ([1.0, 2.0, 2.0, 3.0], 0.75),
     ([10.0] * 95 + [90.0] * 5, 0.95), ([10.0] * 95 + [90.0] * 5, 0.96),
     ([float(i) for i in range(1, 101)], 0.99)],
)
def test_bucket_quantile_equals_nearest_rank(values: list[float], q: float) -> None:
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    assert bucket_quantile(counts.items(), q) == nearest_rank(sorted(values), q)


@pytest.mark.parametrize(
    ("micros", "bound"),
    [(0, 0.05), (50_000, 0.05), (50_001, 0.1), (999_999, 1.0), (1_000_000, 1.0),
     (30_000_000, 30.0), (30_000_001, math.inf)],
)
def test_bound_of_is_the_smallest_bound_not_exceeded(micros: int, bound: float) -> None:
    assert bound_of(micros, DURATION_BOUNDS) == bound
