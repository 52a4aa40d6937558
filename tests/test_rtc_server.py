"""RtcServer end to end on loopback with a real aiortc RTCPeerConnection as the viewer."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from unittest import mock

import aioice.ice
import av
import pytest
import structlog.testing
from aioice import stun
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack

from srsrelay.config import RtcConfig
from srsrelay.hub import h264
from srsrelay.hub.frames import MediaKind, RtpFrame
from srsrelay.hub.timeline import ArrivalAnchor
from srsrelay.webrtc.sdp import OfferError
from srsrelay.webrtc.sendpath import TrafficKind
from srsrelay.webrtc.server import RecvCount, RtcServer
from srsrelay.webrtc.viewer import FrameReader, SessionState

PAYLOAD_SIZE = 1200
FPS = 30


def split_annexb(data: bytes) -> list[bytes]:
    return [p.rstrip(b"\x00") for p in data.split(b"\x00\x00\x01") if p.rstrip(b"\x00")]


def encode_h264(count: int, gop: int) -> list[tuple[bool, list[bytes]]]:
    """(keyframe, NAL units) of `count` 320x240 frames from libx264."""
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = 320, 240, "yuv420p"
    enc.time_base = Fraction(1, FPS)
    enc.framerate = Fraction(FPS, 1)
    enc.gop_size = gop
    enc.options = {"tune": "zerolatency", "preset": "ultrafast", "profile": "baseline"}
    units = []
    for i in range(count):
        frame = av.VideoFrame(320, 240, "yuv420p")
        for n, plane in enumerate(frame.planes):
            plane.update(bytes([(i * 7 + n * 50) % 256]) * (plane.line_size * plane.height))
        frame.pts = i
        units += [(p.is_keyframe, split_annexb(bytes(p))) for p in enc.encode(frame)]
    units += [(p.is_keyframe, split_annexb(bytes(p))) for p in enc.encode(None)]
    return units


def encode_opus(count: int) -> list[bytes]:
    """`count` 20 ms Opus packets (48 kHz stereo)."""
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate = 48000
    enc.layout = "stereo"
    enc.format = "s16"
    enc.time_base = Fraction(1, 48000)
    packets: list[bytes] = []
    for i in range(count):
        frame = av.AudioFrame(format="s16", layout="stereo", samples=960)
        frame.planes[0].update(bytes((i + k) % 64 for k in range(960 * 4)))
        frame.sample_rate = 48000
        frame.pts = i * 960
        packets += [bytes(p) for p in enc.encode(frame)]
    return packets


@dataclass
class FakeGop:
    generation: int = 0
    frames: list[RtpFrame] = field(default_factory=list)
    truncated: bool = False


class FakeStream:
    """An in-memory stream: caches the GOP like the hub and fans frames out."""

    def __init__(self, profile_level_id: str = "42e01f") -> None:
        self.key = "live/test"
        self.profile_level_id: str | None = profile_level_id
        self.has_video = True
        self.has_audio = True
        self.video_codec = "H264"
        self.video_fmtp = ""
        self.rendition: FakeStream | None = None
        self.arrival = ArrivalAnchor()
        self.gop = FakeGop()
        self.readers: list[FrameReader] = []

    def add_reader(self, reader: FrameReader) -> None:
        self.readers.append(reader)

    def remove_reader(self, reader: FrameReader) -> None:
        self.readers.remove(reader)

    def push(self, frame: RtpFrame) -> None:
        # As the hub's fan-out does.
        rate = 90_000 if frame.kind is MediaKind.VIDEO else 48_000
        self.arrival.update(frame.received_at, frame.timestamp / rate)
        if frame.kind is MediaKind.VIDEO:
            if frame.keyframe:
                self.gop = FakeGop(self.gop.generation + 1, [frame])
            elif self.gop.frames and not self.gop.truncated:
                self.gop.frames.append(frame)
        for reader in list(self.readers):
            reader.on_frame(frame)

    def end(self) -> None:
        for reader in list(self.readers):
            reader.on_stream_end()


def video_frames(units: list[tuple[bool, list[bytes]]]) -> list[RtpFrame]:
    frames = []
    for i, (key, nalus) in enumerate(units):
        payloads = tuple(h264.packetize(nalus, PAYLOAD_SIZE))
        size = sum(map(len, payloads))
        frames.append(RtpFrame(MediaKind.VIDEO, i * 3000, key, payloads, size, 0.0))
    return frames


@pytest.fixture(scope="module")
def media() -> tuple[list[RtpFrame], list[bytes], str]:
    """Video frames (keyframe every 30), Opus packets, the video's profile-level-id."""
    units = encode_h264(90, gop=30)
    sps = next(n for n in units[0][1] if h264.nal_type(n) == h264.NAL_SPS)
    return video_frames(units), encode_opus(150), h264.profile_level_id(sps)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    # aioice gathers only non-loopback host addresses; keep the viewer on 127.0.0.1.
    with mock.patch.object(aioice.ice, "get_host_addresses", return_value=["127.0.0.1"]):
        yield


