"""Stream pipeline and registry, fed with real FLV tags written by ffmpeg."""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from srsrelay.config import AudioConfig, HubConfig, VideoConfig
from srsrelay.hub import h264
from srsrelay.hub.frames import MediaKind, RtpFrame
from srsrelay.hub.opus import OPUS_LOOKAHEAD
from srsrelay.hub.registry import Hub, StreamBusy, StreamNotFound
from srsrelay.hub.stream import AUDIO_PACE_QUEUE, MAX_CONSECUTIVE_ERRORS, PublishRejected, Stream
from srsrelay.rtmp import flv
from tests.test_flv import TAG_AUDIO, TAG_VIDEO, FileTag, make_flv, read_flv_tags
from tests.test_h264 import depacketize

PAYLOAD_SIZE = 1200


class Recorder:
    def __init__(self) -> None:
        self.frames: list[RtpFrame] = []
        self.ended = 0

    def on_frame(self, frame: RtpFrame) -> None:
        self.frames.append(frame)

    def on_stream_end(self) -> None:
        self.ended += 1

    def video(self) -> list[RtpFrame]:
        return [f for f in self.frames if f.kind is MediaKind.VIDEO]

    def audio(self) -> list[RtpFrame]:
        return [f for f in self.frames if f.kind is MediaKind.AUDIO]


class Broken(Recorder):
    def on_frame(self, frame: RtpFrame) -> None:
        raise RuntimeError("reader bug")


@pytest.fixture(scope="module")
def tags(tmp_path_factory: pytest.TempPathFactory) -> list[FileTag]:
    path: Path = make_flv(tmp_path_factory.mktemp("hub") / "av.flv", seconds=2, gop=20)
    return read_flv_tags(path)


PASSTHROUGH = VideoConfig(bframes="passthrough")
"""The fixture file has B-frames (x264 defaults): these tests look at them unchanged."""


def new_stream(
    hub_config: HubConfig | None = None,
    payload_size: int = PAYLOAD_SIZE,
    video_config: VideoConfig = PASSTHROUGH,
    audio_config: AudioConfig | None = None,
) -> Stream:
    return Stream(
        "live",
        "test",
        "pub-1",
        hub_config or HubConfig(),
        audio_config or AudioConfig(),
        payload_size,
        video_config,
    )


def feed(stream: Stream, tags: list[FileTag], now: float = 100.0) -> None:
    for tag in tags:
        if tag.kind == TAG_VIDEO:
            stream.on_video_tag(tag.timestamp_ms, tag.body, now)
        elif tag.kind == TAG_AUDIO:
            stream.on_audio_tag(tag.timestamp_ms, tag.body, now)


def video_tags(tags: list[FileTag]) -> list[tuple[FileTag, flv.VideoTag]]:
    return [(t, flv.parse_video_tag(t.body)) for t in tags if t.kind == TAG_VIDEO]


def test_video_frames(tags: list[FileTag]) -> None:
    stream = new_stream()
    reader = Recorder()
    stream.add_reader(reader)
    feed(stream, tags)

    assert stream.has_video and stream.has_audio
    assert stream.profile_level_id == "64000d"  # High, level 1.3 for 320x240@25
    nalu_tags = [(t, v) for t, v in video_tags(tags) if v.packet_type is flv.AvcPacketType.NALU]
    frames = reader.video()
    assert len(frames) == len(nalu_tags) == 50
    assert stream.stats.video_frames == 50
    assert stream.stats.errors == 0
    for frame, (tag, video) in zip(frames, nalu_tags, strict=True):
        assert frame.keyframe == (video.frame_type is flv.VideoFrameType.KEY)
        assert frame.timestamp == (tag.timestamp_ms + video.composition_time) * 90
        assert all(len(p) <= PAYLOAD_SIZE for p in frame.payloads)
        assert frame.size == sum(len(p) for p in frame.payloads)
        assert frame.received_at == 100.0
        nalus = depacketize(frame.payloads)
        types = [n[0] & 0x1F for n in nalus]
        if frame.keyframe:
            # SPS/PPS from the sequence header, in front; aggregated in a STAP-A.
            assert types[:2] == [7, 8] and types[-1] == 5
            assert frame.payloads[0][0] & 0x1F == h264.NAL_STAP_A
            assert stream.avc_config is not None
            assert nalus[0] == stream.avc_config.sps[0]
            assert nalus[1] == stream.avc_config.pps[0]
        else:
            assert 7 not in types and 5 not in types
            assert 9 not in types
    assert [f.keyframe for f in frames].count(True) == 3  # gop=20 over 50 frames


