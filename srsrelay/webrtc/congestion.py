"""Per-viewer congestion state from RTCP and send outcomes (sans-I/O, time passed in).

Signals, each over a sliding window of WINDOW seconds:
- the fraction lost of the viewer's latest receiver report (RFC 3550 section 6.4.1);
- the NACK rate: packets asked for the first time / media packets sent;
- REMB, when the viewer sends it: an estimate below REMB_FACTOR x the stream's video
  rate (Chromium's estimate without send-side extensions follows the video it receives,
  so a near-still picture of a few kbit/s gets a tiny estimate: comparing it with
  video plus audio would call a healthy viewer congested);
- media datagrams the send path dropped for this viewer.

CONGESTED starts when the loss exceeds the threshold, a send drop happened, or REMB
stays low; it ends after CLEAR_AFTER seconds with loss below half the threshold, no
drops and REMB not low. `overloaded_for` says how long the viewer has been congested
by its own signals (loss, NACKs, REMB); a relapse within RELAPSE_GRACE of clearing
continues the same overload. Send drops alone shed frames but never start the overload
clock: the socket is shared, so a drop says the relay's uplink is full, not this
viewer's path, and disconnecting viewers for it would punish all of them.
"""

from __future__ import annotations

import enum
from array import array
from dataclasses import dataclass

WINDOW_BUCKETS = 8
"""Buckets of the sliding window."""
BUCKET_SECONDS = 0.25
"""Width of one bucket; the window spans WINDOW_BUCKETS x BUCKET_SECONDS = 2 s."""
WINDOW = WINDOW_BUCKETS * BUCKET_SECONDS
CLEAR_AFTER = 2.0
"""Seconds every signal must stay calm before CONGESTED ends."""
RELAPSE_GRACE = 5.0
"""Congested again within this many seconds of clearing: the overload time keeps running."""
MIN_PACKETS_FOR_NACK_RATE = 30
"""Media packets needed in the window before the NACK rate counts."""
REPORT_MAX_AGE = 3.0
"""A receiver report older than this (seconds) no longer says anything about loss."""
REMB_FACTOR = 0.8
"""REMB below this fraction of the stream's video rate means the viewer's path is too slow."""
REMB_STARTUP_GRACE = 5.0
"""Seconds after the start during which REMB is ignored (receivers ramp their estimate up)."""


class CongestionState(enum.Enum):
    OK = "ok"
    """Video flows."""
    CONGESTED = "congested"
    """Video frames are dropped until the state clears and a keyframe arrives."""


@dataclass(frozen=True, slots=True)
class CongestionTransition:
    """The state changed at the last `tick`."""

    old: CongestionState
    """State before."""
    new: CongestionState
    """State after."""
    reason: str
    """The signals at that moment, e.g. "loss 35% (rr 35%, nack 12%), send drops 0"."""


class _Window:
    """Per-bucket sums over the last WINDOW_BUCKETS buckets.

    Typed arrays rather than lists: no int/float object per bucket (five windows per viewer).
    """

    __slots__ = ("_ids", "_values")

    def __init__(self) -> None:
        self._ids = array("q", [-1]) * WINDOW_BUCKETS
        self._values = array("d", [0.0]) * WINDOW_BUCKETS

    def _slot(self, now: float) -> int:
        bucket = int(now / BUCKET_SECONDS)
        slot = bucket % WINDOW_BUCKETS
        if self._ids[slot] != bucket:
            self._ids[slot] = bucket
            self._values[slot] = 0.0
        return slot

    def add(self, now: float, value: float) -> None:
        # `_slot` inlined: media windows take one call per frame sent to every viewer.
        bucket = int(now / BUCKET_SECONDS)
        slot = bucket % WINDOW_BUCKETS
        if self._ids[slot] != bucket:
            self._ids[slot] = bucket
            self._values[slot] = value
        else:
            self._values[slot] += value

    def maximum(self, now: float, value: float) -> None:
        slot = self._slot(now)
        self._values[slot] = max(self._values[slot], value)

    def _live(self, now: float) -> list[float]:
        current = int(now / BUCKET_SECONDS)
        return [
            v
            for i, v in zip(self._ids, self._values, strict=True)
            if current - WINDOW_BUCKETS < i <= current
        ]

    def total(self, now: float) -> float:
        return sum(self._live(now))

    def completed_rate(self, now: float) -> float:
        """Sum per second over the window's completed buckets (the current one is partial)."""
        current = int(now / BUCKET_SECONDS)
        total = sum(
            v
            for i, v in zip(self._ids, self._values, strict=True)
            if current - WINDOW_BUCKETS < i < current
        )
        return total / ((WINDOW_BUCKETS - 1) * BUCKET_SECONDS)

    def peak(self, now: float) -> float:
        return max(self._live(now), default=0.0)

    def any(self, now: float) -> bool:
        current = int(now / BUCKET_SECONDS)
        return any(current - WINDOW_BUCKETS < i <= current for i in self._ids)


