"""Relay-added latency: from the RTMP message's arrival to the last RTP packet of its frame
leaving for a viewer, in a fixed set of buckets (bounded memory, no per-frame objects)."""

from __future__ import annotations

import bisect
import math
from typing import Any

BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(round(0.05 * 2 ** (i / 4), 4) for i in range(4 * 15))
"""Upper bounds of the buckets, ms: 0.05 ms to about 1.4 s, four buckets per doubling
(each bucket is 19% wider than the one before). Later values go in an overflow bucket."""


class LatencyHistogram:
    """Counts of latencies per bucket; percentiles are read from the bucket bounds."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKET_BOUNDS_MS) + 1)
        """Per bucket of BUCKET_BOUNDS_MS, then one for anything larger."""
        self.total = 0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKET_BOUNDS_MS, seconds * 1000)] += 1
        self.total += 1

    def percentile(self, q: float, since: list[int] | None = None) -> float:
        """The q-quantile (0-1) in ms, as the upper bound of its bucket (an overflow
        gives inf); NaN without data. `since`: counts of an earlier snapshot, to read
        only what was recorded after it."""
        counts = self.counts
        if since is not None:
            counts = [a - b for a, b in zip(counts, since, strict=True)]
        total = sum(counts)
        if total == 0:
            return math.nan
        rank = q * total
        seen = 0
        for i, n in enumerate(counts):
            seen += n
            if seen >= rank and n:
                return BUCKET_BOUNDS_MS[i] if i < len(BUCKET_BOUNDS_MS) else math.inf
        return math.inf

    def snapshot(self) -> dict[str, Any]:
        """For the API: p50/p99 so far, and the raw counts (diff two to get a window)."""
        p50, p99 = self.percentile(0.5), self.percentile(0.99)
        return {
            "frames": self.total,
            "p50_ms": None if math.isnan(p50) or math.isinf(p50) else p50,
            "p99_ms": None if math.isnan(p99) or math.isinf(p99) else p99,
            "counts": list(self.counts),
        }


def bucket_bounds() -> list[float]:
    """The upper bound of every bucket, ms, in the order of `counts` (the last is inf)."""
    return [*BUCKET_BOUNDS_MS, math.inf]
