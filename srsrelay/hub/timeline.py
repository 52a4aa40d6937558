"""One stream's media clock: publisher timestamps (ms) to stream time (ms).

Pure and synchronous; `now` (monotonic seconds) is passed in. The stream clock starts
at 0 with the first publisher and keeps running across publisher reconnects: every
publisher's timestamps get an offset so that its first tag lands where the previous
publisher's last tag was plus the wall-clock time in between. Both tracks share the
offset, so audio and video stay in sync. A timestamp that jumps (backwards, or far
forward) re-anchors the offset the same way; small steps backwards are clamped so
each track stays monotonic.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

JUMP_FORWARD_MS = 10_000
"""A step this far ahead of the track's previous timestamp is a discontinuity."""
JUMP_BACKWARD_MS = 1_000
"""A step this far behind the track's previous timestamp is a discontinuity; smaller
steps back are clamped to the previous timestamp."""
MIN_STEP_MS = 1
"""Smallest advance given to a re-anchored tag, so it never shares a timestamp."""


class Track(enum.Enum):
    VIDEO = "video"
    AUDIO = "audio"


@dataclass(frozen=True, slots=True)
class Mapped:
    """A publisher timestamp placed on the stream clock."""

    ms: int
    """Stream time in milliseconds (never below the track's previous value)."""
    jumped: bool
    """The offset was re-anchored at this tag (a timestamp discontinuity)."""
    clamped: bool
    """A small step backwards was clamped to the previous timestamp."""


@dataclass
class _TrackState:
    last_ms: int
    """Stream time of the track's newest tag."""
    last_at: float
    """When it arrived (monotonic seconds)."""


class Timeline:
    """Maps every tag of every publisher of one stream onto one monotonic clock."""

    def __init__(self) -> None:
        self._offset: int | None = None
        self._tracks: dict[Track, _TrackState] = {}
        self.jumps = 0
        """Discontinuities re-anchored (publisher changes not counted)."""
        self.clamps = 0
        """Small backward steps clamped."""

    def new_publisher(self) -> None:
        """The next tag comes from a new publisher: re-anchor on it."""
        self._offset = None

    def end_ms(self, now: float) -> int:
        """Where the stream clock stands at `now`: the newest tag plus the time since."""
        if not self._tracks:
            return 0
        return max(t.last_ms + max(0, int((now - t.last_at) * 1000)) for t in self._tracks.values())

    def map(self, track: Track, timestamp_ms: int, now: float) -> Mapped:
        """Place one tag's (unwrapped RTMP) timestamp on the stream clock."""
        state = self._tracks.get(track)
        jumped = clamped = False
        if self._offset is None:
            start = self.end_ms(now)
            if self._tracks:
                start = max(start, max(t.last_ms for t in self._tracks.values()) + MIN_STEP_MS)
            self._offset = start - timestamp_ms
        elif state is not None:
            # Judged on the stream clock: after one track re-anchored the shared offset,
            # the other track's next tag is no jump.
            step = timestamp_ms + self._offset - state.last_ms
            if step > JUMP_FORWARD_MS or step < -JUMP_BACKWARD_MS:
                # Continue from this track's last tag by the wall-clock time since.
                elapsed = max(MIN_STEP_MS, int((now - state.last_at) * 1000))
                self._offset = state.last_ms + elapsed - timestamp_ms
                self.jumps += 1
                jumped = True
        ms = timestamp_ms + self._offset
        if state is not None and ms < state.last_ms:
            ms = state.last_ms
            self.clamps += 1
            clamped = True
        self._tracks[track] = _TrackState(ms, now)
        return Mapped(ms, jumped, clamped)


ANCHOR_LEAK = 0.001
"""Seconds per second an ArrivalAnchor rises when nothing arrives as early as the
earliest so far (1 ms/s: far more than encoder clock drift)."""


class ArrivalAnchor:
    """Where stream time sits on our clock: the earliest arrival seen, as arrival minus
    stream time (seconds). Later arrivals are jitter (publishers send in bursts), not a
    different clock; a slow leak upwards follows a publisher clock slower than ours."""

    __slots__ = ("_value", "_at")

    def __init__(self) -> None:
        self._value: float | None = None
        self._at = 0.0

    def at(self, now: float) -> float | None:
        """The anchor at `now` (monotonic seconds); None before the first update."""
        if self._value is None:
            return None
        return self._value + (now - self._at) * ANCHOR_LEAK

    def update(self, arrived: float, stream_seconds: float) -> float:
        """A frame of stream time `stream_seconds` arrived at `arrived`; returns the anchor."""
        lag = arrived - stream_seconds
        anchor = self.at(arrived)
        if anchor is None or lag <= anchor:
            self._value, self._at = lag, arrived
            return lag
        return anchor
