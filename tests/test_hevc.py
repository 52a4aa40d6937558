"""RFC 7798 packetization and the HEVCDecoderConfigurationRecord, checked against real
x265 output and FFmpeg's HEVC decoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from srsrelay.hub import hevc
from srsrelay.rtmp import flv
from srsrelay.rtmp.flv import AvcPacketType, FlvError
from tests.test_flv import TAG_VIDEO, make_enhanced_flv, read_flv_tags


@dataclass(frozen=True)
class Encoded:
    record: bytes
    """The HEVCDecoderConfigurationRecord FFmpeg wrote into the 'hvc1' SequenceStart."""
    units: list[list[bytes]]
    """Access units (NAL units) in decode order."""


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> Encoded:
    # x265 defaults: B-frames, open GOP (CRA pictures), keyframe every 10 frames.
    path = make_enhanced_flv(
        tmp_path_factory.mktemp("hevc") / "hevc.flv",
        "libx265",
        {"x265-params": "log-level=error:keyint=10"},
    )
    tags = [flv.parse_video_tag(t.body) for t in read_flv_tags(path) if t.kind == TAG_VIDEO]
    assert tags[0].packet_type is AvcPacketType.SEQUENCE_HEADER
    length_size = hevc.parse_hevc_config(tags[0].data).nalu_length_size
    units = [
        flv.split_nalus(t.data, length_size) for t in tags if t.packet_type is AvcPacketType.NALU
    ]
    return Encoded(tags[0].data, units)


def depacketize(payloads: Sequence[bytes]) -> list[bytes]:
    """Receiver side of RFC 7798 without DONL, strict about S/E bits and header fields."""
    nals: list[bytes] = []
    fragment: bytearray | None = None
    for payload in payloads:
        assert len(payload) >= 3
        assert not payload[0] & 0x80, "F bit set"
        kind = (payload[0] >> 1) & 0x3F
        layer_tid = bytes((payload[0] & 0x01, payload[1]))
        if kind == 48:
            assert fragment is None
            pos = 2
            count = 0
            while pos < len(payload):
                size = int.from_bytes(payload[pos : pos + 2], "big")
                assert size >= 2 and pos + 2 + size <= len(payload)
                nals.append(payload[pos + 2 : pos + 2 + size])
                pos += 2 + size
                count += 1
            assert count >= 2, "an aggregation packet carries at least two NAL units"
        elif kind == 49:
            fu = payload[2]
            start, end, fu_type = bool(fu & 0x80), bool(fu & 0x40), fu & 0x3F
            assert not (start and end), "a NAL unit that fits is not fragmented"
            if start:
                assert fragment is None
                fragment = bytearray(((fu_type << 1) | layer_tid[0], layer_tid[1]))
            else:
                assert fragment is not None, "FU continuation without start"
                assert (fragment[0] >> 1) & 0x3F == fu_type
            fragment += payload[3:]
            if end:
                nals.append(bytes(fragment))
                fragment = None
        else:
            assert fragment is None
            assert kind < 48
            nals.append(payload)
    assert fragment is None, "FU without end"
    return nals


def decode(units: Sequence[Sequence[bytes]]) -> list[Any]:
    """Decode Annex B access units with FFmpeg's HEVC decoder (parameter sets must be
    in-band: no extradata is given)."""
    av = pytest.importorskip("av")
    context = av.CodecContext.create("hevc", "r")
    frames: list[Any] = []
    for unit in units:
        for packet in context.parse(b"".join(b"\x00\x00\x00\x01" + n for n in unit)):
            frames.extend(context.decode(packet))
    for packet in context.parse(b""):
        frames.extend(context.decode(packet))
    frames.extend(context.decode(None))
    return frames


def test_parse_real_record(encoded: Encoded) -> None:
    config = hevc.parse_hevc_config(encoded.record)
    assert config.nalu_length_size == 4
    assert [hevc.nal_type(n) for n in config.vps] == [hevc.NAL_VPS]
    assert [hevc.nal_type(n) for n in config.sps] == [hevc.NAL_SPS]
    assert [hevc.nal_type(n) for n in config.pps] == [hevc.NAL_PPS]
    # yuv420p 8-bit: Main profile, Main tier; the SPS profile_tier_level agrees.
    assert config.general_profile_space == 0
    assert config.general_tier_flag == 0
    assert config.general_profile_idc == 1
    sps = config.sps[0]
    assert sps[3] == encoded.record[1]  # profile_space/tier/profile_idc byte
    assert sps[3] & 0x1F == config.general_profile_idc
    assert config.general_level_idc == encoded.record[12]
    assert 30 <= config.general_level_idc <= 93  # 320x240 at 25 fps: level 1 .. 3.1
    assert hevc.fmtp(config) == (
        f"profile-space=0;tier-flag=0;profile-id=1;level-id={config.general_level_idc}"
    )


@pytest.mark.parametrize("payload_size", [1200, 300, 60])
def test_packetize_round_trip_decodes(encoded: Encoded, payload_size: int) -> None:
    config = hevc.parse_hevc_config(encoded.record)
    sent: list[list[bytes]] = []
    kinds: set[int] = set()
    for unit in encoded.units:
        unit = hevc.with_parameter_sets(unit, config)
        payloads = hevc.packetize(unit, payload_size)
        assert payloads and all(len(p) <= payload_size for p in payloads)
        kinds.update((p[0] >> 1) & 0x3F for p in payloads)
        received = depacketize(payloads)
        assert received == unit
        sent.append(received)
    assert 49 in kinds  # slices of a 320x240 IRAP picture need fragmenting
    if payload_size == 1200:
        assert 48 in kinds  # VPS + SPS + PPS (+ SEI) aggregate
    frames = decode(sent)
    assert len(frames) == len(encoded.units) == 30
    # The pixels are those of decoding the unpacketized stream.
    reference = decode([hevc.with_parameter_sets(u, config) for u in encoded.units])
    assert [f.to_ndarray().tobytes() for f in frames] == [
        f.to_ndarray().tobytes() for f in reference
    ]


def test_viewer_joining_at_a_later_keyframe_can_decode(encoded: Encoded) -> None:
    config = hevc.parse_hevc_config(encoded.record)
    keys = [i for i, unit in enumerate(encoded.units) if hevc.is_irap(unit)]
    assert keys[0] == 0 and len(keys) >= 3
    later = encoded.units[keys[2] :]
    assert decode(later) == []  # FLV keeps parameter sets out of band
    units = [hevc.with_parameter_sets(u, config) for u in later]
    assert [hevc.nal_type(n) for n in units[0][:3]] == [32, 33, 34]
    packets = [depacketize(hevc.packetize(u, 300)) for u in units]
    assert len(decode(packets)) >= len(later) - 2  # open GOP: leading pictures may drop


def nal(kind: int, size: int, *, layer_id: int = 0, tid: int = 1) -> bytes:
    header = (kind << 9) | (layer_id << 3) | tid
    return header.to_bytes(2, "big") + bytes((i * 7 + kind) & 0xFF for i in range(size - 2))


def test_single_small_nal_unit_is_not_aggregated() -> None:
    unit = nal(19, 50)
    assert hevc.packetize([unit], 1200) == [unit]


def test_aggregation_packet_layout_and_header() -> None:
    vps, sps, pps = nal(32, 20, tid=2), nal(33, 40, layer_id=3, tid=1), nal(34, 8, tid=3)
    (payload,) = hevc.packetize([vps, sps, pps], 1200)
    # Type 48; LayerId and TID are the lowest among the aggregated units (RFC 7798 4.4.2).
    assert payload[:2] == ((48 << 9) | (0 << 3) | 1).to_bytes(2, "big")
    assert payload[2:] == b"".join(len(n).to_bytes(2, "big") + n for n in (vps, sps, pps))


def test_aggregation_splits_when_full() -> None:
    units = [nal(1, 40) for _ in range(5)]
    payloads = hevc.packetize(units, 2 + 3 * 42)
    assert [len(p) for p in payloads] == [2 + 3 * 42, 2 + 2 * 42]
    assert depacketize(payloads) == units


def test_fragmentation_unit_headers() -> None:
    unit = nal(19, 1000, layer_id=5, tid=2)
    payloads = hevc.packetize([unit], 400)
    assert len(payloads) == 3  # 998 body bytes, 397 per fragment
    for index, payload in enumerate(payloads):
        assert len(payload) <= 400
        # PayloadHdr: type 49, LayerId and TID copied from the NAL unit.
        assert payload[:2] == ((49 << 9) | (5 << 3) | 2).to_bytes(2, "big")
        start, end = index == 0, index == len(payloads) - 1
        assert payload[2] == (0x80 if start else 0) | (0x40 if end else 0) | 19
    assert b"".join(p[3:] for p in payloads) == unit[2:]
    assert depacketize(payloads) == [unit]


def test_fragment_boundary_exactly_payload_size() -> None:
    fits = nal(1, 100)
    assert hevc.packetize([fits], 100) == [fits]
    too_big = nal(1, 101)
    payloads = hevc.packetize([too_big], 100)
    assert [len(p) for p in payloads] == [100, 5]  # 99 body bytes: 97 + 2
    assert hevc.packetize([nal(1, 5)], hevc.MIN_PAYLOAD_SIZE) == [
        bytes((49 << 1, 1, 0x80 | 1, 1)),
        bytes((49 << 1, 1, 1, 8)),
        bytes((49 << 1, 1, 0x40 | 1, 15)),
    ]


def test_aud_filler_and_stubs_are_dropped() -> None:
    slice_ = nal(1, 30)
    assert hevc.packetize([nal(35, 3), b"", b"\x02", slice_, nal(38, 10)], 1200) == [slice_]
    assert hevc.packetize([nal(35, 3)], 1200) == []


def test_packetize_rejects_tiny_payload_size() -> None:
    with pytest.raises(ValueError) as info:
        hevc.packetize([nal(1, 10)], 3)
    assert str(info.value) == "payload_size must be at least 4, not 3"


def test_nal_type_and_irap() -> None:
    assert hevc.nal_type(b"\x40\x01") == 32
    assert hevc.nal_type(b"\x26\x01") == 19
    assert hevc.is_irap([nal(35, 3), nal(21, 10)])
    assert hevc.is_irap([nal(16, 3)]) and hevc.is_irap([nal(23, 3)])
    assert not hevc.is_irap([nal(1, 10), nal(0, 10), nal(24, 3), nal(33, 5)])
    assert not hevc.is_irap([])


CONFIG = hevc.HevcConfig(
    nalu_length_size=4,
    vps=(nal(32, 10),),
    sps=(nal(33, 20),),
    pps=(nal(34, 6), nal(34, 7)),
    general_profile_space=0,
    general_tier_flag=0,
    general_profile_idc=1,
    general_level_idc=93,
)


def test_with_parameter_sets() -> None:
    aud, sei, idr, trail = nal(35, 3), nal(39, 8), nal(19, 40), nal(1, 30)
    vps, sps, pps = CONFIG.vps[0], CONFIG.sps[0], CONFIG.pps
    assert hevc.with_parameter_sets([idr], CONFIG) == [vps, sps, *pps, idr]
    # After a leading AUD (it must stay first in the access unit).
    assert hevc.with_parameter_sets([aud, sei, idr], CONFIG) == [aud, vps, sps, *pps, sei, idr]
    # Non-IRAP units are unchanged.
    assert hevc.with_parameter_sets([trail], CONFIG) == [trail]
    # Kinds already present are kept; the missing ones are slotted in order.
    own_sps = nal(33, 25)
    assert hevc.with_parameter_sets([own_sps, idr], CONFIG) == [vps, own_sps, *pps, idr]
    own_vps, own_pps = nal(32, 12), nal(34, 9)
    assert hevc.with_parameter_sets([aud, own_vps, own_pps, idr], CONFIG) == [
        aud,
        own_vps,
        sps,
        own_pps,
        idr,
    ]
    complete = [own_vps, own_sps, own_pps, idr]
    assert hevc.with_parameter_sets(complete, CONFIG) == complete


def record(
    arrays: Sequence[tuple[int, Sequence[bytes]]],
    *,
    length_size: int = 4,
    version: int = 1,
    profile_byte: int = 0x01,
    level: int = 93,
) -> bytes:
    out = bytes((version, profile_byte)) + b"\x60\x00\x00\x00" + bytes(6) + bytes((level,))
    out += b"\xf0\x00\xfc\xfd\xf8\xf8\x00\x00" + bytes((0x0C | (length_size - 1), len(arrays)))
    for kind, units in arrays:
        out += bytes((0x80 | kind,)) + len(units).to_bytes(2, "big")
        for unit in units:
            out += len(unit).to_bytes(2, "big") + unit
    return out


VPS, SPS, PPS, SEI = nal(32, 10), nal(33, 20), nal(34, 6), nal(39, 5)
GOOD = [(32, [VPS]), (33, [SPS]), (34, [PPS])]


def test_parse_record_fields() -> None:
    config = hevc.parse_hevc_config(
        record([(39, [SEI]), *GOOD], length_size=2, profile_byte=0x62, level=120)
    )
    assert config == hevc.HevcConfig(
        nalu_length_size=2,
        vps=(VPS,),
        sps=(SPS,),
        pps=(PPS,),
        general_profile_space=1,
        general_tier_flag=1,
        general_profile_idc=2,
        general_level_idc=120,
    )
    assert hevc.fmtp(config) == "profile-space=1;tier-flag=1;profile-id=2;level-id=120"
    two = hevc.parse_hevc_config(record([(32, [VPS]), (33, [SPS, SPS]), (34, [PPS, VPS])]))
    assert two.sps == (SPS, SPS) and two.pps == (PPS, VPS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x01", "HEVC sequence header truncated: need 23 bytes, got 2"),
        (record(GOOD, version=0), "HEVC sequence header has version 0, expected 1"),
        (
            record(GOOD, length_size=3),
            "HEVC sequence header has NALU length size 3 (must be 1, 2 or 4)",
        ),
        (
            record(GOOD)[:24],
            "HEVC sequence header truncated: array 1 header at offset 23, got 24 bytes",
        ),
        (
            record(GOOD)[:27],
            "HEVC sequence header truncated: array 1 NAL unit 1 length at offset 26, got 27 bytes",
        ),
        (
            record(GOOD)[:30],
            "HEVC sequence header truncated: array 1 NAL unit 1 needs 10 bytes at offset 28, got 2",
        ),
        (
            record([(32, [b"\x40"]), (33, [SPS]), (34, [PPS])]),
            "HEVC sequence header: array 1 NAL unit 1 is 1 bytes, shorter than the 2-byte NAL "
            "unit header",
        ),
        (record([(33, [SPS]), (34, [PPS])]), "HEVC sequence header has no VPS"),
        (record([(32, [VPS]), (33, []), (34, [PPS])]), "HEVC sequence header has no SPS"),
        (record([(32, [VPS]), (33, [SPS]), (39, [SEI])]), "HEVC sequence header has no PPS"),
    ],
)  # fmt: skip
def test_parse_record_errors(data: bytes, message: str) -> None:
    with pytest.raises(FlvError) as info:
        hevc.parse_hevc_config(data)
    assert str(info.value) == message


def test_depacketizer_is_strict() -> None:
    # It rejects what RFC 7798 forbids, so the round trips above can fail.
    with pytest.raises(AssertionError):
        depacketize([bytes((49 << 1, 1, 0x40 | 1, 0))])  # FU end without start
    with pytest.raises(AssertionError):
        depacketize([bytes((48 << 1, 1, 0, 3)) + nal(1, 3)])  # AP with one unit
