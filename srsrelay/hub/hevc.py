"""HEVC access units to RTP payloads (RFC 7798) and the HEVCDecoderConfigurationRecord.

Pure functions, no I/O. The record layout is ISO/IEC 14496-15 8.3.3.1; the NAL unit
header is H.265 7.3.1.2 (two bytes: F, nal_unit_type, nuh_layer_id, nuh_temporal_id_plus1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from srsrelay.hub.nal import pack as pack_nal_units
from srsrelay.rtmp.flv import FlvError

NAL_IRAP_FIRST = 16
"""BLA_W_LP: IRAP pictures are nal_unit_type 16..23 (H.265 Table 7-1)."""
NAL_IRAP_LAST = 23
NAL_VPS = 32
NAL_SPS = 33
NAL_PPS = 34
NAL_AUD = 35
NAL_FILLER = 38
NAL_AP = 48
"""Aggregation Packet (RFC 7798 4.4.2)."""
NAL_FU = 49
"""Fragmentation Unit (RFC 7798 4.4.3)."""

NAL_HEADER_SIZE = 2
AP_LENGTH_SIZE = 2
FU_HEADER_SIZE = 1
MIN_PAYLOAD_SIZE = NAL_HEADER_SIZE + FU_HEADER_SIZE + 1
"""Smallest payload_size that still carries one NAL byte per FU fragment."""
HEVC_RECORD_MIN_SIZE = 23
"""Fixed fields of an HEVCDecoderConfigurationRecord (22 bytes) plus numOfArrays."""
RECORD_VERSION = 1

_DROPPED_TYPES = frozenset((NAL_AUD, NAL_FILLER))
_PARAMETER_SET_TYPES = (NAL_VPS, NAL_SPS, NAL_PPS)
_PARAMETER_SET_NAMES = {NAL_VPS: "VPS", NAL_SPS: "SPS", NAL_PPS: "PPS"}
_F_BIT = 0x80
_TYPE_MASK = 0x7E
_LAYER_ID_MASK = 0x01F8
"""nuh_layer_id in the 16-bit NAL unit header (6 bits, split over both bytes)."""
_TID_MASK = 0x0007
_FU_START = 0x80
_FU_END = 0x40


@dataclass(frozen=True, slots=True)
class HevcConfig:
    """The fields of an HEVCDecoderConfigurationRecord we need (ISO/IEC 14496-15 8.3.3.1)."""

    nalu_length_size: int
    """Bytes of the length prefix in front of each NAL unit in coded frames: 1, 2 or 4."""
    vps: tuple[bytes, ...]
    """Video parameter set NAL units (with their 2-byte NAL header), at least one."""
    sps: tuple[bytes, ...]
    """Sequence parameter set NAL units, at least one."""
    pps: tuple[bytes, ...]
    """Picture parameter set NAL units, at least one."""
    general_profile_space: int
    """general_profile_space (0..3); SDP profile-space."""
    general_tier_flag: int
    """0 = Main tier, 1 = High tier; SDP tier-flag."""
    general_profile_idc: int
    """1 = Main, 2 = Main 10, 3 = Main Still Picture, ...; SDP profile-id."""
    general_level_idc: int
    """30 times the level number (93 = level 3.1); SDP level-id."""


def parse_hevc_config(record: bytes) -> HevcConfig:
    """Parse an HEVCDecoderConfigurationRecord (the 'hvc1' SequenceStart payload).

    Arrays of other NAL unit types (SEI) are skipped. Raises FlvError naming the problem.
    """
    if len(record) < HEVC_RECORD_MIN_SIZE:
        raise FlvError(
            f"HEVC sequence header truncated: need {HEVC_RECORD_MIN_SIZE} bytes, got {len(record)}"
        )
    version = record[0]
    if version != RECORD_VERSION:
        raise FlvError(f"HEVC sequence header has version {version}, expected 1")
    length_size = (record[21] & 0x03) + 1
    if length_size == 3:
        raise FlvError("HEVC sequence header has NALU length size 3 (must be 1, 2 or 4)")
    found: dict[int, list[bytes]] = {kind: [] for kind in _PARAMETER_SET_TYPES}
    pos = HEVC_RECORD_MIN_SIZE
    for array in range(1, record[22] + 1):
        if pos + 3 > len(record):
            raise FlvError(
                f"HEVC sequence header truncated: array {array} header at offset {pos}, "
                f"got {len(record)} bytes"
            )
        kind = record[pos] & 0x3F
        count = int.from_bytes(record[pos + 1 : pos + 3], "big")
        pos += 3
        for index in range(1, count + 1):
            if pos + 2 > len(record):
                raise FlvError(
                    f"HEVC sequence header truncated: array {array} NAL unit {index} length "
                    f"at offset {pos}, got {len(record)} bytes"
                )
            size = int.from_bytes(record[pos : pos + 2], "big")
            pos += 2
            if pos + size > len(record):
                raise FlvError(
                    f"HEVC sequence header truncated: array {array} NAL unit {index} needs "
                    f"{size} bytes at offset {pos}, got {len(record) - pos}"
                )
            if size < NAL_HEADER_SIZE:
                raise FlvError(
                    f"HEVC sequence header: array {array} NAL unit {index} is {size} bytes, "
                    f"shorter than the 2-byte NAL unit header"
                )
            if kind in found:
                found[kind].append(bytes(record[pos : pos + size]))
            pos += size
    for kind in _PARAMETER_SET_TYPES:
        if not found[kind]:
            raise FlvError(f"HEVC sequence header has no {_PARAMETER_SET_NAMES[kind]}")
    return HevcConfig(
        nalu_length_size=length_size,
        vps=tuple(found[NAL_VPS]),
        sps=tuple(found[NAL_SPS]),
        pps=tuple(found[NAL_PPS]),
        general_profile_space=record[1] >> 6,
        general_tier_flag=(record[1] >> 5) & 0x01,
        general_profile_idc=record[1] & 0x1F,
        general_level_idc=record[12],
    )


def nal_type(nal: bytes) -> int:
    """nal_unit_type: bits 1-6 of the first byte."""
    return (nal[0] & _TYPE_MASK) >> 1


def is_irap(nalus: Sequence[bytes]) -> bool:
    """True if the access unit has an IRAP picture (BLA, IDR or CRA): a decoder can start here."""
    return any(nal and NAL_IRAP_FIRST <= nal_type(nal) <= NAL_IRAP_LAST for nal in nalus)


def with_parameter_sets(nalus: Sequence[bytes], config: HevcConfig) -> list[bytes]:
    """Put VPS/SPS/PPS in front of an IRAP access unit that lacks them.

    FLV carries parameter sets only in the sequence header, but a WebRTC decoder joining
    at this picture needs them in-band. A kind already present in the unit is left as
    it is; missing ones go after a leading AUD, in VPS, SPS, PPS order. Units without
    an IRAP picture are returned unchanged.
    """
    units = list(nalus)
    if not is_irap(units):
        return units
    front = 1 if units and units[0] and nal_type(units[0]) == NAL_AUD else 0
    sets = {NAL_VPS: config.vps, NAL_SPS: config.sps, NAL_PPS: config.pps}
    for rank, kind in enumerate(_PARAMETER_SET_TYPES):
        types = [nal_type(n) if n else -1 for n in units]
        if kind in types:
            continue
        # After any parameter set that must precede this one (VPS before SPS before PPS).
        earlier = _PARAMETER_SET_TYPES[:rank]
        at = max((i + 1 for i, t in enumerate(types) if t in earlier), default=front)
        units[at:at] = sets[kind]
    return units


def packetize(nalus: Sequence[bytes], payload_size: int) -> list[bytes]:
    """RTP payloads for one access unit, in send order (RFC 7798, no DONL fields).

    Consecutive NAL units that fit together go into one Aggregation Packet (4.4.2); a lone
    small one is a single NAL unit packet (4.4.1); one larger than payload_size is split
    into Fragmentation Units (4.4.3). AUD, filler data and NAL units shorter than the
    2-byte header are dropped: they carry nothing a WebRTC receiver needs.
    """
    if payload_size < MIN_PAYLOAD_SIZE:
        raise ValueError(f"payload_size must be at least {MIN_PAYLOAD_SIZE}, not {payload_size}")
    return pack_nal_units(
        [n for n in nalus if len(n) >= NAL_HEADER_SIZE and nal_type(n) not in _DROPPED_TYPES],
        payload_size,
        header_size=NAL_HEADER_SIZE,
        length_size=AP_LENGTH_SIZE,
        aggregate=_aggregate,
        fragment=_fragment,
    )


def _aggregate(nalus: Sequence[bytes]) -> bytes:
    # RFC 7798 4.4.2: F is the OR of all F bits; LayerId and TID are the lowest of all.
    f_bit = 0
    layer_id = _LAYER_ID_MASK
    tid = _TID_MASK
    for nal in nalus:
        header = int.from_bytes(nal[:NAL_HEADER_SIZE], "big")
        f_bit |= nal[0] & _F_BIT
        layer_id = min(layer_id, header & _LAYER_ID_MASK)
        tid = min(tid, header & _TID_MASK)
    header = (f_bit << 8) | (NAL_AP << 9) | layer_id | tid
    parts = [header.to_bytes(NAL_HEADER_SIZE, "big")]
    for nal in nalus:
        parts.append(len(nal).to_bytes(AP_LENGTH_SIZE, "big"))
        parts.append(nal)
    return b"".join(parts)


def _fragment(nal: bytes, payload_size: int) -> list[bytes]:
    # RFC 7798 4.4.3: PayloadHdr keeps F, LayerId and TID with Type 49; the FU header
    # carries S/E and the original type; the original 2-byte NAL header is not sent.
    header = int.from_bytes(nal[:NAL_HEADER_SIZE], "big")
    payload_header = ((header & ~(_TYPE_MASK << 8)) | (NAL_FU << 9)).to_bytes(
        NAL_HEADER_SIZE, "big"
    )
    kind = nal_type(nal)
    body = memoryview(nal)[NAL_HEADER_SIZE:]
    step = payload_size - NAL_HEADER_SIZE - FU_HEADER_SIZE
    fragments: list[bytes] = []
    for start in range(0, len(body), step):
        fu_header = kind
        if start == 0:
            fu_header |= _FU_START
        if start + step >= len(body):
            fu_header |= _FU_END
        fragments.append(payload_header + bytes((fu_header,)) + body[start : start + step])
    return fragments


def fmtp(config: HevcConfig) -> str:
    """The a=fmtp parameters describing the stream for the SDP answer (RFC 7798 7.1)."""
    return (
        f"profile-space={config.general_profile_space};"
        f"tier-flag={config.general_tier_flag};"
        f"profile-id={config.general_profile_idc};"
        f"level-id={config.general_level_idc}"
    )
