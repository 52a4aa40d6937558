"""Answering generic NACKs (RFC 4585 section 6.2.1), plainly or as RTX (RFC 4588).

Sans-I/O: `PacketHistory` remembers what a track sent, `NackResponder` decides which
requested packets to resend (known, not resent within one RTT, within the viewer's
retransmit budget) and the viewer builds, protects and sends them.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

RTP_HEADER_SIZE = 12
"""Bytes of the RTP header we write (no CSRCs, no extensions)."""
RTX_OSN_SIZE = 2
"""The original sequence number in front of an RTX payload (RFC 4588 section 4)."""
DEFAULT_RTT = 0.1
"""Round-trip time assumed (seconds) until an RR with LSR/DLSR gives a measurement."""
MAX_RTT = 10.0
"""Samples above this (seconds) come from a bogus LSR/DLSR and are ignored."""
RTT_SMOOTHING = 1 / 8
"""Weight of a new RTT sample (the SRTT gain of RFC 6298)."""
SR_HISTORY = 16
"""NTP middle-32 values of our recent SRs kept to recognise LSR in reports."""
RETRANSMIT_BURST = 64 * 1024
"""Most retransmit credit (bytes) a viewer can save up."""
_NEVER = float("-inf")
_SEQ_TYPE = "i"
"""array typecode of sequence numbers: 4-byte signed (-1 marks an empty slot)."""
_U32_TYPE = "I" if array("I").itemsize >= 4 else "L"
"""array typecode of RTP timestamps: the smallest unsigned type holding 32 bits."""


def ntp_middle32(ntp: int) -> int:
    """The middle 32 bits of a 64-bit NTP timestamp (RFC 3550 section 6.4.1, LSR)."""
    return (ntp >> 16) & 0xFFFFFFFF


def rtp_packet(
    payload_type: int, seq: int, timestamp: int, ssrc: int, marker: bool, payload: bytes
) -> bytes:
    """A plain RTP packet (RFC 3550 section 5.1): version 2, no padding/extension/CSRC."""
    second = (0x80 if marker else 0) | payload_type
    return struct.pack("!BBHII", 0x80, second, seq, timestamp, ssrc) + payload


def rtx_packet(
    payload_type: int,
    seq: int,
    timestamp: int,
    ssrc: int,
    marker: bool,
    original_seq: int,
    payload: bytes,
) -> bytes:
    """An RTX packet (RFC 4588 section 4): the RTX stream's PT, SSRC and sequence number,
    the original timestamp, and the original sequence number (OSN) before the payload."""
    second = (0x80 if marker else 0) | payload_type
    header = struct.pack("!BBHIIH", 0x80, second, seq, timestamp, ssrc, original_seq)
    return header + payload


class PacketHistory:
    """The last `size` RTP packets of one track, by sequence number.

    A ring indexed by ``seq & (size - 1)``; payloads are references to the stream's
    packetized frames, not copies. Lookups refuse sequence numbers ahead of the newest
    (more than half the 16-bit space away counts as ahead), older than the ring, or
    whose slot was overwritten.

    Numbers are kept in typed arrays (4 bytes a sequence number or timestamp, 1 a flag)
    rather than lists of int objects: with two tracks per viewer that is most of a
    viewer's Python memory. The NACK bookkeeping (resent time, asked-for flag) is
    created at the first lookup: most tracks are never NACKed.
    """

    __slots__ = (
        "size",
        "_mask",
        "_seqs",
        "_payloads",
        "_timestamps",
        "_markers",
        "_resent_at",
        "_requested",
        "_newest",
    )

    def __init__(self, size: int) -> None:
        if size < 1 or size & (size - 1):
            raise ValueError(f"rtc.nack_history must be a power of two, got {size}")
        self.size = size
        self._mask = size - 1
        self._seqs = array(_SEQ_TYPE, [-1]) * size
        self._payloads: list[bytes] = [b""] * size
        self._timestamps = array(_U32_TYPE, [0]) * size
        self._markers = bytearray(size)
        self._resent_at: array[float] | None = None
        self._requested: bytearray | None = None
        self._newest = -1

    def put(self, seq: int, payload: bytes, timestamp: int, marker: bool) -> None:
        """Remember a packet just sent; `timestamp` is the RTP timestamp on the wire."""
        slot = seq & self._mask
        self._seqs[slot] = seq
        self._payloads[slot] = payload
        self._timestamps[slot] = timestamp
        self._markers[slot] = marker
        if self._requested is not None:
            self._forget_requests(slot, 1)
        self._newest = seq

    def put_frame(
        self, seq: int, payloads: Sequence[bytes], count: int, timestamp: int, marker_index: int
    ) -> None:
        """`put` the first `count` packets of a frame, numbered from `seq`; the one at
        `marker_index` (-1: none) carries the marker bit. One call per frame sent."""
        if count <= 0:
            return
        mask = self._mask
        seqs, stored, timestamps, markers = (
            self._seqs,
            self._payloads,
            self._timestamps,
            self._markers,
        )
        first_slot = seq & mask
        for i in range(count):
            slot = seq & mask
            seqs[slot] = seq
            stored[slot] = payloads[i]
            timestamps[slot] = timestamp
            markers[slot] = i == marker_index
            seq = (seq + 1) & 0xFFFF
        if self._requested is not None:
            self._forget_requests(first_slot, count)
        self._newest = (seq - 1) & 0xFFFF

    def _forget_requests(self, first_slot: int, count: int) -> None:
        """Reset the NACK bookkeeping of `count` slots from `first_slot` (wrapping)."""
        resent_at, requested = self._resent_at, self._requested
        assert resent_at is not None and requested is not None
        size = self.size
        count = min(count, size)
        end = first_slot + count
        for start, stop in ((first_slot, min(end, size)), (0, max(end - size, 0))):
            if stop > start:
                resent_at[start:stop] = _never(stop - start)
                requested[start:stop] = bytes(stop - start)

    def _bookkeeping(self) -> tuple[array[float], bytearray]:
        resent_at, requested = self._resent_at, self._requested
        if resent_at is None or requested is None:
            resent_at = self._resent_at = _never(self.size)
            requested = self._requested = bytearray(self.size)
        return resent_at, requested

    def find(self, seq: int) -> int:
        """The slot holding `seq`, or -1."""
        newest = self._newest
        if newest < 0:
            return -1
        behind = (newest - seq) & 0xFFFF
        if behind >= 0x8000 or behind > self._mask:
            return -1  # never sent (ahead of the newest), or fell out of the ring
        slot = seq & self._mask
        return slot if self._seqs[slot] == seq else -1

    def entry(self, slot: int) -> tuple[int, bytes, int, bool]:
        """(seq, payload, timestamp, marker) in `slot`."""
        marker = bool(self._markers[slot])
        return self._seqs[slot], self._payloads[slot], self._timestamps[slot], marker

    def first_request(self, slot: int) -> bool:
        """True the first time the packet in `slot` is asked for."""
        requested = self._bookkeeping()[1]
        if requested[slot]:
            return False
        requested[slot] = 1
        return True

    def resent_at(self, slot: int) -> float:
        """When the packet in `slot` was last resent (-inf: never)."""
        return _NEVER if self._resent_at is None else self._resent_at[slot]

    def mark_resent(self, slot: int, now: float) -> None:
        self._bookkeeping()[0][slot] = now

    def payload_size(self, slot: int) -> int:
        return len(self._payloads[slot])

    def clear(self) -> None:
        """Drop every reference (the viewer is gone)."""
        self._seqs = array(_SEQ_TYPE, [-1]) * self.size
        self._payloads = [b""] * self.size
        self._resent_at = self._requested = None
        self._newest = -1


def _never(count: int) -> array[float]:
    return array("d", [_NEVER]) * count


class RttEstimator:
    """Round-trip time from report blocks: A - LSR - DLSR (RFC 3550 section 6.4.1)."""

    __slots__ = ("_sent", "_next", "rtt", "samples", "rejected")

    def __init__(self) -> None:
        # A ring of SR_HISTORY entries; 0 is never looked up (LSR 0 means no SR yet).
        self._sent = array(_U32_TYPE, [0]) * SR_HISTORY
        self._next = 0
        self.rtt: float | None = None
        """Smoothed RTT in seconds; None before the first valid sample."""
        self.samples = 0
        """Valid samples taken."""
        self.rejected = 0
        """Report blocks whose LSR/DLSR gave no valid sample (unknown LSR, out of range)."""

    @property
    def current(self) -> float:
        """The RTT to act on: the estimate, or DEFAULT_RTT before there is one."""
        return DEFAULT_RTT if self.rtt is None else self.rtt

    def on_sender_report(self, ntp: int) -> None:
        """We sent an SR with this 64-bit NTP timestamp."""
        middle = ntp_middle32(ntp)
        if middle not in self._sent:
            self._sent[self._next] = middle
            self._next = (self._next + 1) % SR_HISTORY

    def on_report(self, lsr: int, dlsr: int, arrival_ntp: int) -> float | None:
        """Take one report block arriving at `arrival_ntp`; returns the sample (seconds)."""
        if lsr == 0:
            return None  # the viewer has not received an SR yet
        if lsr not in self._sent:
            self.rejected += 1
            return None
        units = (ntp_middle32(arrival_ntp) - lsr - dlsr) & 0xFFFFFFFF
        if units >= 0x80000000:
            units -= 1 << 32
        sample = units / 65536
        if sample < -0.005 or sample > MAX_RTT:
            self.rejected += 1
            return None
        sample = max(0.0, sample)  # DLSR is rounded to 1/65536 s
        self.samples += 1
        self.rtt = sample if self.rtt is None else self.rtt + (sample - self.rtt) * RTT_SMOOTHING
        return sample


class RetransmitBudget:
    """Token bucket: each media byte sent earns `fraction` bytes of retransmission."""

    __slots__ = ("fraction", "burst", "tokens")

    def __init__(self, fraction: float, burst: int = RETRANSMIT_BURST) -> None:
        self.fraction = fraction
        self.burst = float(burst)
        self.tokens = 0.0
        """Bytes that may be retransmitted now."""

    def earn(self, media_bytes: int) -> None:
        self.tokens = min(self.burst, self.tokens + media_bytes * self.fraction)

    def spend(self, nbytes: int) -> bool:
        """Take `nbytes` if available."""
        if nbytes > self.tokens:
            return False
        self.tokens -= nbytes
        return True


@dataclass(slots=True)
class NackCounters:
    """What a viewer's NACKs asked for and what became of it."""

    received: int = 0
    """NACK packets."""
    requested: int = 0
    """Sequence numbers asked for."""
    retransmitted: int = 0
    """Packets handed to the send path again."""
    retransmitted_bytes: int = 0
    """RTP bytes (header included) of those packets."""
    not_found: int = 0
    """Asked for but never sent, outside the history, or overwritten."""
    too_soon: int = 0
    """Asked for again within one RTT of the last retransmission."""
    over_budget: int = 0
    """Found, but the retransmit budget was spent."""

    def as_dict(self) -> dict[str, int]:
        return {
            "received": self.received,
            "requested": self.requested,
            "retransmitted": self.retransmitted,
            "retransmitted_bytes": self.retransmitted_bytes,
            "not_found": self.not_found,
            "too_soon": self.too_soon,
            "over_budget": self.over_budget,
        }


