"""One WebRTC viewer: rewrites the stream's RTP headers, protects with SRTP, sends.

Frames arrive already packetized (once per stream); per viewer we only write a
12-byte RTP header (RFC 3550 section 5.1) with this viewer's SSRC, sequence number,
timestamp offset and payload type, apply SRTP and hand the datagram to the send path.

RTCP from the viewer is answered inline: NACKs from the packet history (nack.py),
PLI/FIR from the cached GOP or the next IDR (keyframe.py); reports, NACKs, REMB and
send drops drive the congestion state (congestion.py), which drops whole video frames.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pylibsrtp
import structlog
from aiortc import RTCCertificate

from srsrelay.config import RtcConfig
from srsrelay.hub.frames import AUDIO_CLOCK_RATE, VIDEO_CLOCK_RATE, MediaKind, RtpFrame
from srsrelay.hub.timeline import ArrivalAnchor
from srsrelay.webrtc.congestion import CongestionMonitor, CongestionState
from srsrelay.webrtc.dtls import RTP_HEADER, DtlsSrtp, sha256_fingerprint
from srsrelay.webrtc.ice import IceSession
from srsrelay.webrtc.keyframe import KeyframeAnswer, KeyframeRequests
from srsrelay.webrtc.latency import LatencyHistogram
from srsrelay.webrtc.nack import (
    RTP_HEADER_SIZE,
    NackResponder,
    PacketHistory,
    rtp_packet,
    rtx_packet,
)
from srsrelay.webrtc.rtcp import (
    MAX_RTCP_SIZE,
    FirPacket,
    NackPacket,
    PliPacket,
    RembPacket,
    ReportPacket,
    RtcpError,
    parse_rtcp,
)
from srsrelay.webrtc.sdp import AnswerParams, Offer, build_answer
from srsrelay.webrtc.sendpath import MAX_BATCH, SendCounters, SendOutcome, SendPath, TrafficKind

log = structlog.get_logger(__name__)

HOUSEKEEPING_INTERVAL = 0.25
"""Seconds between checks of the DTLS/consent timeouts and Sender Report timing."""
SR_INTERVAL = 1.0
"""Seconds between two RTCP Sender Reports of a track (RFC 3550 section 6.2)."""
SR_STARTUP = 2.0
"""Seconds after DTLS completes during which SRs go out every HOUSEKEEPING_INTERVAL."""
CATCHUP_TICK = 0.005
"""Shortest sleep between two sends of cached GOP frames to a new viewer, seconds."""
NTP_EPOCH_OFFSET = 2_208_988_800
"""Seconds from 1900-01-01 (NTP epoch) to 1970-01-01 (Unix epoch)."""
RTCP_SR = 200
RTCP_SDES = 202
RTCP_BYE = 203


class FrameReader(Protocol):
    """What the hub calls on its readers (the hub's StreamReader)."""

    def on_frame(self, frame: RtpFrame) -> None: ...

    def on_stream_end(self) -> None: ...


class GopView(Protocol):
    """The part of the hub's GOP cache a viewer reads."""

    @property
    def generation(self) -> int: ...

    @property
    def frames(self) -> Sequence[RtpFrame]: ...

    @property
    def truncated(self) -> bool: ...


class StreamSource(Protocol):
    """The part of the hub's Stream a viewer needs."""

    @property
    def key(self) -> str: ...

    @property
    def profile_level_id(self) -> str | None: ...

    @property
    def video_codec(self) -> str: ...

    @property
    def video_fmtp(self) -> str: ...

    @property
    def rendition(self) -> StreamSource | None: ...

    @property
    def arrival(self) -> ArrivalAnchor: ...

    @property
    def has_video(self) -> bool: ...

    @property
    def has_audio(self) -> bool: ...

    @property
    def gop(self) -> GopView: ...

    def add_reader(self, reader: FrameReader) -> None: ...

    def remove_reader(self, reader: FrameReader) -> None: ...


_VIDEO = MediaKind.VIDEO
_MEDIA = TrafficKind.MEDIA
_SENT = SendOutcome.SENT
_CONGESTED = CongestionState.CONGESTED


class SessionState(enum.Enum):
    NEW = "new"
    """Answer sent, no valid STUN request yet."""
    CONNECTING = "connecting"
    """ICE has a remote address; DTLS handshake running."""
    CONNECTED = "connected"
    """SRTP keys ready; media flows."""
    CLOSED = "closed"


_CONNECTED = SessionState.CONNECTED


def _random_ssrc() -> int:
    return secrets.randbelow(0xFFFFFFFF) + 1


class TrackSender:
    """RTP header state of one outgoing track of one viewer, and what it sent."""

    def __init__(self, kind: MediaKind, payload_type: int, history_size: int = 512) -> None:
        self.kind = kind
        self.payload_type = payload_type
        self.clock_rate = VIDEO_CLOCK_RATE if kind is MediaKind.VIDEO else AUDIO_CLOCK_RATE
        self.ssrc = _random_ssrc()
        self.seq = secrets.randbits(16)
        """Next sequence number."""
        self.ts_offset = secrets.randbits(32)
        """Added to the stream's RTP timestamps (RFC 3550 section 5.1: random start)."""
        self.packets = 0
        """RTP packets sent (for SR)."""
        self.octets = 0
        """RTP payload octets sent (for SR)."""
        self.history = PacketHistory(history_size)
        """The last packets, for NACKs (a reference to each payload, not a copy)."""

    def packet(self, payload: bytes, timestamp: int, marker: bool) -> bytes:
        """The plain RTP packet of `payload` (sent frames use `ViewerSession._send_frame`,
        which builds the same header straight into the SRTP buffer)."""
        seq = self.seq
        wire_timestamp = (timestamp + self.ts_offset) & 0xFFFFFFFF
        second = (0x80 if marker else 0) | self.payload_type
        self.history.put(seq, payload, wire_timestamp, marker)
        self.seq = (seq + 1) & 0xFFFF
        self.packets += 1
        self.octets += len(payload)
        return RTP_HEADER.pack(0x80, second, seq, wire_timestamp, self.ssrc) + payload


@dataclass(slots=True)
class ReceiverReport:
    """The viewer's last report block about one of our tracks (RFC 3550 section 6.4.2)."""

    fraction_lost: int
    """Fraction lost since the previous report, in 1/256."""
    packets_lost: int
    """Cumulative packets lost."""
    highest_sequence: int
    """Extended highest sequence number received."""
    jitter: int
    """Interarrival jitter, RTP timestamp units."""
    at: float
    """Monotonic time the report arrived."""


@dataclass(slots=True)
class RtcpCounters:
    """RTCP received from the viewer."""

    packets: int = 0
    """SRTCP datagrams authenticated, decrypted and parsed."""
    undecryptable: int = 0
    """SRTCP datagrams that failed authentication or arrived before the keys."""
    oversized: int = 0
    """Datagrams longer than MAX_RTCP_SIZE, dropped unread."""
    malformed: int = 0
    """Decrypted datagrams that did not parse as RTCP (bad framing, truncated)."""
    unknown_ssrc: int = 0
    """Feedback or report blocks about an SSRC that is not ours."""
    receiver_reports: int = 0
    """RR (or SR) packets."""
    nacks: int = 0
    """Generic NACK packets (RFC 4585 section 6.2.1)."""
    nacked_packets: int = 0
    """Sequence numbers asked for in NACKs."""
    plis: int = 0
    """Picture Loss Indications."""
    firs: int = 0
    """Full Intra Requests (RFC 5104)."""
    rembs: int = 0
    """Receiver Estimated Max Bitrate messages."""
    last_remb: int = 0
    """Bitrate of the latest REMB, bits per second."""
    rtp_dropped: int = 0
    """RTP datagrams from the viewer (we receive no media)."""


def _ntp_timestamp(wallclock: float) -> int:
    seconds = wallclock + NTP_EPOCH_OFFSET
    return (int(seconds) << 32) | int((seconds % 1.0) * (1 << 32))


def sender_report(track: TrackSender, ntp: int, rtp_timestamp: int, cname: str) -> bytes:
    """A compound RTCP packet: SR (RFC 3550 section 6.4.1) followed by SDES CNAME."""
    sr = struct.pack(
        "!BBHIIIIII",
        0x80,
        RTCP_SR,
        6,
        track.ssrc,
        ntp >> 32,
        ntp & 0xFFFFFFFF,
        rtp_timestamp & 0xFFFFFFFF,
        track.packets & 0xFFFFFFFF,
        track.octets & 0xFFFFFFFF,
    )
    name = cname.encode()[:255]
    chunk = struct.pack("!IBB", track.ssrc, 1, len(name)) + name
    chunk += b"\x00" * (4 - len(chunk) % 4)  # null item ends the chunk, pad to 32 bits
    sdes = struct.pack("!BBH", 0x81, RTCP_SDES, len(chunk) // 4) + chunk
    return sr + sdes


def bye(ssrcs: Sequence[int]) -> bytes:
    """An RTCP BYE for `ssrcs` (RFC 3550 section 6.6)."""
    return struct.pack(f"!BBH{len(ssrcs)}I", 0x80 | len(ssrcs), RTCP_BYE, len(ssrcs), *ssrcs)


class ViewerSession:
    """ICE, DTLS-SRTP and RTP sending for one viewer of one stream."""

    def __init__(
        self,
        *,
        stream: StreamSource,
        offer: Offer,
        config: RtcConfig,
        send_path: SendPath,
        certificate: RTCCertificate,
        port: int,
        on_closed: Callable[[ViewerSession], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        latency: dict[MediaKind, LatencyHistogram] | None = None,
    ) -> None:
        self.id = secrets.token_hex(8)
        self._latency = latency
        """Shared with every viewer of the server: arrival to last packet sent, per kind."""
        self._video_latency = latency.get(MediaKind.VIDEO) if latency else None
        self._audio_latency = latency.get(MediaKind.AUDIO) if latency else None
        self.stream = stream
        self.offer = offer
        self.config = config
        self._send_path = send_path
        self._on_closed = on_closed
        self._clock = clock
        self._wallclock = wallclock
        self.ice = IceSession(remote_ufrag=offer.ice_ufrag)
        self.counters = SendCounters(self.id, clock=clock)
        self.bytes_received = 0
        """Bytes of the STUN, DTLS, RTCP (and stray RTP) datagrams this viewer sent us."""
        self.rtcp = RtcpCounters()
        self.receiver_reports: dict[MediaKind, ReceiverReport] = {}
        """Last report block per track (at most one per track)."""
        history = config.nack_history
        self.video = (
            TrackSender(MediaKind.VIDEO, offer.video.payload_type, history) if offer.video else None
        )
        self.audio = (
            TrackSender(MediaKind.AUDIO, offer.audio.payload_type, history) if offer.audio else None
        )
        self._tracks = {t.ssrc: t for t in (self.video, self.audio) if t is not None}
        # RFC 4588: retransmissions on their own SSRC and sequence numbers, when offered.
        self.rtx_payload_type = offer.video.rtx_payload_type if offer.video else None
        self.rtx_ssrc = _random_ssrc() if self.rtx_payload_type is not None else None
        self._rtx_seq = secrets.randbits(16)
        self.nack = NackResponder(config.retransmit_budget, rtx=self.rtx_ssrc is not None)
        self.keyframes = KeyframeRequests(
            config.keyframe_request_interval, config.keyframe_cache_age
        )
        self.congestion = CongestionMonitor(
            config.congestion_loss, config.overload_timeout, clock()
        )
        self.frames_dropped: dict[str, int] = {
            "congestion": 0,
            "blocked": 0,
            "broken": 0,
            "awaiting_keyframe": 0,
        }
        """Video frames not sent, by reason (a frame whose send failed midway is "broken")."""
        self.srtp_refused = 0
        """Retransmissions libsrtp refused to protect (index outside its window)."""
        self._media_drops_seen = 0
        self.cname = secrets.token_hex(8)
        self.answer_sdp = build_answer(
            offer,
            AnswerParams(
                ice_ufrag=self.ice.ufrag,
                ice_pwd=self.ice.pwd,
                fingerprint=sha256_fingerprint(certificate),
                candidates=config.candidates,
                port=port,
                video_ssrc=self.video.ssrc if self.video else _random_ssrc(),
                audio_ssrc=self.audio.ssrc if self.audio else _random_ssrc(),
                cname=self.cname,
                stream_id=secrets.token_hex(8),
                video_rtx_ssrc=self.rtx_ssrc,
            ),
        )
        self._dtls = DtlsSrtp(
            certificate,
            lambda data: self._send(data, TrafficKind.DTLS),
            on_closed=lambda: self.close_soon("dtls closed by viewer"),
        )
        self._state = SessionState.NEW
        self._created_at = clock()
        self._catching_up = False
        self._catchup_restart = False
        self._need_keyframe = True
        # The last video RTP timestamp on the wire and when it was sent (monotonic): the
        # catch-up stamps cached frames on this clock so it never goes backwards.
        self._video_wire: tuple[int, float] | None = None
        self._sent_at = 0.0
        """When the last frame was handed to the send path (the viewer's clock)."""
        # Tracks that have had a frame (SRs are sent only for those).
        self._seen: set[MediaKind] = set()
        self._last_sr = 0.0
        self._connected_at = 0.0
        self._housekeeping_task: asyncio.Task[None] | None = None
        self._dtls_task: asyncio.Task[None] | None = None
        self._catchup_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self.close_reason: str | None = None

    # -- state -------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def catching_up(self) -> bool:
        return self._catching_up

    def _set_state(self, new: SessionState, **extra: Any) -> None:
        old = self._state
        self._state = new
        log.info(
            "viewer state",
            viewer=self.id,
            stream=self.stream.key,
            old=old.value,
            new=new.value,
            **extra,
        )

    def start(self) -> None:
        """Start the DTLS server and the timers; needs a running loop."""
        loop = asyncio.get_running_loop()
        self._dtls_task = loop.create_task(self._run_dtls())
        self._housekeeping_task = loop.create_task(self._housekeeping())

    # -- input from the server's receive loop ------------------------------------

    def on_remote_address(self, addr: tuple[str, int]) -> None:
        """ICE picked (or moved to) `addr`."""
        if self._state is SessionState.NEW:
            self._set_state(SessionState.CONNECTING, remote=f"{addr[0]}:{addr[1]}")

    def handle_dtls(self, data: bytes) -> None:
        self._dtls.feed(data)

    def handle_rtcp(self, data: bytes) -> None:
        """One SRTCP datagram from the viewer; bad input is counted and ignored."""
        if len(data) > MAX_RTCP_SIZE:
            self.rtcp.oversized += 1
            return
        plain = self._dtls.unprotect_rtcp(data)
        if plain is None:
            self.rtcp.undecryptable += 1
            return
        try:
            messages = parse_rtcp(plain)
        except RtcpError:
            self.rtcp.malformed += 1
            return
        self.rtcp.packets += 1
        now = self._clock()
        for m in messages:
            if isinstance(m, ReportPacket):
                self._on_report(m, now)
            elif isinstance(m, NackPacket):
                self._on_nack(m, now)
            elif isinstance(m, PliPacket):
                self.rtcp.plis += 1
                self._on_keyframe_request((m.media_ssrc,), now)
            elif isinstance(m, FirPacket):
                self.rtcp.firs += 1
                # RFC 5104 section 4.3.1.2: the FCI, not the header, names the media SSRCs.
                self._on_keyframe_request([ssrc for ssrc, _ in m.entries], now)
            elif isinstance(m, RembPacket):
                self.rtcp.rembs += 1
                self.rtcp.last_remb = m.bitrate
                self.congestion.on_remb(m.bitrate, now)

    def _on_report(self, packet: ReportPacket, now: float) -> None:
        self.rtcp.receiver_reports += 1
        arrival = _ntp_timestamp(self._wallclock())
        for r in packet.reports:
            track = self._tracks.get(r.ssrc)
            if track is None:
                if r.ssrc != self.rtx_ssrc:
                    self.rtcp.unknown_ssrc += 1
                continue
            self.receiver_reports[track.kind] = ReceiverReport(
                r.fraction_lost, r.packets_lost, r.highest_sequence, r.jitter, now
            )
            self.nack.rtt.on_report(r.lsr, r.dlsr, arrival)
            self.congestion.on_report(r.fraction_lost, now)

    def _on_nack(self, packet: NackPacket, now: float) -> None:
        self.rtcp.nacks += 1
        self.rtcp.nacked_packets += len(packet.seqs)
        track = self._tracks.get(packet.media_ssrc)
        if track is None:
            self.rtcp.unknown_ssrc += 1
            return
        decision = self.nack.on_nack(track.history, packet.seqs, now)
        self.congestion.on_nack(decision.first_requests, now)
        if decision.slots and self._state is SessionState.CONNECTED:
            self._retransmit(track, decision.slots)

    def _on_keyframe_request(self, media_ssrcs: Sequence[int], now: float) -> None:
        video = self.video
        if video is None or video.ssrc not in media_ssrcs:
            self.rtcp.unknown_ssrc += 1
            return
        frames = self.stream.gop.frames
        age = None
        if frames and frames[0].kind is MediaKind.VIDEO and frames[0].keyframe:
            age = now - frames[0].received_at
        answer = self.keyframes.on_request(now, age)
        if answer is KeyframeAnswer.IGNORED or self._state is not SessionState.CONNECTED:
            return
        if answer is KeyframeAnswer.FROM_CACHE:
            self._start_catch_up()
        else:
            self._need_keyframe = True

    def handle_rtp(self, data: bytes) -> None:
        self.rtcp.rtp_dropped += 1

    # -- hub reader --------------------------------------------------------------

    def on_frame(self, frame: RtpFrame) -> None:
        kind = frame.kind
        video = kind is _VIDEO
        if len(self._seen) < 2:
            self._seen.add(kind)
        if self._state is not _CONNECTED:
            return
        try:
            if video:
                self.congestion.on_offered(frame.size, self._clock())
                # While catching up, live video frames are also in the GOP cache.
                if self.video is not None and not self._catching_up:
                    self._send_video(frame)
            elif self.audio is not None:
                self._send_frame(self.audio, frame)
        except Exception as exc:  # the hub's fan-out must not fail because of one viewer
            self.close_soon(f"send failed: {type(exc).__name__}: {exc}")

    def on_stream_end(self) -> None:
        self.close_soon("stream ended")

    # -- sending -----------------------------------------------------------------

    def _send(self, data: bytes, kind: TrafficKind) -> None:
        addr = self.ice.remote_addr
        if addr is not None:
            self._send_path.send(data, addr, kind, self.counters)

    def _send_video(self, frame: RtpFrame) -> None:
        """Send a whole video frame or none of it; after a gap, only from a keyframe."""
        video = self.video
        assert video is not None
        # Decided at the frame boundary: a partly sent frame is undecodable, and so is
        # every frame after a gap until the next keyframe.
        if self.congestion.state is _CONGESTED:
            self.frames_dropped["congestion"] += 1
            self._need_keyframe = True
            return
        if self._send_path.blocked:
            self.frames_dropped["blocked"] += 1
            self._need_keyframe = True
            return
        if self._need_keyframe:
            if not frame.keyframe:
                self.frames_dropped["awaiting_keyframe"] += 1
                return
            self._need_keyframe = False
        if not self._send_frame(video, frame):
            self.frames_dropped["broken"] += 1
            self._need_keyframe = True
        self._video_wire = (frame.timestamp + video.ts_offset, self._sent_at)

    def _video_wire_now(self, now: float) -> int | None:
        """Where the video RTP clock stands now, continuing from the last frame sent."""
        if self._video_wire is None:
            return None
        wire, at = self._video_wire
        return wire + int((now - at) * VIDEO_CLOCK_RATE)

    def _send_frame(self, track: TrackSender, frame: RtpFrame) -> bool:
        """Send every packet of `frame`; False once one is not SENT (and the rest unsent).

        Runs for every packet to every viewer: per packet only the header fields change,
        the packet is built and protected in place (dtls.RtpWriter), and the per-track
        totals, retransmit credit and congestion input are added once per frame. Where
        the send path batches, the packets are built in its staging slots and leave in
        one system call per frame (per MAX_BATCH packets); a refused packet then takes
        the rest of its batch with it (counted as the send path reports them).
        """
        addr = self.ice.remote_addr
        if addr is None:
            self._sent_at = self._clock()
            return False
        path = self._send_path
        counters = self.counters
        payload_type = track.payload_type
        marked = 0x80 | payload_type
        ssrc = track.ssrc
        timestamp = (frame.timestamp + track.ts_offset) & 0xFFFFFFFF
        payloads = frame.payloads
        last = frame.marker_index
        first_seq = seq = track.seq
        packets = octets = 0  # built, so numbered and handed to the send path
        complete = True
        try:
            if path.batching and len(payloads) > 1:  # one packet (audio): plain `send`
                staging = path.staging
                write_into = self._dtls.rtp_writer.write_into
                send_staged = path.send_staged
                for start in range(0, len(payloads), MAX_BATCH):
                    chunk = payloads[start : start + MAX_BATCH]
                    chunk_octets = octets
                    index = 0
                    for payload in chunk:
                        second = marked if packets == last else payload_type
                        write_into(staging, index, second, seq, timestamp, ssrc, payload)
                        seq = (seq + 1) & 0xFFFF
                        packets += 1
                        octets += len(payload)
                        index += 1
                    sent = send_staged(index, addr, _MEDIA, counters)
                    if sent < index:
                        complete = False
                        sent_packets = packets - index + sent
                        sent_octets = chunk_octets + sum(map(len, chunk[:sent]))
                        break
            else:
                write = self._dtls.rtp_writer.write
                send = path.send
                for payload in payloads:
                    size = len(payload)
                    second = marked if packets == last else payload_type
                    data = write(second, seq, timestamp, ssrc, payload)
                    seq = (seq + 1) & 0xFFFF
                    packets += 1
                    octets += size
                    if send(data, addr, _MEDIA, counters) is not _SENT:
                        complete = False
                        sent_packets = packets - 1
                        sent_octets = octets - size
                        break
        finally:
            # Every packet handed to the send path is in the history, sent or not.
            track.history.put_frame(first_seq, payloads, packets, timestamp, last)
            track.seq = seq
            track.packets += packets
            track.octets += octets
        if complete:
            sent_packets, sent_octets = packets, octets
        # Retransmit credit: what was sent, headers included (none for refused packets).
        self.nack.on_media_sent(sent_octets + RTP_HEADER_SIZE * sent_packets)
        self._sent_at = now = self._clock()
        self.congestion.on_media_sent(packets, now)
        if complete and not self._catching_up:
            latency = self._video_latency if track is self.video else self._audio_latency
            if latency is not None:
                latency.record(now - frame.received_at)
        return complete

    def _retransmit(self, track: TrackSender, slots: list[int]) -> None:
        """Resend history entries: RTX for video when negotiated, else the original packet."""
        addr = self.ice.remote_addr
        if addr is None:
            return
        history = track.history
        rtx_pt, rtx_ssrc = self.rtx_payload_type, self.rtx_ssrc
        use_rtx = track is self.video and rtx_pt is not None and rtx_ssrc is not None
        for slot in slots:
            seq, payload, timestamp, marker = history.entry(slot)
            if use_rtx:
                assert rtx_pt is not None and rtx_ssrc is not None
                packet = rtx_packet(
                    rtx_pt, self._rtx_seq, timestamp, rtx_ssrc, marker, seq, payload
                )
                self._rtx_seq = (self._rtx_seq + 1) & 0xFFFF
            else:
                packet = rtp_packet(track.payload_type, seq, timestamp, track.ssrc, marker, payload)
            try:
                protected = self._dtls.protect_rtp(packet)
            except pylibsrtp.Error:
                self.srtp_refused += 1
                continue
            self._send_path.send(protected, addr, TrafficKind.RETRANSMIT, self.counters)

    def _send_rtcp(self, packet: bytes) -> None:
        self._send(self._dtls.protect_rtcp(packet), TrafficKind.RTCP)

    def send_sender_reports(self) -> None:
        """One SR + SDES per track that has sent media (RFC 3550 section 6.4.1)."""
        if not self._seen:
            return
        now = self._clock()
        ntp = _ntp_timestamp(self._wallclock())
        self.nack.rtt.on_sender_report(ntp)
        for track in (self.video, self.audio):
            if track is None or track.packets == 0 or track.kind not in self._seen:
                continue
            # Both tracks map through the stream's one anchor, so their SRs agree (RFC
            # 3550 section 6.4.1: one wallclock for all streams of a participant) and
            # the browser plays them as the publisher timed them.
            anchor = self.stream.arrival.at(now)
            assert anchor is not None  # set by the frames this viewer was sent
            rtp_ts = track.ts_offset + int((now - anchor) * track.clock_rate)
            if track is self.video and self._catching_up:
                # Cached frames are stamped as if sent live (see _catch_up): map now to
                # the video clock as it runs on the wire, so the browser does not hold
                # audio back to meet video from the past.
                rtp_ts = self._video_wire_now(now) or rtp_ts
            self._send_rtcp(sender_report(track, ntp, rtp_ts, self.cname))

    # -- tasks -------------------------------------------------------------------

    async def _run_dtls(self) -> None:
        ok = await self._dtls.start(self.offer.fingerprints)
        if self._state is SessionState.CLOSED:
            return
        if not ok:
            await self.close("dtls handshake failed")
            return
        self._set_state(SessionState.CONNECTED)
        self._connected_at = self._clock()
        self._start_catch_up()

    def _start_catch_up(self) -> None:
        """Send the cached GOP from its keyframe (restarting a running catch-up)."""
        if self.video is None or not any(f.kind is MediaKind.VIDEO for f in self.stream.gop.frames):
            return
        if self._catching_up:
            self._catchup_restart = True
            return
        self._catching_up = True
        self._catchup_restart = False
        self._catchup_task = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        """Send the cached GOP from its keyframe, faster than real time, then go live.

        Cached frame i is sent `(ts_i - ts_0) / catchup_speed` after the keyframe and
        stamped with that send time on the viewer's video clock, so the browser sees
        frames that arrive on time and plays them at once rather than buffering the
        GOP's age (which would put the picture seconds behind the live audio). When the
        cache is exhausted the last stamp's offset carries on for live frames, so the
        RTP timestamps stay monotonic and continuous across the switch.
        """
        assert self.video is not None
        video = self.video
        speed = self.config.catchup_speed
        ticks_per_second = VIDEO_CLOCK_RATE * speed
        generation = -1
        index = 0
        sent = 0
        started = self._clock()
        first_ts = 0
        base = 0
        gop = self.stream.gop
        while True:
            gop = self.stream.gop
            now = self._clock()
            if gop.generation != generation or self._catchup_restart:
                self._catchup_restart = False
                generation = gop.generation
                index = 0
                self._need_keyframe = True
                if not gop.frames:
                    break
                started, first_ts = now, gop.frames[0].timestamp
                wire = self._video_wire_now(now)
                base = wire + 1 if wire is not None else first_ts + video.ts_offset
            frames = gop.frames
            wait = 0.0
            while index < len(frames):
                frame = frames[index]
                due = started + (frame.timestamp - first_ts) / ticks_per_second
                if due > now:
                    wait = due - now
                    break
                index += 1
                if frame.kind is MediaKind.VIDEO:
                    video.ts_offset = base + int((frame.timestamp - first_ts) / speed)
                    video.ts_offset -= frame.timestamp
                    self._send_video(frame)
                    sent += 1
            if index >= len(frames):
                break
            await asyncio.sleep(max(wait, CATCHUP_TICK))
        if gop.truncated:
            # Frames after the truncation point are missing; resume at a live keyframe.
            self._need_keyframe = True
        self._catching_up = False
        log.info(
            "viewer caught up",
            viewer=self.id,
            stream=self.stream.key,
            frames=sent,
            seconds=round(self._clock() - started, 3),
            truncated=gop.truncated,
        )

    async def _housekeeping(self) -> None:
        reason = ""
        while not reason:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now = self._clock()
            if (
                self._state is not SessionState.CONNECTED
                and now - self._created_at > self.config.dtls_timeout
            ):
                reason = "dtls timeout"
            elif self.ice.consent_expired(now, self.config.consent_timeout):
                reason = "ice consent timeout"
            elif self._state is SessionState.CONNECTED:
                # Browsers sync audio and video once they have two SRs of each track:
                # send them quickly at the start.
                starting = now - self._connected_at < SR_STARTUP
                if now - self._last_sr >= (HOUSEKEEPING_INTERVAL if starting else SR_INTERVAL):
                    self._last_sr = now
                    self.send_sender_reports()
                reason = self.check_congestion(now)
            self.counters.flush_log()
        await self.close(reason)

    def check_congestion(self, now: float) -> str:
        """Feed send drops to the congestion state; returns a close reason when overloaded."""
        media = self.counters.kinds[TrafficKind.MEDIA]
        drops = media.dropped + media.errors
        self.congestion.on_send_drops(drops - self._media_drops_seen, now)
        self._media_drops_seen = drops
        change = self.congestion.tick(now)
        if change is not None:
            log.info(
                "viewer congestion",
                viewer=self.id,
                stream=self.stream.key,
                old=change.old.value,
                new=change.new.value,
                signals=change.reason,
            )
        if self.congestion.overloaded(now):
            seconds = self.congestion.overloaded_for(now)
            return f"overloaded: congested for {seconds:.1f} s ({self.congestion.describe()})"
        return ""

    # -- closing -----------------------------------------------------------------

    def close_soon(self, reason: str) -> None:
        """Schedule `close(reason)` from synchronous code."""
        if self._close_task is None and self._state is not SessionState.CLOSED:
            self._close_task = asyncio.get_running_loop().create_task(self.close(reason))

    async def close(self, reason: str) -> None:
        """Stop tasks, say BYE, close DTLS, leave the stream. Idempotent."""
        if self._state is SessionState.CLOSED:
            return
        was_connected = self._state is SessionState.CONNECTED
        self.close_reason = reason
        self._set_state(SessionState.CLOSED, reason=reason)
        current = asyncio.current_task()
        tasks = [
            t
            for t in (self._housekeeping_task, self._dtls_task, self._catchup_task)
            if t is not None and t is not current and not t.done()
        ]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self.stream.remove_reader(self)
        except (KeyError, ValueError):
            pass
        if was_connected:
            ssrcs = [t.ssrc for t in (self.video, self.audio) if t is not None]
            self._send_rtcp(bye(ssrcs))
        await self._dtls.stop()
        for track in (self.video, self.audio):
            if track is not None:
                track.history.clear()
        self.counters.flush_log()
        # Finished tasks keep their coroutines, and those keep this session: let go.
        self._housekeeping_task = self._dtls_task = self._catchup_task = None
        self._close_task = None
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            on_closed(self)

    # -- reporting ---------------------------------------------------------------

    @property
    def created_at(self) -> float:
        """When the session was created (the viewer's clock, time.monotonic())."""
        return self._created_at

    def stats(self) -> dict[str, Any]:
        addr = self.ice.remote_addr
        tracks = {
            t.kind.value: {"ssrc": t.ssrc, "packets": t.packets, "octets": t.octets}
            for t in (self.video, self.audio)
            if t is not None
        }
        return {
            "id": self.id,
            "stream": self.stream.key,
            "state": self._state.value,
            "remote": f"{addr[0]}:{addr[1]}" if addr else None,
            "catching_up": self._catching_up,
            "tracks": tracks,
            "send": self.counters.snapshot(),
            "rtcp": {
                "packets": self.rtcp.packets,
                "undecryptable": self.rtcp.undecryptable,
                "malformed": self.rtcp.malformed,
                "receiver_reports": self.rtcp.receiver_reports,
                "nacks": self.rtcp.nacks,
                "nacked_packets": self.rtcp.nacked_packets,
                "plis": self.rtcp.plis,
                "firs": self.rtcp.firs,
                "rembs": self.rtcp.rembs,
                "last_remb": self.rtcp.last_remb,
                "oversized": self.rtcp.oversized,
                "unknown_ssrc": self.rtcp.unknown_ssrc,
            },
            "nack": {
                **self.nack.counters.as_dict(),
                "srtp_refused": self.srtp_refused,
                "budget_bytes": int(self.nack.budget.tokens),
                "rtt_ms": round(self.nack.rtt.current * 1000, 1),
                "rtt_measured": self.nack.rtt.rtt is not None,
                "rtx": self.rtx_ssrc is not None,
            },
            "keyframe": self.keyframes.counters.as_dict(),
            "congestion": {
                "state": self.congestion.state.value,
                "loss": round(self.congestion.loss, 3),
                "overloaded_for": round(self.congestion.overloaded_for(self._clock()), 1),
                "transitions": self.congestion.transitions,
                "frames_dropped": dict(self.frames_dropped),
            },
            "dtls_dropped": self._dtls.ice.dropped,
        }
