"""Parse the RTCP a viewer sends us: reports and feedback (sans-I/O, strict framing).

Only what a send-only relay acts on is decoded: report blocks of SR/RR (RFC 3550
section 6.4), generic NACK (RFC 4585 section 6.2.1), PLI (RFC 4585 section 6.3.1),
FIR (RFC 5104 section 4.3.1) and REMB (draft-alvestrand-rmcat-remb). Every other
packet type is returned as `OtherPacket`. A compound packet whose framing does not
add up is rejected as a whole: after one bogus length nothing later can be trusted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_RTCP_SIZE = 1500
"""Largest (S)RTCP datagram accepted from a viewer, bytes; RTCP stays below the path MTU."""

RTCP_SR = 200
RTCP_RR = 201
RTCP_RTPFB = 205
RTCP_PSFB = 206
FMT_NACK = 1
FMT_PLI = 1
FMT_FIR = 4
FMT_AFB = 15
REMB_IDENTIFIER = b"REMB"
_REPORT_BLOCK = struct.Struct("!IB3sIIII")
_HEADER = struct.Struct("!BBH")


class RtcpError(ValueError):
    """The datagram is not valid RTCP; the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """One reception report about one of our SSRCs (RFC 3550 section 6.4.1)."""

    ssrc: int
    """The SSRC the report is about."""
    fraction_lost: int
    """Fraction lost since the previous report, in 1/256."""
    packets_lost: int
    """Cumulative packets lost (signed 24 bits)."""
    highest_sequence: int
    """Extended highest sequence number received."""
    jitter: int
    """Interarrival jitter, RTP timestamp units."""
    lsr: int
    """Middle 32 bits of the NTP timestamp of the last SR received; 0 if none."""
    dlsr: int
    """Delay since that SR, in 1/65536 s."""


@dataclass(frozen=True, slots=True)
class ReportPacket:
    """An SR or RR; only the report blocks matter to a sender."""

    sender_ssrc: int
    """SSRC of the reporting viewer."""
    reports: tuple[ReportBlock, ...]
    """Report blocks (at most 31)."""


@dataclass(frozen=True, slots=True)
class NackPacket:
    """Generic NACK: sequence numbers the viewer is missing."""

    sender_ssrc: int
    """SSRC of the viewer."""
    media_ssrc: int
    """The SSRC whose packets are missing."""
    seqs: tuple[int, ...]
    """Missing sequence numbers (16 bits, wrapped), in FCI order."""


@dataclass(frozen=True, slots=True)
class PliPacket:
    """Picture Loss Indication: the viewer needs a keyframe."""

    sender_ssrc: int
    """SSRC of the viewer."""
    media_ssrc: int
    """The video SSRC the request is about."""


@dataclass(frozen=True, slots=True)
class FirPacket:
    """Full Intra Request; the SSRCs asked for are in the FCI, not the header."""

    sender_ssrc: int
    """SSRC of the viewer."""
    entries: tuple[tuple[int, int], ...]
    """(media SSRC, command sequence number) per FCI entry."""


@dataclass(frozen=True, slots=True)
class RembPacket:
    """Receiver Estimated Maximum Bitrate."""

    sender_ssrc: int
    """SSRC of the viewer."""
    bitrate: int
    """Estimated total bitrate the viewer can receive, bits per second."""
    ssrcs: tuple[int, ...]
    """SSRCs the estimate applies to."""


@dataclass(frozen=True, slots=True)
class OtherPacket:
    """A well-framed RTCP packet we do not act on (SDES, BYE, transport-cc, XR, ...)."""

    packet_type: int
    """RTCP packet type (second byte)."""
    fmt: int
    """The five-bit count/format field."""


RtcpMessage = ReportPacket | NackPacket | PliPacket | FirPacket | RembPacket | OtherPacket


def _report_blocks(body: bytes, offset: int, count: int, what: str) -> tuple[ReportBlock, ...]:
    if len(body) < offset + count * _REPORT_BLOCK.size:
        raise RtcpError(f"RTCP {what} too short for {count} report blocks")
    blocks = []
    for i in range(count):
        ssrc, fraction, lost, highest, jitter, lsr, dlsr = _REPORT_BLOCK.unpack_from(
            body, offset + i * _REPORT_BLOCK.size
        )
        packets_lost = int.from_bytes(lost, "big", signed=True)
        blocks.append(ReportBlock(ssrc, fraction, packets_lost, highest, jitter, lsr, dlsr))
    return tuple(blocks)


