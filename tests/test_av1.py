"""AV1: OBU parsing, av1C records and RTP packetization checked by an independent
depacketizer and a real decoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from srsrelay.hub import av1
from srsrelay.rtmp import flvwrite
from srsrelay.rtmp.flv import FlvError

WIDTH = 320
HEIGHT = 240
FRAMES = 12
KEYINT = 6


def header(kind: int, *, extension: bool = False, has_size: bool = True) -> int:
    return (kind << 3) | (0x04 if extension else 0) | (0x02 if has_size else 0)


def obu(kind: int, payload: bytes, *, extension: bool = False, has_size: bool = True) -> bytes:
    """An OBU in low-overhead format; the extension byte says temporal_id 1, spatial_id 0."""
    out = bytes((header(kind, extension=extension, has_size=has_size),))
    if extension:
        out += bytes((0x20,))
    if has_size:
        out += leb128(len(payload))
    return out + payload


def leb128(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def filler(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(size))


@dataclass
class Unpacked:
    obus: list[bytes]
    """OBUs rebuilt with obu_has_size_field set."""
    n_bit: bool
    """N of the first packet."""


def read_leb(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def with_size_field(element: bytes) -> bytes:
    """Receiver side: set obu_has_size_field again and insert obu_size."""
    assert not element[0] & 0x80, "forbidden bit"
    assert not element[0] & 0x02, "OBU element still has obu_has_size_field"
    head = 2 if element[0] & 0x04 else 1
    assert len(element) >= head, "OBU element shorter than its header"
    return (
        bytes((element[0] | 0x02,)) + element[1:head] + leb128(len(element) - head) + element[head:]
    )


def depacketize(payloads: Sequence[bytes], payload_size: int) -> Unpacked:
    """Receiver side of the AV1 RTP format v1.0 for one temporal unit, strict about Z/Y/W."""
    obus: list[bytes] = []
    fragment: bytearray | None = None
    for index, payload in enumerate(payloads):
        assert len(payload) <= payload_size
        agg = payload[0]
        z, y, w, n = bool(agg & 0x80), bool(agg & 0x40), (agg >> 4) & 0x03, bool(agg & 0x08)
        assert agg & 0x07 == 0, "reserved bits set"
        assert not n or index == 0, "N set after the first packet"
        assert z == (fragment is not None), "Z does not match the previous Y"
        elements: list[bytes] = []
        pos = 1
        while pos < len(payload):
            if w and len(elements) == w - 1:
                size = len(payload) - pos
            else:
                size, pos = read_leb(payload, pos)
            assert size > 0 and pos + size <= len(payload)
            elements.append(payload[pos : pos + size])
            pos += size
        assert elements, "empty packet"
        assert w == 0 or len(elements) == w
        for i, element in enumerate(elements):
            first, last = i == 0, i == len(elements) - 1
            if first and z:
                assert fragment is not None
                fragment += element
                element = bytes(fragment)
                fragment = None
            if last and y:
                if not (first and z):
                    # Stricter than the format: a first fragment holds the whole OBU header.
                    head = 2 if element[0] & 0x04 else 1
                    assert len(element) > head, "first fragment splits the OBU header"
                fragment = bytearray(element)
                continue
            obus.append(with_size_field(element))
    assert fragment is None, "temporal unit ends inside a fragment"
    return Unpacked(obus, bool(payloads[0][0] & 0x08))


# --- leb128 and OBU splitting -------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, (1 << 32) - 1])
def test_leb128_round_trip(value: int) -> None:
    encoded = av1.write_leb128(value)
    assert encoded == leb128(value)
    assert av1.read_leb128(b"\xaa" + encoded + b"\x00", 1) == (value, 1 + len(encoded))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x80", "AV1 leb128 size truncated at byte 2"),
        (b"\x80" * 8 + b"\x00", "AV1 leb128 size at byte 0 is longer than 8 bytes"),
        (b"\x80\x80\x80\x80\x10", "AV1 leb128 size 4294967296 at byte 0 exceeds 32 bits"),
    ],
)
def test_leb128_errors(data: bytes, message: str) -> None:
    with pytest.raises(FlvError) as info:
        av1.read_leb128(data, 0)
    assert str(info.value) == message


def test_split_obus_keeps_headers_and_sizes() -> None:
    td = obu(av1.OBU_TEMPORAL_DELIMITER, b"")
    seq = obu(av1.OBU_SEQUENCE_HEADER, filler(12))
    frame = obu(av1.OBU_FRAME, filler(200), extension=True)
    obus = av1.split_obus(td + seq + frame)
    assert obus == [td, seq, frame]
    assert [av1.obu_type(o) for o in obus] == [2, 1, 6]


def test_split_obus_last_obu_without_size_field_runs_to_the_end() -> None:
    seq = obu(av1.OBU_SEQUENCE_HEADER, filler(5))
    frame = obu(av1.OBU_FRAME, filler(40), has_size=False)
    assert av1.split_obus(seq + frame) == [seq, frame]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x0a\x00\x92\x00", "AV1 OBU at byte 2 has obu_forbidden_bit set"),
        (b"\x12\x00\x36", "AV1 OBU header at byte 2 truncated"),
        (b"\x32", "AV1 leb128 size truncated at byte 1"),
        (b"\x32\x05abc", "AV1 OBU at byte 0 truncated: obu_size 5, 3 bytes left"),
    ],
)
def test_split_obus_errors(data: bytes, message: str) -> None:
    with pytest.raises(FlvError) as info:
        av1.split_obus(data)
    assert str(info.value) == message


def test_strip_size_field() -> None:
    plain = obu(av1.OBU_FRAME, filler(300), extension=True)
    stripped = av1.strip_size_field(plain)
    first = header(av1.OBU_FRAME, extension=True, has_size=False)
    assert stripped == bytes((first, 0x20)) + filler(300)
    assert av1.strip_size_field(stripped) == stripped


def test_find_sequence_header() -> None:
    seq = obu(av1.OBU_SEQUENCE_HEADER, filler(9))
    frame = obu(av1.OBU_FRAME, filler(20))
    assert av1.find_sequence_header(obu(av1.OBU_TEMPORAL_DELIMITER, b"") + seq + frame) == seq
    assert av1.find_sequence_header(frame) is None


# --- av1C ------------------------------------------------------------------------------------


def av1c(seq: bytes, *, first: int = 0x81) -> bytes:
    # profile 0, level 8 (4.0); tier 1, high_bitdepth, not 12-bit, not mono, 4:2:0 colocated.
    return bytes((first, (0 << 5) | 8, 0b1100_1100, 0x00)) + seq


def test_parse_av1_config() -> None:
    seq = obu(av1.OBU_SEQUENCE_HEADER, filler(11))
    config = av1.parse_av1_config(av1c(seq))
    assert config == av1.Av1Config(
        seq_profile=0,
        seq_level_idx_0=8,
        seq_tier_0=1,
        high_bitdepth=True,
        twelve_bit=False,
        monochrome=False,
        config_obus=seq,
    )
    assert av1.fmtp(config) == "profile=0;level-idx=8;tier=1"


def test_parse_av1_config_profile_and_flags() -> None:
    record = bytes((0x81, (2 << 5) | 31, 0b0011_0000, 0x00))
    config = av1.parse_av1_config(record)
    assert (config.seq_profile, config.seq_level_idx_0, config.seq_tier_0) == (2, 31, 0)
    assert (config.high_bitdepth, config.twelve_bit, config.monochrome) == (False, True, True)
    assert config.config_obus == b""
    assert av1.fmtp(config) == "profile=2;level-idx=31;tier=0"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"\x81\x08\x0c", "AV1 configuration record truncated: need 4 bytes, got 3"),
        (b"\x01\x08\x0c\x00", "AV1 configuration record has marker bit 0, expected 1"),
        (
            b"\x82\x08\x0c\x00",
            "AV1 configuration record version 2 is not supported (need 1)",
        ),
        (b"\x81\x08\x0c\x00\x0a\x09abc", "AV1 OBU at byte 0 truncated: obu_size 9, 3 bytes left"),
    ],
)
def test_parse_av1_config_errors(record: bytes, message: str) -> None:
    with pytest.raises(FlvError) as info:
        av1.parse_av1_config(record)
    assert str(info.value) == message


# --- packetization ---------------------------------------------------------------------------


def test_small_unit_is_one_packet_without_delimiter_or_sizes() -> None:
    td = obu(av1.OBU_TEMPORAL_DELIMITER, b"")
    frame = obu(av1.OBU_FRAME, filler(40))
    payloads = av1.packetize(td + frame, 1200, keyframe=False, sequence_header=None)
    # W=1: one element, no length field.
    assert payloads == [bytes((0x10,)) + av1.strip_size_field(frame)]


def test_dropped_obu_types() -> None:
    unit = b"".join(
        (
            obu(av1.OBU_TEMPORAL_DELIMITER, b""),
            obu(av1.OBU_METADATA, filler(4)),
            obu(av1.OBU_TILE_LIST, filler(10)),
            obu(av1.OBU_FRAME, filler(30)),
            obu(av1.OBU_PADDING, filler(8)),
        )
    )
    unpacked = depacketize(av1.packetize(unit, 1200, keyframe=False, sequence_header=None), 1200)
    assert [av1.obu_type(o) for o in unpacked.obus] == [av1.OBU_METADATA, av1.OBU_FRAME]


def test_w_counts_up_to_three_elements_then_zero() -> None:
    three = b"".join(obu(av1.OBU_METADATA, filler(5, i)) for i in range(3))
    payloads = av1.packetize(three, 1200, keyframe=False, sequence_header=None)
    assert len(payloads) == 1 and payloads[0][0] == 0x30
    # Two length-prefixed elements, then the last one runs to the end of the packet.
    assert len(payloads[0]) == 1 + 2 * (1 + 6) + 6
    five = b"".join(obu(av1.OBU_METADATA, filler(5, i)) for i in range(5))
    payloads = av1.packetize(five, 1200, keyframe=False, sequence_header=None)
    assert len(payloads) == 1 and payloads[0][0] == 0x00
    assert len(payloads[0]) == 1 + 5 * (1 + 6)
    assert depacketize(payloads, 1200).obus == av1.split_obus(five)


def test_keyframe_gets_sequence_header_and_n_bit() -> None:
    seq = obu(av1.OBU_SEQUENCE_HEADER, filler(12))
    frame = obu(av1.OBU_FRAME, filler(500))
    unit = obu(av1.OBU_TEMPORAL_DELIMITER, b"") + frame
    unpacked = depacketize(av1.packetize(unit, 200, keyframe=True, sequence_header=seq), 200)
    assert unpacked.obus == [seq, frame]
    assert unpacked.n_bit
    # A delta frame never gets the sequence header nor N.
    unpacked = depacketize(av1.packetize(unit, 200, keyframe=False, sequence_header=seq), 200)
    assert unpacked.obus == [frame]
    assert not unpacked.n_bit


def test_in_band_sequence_header_is_not_duplicated() -> None:
    seq = obu(av1.OBU_SEQUENCE_HEADER, filler(12))
    other = obu(av1.OBU_SEQUENCE_HEADER, filler(12, 5))
    frame = obu(av1.OBU_FRAME, filler(50))
    unpacked = depacketize(
        av1.packetize(seq + frame, 1200, keyframe=True, sequence_header=other), 1200
    )
    assert unpacked.obus == [seq, frame]
    assert unpacked.n_bit


def test_keyframe_without_any_sequence_header_has_no_n_bit() -> None:
    frame = obu(av1.OBU_FRAME, filler(50))
    payloads = av1.packetize(frame, 1200, keyframe=True, sequence_header=None)
    assert not payloads[0][0] & 0x08


@pytest.mark.parametrize("payload_size", [av1.MIN_PAYLOAD_SIZE, 5, 6, 50, 127, 128, 129, 300])
def test_fragmentation_round_trip(payload_size: int) -> None:
    obus = [
        obu(av1.OBU_SEQUENCE_HEADER, filler(12)),
        obu(av1.OBU_METADATA, filler(3, 1), extension=True),
        obu(av1.OBU_FRAME_HEADER, filler(7, 2)),
        obu(av1.OBU_TILE_GROUP, filler(1000, 3), extension=True),
        obu(av1.OBU_TILE_GROUP, b"", extension=True),
        obu(av1.OBU_TILE_GROUP, filler(130, 4)),
    ]
    payloads = av1.packetize(b"".join(obus), payload_size, keyframe=True, sequence_header=None)
    assert all(len(p) <= payload_size for p in payloads)
    assert depacketize(payloads, payload_size).obus == obus


def test_fragments_fill_packets() -> None:
    frame = obu(av1.OBU_FRAME, filler(1000))
    payloads = av1.packetize(frame, 300, keyframe=False, sequence_header=None)
    assert [len(p) for p in payloads[:-1]] == [300, 300, 300]
    assert [p[0] for p in payloads] == [0x50, 0xD0, 0xD0, 0x90]


def test_payload_size_too_small() -> None:
    with pytest.raises(ValueError) as info:
        av1.packetize(obu(av1.OBU_FRAME, b"x"), 3, keyframe=False, sequence_header=None)
    assert str(info.value) == "payload_size must be at least 4, not 3"


def test_empty_unit_has_no_packets() -> None:
    td = obu(av1.OBU_TEMPORAL_DELIMITER, b"")
    assert av1.packetize(td, 1200, keyframe=False, sequence_header=None) == []


# --- real encoder and decoder ----------------------------------------------------------------


@dataclass
class Encoded:
    units: list[bytes]
    keyframes: list[bool]
    sequence_header: bytes


@pytest.fixture(scope="module")
def encoded() -> Encoded:
    codec = av.CodecContext.create("libsvtav1", "w")
    assert isinstance(codec, av.VideoCodecContext)
    codec.width = WIDTH
    codec.height = HEIGHT
    codec.pix_fmt = "yuv420p"
    codec.time_base = Fraction(1, 25)
    codec.framerate = Fraction(25, 1)
    codec.gop_size = KEYINT
    codec.options = {"preset": "12", "svtav1-params": f"pred-struct=1:keyint={KEYINT}"}
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    packets = []
    for i in range(FRAMES):
        image = np.roll(noise, i * 4, axis=1)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        packets.extend(codec.encode(frame))
    packets.extend(codec.encode(None))
    units = [bytes(p) for p in packets]
    keyframes = [p.is_keyframe for p in packets]
    sequence_header = av1.find_sequence_header(units[0])
    assert sequence_header is not None
    return Encoded(units, keyframes, sequence_header)


def decode(units: Sequence[bytes]) -> list[np.ndarray]:
    codec = av.CodecContext.create("libdav1d", "r")
    assert isinstance(codec, av.VideoCodecContext)
    frames = []
    for unit in units:
        frames.extend(codec.decode(av.Packet(unit)))
    frames.extend(codec.decode(None))
    return [f.to_ndarray(format="yuv420p") for f in frames]


def without_sequence_header(unit: bytes) -> bytes:
    return b"".join(o for o in av1.split_obus(unit) if av1.obu_type(o) != av1.OBU_SEQUENCE_HEADER)


@pytest.mark.parametrize("payload_size", [60, 300, 1200])
@pytest.mark.parametrize("in_band", [True, False])
def test_encoded_stream_decodes_after_round_trip(
    encoded: Encoded, payload_size: int, in_band: bool
) -> None:
    assert len(encoded.units) == FRAMES
    assert encoded.keyframes.count(True) == FRAMES // KEYINT
    reference = decode(encoded.units)
    assert len(reference) == FRAMES
    received: list[bytes] = []
    fragmented = False
    for unit, key in zip(encoded.units, encoded.keyframes, strict=True):
        sent = unit if in_band else without_sequence_header(unit)
        payloads = av1.packetize(
            sent, payload_size, keyframe=key, sequence_header=encoded.sequence_header
        )
        fragmented = fragmented or any(p[0] & 0x40 for p in payloads)
        unpacked = depacketize(payloads, payload_size)
        assert unpacked.n_bit == key
        received.append(b"".join(unpacked.obus))
    assert fragmented, "noise keyframes are larger than any payload_size used here"
    decoded = decode(received)
    assert len(decoded) == FRAMES
    for got, want in zip(decoded, reference, strict=True):
        assert np.array_equal(got, want)


def test_viewer_joining_at_a_later_keyframe_decodes(encoded: Encoded) -> None:
    # The publisher sent the sequence header only in the configuration record.
    start = encoded.keyframes.index(True, 1)
    received = []
    for unit, key in zip(encoded.units[start:], encoded.keyframes[start:], strict=True):
        payloads = av1.packetize(
            without_sequence_header(unit),
            300,
            keyframe=key,
            sequence_header=encoded.sequence_header,
        )
        received.append(b"".join(depacketize(payloads, 300).obus))
    assert len(decode(received)) == FRAMES - start


# --- the committed RTMP replay fixture -------------------------------------------------------

FIXTURE = Path(__file__).parent / "fixtures" / "av1_aac.flv"
EX_HEADER = 0x80
PACKET_SEQUENCE_START = 0
PACKET_CODED_FRAMES = 1


def test_fixture_is_enhanced_av1_that_survives_the_relay_path() -> None:
    tags = flvwrite.read_flv(FIXTURE.read_bytes())
    stamps = [ms for _, ms, _ in tags]
    assert stamps == sorted(stamps)
    video = [(ms, body) for kind, ms, body in tags if kind == flvwrite.TAG_VIDEO]
    audio = [body for kind, _, body in tags if kind == flvwrite.TAG_AUDIO]
    assert audio[0][:2] == b"\xaf\x00" and all(body[:2] == b"\xaf\x01" for body in audio[1:])
    assert len(audio) > 150  # about 4 s of 1024-sample frames at 48 kHz
    first = video[0][1]
    assert first[0] == EX_HEADER | (1 << 4) | PACKET_SEQUENCE_START and first[1:5] == b"av01"
    config = av1.parse_av1_config(first[5:])
    assert av1.fmtp(config).startswith("profile=0;")
    assert not (config.high_bitdepth or config.monochrome)
    units: list[tuple[bytes, bool]] = []
    for _, body in video[1:]:
        assert body[0] & 0x8F == EX_HEADER | PACKET_CODED_FRAMES and body[1:5] == b"av01"
        units.append((body[5:], (body[0] >> 4) & 0x07 == 1))
    assert len(units) == 100
    assert [i for i, (_, key) in enumerate(units) if key] == [0, 25, 50, 75]
    assert 3900 <= video[-1][0] <= 4100
    # Packetize as the relay does (sequence header from the record) and decode from the
    # second keyframe, like a viewer joining late.
    received = []
    for unit, key in units[25:]:
        payloads = av1.packetize(
            without_sequence_header(unit), 1200, keyframe=key, sequence_header=config.config_obus
        )
        received.append(b"".join(depacketize(payloads, 1200).obus))
    assert len(decode(received)) == 75
