"""The FLV writer: tag bodies round-trip through the parser, configuration records match
FFmpeg's byte for byte, and FFmpeg can demux and decode the files we write."""

from __future__ import annotations

from pathlib import Path

import pytest

from srsrelay.hub import hevc
from srsrelay.rtmp import flv, flvwrite
from srsrelay.rtmp.flv import AacPacketType, AvcPacketType, FlvError, VideoFrameType
from srsrelay.rtmp.flvwrite import FlvFile
from tests.test_flv import TAG_VIDEO, make_enhanced_flv, read_flv_tags

HEVC_OPTIONS = {"x265-params": "log-level=error:keyint=10"}
AV1_OPTIONS = {"preset": "12", "svtav1-params": "keyint=10"}


def first_record(path: Path) -> bytes:
    tags = [flv.parse_video_tag(t.body) for t in read_flv_tags(path) if t.kind == TAG_VIDEO]
    assert tags[0].packet_type is AvcPacketType.SEQUENCE_HEADER
    return tags[0].data


TAG_CASES = [
    (VideoFrameType.KEY, AvcPacketType.SEQUENCE_HEADER, 0),
    (VideoFrameType.KEY, AvcPacketType.NALU, 0),
    (VideoFrameType.INTER, AvcPacketType.NALU, 80),
    (VideoFrameType.DISPOSABLE_INTER, AvcPacketType.NALU, -40),
    (VideoFrameType.INTER, AvcPacketType.NALU, flvwrite.SI24_MAX),
    (VideoFrameType.INTER, AvcPacketType.NALU, flvwrite.SI24_MIN),
    (VideoFrameType.KEY, AvcPacketType.END_OF_SEQUENCE, 0),
]


@pytest.mark.parametrize(
    ("codec", "frame_type", "packet_type", "cts"),
    [
        (codec, *case)
        for codec in ("AVC", "HEVC", "AV1")
        for case in TAG_CASES
        if codec != "AV1" or case[2] == 0  # AV1 tags have no composition time
    ],
)
def test_video_tag_round_trip(
    codec: str, frame_type: VideoFrameType, packet_type: AvcPacketType, cts: int
) -> None:
    data = b"\x00\x00\x00\x03\x26\x01\xaf"
    body = flvwrite.video_tag_body(codec, frame_type, packet_type, cts, data)
    tag = flv.parse_video_tag(body)
    assert tag == flv.VideoTag(frame_type, packet_type, cts, data, codec)
    assert bool(body[0] & 0x80) == (codec != "AVC")


def test_video_tag_header_bytes() -> None:
    key, inter = VideoFrameType.KEY, VideoFrameType.INTER
    nalu, header = AvcPacketType.NALU, AvcPacketType.SEQUENCE_HEADER
    assert flvwrite.video_tag_body("AVC", key, nalu, 0, b"N") == b"\x17\x01\x00\x00\x00N"
    assert flvwrite.video_tag_body("AVC", inter, nalu, -1, b"N") == b"\x27\x01\xff\xff\xffN"
    assert flvwrite.video_tag_body("HEVC", key, header, 0, b"R") == b"\x90hvc1R"
    # CodedFramesX (3) when the composition time is 0, CodedFrames (1) with an SI24 otherwise.
    assert flvwrite.video_tag_body("HEVC", inter, nalu, 0, b"N") == b"\xa3hvc1N"
    assert flvwrite.video_tag_body("HEVC", inter, nalu, 40, b"N") == b"\xa1hvc1\x00\x00\x28N"
    assert flvwrite.video_tag_body("AV1", key, nalu, 0, b"O") == b"\x91av01O"
    assert flvwrite.video_tag_body("AV1", key, AvcPacketType.END_OF_SEQUENCE, 0, b"") == (
        b"\x92av01"
    )


