"""Real publishers with real-world settings: B-frames, profiles, reconnects, resolution
changes, audio shapes, audio-only and video-only streams, far-off timestamps."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from tests.conftest import FFMPEG, Publisher, RelayProcess, session_count, start_relay
from tests.whep_client import VIDEO_CLOCK, WhepViewer, _prefer, loopback_candidates

pytestmark = pytest.mark.integration

Run = Callable[..., Publisher]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    r = start_relay(tmp_path, "[hub]\nreconnect_grace = 10.0\n")
    yield r
    code = r.stop()
    assert code == 0, f"relay exited {code}: {r.log_path.read_text()[-4000:]}"


@pytest.fixture
def ffmpeg(tmp_path: Path) -> Iterator[Run]:
    """Start ffmpeg with any arguments; stopped at the end of the test."""
    started: list[Publisher] = []

    def _run(*args: str) -> Publisher:
        log_path = tmp_path / f"ffmpeg-{len(started)}.log"
        cmd = [FFMPEG, "-hide_banner", "-loglevel", "warning", "-re", *args]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_path.open("wb"), stderr=subprocess.STDOUT
        )
        pub = Publisher(proc, log_path, cmd)
        started.append(pub)
        return pub

    yield _run
    for pub in started:
        pub.stop()


def video_in(size: str = "640x360", seconds: float = 12) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30", "-t", str(seconds)]


def tone_in(rate: int = 44100, seconds: float = 12) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}", "-t", str(seconds)]


def x264(*extra: str) -> list[str]:
    return ["-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-pix_fmt", "yuv420p", *extra]


ZEROLATENCY = ("-tune", "zerolatency")


async def wait_stream(
    relay: RelayProcess, key: str, what: str = "video", timeout: float = 15.0
) -> dict[str, object]:
    """Wait until the API lists `key` with a `what` ("video" or "audio") track."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(relay.http + "/api/v1/streams") as resp:
                data = await resp.json()
            for s in data["streams"]:
                if f"{s['app']}/{s['name']}" == key and s.get(what):
                    return dict(s)
            await asyncio.sleep(0.2)
    raise AssertionError(f"{key} never had {what}: {relay.log_path.read_text()[-3000:]}")


async def watch(
    relay: RelayProcess,
    key: str,
    seconds: float,
    http: aiohttp.ClientSession,
    kind: str | None = None,
) -> WhepViewer:
    """Play `key` for `seconds`; `kind` makes the offer carry only that m-line (the aiortc
    viewer cannot take an answer whose other m-line is rejected)."""
    path = f"/whep/{key}"
    viewer = WhepViewer(relay.http, path) if kind is None else OneKindViewer(relay.http, path, kind)
    try:
        await viewer.start(http)
        await asyncio.sleep(seconds)
        assert await viewer.delete(http) == 200
    finally:
        await viewer.close()
    return viewer


def max_gap_ms(pts: list[int]) -> float:
    return max((b - a for a, b in pairwise(pts)), default=0) * 1000 / VIDEO_CLOCK


def logged(relay: RelayProcess, event: str) -> list[dict[str, object]]:
    return [line for line in relay.log_lines() if line.get("event") == event]


# -- B-frames ----------------------------------------------------------------------------


async def test_bframes_dropped_rest_plays_in_order(
    relay: RelayProcess, ffmpeg: Run, http_session: aiohttp.ClientSession
) -> None:
    # -bf 2 without B-pyramid: every B-frame is droppable.
    ffmpeg(
        *video_in(),
        *x264(*ZEROLATENCY, "-bf", "2", "-x264-params", "b-pyramid=none"),
        "-an",
        "-f",
        "flv",
        relay.rtmp_url("live/bf"),
    )
    await wait_stream(relay, "live/bf")
    viewer = await watch(relay, "live/bf", 8, http_session, "video")
    pts = viewer.result.video_pts
    assert pts == sorted(pts), "decoded out of order"
    span_s = (pts[-1] - pts[0]) / VIDEO_CLOCK
    # With at most 2 B-frames in a row, at least every third frame remains (10 fps);
    # a decoder losing frames would show longer gaps.
    assert len(pts) >= 0.9 * 10 * span_s, (len(pts), span_s)
    assert max_gap_ms(pts) <= 150, max_gap_ms(pts)
    warnings = logged(relay, "stream has B-frames")
    assert len(warnings) == 1 and warnings[0]["policy"] == "drop", warnings