def _prefer(transceiver: RTCRtpTransceiver, kind: str, mimes: tuple[str, ...]) -> None:
    caps = RTCRtpReceiver.getCapabilities(kind)
    transceiver.setCodecPreferences([c for c in caps.codecs if c.mimeType in mimes])


async def make_offer(pc: RTCPeerConnection) -> str:
    video = pc.addTransceiver("video", direction="recvonly")
    audio = pc.addTransceiver("audio", direction="recvonly")
    _prefer(video, "video", ("video/H264", "video/rtx"))
    _prefer(audio, "audio", ("audio/opus",))
    await pc.setLocalDescription(await pc.createOffer())
    return str(pc.localDescription.sdp)


@pytest.fixture
async def server() -> AsyncIterator[RtcServer]:
    srv = RtcServer(RtcConfig(listen="127.0.0.1", port=0, candidates=("127.0.0.1",)))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _feed(stream: FakeStream, video: list[RtpFrame], audio: list[bytes]) -> None:
    """Push video at 30 fps and audio at 50 packets/s, timestamps on one clock."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    vi = ai = 0
    while vi < len(video) or ai < len(audio):
        t_video = vi / FPS if vi < len(video) else float("inf")
        t_audio = ai * 0.02 if ai < len(audio) else float("inf")
        t = min(t_video, t_audio)
        await asyncio.sleep(max(0.0, start + t - loop.time()))
        now = loop.time()
        if t_video <= t_audio:
            stream.push(replace(video[vi], received_at=now))
            vi += 1
        else:
            payload = audio[ai]
            stream.push(RtpFrame(MediaKind.AUDIO, ai * 960, False, (payload,), len(payload), now))
            ai += 1


async def _recv_frames(track: MediaStreamTrack, count: int) -> list[av.VideoFrame]:
    frames = []
    for _ in range(count):
        frames.append(await asyncio.wait_for(track.recv(), 10))
    return frames


async def test_aiortc_viewer_decodes_video_and_audio(
    server: RtcServer, media: tuple[list[RtpFrame], list[bytes], str]
) -> None:
    video, audio, profile = media
    stream = FakeStream(profile)
    # Ten frames are already cached before the viewer arrives: it must catch up.
    for frame in video[:10]:
        stream.push(frame)
    tracks: dict[str, MediaStreamTrack] = {}
    with loopback_only():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.on("track", lambda t: tracks.__setitem__(t.kind, t))
        try:
            offer = await make_offer(pc)
            session = server.create_session(offer, stream)
            assert session.id in server.sessions
            assert "a=setup:passive" in session.answer_sdp
            assert f"127.0.0.1 {server.port} typ host" in session.answer_sdp
            await pc.setRemoteDescription(RTCSessionDescription(session.answer_sdp, "answer"))
            feeder = asyncio.create_task(_feed(stream, video[10:], audio))
            try:
                frames = await _recv_frames(tracks["video"], 20)
                samples = await asyncio.wait_for(tracks["audio"].recv(), 10)
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
            assert session.state is SessionState.CONNECTED
            assert all((f.width, f.height) == (320, 240) for f in frames)
            assert samples.sample_rate == 48000
            stats = session.stats()
            assert stats["tracks"]["video"]["packets"] > 20
            assert stats["tracks"]["audio"]["packets"] > 0
            media_counts = stats["send"]["kinds"]["media"]
            assert media_counts["sent"] == media_counts["attempted"] > 0
            assert stats["send"]["kinds"]["stun"]["sent"] > 0
            assert stats["send"]["kinds"]["dtls"]["sent"] > 0
            assert server.received[RecvCount.DTLS] > 0
            # Live frames are timed from their arrival to the last packet sent.
            latency = server.stats()["latency"]
            assert latency["video"]["frames"] > 0 and latency["audio"]["frames"] > 0
            assert latency["video"]["p99_ms"] is not None
        finally:
            await pc.close()
    await server.close_session(session.id, "test done")
    assert session.state is SessionState.CLOSED
    assert session.id not in server.sessions
    assert stream.readers == []


async def test_receiver_reports_and_sender_reports(
    server: RtcServer, media: tuple[list[RtpFrame], list[bytes], str]
) -> None:
    video, audio, profile = media
    stream = FakeStream(profile)
    tracks: dict[str, MediaStreamTrack] = {}
    with loopback_only():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.on("track", lambda t: tracks.__setitem__(t.kind, t))
        try:
            session = server.create_session(await make_offer(pc), stream)
            await pc.setRemoteDescription(RTCSessionDescription(session.answer_sdp, "answer"))
            feeder = asyncio.create_task(_feed(stream, video, audio))
            try:
                await _recv_frames(tracks["video"], 5)
                # aiortc sends an RR about once a second and we send SRs each second.
                for _ in range(50):
                    if session.rtcp.receiver_reports and session.receiver_reports:
                        break
                    await asyncio.sleep(0.1)
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
            assert session.rtcp.receiver_reports > 0
            assert MediaKind.VIDEO in session.receiver_reports or (
                MediaKind.AUDIO in session.receiver_reports
            )
            assert session.stats()["send"]["kinds"]["rtcp"]["sent"] > 0
        finally:
            await pc.close()


async def test_stream_end_closes_session(
    server: RtcServer, media: tuple[list[RtpFrame], list[bytes], str]
) -> None:
    stream = FakeStream(media[2])
    with loopback_only():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            session = server.create_session(await make_offer(pc), stream)
        finally:
            await pc.close()
    stream.end()
    for _ in range(50):
        if session.state is SessionState.CLOSED:
            break
        await asyncio.sleep(0.01)
    assert session.close_reason == "stream ended"
    assert server.sessions == {}


async def test_dtls_timeout_closes_session(
    media: tuple[list[RtpFrame], list[bytes], str],
) -> None:
    srv = RtcServer(RtcConfig(listen="127.0.0.1", port=0, dtls_timeout=0.3))
    await srv.start()
    try:
        with loopback_only():
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            try:
                session = srv.create_session(await make_offer(pc), FakeStream(media[2]))
            finally:
                await pc.close()
        await asyncio.sleep(0.8)
        assert session.state is SessionState.CLOSED
        assert session.close_reason == "dtls timeout"
        assert srv.sessions == {}
    finally:
        await srv.stop()


async def test_bad_offer_raises_offer_error(server: RtcServer) -> None:
    with pytest.raises(OfferError, match="^offer is not SDP: it must start with v=0$"):
        server.create_session("hello", FakeStream("42e01f"))
    assert server.sessions == {}


async def test_unknown_address_and_garbage_are_counted(server: RtcServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x16\xfe\xfd" + bytes(20), ("127.0.0.1", server.port))  # DTLS
        s.sendto(b"\x80\xc8" + bytes(20), ("127.0.0.1", server.port))  # RTCP
        s.sendto(b"\xff" + bytes(20), ("127.0.0.1", server.port))  # nothing
        s.sendto(b"\x00\x01\x00\x00" + bytes(16), ("127.0.0.1", server.port))  # STUN, no cookie
        for _ in range(100):
            if sum(server.received.values()) >= 4:
                break
            await asyncio.sleep(0.01)
    assert server.received[RecvCount.UNKNOWN_ADDRESS] == 2
    assert server.received[RecvCount.UNCLASSIFIED] == 1
    assert server.received[RecvCount.STUN] == 1
    assert server.stats()["stun_dropped"]["malformed"] == 1


async def test_create_session_before_start_is_refused() -> None:
    srv = RtcServer(RtcConfig(port=0))
    with pytest.raises(RuntimeError, match=r"RtcServer.start\(\) must be called"):
        srv.create_session("v=0", FakeStream("42e01f"))


async def test_viewer_on_non_loopback_address_reaches_loopback_listener(
    media: tuple[list[RtpFrame], list[bytes], str],
) -> None:
    """A same-host viewer whose host candidate is eth0 still reaches our 127.0.0.1 candidate.

    This needs rtc.listen=127.0.0.1: with 0.0.0.0 the kernel answers from the eth0
    address and the viewer's ICE discards responses from an unexpected source.
    """
    if not aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False):
        pytest.skip("no non-loopback IPv4 address")
    video, audio, profile = media
    srv = RtcServer(RtcConfig(listen="127.0.0.1", port=0, candidates=("127.0.0.1",)))
    await srv.start()
    stream = FakeStream(profile)
    tracks: dict[str, MediaStreamTrack] = {}
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.on("track", lambda t: tracks.__setitem__(t.kind, t))
    try:
        session = srv.create_session(await make_offer(pc), stream)
        await pc.setRemoteDescription(RTCSessionDescription(session.answer_sdp, "answer"))
        feeder = asyncio.create_task(_feed(stream, video[:40], audio[:60]))
        try:
            await _recv_frames(tracks["video"], 3)
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        assert session.ice.remote_addr is not None
        assert session.ice.remote_addr[0] != "127.0.0.1"
    finally:
        await pc.close()
        await srv.stop()


async def test_start_logs_effective_socket_buffers() -> None:
    srv = RtcServer(RtcConfig(listen="127.0.0.1", port=0, sndbuf=16384))
    with structlog.testing.capture_logs() as logs:
        await srv.start()
        await srv.stop()
    listening = next(e for e in logs if e["event"] == "rtc listening")
    assert listening["sndbuf"] == 2 * 16384  # socket(7): Linux doubles SO_SNDBUF
    assert listening["control_queue"] == 256
    stats = srv.stats()["send_path"]
    assert stats["control_queue_limit"] == 256 and stats["blocked"] is False


def binding_request(session_ufrag: str, remote_ufrag: str, pwd: str) -> bytes:
    msg = stun.Message(
        stun.Method.BINDING,
        stun.Class.REQUEST,
        attributes={
            "USERNAME": f"{session_ufrag}:{remote_ufrag}",
            "PRIORITY": 1853817087,
            "ICE-CONTROLLING": 1,
            "USE-CANDIDATE": None,
        },
    )
    msg.add_message_integrity(pwd.encode())
    msg.add_fingerprint()
    return bytes(msg)


async def test_icmp_error_of_vanished_viewer_is_drained_and_attributed(
    server: RtcServer, media: tuple[list[RtpFrame], list[bytes], str]
) -> None:
    stream = FakeStream(media[2])
    with loopback_only():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            session = server.create_session(await make_offer(pc), stream)
        finally:
            await pc.close()
    request = binding_request(session.ice.ufrag, session.offer.ice_ufrag, session.ice.pwd)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as viewer:
        viewer.bind(("127.0.0.1", 0))
        viewer_addr = viewer.getsockname()
        viewer.sendto(request, ("127.0.0.1", server.port))
    # The viewer is gone before the relay answers: the answer draws a port unreachable.
    for _ in range(200):
        if server.stats()["send_path"]["errqueue_drained"]:
            break
        await asyncio.sleep(0.01)
    stats = server.stats()["send_path"]
    assert stats["errqueue_drained"] == 1
    assert stats["icmp_errors"] == {"ECONNREFUSED": 1}
    assert stats["icmp_unattributed"] == 0
    assert session.ice.remote_addr == viewer_addr
    assert session.counters.icmp_errors == 1
    assert session.stats()["send"]["icmp_errors"] == 1
    assert session.counters.kinds[TrafficKind.STUN].sent == 1
    # Drained: the socket no longer polls readable, so the event loop does not spin.
    assert server._sock is not None
    assert select.select([server._sock], [], [server._sock], 0) == ([], [], [])


async def test_ice_restart_takes_new_credentials_and_keeps_dtls(
    server: RtcServer, media: tuple[list[RtpFrame], list[bytes], str]
) -> None:
    stream = FakeStream(media[2])
    with loopback_only():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            session = server.create_session(await make_offer(pc), stream)
        finally:
            await pc.close()
    old_ufrag, old_pwd = session.ice.ufrag, session.ice.pwd
    ufrag, pwd = server.restart_ice(session.id, "newremote", "newremotepassword12345")
    assert (ufrag, pwd) == (session.ice.ufrag, session.ice.pwd)
    assert ufrag != old_ufrag and pwd != old_pwd
    assert session.ice.generation == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as viewer:
        viewer.bind(("127.0.0.1", 0))
        viewer.settimeout(2)
        # Old credentials are gone; the new ones are answered.
        viewer.sendto(
            binding_request(old_ufrag, session.offer.ice_ufrag, old_pwd), ("127.0.0.1", server.port)
        )
        viewer.sendto(binding_request(ufrag, "newremote", pwd), ("127.0.0.1", server.port))
        loop = asyncio.get_running_loop()
        response = stun.parse_message(await loop.run_in_executor(None, viewer.recv, 2048))
        assert response.message_class == stun.Class.RESPONSE
        assert session.ice.remote_addr == viewer.getsockname()
    assert server.stats()["stun_dropped"]["unknown_ufrag"] == 1
    with pytest.raises(KeyError):
        server.restart_ice("no-such-session", "x", "y")
