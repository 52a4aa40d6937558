from __future__ import annotations

import math

from srsrelay.webrtc.latency import BUCKET_BOUNDS_MS, LatencyHistogram, bucket_bounds


def test_buckets_cover_50us_to_over_a_second() -> None:
    assert BUCKET_BOUNDS_MS[0] == 0.05
    assert 1000 < BUCKET_BOUNDS_MS[-1] < 2000
    assert all(b > a for a, b in zip(BUCKET_BOUNDS_MS, BUCKET_BOUNDS_MS[1:], strict=False))
    assert bucket_bounds()[-1] == math.inf


def test_percentiles_from_buckets() -> None:
    h = LatencyHistogram()
    assert math.isnan(h.percentile(0.5))
    for _ in range(98):
        h.record(0.001)  # 1 ms
    h.record(0.004)
    h.record(0.020)
    # The bucket's upper bound: at most 19% above the value.
    assert 1.0 <= h.percentile(0.5) < 1.19
    assert 4.0 <= h.percentile(0.99) < 4.76
    assert 20.0 <= h.percentile(1.0) < 23.8
    snap = h.snapshot()
    assert snap["frames"] == 100 and sum(snap["counts"]) == 100
    assert snap["p50_ms"] == h.percentile(0.5)


def test_window_since_a_snapshot_and_overflow() -> None:
    h = LatencyHistogram()
    for _ in range(10):
        h.record(0.0001)
    before = list(h.counts)
    for _ in range(10):
        h.record(5.0)  # beyond the last bucket
    assert h.percentile(0.5, since=before) == math.inf
    assert h.percentile(0.5) < 0.2
    assert h.snapshot()["p99_ms"] is None