def test_audio_frames(tags: list[FileTag]) -> None:
    stream = new_stream()
    reader = Recorder()
    stream.add_reader(reader)
    feed(stream, tags)
    audio = reader.audio()
    assert 95 <= len(audio) <= 105
    assert stream.stats.audio_frames == len(audio)
    first_audio_ms = next(
        t.timestamp_ms
        for t in tags
        if t.kind == TAG_AUDIO and flv.parse_audio_tag(t.body).packet_type is flv.AacPacketType.RAW
    )
    assert audio[0].timestamp == first_audio_ms * 48 - OPUS_LOOKAHEAD
    assert all(b.timestamp - a.timestamp == 960 for a, b in pairwise(audio))
    assert all(len(f.payloads) == 1 and not f.keyframe and f.marker_index == -1 for f in audio)
    assert stream.aac_config == flv.AacConfig(2, 44100, 2)


def test_gop_cache_generations(tags: list[FileTag]) -> None:
    stream = new_stream()
    seen: list[tuple[int, int]] = []
    held = None
    for tag in tags:
        if tag.kind != TAG_VIDEO:
            continue
        stream.on_video_tag(tag.timestamp_ms, tag.body, 1.0)
        gop = stream.gop
        if gop.frames:
            seen.append((gop.generation, len(gop.frames)))
            assert gop.frames[0].keyframe
            assert not any(f.keyframe for f in gop.frames[1:])
            assert gop.size == sum(f.size for f in gop.frames)
        if gop.generation == 1 and held is None:
            held = gop.frames
    # Three GOPs of 20, 20 and 10 frames; no video only frames in the cache.
    assert stream.gop.generation == 3
    assert len(stream.gop.frames) == 10
    assert not stream.gop.truncated
    assert max(n for g, n in seen if g == 1) == 20
    # The first GOP's list was not touched when the next GOP started.
    assert held is not None and len(held) == 20
    assert all(f.kind is MediaKind.VIDEO for f in stream.gop.frames)


def test_gop_cache_frame_bound(tags: list[FileTag]) -> None:
    stream = new_stream(HubConfig(gop_cache_frames=5))
    feed(stream, tags)
    assert stream.gop.truncated
    assert len(stream.gop.frames) == 5
    assert stream.gop.frames[0].keyframe


def test_gop_cache_byte_bound(tags: list[FileTag]) -> None:
    stream = new_stream()
    feed(stream, tags[:40])
    keyframe_size = stream.gop.frames[0].size
    limit = keyframe_size + 100
    stream = new_stream(HubConfig(gop_cache_bytes=limit))
    feed(stream, tags)
    assert stream.gop.truncated
    assert 1 <= len(stream.gop.frames)
    assert stream.gop.size <= limit
    # A keyframe bigger than the bound: nothing cached, later frames neither.
    stream = new_stream(HubConfig(gop_cache_bytes=10))
    reader = Recorder()
    stream.add_reader(reader)
    feed(stream, tags)
    assert stream.gop.frames == [] and stream.gop.truncated
    assert len(reader.video()) == 50  # the bound limits the cache, not delivery