async def test_obs_like_bframes_with_pyramid_are_transcoded(
    relay: RelayProcess, ffmpeg: Run, http_session: aiohttp.ClientSession
) -> None:
    # OBS's x264 default: 2 B-frames, B-pyramid on. Dropping is unsafe: transcoded.
    ffmpeg(
        *video_in(),
        *tone_in(),
        *x264("-bf", "2"),
        "-c:a",
        "aac",
        "-f",
        "flv",
        relay.rtmp_url("live/obs"),
    )
    await wait_stream(relay, "live/obs")
    # The switch to transcoding happens at the second keyframe (GOP of 2 s): join after it.
    await asyncio.sleep(2.5)
    viewer = await watch(relay, "live/obs", 8, http_session)
    result = viewer.result
    assert result.video_pts == sorted(result.video_pts)
    assert len(result.video_pts) >= 0.9 * result.frames_expected, (
        len(result.video_pts),
        result.frames_expected,
    )
    assert len(result.video_pts) >= 150
    assert result.audio_frames > 100
    fallback = logged(
        relay, "stream uses B-frames as references (B-pyramid): they cannot be dropped"
    )
    assert len(fallback) == 1 and fallback[0]["policy"] == "transcode"


# -- profiles ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "prefix"), [("high", "64"), ("main", "4d"), ("baseline", "42")]
)
async def test_profiles(
    relay: RelayProcess,
    ffmpeg: Run,
    http_session: aiohttp.ClientSession,
    profile: str,
    prefix: str,
) -> None:
    ffmpeg(
        *video_in(seconds=10),
        *x264(*ZEROLATENCY, "-profile:v", profile),
        "-an",
        "-f",
        "flv",
        relay.rtmp_url("live/p"),
    )
    stream = await wait_stream(relay, "live/p")
    video = stream["video"]
    assert isinstance(video, dict) and str(video["profile_level_id"]).startswith(prefix)
    viewer = await watch(relay, "live/p", 5, http_session, "video")
    result = viewer.result
    assert len(result.video_pts) >= 0.9 * result.frames_expected >= 100


# -- reconnects and resolution changes ---------------------------------------------------


async def test_publisher_restarts_with_new_resolutions_viewer_keeps_playing(
    relay: RelayProcess, ffmpeg: Run, http_session: aiohttp.ClientSession
) -> None:
    key = "live/re"

    def publish(size: str) -> Publisher:
        return ffmpeg(
            *video_in(size, seconds=30),
            *tone_in(seconds=30),
            *x264(*ZEROLATENCY),
            "-c:a",
            "aac",
            "-f",
            "flv",
            relay.rtmp_url(key),
        )

    first = publish("1280x720")
    await wait_stream(relay, key)
    viewer = WhepViewer(relay.http, f"/whep/{key}")
    sizes: list[tuple[int, int]] = []
    counts: list[int] = []
    try:
        await viewer.start(http_session)
        location = viewer.result.location
        for size in ("640x360", "1280x720"):
            await asyncio.sleep(3)
            sizes.append(viewer.result.video_size or (0, 0))
            counts.append(len(viewer.result.video_pts))
            first.proc.kill()  # a crash: no unpublish, the TCP connection just drops
            first.proc.wait()
            await asyncio.sleep(1.0)
            first = publish(size)
        await asyncio.sleep(4)
        sizes.append(viewer.result.video_size or (0, 0))
        counts.append(len(viewer.result.video_pts))
        assert await session_count(relay) == 1
        assert viewer.result.location == location
        assert await viewer.delete(http_session) == 200
    finally:
        await viewer.close()
    assert sizes == [(1280, 720), (640, 360), (1280, 720)], sizes
    pts = viewer.result.video_pts
    # One continuous, monotonic clock across both restarts; each gap about the outage.
    assert all(b > a for a, b in pairwise(pts))
    assert max_gap_ms(pts) <= 3000, max_gap_ms(pts)
    assert counts[0] >= 60 and counts[1] - counts[0] >= 45 and counts[2] - counts[1] >= 60, counts
    resumed = logged(relay, "publish resumed")
    assert len(resumed) == 2, resumed


