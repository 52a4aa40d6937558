"""The WebRTC server: one UDP socket shared by all viewers.

Incoming datagrams are demultiplexed by their first byte (RFC 7983): STUN goes to
ICE-lite (by ufrag), DTLS and SRTP/SRTCP to the viewer owning the source address.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import ipaddress
import socket
import time
import types
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from aiortc import RTCCertificate

from srsrelay.config import RtcConfig
from srsrelay.hub.frames import MediaKind
from srsrelay.webrtc.dtls import generate_certificate
from srsrelay.webrtc.ice import IceLite
from srsrelay.webrtc.latency import LatencyHistogram, bucket_bounds
from srsrelay.webrtc.sdp import CodecNotOffered, Offer, parse_offer
from srsrelay.webrtc.sendpath import SendCounters, SendPath, TrafficKind
from srsrelay.webrtc.viewer import StreamSource, ViewerSession

log = structlog.get_logger(__name__)

RECV_SIZE = 2048
"""Largest datagram read; WebRTC datagrams stay below the path MTU."""
MAX_DATAGRAMS_PER_WAKEUP = 256
"""Datagrams read per readiness callback before yielding to the event loop."""
STOP_TIMEOUT = 3.0
"""Seconds `stop` waits for sessions to close."""
ERROR_LOG_INTERVAL = 1.0
"""Seconds between two log lines about failures in the receive loop."""


class RecvCount(enum.Enum):
    """Counters of the receive loop."""

    STUN = "stun"
    DTLS = "dtls"
    RTCP = "rtcp"
    RTP = "rtp"
    UNKNOWN_ADDRESS = "unknown_address"
    """DTLS/SRTP from an address no viewer has (yet) checked via ICE."""
    UNCLASSIFIED = "unclassified"
    """First byte outside every RFC 7983 range."""
    SOCKET_ERRORS = "socket_errors"
    HANDLER_ERRORS = "handler_errors"


def _addr2(addr: Any) -> tuple[str, int]:
    return (str(addr[0]), int(addr[1]))


class RtcServer:
    """Owns the RTC socket, the send path, ICE-lite and the viewer sessions."""

    def __init__(self, config: RtcConfig) -> None:
        self.config = config
        self._sock: socket.socket | None = None
        self._send_path: SendPath | None = None
        self._certificate: RTCCertificate | None = None
        self._ice = IceLite()
        self._sessions: dict[str, ViewerSession] = {}
        self._by_ufrag: dict[str, ViewerSession] = {}
        self._by_addr: dict[tuple[str, int], ViewerSession] = {}
        self._port = 0
        self.counters = SendCounters("all", log_drops=False)
        self.latency = {kind: LatencyHistogram() for kind in MediaKind}
        """Relay-added latency of every frame sent to a viewer: from the RTMP message's
        arrival to its last RTP packet leaving (audio includes audio.pacing; catch-up
        frames from the GOP cache are not counted)."""
        """Send outcomes over all viewers."""
        self.received: dict[RecvCount, int] = {c: 0 for c in RecvCount}
        self._last_error_log = -ERROR_LOG_INTERVAL
        self.closed_listeners: list[Callable[[ViewerSession], None]] = []
        """Called with every viewer session that ended, whatever the reason."""
        self.closed: collections.Counter[str] = collections.Counter()
        """Viewer sessions closed, by close_category() of their reason."""
        self._closed_totals: collections.Counter[str] = collections.Counter()
        """session_totals() summed over the closed sessions (totals never go backwards)."""

    @property
    def port(self) -> int:
        """The bound UDP port (config.port may be 0)."""
        return self._port

    @property
    def sessions(self) -> Mapping[str, ViewerSession]:
        return types.MappingProxyType(self._sessions)

    async def start(self) -> None:
        family = (
            socket.AF_INET6
            if ipaddress.ip_address(self.config.listen).version == 6
            else socket.AF_INET
        )
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.sndbuf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.rcvbuf)
            sock.bind((self.config.listen, self.config.port))
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno,
                f"cannot bind rtc.listen={self.config.listen} rtc.port={self.config.port}: "
                f"{exc.strerror}",
            ) from None
        sock.setblocking(False)
        self._sock = sock
        self._port = sock.getsockname()[1]
        self._send_path = SendPath(
            sock,
            self.counters,
            control_queue=self.config.control_queue,
            counters_for=self._counters_for,
        )
        self._certificate = generate_certificate()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)
        log.info(
            "rtc listening",
            listen=self.config.listen,
            port=self._port,
            candidates=",".join(self.config.candidates),
            sndbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            control_queue=self.config.control_queue,
        )

    async def stop(self) -> None:
        sessions = list(self._sessions.values())
        if sessions:
            closing = asyncio.gather(
                *(s.close("server stopping") for s in sessions), return_exceptions=True
            )
            try:
                await asyncio.wait_for(closing, STOP_TIMEOUT)
            except TimeoutError:
                log.warning("rtc stop timed out", sessions=len(self._sessions))
        self._sessions.clear()
        self._by_ufrag.clear()
        self._by_addr.clear()
        if self._send_path is not None:
            # Whatever is still queued (blocked socket) is dropped and counted, not awaited.
            self._send_path.close()
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        log.info("rtc stopped")

    def create_session(self, offer_sdp: str, stream: StreamSource) -> ViewerSession:
        """Answer `offer_sdp` for `stream`; raises OfferError. Needs `start()` first."""
        if self._send_path is None or self._certificate is None:
            raise RuntimeError("RtcServer.start() must be called before create_session()")
        try:
            offer = _parse_for(offer_sdp, stream)
        except CodecNotOffered:
            # HEVC/AV1 the viewer cannot receive: its H.264 rendition, if there is one.
            if stream.rendition is None:
                raise
            stream = stream.rendition
            offer = _parse_for(offer_sdp, stream)
        session = ViewerSession(
            stream=stream,
            offer=offer,
            config=self.config,
            send_path=self._send_path,
            certificate=self._certificate,
            port=self._port,
            on_closed=self._session_closed,
            latency=self.latency,
        )
        self._sessions[session.id] = session
        self._by_ufrag[session.ice.ufrag] = session
        self._ice.add(session.ice)
        session.start()
        try:
            stream.add_reader(session)
        except Exception:
            session.close_soon("stream refused the viewer")
            raise
        log.info(
            "viewer created",
            viewer=session.id,
            stream=stream.key,
            video=offer.video is not None,
            audio=offer.audio is not None,
        )
        return session

    def restart_ice(self, session_id: str, remote_ufrag: str, remote_pwd: str) -> tuple[str, str]:
        """ICE restart of one session; returns our new (ufrag, pwd).

        DTLS and SRTP carry on (RFC 8445 section 9 restarts ICE only). As an ICE-lite
        agent we never send checks, so the viewer's new password is not needed.
        Raises KeyError for an unknown session.
        """
        session = self._sessions[session_id]
        self._by_ufrag.pop(session.ice.ufrag, None)
        self._ice.restart(session.ice, remote_ufrag)
        self._by_ufrag[session.ice.ufrag] = session
        log.info("ice restart", viewer=session_id, generation=session.ice.generation)
        return session.ice.ufrag, session.ice.pwd

    async def close_session(self, session_id: str, reason: str) -> bool:
        session = self._sessions.get(session_id)
        if session is None:
            return False
        await session.close(reason)
        return True

    def _session_closed(self, session: ViewerSession) -> None:
        self._sessions.pop(session.id, None)
        self._by_ufrag.pop(session.ice.ufrag, None)
        self._ice.remove(session.ice.ufrag)
        addr = session.ice.remote_addr
        if addr is not None and self._by_addr.get(addr) is session:
            del self._by_addr[addr]
        self.closed[close_category(session.close_reason)] += 1
        self._closed_totals.update(session_totals(session))
        for listener in list(self.closed_listeners):
            try:
                listener(session)
            except Exception:
                log.exception("viewer closed listener failed", viewer=session.id)

    def viewer_totals(self) -> collections.Counter[str]:
        """session_totals() over every viewer since start: closed plus open sessions."""
        totals = self._closed_totals.copy()
        for session in list(self._sessions.values()):
            totals.update(session_totals(session))
        return totals

    def _counters_for(self, addr: tuple[str, int]) -> SendCounters | None:
        session = self._by_addr.get(addr)
        return session.counters if session is not None else None

    def stats(self) -> dict[str, Any]:
        return {
            "port": self._port,
            "sessions": len(self._sessions),
            "received": {c.value: n for c, n in self.received.items()},
            "stun_dropped": {d.value: n for d, n in self._ice.drops.items()},
            "send": self.counters.snapshot(),
            "send_path": self._send_path.stats() if self._send_path is not None else None,
            "latency": {kind.value: h.snapshot() for kind, h in self.latency.items()},
            "latency_bucket_ms": [b if b != float("inf") else None for b in bucket_bounds()],
        }

    # -- receive loop --------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        send_path = self._send_path
        if sock is None or send_path is None:
            return
        # With IP_RECVERR, a non-empty error queue keeps the fd readable (EPOLLERR):
        # drain it on every wakeup or the loop spins.
        send_path.drain_errqueue()
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                data, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # A pending ICMP error (e.g. ECONNREFUSED) surfaces here once.
                self.received[RecvCount.SOCKET_ERRORS] += 1
                send_path.drain_errqueue()
                continue
            if not data:
                continue
            try:
                self._dispatch(data, _addr2(addr))
            except Exception:
                self.received[RecvCount.HANDLER_ERRORS] += 1
                now = time.monotonic()
                if now - self._last_error_log >= ERROR_LOG_INTERVAL:
                    self._last_error_log = now
                    log.exception(
                        "rtc datagram handling failed",
                        errors=self.received[RecvCount.HANDLER_ERRORS],
                    )

    def _dispatch(self, data: bytes, addr: tuple[str, int]) -> None:
        first = data[0]
        if first <= 3:
            self.received[RecvCount.STUN] += 1
            self._handle_stun(data, addr)
            return
        if 20 <= first <= 63:
            kind = RecvCount.DTLS
        elif 128 <= first <= 191:
            # RFC 5761 section 4: RTCP packet types 192..223 in the second byte.
            rtcp = len(data) > 1 and 192 <= data[1] <= 223
            kind = RecvCount.RTCP if rtcp else RecvCount.RTP
        else:
            self.received[RecvCount.UNCLASSIFIED] += 1
            return
        session = self._by_addr.get(addr)
        if session is None:
            self.received[RecvCount.UNKNOWN_ADDRESS] += 1
            return
        self.received[kind] += 1
        session.bytes_received += len(data)
        if kind is RecvCount.DTLS:
            session.handle_dtls(data)
        elif kind is RecvCount.RTCP:
            session.handle_rtcp(data)
        else:
            session.handle_rtp(data)

    def _handle_stun(self, data: bytes, addr: tuple[str, int]) -> None:
        answered = self._ice.handle(data, addr, time.monotonic())
        if answered is None:
            return
        session = self._by_ufrag.get(answered.session.ufrag)
        if session is None:
            return
        session.bytes_received += len(data)
        if answered.address_changed:
            prev = answered.previous_addr
            if prev is not None and self._by_addr.get(prev) is session:
                del self._by_addr[prev]
            self._by_addr[addr] = session
            session.on_remote_address(addr)
        assert self._send_path is not None
        self._send_path.send(answered.response, addr, TrafficKind.STUN, session.counters)


CLOSE_CATEGORIES = (
    ("viewer sent DELETE", "deleted"),
    ("kicked", "kicked"),
    ("stream ended", "stream_ended"),
    ("ice consent timeout", "consent_timeout"),
    ("dtls handshake failed", "dtls_failed"),
    ("dtls timeout", "dtls_timeout"),
    ("dtls closed", "dtls_closed"),
    ("overloaded", "overload"),
    ("server stopping", "shutdown"),
    ("relay is shutting down", "shutdown"),
    ("refused by", "refused"),
    ("send failed", "error"),
    ("stream refused", "error"),
    ("request cancelled", "error"),
)
"""Close reason prefix -> category: a fixed label set for counting free-text reasons."""


def close_category(reason: str | None) -> str:
    """The category of a viewer session's close reason ("other" if none matches)."""
    for prefix, category in CLOSE_CATEGORIES:
        if reason is not None and reason.startswith(prefix):
            return category
    return "other"


def session_totals(session: ViewerSession) -> collections.Counter[str]:
    """One viewer's feedback and drop counters, under fixed keys summed across viewers."""
    nack = session.nack.counters
    totals: collections.Counter[str] = collections.Counter(
        nacks_received=session.rtcp.nacks,
        nack_requested=nack.requested,
        retransmitted=nack.retransmitted,
        retransmitted_bytes=nack.retransmitted_bytes,
        nack_over_budget=nack.over_budget,
        nack_not_found=nack.not_found,
        nack_too_soon=nack.too_soon,
        plis=session.rtcp.plis,
        firs=session.rtcp.firs,
    )
    for reason, n in session.frames_dropped.items():
        totals[f"frames_dropped:{reason}"] = n
    return totals


def _parse_for(offer_sdp: str, stream: StreamSource) -> Offer:
    return parse_offer(
        offer_sdp,
        profile_level_id=stream.profile_level_id,
        want_video=stream.has_video,
        want_audio=stream.has_audio,
        video_codec=stream.video_codec,
        video_fmtp=stream.video_fmtp,
    )