def test_frames_before_sequence_header_are_sent_not_cached(tags: list[FileTag]) -> None:
    stream = new_stream()
    reader = Recorder()
    stream.add_reader(reader)
    vids = video_tags(tags)
    inter = [(t, v) for t, v in vids if v.frame_type is flv.VideoFrameType.INTER]
    for tag, _ in inter[:3]:
        stream.on_video_tag(tag.timestamp_ms, tag.body, 1.0)
    assert len(reader.video()) == 3
    assert stream.gop.frames == [] and stream.gop.generation == 0
    assert not stream.has_video and stream.profile_level_id is None


def test_broken_reader_does_not_stop_others(tags: list[FileTag]) -> None:
    stream = new_stream()
    broken, good = Broken(), Recorder()
    stream.add_reader(broken)
    stream.add_reader(good)
    with capture_logs() as logs:
        feed(stream, tags, now=5.0)
    assert len(good.video()) == 50
    assert stream.stats.reader_errors == len(good.frames)
    # All at the same `now`: one log line, not one per frame.
    assert [e["event"] for e in logs].count("reader failed on a frame") == 1


def test_malformed_and_unsupported_tags_are_counted(tags: list[FileTag]) -> None:
    stream = new_stream()
    reader = Recorder()
    stream.add_reader(reader)
    with capture_logs() as logs:
        stream.on_video_tag(0, b"\x17\x01\x00\x00\x00\x00\x00\x00\x09\x65", 1.0)
        stream.on_video_tag(0, b"\x17\x01\x00\x00\x00\x00\x00\x00\x09\x65", 1.5)
        stream.on_audio_tag(0, b"\xaf", 3.0)
        stream.on_audio_tag(0, b"\xb6\x00\x01", 3.0)
        stream.on_audio_tag(20, b"\xb6\x00\x01", 3.0)
        stream.on_video_tag(0, b"\x22\x00", 3.0)
    assert stream.stats.errors == 3
    assert stream.stats.frames_in == 6
    assert reader.frames == []
    events = [(e["event"], e.get("error"), e.get("codec")) for e in logs]
    assert events == [
        (
            "video tag dropped",
            "NALU length 9 at offset 0 runs past the end of the 5-byte packet",
            None,
        ),
        # The second error, 0.5 s later, is counted but not logged.
        ("audio tag dropped", "AAC audio tag truncated: need 2 bytes, got 1", None),
        ("audio codec not supported, audio dropped", None, "Speex"),
        ("video codec not supported, video dropped", None, "Sorenson H.263"),
    ]
    # The stream still works afterwards.
    feed(stream, tags)
    assert len(reader.video()) == 50


def test_changed_audio_config_replaces_transcoder(tags: list[FileTag], tmp_path: Path) -> None:
    other = read_flv_tags(make_flv(tmp_path / "mono.flv", seconds=1, audio_rate=22050, channels=1))
    stream = new_stream()
    reader = Recorder()
    stream.add_reader(reader)
    feed(stream, [t for t in tags if t.kind == TAG_AUDIO])
    before = len(reader.audio())
    shifted = [FileTag(t.kind, t.timestamp_ms + 3000, t.body) for t in other if t.kind == TAG_AUDIO]
    feed(stream, shifted)
    assert stream.aac_config == flv.AacConfig(2, 22050, 1)
    after = reader.audio()[before:]
    assert 45 <= len(after) <= 55
    # The stream clock starts at the first tag; the gap between the files is kept.
    first_raw = [t.timestamp_ms for t in tags if t.kind == TAG_AUDIO][1]
    second_raw = [t.timestamp_ms for t in shifted][1]
    gap = after[0].timestamp - reader.audio()[0].timestamp
    assert abs(gap - (second_raw - first_raw) * 48) <= 2 * 960, gap
    assert stream.stats.errors == 0


