"""The per-packet send path: direct SRTP writer, batched history, inlined counting."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pylibsrtp
import pytest
from aiortc.rtp import RtpPacket
from pylibsrtp import Policy, Session

from srsrelay.config import RtcConfig
from srsrelay.webrtc.dtls import RTP_HEADER, RtpWriter
from srsrelay.webrtc.nack import RTP_HEADER_SIZE, PacketHistory
from srsrelay.webrtc.sendpath import SendCounters, SendOutcome, SendPath, TrafficKind
from tests.test_viewer import ScriptedSendPath, _wait, make_rig, video

PROFILES = [
    (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    (Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
    (Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
]


def _sessions(profile: int, key_length: int) -> tuple[Session, Session, Session]:
    """Two senders with one key (to compare outputs) and the matching receiver."""
    key = os.urandom(key_length)

    def session(ssrc_type: int) -> Session:
        return Session(Policy(key=key, ssrc_type=ssrc_type, srtp_profile=profile))

    return (
        session(Policy.SSRC_ANY_OUTBOUND),
        session(Policy.SSRC_ANY_OUTBOUND),
        session(Policy.SSRC_ANY_INBOUND),
    )


@pytest.mark.parametrize(("profile", "key_length"), PROFILES)
@pytest.mark.parametrize("direct", [True, False])
def test_writer_output_is_what_pylibsrtp_protects(
    profile: int, key_length: int, direct: bool
) -> None:
    mine, theirs, receiver = _sessions(profile, key_length)
    writer = RtpWriter(mine, direct=direct)
    assert writer.direct is direct
    # Sizes shrink then grow: nothing of a longer packet may leak into a shorter one.
    for seq, size in [(65534, 1200), (65535, 7), (0, 1300), (1, 1)]:
        payload = os.urandom(size)
        marker = seq == 0
        second = (0x80 if marker else 0) | 102
        packet = RTP_HEADER.pack(0x80, second, seq, 0xFFFFFFF0, 0xDEADBEEF) + payload
        data = writer.write(second, seq, 0xFFFFFFF0, 0xDEADBEEF, payload)
        assert type(data) is bytes
        assert data == theirs.protect(packet)
        plain = RtpPacket.parse(receiver.unprotect(data))
        assert (plain.sequence_number, plain.timestamp, plain.ssrc) == (seq, 0xFFFFFFF0, 0xDEADBEEF)
        assert (plain.marker, plain.payload_type, plain.payload) == (marker, 102, payload)


def test_direct_writer_is_used_with_this_pylibsrtp() -> None:
    # The default picks the direct path after its self-test; if pylibsrtp changed the
    # members it relies on, sending still works but this says it got slower.
    mine, _, _ = _sessions(*PROFILES[0])
    assert RtpWriter(mine).direct


def test_writer_refuses_a_packet_longer_than_its_buffer() -> None:
    writer = RtpWriter(_sessions(*PROFILES[0])[0], direct=True)
    with pytest.raises(
        ValueError, match=r"^RTP packet of 1912 bytes is longer than 1904: lower rtc.payload_size$"
    ):
        writer.write(102, 1, 2, 3, bytes(1900))
    # Still usable afterwards.
    assert len(writer.write(102, 1, 2, 3, bytes(100))) == 12 + 100 + 10


def test_writer_raises_srtp_errors() -> None:
    # libsrtp refuses to protect the same sequence number twice on one SSRC (replay).
    writer = RtpWriter(_sessions(*PROFILES[0])[0], direct=True)
    writer.write(102, 5, 0, 1, b"abc")
    with pytest.raises(pylibsrtp.Error, match="^srtp_protect failed with libsrtp error "):
        writer.write(102, 5, 0, 1, b"abc")


def _state(history: PacketHistory) -> list[tuple[int, bytes, int, bool, float, bool]]:
    out = []
    for slot in range(history.size):
        seq, payload, timestamp, marker = history.entry(slot)
        requested = not history.first_request(slot)
        out.append((seq, payload, timestamp, marker, history.resent_at(slot), requested))
    return out


@pytest.mark.parametrize(
    ("first", "count", "marker_index"),
    [(100, 3, 2), (65534, 5, 4), (6, 4, -1), (9, 2, 4), (0, 0, 0), (3, 11, 10)],
)
def test_put_frame_is_put_per_packet(first: int, count: int, marker_index: int) -> None:
    payloads = tuple(bytes([i]) * (i + 1) for i in range(max(count, 5)))
    one, batch = PacketHistory(8), PacketHistory(8)
    for history in (one, batch):  # older packets, some resent and asked for
        for seq in range(65530, 65536):
            history.put(seq, b"old", 7, False)
        for seq in (65531, 65535):
            history.mark_resent(history.find(seq), 1.5)
            history.first_request(history.find(seq))
    seq = first
    for i in range(count):
        one.put(seq, payloads[i], 4242, i == marker_index)
        seq = (seq + 1) & 0xFFFF
    batch.put_frame(first, payloads, count, 4242, marker_index)
    assert _state(batch) == _state(one)
    newest = (first + count - 1) & 0xFFFF if count else 65535
    assert batch.find(newest) >= 0 and batch.find((newest + 1) & 0xFFFF) == -1


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    rx.bind(("127.0.0.1", 0))
    yield tx, rx
    tx.close()
    rx.close()


def test_sent_datagrams_are_counted_once_per_viewer_and_once_globally(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    addr = rx.getsockname()
    for n in range(5):
        assert path.send(b"m" * (100 + n), addr, TrafficKind.MEDIA, viewer) is SendOutcome.SENT
    assert path.send(b"r" * 20, addr, TrafficKind.RTCP, viewer) is SendOutcome.SENT
    # The path's own counters as the viewer's: counted once, not twice.
    assert path.send(b"s" * 30, addr, TrafficKind.STUN, path.counters) is SendOutcome.SENT
    media, rtcp = viewer.kinds[TrafficKind.MEDIA], viewer.kinds[TrafficKind.RTCP]
    assert (media.attempted, media.sent, media.bytes_sent) == (5, 5, 510)
    assert (rtcp.attempted, rtcp.sent, rtcp.bytes_sent) == (1, 1, 20)
    total = path.counters.kinds
    assert (total[TrafficKind.MEDIA].sent, total[TrafficKind.MEDIA].bytes_sent) == (5, 510)
    assert (total[TrafficKind.STUN].attempted, total[TrafficKind.STUN].sent) == (1, 1)
    assert viewer.balanced() and path.counters.balanced()
    assert [len(rx.recv(2048)) for _ in range(7)] == [100, 101, 102, 103, 104, 20, 30]


def test_kinds_key_dicts_by_identity() -> None:
    # TrafficKind hashes by identity: lookups by member still work, values do not collide.
    table = {kind: kind.value for kind in TrafficKind}
    assert [table[k] for k in TrafficKind] == ["media", "retransmit", "rtcp", "dtls", "stun"]
    assert TrafficKind("media") is TrafficKind.MEDIA and TrafficKind.MEDIA in table
    assert {SendOutcome.SENT: 1}[SendOutcome("sent")] == 1


async def test_frame_totals_history_and_credit_with_a_refused_packet() -> None:
    async with make_rig(RtcConfig(), send_path_type=ScriptedSendPath) as rig:
        assert isinstance(rig.send_path, ScriptedSendPath)
        session = rig.session
        track = session.video
        assert track is not None
        first = track.seq
        tokens = session.nack.budget.tokens
        fraction = session.nack.budget.fraction
        rig.send_path.refuse = {5}
        rig.stream.push(video(0, keyframe=True, packets=3, size=100))  # sends 1-3
        rig.stream.push(video(1, packets=4, size=50))  # 4 sent, 5 refused, 6-7 not tried
        await _wait(lambda: len(rig.browser.packets(102)) == 4)
        # Everything handed to the send path counts for the SR and is in the history.
        assert (track.packets, track.octets) == (5, 3 * 100 + 2 * 50)
        assert track.seq == (first + 5) & 0xFFFF
        history = track.history
        for i in range(5):
            seq, payload, timestamp, marker = history.entry(history.find((first + i) & 0xFFFF))
            assert len(payload) == (100 if i < 3 else 50)
            assert marker == (i == 2)
            wire = (0 if i < 3 else 3000) + track.ts_offset
            assert timestamp == wire & 0xFFFFFFFF
        assert history.find((first + 5) & 0xFFFF) == -1
        # Retransmit credit only for the four packets that left, headers included.
        earned = (3 * 100 + 50 + 4 * RTP_HEADER_SIZE) * fraction
        assert session.nack.budget.tokens == pytest.approx(tokens + earned)
        media = session.counters.kinds[TrafficKind.MEDIA]
        assert (media.attempted, media.sent, media.dropped_no_buffer) == (5, 4, 1)
        # The browser got the packets as sent: right markers, consecutive numbers.
        got = rig.browser.packets(102)
        assert [p.sequence_number for p in got] == [(first + i) & 0xFFFF for i in range(4)]
        assert [p.marker for p in got] == [0, 0, 1, 0]
