"""H.264 access units to RTP payloads, RFC 6184 packetization-mode 1 (non-interleaved)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from srsrelay.hub.nal import pack as pack_nal_units

NAL_SLICE = 1
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9
NAL_FILLER = 12
NAL_STAP_A = 24
NAL_FU_A = 28

STAP_A_HEADER_SIZE = 1
STAP_A_LENGTH_SIZE = 2
FU_A_HEADER_SIZE = 2
MIN_PAYLOAD_SIZE = FU_A_HEADER_SIZE + 1
"""Smallest max_payload that still carries one NALU byte per FU-A fragment."""

_DROPPED_TYPES = frozenset((NAL_AUD, NAL_FILLER))
_F_BIT = 0x80
_NRI_MASK = 0x60
_TYPE_MASK = 0x1F
_FU_START = 0x80
_FU_END = 0x40


def nal_type(nalu: bytes) -> int:
    """The nal_unit_type (low 5 bits of the first byte)."""
    return nalu[0] & _TYPE_MASK


def has_idr(nalus: Sequence[bytes]) -> bool:
    """True if the access unit contains an IDR slice."""
    return any(nal_type(n) == NAL_IDR for n in nalus)


def profile_level_id(sps: bytes) -> str:
    """profile-level-id for SDP (RFC 6184 8.1): profile_idc, constraint flags, level_idc."""
    if len(sps) < 4:
        raise ValueError(f"SPS is {len(sps)} bytes, need at least 4 for profile-level-id")
    return sps[1:4].hex()


def with_parameter_sets(
    nalus: Sequence[bytes], sps: Sequence[bytes], pps: Sequence[bytes]
) -> list[bytes]:
    """Put SPS/PPS in front of an IDR access unit that lacks them.

    FLV carries parameter sets only in the sequence header, but a WebRTC decoder
    joining at this keyframe needs them in-band. Non-IDR units are returned unchanged.
    """
    units = list(nalus)
    if not has_idr(units):
        return units
    types = [nal_type(n) for n in units]
    if NAL_PPS not in types:
        # After the last SPS (if any), so the order stays SPS, PPS, slices.
        at = max((i + 1 for i, t in enumerate(types) if t == NAL_SPS), default=0)
        units[at:at] = pps
    if NAL_SPS not in types:
        units[0:0] = sps
    return units


def packetize(nalus: Sequence[bytes], max_payload: int) -> list[bytes]:
    """RTP payloads for one access unit, in send order.

    Consecutive NALUs that fit together go into one STAP-A (RFC 6184 5.7.1); a lone
    small NALU is a single NAL unit packet (5.6); a NALU larger than max_payload is
    split into FU-A fragments (5.8). AUD and filler data are dropped: they carry
    nothing a WebRTC receiver needs.
    """
    if max_payload < MIN_PAYLOAD_SIZE:
        raise ValueError(f"max_payload must be at least {MIN_PAYLOAD_SIZE}, not {max_payload}")
    return pack_nal_units(
        [n for n in nalus if n and nal_type(n) not in _DROPPED_TYPES],
        max_payload,
        header_size=STAP_A_HEADER_SIZE,
        length_size=STAP_A_LENGTH_SIZE,
        aggregate=_stap_a,
        fragment=_fu_a,
    )


def _stap_a(nalus: Sequence[bytes]) -> bytes:
    # RFC 6184 5.7.1: F is the OR of all F bits, NRI the maximum NRI.
    f_bit = 0
    nri = 0
    for nalu in nalus:
        f_bit |= nalu[0] & _F_BIT
        nri = max(nri, nalu[0] & _NRI_MASK)
    parts = [bytes((f_bit | nri | NAL_STAP_A,))]
    for nalu in nalus:
        parts.append(len(nalu).to_bytes(STAP_A_LENGTH_SIZE, "big"))
        parts.append(nalu)
    return b"".join(parts)


def _fu_a(nalu: bytes, max_payload: int) -> list[bytes]:
    # RFC 6184 5.8: FU indicator keeps F and NRI; FU header carries S/E and the type.
    indicator = (nalu[0] & (_F_BIT | _NRI_MASK)) | NAL_FU_A
    kind = nalu[0] & _TYPE_MASK
    body = memoryview(nalu)[1:]
    step = max_payload - FU_A_HEADER_SIZE
    fragments: list[bytes] = []
    for start in range(0, len(body), step):
        header = kind
        if start == 0:
            header |= _FU_START
        if start + step >= len(body):
            header |= _FU_END
        fragments.append(bytes((indicator, header)) + body[start : start + step])
    return fragments


SLICE_P = 0
SLICE_B = 1
SLICE_I = 2
SLICE_SP = 3
SLICE_SI = 4
SLICE_HEADER_PROBE = 16
"""Bytes of a slice NALU read to find slice_type: two ue(v) of at most 33 bits each,
plus emulation-prevention bytes, fit easily."""
_MAX_UE_ZEROS = 31


def nal_ref_idc(nalu: bytes) -> int:
    """nal_ref_idc (bits 5-6 of the first byte): 0 means no other picture refers to it."""
    return (nalu[0] >> 5) & 0x03


def unescape_rbsp(data: bytes) -> bytes:
    """Remove emulation-prevention bytes: 00 00 03 -> 00 00 (H.264 7.4.1)."""
    if b"\x00\x00\x03" not in data:
        return data
    out = bytearray()
    zeros = 0
    for byte in data:
        if zeros >= 2 and byte == 0x03:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _read_ue(value: int, total: int, pos: int) -> tuple[int, int]:
    """One Exp-Golomb ue(v) at bit `pos` of the `total`-bit big-endian `value`."""
    zeros = 0
    while True:
        if pos >= total:
            raise ValueError("slice header truncated")
        if (value >> (total - 1 - pos)) & 1:
            break
        zeros += 1
        pos += 1
        if zeros > _MAX_UE_ZEROS:
            raise ValueError("slice header has an Exp-Golomb code longer than 32 bits")
    pos += 1
    if pos + zeros > total:
        raise ValueError("slice header truncated")
    suffix = (value >> (total - pos - zeros)) & ((1 << zeros) - 1) if zeros else 0
    return (1 << zeros) - 1 + suffix, pos + zeros


def slice_type(nalu: bytes) -> int:
    """slice_type modulo 5 (SLICE_P, SLICE_B, SLICE_I, SLICE_SP, SLICE_SI) of a coded
    slice NALU (type 1 or 5), from first_mb_in_slice and slice_type (H.264 7.3.3).

    Raises ValueError for other NALU types or a truncated header.
    """
    if not nalu or nal_type(nalu) not in (NAL_SLICE, NAL_IDR):
        raise ValueError("not a coded slice NALU")
    rbsp = unescape_rbsp(nalu[1 : 1 + SLICE_HEADER_PROBE])
    value = int.from_bytes(rbsp, "big")
    total = len(rbsp) * 8
    _, pos = _read_ue(value, total, 0)  # first_mb_in_slice
    kind, _ = _read_ue(value, total, pos)
    if kind > 9:
        raise ValueError(f"slice_type {kind} is out of range (0-9)")
    return kind % 5


@dataclass(frozen=True, slots=True)
class PictureInfo:
    """What the slice headers of one access unit say about reordering."""

    is_b: bool
    """At least one slice is a B slice."""
    is_reference: bool
    """Some slice has nal_ref_idc != 0: later pictures may predict from this one."""


def picture_info(nalus: Sequence[bytes]) -> PictureInfo | None:
    """Slice type and reference flag of an access unit; None if it has no coded slice
    whose header parses."""
    is_b = False
    is_reference = False
    found = False
    for nalu in nalus:
        if not nalu or nal_type(nalu) not in (NAL_SLICE, NAL_IDR):
            continue
        try:
            kind = slice_type(nalu)
        except ValueError:
            continue
        found = True
        is_b = is_b or kind == SLICE_B
        is_reference = is_reference or nal_ref_idc(nalu) != 0
    return PictureInfo(is_b, is_reference) if found else None


def split_annexb(data: bytes) -> list[bytes]:
    """NALUs of an Annex B byte stream (00 00 01 / 00 00 00 01 start codes)."""
    nalus: list[bytes] = []
    starts: list[tuple[int, int]] = []
    pos = data.find(b"\x00\x00\x01")
    while pos >= 0:
        starts.append((pos, pos + 3))
        pos = data.find(b"\x00\x00\x01", pos + 3)
    for i, (_, begin) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(data)
        nalu = data[begin:end].rstrip(b"\x00") if i + 1 < len(starts) else data[begin:end]
        if nalu:
            nalus.append(bytes(nalu))
    return nalus