def test_reader_add_remove_and_end() -> None:
    stream = new_stream()
    a, b = Recorder(), Recorder()
    stream.add_reader(a)
    stream.add_reader(a)
    stream.add_reader(b)
    assert stream.readers == [a, b]
    stream.remove_reader(a)
    stream.remove_reader(a)
    assert stream.readers == [b]
    stream.end()
    stream.end()
    assert (a.ended, b.ended) == (0, 1)
    late = Recorder()
    stream.add_reader(late)
    assert late.ended == 1 and stream.readers == []


class Kicks:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_hub(takeover: bool = False, grace: float = 0.0, clock: Clock | None = None) -> Hub:
    return Hub(
        HubConfig(takeover=takeover, reconnect_grace=grace),
        AudioConfig(),
        PAYLOAD_SIZE,
        PASSTHROUGH,
        clock=clock or Clock(),
    )


def test_registry_busy_and_not_found() -> None:
    hub = new_hub()
    kick = Kicks()
    stream = hub.publish("live", "test", "pub-1", kick)
    assert stream.key == "live/test" and stream.publisher_id == "pub-1"
    assert hub.find("live", "test") is stream
    with pytest.raises(StreamBusy) as busy:
        hub.publish("live", "test", "pub-2", Kicks())
    assert str(busy.value) == (
        "stream live/test is already being published "
        "(set hub.takeover = true to let a new publisher replace it)"
    )
    assert kick.reasons == []
    with pytest.raises(StreamNotFound) as missing:
        hub.find("live", "foo")
    assert str(missing.value) == "stream live/foo is not live"
    other = hub.publish("live", "foo", "pub-3", Kicks())
    assert hub.streams() == [stream, other]

    reader = Recorder()
    stream.add_reader(reader)
    hub.unpublish(stream)
    hub.unpublish(stream)
    assert reader.ended == 1 and stream.ended
    assert hub.streams() == [other]
    with pytest.raises(StreamNotFound):
        hub.find("live", "test")
    # Free again.
    assert hub.publish("live", "test", "pub-2", Kicks()).publisher_id == "pub-2"


def test_registry_takeover() -> None:
    hub = new_hub(takeover=True)
    old_kick = Kicks()
    old = hub.publish("live", "test", "pub-1", old_kick)
    reader = Recorder()
    old.add_reader(reader)
    new = hub.publish("live", "test", "pub-2", Kicks())
    assert old_kick.reasons == ["taken over by pub-2"]
    assert reader.ended == 1 and old.ended and not new.ended
    assert hub.find("live", "test") is new
    # The old publisher's connection closing later must not remove the new stream.
    hub.unpublish(old)
    assert hub.find("live", "test") is new
    # Frames to an ended stream are ignored.
    old.on_video_tag(0, b"\x17\x01\x00\x00\x00", 1.0)
    assert old.stats.frames_in == 0


def test_registry_close() -> None:
    hub = new_hub()
    kicks = [Kicks(), Kicks()]
    streams = [hub.publish("live", n, f"pub-{n}", k) for n, k in zip("ab", kicks, strict=True)]
    readers = [Recorder(), Recorder()]
    for s, r in zip(streams, readers, strict=True):
        s.add_reader(r)
    hub.close()
    assert hub.streams() == []
    assert [r.ended for r in readers] == [1, 1]
    assert [k.reasons for k in kicks] == [["relay is shutting down"]] * 2


def test_kick_failure_is_contained() -> None:
    hub = new_hub(takeover=True)

    def bad_kick(reason: str) -> None:
        raise RuntimeError("connection gone")

    hub.publish("live", "test", "pub-1", bad_kick)
    assert hub.publish("live", "test", "pub-2", Kicks()).publisher_id == "pub-2"


