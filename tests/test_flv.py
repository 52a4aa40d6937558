"""FLV tag bodies: real tags written by ffmpeg, and hand-made malformed ones."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from srsrelay.rtmp import flv
from srsrelay.rtmp.flv import (
    AacPacketType,
    AvcPacketType,
    FlvError,
    UnsupportedCodec,
    VideoFrameType,
)

TAG_AUDIO = 8
TAG_VIDEO = 9
TAG_SCRIPT = 18


@dataclass(frozen=True)
class FileTag:
    kind: int
    timestamp_ms: int
    body: bytes


def make_flv(
    path: Path,
    *,
    seconds: float = 2.0,
    fps: int = 25,
    gop: int = 25,
    audio_rate: int = 44100,
    channels: int = 2,
    size: str = "320x240",
) -> Path:
    """Write an H.264 + AAC .flv with ffmpeg (test pattern and a sine tone)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    cmd = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={audio_rate}",
        "-t", str(seconds),
        "-c:v", "libx264", "-preset", "veryfast", "-g", str(gop), "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-ac", str(channels), "-ar", str(audio_rate),
        str(path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=60)
    return path


def read_flv_tags(path: Path) -> list[FileTag]:
    """Tags of an FLV file: 9-byte header, then (11-byte tag header, body, 4-byte size)."""
    data = path.read_bytes()
    assert data[:3] == b"FLV"
    pos = int.from_bytes(data[5:9], "big") + 4
    tags = []
    while pos + 11 <= len(data):
        kind = data[pos]
        size = int.from_bytes(data[pos + 1 : pos + 4], "big")
        timestamp = int.from_bytes(data[pos + 4 : pos + 7], "big") | (data[pos + 7] << 24)
        tags.append(FileTag(kind, timestamp, data[pos + 11 : pos + 11 + size]))
        pos += 11 + size + 4
    return tags


def make_enhanced_flv(
    path: Path,
    codec: str,
    options: dict[str, str],
    *,
    frames: int = 30,
    rate: int = 25,
    pix_fmt: str = "yuv420p",
) -> Path:
    """Encode a moving test pattern with PyAV into an .flv. PyAV's own FFmpeg (7.1+)
    writes enhanced RTMP tags ('hvc1', 'av01') for HEVC and AV1, so these are tags made
    by an independent writer."""
    av = pytest.importorskip("av")
    numpy = pytest.importorskip("numpy")
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"PyAV has no {codec} encoder")
    with av.open(str(path), "w", format="flv") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 320, 240, pix_fmt
        stream.options = options
        noise = numpy.random.default_rng(7).integers(0, 256, (80, 160, 3), numpy.uint8)
        for index in range(frames):
            image = numpy.zeros((240, 320, 3), numpy.uint8)
            image[:, (index * 10) % 300 : (index * 10) % 300 + 20] = 255
            image[..., 1] = index * 8
            # A moving noise patch: some coded slices exceed an RTP packet.
            image[80:160, index : index + 160] = noise
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
            frame.pts = index
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def tags(tmp_path_factory: pytest.TempPathFactory) -> list[FileTag]:
    return read_flv_tags(make_flv(tmp_path_factory.mktemp("flv") / "av.flv"))


def test_real_video_tags(tags: list[FileTag]) -> None:
    video = [flv.parse_video_tag(t.body) for t in tags if t.kind == TAG_VIDEO]
    assert video[0].packet_type is AvcPacketType.SEQUENCE_HEADER
    assert video[0].frame_type is VideoFrameType.KEY
    config = flv.parse_avc_config(video[0].data)
    assert config.version == 1
    assert config.profile == 100  # libx264 yuv420p: High
    assert config.nalu_length_size == 4
    assert [s[0] & 0x1F for s in config.sps] == [7]
    assert [p[0] & 0x1F for p in config.pps] == [8]
    assert config.sps[0][1] == config.profile and config.sps[0][3] == config.level

    nalu_tags = [v for v in video if v.packet_type is AvcPacketType.NALU]
    assert len(nalu_tags) == 50
    keys = [v for v in nalu_tags if v.frame_type is VideoFrameType.KEY]
    assert len(keys) == 2
    for tag in nalu_tags:
        types = {n[0] & 0x1F for n in flv.split_nalus(tag.data, config.nalu_length_size)}
        assert (5 in types) == (tag.frame_type is VideoFrameType.KEY)
        assert types <= {1, 5, 6, 7, 8, 9}
    # veryfast uses B-frames: composition offsets are non-zero for some frames.
    assert any(v.composition_time > 0 for v in nalu_tags)


