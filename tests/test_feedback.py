"""RTCP feedback end to end: a real aiortc viewer sends NACK, PLI and garbage to RtcServer.

Feedback is injected through the viewer's own DTLS transport (SRTCP-protected and sent
over its ICE connection), exactly where aiortc's receiver sends its RTCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import pytest
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtcpPsfbPacket, RtcpRtpfbPacket

from srsrelay.config import RtcConfig
from srsrelay.hub import h264
from srsrelay.hub.frames import MediaKind, RtpFrame
from srsrelay.webrtc.server import RtcServer
from srsrelay.webrtc.viewer import SessionState, ViewerSession
from tests.test_rtc_server import (
    FPS,
    FakeStream,
    encode_h264,
    encode_opus,
    loopback_only,
    make_offer,
    video_frames,
)


@pytest.fixture(scope="module")
def media() -> tuple[list[RtpFrame], list[bytes], str]:
    """Video frames (keyframe every 30), Opus packets, the video's profile-level-id."""
    units = encode_h264(60, gop=30)
    sps = next(n for n in units[0][1] if h264.nal_type(n) == h264.NAL_SPS)
    return video_frames(units), encode_opus(100), h264.profile_level_id(sps)


async def _feed_forever(stream: FakeStream, video: list[RtpFrame], audio: list[bytes]) -> None:
    """Loop the clips at 30 fps video / 50 packets/s audio with continuous timestamps."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    vi = ai = 0
    while True:
        t_video, t_audio = vi / FPS, ai * 0.02
        await asyncio.sleep(max(0.0, start + min(t_video, t_audio) - loop.time()))
        now = loop.time()
        if t_video <= t_audio:
            frame = video[vi % len(video)]
            stream.push(replace(frame, timestamp=vi * 3000, received_at=now))
            vi += 1
        else:
            payload = audio[ai % len(audio)]
            stream.push(RtpFrame(MediaKind.AUDIO, ai * 960, False, (payload,), len(payload), now))
            ai += 1


@dataclass
class Viewer:
    server: RtcServer
    session: ViewerSession
    pc: RTCPeerConnection
    video: RTCRtpTransceiver
    decoded: list[int] = field(default_factory=list)
    """Decoded video frames so far (one-element counter)."""

    @property
    def frames(self) -> int:
        return self.decoded[0]

    async def send_rtcp(self, data: bytes) -> None:
        # aiortc SRTCP-protects anything that looks like RTCP and sends it over ICE.
        await self.video.receiver.transport._send_rtp(data)

    async def send_raw(self, data: bytes) -> None:
        # Straight onto the viewer's ICE connection, without SRTCP.
        await self.video.receiver.transport.transport._send(data)

    def nack(self, seqs: list[int]) -> bytes:
        assert self.session.video is not None
        return bytes(
            RtcpRtpfbPacket(fmt=1, ssrc=1, media_ssrc=self.session.video.ssrc, lost=sorted(seqs))
        )

    def pli(self) -> bytes:
        assert self.session.video is not None
        return bytes(RtcpPsfbPacket(fmt=1, ssrc=1, media_ssrc=self.session.video.ssrc))

    def recent_seqs(self, count: int) -> list[int]:
        assert self.session.video is not None
        newest = self.session.video.seq - 1
        return [(newest - k) & 0xFFFF for k in range(count)]

    async def wait_frames(self, more: int, within: float = 10.0) -> None:
        target = self.frames + more
        await _until(lambda: self.frames >= target, within)


async def _until(predicate: object, within: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def _consume(track: MediaStreamTrack, decoded: list[int]) -> None:
    try:
        while True:
            await track.recv()
            decoded[0] += 1
    except MediaStreamError:
        return


@contextlib.asynccontextmanager
async def connected(
    media: tuple[list[RtpFrame], list[bytes], str], config: RtcConfig
) -> AsyncIterator[Viewer]:
    video, audio, profile = media
    server = RtcServer(config)
    await server.start()
    stream = FakeStream(profile)
    decoded = [0]
    tasks: list[asyncio.Task[None]] = []
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "video":
            tasks.append(asyncio.ensure_future(_consume(track, decoded)))

    pc.on("track", on_track)
    try:
        with loopback_only():
            session = server.create_session(await make_offer(pc), stream)
            await pc.setRemoteDescription(RTCSessionDescription(session.answer_sdp, "answer"))
            transceiver = next(t for t in pc.getTransceivers() if t.kind == "video")
            tasks.append(asyncio.ensure_future(_feed_forever(stream, video, audio)))
            viewer = Viewer(server, session, pc, transceiver, decoded)
            await viewer.wait_frames(5)
            yield viewer
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pc.close()
        await server.stop()


CONFIG = RtcConfig(listen="127.0.0.1", port=0, candidates=("127.0.0.1",))


async def test_nack_is_answered_with_rtx_the_viewer_receives(
    media: tuple[list[RtpFrame], list[bytes], str],
) -> None:
    async with connected(media, CONFIG) as viewer:
        session = viewer.session
        assert session.rtx_ssrc is not None
        await asyncio.sleep(1.0)  # earn retransmit budget: ~1 s of media
        before = session.stats()["nack"]
        await viewer.send_rtcp(viewer.nack(viewer.recent_seqs(3)))
        await _until(lambda: session.stats()["nack"]["received"] > before["received"])
        nack = session.stats()["nack"]
        assert nack["requested"] - before["requested"] >= 3
        assert nack["retransmitted"] - before["retransmitted"] >= 3
        assert session.stats()["send"]["kinds"]["retransmit"]["sent"] >= 3
        sources = lambda: {s.source for s in viewer.video.receiver.getSynchronizationSources()}  # noqa: E731
        await _until(lambda: session.rtx_ssrc in sources())
        await viewer.wait_frames(5)


async def test_nack_storm_is_held_to_the_budget(
    media: tuple[list[RtpFrame], list[bytes], str],
) -> None:
    async with connected(media, CONFIG) as viewer:
        session = viewer.session
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            await viewer.send_rtcp(viewer.nack(viewer.recent_seqs(64)))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        nack = session.stats()["nack"]
        media_bytes = sum(
            t.octets + 12 * t.packets for t in (session.video, session.audio) if t is not None
        )
        assert nack["received"] > 50
        assert nack["over_budget"] > 0 and nack["too_soon"] > 0
        assert 0 < nack["retransmitted_bytes"] <= 0.15 * media_bytes
        retransmit = session.stats()["send"]["kinds"]["retransmit"]
        assert retransmit["attempted"] == nack["retransmitted"]
        # Asking for every packet reads as total loss: the viewer's video is shed.
        assert session.stats()["congestion"]["state"] == "congested"
        assert session.state is SessionState.CONNECTED


async def test_garbage_rtcp_is_counted_while_video_keeps_flowing(
    media: tuple[list[RtpFrame], list[bytes], str],
) -> None:
    async with connected(media, CONFIG) as viewer:
        session = viewer.session
        await viewer.send_rtcp(b"\x80\xc9\x00\x09" + bytes(8))  # length past the end
        await viewer.send_rtcp(b"\x81\xcd\x00\x02" + struct.pack("!II", 1, 2) + b"\xff")
        # Larger than SRTCP can protect: sent as is, refused before decryption.
        await viewer.send_raw(b"\x80\xc9" + struct.pack("!H", 400) + bytes(1600))
        await viewer.send_raw(b"\x80\xc9\x00\x01" + bytes(30))  # not authentic
        await viewer.send_rtcp(
            bytes(RtcpRtpfbPacket(fmt=1, ssrc=1, media_ssrc=12345, lost=[1]))  # not our SSRC
        )
        newest = viewer.recent_seqs(1)[0]
        await viewer.send_rtcp(viewer.nack([(newest + 500) & 0xFFFF, (newest - 20000) & 0xFFFF]))
        await _until(lambda: session.stats()["rtcp"]["oversized"] == 1)
        await _until(lambda: session.stats()["nack"]["not_found"] >= 2)
        rtcp = session.stats()["rtcp"]
        assert rtcp["malformed"] == 2
        assert rtcp["undecryptable"] >= 1
        assert rtcp["unknown_ssrc"] >= 1
        await viewer.wait_frames(10)
        assert session.state is SessionState.CONNECTED
        assert viewer.server.received  # the server's receive loop survived


async def test_pli_is_answered_from_a_fresh_cache(
    media: tuple[list[RtpFrame], list[bytes], str],
) -> None:
    async with connected(media, CONFIG) as viewer:
        session = viewer.session
        before = session.stats()["keyframe"]
        await viewer.send_rtcp(viewer.pli() + viewer.pli())  # the second is rate-limited
        await _until(lambda: session.stats()["keyframe"]["requests"] >= before["requests"] + 2)
        keyframe = session.stats()["keyframe"]
        assert keyframe["answered_from_cache"] - before["answered_from_cache"] >= 1
        assert keyframe["ignored"] - before["ignored"] >= 1
        await viewer.wait_frames(10)


async def test_pli_waits_for_the_next_idr_when_the_cache_is_old(
    media: tuple[list[RtpFrame], list[bytes], str],
) -> None:
    config = replace(CONFIG, keyframe_cache_age=0.0)
    async with connected(media, config) as viewer:
        session = viewer.session
        await viewer.send_rtcp(viewer.pli())
        await _until(lambda: session.stats()["keyframe"]["waited_for_idr"] >= 1)
        # Video is held until the publisher's next keyframe (one per second), then resumes.
        await _until(
            lambda: session.stats()["congestion"]["frames_dropped"]["awaiting_keyframe"] > 0
        )
        await viewer.wait_frames(10, within=5.0)
        assert session.stats()["keyframe"]["answered_from_cache"] == 0
