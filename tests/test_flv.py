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
        (b"\x1c\x00\x00\x00\x00", "video codec HEVC is not supported"),
        (b"\x90hvc1\x00", "video codec enhanced RTMP 'hvc1' is not supported"),
    ],
)
def test_unsupported_video_codecs(body: bytes, message: str) -> None:
    with pytest.raises(UnsupportedCodec) as info:
        flv.parse_video_tag(body)
    assert str(info.value) == message
    assert info.value.kind == "video"


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