@pytest.mark.parametrize(
    ("codec", "cts", "message"),
    [
        ("AV1", 40, "AV1 tags have no composition time, got 40 ms"),
        ("VP9", 0, "video codec 'VP9' has no FLV mapping (use AVC, HEVC or AV1)"),
        ("HEVC", 1 << 23, "composition time 8388608 ms does not fit in a signed 24-bit field"),
        (
            "AVC",
            -(1 << 23) - 1,
            "composition time -8388609 ms does not fit in a signed 24-bit field",
        ),
    ],
)  # fmt: skip
def test_video_tag_errors(codec: str, cts: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        flvwrite.video_tag_body(codec, VideoFrameType.KEY, AvcPacketType.NALU, cts, b"")
    assert str(info.value) == message


def test_aac_tag_round_trip() -> None:
    for packet_type, data in (
        (AacPacketType.SEQUENCE_HEADER, b"\x12\x10"),
        (AacPacketType.RAW, b"\x21\x10\x04"),
    ):
        body = flvwrite.aac_tag_body(packet_type, data)
        assert body[0] == 0xAF
        assert flv.parse_audio_tag(body) == flv.AudioTag(
            sound_format=flv.SOUND_FORMAT_AAC,
            sound_rate=44100,
            sound_size=16,
            channels=2,
            packet_type=packet_type,
            data=data,
        )  # fmt: skip


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv420p10le", "yuv444p", "gray"])
def test_hevc_record_matches_ffmpeg(tmp_path: Path, pix_fmt: str) -> None:
    path = make_enhanced_flv(
        tmp_path / "hevc.flv", "libx265", HEVC_OPTIONS, frames=3, pix_fmt=pix_fmt
    )
    theirs = first_record(path)
    config = hevc.parse_hevc_config(theirs)
    ours = flvwrite.hevc_config_record(config.vps[0], config.sps[0], config.pps[0])
    # Profile/tier/level, chroma format, bit depths, layers and length size agree with
    # FFmpeg's record (it adds an SEI array, so numOfArrays and what follows differ).
    assert ours[:22] == theirs[:22]
    parsed = hevc.parse_hevc_config(ours)
    assert parsed == config
    two = hevc.parse_hevc_config(
        flvwrite.hevc_config_record(config.vps[0], config.sps[0], config.pps[0], nalu_length_size=2)
    )
    assert two.nalu_length_size == 2


def test_hevc_record_errors() -> None:
    vps, sps, pps = b"\x40\x01\x0c", b"\x42\x01\x01", b"\x44\x01\xc1"
    with pytest.raises(ValueError) as info:
        flvwrite.hevc_config_record(sps, sps, pps)
    assert str(info.value) == "VPS argument is not an HEVC VPS NAL unit (type 32)"
    with pytest.raises(ValueError) as info:
        flvwrite.hevc_config_record(vps, sps, b"\x44")
    assert str(info.value) == "PPS argument is not an HEVC PPS NAL unit (type 34)"
    with pytest.raises(ValueError) as info:
        flvwrite.hevc_config_record(vps, sps, pps, nalu_length_size=3)
    assert str(info.value) == "NALU length size must be 1, 2 or 4, not 3"
    with pytest.raises(ValueError) as info:
        flvwrite.hevc_config_record(vps, sps, pps)
    assert str(info.value) == "HEVC SPS truncated: need 16 bits, got 8"


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv420p10le"])
def test_av1_record_matches_ffmpeg(tmp_path: Path, pix_fmt: str) -> None:
    path = make_enhanced_flv(
        tmp_path / "av1.flv", "libsvtav1", AV1_OPTIONS, frames=3, pix_fmt=pix_fmt
    )
    theirs = first_record(path)
    seq_header = theirs[4:]
    assert (seq_header[0] >> 3) & 0x0F == 1 and seq_header[0] & 0x02
    assert flvwrite.av1_config_record(seq_header) == theirs
    # Without obu_has_size_field the payload runs to the end; the record gets one.
    size, start = seq_header[1], 2
    assert size < 0x80
    bare = bytes((seq_header[0] & ~0x02,)) + seq_header[start : start + size]
    assert flvwrite.av1_config_record(bare) == theirs


class BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def put(self, width: int, value: int) -> BitWriter:
        self.bits += [(value >> (width - 1 - i)) & 1 for i in range(width)]
        return self

    def obu(self) -> bytes:
        padded = self.bits + [1] + [0] * (-(len(self.bits) + 1) % 8)  # trailing_bits()
        payload = bytes(
            int("".join(map(str, padded[i : i + 8])), 2) for i in range(0, len(padded), 8)
        )
        return bytes((0x0A,)) + flvwrite.leb128(len(payload)) + payload


def test_av1_record_reduced_still_picture() -> None:
    w = BitWriter().put(3, 0).put(1, 1).put(1, 1).put(5, 9)  # profile 0, still, reduced, level 9
    w.put(4, 8).put(4, 7).put(9, 319).put(8, 239)  # frame size bits and maxima
    w.put(3, 0b010)  # 64x64 superblocks, filter intra, intra edge filter
    w.put(3, 0)  # superres, cdef, restoration
    w.put(1, 0).put(1, 0).put(1, 0)  # 8-bit, not monochrome, no colour description
    w.put(1, 0).put(2, 1)  # color_range, chroma_sample_position
    w.put(1, 0)  # separate_uv_delta_q
    record = flvwrite.av1_config_record(w.obu())
    # Reduced headers have no tier bit: seq_tier_0 is 0 even for level 9.
    assert record[:4] == bytes((0x81, 9, 0b0000_1101, 0))
    assert record[4:] == w.obu()


def test_av1_record_operating_points_and_profile_2() -> None:
    w = BitWriter().put(3, 2).put(1, 0).put(1, 0)  # profile 2, not still, not reduced
    w.put(1, 1).put(32, 1).put(32, 25).put(1, 1).put(5, 0b00100)  # timing, uvlc() = 3
    w.put(1, 1).put(5, 9).put(32, 1).put(5, 31).put(5, 31)  # decoder model, 10-bit delays
    w.put(1, 1)  # initial_display_delay_present_flag
    w.put(5, 1)  # two operating points
    w.put(12, 0x101).put(5, 12).put(1, 1)  # level 12 (> 7): tier bit, High tier
    w.put(1, 1).put(10, 5).put(10, 6).put(1, 0)  # operating_parameters_info
    w.put(1, 1).put(4, 3)  # initial_display_delay_minus_1
    w.put(12, 0x103).put(5, 4)  # level 4: no tier bit
    w.put(1, 0).put(1, 0)  # no decoder model, no initial display delay
    w.put(4, 10).put(4, 10).put(11, 1919).put(11, 1079)
    w.put(1, 1).put(4, 2).put(3, 1)  # frame id numbers
    w.put(3, 0b111).put(4, 0b1111).put(1, 1).put(2, 0b11)  # tools, order hint + jnt/mvs
    w.put(1, 0).put(1, 1)  # screen content: forced on
    w.put(1, 0).put(1, 1)  # integer mv: forced
    w.put(3, 6)  # order_hint_bits_minus_1
    w.put(3, 0b011)
    w.put(1, 1).put(1, 1)  # high_bitdepth, twelve_bit
    w.put(1, 0)  # monochrome
    w.put(1, 1).put(8, 9).put(8, 16).put(8, 9)  # BT.2020, PQ, BT.2020 NCL
    w.put(1, 1).put(1, 1).put(1, 1).put(2, 2)  # range, 4:2:0 at 12 bits, colocated
    w.put(1, 0)
    record = flvwrite.av1_config_record(w.obu())
    assert record[:4] == bytes((0x81, (2 << 5) | 12, 0b1110_1110, 0))


def test_av1_record_srgb_and_monochrome() -> None:
    def header(mono: int, colour: tuple[int, int, int] | None) -> bytes:
        w = BitWriter().put(3, 0).put(1, 0).put(1, 0).put(1, 0).put(1, 0)
        w.put(5, 0).put(12, 0).put(5, 8).put(1, 0)  # one point, level 8, Main tier
        w.put(4, 8).put(4, 7).put(9, 319).put(8, 239).put(1, 0)
        # No order hint; screen content tools not chosen and forced off (no integer-mv bits).
        w.put(3, 0).put(4, 0).put(1, 0).put(1, 0).put(1, 0)
        w.put(3, 0).put(1, 0).put(1, mono)
        if colour is None:
            w.put(1, 0)
        else:
            w.put(1, 1).put(8, colour[0]).put(8, colour[1]).put(8, colour[2])
        return w.put(1, 1).put(2, 3).put(1, 0).obu()

    # sRGB: 4:4:4 with no colour range bit; monochrome: subsampled, position unknown.
    assert flvwrite.av1_config_record(header(0, (1, 13, 0)))[1:3] == bytes((8, 0))
    assert flvwrite.av1_config_record(header(1, None))[1:3] == bytes((8, 0b0001_1100))
    assert flvwrite.av1_config_record(header(0, (1, 1, 1)))[1:3] == bytes((8, 0b0000_1111))


@pytest.mark.parametrize(
    ("obu", "message"),
    [
        (b"", "AV1 sequence header OBU is empty"),
        (b"\x32\x00", "OBU type 6 is not a sequence header (type 1)"),
        (b"\x0e", "AV1 sequence header OBU truncated: extension header missing"),
        (b"\x0a\x80", "AV1 sequence header OBU truncated: size field incomplete"),
        (b"\x0a\x05\x00\x00", "AV1 sequence header OBU truncated: payload of 5 bytes, got 2"),
        (b"\x0a\x01\x00", "AV1 sequence header OBU truncated: need 12 bits, got 8"),
    ],
)
def test_av1_record_errors(obu: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        flvwrite.av1_config_record(obu)
    assert str(info.value) == message


def test_leb128() -> None:
    assert flvwrite.leb128(0) == b"\x00"
    assert flvwrite.leb128(127) == b"\x7f"
    assert flvwrite.leb128(128) == b"\x80\x01"
    assert flvwrite.leb128(300) == b"\xac\x02"


def test_file_round_trip(tmp_path: Path) -> None:
    tags = [
        (flvwrite.TAG_SCRIPT, 0, b"\x02\x00\x0aonMetaData\x05"),
        (flvwrite.TAG_VIDEO, 0, b"\x17\x00\x00\x00\x00"),
        (flvwrite.TAG_AUDIO, 23, b"\xaf\x01" + bytes(300)),
        (flvwrite.TAG_VIDEO, 0x01234567, b"\x27\x01\x00\x00\x00"),  # TimestampExtended
        (flvwrite.TAG_AUDIO, 0xFFFFFFFF, b""),
    ]
    data = FlvFile.header(has_audio=True, has_video=True) + b"".join(FlvFile.tag(*t) for t in tags)
    assert data[:13] == b"FLV\x01\x05\x00\x00\x00\x09\x00\x00\x00\x00"
    assert FlvFile.header(has_audio=False, has_video=True)[4] == 0x01
    assert flvwrite.read_flv(data) == tags
    # An independent reader (the one the FLV tests use) agrees.
    path = tmp_path / "x.flv"
    path.write_bytes(data)
    assert [(t.kind, t.timestamp_ms, t.body) for t in read_flv_tags(path)] == tags


@pytest.mark.parametrize(
    ("kind", "timestamp", "size", "message"),
    [
        (7, 0, 0, "FLV tag type 7 is not audio (8), video (9) or script (18)"),
        (9, -1, 0, "FLV tag timestamp -1 ms is outside 0..2^32-1"),
        (9, 1 << 32, 0, "FLV tag timestamp 4294967296 ms is outside 0..2^32-1"),
        (9, 0, 1 << 24, "FLV tag body of 16777216 bytes exceeds 16777215"),
    ],
)
def test_tag_errors(kind: int, timestamp: int, size: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        FlvFile.tag(kind, timestamp, bytes(size))
    assert str(info.value) == message


GOOD_FILE = FlvFile.header(True, True) + FlvFile.tag(9, 40, b"\x17\x01\x00\x00\x00")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"FLV\x01", "not an FLV file: missing the 'FLV' signature"),
        (b"RIFF" + GOOD_FILE[4:], "not an FLV file: missing the 'FLV' signature"),
        (
            GOOD_FILE[:5] + b"\x00\x00\x00\x05" + GOOD_FILE[9:],
            "FLV header size 5 is smaller than 9",
        ),
        (GOOD_FILE[:20], "FLV tag header at offset 13 truncated"),
        (GOOD_FILE[:-1], "FLV tag at offset 13 truncated: 5-byte body"),
        (GOOD_FILE[:-1] + b"\x11", "FLV tag at offset 13: PreviousTagSize 17, expected 16"),
    ],
)  # fmt: skip
def test_read_flv_errors(data: bytes, message: str) -> None:
    with pytest.raises(FlvError) as info:
        flvwrite.read_flv(data)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("encoder", "options", "codec"),
    [("libx265", HEVC_OPTIONS, "HEVC"), ("libsvtav1", AV1_OPTIONS, "AV1")],
)
def test_ffmpeg_decodes_what_we_write(
    tmp_path: Path, encoder: str, options: dict[str, str], codec: str
) -> None:
    """Re-write FFmpeg's tags with our writer (our own config record, our headers) and
    let FFmpeg demux and decode every frame of the result."""
    av = pytest.importorskip("av")
    source = make_enhanced_flv(tmp_path / "in.flv", encoder, options, frames=20)
    out = bytearray(FlvFile.header(has_audio=False, has_video=True))
    for kind, timestamp, body in flvwrite.read_flv(source.read_bytes()):
        if kind != flvwrite.TAG_VIDEO:
            continue
        tag = flv.parse_video_tag(body)
        if tag.packet_type is None:
            continue
        data = tag.data
        if tag.packet_type is AvcPacketType.SEQUENCE_HEADER:
            if codec == "HEVC":
                config = hevc.parse_hevc_config(data)
                data = flvwrite.hevc_config_record(config.vps[0], config.sps[0], config.pps[0])
            else:
                data = flvwrite.av1_config_record(data[4:])
        body = flvwrite.video_tag_body(
            codec, tag.frame_type, tag.packet_type, tag.composition_time, data
        )
        out += FlvFile.tag(kind, timestamp, body)
    path = tmp_path / "out.flv"
    path.write_bytes(bytes(out))
    with av.open(str(path)) as container:
        frames = list(container.decode(container.streams.video[0]))
    assert len(frames) == 20
    assert (frames[0].width, frames[0].height) == (320, 240)