def test_reconnect_within_grace_keeps_stream_and_readers(tags: list[FileTag]) -> None:
    clock = Clock(1000.0)
    hub = new_hub(grace=10.0, clock=clock)
    first_kick = Kicks()
    stream = hub.publish("live", "test", "pub-1", first_kick)
    reader = Recorder()
    stream.add_reader(reader)
    feed(stream, tags, now=1000.0)
    before = reader.video()
    last_ts = before[-1].timestamp

    clock.now = 1002.0
    with capture_logs() as logs:
        hub.unpublish(stream)
    assert not stream.ended and not stream.publishing
    assert reader.ended == 0
    assert hub.find("live", "test") is stream
    assert ("publisher left, waiting for it to come back", 10.0) in [
        (e["event"], e.get("grace")) for e in logs
    ]
    hub.expire(1011.9)  # not yet
    assert not stream.ended

    # A new publisher within the grace period continues the same stream object.
    clock.now = 1003.0
    again = hub.publish("live", "test", "pub-2", Kicks())
    assert again is stream and stream.publishing and stream.publisher_id == "pub-2"
    assert stream.stats.publishers == 2
    # Its timestamps start at 0 again and it begins with a non-keyframe: both handled.
    video = video_tags(tags)
    inter = [t for t, v in video if v.frame_type is flv.VideoFrameType.INTER][:2]
    for tag in inter:
        stream.on_video_tag(tag.timestamp_ms, tag.body, 1003.0)
    assert len(reader.video()) == len(before), "frames before the first keyframe are dropped"
    feed(stream, tags, now=1003.0)
    after = reader.video()[len(before) :]
    assert after[0].keyframe
    assert len(after) == 50
    # Continuous and monotonic: the new publisher's first tag lands where the old one's
    # last tag was plus the 3 s of wall clock in between (tags arrived at 1000, 1003).
    gap_ms = (after[0].timestamp - last_ts) / 90
    assert 3000 <= gap_ms <= 3000 + 300, gap_ms
    assert reader.ended == 0
    hub.expire(2000.0)  # live again: nothing to expire
    assert not stream.ended


def test_grace_expiry_ends_stream_with_reason() -> None:
    clock = Clock(50.0)
    hub = new_hub(grace=10.0, clock=clock)
    stream = hub.publish("live", "test", "pub-1", Kicks())
    reader = Recorder()
    stream.add_reader(reader)
    hub.unpublish(stream)
    hub.unpublish(stream)  # idempotent while waiting
    with capture_logs() as logs:
        hub.expire(60.0)
    assert stream.ended and reader.ended == 1
    assert hub.streams() == []
    ended = [e for e in logs if e["event"] == "stream ended"]
    assert ended[0]["reason"] == "publisher did not come back within hub.reconnect_grace=10s"
    # The name is free: a new publisher gets a new stream.
    assert hub.publish("live", "test", "pub-2", Kicks()) is not stream


def test_end_skips_the_grace_period() -> None:
    hub = new_hub(grace=10.0, clock=Clock(50.0))
    stream = hub.publish("live", "test", "pub-1", Kicks())
    reader = Recorder()
    stream.add_reader(reader)
    with capture_logs() as logs:
        hub.end(stream, "publish rejected: AVC sequence header has no SPS")
    assert stream.ended and reader.ended == 1
    assert hub.streams() == []
    ended = [e for e in logs if e["event"] == "stream ended"]
    assert ended[0]["reason"] == "publish rejected: AVC sequence header has no SPS"


async def test_grace_timer_on_the_running_loop() -> None:
    hub = Hub(HubConfig(reconnect_grace=0.05), AudioConfig(), PAYLOAD_SIZE)
    stream = hub.publish("live", "test", "pub-1", Kicks())
    reader = Recorder()
    stream.add_reader(reader)
    hub.unpublish(stream)
    # Coming back cancels the timer.
    assert hub.publish("live", "test", "pub-2", Kicks()) is stream
    await asyncio.sleep(0.1)
    assert not stream.ended
    hub.unpublish(stream)
    await asyncio.sleep(0.1)
    assert stream.ended and reader.ended == 1 and hub.streams() == []


