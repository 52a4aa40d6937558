"""One WebRTC viewer: rewrites the stream's RTP headers, protects with SRTP, sends.

Frames arrive already packetized (once per stream); per viewer we only write a
12-byte RTP header (RFC 3550 section 5.1) with this viewer's SSRC, sequence number,
timestamp offset and payload type, apply SRTP and hand the datagram to the send path.
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

import structlog
from aiortc import RTCCertificate
from aiortc.rtp import RtcpPacket, RtcpPsfbPacket, RtcpRrPacket, RtcpRtpfbPacket, RtcpSrPacket

from srsrelay.config import RtcConfig
from srsrelay.hub.frames import AUDIO_CLOCK_RATE, VIDEO_CLOCK_RATE, MediaKind, RtpFrame
from srsrelay.webrtc.dtls import DtlsSrtp, sha256_fingerprint
from srsrelay.webrtc.ice import IceSession
from srsrelay.webrtc.sdp import AnswerParams, Offer, build_answer
from srsrelay.webrtc.sendpath import SendCounters, SendPath, TrafficKind

log = structlog.get_logger(__name__)

HOUSEKEEPING_INTERVAL = 0.25
"""Seconds between checks of the DTLS/consent timeouts and Sender Report timing."""
SR_INTERVAL = 1.0
"""Seconds between two RTCP Sender Reports of a track (RFC 3550 section 6.2)."""
CATCHUP_TICK = 0.005
"""Seconds between two sends of cached GOP frames to a new viewer."""
CATCHUP_MAX_BURST = 0.05
"""Most sending credit (in seconds at catchup_bitrate) saved up while catching up."""
NTP_EPOCH_OFFSET = 2_208_988_800
"""Seconds from 1900-01-01 (NTP epoch) to 1970-01-01 (Unix epoch)."""
RTCP_SR = 200
RTCP_SDES = 202
RTCP_BYE = 203
RTCP_RTPFB_NACK = 1
RTCP_PSFB_PLI = 1
RTCP_PSFB_FIR = 4
RTCP_PSFB_APP = 15


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
    def has_video(self) -> bool: ...

    @property
    def has_audio(self) -> bool: ...

    @property
    def gop(self) -> GopView: ...

    def add_reader(self, reader: FrameReader) -> None: ...

    def remove_reader(self, reader: FrameReader) -> None: ...


class SessionState(enum.Enum):
    NEW = "new"
    """Answer sent, no valid STUN request yet."""
    CONNECTING = "connecting"
    """ICE has a remote address; DTLS handshake running."""
    CONNECTED = "connected"
    """SRTP keys ready; media flows."""
    CLOSED = "closed"


def _random_ssrc() -> int:
    return secrets.randbelow(0xFFFFFFFF) + 1


class TrackSender:
    """RTP header state of one outgoing track of one viewer."""

    def __init__(self, kind: MediaKind, payload_type: int) -> None:
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
        self._header = bytearray(12)

    def packet(self, payload: bytes, timestamp: int, marker: bool) -> bytes:
        struct.pack_into(
            "!BBHII",
            self._header,
            0,
            0x80,
            (0x80 if marker else 0) | self.payload_type,
            self.seq,
            (timestamp + self.ts_offset) & 0xFFFFFFFF,
            self.ssrc,
        )
        self.seq = (self.seq + 1) & 0xFFFF
        self.packets += 1
        self.octets += len(payload)
        return bytes(self._header) + payload


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
    """SRTCP datagrams authenticated and decrypted."""
    undecryptable: int = 0
    """SRTCP datagrams that failed authentication or arrived before the keys."""
    malformed: int = 0
    """Decrypted datagrams that did not parse as RTCP."""
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
    ) -> None:
        self.id = secrets.token_hex(8)
        self.stream = stream
        self.offer = offer
        self.config = config
        self._send_path = send_path
        self._on_closed = on_closed
        self._clock = clock
        self.ice = IceSession(remote_ufrag=offer.ice_ufrag)
        self.counters = SendCounters(self.id, clock=clock)
        self.rtcp = RtcpCounters()
        self.receiver_reports: dict[MediaKind, ReceiverReport] = {}
        """Last report block per track (at most one per track)."""
        self.video = TrackSender(MediaKind.VIDEO, offer.video.payload_type) if offer.video else None
        self.audio = TrackSender(MediaKind.AUDIO, offer.audio.payload_type) if offer.audio else None
        self._ssrc_kind = {t.ssrc: t.kind for t in (self.video, self.audio) if t is not None}
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
        self._need_keyframe = True
        # Stream clock: stream time (ms) of the newest frame and when it arrived.
        self._clock_ms: float | None = None
        self._clock_at = 0.0
        self._last_sr = 0.0
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
        plain = self._dtls.unprotect_rtcp(data)
        if plain is None:
            self.rtcp.undecryptable += 1
            return
        try:
            packets = RtcpPacket.parse(plain)
        except ValueError:
            self.rtcp.malformed += 1
            return
        self.rtcp.packets += 1
        now = self._clock()
        for p in packets:
            if isinstance(p, RtcpRrPacket | RtcpSrPacket):
                self.rtcp.receiver_reports += 1
                for r in p.reports:
                    kind = self._ssrc_kind.get(r.ssrc)
                    if kind is not None:
                        self.receiver_reports[kind] = ReceiverReport(
                            r.fraction_lost, r.packets_lost, r.highest_sequence, r.jitter, now
                        )
            elif isinstance(p, RtcpRtpfbPacket) and p.fmt == RTCP_RTPFB_NACK:
                self.rtcp.nacks += 1
                self.rtcp.nacked_packets += len(p.lost)
            elif isinstance(p, RtcpPsfbPacket):
                if p.fmt == RTCP_PSFB_PLI:
                    self.rtcp.plis += 1
                elif p.fmt == RTCP_PSFB_FIR:
                    self.rtcp.firs += 1
                elif p.fmt == RTCP_PSFB_APP:
                    self.rtcp.rembs += 1

    def handle_rtp(self, data: bytes) -> None:
        self.rtcp.rtp_dropped += 1

    # -- hub reader --------------------------------------------------------------

    def on_frame(self, frame: RtpFrame) -> None:
        video = frame.kind is MediaKind.VIDEO
        rate = VIDEO_CLOCK_RATE if video else AUDIO_CLOCK_RATE
        self._clock_ms = frame.timestamp * 1000 / rate
        self._clock_at = frame.received_at
        if self._state is not SessionState.CONNECTED:
            return
        try:
            if video:
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
        assert self.video is not None
        if self._need_keyframe:
            if not frame.keyframe:
                return
            self._need_keyframe = False
        self._send_frame(self.video, frame)

    def _send_frame(self, track: TrackSender, frame: RtpFrame) -> None:
        marker_index = frame.marker_index
        protect = self._dtls.protect_rtp
        send = self._send_path.send
        addr = self.ice.remote_addr
        if addr is None:
            return
        for i, payload in enumerate(frame.payloads):
            packet = protect(track.packet(payload, frame.timestamp, i == marker_index))
            send(packet, addr, TrafficKind.MEDIA, self.counters)

    def _send_rtcp(self, packet: bytes) -> None:
        self._send(self._dtls.protect_rtcp(packet), TrafficKind.RTCP)

    def send_sender_reports(self) -> None:
        """One SR + SDES per track that has sent media (RFC 3550 section 6.4.1)."""
        if self._clock_ms is None:
            return
        now = self._clock()
        stream_ms = self._clock_ms + (now - self._clock_at) * 1000
        ntp = _ntp_timestamp(time.time())
        for track in (self.video, self.audio):
            if track is None or track.packets == 0:
                continue
            rtp_ts = track.ts_offset + int(stream_ms * track.clock_rate / 1000)
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
        gop = self.stream.gop
        if self.video is not None and any(f.kind is MediaKind.VIDEO for f in gop.frames):
            self._catching_up = True
            self._catchup_task = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        """Send the cached GOP paced at catchup_bitrate, then switch to live video."""
        rate = self.config.catchup_bitrate / 8  # bytes per second
        gop = self.stream.gop
        generation = gop.generation
        index = 0
        credit = rate * CATCHUP_TICK
        last = self._clock()
        sent = 0
        while True:
            gop = self.stream.gop
            if gop.generation != generation:
                generation = gop.generation
                index = 0
                self._need_keyframe = True
            frames = gop.frames
            now = self._clock()
            credit = min(credit + (now - last) * rate, rate * CATCHUP_MAX_BURST)
            last = now
            while index < len(frames) and credit > 0:
                frame = frames[index]
                index += 1
                if frame.kind is MediaKind.VIDEO:
                    self._send_video(frame)
                    credit -= frame.size
                    sent += 1
            if index >= len(frames):
                break
            await asyncio.sleep(CATCHUP_TICK)
        if gop.truncated:
            # Frames after the truncation point are missing; resume at a live keyframe.
            self._need_keyframe = True
        self._catching_up = False
        log.info(
            "viewer caught up",
            viewer=self.id,
            stream=self.stream.key,
            frames=sent,
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
            elif self._state is SessionState.CONNECTED and now - self._last_sr >= SR_INTERVAL:
                self._last_sr = now
                self.send_sender_reports()
            self.counters.flush_log()
        await self.close(reason)

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
        self.counters.flush_log()
        if self._on_closed is not None:
            self._on_closed(self)

    # -- reporting ---------------------------------------------------------------

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
            },
            "dtls_dropped": self._dtls.ice.dropped,
        }