async def test_grace_expiry_closes_viewer_with_reason(
    tmp_path: Path, ffmpeg: Run, http_session: aiohttp.ClientSession
) -> None:
    relay = start_relay(tmp_path, "[hub]\nreconnect_grace = 1.0\n")
    try:
        pub = ffmpeg(
            *video_in("320x240"), *x264(*ZEROLATENCY), "-an", "-f", "flv", relay.rtmp_url("live/g")
        )
        await wait_stream(relay, "live/g")
        viewer = OneKindViewer(relay.http, "/whep/live/g", "video")
        try:
            await viewer.start(http_session)
            await asyncio.sleep(2)
            pub.stop()
            await asyncio.sleep(0.5)
            assert await session_count(relay) == 1  # still waiting for the publisher
            await asyncio.sleep(1.5)
            assert await session_count(relay) == 0
        finally:
            await viewer.close()
        ended = logged(relay, "stream ended")
        assert ended and ended[-1]["reason"] == (
            "publisher did not come back within hub.reconnect_grace=1s"
        )
    finally:
        assert relay.stop() == 0


# -- audio shapes, audio-only and video-only ---------------------------------------------


@pytest.mark.parametrize(
    "audio",
    [
        ["-c:a", "aac", "-ar", "44100", "-ac", "1"],
        ["-c:a", "libmp3lame", "-ar", "44100", "-ac", "2"],
    ],
    ids=["aac-44k1-mono", "mp3"],
)
async def test_audio_shapes(
    relay: RelayProcess, ffmpeg: Run, http_session: aiohttp.ClientSession, audio: list[str]
) -> None:
    ffmpeg(
        *video_in("320x240", 10),
        *tone_in(44100, 10),
        *x264(*ZEROLATENCY),
        *audio,
        "-f",
        "flv",
        relay.rtmp_url("live/a"),
    )
    await wait_stream(relay, "live/a", "audio")
    viewer = await watch(relay, "live/a", 5, http_session)
    # 50 Opus packets a second.
    assert viewer.result.audio_frames >= 200, viewer.result.audio_frames
    assert len(viewer.result.video_pts) >= 100


class OneKindViewer(WhepViewer):
    """A viewer whose offer has only one m-line."""

    def __init__(self, base_url: str, path: str, kind: str) -> None:
        super().__init__(base_url, path)
        self.kind = kind

    async def start(self, session: aiohttp.ClientSession) -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pc = pc
        mime = "video/H264" if self.kind == "video" else "audio/opus"
        _prefer(pc.addTransceiver(self.kind, direction="recvonly"), self.kind, mime)

        @pc.on("track")
        def on_track(track) -> None:  # type: ignore[no-untyped-def]
            self._tasks.append(asyncio.ensure_future(self._consume(track)))

        with loopback_candidates():
            await pc.setLocalDescription(await pc.createOffer())
        async with session.post(
            self.base_url + self.path,
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            self.result.status = resp.status
            body = await resp.text()
            assert resp.status == 201, body
            self.result.location = resp.headers.get("Location")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))


