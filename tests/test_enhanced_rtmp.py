"""Enhanced RTMP publishers (FourCC 'av01', 'hvc1'): passed through to viewers that accept
the codec, 406 naming it for the others, or H.264 made once with video.transcode_to_h264.

The Debian ffmpeg cannot publish enhanced RTMP, so the publisher replays fixtures written
with the relay's own FLV writer (tests/fixtures/make_*.py) over a real RTMP connection.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from tests.chromium import Chromium
from tests.conftest import RelayProcess, start_relay, wait_live
from tests.raw_publisher import RawPublisher, replay_flv
from tests.test_browser import STATS_JS, track
from tests.whep_client import WhepViewer, _prefer, loopback_candidates

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent / "fixtures"
AV1_FLV = FIXTURES / "av1_aac.flv"
"""4 s of 320x240 25 fps AV1 (keyframe each second) and AAC, looped by the replay."""
REPLAY_SECONDS = 60.0
"""Upper bound: every test stops its publisher when it is done."""


class Replay:
    """A recorded FLV file published in real time on its own thread."""

    def __init__(self, relay: RelayProcess, name: str, flv: bytes) -> None:
        self.stop = threading.Event()
        self.sent = 0
        pub = RawPublisher(relay.rtmp_port, "live", name)
        self._pub = pub

        def run() -> None:
            try:
                self.sent = replay_flv(pub, flv, REPLAY_SECONDS, self.stop)
            except OSError:
                pass  # the relay closed the connection; the test says why

        self._thread = threading.Thread(target=run, name=f"replay-{name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(5)
        self._pub.close()


@pytest.fixture
def replay(relay_av1: RelayProcess) -> Iterator[Replay]:
    r = Replay(relay_av1, "av1", AV1_FLV.read_bytes())
    yield r
    r.close()


@pytest.fixture
def relay_av1(tmp_path: Path) -> Iterator[RelayProcess]:
    r = start_relay(tmp_path)
    yield r
    assert r.stop() == 0, r.log_path.read_text()[-4000:]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def stream_info(http: aiohttp.ClientSession, relay: RelayProcess, key: str) -> Any:
    async with http.get(f"{relay.http}/api/v1/streams") as resp:
        streams = (await resp.json())["streams"]
    found = [s for s in streams if s["id"] == key]
    assert found, streams
    return found[0]


async def wait_audio_and_video(relay: RelayProcess, key: str) -> None:
    await wait_live(relay, key)
    for _ in range(50):
        if (await stream_info_once(relay, key)).get("audio"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{key} has no audio after 5 s")


async def stream_info_once(relay: RelayProcess, key: str) -> Any:
    async with aiohttp.ClientSession() as http:
        return await stream_info(http, relay, key)


async def h264_only_offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    _prefer(pc.addTransceiver("video", direction="recvonly"), "video", "video/H264")
    _prefer(pc.addTransceiver("audio", direction="recvonly"), "audio", "audio/opus")
    with loopback_candidates():
        await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_av1_plays_in_chromium_and_h264_viewers_get_406(
    relay_av1: RelayProcess, replay: Replay, http: aiohttp.ClientSession
) -> None:
    await wait_audio_and_video(relay_av1, "live/av1")
    info = await stream_info(http, relay_av1, "live/av1")
    assert info["video"] == {
        "codec": "AV1",
        "fmtp": "profile=0;level-idx=0;tier=0",
        "h264_rendition": False,
    }, info
    assert info["audio"] == {"codec": "opus"}, info

    # A viewer that only takes H.264: 406, and the message names the codec.
    pc, offer = await h264_only_offer()
    try:
        async with http.post(
            f"{relay_av1.http}/whep/live/av1",
            data=offer,
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            status, text = resp.status, await resp.text()
    finally:
        await pc.close()
    assert status == 406, (status, text)
    assert text.startswith("stream live/av1: the stream's video is AV1 (profile=0;"), text
    assert "video.transcode_to_h264" in text, text

    # Chromium receives AV1 and decodes it.
    browser = Chromium()
    await browser.start()
    try:
        await browser.navigate(f"{relay_av1.http}/?stream=live/av1")
        await asyncio.sleep(8)
        stats = await browser.evaluate(STATS_JS)
    finally:
        await browser.close()
    assert stats is not None, "player did not start"
    video = track(stats, "video")
    audio = track(stats, "audio")
    assert video["mimeType"] == "video/AV1", video
    # 25 fps for about 7 s once connected; the relay dropped nothing.
    assert video.get("framesDecoded", 0) >= 120, video
    assert (video["frameWidth"], video["frameHeight"]) == (320, 240), video
    assert audio["mimeType"] == "audio/opus" and audio.get("packetsReceived", 0) > 100, audio

    info = await stream_info(http, relay_av1, "live/av1")
    assert info["errors"] == 0 and info["state"] == "live", info


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_av1_is_transcoded_once_for_h264_viewers(
    tmp_path: Path, http: aiohttp.ClientSession, workers: str
) -> None:
    # With worker processes, the rendition is made in the relay process and fed to both.
    relay = start_relay(
        tmp_path, f"[video]\ntranscode_to_h264 = true\n[daemon]\nworkers = {workers}\n"
    )
    replay = Replay(relay, "av1", AV1_FLV.read_bytes())
    viewers = [WhepViewer(relay.http, "/whep/live/av1") for _ in range(2)]
    try:
        await wait_audio_and_video(relay, "live/av1")
        for viewer in viewers:
            await viewer.start(http)
        await asyncio.sleep(6)
        info = await stream_info(http, relay, "live/av1")
        sessions = await (await http.get(f"{relay.http}/api/v1/sessions")).json()
    finally:
        for viewer in viewers:
            await viewer.close()
        replay.close()
        code = relay.stop()
    assert code == 0, relay.log_path.read_text()[-4000:]

    assert info["video"]["codec"] == "AV1" and info["video"]["h264_rendition"] is True, info
    assert info["clients"] == 2, info
    for viewer in viewers:
        result = viewer.result
        # The rendition starts at the first keyframe after the publish: about 5 s of 25 fps.
        assert len(result.video_pts) >= 90, len(result.video_pts)
        assert result.video_size == (320, 240), result.video_size
        assert result.audio_frames > 100, result.audio_frames
    assert len(sessions["sessions"]) == 2, sessions
    # Once per stream: one transcoder started, whatever the number of viewers.
    started = [
        line for line in relay.log_lines() if line.get("event") == "video transcoder started"
    ]
    assert len(started) == 1, started
