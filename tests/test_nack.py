from __future__ import annotations

import pytest
from aiortc.rtp import RtpPacket, unwrap_rtx

from srsrelay.webrtc.nack import (
    DEFAULT_RTT,
    RETRANSMIT_BURST,
    SR_HISTORY,
    NackResponder,
    PacketHistory,
    RttEstimator,
    ntp_middle32,
    rtp_packet,
    rtx_packet,
)


def _filled(size: int, seqs: range | list[int]) -> PacketHistory:
    history = PacketHistory(size)
    for seq in seqs:
        history.put(seq & 0xFFFF, bytes([seq & 0xFF]) * 100, seq * 3000, seq % 3 == 0)
    return history


def test_history_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="^rtc.nack_history must be a power of two, got 500$"):
        PacketHistory(500)
    with pytest.raises(ValueError, match="^rtc.nack_history must be a power of two, got 0$"):
        PacketHistory(0)


def test_history_lookup_keeps_references() -> None:
    history = PacketHistory(8)
    payload = b"x" * 50
    history.put(40, payload, 123, True)
    slot = history.find(40)
    seq, stored, timestamp, marker = history.entry(slot)
    assert (seq, timestamp, marker) == (40, 123, True)
    assert stored is payload
    assert PacketHistory(8).find(0) == -1  # empty


def test_history_wraps_from_65535_to_0() -> None:
    history = _filled(16, [65530 + i for i in range(12)])  # 65530..65535, 0..5
    for seq in (65530, 65535, 0, 5):
        assert history.find(seq) >= 0, seq
        assert history.entry(history.find(seq))[0] == seq
    assert history.find(6) == -1  # never sent: ahead of the newest
    assert history.find(65529) == -1  # never stored


def test_history_refuses_old_future_and_overwritten() -> None:
    history = _filled(8, range(100, 121))  # newest 120
    assert history.find(113) >= 0  # 7 behind: the oldest still held
    assert history.find(112) == -1  # 8 behind: older than the ring
    assert history.find(121) == -1  # never sent
    assert history.find((120 + 0x8000) & 0xFFFF) == -1  # half the space away
    assert history.find((120 - 0x8000) & 0xFFFF) == -1
    assert history.find(120 - 65536 & 0xFFFF) >= 0  # same number: the newest
    gap = PacketHistory(8)
    for seq in (1, 2, 4):  # 3 never stored: its slot holds nothing
        gap.put(seq, b"p", 0, False)
    assert gap.find(3) == -1
    gap.put(11, b"q", 0, False)  # overwrites slot 3, newest 11
    assert gap.find(3) == -1 and gap.find(11) >= 0
    gap.clear()
    assert gap.find(11) == -1


def _ntp(seconds: float) -> int:
    return int(seconds * (1 << 32))


def test_rtt_is_arrival_minus_lsr_minus_dlsr() -> None:
    rtt = RttEstimator()
    assert rtt.current == DEFAULT_RTT and rtt.rtt is None
    sent = _ntp(1000.0)
    rtt.on_sender_report(sent)
    lsr = ntp_middle32(sent)
    dlsr = int(0.05 * 65536)  # the viewer held the SR 50 ms
    sample = rtt.on_report(lsr, dlsr, _ntp(1000.25))
    assert sample == pytest.approx(0.2, abs=1e-4)
    assert rtt.current == pytest.approx(0.2, abs=1e-4)
    # Later samples are smoothed (gain 1/8).
    sample = rtt.on_report(lsr, dlsr, _ntp(1001.05))
    assert sample == pytest.approx(1.0, abs=1e-4)
    assert rtt.current == pytest.approx(0.2 + 0.8 / 8, abs=1e-4)
    assert rtt.samples == 2


def test_rtt_ignores_unknown_lsr_and_nonsense() -> None:
    rtt = RttEstimator()
    sent = _ntp(1000.0)
    rtt.on_sender_report(sent)
    lsr = ntp_middle32(sent)
    assert rtt.on_report(0, 0, _ntp(1000.1)) is None  # no SR received yet: not an error
    assert rtt.on_report(lsr + 1, 0, _ntp(1000.1)) is None  # not an SR we sent
    assert rtt.on_report(lsr, int(0.5 * 65536), _ntp(1000.1)) is None  # negative
    assert rtt.on_report(lsr, 0, _ntp(1020.0)) is None  # over MAX_RTT
    assert (rtt.rejected, rtt.samples, rtt.rtt) == (3, 0, None)
    assert rtt.on_report(lsr, 0, _ntp(1000.0)) == 0.0  # rounding: zero is fine