async def full_offer_answer(relay: RelayProcess, key: str, http: aiohttp.ClientSession) -> str:
    """POST an offer with both an audio and a video m-line; return the answer."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        _prefer(pc.addTransceiver("video", direction="recvonly"), "video", "video/H264")
        _prefer(pc.addTransceiver("audio", direction="recvonly"), "audio", "audio/opus")
        with loopback_candidates():
            await pc.setLocalDescription(await pc.createOffer())
        async with http.post(
            f"{relay.http}/whep/{key}",
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            answer = await resp.text()
            assert resp.status == 201, answer
            location = resp.headers["Location"]
        async with http.delete(relay.http + location if location.startswith("/") else location):
            pass
        return answer
    finally:
        await pc.close()


async def test_audio_only_stream(
    relay: RelayProcess, ffmpeg: Run, http_session: aiohttp.ClientSession
) -> None:
    ffmpeg(*tone_in(48000, 10), "-c:a", "aac", "-f", "flv", relay.rtmp_url("live/radio"))
    stream = await wait_stream(relay, "live/radio", "audio")
    assert not stream.get("video")
    # A browser-like offer (video and audio) is answered with the video m-line rejected.
    answer = await full_offer_answer(relay, "live/radio", http_session)
    assert "m=video 0 " in answer and re.search(r"a=rtpmap:\d+ opus/48000/2", answer), answer
    viewer = OneKindViewer(relay.http, "/whep/live/radio", "audio")
    try:
        await viewer.start(http_session)
        await asyncio.sleep(4)
        assert await viewer.delete(http_session) == 200
    finally:
        await viewer.close()
    assert viewer.result.audio_frames >= 150


async def test_video_only_stream(
    relay: RelayProcess, ffmpeg: Run, http_session: aiohttp.ClientSession
) -> None:
    ffmpeg(
        *video_in("320x240", 10), *x264(*ZEROLATENCY), "-an", "-f", "flv", relay.rtmp_url("live/v")
    )
    stream = await wait_stream(relay, "live/v")
    assert not stream.get("audio")
    answer = await full_offer_answer(relay, "live/v", http_session)
    assert "m=audio 0 " in answer and "H264/90000" in answer
    viewer = OneKindViewer(relay.http, "/whep/live/v", "video")
    try:
        await viewer.start(http_session)
        await asyncio.sleep(4)
        assert await viewer.delete(http_session) == 200
    finally:
        await viewer.close()
    assert len(viewer.result.video_pts) >= 90


@pytest.mark.parametrize("kind", ["audio", "video"])
async def test_offer_with_one_kind_only(
    relay: RelayProcess, ffmpeg: Run, http_session: aiohttp.ClientSession, kind: str
) -> None:
    ffmpeg(
        *video_in("320x240", 10),
        *tone_in(44100, 10),
        *x264(*ZEROLATENCY),
        "-c:a",
        "aac",
        "-f",
        "flv",
        relay.rtmp_url("live/one"),
    )
    await wait_stream(relay, "live/one", "audio")
    viewer = OneKindViewer(relay.http, "/whep/live/one", kind)
    try:
        await viewer.start(http_session)
        await asyncio.sleep(4)
        assert await viewer.delete(http_session) == 200
    finally:
        await viewer.close()
    if kind == "audio":
        assert viewer.result.audio_frames >= 150 and viewer.result.video_pts == []
    else:
        assert len(viewer.result.video_pts) >= 90 and viewer.result.audio_frames == 0


# -- timestamps ----------------------------------------------------------------------------


async def test_extended_timestamp_boundary(
    relay: RelayProcess, ffmpeg: Run, http_session: aiohttp.ClientSession
) -> None:
    # Starts 16770 s in: crosses 2**24 ms (16777.216 s), where RTMP switches to the
    # extended timestamp field, about 7 s later.
    ffmpeg(
        *video_in("320x240", 14),
        *tone_in(44100, 14),
        *x264(*ZEROLATENCY),
        "-c:a",
        "aac",
        "-output_ts_offset",
        "16770",
        "-f",
        "flv",
        relay.rtmp_url("live/ts"),
    )
    await wait_stream(relay, "live/ts")
    viewer = await watch(relay, "live/ts", 10, http_session)
    result = viewer.result
    assert len(result.video_pts) >= 0.9 * result.frames_expected >= 250, (
        len(result.video_pts),
        result.frames_expected,
    )
    assert max_gap_ms(result.video_pts) <= 200
    assert result.audio_frames >= 400
    assert not logged(
        relay, "publisher timestamps jumped; stream clock continued from the last frame"
    )


# -- B-frames in a real browser ------------------------------------------------------------


@pytest.mark.parametrize(
    ("x264_params", "policy"),
    [("b-pyramid=none", "drop"), ("b-pyramid=normal", "transcode")],
    ids=["non-reference-b-dropped", "obs-default-transcoded"],
)
async def test_chromium_plays_bframe_publish(
    relay: RelayProcess, ffmpeg: Run, x264_params: str, policy: str
) -> None:
    from tests.chromium import Chromium
    from tests.test_browser import STATS_JS, track

    ffmpeg(
        *video_in("640x360", 15),
        *tone_in(44100, 15),
        *x264("-bf", "2", "-x264-params", x264_params),
        "-c:a",
        "aac",
        "-f",
        "flv",
        relay.rtmp_url("live/cb"),
    )
    await wait_stream(relay, "live/cb")
    browser = Chromium()
    await browser.start()
    try:
        await browser.navigate(f"{relay.http}/?stream=live/cb")
        await asyncio.sleep(8)
        stats = await browser.evaluate(STATS_JS)
        assert stats is not None, f"player did not start: {browser.console}"
        video = track(stats, "video")
    finally:
        await browser.close()
    received, decoded = video.get("framesReceived", 0), video.get("framesDecoded", 0)
    # Every frame the relay sends (the non-B frames, or all re-encoded ones) decodes.
    # Transcoding starts at the second keyframe (2 s in): 6 s of 30 fps after it.
    assert received >= (60 if policy == "drop" else 150), video
    assert decoded >= 0.9 * received, video
    assert video.get("pliCount", 0) <= 2, video
    warnings = logged(relay, "stream has B-frames")
    assert len(warnings) == 1, warnings
    if policy == "transcode":
        assert logged(relay, "video transcoder started")
