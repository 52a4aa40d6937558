"""A second, independent RTMP client: GStreamer's rtmp2sink publishes, an aiortc viewer plays."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import RelayProcess, wait_live
from tests.whep_client import WhepViewer

pytestmark = pytest.mark.integration

GST_LAUNCH = shutil.which("gst-launch-1.0")
GST_INSPECT = shutil.which("gst-inspect-1.0")
NEEDED = ("videotestsrc", "x264enc", "h264parse", "flvmux", "rtmp2sink", "audiotestsrc", "aacparse")
AAC_ENCODERS = ("avenc_aac", "voaacenc")
PLAY_SECONDS = 5.0


def _has_element(name: str) -> bool:
    assert GST_INSPECT is not None
    done = subprocess.run(
        [GST_INSPECT, "--exists", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return done.returncode == 0


def _aac_encoder() -> str:
    """The first available AAC encoder element; skips the test when GStreamer lacks one."""
    if GST_LAUNCH is None or GST_INSPECT is None:
        pytest.skip("GStreamer is not installed (gst-launch-1.0 / gst-inspect-1.0 not on PATH)")
    missing = [name for name in NEEDED if not _has_element(name)]
    if missing:
        pytest.skip(
            f"GStreamer elements missing: {', '.join(missing)} "
            "(install gstreamer1.0-plugins-base/-good/-bad/-ugly)"
        )
    for name in AAC_ENCODERS:
        if _has_element(name):
            return name
    pytest.skip(f"no GStreamer AAC encoder ({' or '.join(AAC_ENCODERS)}; gstreamer1.0-libav)")


def gst_publish_args(url: str, aac_encoder: str) -> list[str]:
    assert GST_LAUNCH is not None
    pipeline = (
        "videotestsrc is-live=true pattern=ball "
        "! video/x-raw,width=640,height=360,framerate=30/1 "
        "! x264enc tune=zerolatency key-int-max=60 bitrate=1000 speed-preset=veryfast "
        "! video/x-h264,profile=constrained-baseline "
        "! h264parse ! flvmux name=m streamable=true "
        f"! rtmp2sink location={url} "
        "audiotestsrc is-live=true wave=sine freq=440 "
        "! audio/x-raw,rate=44100,channels=2 ! audioconvert "
        f"! {aac_encoder} ! aacparse ! m."
    )
    return [GST_LAUNCH, "-q", "-e", *pipeline.split()]


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (with -e GStreamer sends EOS and closes the RTMP stream), then reap."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


async def test_gstreamer_rtmp2sink_publish_plays(
    relay: RelayProcess, http_session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    encoder = _aac_encoder()
    log_path = tmp_path / "gst-launch.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            gst_publish_args(relay.rtmp_url("live/gst"), encoder),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            stream = await wait_live(relay, "live/gst", timeout=20)
        except AssertionError:
            raise AssertionError(
                f"gst-launch exit={proc.poll()}, its output: {log_path.read_text()[-2000:]}"
            ) from None
        # The audio sequence header may follow the video one by a few tags.
        for _ in range(20):
            if stream.get("audio"):
                break
            await asyncio.sleep(0.1)
            stream = await wait_live(relay, "live/gst")
        assert stream.get("audio"), stream

        viewer = WhepViewer(relay.http, "/whep/live/gst")
        try:
            await viewer.start(http_session)
            await asyncio.sleep(PLAY_SECONDS)
        finally:
            await viewer.close()
        assert proc.poll() is None, f"gst-launch exited early: {log_path.read_text()[-2000:]}"
    finally:
        stop_process(proc)

    result = viewer.result
    decoded = len(result.video_pts)
    assert result.video_size == (640, 360), result.video_size
    assert decoded >= 0.5 * 30 * PLAY_SECONDS, f"decoded only {decoded} frames"
    assert decoded >= 0.8 * result.frames_expected, (decoded, result.frames_expected)
    assert result.audio_frames > 0, "no Opus audio decoded"
    events = [line.get("event") for line in relay.log_lines()]
    assert "rtmp publish" in events, events
    assert "publish rejected" not in events, events