def test_rtt_remembers_a_bounded_number_of_srs() -> None:
    rtt = RttEstimator()
    for i in range(SR_HISTORY + 1):
        rtt.on_sender_report(_ntp(1000.0 + i))
    oldest = ntp_middle32(_ntp(1000.0))
    assert rtt.on_report(oldest, 0, _ntp(1020.0)) is None
    newest = ntp_middle32(_ntp(1000.0 + SR_HISTORY))
    assert rtt.on_report(newest, 0, _ntp(1000.1 + SR_HISTORY)) == pytest.approx(0.1, abs=1e-4)


def test_repeat_within_one_rtt_is_too_soon() -> None:
    history = _filled(64, range(10))
    responder = NackResponder(1.0, rtx=False)
    responder.on_media_sent(10_000)
    first = responder.on_nack(history, (3, 4, 3), now=10.0)  # 3 twice in one NACK
    assert [history.entry(s)[0] for s in first.slots] == [3, 4]
    assert first.first_requests == 2
    again = responder.on_nack(history, (3,), now=10.0 + DEFAULT_RTT / 2)
    assert again.slots == [] and again.first_requests == 0
    later = responder.on_nack(history, (3,), now=10.0 + DEFAULT_RTT * 1.01)
    assert [history.entry(s)[0] for s in later.slots] == [3]
    c = responder.counters
    assert (c.received, c.requested, c.retransmitted, c.too_soon) == (3, 5, 3, 2)
    assert c.retransmitted_bytes == 3 * (100 + 12)


def test_measured_rtt_replaces_the_default() -> None:
    history = _filled(64, range(10))
    responder = NackResponder(1.0, rtx=True)
    responder.on_media_sent(10_000)
    sent = _ntp(50.0)
    responder.rtt.on_sender_report(sent)
    responder.rtt.on_report(ntp_middle32(sent), 0, _ntp(50.5))
    responder.on_nack(history, (1,), now=1.0)
    assert responder.on_nack(history, (1,), now=1.3).slots == []  # 0.3 s < 0.5 s RTT
    assert len(responder.on_nack(history, (1,), now=1.6).slots) == 1
    assert responder.counters.retransmitted_bytes == 2 * (100 + 12 + 2)  # RTX adds the OSN


def test_unknown_sequence_numbers_are_counted() -> None:
    history = _filled(16, range(1000, 1020))
    responder = NackResponder(1.0, rtx=False)
    responder.on_media_sent(100_000)
    decision = responder.on_nack(history, (1, 999, 1020, 30000, 1019), now=1.0)
    assert [history.entry(s)[0] for s in decision.slots] == [1019]
    assert responder.counters.not_found == 4


def test_nack_storm_is_held_to_the_budget() -> None:
    """A viewer NACKing every packet gets about 15% of the media bytes again."""
    history = PacketHistory(512)
    responder = NackResponder(0.15, rtx=True)
    media_bytes = 0
    now = 0.0
    for seq in range(5000):
        payload = b"v" * 1100
        history.put(seq, payload, seq * 90, False)
        media_bytes += len(payload) + 12
        responder.on_media_sent(len(payload) + 12)
        now += 0.002
        responder.on_nack(history, (seq,), now)
    c = responder.counters
    assert c.retransmitted_bytes <= 0.15 * media_bytes
    assert c.retransmitted_bytes >= 0.14 * media_bytes
    assert c.over_budget == 5000 - c.retransmitted
    assert c.requested == 5000


def test_budget_burst_is_bounded() -> None:
    history = _filled(1024, range(1000))
    responder = NackResponder(0.5, rtx=False)
    responder.on_media_sent(10_000_000)  # a long quiet stretch earns no more than the burst
    decision = responder.on_nack(history, tuple(range(1000)), now=1.0)
    assert responder.counters.retransmitted_bytes <= RETRANSMIT_BURST
    assert len(decision.slots) == RETRANSMIT_BURST // 112


def test_rtx_packet_layout() -> None:
    packet = rtx_packet(103, 7, 0xDEADBEEF, 0x1234, True, 0xFFFE, b"payload")
    assert packet[12:14] == b"\xff\xfe"  # OSN first (RFC 4588 section 4)
    parsed = RtpPacket.parse(packet)
    assert (parsed.payload_type, parsed.sequence_number, parsed.ssrc) == (103, 7, 0x1234)
    assert (parsed.timestamp, parsed.marker) == (0xDEADBEEF, 1)
    original = unwrap_rtx(parsed, payload_type=102, ssrc=0x5678)
    assert (original.sequence_number, original.payload) == (0xFFFE, b"payload")
    assert (original.payload_type, original.ssrc, original.timestamp) == (102, 0x5678, 0xDEADBEEF)


def test_plain_packet_layout() -> None:
    parsed = RtpPacket.parse(rtp_packet(102, 65535, 5, 9, False, b"abc"))
    assert (parsed.version, parsed.payload_type, parsed.sequence_number) == (2, 102, 65535)
    assert (parsed.timestamp, parsed.ssrc, parsed.marker, parsed.payload) == (5, 9, 0, b"abc")
