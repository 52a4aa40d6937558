"""ViewerSession against an in-memory stream and a DTLS client on a real loopback socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from aiortc.rtp import (
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSdesPacket,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
)

from srsrelay.config import RtcConfig
from srsrelay.hub.frames import MediaKind, RtpFrame
from srsrelay.webrtc.congestion import CLEAR_AFTER, REPORT_MAX_AGE, CongestionState
from srsrelay.webrtc.dtls import DtlsSrtp, generate_certificate
from srsrelay.webrtc.nack import ntp_middle32
from srsrelay.webrtc.sdp import parse_offer
from srsrelay.webrtc.sendpath import SendCounters, SendOutcome, SendPath, TrafficKind
from srsrelay.webrtc.viewer import (
    SessionState,
    TrackSender,
    ViewerSession,
    sender_report,
)
from tests.test_rtc_server import FakeStream

OFFER = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 102 103\r\na=mid:0\r\na=recvonly\r\n"
    "a=ice-ufrag:them\r\na=ice-pwd:theirpassword1234567890\r\n"
    "a=fingerprint:sha-256 {fp}\r\na=setup:actpass\r\n"
    "a=rtpmap:102 H264/90000\r\n"
    "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n"
    "a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=recvonly\r\n"
    "a=rtpmap:111 opus/48000/2\r\n"
)


def video(index: int, keyframe: bool = False, packets: int = 3, size: int = 100) -> RtpFrame:
    payloads = tuple(bytes([index % 256]) * size for _ in range(packets))
    size = packets * size
    return RtpFrame(MediaKind.VIDEO, index * 3000, keyframe, payloads, size, time.monotonic())


def audio(index: int) -> RtpFrame:
    return RtpFrame(MediaKind.AUDIO, index * 960, False, (b"opus" * 10,), 40, time.monotonic())


class Browser:
    """The viewer's peer: a loopback socket and a DTLS client."""

    def __init__(self, server_cert_fp: list[tuple[str, str]]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.cert = generate_certificate()
        self.server_fp = server_cert_fp
        self.session: ViewerSession | None = None
        self.dtls = DtlsSrtp(self.cert, self._to_viewer, role="controlled")
        self.media: list[bytes] = []
        self.rtcp: list[bytes] = []
        self._reader: asyncio.Task[None] | None = None

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return str(host), int(port)

    @property
    def fingerprints(self) -> list[tuple[str, str]]:
        return [(f.algorithm, f.value) for f in self.cert.getFingerprints()]

    def _to_viewer(self, data: bytes) -> None:
        assert self.session is not None
        if data[0] >= 128:
            self.session.handle_rtcp(data)
        else:
            self.session.handle_dtls(data)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        pending: list[bytes] = []  # SRTP that overtook the end of our handshake
        while True:
            data = await loop.sock_recv(self.sock, 2048)
            if 20 <= data[0] <= 63:
                self.dtls.feed(data)
                continue
            pending.append(data)
            for _ in range(200):
                if self.dtls.connected:
                    break
                await asyncio.sleep(0.01)
            for data in pending:
                if 192 <= data[1] <= 223:
                    plain = self.dtls.unprotect_rtcp(data)
                    assert plain is not None
                    self.rtcp.append(plain)
                else:
                    plain = self.dtls.unprotect_rtp(data)
                    assert plain is not None
                    self.media.append(plain)
            pending.clear()

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.dtls.stop()
        self.sock.close()

    def packets(self, pt: int | None = None) -> list[RtpPacket]:
        parsed = [RtpPacket.parse(d) for d in self.media]
        return [p for p in parsed if pt is None or p.payload_type == pt]


class ScriptedSendPath(SendPath):
    """A real send path whose media datagrams can be lost on the way, refused, or blocked."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.media_sends = 0
        self.lose: set[int] = set()
        """Media sends (1-based) that report SENT but never leave: loss in the network."""
        self.refuse: set[int] = set()
        """Media sends (1-based) the kernel refuses (ENOBUFS)."""
        self.force_blocked = False

    @property
    def blocked(self) -> bool:
        return self.force_blocked or super().blocked

    def send(
        self, data: bytes, addr: tuple[str, int], kind: TrafficKind, counters: SendCounters
    ) -> SendOutcome:
        if kind is TrafficKind.MEDIA:
            self.media_sends += 1
            if self.media_sends in self.lose:
                counters.record(kind, SendOutcome.SENT, len(data))
                return SendOutcome.SENT
            if self.media_sends in self.refuse:
                counters.record(kind, SendOutcome.DROPPED_NO_BUFFER, len(data))
                return SendOutcome.DROPPED_NO_BUFFER
        return super().send(data, addr, kind, counters)


class SkewClock:
    """time.monotonic() plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@dataclass
class Rig:
    stream: FakeStream
    session: ViewerSession
    browser: Browser
    closed: list[ViewerSession]
    send_path: SendPath
    clock: SkewClock


async def _settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


@contextlib.asynccontextmanager
async def make_rig(
    config: RtcConfig,
    connect: bool = True,
    cached: list[RtpFrame] | None = None,
    offer_sdp: str = OFFER,
    send_path_type: type[SendPath] = SendPath,
) -> AsyncIterator[Rig]:
    cert = generate_certificate()
    server_fp = [(f.algorithm, f.value) for f in cert.getFingerprints()]
    browser = Browser(server_fp)
    fp = browser.fingerprints[0][1]
    offer = parse_offer(offer_sdp.format(fp=fp), profile_level_id="42e01f")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stream = FakeStream()
    closed: list[ViewerSession] = []
    send_path = send_path_type(sock)
    clock = SkewClock()
    session = ViewerSession(
        stream=stream,
        offer=offer,
        config=config,
        send_path=send_path,
        certificate=cert,
        port=sock.getsockname()[1],
        on_closed=closed.append,
        clock=clock,
    )
    browser.session = session
    stream.add_reader(session)
    for frame in cached or []:
        stream.push(frame)
    session.start()
    browser.start()
    if connect:
        # What ICE does on the first valid Binding request.
        session.ice.on_binding(browser.addr, True, asyncio.get_running_loop().time())
        session.on_remote_address(browser.addr)
        assert session.state is SessionState.CONNECTING
        assert await asyncio.wait_for(browser.dtls.start(server_fp), 5)
        for _ in range(100):
            if session.state is SessionState.CONNECTED:
                break
            await asyncio.sleep(0.01)
        assert session.state is SessionState.CONNECTED
    try:
        yield Rig(stream, session, browser, closed, send_path, clock)
    finally:
        await session.close("test over")
        await browser.stop()
        sock.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with make_rig(RtcConfig()) as r:
        yield r


def test_rtp_header_rewrite_and_wrap() -> None:
    track = TrackSender(MediaKind.VIDEO, 102)
    track.seq = 0xFFFF
    track.ts_offset = 0xFFFFFFF0
    first = RtpPacket.parse(track.packet(b"abc", 0x20, marker=False))
    second = RtpPacket.parse(track.packet(b"defg", 0x20, marker=True))
    assert (first.version, first.payload_type, first.marker) == (2, 102, 0)
    assert first.sequence_number == 0xFFFF and second.sequence_number == 0
    assert first.timestamp == (0x20 + 0xFFFFFFF0) & 0xFFFFFFFF == 0x10
    assert second.marker == 1 and second.payload == b"defg"
    assert first.ssrc == second.ssrc == track.ssrc != 0
    assert (track.packets, track.octets) == (2, 7)


def test_sender_report_layout() -> None:
    track = TrackSender(MediaKind.AUDIO, 111)
    track.packets, track.octets = 10, 400
    packets = RtcpPacket.parse(sender_report(track, (5 << 32) | 7, 123456, "cname0"))
    sr, sdes = packets
    assert isinstance(sr, RtcpSrPacket) and isinstance(sdes, RtcpSdesPacket)
    assert sr.ssrc == track.ssrc
    info = sr.sender_info
    assert (info.ntp_timestamp, info.rtp_timestamp) == ((5 << 32) | 7, 123456)
    assert (info.packet_count, info.octet_count) == (10, 400)
    assert sdes.chunks[0].ssrc == track.ssrc
    assert sdes.chunks[0].items == [(1, b"cname0")]


async def test_frames_are_ignored_until_connected() -> None:
    async with make_rig(RtcConfig(), connect=False) as rig:
        rig.stream.push(video(0, keyframe=True))
        rig.stream.push(audio(0))
        await _settle()
        assert rig.browser.media == []
        assert rig.session.state is SessionState.NEW


async def test_video_waits_for_keyframe_audio_does_not(rig: Rig) -> None:
    rig.stream.push(video(1))  # no cached GOP and not a keyframe
    rig.stream.push(audio(1))
    await _settle()
    assert [p.payload_type for p in rig.browser.packets()] == [111]
    rig.stream.push(video(2, keyframe=True))
    rig.stream.push(video(3))
    await _settle()
    vp = rig.browser.packets(102)
    assert len(vp) == 6
    assert [p.marker for p in vp] == [0, 0, 1, 0, 0, 1]
    seqs = [p.sequence_number for p in vp]
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))
    assert (vp[3].timestamp - vp[0].timestamp) & 0xFFFFFFFF == 3000
    assert vp[0].ssrc == rig.session.video.ssrc  # type: ignore[union-attr]
    assert rig.session.stats()["tracks"]["video"]["packets"] == 6