def test_real_audio_tags(tags: list[FileTag]) -> None:
    audio = [flv.parse_audio_tag(t.body) for t in tags if t.kind == TAG_AUDIO]
    assert audio[0].packet_type is AacPacketType.SEQUENCE_HEADER
    assert all(a.packet_type is AacPacketType.RAW for a in audio[1:])
    assert audio[0].sound_rate == 44100 and audio[0].channels == 2 and audio[0].sound_size == 16
    config = flv.parse_audio_specific_config(audio[0].data)
    assert config == flv.AacConfig(object_type=2, sample_rate=44100, channel_config=2)


def test_composition_time_is_signed() -> None:
    tag = flv.parse_video_tag(b"\x27\x01\xff\xff\xfe" + b"\x00\x00\x00\x01\x41")
    assert tag.frame_type is VideoFrameType.INTER
    assert tag.composition_time == -2
    assert tag.data == b"\x00\x00\x00\x01\x41"
    assert flv.parse_video_tag(b"\x17\x01\x00\x01\x00").composition_time == 256


def test_info_frame_and_end_of_sequence() -> None:
    info = flv.parse_video_tag(b"\x57\x00")
    assert info.frame_type is VideoFrameType.INFO and info.packet_type is None
    eos = flv.parse_video_tag(b"\x17\x02\x00\x00\x00")
    assert eos.packet_type is AvcPacketType.END_OF_SEQUENCE and eos.data == b""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "video tag is empty"),
        (b"\x17\x01\x00", "AVC video tag truncated: need 5 bytes, got 3"),
        (b"\x07\x01\x00\x00\x00", "video tag has unknown frame type 0"),
        (b"\x17\x03\x00\x00\x00", "AVC video tag has unknown packet type 3"),
    ],
)
def test_video_tag_errors(body: bytes, message: str) -> None:
    with pytest.raises(FlvError) as info:
        flv.parse_video_tag(body)
    assert str(info.value) == message
    assert not isinstance(info.value, UnsupportedCodec)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x22\x00", "video codec Sorenson H.263 is not supported"),
        (b"\x90vp09\x00", "video codec VP9 (enhanced RTMP 'vp09') is not supported"),
        (b"\x90vp08", "video codec VP8 (enhanced RTMP 'vp08') is not supported"),
        (b"\x91abcd\x00\x00\x00", "video codec enhanced RTMP 'abcd' is not supported"),
        (b"\x96\x00\x00", "video codec enhanced RTMP multitrack video is not supported"),
    ],
)
def test_unsupported_video_codecs(body: bytes, message: str) -> None:
    with pytest.raises(UnsupportedCodec) as info:
        flv.parse_video_tag(body)
    assert str(info.value) == message
    assert info.value.kind == "video"


def _video_tags(path: Path) -> list[flv.VideoTag]:
    return [flv.parse_video_tag(t.body) for t in read_flv_tags(path) if t.kind == TAG_VIDEO]


def test_real_enhanced_hevc_tags(tmp_path: Path) -> None:
    # x265 defaults use B-frames, so both CodedFrames (cts != 0) and CodedFramesX appear.
    path = make_enhanced_flv(
        tmp_path / "hevc.flv", "libx265", {"x265-params": "log-level=error:keyint=10"}
    )
    raw = [t.body for t in read_flv_tags(path) if t.kind == TAG_VIDEO]
    video = _video_tags(path)
    assert {v.codec for v in video} == {flv.CODEC_HEVC}
    assert raw[0][:5] == b"\x90hvc1"
    assert video[0].packet_type is AvcPacketType.SEQUENCE_HEADER
    assert video[0].frame_type is VideoFrameType.KEY
    assert video[0].data[0] == 1  # configurationVersion of the HEVCDecoderConfigurationRecord
    length_size = (video[0].data[21] & 0x03) + 1
    # FFmpeg sends the colour info as an enhanced Metadata frame (AMF "colorInfo").
    metadata = [v for v in video if v.frame_type is VideoFrameType.INFO]
    assert metadata and all(v.packet_type is None for v in metadata)
    assert b"colorInfo" in metadata[0].data
    frames = [v for v in video if v.packet_type is AvcPacketType.NALU]
    assert len(frames) == 30
    assert any(b[0] & 0x0F == 1 for b in raw) and any(b[0] & 0x0F == 3 for b in raw)
    assert any(v.composition_time > 0 for v in frames)
    for tag in frames:
        types = {(n[0] >> 1) & 0x3F for n in flv.split_nalus(tag.data, length_size)}
        assert bool(types & set(range(16, 24))) == (tag.frame_type is VideoFrameType.KEY)
    assert sum(v.frame_type is VideoFrameType.KEY for v in frames) >= 3  # keyint=10


