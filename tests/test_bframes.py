"""B-frame policies on real x264 output: drop, transcode, passthrough."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from itertools import pairwise
from pathlib import Path

import av
import pytest
from structlog.testing import capture_logs

from srsrelay.config import AudioConfig, HubConfig, VideoConfig
from srsrelay.hub import h264, transcode
from srsrelay.hub.frames import RtpFrame
from srsrelay.hub.stream import BframesPolicy, Stream
from srsrelay.rtmp import flv
from tests.test_flv import TAG_VIDEO, FileTag, read_flv_tags
from tests.test_h264 import depacketize
from tests.test_hub import Recorder

FRAMES = 50


def encode_flv(path: Path, x264: list[str]) -> list[FileTag]:
    """2 s of 25 fps 160x120 video, GOP 25, with the given encoder options."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    cmd = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-t", "2",
        "-c:v", "libx264", "-preset", "veryfast", "-g", "25", "-pix_fmt", "yuv420p",
        *x264, "-an", str(path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=60)
    return [t for t in read_flv_tags(path) if t.kind == TAG_VIDEO]


@pytest.fixture(scope="module")
def plain_b(tmp_path_factory: pytest.TempPathFactory) -> list[FileTag]:
    """-bf 2 without B-pyramid: every B-frame is a non-reference picture."""
    path = tmp_path_factory.mktemp("bf") / "plain.flv"
    return encode_flv(path, ["-bf", "2", "-x264-params", "b-pyramid=none"])


@pytest.fixture(scope="module")
def pyramid_b(tmp_path_factory: pytest.TempPathFactory) -> list[FileTag]:
    """-bf 3 with x264's default B-pyramid: some B-frames are references."""
    path = tmp_path_factory.mktemp("bf") / "pyramid.flv"
    return encode_flv(path, ["-bf", "3", "-x264-params", "b-pyramid=normal"])


@pytest.fixture(scope="module")
def no_b(tmp_path_factory: pytest.TempPathFactory) -> list[FileTag]:
    path = tmp_path_factory.mktemp("bf") / "nob.flv"
    return encode_flv(path, ["-tune", "zerolatency"])


def run(tags: list[FileTag], policy: str) -> tuple[Stream, Recorder]:
    stream = Stream(
        "live",
        "bf",
        "pub-1",
        HubConfig(),
        AudioConfig(),
        1200,
        VideoConfig(bframes=policy, transcode_keyframe_interval=1.0),
    )
    reader = Recorder()
    stream.add_reader(reader)
    for tag in tags:
        stream.on_video_tag(tag.timestamp_ms, tag.body, 10.0 + tag.timestamp_ms / 1000)
    return stream, reader


def pictures(tags: list[FileTag]) -> list[h264.PictureInfo | None]:
    out = []
    for tag in tags:
        parsed = flv.parse_video_tag(tag.body)
        if parsed.packet_type is flv.AvcPacketType.NALU:
            out.append(h264.picture_info(flv.split_nalus(parsed.data, 4)))
    return out


def decode_in_order(frames: list[RtpFrame]) -> int:
    """Decode the frames as a WebRTC receiver does (arrival order); count clean pictures."""
    decoder = av.CodecContext.create("h264", "r")
    decoded = 0
    for frame in frames:
        data = b"".join(b"\x00\x00\x00\x01" + n for n in depacketize(frame.payloads))
        decoded += len(decoder.decode(av.Packet(data)))
    decoded += len(decoder.decode(None))
    return decoded


def test_fixtures_have_the_b_frames_they_claim(
    plain_b: list[FileTag], pyramid_b: list[FileTag], no_b: list[FileTag]
) -> None:
    plain = pictures(plain_b)
    assert len(plain) == FRAMES
    assert any(p and p.is_b for p in plain)
    assert not any(p and p.is_b and p.is_reference for p in plain)
    assert any(p and p.is_b and p.is_reference for p in pictures(pyramid_b))
    assert not any(p and p.is_b for p in pictures(no_b))