def video_timestamps(rig: Rig) -> list[int]:
    """Stream timestamps (offset removed) of the video frames the browser got."""
    assert rig.session.video is not None
    offset = rig.session.video.ts_offset
    stamps = [(p.timestamp - offset) & 0xFFFFFFFF for p in rig.browser.packets(102) if p.marker]
    return stamps


def video_frames_seen(rig: Rig) -> list[int]:
    """Which frames (by index) the browser got, in order: `video(i)` payloads carry i."""
    return [p.payload[0] for p in rig.browser.packets(102) if p.marker]


def video_wire_stamps(rig: Rig) -> list[int]:
    """RTP timestamps on the wire of the video frames the browser got."""
    return [p.timestamp for p in rig.browser.packets(102) if p.marker]


def strictly_increasing(stamps: list[int]) -> bool:
    return all(0 < (b - a) & 0xFFFFFFFF < 0x80000000 for a, b in itertools.pairwise(stamps))


async def _wait(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# Ten cached frames of 33 ms at twice real time: the catch-up takes about 150 ms.
SLOW = RtcConfig(catchup_speed=2.0)


async def test_gop_catch_up_is_paced_restamped_then_live() -> None:
    cached = [video(0, keyframe=True, size=1000)] + [video(i, size=1000) for i in range(1, 10)]
    async with make_rig(SLOW, cached=cached) as rig:
        started = time.monotonic()
        assert rig.session.catching_up
        rig.stream.push(video(10, size=1000))  # live, and cached: sent once, by the catch-up
        rig.stream.push(audio(0))  # audio goes live at once
        await asyncio.sleep(0.02)
        assert len(rig.browser.packets(111)) == 1
        assert len(video_frames_seen(rig)) < 5
        await _wait(lambda: not rig.session.catching_up)
        assert time.monotonic() - started > 0.12
        rig.stream.push(video(11, size=1000))
        await _wait(lambda: len(video_frames_seen(rig)) == 12)
        assert video_frames_seen(rig) == list(range(12))
        stamps = video_wire_stamps(rig)
        steps = [(b - a) & 0xFFFFFFFF for a, b in itertools.pairwise(stamps)]
        # Cached frames are stamped at the pace they are sent (3000 / 2), live ones at
        # the publisher's pace: the wire clock never jumps back or ahead.
        assert steps == [1500] * 10 + [3000]


async def test_catch_up_restarts_on_new_gop() -> None:
    cached = [video(0, keyframe=True, size=1000)] + [video(i, size=1000) for i in range(1, 10)]
    async with make_rig(SLOW, cached=cached) as rig:
        await asyncio.sleep(0.05)
        assert rig.session.catching_up
        rig.stream.push(video(20, keyframe=True, size=1000))
        rig.stream.push(video(21, size=1000))
        await _wait(lambda: not rig.session.catching_up)
        await _wait(lambda: video_frames_seen(rig)[-1:] == [21])  # the datagrams arrived
        seen = video_frames_seen(rig)
        assert seen[-2:] == [20, 21]
        assert 1 <= len(seen) - 2 < 10  # part of the old GOP went out first
        assert seen[:-2] == list(range(len(seen) - 2))
        assert strictly_increasing(video_wire_stamps(rig))


async def test_truncated_cache_resumes_at_live_keyframe() -> None:
    cached = [video(0, keyframe=True), video(1), video(2)]
    async with make_rig(RtcConfig(), connect=False, cached=cached) as rig:
        rig.stream.gop.truncated = True
        rig.session.ice.on_binding(rig.browser.addr, True, time.monotonic())
        rig.session.on_remote_address(rig.browser.addr)
        server_fp = rig.browser.server_fp
        assert await asyncio.wait_for(rig.browser.dtls.start(server_fp), 5)
        await _wait(lambda: rig.session.state is SessionState.CONNECTED)
        await _wait(lambda: not rig.session.catching_up)
        rig.stream.push(video(5))  # after the truncation point: undecodable
        rig.stream.push(video(6, keyframe=True))
        await _wait(lambda: len(video_frames_seen(rig)) == 4)
        assert video_frames_seen(rig) == [0, 1, 2, 6]
        stamps = video_wire_stamps(rig)
        assert strictly_increasing(stamps)
        assert (stamps[3] - stamps[2]) & 0xFFFFFFFF == 4 * 3000  # live spacing after catch-up


async def test_rtcp_feedback_is_counted(rig: Rig) -> None:
    assert rig.session.video is not None and rig.session.audio is not None
    vssrc = rig.session.video.ssrc
    report = RtcpReceiverInfo(
        ssrc=vssrc,
        fraction_lost=3,
        packets_lost=7,
        highest_sequence=1000,
        jitter=12,
        lsr=0,
        dlsr=0,
    )
    compound = (
        bytes(RtcpRrPacket(ssrc=1, reports=[report]))
        + bytes(RtcpRtpfbPacket(fmt=1, ssrc=1, media_ssrc=vssrc, lost=[5, 6, 9]))
        + bytes(RtcpPsfbPacket(fmt=1, ssrc=1, media_ssrc=vssrc))
    )
    rig.session.handle_rtcp(rig.browser.dtls.protect_rtcp(compound))
    rig.session.handle_rtcp(b"\x80\xc9" + bytes(40))  # not authentic
    c = rig.session.rtcp
    assert (c.packets, c.undecryptable) == (1, 1)
    assert (c.receiver_reports, c.nacks, c.nacked_packets, c.plis) == (1, 1, 3, 1)
    rr = rig.session.receiver_reports[MediaKind.VIDEO]
    assert (rr.fraction_lost, rr.packets_lost, rr.highest_sequence, rr.jitter) == (3, 7, 1000, 12)
    assert MediaKind.AUDIO not in rig.session.receiver_reports


async def test_sender_reports_map_stream_clock(rig: Rig) -> None:
    assert rig.session.video is not None
    rig.stream.push(video(0, keyframe=True))
    rig.stream.push(audio(0))
    await _wait(lambda: len(rig.browser.rtcp) >= 2, within=3)
    srs = [p for d in rig.browser.rtcp for p in RtcpPacket.parse(d) if isinstance(p, RtcpSrPacket)]
    by_ssrc = {sr.ssrc: sr for sr in srs}
    vsr = by_ssrc[rig.session.video.ssrc]
    assert vsr.sender_info.packet_count == 3
    assert vsr.sender_info.octet_count == 300
    # The SR's RTP time is the last frame's time plus the wallclock since it arrived.
    elapsed = (vsr.sender_info.rtp_timestamp - rig.session.video.ts_offset) & 0xFFFFFFFF
    assert 0 <= elapsed < 90_000
    ntp_seconds = (vsr.sender_info.ntp_timestamp >> 32) - 2_208_988_800
    assert abs(ntp_seconds - time.time()) < 5


async def test_sender_reports_of_both_tracks_share_one_clock(rig: Rig) -> None:
    # Audio arrives in bursts, 0-60 ms after the video of the same time. Per-track arrival
    # times would put audio up to 60 ms late in the browser; one mapping keeps them in sync.
    assert rig.session.video is not None and rig.session.audio is not None
    start = time.monotonic() - 1.0
    for i in range(30):
        frame = video(i, keyframe=i == 0)
        rig.stream.push(dataclasses.replace(frame, received_at=start + i / 30))
    for i in range(50):
        late = 0.06 if i % 3 else 0.0
        frame = audio(i)
        rig.stream.push(dataclasses.replace(frame, received_at=start + i * 0.02 + late))
    await _wait(lambda: rig.session.video is not None and rig.session.video.packets >= 90)
    rig.browser.rtcp.clear()
    rig.session.send_sender_reports()
    await _wait(lambda: len(rig.browser.rtcp) >= 1, within=3)
    srs = {
        p.ssrc: p.sender_info
        for d in rig.browser.rtcp
        for p in RtcpPacket.parse(d)
        if isinstance(p, RtcpSrPacket)
    }
    v, a = srs[rig.session.video.ssrc], srs[rig.session.audio.ssrc]
    assert v.ntp_timestamp == a.ntp_timestamp
    video_s = ((v.rtp_timestamp - rig.session.video.ts_offset) & 0xFFFFFFFF) / 90_000
    audio_s = ((a.rtp_timestamp - rig.session.audio.ts_offset) & 0xFFFFFFFF) / 48_000
    # The same stream time for the same wallclock, and that time is "now" on the stream.
    assert abs(video_s - audio_s) < 0.002, (video_s, audio_s)
    assert 0.99 < video_s < 1.2, video_s


async def test_consent_timeout_closes_and_says_bye() -> None:
    async with make_rig(RtcConfig(consent_timeout=0.3)) as rig:
        rig.stream.push(audio(0))
        await _wait(lambda: rig.session.state is SessionState.CLOSED, within=3)
        assert rig.session.close_reason == "ice consent timeout"
        assert rig.closed == [rig.session]
        assert rig.stream.readers == []
        await _wait(lambda: any(d[1] == 203 for d in rig.browser.rtcp), within=2)  # BYE


async def test_dtls_timeout() -> None:
    async with make_rig(RtcConfig(dtls_timeout=0.2), connect=False) as rig:
        await _wait(lambda: rig.session.state is SessionState.CLOSED, within=3)
        assert rig.session.close_reason == "dtls timeout"


async def test_stream_end_and_idempotent_close(rig: Rig) -> None:
    rig.session.on_stream_end()
    await _wait(lambda: rig.session.state is SessionState.CLOSED)
    assert rig.session.close_reason == "stream ended"
    await rig.session.close("again")
    assert rig.session.close_reason == "stream ended"
    assert rig.closed == [rig.session]
    rig.stream.push(audio(1))  # no longer a reader, and closed anyway
    assert rig.stream.readers == []


async def test_viewer_dtls_close_notify_closes_session(rig: Rig) -> None:
    await rig.browser.dtls.stop()
    await _wait(lambda: rig.session.state is SessionState.CLOSED)
    assert rig.session.close_reason == "dtls closed by viewer"


# -- NACK, RTX, keyframe requests, congestion -------------------------------------

OFFER_NO_RTX = OFFER.replace(" 102 103\r\n", " 102\r\n").replace(
    "a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n", ""
)
GENEROUS = RtcConfig(retransmit_budget=1.0)


def _feedback(rig: Rig, *packets: bytes) -> None:
    rig.session.handle_rtcp(rig.browser.dtls.protect_rtcp(b"".join(packets)))


def _nack(rig: Rig, seqs: list[int], ssrc: int | None = None) -> bytes:
    assert rig.session.video is not None
    media_ssrc = rig.session.video.ssrc if ssrc is None else ssrc
    return bytes(RtcpRtpfbPacket(fmt=1, ssrc=1, media_ssrc=media_ssrc, lost=sorted(seqs)))


def _pli(rig: Rig) -> bytes:
    assert rig.session.video is not None
    return bytes(RtcpPsfbPacket(fmt=1, ssrc=1, media_ssrc=rig.session.video.ssrc))


def _rr(rig: Rig, fraction_lost: int, lsr: int = 0, dlsr: int = 0) -> bytes:
    assert rig.session.video is not None
    block = RtcpReceiverInfo(
        ssrc=rig.session.video.ssrc,
        fraction_lost=fraction_lost,
        packets_lost=0,
        highest_sequence=0,
        jitter=0,
        lsr=lsr,
        dlsr=dlsr,
    )
    return bytes(RtcpRrPacket(ssrc=1, reports=[block]))


async def test_answer_offers_rtx_on_its_own_ssrc(rig: Rig) -> None:
    s = rig.session
    assert s.video is not None and s.rtx_ssrc is not None and s.rtx_ssrc != s.video.ssrc
    assert re.search(r"\r\nm=video \d+ UDP/TLS/RTP/SAVPF 102 103\r\n", s.answer_sdp)
    assert "a=rtpmap:103 rtx/90000\r\n" in s.answer_sdp
    assert "a=fmtp:103 apt=102\r\n" in s.answer_sdp
    assert f"a=ssrc-group:FID {s.video.ssrc} {s.rtx_ssrc}\r\n" in s.answer_sdp
    assert f"a=ssrc:{s.rtx_ssrc} cname:{s.cname}\r\n" in s.answer_sdp
    assert s.stats()["nack"]["rtx"] is True


async def test_lost_packets_are_resent_as_rtx() -> None:
    async with make_rig(GENEROUS, send_path_type=ScriptedSendPath) as rig:
        assert isinstance(rig.send_path, ScriptedSendPath) and rig.session.video is not None
        rig.send_path.lose = {2, 5}  # the middle packet of each frame never arrives
        first_seq = rig.session.video.seq
        rig.stream.push(video(0, keyframe=True))
        rig.stream.push(video(1))
        await _wait(lambda: len(rig.browser.packets(102)) == 4)
        lost = [first_seq + 1, first_seq + 4]
        _feedback(rig, _nack(rig, [q & 0xFFFF for q in lost]))
        await _wait(lambda: len(rig.browser.packets(103)) == 2)
        rtx = rig.browser.packets(103)
        for packet, seq, frame in zip(rtx, lost, (0, 1), strict=True):
            assert packet.ssrc == rig.session.rtx_ssrc
            assert packet.payload[:2] == struct.pack("!H", seq & 0xFFFF)  # OSN
            assert packet.payload[2:] == bytes([frame]) * 100
            assert packet.marker == 0
            assert (packet.timestamp - rig.session.video.ts_offset) & 0xFFFFFFFF == frame * 3000
        assert (rtx[1].sequence_number - rtx[0].sequence_number) & 0xFFFF == 1
        nack = rig.session.stats()["nack"]
        assert (nack["received"], nack["requested"], nack["retransmitted"]) == (1, 2, 2)
        assert rig.session.stats()["send"]["kinds"]["retransmit"]["sent"] == 2
        # The same request again at once is within one RTT.
        _feedback(rig, _nack(rig, [lost[0] & 0xFFFF]))
        assert rig.session.stats()["nack"]["too_soon"] == 1


async def test_without_rtx_the_original_packet_is_resent() -> None:
    async with make_rig(GENEROUS, offer_sdp=OFFER_NO_RTX, send_path_type=ScriptedSendPath) as rig:
        assert isinstance(rig.send_path, ScriptedSendPath) and rig.session.video is not None
        assert rig.session.rtx_ssrc is None and "rtx" not in rig.session.answer_sdp
        rig.send_path.lose = {3}
        last_seq = (rig.session.video.seq + 2) & 0xFFFF
        rig.stream.push(video(0, keyframe=True))
        await _wait(lambda: len(rig.browser.packets(102)) == 2)
        _feedback(rig, _nack(rig, [last_seq]))
        await _wait(lambda: len(rig.browser.packets(102)) == 3)
        resent = rig.browser.packets(102)[-1]
        assert (resent.sequence_number, resent.ssrc) == (last_seq, rig.session.video.ssrc)
        assert resent.marker == 1 and resent.payload == bytes([0]) * 100
        assert rig.session.stats()["nack"]["rtx"] is False


async def test_nack_storm_is_held_to_the_retransmit_budget(rig: Rig) -> None:
    video_track = rig.session.video
    assert video_track is not None
    for i in range(60):
        first = video_track.seq
        rig.stream.push(video(i, keyframe=i == 0, packets=4, size=1000))
        # Every packet is asked for, twice.
        seqs = [(first + k) & 0xFFFF for k in range(4)]
        _feedback(rig, _nack(rig, seqs), _nack(rig, seqs))
        await asyncio.sleep(0)
    media_bytes = video_track.octets + 12 * video_track.packets
    nack = rig.session.stats()["nack"]
    assert nack["requested"] == 480
    assert 0 < nack["retransmitted_bytes"] <= 0.15 * media_bytes
    assert nack["over_budget"] > 0 and nack["too_soon"] > 0
    assert nack["retransmitted"] + nack["over_budget"] + nack["too_soon"] == 480
    kinds = rig.session.stats()["send"]["kinds"]
    assert kinds["retransmit"]["attempted"] == nack["retransmitted"]


async def test_bad_rtcp_is_counted_and_the_viewer_keeps_being_served(rig: Rig) -> None:
    video_track = rig.session.video
    assert video_track is not None
    rig.stream.push(video(0, keyframe=True))
    newest = (video_track.seq - 1) & 0xFFFF
    protect = rig.browser.dtls.protect_rtcp
    rig.session.handle_rtcp(protect(b"\x80\xc9\x00\x09" + bytes(8)))  # length past the end
    rig.session.handle_rtcp(protect(b"\x80\xc9\x00\x01" + bytes(4) + b"\xff\xff"))
    rig.session.handle_rtcp(b"\x80\xc9" + bytes(1600))  # oversized
    rig.session.handle_rtcp(bytes(30))  # not SRTCP at all
    _feedback(rig, _nack(rig, [1, 2], ssrc=999))  # not our SSRC
    _feedback(rig, bytes(RtcpPsfbPacket(fmt=1, ssrc=1, media_ssrc=999)))
    _feedback(rig, _nack(rig, [(newest + 1) & 0xFFFF, (newest - 30000) & 0xFFFF]))
    stats = rig.session.stats()
    assert stats["rtcp"]["malformed"] == 2
    assert stats["rtcp"]["oversized"] == 1
    assert stats["rtcp"]["undecryptable"] == 1
    assert stats["rtcp"]["unknown_ssrc"] == 2
    assert stats["nack"]["not_found"] == 2 and stats["nack"]["retransmitted"] == 0
    rig.stream.push(video(1))
    await _wait(lambda: len(video_timestamps(rig)) == 2)
    assert rig.session.state is SessionState.CONNECTED


async def test_rtt_from_receiver_report(rig: Rig) -> None:
    rig.stream.push(video(0, keyframe=True))
    rig.session.send_sender_reports()
    await _wait(lambda: any(d[1] == 200 for d in rig.browser.rtcp))
    sr = next(
        p for d in rig.browser.rtcp for p in RtcpPacket.parse(d) if isinstance(p, RtcpSrPacket)
    )
    assert rig.session.stats()["nack"]["rtt_measured"] is False
    _feedback(rig, _rr(rig, 0, lsr=ntp_middle32(sr.sender_info.ntp_timestamp), dlsr=0))
    nack = rig.session.stats()["nack"]
    assert nack["rtt_measured"] is True
    assert 0 <= nack["rtt_ms"] < 500


async def test_pli_replays_a_fresh_cached_gop(rig: Rig) -> None:
    rig.stream.push(video(0, keyframe=True))
    rig.stream.push(video(1))
    await _wait(lambda: len(video_frames_seen(rig)) == 2)
    _feedback(rig, _pli(rig))
    await _wait(lambda: len(video_frames_seen(rig)) == 4)
    assert video_frames_seen(rig) == [0, 1, 0, 1]
    assert strictly_increasing(video_wire_stamps(rig))  # the replay is restamped
    _feedback(rig, _pli(rig))  # within keyframe_request_interval
    await _wait(lambda: not rig.session.catching_up)
    assert rig.session.stats()["keyframe"] == {
        "requests": 2,
        "answered_from_cache": 1,
        "waited_for_idr": 0,
        "ignored": 1,
    }


async def test_pli_with_a_stale_cache_waits_for_the_next_idr(rig: Rig) -> None:
    old = time.monotonic() - 5
    rig.stream.push(dataclasses.replace(video(0, keyframe=True), received_at=old))
    rig.stream.push(video(1))
    await _wait(lambda: len(video_frames_seen(rig)) == 2)
    _feedback(rig, _pli(rig))
    rig.stream.push(video(2))  # the viewer cannot decode it: held back
    rig.stream.push(video(3, keyframe=True))
    rig.stream.push(audio(0))
    await _wait(lambda: len(rig.browser.packets(111)) == 1)
    await _wait(lambda: len(video_frames_seen(rig)) == 3)
    assert video_frames_seen(rig) == [0, 1, 3]
    stats = rig.session.stats()
    assert stats["keyframe"]["waited_for_idr"] == 1
    assert stats["congestion"]["frames_dropped"]["awaiting_keyframe"] == 1


async def test_fir_and_remb(rig: Rig) -> None:
    assert rig.session.video is not None
    fci = struct.pack("!IB3x", rig.session.video.ssrc, 1)
    _feedback(rig, bytes(RtcpPsfbPacket(fmt=4, ssrc=1, media_ssrc=0, fci=fci)))
    other = struct.pack("!IB3x", 4242, 1)
    _feedback(rig, bytes(RtcpPsfbPacket(fmt=4, ssrc=1, media_ssrc=0, fci=other)))
    remb = pack_remb_fci(1_500_000, [rig.session.video.ssrc])
    _feedback(rig, bytes(RtcpPsfbPacket(fmt=15, ssrc=1, media_ssrc=0, fci=remb)))
    stats = rig.session.stats()
    assert (stats["rtcp"]["firs"], stats["rtcp"]["unknown_ssrc"]) == (2, 1)
    assert stats["keyframe"]["requests"] == 1
    assert stats["keyframe"]["waited_for_idr"] == 1  # nothing cached
    assert stats["rtcp"]["rembs"] == 1
    assert abs(stats["rtcp"]["last_remb"] - 1_500_000) < 2000


async def test_congested_viewer_drops_whole_video_frames_audio_flows(rig: Rig) -> None:
    rig.stream.push(video(0, keyframe=True))
    await _wait(lambda: len(video_timestamps(rig)) == 1)
    _feedback(rig, _rr(rig, fraction_lost=128))
    assert rig.session.check_congestion(rig.clock()) == ""
    assert rig.session.congestion.state is CongestionState.CONGESTED
    rig.stream.push(video(1))
    rig.stream.push(audio(1))
    rig.stream.push(video(2, keyframe=True))  # even a keyframe waits for the state to clear
    await _wait(lambda: len(rig.browser.packets(111)) == 1)
    stats = rig.session.stats()["congestion"]
    assert stats["state"] == "congested" and stats["loss"] == 0.5
    assert stats["frames_dropped"]["congestion"] == 2
    # The report goes stale, then calm must last CLEAR_AFTER seconds.
    rig.clock.offset += REPORT_MAX_AGE + 0.5
    rig.session.check_congestion(rig.clock())
    rig.clock.offset += CLEAR_AFTER
    rig.session.check_congestion(rig.clock())
    assert rig.session.congestion.state is CongestionState.OK
    rig.stream.push(video(3))  # not a keyframe: the GOP has a gap
    rig.stream.push(video(4, keyframe=True))
    rig.stream.push(video(5))
    await _wait(lambda: len(video_timestamps(rig)) == 3)
    assert video_timestamps(rig) == [0, 12000, 15000]
    # Only whole frames went out: three packets each.
    assert len(rig.browser.packets(102)) == 9


async def test_blocked_send_path_drops_whole_frames_until_a_keyframe() -> None:
    async with make_rig(RtcConfig(), send_path_type=ScriptedSendPath) as rig:
        assert isinstance(rig.send_path, ScriptedSendPath)
        rig.stream.push(video(0, keyframe=True))
        rig.send_path.force_blocked = True
        rig.stream.push(video(1))
        rig.send_path.force_blocked = False
        rig.stream.push(video(2))
        rig.stream.push(video(3, keyframe=True))
        await _wait(lambda: len(video_timestamps(rig)) == 2)
        assert video_timestamps(rig) == [0, 9000]
        dropped = rig.session.stats()["congestion"]["frames_dropped"]
        assert (dropped["blocked"], dropped["awaiting_keyframe"]) == (1, 1)
        assert rig.send_path.media_sends == 6  # nothing was tried for the blocked frame


async def test_refused_packet_breaks_the_frame() -> None:
    async with make_rig(RtcConfig(), send_path_type=ScriptedSendPath) as rig:
        assert isinstance(rig.send_path, ScriptedSendPath)
        rig.send_path.refuse = {2}
        # One loop iteration: no congestion tick can run in between.
        rig.stream.push(video(0, keyframe=True))  # packet 2 refused, packet 3 not tried
        rig.stream.push(video(1))
        rig.stream.push(video(2, keyframe=True))
        await _wait(lambda: len(rig.browser.packets(102)) == 4)
        assert video_timestamps(rig) == [6000]
        dropped = rig.session.stats()["congestion"]["frames_dropped"]
        assert (dropped["broken"], dropped["awaiting_keyframe"]) == (1, 1)
        assert rig.send_path.media_sends == 5
        # The refused datagram is a send drop: the viewer turns congested at the next tick.
        rig.session.check_congestion(rig.clock())
        assert rig.session.congestion.state is CongestionState.CONGESTED


async def test_persistent_congestion_disconnects_with_a_reason() -> None:
    async with make_rig(RtcConfig(overload_timeout=0.5)) as rig:
        deadline = time.monotonic() + 5
        while rig.session.state is not SessionState.CLOSED:
            assert time.monotonic() < deadline
            _feedback(rig, _rr(rig, fraction_lost=200))
            await asyncio.sleep(0.1)
        reason = rig.session.close_reason
        assert reason is not None
        assert reason.startswith("overloaded: congested for ")
        assert "(loss 78% (rr 78%, nack 0%), send drops 0)" in reason
        assert rig.closed == [rig.session]