def test_real_enhanced_av1_tags(tmp_path: Path) -> None:
    path = make_enhanced_flv(
        tmp_path / "av1.flv", "libsvtav1", {"preset": "12", "svtav1-params": "keyint=10"}
    )
    raw = [t.body for t in read_flv_tags(path) if t.kind == TAG_VIDEO]
    video = _video_tags(path)
    assert {v.codec for v in video} == {flv.CODEC_AV1}
    assert raw[0][:5] == b"\x90av01"
    assert video[0].packet_type is AvcPacketType.SEQUENCE_HEADER
    assert video[0].data[0] == 0x81  # av1C marker and version
    frames = [v for v in video if v.packet_type is AvcPacketType.NALU]
    assert len(frames) == 30
    assert all(v.composition_time == 0 for v in frames)
    for tag, body in zip(frames, [b for b in raw if b[0] & 0x0F in (1, 3)], strict=True):
        # No composition time field: the temporal unit starts right after the FourCC.
        assert tag.data == body[5:]
        assert (tag.data[0] >> 3) & 0x0F in (1, 2, 6)  # sequence header, TD or frame OBU
    assert frames[0].frame_type is VideoFrameType.KEY


def test_legacy_hevc_codec_id_12() -> None:
    tag = flv.parse_video_tag(b"\x1c\x01\xff\xff\xd8" + b"\x00\x00\x00\x02\x26\x01")
    assert tag == flv.VideoTag(
        VideoFrameType.KEY, AvcPacketType.NALU, -40, b"\x00\x00\x00\x02\x26\x01", "HEVC"
    )
    header = flv.parse_video_tag(b"\x1c\x00\x00\x00\x00\x01\x02")
    assert header.packet_type is AvcPacketType.SEQUENCE_HEADER and header.codec == "HEVC"
    assert flv.parse_video_tag(b"\x17\x01\x00\x00\x00").codec == "AVC"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # hvc1 CodedFrames: SI24 composition time after the FourCC.
        (
            b"\x91hvc1\xff\xff\xd8NAL",
            flv.VideoTag(VideoFrameType.KEY, AvcPacketType.NALU, -40, b"NAL", "HEVC"),
        ),
        # CodedFramesX: no composition time field, it is 0.
        (
            b"\xa3hvc1NAL",
            flv.VideoTag(VideoFrameType.INTER, AvcPacketType.NALU, 0, b"NAL", "HEVC"),
        ),
        (
            b"\x90hvc1REC",
            flv.VideoTag(VideoFrameType.KEY, AvcPacketType.SEQUENCE_HEADER, 0, b"REC", "HEVC"),
        ),
        (
            b"\x92hvc1",
            flv.VideoTag(VideoFrameType.KEY, AvcPacketType.END_OF_SEQUENCE, 0, b"", "HEVC"),
        ),
        # av01 CodedFrames carry no composition time.
        (
            b"\xa1av01\x12\x00\x32",
            flv.VideoTag(VideoFrameType.INTER, AvcPacketType.NALU, 0, b"\x12\x00\x32", "AV1"),
        ),
        # Enhanced AVC: same payload as legacy AVC, with the SI24 composition time.
        (
            b"\x91avc1\x00\x00\x50NAL",
            flv.VideoTag(VideoFrameType.KEY, AvcPacketType.NALU, 80, b"NAL", "AVC"),
        ),
        # Metadata: AMF, no picture; the frame type bits are ignored.
        (b"\x84hvc1AMF", flv.VideoTag(VideoFrameType.INFO, None, 0, b"AMF", "HEVC")),
        # Command frame: one command byte and no FourCC.
        (b"\xd1\x01", flv.VideoTag(VideoFrameType.INFO, None, 0, b"\x01", "AVC")),
        # ModEx (timestamp offset in ns, 3 bytes), then CodedFrames.
        (
            b"\x97\x02\x00\x01\x02\x01av01OBU",
            flv.VideoTag(VideoFrameType.KEY, AvcPacketType.NALU, 0, b"OBU", "AV1"),
        ),
        # ModEx with the 16-bit size escape (255 + 1 = 256 -> UI16 + 1 follows).
        (
            b"\x97\xff\x00\x01\xab\xcd\x03hvc1NAL",
            flv.VideoTag(VideoFrameType.KEY, AvcPacketType.NALU, 0, b"NAL", "HEVC"),
        ),
    ],
)
def test_enhanced_video_header(body: bytes, expected: flv.VideoTag) -> None:
    assert flv.parse_video_tag(body) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x91hvc", "enhanced RTMP video tag truncated: need 5 bytes for the FourCC, got 4"),
        (
            b"\x91hvc1\x00\x00",
            "enhanced RTMP 'hvc1' video tag truncated: need 8 bytes for the composition time, "
            "got 7",
        ),
        (b"\x98hvc1", "enhanced RTMP video tag has unknown packet type 8"),
        (b"\x81hvc1\x00\x00\x00", "video tag has unknown frame type 0"),
        (
            b"\x95av01\x00",
            "enhanced RTMP 'av01' MPEG2TSSequenceStart (packet type 5) is not supported: the "
            "publisher must send a SequenceStart with the codec configuration record",
        ),
        (b"\x97", "enhanced RTMP video tag truncated: ModEx size missing"),
        (b"\x97\xff\x00", "enhanced RTMP video tag truncated: ModEx 16-bit size missing"),
        (
            b"\x97\x02\x00\x01\x02",
            "enhanced RTMP video tag truncated: ModEx data of 3 bytes needs 6 bytes, got 5",
        ),
        (b"\x1c\x01\x00", "HEVC video tag truncated: need 5 bytes, got 3"),
        (b"\x1c\x04\x00\x00\x00", "HEVC video tag has unknown packet type 4"),
    ],
)
def test_enhanced_video_header_errors(body: bytes, message: str) -> None:
    with pytest.raises(FlvError) as info:
        flv.parse_video_tag(body)
    assert str(info.value) == message
    assert not isinstance(info.value, UnsupportedCodec)