def _nack(body: bytes) -> NackPacket:
    if len(body) < 12 or len(body) % 4:
        raise RtcpError("RTCP NACK FCI is missing or not a multiple of 4 bytes")
    sender, media = struct.unpack_from("!II", body)
    seqs: list[int] = []
    for pos in range(8, len(body), 4):
        pid, blp = struct.unpack_from("!HH", body, pos)
        seqs.append(pid)
        # RFC 4585 section 6.2.1: bit i of BLP reports pid + i + 1 lost.
        bit = 0
        while blp:
            if blp & 1:
                seqs.append((pid + bit + 1) & 0xFFFF)
            blp >>= 1
            bit += 1
    return NackPacket(sender, media, tuple(seqs))


def _psfb(fmt: int, body: bytes) -> RtcpMessage:
    if len(body) < 8:
        raise RtcpError("RTCP payload-specific feedback shorter than 8 bytes")
    sender, media = struct.unpack_from("!II", body)
    fci = body[8:]
    if fmt == FMT_PLI:
        return PliPacket(sender, media)
    if fmt == FMT_FIR:
        if not fci or len(fci) % 8:
            raise RtcpError("RTCP FIR FCI is not a multiple of 8 bytes")
        entries = tuple(
            (struct.unpack_from("!I", fci, pos)[0], fci[pos + 4]) for pos in range(0, len(fci), 8)
        )
        return FirPacket(sender, entries)
    if fmt == FMT_AFB and fci[:4] == REMB_IDENTIFIER:
        if len(fci) < 8:
            raise RtcpError("RTCP REMB shorter than its header")
        count = fci[4]
        if len(fci) < 8 + 4 * count:
            raise RtcpError(f"RTCP REMB too short for {count} SSRCs")
        exponent = fci[5] >> 2
        mantissa = ((fci[5] & 0x03) << 16) | (fci[6] << 8) | fci[7]
        ssrcs = struct.unpack_from(f"!{count}I", fci, 8)
        return RembPacket(sender, mantissa << exponent, ssrcs)
    return OtherPacket(RTCP_PSFB, fmt)


def parse_rtcp(data: bytes) -> list[RtcpMessage]:
    """Parse one decrypted compound RTCP packet; raises RtcpError on any framing error."""
    if len(data) > MAX_RTCP_SIZE:
        raise RtcpError(f"RTCP packet of {len(data)} bytes exceeds {MAX_RTCP_SIZE}")
    if len(data) < _HEADER.size:
        raise RtcpError("RTCP packet shorter than its 4-byte header")
    messages: list[RtcpMessage] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _HEADER.size:
            raise RtcpError(f"RTCP compound has {len(data) - pos} trailing bytes")
        first, packet_type, length = _HEADER.unpack_from(data, pos)
        if first >> 6 != 2:
            raise RtcpError(f"RTCP version {first >> 6} is not 2")
        end = pos + 4 + length * 4
        if end > len(data):
            raise RtcpError(
                f"RTCP length field says {length * 4 + 4} bytes, {len(data) - pos} left"
            )
        body = data[pos + 4 : end]
        pos = end
        if first & 0x20:
            # RFC 3550 section 6.4.1: the last octet counts the padding, itself included.
            pad = body[-1] if body else 0
            if pad == 0 or pad > len(body):
                raise RtcpError("RTCP padding count is invalid")
            body = body[:-pad]
        count = first & 0x1F
        if packet_type == RTCP_SR:
            if len(body) < 24:
                raise RtcpError("RTCP SR shorter than its sender info")
            sender = struct.unpack_from("!I", body)[0]
            messages.append(ReportPacket(sender, _report_blocks(body, 24, count, "SR")))
        elif packet_type == RTCP_RR:
            if len(body) < 4:
                raise RtcpError("RTCP RR has no sender SSRC")
            sender = struct.unpack_from("!I", body)[0]
            messages.append(ReportPacket(sender, _report_blocks(body, 4, count, "RR")))
        elif packet_type == RTCP_RTPFB and count == FMT_NACK:
            messages.append(_nack(body))
        elif packet_type == RTCP_PSFB:
            messages.append(_psfb(count, body))
        elif 192 <= packet_type <= 223:
            messages.append(OtherPacket(packet_type, count))
        else:
            raise RtcpError(f"RTCP packet type {packet_type} is outside 192..223")
    return messages
