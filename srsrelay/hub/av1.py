"""AV1 temporal units to RTP payloads ("RTP Payload Format For AV1" v1.0, AOM).

Pure functions, no I/O. References: AV1 Bitstream & Decoding Process Specification
(5.3 OBU syntax, 4.10.5 leb128), AV1 Codec ISO Media File Format Binding 2.3
(AV1CodecConfigurationRecord, "av1C"), and the AOM RTP payload format v1.0 (4.4 aggregation
header, 4.5 payload structure, 5 packetization rules, 7.2 SDP parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from srsrelay.rtmp.flv import FlvError

OBU_SEQUENCE_HEADER = 1
OBU_TEMPORAL_DELIMITER = 2
OBU_FRAME_HEADER = 3
OBU_TILE_GROUP = 4
OBU_METADATA = 5
OBU_FRAME = 6
OBU_REDUNDANT_FRAME_HEADER = 7
OBU_TILE_LIST = 8
OBU_PADDING = 15

AGGREGATION_HEADER_SIZE = 1
MAX_OBU_HEADER_SIZE = 2
"""obu_header plus the optional extension byte."""
MIN_PAYLOAD_SIZE = AGGREGATION_HEADER_SIZE + MAX_OBU_HEADER_SIZE + 1
"""Smallest payload_size that fits an aggregation header, a whole OBU header and one more byte,
so every packet makes progress and no first fragment splits an OBU header."""
MAX_ELEMENTS_WITHOUT_LENGTH = 3
"""W can count up to 3 OBU elements; with W set the last element has no length field."""
AV1C_HEADER_SIZE = 4
"""Fixed fields of an AV1CodecConfigurationRecord before configOBUs."""
LEB128_MAX_BYTES = 8
"""AV1 spec 4.10.5: leb128() reads at most 8 bytes."""
LEB128_MAX_VALUE = (1 << 32) - 1
"""AV1 spec 4.10.5: a conforming leb128 value fits in 32 bits."""

# RTP payload format 5: temporal delimiters and tile lists are not sent; padding carries nothing.
_DROPPED_TYPES = frozenset((OBU_TEMPORAL_DELIMITER, OBU_TILE_LIST, OBU_PADDING))
_FORBIDDEN_BIT = 0x80
_EXTENSION_FLAG = 0x04
_HAS_SIZE_FIELD = 0x02
_AGG_Z = 0x80
_AGG_Y = 0x40
_AGG_W_SHIFT = 4
_AGG_N = 0x08


def read_leb128(data: bytes, pos: int) -> tuple[int, int]:
    """Decode one leb128 value at `pos`; returns (value, position after it).

    Raises FlvError if the data ends inside the value or it exceeds 32 bits.
    """
    value = 0
    for i in range(LEB128_MAX_BYTES):
        if pos + i >= len(data):
            raise FlvError(f"AV1 leb128 size truncated at byte {pos + i}")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value > LEB128_MAX_VALUE:
                raise FlvError(f"AV1 leb128 size {value} at byte {pos} exceeds 32 bits")
            return value, pos + i + 1
    raise FlvError(f"AV1 leb128 size at byte {pos} is longer than {LEB128_MAX_BYTES} bytes")


def write_leb128(value: int) -> bytes:
    """Shortest leb128 encoding of a non-negative value."""
    if value < 0:
        raise ValueError(f"leb128 value must be non-negative, not {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def obu_type(obu: bytes) -> int:
    """obu_type (bits 1-4 of the first header byte)."""
    return (obu[0] >> 3) & 0x0F


def _header_size(first: int) -> int:
    return 2 if first & _EXTENSION_FLAG else 1


def split_obus(data: bytes) -> list[bytes]:
    """Whole OBUs (header, size field and payload) of a low-overhead bitstream (AV1 spec 5.3).

    As AV1-ISOBMFF allows in a sample, the last OBU may lack obu_has_size_field and then
    extends to the end of the data. Raises FlvError on a forbidden bit or truncation.
    """
    obus: list[bytes] = []
    pos = 0
    while pos < len(data):
        first = data[pos]
        if first & _FORBIDDEN_BIT:
            raise FlvError(f"AV1 OBU at byte {pos} has obu_forbidden_bit set")
        header_end = pos + _header_size(first)
        if header_end > len(data):
            raise FlvError(f"AV1 OBU header at byte {pos} truncated")
        if first & _HAS_SIZE_FIELD:
            size, payload_start = read_leb128(data, header_end)
            end = payload_start + size
            if end > len(data):
                raise FlvError(
                    f"AV1 OBU at byte {pos} truncated: obu_size {size}, "
                    f"{len(data) - payload_start} bytes left"
                )
        else:
            end = len(data)
        obus.append(bytes(data[pos:end]))
        pos = end
    return obus


def strip_size_field(obu: bytes) -> bytes:
    """The OBU with obu_has_size_field cleared and the size removed (RTP format 4.5)."""
    first = obu[0]
    if not first & _HAS_SIZE_FIELD:
        return obu
    header_size = _header_size(first)
    _, payload_start = read_leb128(obu, header_size)
    return bytes((first & ~_HAS_SIZE_FIELD,)) + obu[1:header_size] + obu[payload_start:]


def find_sequence_header(temporal_unit: bytes) -> bytes | None:
    """The first sequence header OBU of a temporal unit (as carried, with its size field)."""
    for obu in split_obus(temporal_unit):
        if obu_type(obu) == OBU_SEQUENCE_HEADER:
            return obu
    return None


@dataclass(frozen=True, slots=True)
class Av1Config:
    """An AV1CodecConfigurationRecord (AV1-ISOBMFF 2.3.3)."""

    seq_profile: int
    """0 main, 1 high, 2 professional."""
    seq_level_idx_0: int
    """Level of operating point 0 (5 = level 3.1, 8 = level 4.0, 31 = unconstrained)."""
    seq_tier_0: int
    """Tier of operating point 0: 0 main, 1 high."""
    high_bitdepth: bool
    """10 (or 12) bit samples rather than 8."""
    twelve_bit: bool
    """12-bit samples (profile 2 only)."""
    monochrome: bool
    """Luma only."""
    config_obus: bytes
    """OBUs from the record (sequence header, maybe metadata), with size fields; may be empty."""


def parse_av1_config(record: bytes) -> Av1Config:
    """Parse an "av1C" record, the body of an enhanced RTMP 'av01' SequenceStart."""
    if len(record) < AV1C_HEADER_SIZE:
        raise FlvError(
            f"AV1 configuration record truncated: need {AV1C_HEADER_SIZE} bytes, got {len(record)}"
        )
    if not record[0] & 0x80:
        raise FlvError("AV1 configuration record has marker bit 0, expected 1")
    version = record[0] & 0x7F
    if version != 1:
        raise FlvError(f"AV1 configuration record version {version} is not supported (need 1)")
    config_obus = bytes(record[AV1C_HEADER_SIZE:])
    # Validate the OBUs now, so a bad record fails at SequenceStart, not at the first keyframe.
    split_obus(config_obus)
    flags = record[2]
    return Av1Config(
        seq_profile=record[1] >> 5,
        seq_level_idx_0=record[1] & 0x1F,
        seq_tier_0=flags >> 7,
        high_bitdepth=bool(flags & 0x40),
        twelve_bit=bool(flags & 0x20),
        monochrome=bool(flags & 0x10),
        config_obus=config_obus,
    )


def fmtp(config: Av1Config) -> str:
    """SDP a=fmtp parameters for AV1 (RTP payload format 7.2.1)."""
    return (
        f"profile={config.seq_profile};level-idx={config.seq_level_idx_0};tier={config.seq_tier_0}"
    )


def packetize(
    temporal_unit: bytes,
    payload_size: int,
    *,
    keyframe: bool,
    sequence_header: bytes | None,
) -> list[bytes]:
    """RTP payloads for one temporal unit, in send order; each is at most payload_size bytes.

    `temporal_unit` is a low-overhead bitstream (OBUs with size fields). Temporal delimiters,
    tile lists and padding are dropped and size fields removed. For a keyframe without an
    in-band sequence header, `sequence_header` (one or more OBUs, e.g. Av1Config.config_obus)
    goes in front so a viewer can start decoding there; N is then set on the first packet.
    """
    if payload_size < MIN_PAYLOAD_SIZE:
        raise ValueError(f"payload_size must be at least {MIN_PAYLOAD_SIZE}, not {payload_size}")
    obus = [o for o in split_obus(temporal_unit) if obu_type(o) not in _DROPPED_TYPES]
    has_sequence_header = any(obu_type(o) == OBU_SEQUENCE_HEADER for o in obus)
    if keyframe and not has_sequence_header and sequence_header:
        extra = [o for o in split_obus(sequence_header) if obu_type(o) not in _DROPPED_TYPES]
        obus[0:0] = extra
        has_sequence_header = any(obu_type(o) == OBU_SEQUENCE_HEADER for o in extra)
    elements = [strip_size_field(o) for o in obus]
    if not elements:
        return []
    packets = _Packer(payload_size).pack(elements)
    if keyframe and has_sequence_header:
        # 4.4: N marks the first packet of a coded video sequence (a keyframe after a
        # sequence header); receivers such as libwebrtc use it to spot keyframes.
        packets[0] = bytes((packets[0][0] | _AGG_N,)) + packets[0][1:]
    return packets


class _Packer:
    """Greedy packing of OBU elements into payloads (RTP format 4.5 and 5)."""

    def __init__(self, payload_size: int) -> None:
        self._payload_size = payload_size
        self._packets: list[bytes] = []
        self._elements: list[bytes] = []
        self._used = AGGREGATION_HEADER_SIZE
        self._continues = False
        """Z for the packet being filled: its first element continues an OBU."""

    def pack(self, elements: Sequence[bytes]) -> list[bytes]:
        for element in elements:
            self._add(element)
        self._flush(fragmented=False)
        return self._packets

    def _add(self, obu: bytes) -> None:
        offset = 0
        while offset < len(obu):
            rest = len(obu) - offset
            room = self._payload_size - self._used
            prefixed = len(write_leb128(rest)) + rest
            may_omit_length = len(self._elements) < MAX_ELEMENTS_WITHOUT_LENGTH
            if prefixed <= room:
                self._append(obu[offset:])
                return
            if may_omit_length and rest <= room:
                # Fits only as the last element, without its length field.
                self._append(obu[offset:])
                self._flush(fragmented=False)
                return
            # Fragment: this piece is the last element of the packet.
            piece = room if may_omit_length else _largest_prefixed(room)
            if offset == 0 and piece < _header_size(obu[0]) + 1:
                # Not enough room for the OBU header and a byte: start a fresh packet.
                self._flush(fragmented=False)
                continue
            self._append(obu[offset : offset + piece])
            offset += piece
            self._flush(fragmented=True)

    def _append(self, element: bytes) -> None:
        self._elements.append(element)
        self._used += len(write_leb128(len(element))) + len(element)

    def _flush(self, *, fragmented: bool) -> None:
        if not self._elements:
            return
        count = len(self._elements)
        w = count if count <= MAX_ELEMENTS_WITHOUT_LENGTH else 0
        header = (_AGG_Z if self._continues else 0) | (_AGG_Y if fragmented else 0)
        parts = [bytes((header | (w << _AGG_W_SHIFT),))]
        for i, element in enumerate(self._elements):
            if w == 0 or i < count - 1:
                parts.append(write_leb128(len(element)))
            parts.append(element)
        self._packets.append(b"".join(parts))
        self._elements = []
        self._used = AGGREGATION_HEADER_SIZE
        self._continues = fragmented


def _largest_prefixed(room: int) -> int:
    """Largest n with len(leb128(n)) + n <= room (0 if none)."""
    size = room - 1
    while size > 0 and len(write_leb128(size)) + size > room:
        size -= 1
    return max(size, 0)