def _record(sps: list[bytes], pps: list[bytes], length_size: int = 4, tail: bytes = b"") -> bytes:
    out = bytes((1, 0x64, 0x00, 0x1F, 0xFC | (length_size - 1), 0xE0 | len(sps)))
    for s in sps:
        out += len(s).to_bytes(2, "big") + s
    out += bytes((len(pps),))
    for p in pps:
        out += len(p).to_bytes(2, "big") + p
    return out + tail


SPS = b"\x67\x64\x00\x1f\xac\xd9"
PPS = b"\x68\xeb\xe3\xcb"


def test_avc_config_fields_and_high_profile_tail() -> None:
    # High profile records end with chroma format / bit depth / SPS-ext fields.
    config = flv.parse_avc_config(_record([SPS], [PPS], 2, tail=b"\xfd\xf8\xf8\x00"))
    assert config == flv.AvcConfig(
        version=1,
        profile=0x64,
        compatibility=0,
        level=0x1F,
        nalu_length_size=2,
        sps=(SPS,),
        pps=(PPS,),
    )
    two = flv.parse_avc_config(_record([SPS, SPS + b"\x01"], [PPS, PPS], 1))
    assert two.sps == (SPS, SPS + b"\x01") and two.pps == (PPS, PPS)
    assert two.nalu_length_size == 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"\x01\x64\x00", "AVC sequence header truncated: need 7 bytes, got 3"),
        (b"\x00" + _record([SPS], [PPS])[1:], "AVC sequence header has version 0, expected 1"),
        (
            _record([SPS], [PPS], length_size=3),
            "AVC sequence header has NALU length size 3 (must be 1, 2 or 4)",
        ),
        (
            _record([SPS], [PPS])[:9],
            "AVC sequence header truncated: SPS 1 needs 6 bytes at offset 8, got 1",
        ),
        (
            _record([SPS], [PPS])[:7],
            "AVC sequence header truncated: SPS 1 length at offset 6, got 7 bytes",
        ),
        (
            _record([SPS], [PPS])[:14],
            "AVC sequence header truncated: need the PPS count at offset 14, got 14 bytes",
        ),
        (
            _record([SPS], [PPS])[:-1],
            "AVC sequence header truncated: PPS 1 needs 4 bytes at offset 17, got 3",
        ),
        (_record([], [PPS]), "AVC sequence header has no SPS"),
        (_record([SPS], []), "AVC sequence header has no PPS"),
        (_record([b""], [PPS]), "AVC sequence header has an empty SPS 1"),
    ],
)
def test_avc_config_errors(record: bytes, message: str) -> None:
    with pytest.raises(FlvError) as info:
        flv.parse_avc_config(record)
    assert str(info.value) == message


def test_split_nalus_all_length_sizes() -> None:
    nalus = [b"\x65" + bytes(300), b"\x06\x05", b"\x41\x9a"]
    for size in (2, 4):
        data = b"".join(len(n).to_bytes(size, "big") + n for n in nalus)
        assert flv.split_nalus(data, size) == nalus
    small = [n for n in nalus if len(n) < 256]
    assert flv.split_nalus(b"".join(bytes((len(n),)) + n for n in small), 1) == small
    # Zero-length entries are skipped rather than producing empty NALUs.
    assert flv.split_nalus(b"\x00\x00\x00\x00\x00\x00\x00\x01\x41", 4) == [b"\x41"]
    assert flv.split_nalus(b"", 4) == []


