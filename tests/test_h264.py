"""RFC 6184 packetization: STAP-A / FU-A boundaries and exact reassembly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from srsrelay.hub import h264
from srsrelay.rtmp import flv
from tests.test_flv import TAG_VIDEO, make_flv, read_flv_tags


def depacketize(payloads: Sequence[bytes]) -> list[bytes]:
    """Receiver side of RFC 6184 mode 1, strict about S/E bits."""
    nalus: list[bytes] = []
    fragment: bytearray | None = None
    for payload in payloads:
        kind = payload[0] & 0x1F
        if kind == h264.NAL_STAP_A:
            assert fragment is None
            pos = 1
            while pos < len(payload):
                size = int.from_bytes(payload[pos : pos + 2], "big")
                assert size > 0 and pos + 2 + size <= len(payload)
                nalus.append(payload[pos + 2 : pos + 2 + size])
                pos += 2 + size
        elif kind == h264.NAL_FU_A:
            header = payload[1]
            start, end = bool(header & 0x80), bool(header & 0x40)
            assert not header & 0x20, "reserved bit set"
            if start:
                assert fragment is None
                fragment = bytearray(((payload[0] & 0xE0) | (header & 0x1F),))
            else:
                assert fragment is not None, "FU-A continuation without start"
            fragment += payload[2:]
            if end:
                nalus.append(bytes(fragment))
                fragment = None
        else:
            assert fragment is None
            assert 1 <= kind <= 23
            nalus.append(payload)
    assert fragment is None, "FU-A without end"
    return nalus


def nal(header: int, size: int) -> bytes:
    return bytes((header,)) + bytes((i * 7) & 0xFF for i in range(size - 1))


def test_single_small_nalu_is_not_aggregated() -> None:
    unit = nal(0x65, 50)
    assert h264.packetize([unit], 1200) == [unit]


def test_stap_a_header_and_layout() -> None:
    sps, pps, sei = nal(0x67, 10), nal(0x68, 4), nal(0x06, 8)
    # F bit on one NALU; NRI 3 (sps) is the maximum.
    forbidden = nal(0x80 | 0x01, 5)
    packets = h264.packetize([sei, sps, pps, forbidden], 1200)
    assert len(packets) == 1
    stap = packets[0]
    assert stap[0] == 0x80 | 0x60 | 24
    assert stap[1:3] == b"\x00\x08" and stap[3:11] == sei
    assert len(stap) == 1 + (2 + 8) + (2 + 10) + (2 + 4) + (2 + 5)
    assert depacketize(packets) == [sei, sps, pps, forbidden]
    low = h264.packetize([nal(0x06, 3), nal(0x21, 3)], 1200)[0]
    assert low[0] == 0x20 | 24


def test_stap_a_fills_exactly_to_max_payload() -> None:
    a, b = nal(0x67, 40), nal(0x68, 55)
    exact = 1 + 2 + 40 + 2 + 55
    assert len(h264.packetize([a, b], exact)) == 1
    # One byte less: two single NAL unit packets.
    assert h264.packetize([a, b], exact - 1) == [a, b]


def test_nalu_of_exactly_max_payload_is_sent_whole() -> None:
    unit = nal(0x65, 100)
    assert h264.packetize([unit], 100) == [unit]
    split = h264.packetize([unit], 99)
    assert len(split) == 2 and all(p[0] & 0x1F == 28 for p in split)


def test_fu_a_fragments() -> None:
    unit = nal(0x65, 3000)
    packets = h264.packetize([unit], 1000)
    # 2999 body bytes in 998-byte pieces: 4 fragments.
    assert [len(p) for p in packets] == [1000, 1000, 1000, 2 + 2999 - 3 * 998]
    assert all(p[0] == 0x60 | 28 for p in packets)
    assert [p[1] for p in packets] == [0x80 | 5, 5, 5, 0x40 | 5]
    assert depacketize(packets) == [unit]


def test_fu_a_two_fragments_have_start_and_end_only_once() -> None:
    packets = h264.packetize([nal(0x41, 11)], 7)
    assert [p[1] & 0xC0 for p in packets] == [0x80, 0x40]


def test_mixed_sequence_order_and_grouping() -> None:
    sps, pps, sei = nal(0x67, 20), nal(0x68, 5), nal(0x06, 30)
    idr, tail = nal(0x65, 2500), nal(0x65, 10)
    aud, filler = b"\x09\xf0", nal(0x0C, 40)
    packets = h264.packetize([aud, sps, pps, sei, idr, filler, tail], 1200)
    kinds = [p[0] & 0x1F for p in packets]
    assert kinds == [24, 28, 28, 28, 5]
    assert depacketize(packets) == [sps, pps, sei, idr, tail]
    assert all(len(p) <= 1200 for p in packets)


def test_only_aud_gives_no_packets() -> None:
    assert h264.packetize([b"\x09\xf0", b""], 1200) == []


def test_max_payload_too_small() -> None:
    with pytest.raises(ValueError) as info:
        h264.packetize([b"\x65\x00"], 2)
    assert str(info.value) == "max_payload must be at least 3, not 2"


def test_profile_level_id() -> None:
    assert h264.profile_level_id(b"\x67\x64\x00\x1f\xac") == "64001f"
    assert h264.profile_level_id(b"\x67\x42\xc0\x1e") == "42c01e"
    with pytest.raises(ValueError) as info:
        h264.profile_level_id(b"\x67\x42")
    assert str(info.value) == "SPS is 2 bytes, need at least 4 for profile-level-id"


SPS = (b"\x67\x64\x00\x1f",)
PPS = (b"\x68\xeb",)


def test_with_parameter_sets() -> None:
    sei, idr, slice_ = b"\x06\x05", b"\x65\x88", b"\x41\x9a"
    assert h264.with_parameter_sets([sei, idr], SPS, PPS) == [SPS[0], PPS[0], sei, idr]
    # Non-IDR access units are untouched.
    assert h264.with_parameter_sets([slice_], SPS, PPS) == [slice_]
    # Already carrying both: unchanged (in-band ones win).
    inband = [b"\x67\x42\x00\x1e", b"\x68\xce", idr]
    assert h264.with_parameter_sets(inband, SPS, PPS) == inband
    # Only the PPS missing: it goes right after the in-band SPS.
    assert h264.with_parameter_sets([inband[0], sei, idr], SPS, PPS) == [
        inband[0],
        PPS[0],
        sei,
        idr,
    ]
    assert h264.with_parameter_sets([inband[1], idr], SPS, PPS) == [SPS[0], inband[1], idr]


@pytest.fixture(scope="module")
def access_units(tmp_path_factory: pytest.TempPathFactory) -> list[list[bytes]]:
    path: Path = make_flv(tmp_path_factory.mktemp("h264") / "v.flv", size="640x360")
    units = []
    config: flv.AvcConfig | None = None
    for tag in read_flv_tags(path):
        if tag.kind != TAG_VIDEO:
            continue
        video = flv.parse_video_tag(tag.body)
        if video.packet_type is flv.AvcPacketType.SEQUENCE_HEADER:
            config = flv.parse_avc_config(video.data)
        elif video.packet_type is flv.AvcPacketType.NALU:
            assert config is not None
            nalus = flv.split_nalus(video.data, config.nalu_length_size)
            units.append(h264.with_parameter_sets(nalus, config.sps, config.pps))
    return units


@pytest.mark.parametrize("max_payload", [3, 100, 1200])
def test_real_access_units_round_trip(access_units: list[list[bytes]], max_payload: int) -> None:
    fragmented = 0
    aggregated = 0
    for unit in access_units:
        packets = h264.packetize(unit, max_payload)
        assert all(len(p) <= max_payload for p in packets)
        expected = [n for n in unit if n[0] & 0x1F not in (9, 12)]
        assert depacketize(packets) == expected
        fragmented += sum(p[0] & 0x1F == 28 for p in packets)
        aggregated += sum(p[0] & 0x1F == 24 for p in packets)
    assert fragmented > 0
    if max_payload == 1200:
        assert aggregated > 0  # SPS + PPS in front of each IDR


def _ue(value: int) -> str:
    code = bin(value + 1)[2:]
    return "0" * (len(code) - 1) + code


def _escape(rbsp: bytes) -> bytes:
    """Insert emulation-prevention bytes (H.264 7.4.1)."""
    out = bytearray()
    zeros = 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _slice(nal_header: int, first_mb: int, slice_type: int) -> bytes:
    bits = _ue(first_mb) + _ue(slice_type) + "1"  # then a stop bit
    bits += "0" * (-len(bits) % 8)
    rbsp = int(bits, 2).to_bytes(len(bits) // 8, "big")
    return bytes((nal_header,)) + _escape(rbsp)


@pytest.mark.parametrize(
    ("slice_type", "expected"),
    [(0, h264.SLICE_P), (5, h264.SLICE_P), (1, h264.SLICE_B), (6, h264.SLICE_B),
     (2, h264.SLICE_I), (7, h264.SLICE_I), (3, h264.SLICE_SP), (9, h264.SLICE_SI)],
)  # fmt: skip
def test_slice_type(slice_type: int, expected: int) -> None:
    assert h264.slice_type(_slice(0x01, 0, slice_type)) == expected
    assert h264.slice_type(_slice(0x65, 99, slice_type)) == expected


def test_slice_type_removes_emulation_prevention() -> None:
    # first_mb_in_slice = 2**22 - 1: 22 leading zero bits put 00 00 02 in the RBSP.
    nalu = _slice(0x21, 2**22 - 1, 1)
    assert b"\x00\x00\x03\x02" in nalu
    assert h264.slice_type(nalu) == h264.SLICE_B
    assert h264.unescape_rbsp(b"\x00\x00\x03\x01\x00\x00\x03") == b"\x00\x00\x01\x00\x00"


def test_slice_type_errors() -> None:
    with pytest.raises(ValueError, match="not a coded slice NALU"):
        h264.slice_type(b"\x67\x42")
    with pytest.raises(ValueError, match="slice header truncated"):
        h264.slice_type(b"\x41\x00")
    with pytest.raises(ValueError, match=r"slice_type 12 is out of range \(0-9\)"):
        h264.slice_type(_slice(0x41, 0, 12))


def test_picture_info() -> None:
    non_ref_b = _slice(0x01, 0, 6)  # nal_ref_idc 0
    ref_b = _slice(0x21, 0, 6)  # nal_ref_idc 1 (B-pyramid)
    p = _slice(0x41, 0, 5)
    assert h264.picture_info([b"\x09\xf0", non_ref_b]) == h264.PictureInfo(True, False)
    assert h264.picture_info([ref_b]) == h264.PictureInfo(True, True)
    assert h264.picture_info([p, p]) == h264.PictureInfo(False, True)
    assert h264.picture_info([b"\x06\x05", b"\x41\x00"]) is None  # SEI, unparsable slice
    assert h264.nal_ref_idc(b"\x65") == 3 and h264.nal_ref_idc(b"\x01") == 0


def test_split_annexb() -> None:
    stream = b"\x00\x00\x00\x01\x67\x42\x00\x00\x01\x68\xce\x00\x00\x00\x01\x65\x88\x00"
    assert h264.split_annexb(stream) == [b"\x67\x42", b"\x68\xce", b"\x65\x88\x00"]
    assert h264.split_annexb(b"no start code") == []
