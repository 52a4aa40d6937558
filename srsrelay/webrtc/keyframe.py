"""What to do about a viewer's PLI/FIR (RFC 4585 section 6.3.1, RFC 5104 section 4.3.1).

An RTMP publisher cannot be asked for a keyframe, so a request is answered from the
stream's cached GOP when its keyframe is recent, or by holding the viewer's video
until the publisher's next IDR. Requests are rate-limited per viewer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class KeyframeAnswer(enum.Enum):
    IGNORED = "ignored"
    """Within the rate-limit interval of the last request acted on."""
    FROM_CACHE = "from_cache"
    """Replay the cached GOP from its keyframe."""
    WAIT_FOR_IDR = "wait_for_idr"
    """Drop video until the publisher's next keyframe."""


@dataclass(slots=True)
class KeyframeCounters:
    """PLI/FIR handling of one viewer."""

    requests: int = 0
    """PLI and FIR requests about our video."""
    answered_from_cache: int = 0
    """Answered by replaying the cached GOP."""
    waited_for_idr: int = 0
    """Answered by waiting for the publisher's next keyframe."""
    ignored: int = 0
    """Arrived within keyframe_request_interval of the last one acted on."""

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "answered_from_cache": self.answered_from_cache,
            "waited_for_idr": self.waited_for_idr,
            "ignored": self.ignored,
        }


class KeyframeRequests:
    """Rate limit and cache-or-wait decision for one viewer's keyframe requests."""

    def __init__(self, interval: float, cache_age: float) -> None:
        self.interval = interval
        """rtc.keyframe_request_interval, seconds."""
        self.cache_age = cache_age
        """rtc.keyframe_cache_age, seconds."""
        self.counters = KeyframeCounters()
        self._last_acted = float("-inf")

    def on_request(self, now: float, keyframe_age: float | None) -> KeyframeAnswer:
        """A PLI/FIR at `now`; `keyframe_age` is the cached keyframe's age (None: no cache)."""
        c = self.counters
        c.requests += 1
        if now - self._last_acted < self.interval:
            c.ignored += 1
            return KeyframeAnswer.IGNORED
        self._last_acted = now
        if keyframe_age is not None and 0 <= keyframe_age <= self.cache_age:
            c.answered_from_cache += 1
            return KeyframeAnswer.FROM_CACHE
        c.waited_for_idr += 1
        return KeyframeAnswer.WAIT_FOR_IDR
