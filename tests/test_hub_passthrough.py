"""HEVC and AV1 streams in the hub: packetized once, passed through, codec changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from srsrelay.config import VideoConfig
from srsrelay.hub import av1
from srsrelay.hub.frames import VIDEO_CLOCK_RATE
from srsrelay.hub.stream import PublishRejected
from srsrelay.rtmp import flv, flvwrite
from srsrelay.rtmp.flv import AvcPacketType, VideoFrameType
from tests.test_flv import FileTag
from tests.test_hub import Recorder, feed, new_stream, tags  # noqa: F401 (fixture)

FIXTURES = Path(__file__).parent / "fixtures"
PAYLOAD_SIZE = 600


@pytest.fixture(scope="module")
def av1_tags() -> list[FileTag]:
    data = (FIXTURES / "av1_aac.flv").read_bytes()
    return [FileTag(kind, ts, body) for kind, ts, body in flvwrite.read_flv(data)]


def test_av1_frames_are_packetized_once_with_the_sequence_header_on_keyframes(
    av1_tags: list[FileTag],
) -> None:
    stream = new_stream(payload_size=PAYLOAD_SIZE)
    reader = Recorder()
    stream.add_reader(reader)
    feed(stream, av1_tags)

    assert stream.video_codec == "AV1"
    assert stream.video_fmtp == "profile=0;level-idx=0;tier=0"
    assert stream.has_video and stream.has_audio
    video = reader.video()
    assert len(video) == 100, len(video)
    assert [n for n, f in enumerate(video) if f.keyframe] == [0, 25, 50, 75]
    assert all(len(p) <= PAYLOAD_SIZE for f in video for p in f.payloads)
    # 25 fps on the 90 kHz clock, strictly increasing.
    steps = {b.timestamp - a.timestamp for a, b in zip(video, video[1:], strict=False)}
    assert steps == {VIDEO_CLOCK_RATE // 25}, steps
    # Keyframes start a new coded video sequence (N=1) and carry the sequence header.
    for frame in video:
        first = frame.payloads[0][0]
        assert bool(first & 0x08) is frame.keyframe, (frame.keyframe, hex(first))
    # The GOP cache holds the last GOP from its keyframe.
    assert stream.gop.frames[0] is video[75] and len(stream.gop.frames) == 25
    assert len(reader.audio()) > 150
    assert stream.stats.errors == 0


def test_codec_change_ends_the_readers_of_the_old_codec(
    tags: list[FileTag],  # noqa: F811
    av1_tags: list[FileTag],
) -> None:
    stream = new_stream(payload_size=PAYLOAD_SIZE)
    h264_reader = Recorder()
    stream.add_reader(h264_reader)
    feed(stream, tags)
    assert stream.video_codec == "H264" and stream.profile_level_id is not None
    assert h264_reader.video() and h264_reader.ended == 0

    # The publisher switches to AV1 (a reconnect with other encoder settings).
    feed(stream, av1_tags, now=200.0)
    assert h264_reader.ended == 1, "an H.264 viewer cannot decode AV1: it must renegotiate"
    assert not stream.ended and stream.readers == []
    assert stream.video_codec == "AV1" and stream.profile_level_id is None
    assert stream.avc_config is None and stream.av1_config is not None
    assert stream.gop.frames[0].keyframe

    av1_reader = Recorder()
    stream.add_reader(av1_reader)
    feed(stream, tags, now=300.0)
    assert av1_reader.ended == 1 and stream.video_codec == "H264"


def test_av1_frame_before_its_sequence_header_is_a_tag_error(av1_tags: list[FileTag]) -> None:
    stream = new_stream()
    coded = [t for t in av1_tags if t.kind == 9 and t.body[0] & 0x0F == 1]
    stream.on_video_tag(0, coded[0].body, 1.0)
    assert stream.stats.errors == 1
    assert not stream.has_video


def test_unusable_av1_sequence_header_rejects_the_publish() -> None:
    stream = new_stream()
    body = flvwrite.video_tag_body(
        "AV1", VideoFrameType.KEY, AvcPacketType.SEQUENCE_HEADER, 0, b"\x81\x00"
    )
    with pytest.raises(PublishRejected) as info:
        stream.on_video_tag(0, body, 1.0)
    assert str(info.value).startswith("stream live/test: unusable AV1 sequence header: ")


def test_h264_rendition_is_made_only_with_transcode_to_h264(av1_tags: list[FileTag]) -> None:
    stream = new_stream(video_config=VideoConfig(transcode_to_h264=True))
    original, converted = Recorder(), Recorder()
    stream.add_reader(original)
    # Without a running loop the transcoder works inline, frame by frame.
    headers = [t for t in av1_tags if len(t.body) > 1 and t.body[0] & 0x0F == 0]
    feed(stream, av1_tags[: av1_tags.index(headers[-1]) + 1])
    rendition = stream.rendition
    assert rendition is not None and rendition.key == stream.key
    rendition.add_reader(converted)
    feed(stream, av1_tags[av1_tags.index(headers[-1]) + 1 :])

    assert rendition.video_codec == "H264" and rendition.has_audio
    assert rendition.profile_level_id is not None
    video = converted.video()
    assert len(video) >= 95 and video[0].keyframe, len(video)
    assert rendition.gop.frames and rendition.gop.frames[0].keyframe
    # Audio is shared: the same Opus packets (the same objects) reach both readers.
    assert converted.audio() and converted.audio()[-1] is original.audio()[-1]
    assert all(f.payloads[0] for f in original.video())
    stream.end("test over")
    assert rendition.ended and converted.ended == 1 and original.ended == 1


def test_av1_payloads_fit_and_strip_size_fields(av1_tags: list[FileTag]) -> None:
    # The stream hands av1.packetize the tag data unchanged: every OBU it sends has
    # obu_has_size_field cleared (AV1 RTP section 4.3).
    stream = new_stream(payload_size=PAYLOAD_SIZE)
    reader = Recorder()
    stream.add_reader(reader)
    feed(stream, av1_tags[:40])
    for frame in reader.video():
        for payload in frame.payloads:
            z = payload[0] & 0x80
            if not z and len(payload) > 2:
                # First element starts with an OBU header (after its length unless W=1).
                w = (payload[0] >> 4) & 0x03
                pos = 1
                if w != 1:
                    _, pos = av1.read_leb128(payload, 1)
                assert payload[pos] & 0x02 == 0, payload[:8].hex()
    assert flv.parse_video_tag(av1_tags[0].body).codec in ("AV1", "AVC")