def test_drop_keeps_the_rest_decodable_in_order(plain_b: list[FileTag]) -> None:
    with capture_logs() as logs:
        stream, reader = run(plain_b, "drop")
    b_count = sum(1 for p in pictures(plain_b) if p and p.is_b)
    frames = reader.video()
    assert stream.has_bframes and stream.bframes_policy is BframesPolicy.DROP
    assert stream.stats.bframes_dropped == b_count > 0
    assert len(frames) == FRAMES - b_count
    assert all(b.timestamp > a.timestamp for a, b in pairwise(frames))
    assert decode_in_order(frames) == len(frames)
    warnings = [e for e in logs if e["event"] == "stream has B-frames"]
    assert len(warnings) == 1
    assert warnings[0]["policy"] == "drop"
    assert "-bf 0" in warnings[0]["advice"] and "zerolatency" in warnings[0]["advice"]


def test_passthrough_sends_everything_in_decode_order(plain_b: list[FileTag]) -> None:
    stream, reader = run(plain_b, "passthrough")
    frames = reader.video()
    assert stream.has_bframes and stream.bframes_policy is BframesPolicy.PASSTHROUGH
    assert len(frames) == FRAMES
    # RTP timestamps are presentation times: they go backwards at every B-frame.
    assert any(b.timestamp < a.timestamp for a, b in pairwise(frames))


@pytest.mark.skipif(not transcode.available(), reason="FFmpeg has no libx264")
def test_transcode_gives_every_frame_without_b_frames(plain_b: list[FileTag]) -> None:
    stream, reader = run(plain_b, "transcode")
    frames = reader.video()
    assert stream.has_bframes and stream.bframes_policy is BframesPolicy.TRANSCODE
    # The decoder holds back its reorder depth (2 frames) at the end of the input.
    assert FRAMES - 3 <= len(frames) <= FRAMES
    assert stream.stats.frames_transcoded == len(frames)
    assert all(b.timestamp > a.timestamp for a, b in pairwise(frames))
    # 40 ms apart (25 fps): the full frame rate.
    assert {b.timestamp - a.timestamp for a, b in pairwise(frames)} == {40 * 90}
    assert frames[0].keyframe
    # transcode_keyframe_interval = 1 s at 25 fps.
    assert [i for i, f in enumerate(frames) if f.keyframe] == [0, 25]
    nalus = [n for f in frames for n in depacketize(f.payloads)]
    slices = [n for n in nalus if h264.nal_type(n) in (h264.NAL_SLICE, h264.NAL_IDR)]
    assert not any(h264.slice_type(n) == h264.SLICE_B for n in slices)
    assert stream.profile_level_id is not None and stream.profile_level_id.startswith("42")
    assert decode_in_order(frames) == len(frames)


@pytest.mark.skipif(not transcode.available(), reason="FFmpeg has no libx264")
def test_drop_falls_back_to_transcode_for_b_pyramid(pyramid_b: list[FileTag]) -> None:
    with capture_logs() as logs:
        stream, reader = run(pyramid_b, "drop")
    assert stream.bframes_policy is BframesPolicy.TRANSCODE
    events = [e["event"] for e in logs]
    assert (
        events.count("stream uses B-frames as references (B-pyramid): they cannot be dropped") == 1
    )
    frames = reader.video()
    # Transcoding starts at the second keyframe (frame 25): what came before was
    # already sent or held back.
    assert frames and all(b.timestamp > a.timestamp for a, b in pairwise(frames))
    assert decode_in_order(frames) == len(frames)


def test_stream_without_b_frames_is_untouched(no_b: list[FileTag]) -> None:
    for policy in ("drop", "transcode"):
        stream, reader = run(no_b, policy)
        assert not stream.has_bframes
        assert len(reader.video()) == FRAMES
        assert stream.stats.frames_transcoded == 0 and stream.stats.bframes_dropped == 0


@pytest.mark.skipif(not transcode.available(), reason="FFmpeg has no libx264")
async def test_transcode_runs_off_the_event_loop(plain_b: list[FileTag]) -> None:
    # With a running loop the transcoder works on its own thread; results come back
    # on the loop, in order, and a stream that ends drops late results.
    loop = asyncio.get_running_loop()
    stream, reader = run(plain_b, "transcode")  # inline: run() calls from this loop
    assert isinstance(stream._video_transcoder, transcode.ThreadedTranscoder)
    deadline = loop.time() + 20
    while len(reader.video()) < FRAMES - 3 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    frames = reader.video()
    assert FRAMES - 3 <= len(frames) <= FRAMES
    assert all(b.timestamp > a.timestamp for a, b in pairwise(frames))
    assert decode_in_order(frames) == len(frames)
    stream.end("test over")
    count = len(reader.frames)
    await asyncio.sleep(0.1)
    assert len(reader.frames) == count
