"""Counting the configured limits that were hit, by the config key of the limit.

Every refusal or close caused by a limit (rtmp.max_publishers, http.whep_rate_limit, ...)
is counted under that key; the metrics read the counts at scrape time. A flood of hits
must not flood the log: a line per limit is due at most once every LOG_INTERVAL seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

LOG_INTERVAL = 1.0
"""Seconds between two log lines about hits of the same limit."""


class LimitHits(Counter[str]):
    """Hits per limit (config key -> count); `hit` also says when a log line is due.

    Remembers one timestamp per key it has seen, so its size is bounded by the number
    of configured limits.
    """

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        # Counter.copy() calls the class with the counts.
        super().__init__(counts or {})
        self._logged_at: dict[str, float] = {}
        """Limit -> `now` of its last log line."""
        self._logged_total: dict[str, int] = {}
        """Limit -> its count at its last log line."""

    def hit(self, limit: str, now: float) -> int | None:
        """Count one hit of `limit` (a config key). Returns the hits since the last log
        line of this limit when a new line is due, else None."""
        self[limit] += 1
        last = self._logged_at.get(limit)
        if last is not None and now - last < LOG_INTERVAL:
            return None
        self._logged_at[limit] = now
        since = self[limit] - self._logged_total.get(limit, 0)
        self._logged_total[limit] = self[limit]
        return since