class CongestionMonitor:
    """The congestion state machine of one viewer."""

    __slots__ = (
        "loss_threshold",
        "overload_timeout",
        "_started",
        "_state",
        "_sent",
        "_nacked",
        "_offered",
        "_drops",
        "_remb",
        "_report_loss",
        "_report_at",
        "_calm_since",
        "_overload_since",
        "_cleared_at",
        "loss",
        "transitions",
        "_rr_loss",
        "_nack_rate",
        "_window_drops",
        "_remb_low",
        "_remb_peak",
        "_media_rate",
    )

    def __init__(self, loss_threshold: float, overload_timeout: float, now: float) -> None:
        self.loss_threshold = loss_threshold
        self.overload_timeout = overload_timeout
        self._started = now
        self._state = CongestionState.OK
        self._sent = _Window()
        self._nacked = _Window()
        self._offered = _Window()
        self._drops = _Window()
        self._remb = _Window()
        self._report_loss = 0.0
        self._report_at = float("-inf")
        self._calm_since: float | None = None
        self._overload_since: float | None = None
        self._cleared_at = float("-inf")
        self.loss = 0.0
        """Loss estimate at the last tick: the larger of RR fraction lost and NACK rate."""
        self.transitions = 0
        """State changes so far."""
        self._rr_loss = 0.0
        self._nack_rate = 0.0
        self._window_drops = 0
        self._remb_low = False
        self._remb_peak = 0.0
        self._media_rate = 0.0

    @property
    def state(self) -> CongestionState:
        return self._state

    # -- inputs --------------------------------------------------------------------

    def on_report(self, fraction_lost: int, now: float) -> None:
        """A report block about one of our tracks; `fraction_lost` in 1/256."""
        self._report_loss = max(0, min(fraction_lost, 255)) / 256
        self._report_at = now

    def on_media_sent(self, packets: int, now: float) -> None:
        """Media RTP packets handed to the send path."""
        self._sent.add(now, packets)

    def on_nack(self, first_requests: int, now: float) -> None:
        """Packets a NACK asked for the first time."""
        if first_requests:
            self._nacked.add(now, first_requests)

    def on_offered(self, nbytes: int, now: float) -> None:
        """The stream produced a video frame of `nbytes` for this viewer (sent or not)."""
        self._offered.add(now, nbytes)

    def on_remb(self, bitrate: int, now: float) -> None:
        """A REMB estimate, bits per second."""
        self._remb.maximum(now, bitrate)

    def on_send_drops(self, drops: int, now: float) -> None:
        """Media datagrams of this viewer the send path dropped since the last call."""
        if drops:
            self._drops.add(now, drops)

    # -- evaluation ----------------------------------------------------------------

    def overloaded_for(self, now: float) -> float:
        """Seconds of the current overload; 0 when not congested by the viewer's own path."""
        if self._state is CongestionState.OK or self._overload_since is None:
            return 0.0
        return now - self._overload_since

    def overloaded(self, now: float) -> bool:
        """Congested for longer than the overload timeout: time to disconnect."""
        return self.overloaded_for(now) >= self.overload_timeout

    def describe(self) -> str:
        """The signals at the last tick, for log lines and close reasons."""
        text = (
            f"loss {self.loss:.0%} (rr {self._rr_loss:.0%}, nack {self._nack_rate:.0%}), "
            f"send drops {self._window_drops}"
        )
        if self._remb_peak:
            text += (
                f", remb {self._remb_peak / 1000:.0f} kbit/s"
                f" for {self._media_rate / 1000:.0f} kbit/s"
            )
        return text

    def tick(self, now: float) -> CongestionTransition | None:
        """Re-evaluate; returns the transition if the state changed."""
        self._measure(now)
        threshold = self.loss_threshold
        viewer_bad = self.loss > threshold or self._remb_low
        bad = viewer_bad or self._window_drops > 0
        calm = self.loss < threshold / 2 and self._window_drops == 0 and not self._remb_low
        if self._state is CongestionState.OK:
            if bad:
                if now - self._cleared_at > RELAPSE_GRACE:
                    self._overload_since = now if viewer_bad else None
                return self._set(CongestionState.CONGESTED)
            return None
        if viewer_bad and self._overload_since is None:
            self._overload_since = now
        if not calm:
            self._calm_since = None
            return None
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since >= CLEAR_AFTER:
            self._calm_since = None
            self._cleared_at = now
            return self._set(CongestionState.OK)
        return None

    def _measure(self, now: float) -> None:
        fresh = now - self._report_at <= REPORT_MAX_AGE
        self._rr_loss = self._report_loss if fresh else 0.0
        sent = self._sent.total(now)
        nacked = self._nacked.total(now)
        self._nack_rate = min(1.0, nacked / sent) if sent >= MIN_PACKETS_FOR_NACK_RATE else 0.0
        self.loss = max(self._rr_loss, self._nack_rate)
        self._window_drops = int(self._drops.total(now))
        self._media_rate = self._offered.completed_rate(now) * 8
        self._remb_peak = self._remb.peak(now)
        self._remb_low = (
            now - self._started >= REMB_STARTUP_GRACE
            and self._remb.any(now)
            and self._remb_peak < REMB_FACTOR * self._media_rate
        )

    def _set(self, new: CongestionState) -> CongestionTransition:
        old = self._state
        self._state = new
        self.transitions += 1
        return CongestionTransition(old, new, self.describe())