def test_takeover_with_grace_continues_stream() -> None:
    hub = new_hub(takeover=True, grace=10.0)
    old_kick = Kicks()
    stream = hub.publish("live", "test", "pub-1", old_kick)
    reader = Recorder()
    stream.add_reader(reader)
    assert hub.publish("live", "test", "pub-2", Kicks()) is stream
    assert old_kick.reasons == ["taken over by pub-2"]
    assert reader.ended == 0 and stream.publisher_id == "pub-2"


def test_close_ends_waiting_streams_too() -> None:
    hub = new_hub(grace=10.0)
    kick = Kicks()
    stream = hub.publish("live", "test", "pub-1", kick)
    hub.unpublish(stream)
    hub.close()
    assert stream.ended and hub.streams() == []
    assert kick.reasons == []  # its publisher is already gone


def test_new_parameter_sets_mid_stream_go_before_the_next_idr(
    tags: list[FileTag], tmp_path: Path
) -> None:
    import av

    small = read_flv_tags(make_flv(tmp_path / "small.flv", seconds=1, size="160x120"))
    stream = new_stream()
    reader = Recorder()
    stream.add_reader(reader)
    feed(stream, [t for t in tags if t.kind == TAG_VIDEO])
    first_profile = stream.avc_config
    # The same publisher sends a new sequence header (320x240 -> 160x120), then back.
    later = [FileTag(t.kind, t.timestamp_ms + 2000, t.body) for t in small if t.kind == TAG_VIDEO]
    feed(stream, later)
    assert stream.avc_config != first_profile
    again = [FileTag(t.kind, t.timestamp_ms + 3000, t.body) for t in tags if t.kind == TAG_VIDEO]
    feed(stream, again)
    frames = reader.video()
    assert len(frames) == 50 + 25 + 50
    assert all(b.timestamp > a.timestamp for a, b in pairwise(f for f in frames if f.keyframe))
    # A receiver decoding in arrival order sees both sizes and no errors.
    decoder = av.CodecContext.create("h264", "r")
    sizes = []
    for frame in frames:
        data = b"".join(b"\x00\x00\x00\x01" + n for n in depacketize(frame.payloads))
        for picture in decoder.decode(av.Packet(data)):
            sizes.append((picture.width, picture.height))
    sizes += [(p.width, p.height) for p in decoder.decode(None)]
    assert len(sizes) == 125
    changes = [b for a, b in pairwise(sizes) if a != b]
    assert changes == [(160, 120), (320, 240)]


def _avc_record(sps_count: int) -> bytes:
    return b"\x01\x64\x00\x1f\xff" + bytes((0xE0 | sps_count,)) + b"\x01\x00\x02\x68\xee"


@pytest.mark.parametrize(
    ("kind", "body", "reason"),
    [
        (
            TAG_VIDEO,
            b"\x17\x00\x00\x00\x00" + _avc_record(0),
            "unusable AVC sequence header: AVC sequence header has no SPS",
        ),
        (
            TAG_VIDEO,
            b"\x17\x00\x00\x00\x00\x01\x64",
            "unusable AVC sequence header: AVC sequence header truncated: need 7 bytes, got 2",
        ),
        (
            TAG_AUDIO,
            b"\xaf\x00" + bytes((0b01111_010, 0b0_0010_000)),  # object type 15, 44.1 kHz
            "AAC audio object type 15 is not supported "
            "(supported: Main, LC, LTP, HE-AAC (SBR), HE-AACv2 (PS); use AAC-LC)",
        ),
    ],
)
def test_unusable_config_rejects_the_publish(kind: int, body: bytes, reason: str) -> None:
    stream = new_stream()
    with capture_logs() as logs, pytest.raises(PublishRejected) as info:
        if kind == TAG_VIDEO:
            stream.on_video_tag(0, body, 1.0)
        else:
            stream.on_audio_tag(0, body, 1.0)
    assert str(info.value) == f"stream live/test: {reason}"
    assert [(e["event"], e["reason"]) for e in logs] == [("publish rejected", reason)]