def test_split_nalus_errors() -> None:
    with pytest.raises(FlvError) as info:
        flv.split_nalus(b"\x00\x00\x00\x02\x41\x9a\x00\x00\x13\x88\x41", 4)
    assert str(info.value) == "NALU length 5000 at offset 6 runs past the end of the 11-byte packet"
    with pytest.raises(FlvError) as info:
        flv.split_nalus(b"\x00\x01\x41\x00", 2)
    assert str(info.value) == "NALU length at offset 3 truncated: need 2 bytes, got 1"
    with pytest.raises(ValueError, match="NALU length size must be 1, 2 or 4, not 3"):
        flv.split_nalus(b"", 3)


def test_audio_tag_header_bits() -> None:
    tag = flv.parse_audio_tag(b"\xaa\x01\x21\x10")  # AAC, 22 kHz, 16-bit, mono
    assert tag == flv.AudioTag(
        sound_format=flv.SOUND_FORMAT_AAC,
        sound_rate=22050,
        sound_size=16,
        channels=1,
        packet_type=AacPacketType.RAW,
        data=b"\x21\x10",
    )


def test_mp3_tag_has_no_packet_type_byte() -> None:
    tag = flv.parse_audio_tag(b"\x2e\xff\xfb\x90\x00")  # MP3, 44.1 kHz, 16-bit, mono
    assert tag == flv.AudioTag(
        sound_format=flv.SOUND_FORMAT_MP3,
        sound_rate=44100,
        sound_size=16,
        channels=1,
        packet_type=AacPacketType.RAW,
        data=b"\xff\xfb\x90\x00",
    )


@pytest.mark.parametrize(
    ("body", "message", "unsupported"),
    [
        (b"", "audio tag is empty", False),
        (b"\xaf", "AAC audio tag truncated: need 2 bytes, got 1", False),
        (b"\xaf\x02", "AAC audio tag has unknown packet type 2", False),
        (b"\xe2\xff\xfb", "audio codec MP3 8 kHz is not supported", True),
        (b"\xd6\x00", "audio codec Opus is not supported", True),
        (b"\x9f\x00", "audio codec enhanced RTMP audio is not supported", True),
    ],
)
def test_audio_tag_errors(body: bytes, message: str, unsupported: bool) -> None:
    with pytest.raises(FlvError) as info:
        flv.parse_audio_tag(body)
    assert str(info.value) == message
    assert isinstance(info.value, UnsupportedCodec) == unsupported


def _bits(*fields: tuple[int, int]) -> bytes:
    value = 0
    total = 0
    for width, field_value in fields:
        value = (value << width) | field_value
        total += width
    pad = -total % 8
    return (value << pad).to_bytes((total + pad) // 8, "big")


def test_audio_specific_config() -> None:
    parse = flv.parse_audio_specific_config
    assert parse(bytes.fromhex("1210")) == flv.AacConfig(2, 44100, 2)
    assert parse(bytes.fromhex("1388")) == flv.AacConfig(2, 22050, 1)
    # SBR signalling in ffmpeg's own ASC for 44.1 kHz mono (trailing bits ignored).
    assert parse(bytes.fromhex("120856e500")) == flv.AacConfig(2, 44100, 1)
    # Escaped object type (31 + 6 bits) and an explicit 24-bit frequency.
    escaped = _bits((5, 31), (6, 10), (4, 15), (24, 37800), (4, 2))
    assert parse(escaped) == flv.AacConfig(42, 37800, 2)


@pytest.mark.parametrize(
    ("asc", "message"),
    [
        (b"", "AudioSpecificConfig truncated: need 1 bytes, got 0"),
        (b"\x12", "AudioSpecificConfig truncated: need 2 bytes, got 1"),
        (_bits((5, 2), (4, 15), (7, 0)), "AudioSpecificConfig truncated: need 5 bytes, got 2"),
        (
            _bits((5, 2), (4, 13), (4, 2)),
            "AudioSpecificConfig sampling frequency index 13 is reserved",
        ),
        (_bits((5, 0), (4, 4), (4, 2)), "AudioSpecificConfig has audio object type 0 (null)"),
    ],
)  # fmt: skip
def test_audio_specific_config_errors(asc: bytes, message: str) -> None:
    with pytest.raises(FlvError) as info:
        flv.parse_audio_specific_config(asc)
    assert str(info.value) == message