FIXTURE = Path(__file__).parent / "fixtures" / "hevc_aac.flv"


def test_hevc_aac_fixture() -> None:
    """The recording made by tests/fixtures/make_enhanced.py, replayed over RTMP elsewhere."""
    av = pytest.importorskip("av")
    tags = flvwrite.read_flv(FIXTURE.read_bytes())
    assert [t[1] for t in tags] == sorted(t[1] for t in tags)  # timestamp order
    assert tags[0][0] == flvwrite.TAG_SCRIPT
    video = [flv.parse_video_tag(b) for k, _, b in tags if k == flvwrite.TAG_VIDEO]
    audio = [flv.parse_audio_tag(b) for k, _, b in tags if k == flvwrite.TAG_AUDIO]
    assert video[0].packet_type is AvcPacketType.SEQUENCE_HEADER
    config = hevc.parse_hevc_config(video[0].data)
    assert hevc.fmtp(config).startswith("profile-space=0;tier-flag=0;profile-id=1;")
    frames = video[1:]
    assert len(frames) == 100 and all(f.codec == "HEVC" for f in frames)
    keys = [i for i, f in enumerate(frames) if f.frame_type is VideoFrameType.KEY]
    assert keys == [0, 25, 50, 75]
    for index, frame in enumerate(frames):
        nals = flv.split_nalus(frame.data, config.nalu_length_size)
        assert hevc.is_irap(nals) == (index in keys)
        # Parameter sets live in the sequence header only: the relay must add them.
        assert not {hevc.nal_type(n) for n in nals} & {32, 33, 34, 35}
    assert audio[0].packet_type is AacPacketType.SEQUENCE_HEADER
    assert flv.parse_audio_specific_config(audio[0].data) == flv.AacConfig(2, 48000, 2)
    with av.open(str(FIXTURE)) as container:
        decoded = list(container.decode(container.streams.video[0]))
    assert len(decoded) == 100