@dataclass(slots=True)
class NackDecision:
    """The outcome of one NACK packet."""

    slots: list[int]
    """History slots to resend, in request order."""
    first_requests: int
    """Found packets asked for the first time (a loss estimate free of repeats)."""


class NackResponder:
    """Per-viewer NACK policy: RTT suppression and the retransmit budget."""

    __slots__ = ("counters", "budget", "rtt", "_overhead")

    def __init__(self, budget_fraction: float, rtx: bool) -> None:
        self.counters = NackCounters()
        self.budget = RetransmitBudget(budget_fraction)
        self.rtt = RttEstimator()
        self._overhead = RTP_HEADER_SIZE + (RTX_OSN_SIZE if rtx else 0)

    def on_media_sent(self, packet_bytes: int) -> None:
        """A media RTP packet of `packet_bytes` (header included) left the send path."""
        self.budget.earn(packet_bytes)

    def on_nack(self, history: PacketHistory, seqs: tuple[int, ...], now: float) -> NackDecision:
        """Decide which of `seqs` to resend; counts every sequence number once."""
        c = self.counters
        c.received += 1
        c.requested += len(seqs)
        rtt = self.rtt.current
        slots: list[int] = []
        first = 0
        for seq in seqs:
            slot = history.find(seq)
            if slot < 0:
                c.not_found += 1
                continue
            if history.first_request(slot):
                first += 1
            if now - history.resent_at(slot) < rtt:
                c.too_soon += 1
                continue
            size = history.payload_size(slot) + self._overhead
            if not self.budget.spend(size):
                c.over_budget += 1
                continue
            history.mark_resent(slot, now)
            c.retransmitted += 1
            c.retransmitted_bytes += size
            slots.append(slot)
        return NackDecision(slots, first)
