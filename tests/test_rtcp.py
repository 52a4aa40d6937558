from __future__ import annotations

import random
import struct

import pytest
from aiortc.rtp import (
    RtcpByePacket,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSenderInfo,
    RtcpSrPacket,
    pack_remb_fci,
)

from srsrelay.webrtc.rtcp import (
    MAX_RTCP_SIZE,
    FirPacket,
    NackPacket,
    OtherPacket,
    PliPacket,
    RembPacket,
    ReportBlock,
    ReportPacket,
    RtcpError,
    parse_rtcp,
)


def _info(ssrc: int, lost: int = -2) -> RtcpReceiverInfo:
    return RtcpReceiverInfo(
        ssrc=ssrc,
        fraction_lost=64,
        packets_lost=lost,
        highest_sequence=70000,
        jitter=9,
        lsr=0x12345678,
        dlsr=0x00010000,
    )


def test_receiver_and_sender_reports() -> None:
    rr = bytes(RtcpRrPacket(ssrc=7, reports=[_info(11), _info(12, lost=5)]))
    sender_info = RtcpSenderInfo(ntp_timestamp=1, rtp_timestamp=2, packet_count=3, octet_count=4)
    sr = bytes(RtcpSrPacket(ssrc=8, sender_info=sender_info, reports=[_info(13)]))
    messages = parse_rtcp(rr + sr)
    assert messages == [
        ReportPacket(
            7,
            (
                ReportBlock(11, 64, -2, 70000, 9, 0x12345678, 0x10000),
                ReportBlock(12, 64, 5, 70000, 9, 0x12345678, 0x10000),
            ),
        ),
        ReportPacket(8, (ReportBlock(13, 64, -2, 70000, 9, 0x12345678, 0x10000),)),
    ]


def test_nack_bitmask_and_wraparound() -> None:
    # pid 65534, BLP bits 0 and 2: 65535 and 1 (wrapped) are lost too.
    fci = struct.pack("!HH", 65534, 0b101) + struct.pack("!HH", 10, 0)
    body = struct.pack("!II", 1, 2) + fci
    packet = struct.pack("!BBH", 0x81, 205, len(body) // 4) + body
    assert parse_rtcp(packet) == [NackPacket(1, 2, (65534, 65535, 1, 10))]


def test_nack_as_aiortc_builds_it() -> None:
    lost = [100, 101, 116, 117, 300]
    packet = bytes(RtcpRtpfbPacket(fmt=1, ssrc=5, media_ssrc=6, lost=lost))
    assert parse_rtcp(packet) == [NackPacket(5, 6, tuple(lost))]


def test_pli_fir_remb_and_others() -> None:
    pli = bytes(RtcpPsfbPacket(fmt=1, ssrc=5, media_ssrc=6))
    fir_fci = struct.pack("!IB3x", 6, 9) + struct.pack("!IB3x", 77, 1)
    fir = bytes(RtcpPsfbPacket(fmt=4, ssrc=5, media_ssrc=0, fci=fir_fci))
    remb = bytes(RtcpPsfbPacket(fmt=15, ssrc=5, media_ssrc=0, fci=pack_remb_fci(750_000, [6])))
    tcc = bytes(RtcpRtpfbPacket(fmt=15, ssrc=5, media_ssrc=6))
    bye = bytes(RtcpByePacket(sources=[5]))
    messages = parse_rtcp(pli + fir + remb + tcc + bye)
    assert messages[0] == PliPacket(5, 6)
    assert messages[1] == FirPacket(5, ((6, 9), (77, 1)))
    remb_message = messages[2]
    assert isinstance(remb_message, RembPacket) and remb_message.ssrcs == (6,)
    assert abs(remb_message.bitrate - 750_000) / 750_000 < 0.001  # mantissa rounding
    assert messages[3:] == [OtherPacket(205, 15), OtherPacket(203, 1)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\xc9\x00", "RTCP packet shorter than its 4-byte header"),
        (b"\x40\xc9\x00\x01" + bytes(4), "RTCP version 1 is not 2"),
        (b"\x80\xc9\x00\x07" + bytes(4), "RTCP length field says 32 bytes, 8 left"),
        (b"\x80\xc9\x00\x01" + bytes(4) + b"\x80\xc9", "RTCP compound has 2 trailing bytes"),
        (b"\x81\xc9\x00\x01" + bytes(4), "RTCP RR too short for 1 report blocks"),
        (b"\x80\xc8\x00\x01" + bytes(4), "RTCP SR shorter than its sender info"),
        (b"\x80\xc9\x00\x00", "RTCP RR has no sender SSRC"),
        (b"\xa0\xc9\x00\x01" + bytes(4), "RTCP padding count is invalid"),
        (b"\xa0\xc9\x00\x01\x00\x00\x00\x05", "RTCP padding count is invalid"),
        (b"\x81\xcd\x00\x02" + bytes(8), "RTCP NACK FCI is missing or not a multiple of 4 bytes"),
        (b"\x81\xce\x00\x01" + bytes(4), "RTCP payload-specific feedback shorter than 8 bytes"),
        (b"\x84\xce\x00\x03" + bytes(12), "RTCP FIR FCI is not a multiple of 8 bytes"),
        (b"\x8f\xce\x00\x03" + bytes(8) + b"REMB", "RTCP REMB shorter than its header"),
        (
            b"\x8f\xce\x00\x04" + bytes(8) + b"REMB\x02\x00\x00\x01",
            "RTCP REMB too short for 2 SSRCs",
        ),
        (b"\x80\x48\x00\x01" + bytes(4), "RTCP packet type 72 is outside 192..223"),
        (
            b"\x80\xc9" + struct.pack("!H", 400) + bytes(1600),
            f"RTCP packet of 1604 bytes exceeds {MAX_RTCP_SIZE}",
        ),
    ],
)
def test_bad_framing_is_rejected_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(RtcpError, match=f"^{message}$"):
        parse_rtcp(data)


def test_valid_rr_then_bogus_length_rejects_the_whole_compound() -> None:
    rr = bytes(RtcpRrPacket(ssrc=7, reports=[_info(11)]))
    with pytest.raises(RtcpError, match="length field"):
        parse_rtcp(rr + b"\x81\xcd\xff\xff" + bytes(12))


def test_garbage_only_ever_raises_rtcp_error() -> None:
    rng = random.Random(1234)
    valid = bytes(RtcpRrPacket(ssrc=7, reports=[_info(11)])) + bytes(
        RtcpRtpfbPacket(fmt=1, ssrc=5, media_ssrc=6, lost=[1, 2, 40])
    )
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randint(0, len(data))] if rng.random() < 0.3 else data
        try:
            parse_rtcp(bytes(data))
            outcomes["ok"] += 1
        except RtcpError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0