def test_many_malformed_tags_in_a_row_reject_the_publish(tags: list[FileTag]) -> None:
    stream = new_stream()
    feed(stream, tags[:10])
    overrun = b"\x27\x01\x00\x00\x00\x00\x00\x10\x00\x41"  # NALU length past the tag
    for i in range(MAX_CONSECUTIVE_ERRORS - 1):
        stream.on_video_tag(100 + i, overrun, 1.0)
    feed(stream, tags[10:12])  # a good tag resets the count
    for i in range(MAX_CONSECUTIVE_ERRORS - 1):
        stream.on_video_tag(200 + i, overrun, 1.0)
    with pytest.raises(PublishRejected) as info:
        stream.on_video_tag(300, overrun, 1.0)
    assert str(info.value) == (
        f"stream live/test: {MAX_CONSECUTIVE_ERRORS} malformed tags in a row, the last: "
        "NALU length 4096 at offset 0 runs past the end of the 5-byte packet"
    )


class TimedRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_frame(self, frame: RtpFrame) -> None:
        super().on_frame(frame)
        self.times.append(time.monotonic())


async def test_audio_pacer_evens_out_bursts(tags: list[FileTag]) -> None:
    # The publisher sends AAC in bursts: whatever is due arrives together every 40 ms (as
    # ffmpeg interleaves it with 25-30 fps video). The pacer releases each Opus packet
    # at its own time, audio.pacing (50 ms) after the earliest arrival.
    stream = new_stream()
    reader = TimedRecorder()
    stream.add_reader(reader)
    audio_tags = [t for t in tags if t.kind == TAG_AUDIO][:45]  # about 1 s
    start = time.monotonic()
    first_ms = audio_tags[0].timestamp_ms
    burst = 0.04
    for tag in audio_tags:
        rel = (tag.timestamp_ms - first_ms) / 1000
        arrive = start + (int(rel / burst) + 1) * burst  # the end of its burst
        await asyncio.sleep(max(0.0, arrive - time.monotonic()))
        stream.on_audio_tag(tag.timestamp_ms, tag.body, time.monotonic())
    await asyncio.sleep(0.3)
    frames = reader.audio()
    assert len(frames) >= 40, len(frames)
    assert stream.stats.audio_frames == len(frames)
    assert [f.timestamp for f in frames] == sorted(f.timestamp for f in frames)
    # Evenly spaced (20 ms Opus frames) instead of two at once every 40 ms.
    gaps = [b - a for a, b in pairwise(reader.times)]
    even = sum(1 for g in gaps if 0.01 <= g <= 0.035)
    assert even >= 0.8 * len(gaps), str([round(g * 1000) for g in gaps])
    stream.end()


async def test_audio_pacer_holds_a_bounded_queue_and_stops_with_the_stream(
    tags: list[FileTag],
) -> None:
    stream = new_stream(audio_config=AudioConfig(pacing=0.5))
    reader = Recorder()
    stream.add_reader(reader)
    start = time.monotonic()
    for tag in [t for t in tags if t.kind == TAG_AUDIO]:
        stream.on_audio_tag(tag.timestamp_ms, tag.body, start)
    # 2 s of audio in one burst: only AUDIO_PACE_QUEUE packets wait, older ones went out.
    assert len(stream._audio_queue) <= AUDIO_PACE_QUEUE
    assert len(reader.frames) >= stream.stats.audio_frames > 0
    stream.end()
    assert not stream._audio_queue and stream._audio_timer is None
    sent = len(reader.frames)
    await asyncio.sleep(0.6)
    assert len(reader.frames) == sent, "nothing is sent after the stream ended"


def test_pacing_off_sends_audio_at_once(tags: list[FileTag]) -> None:
    stream = new_stream(audio_config=AudioConfig(pacing=0.0))
    reader = Recorder()
    stream.add_reader(reader)
    feed(stream, [t for t in tags if t.kind == TAG_AUDIO])
    assert len(reader.audio()) >= 95
