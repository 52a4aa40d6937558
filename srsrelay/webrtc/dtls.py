"""DTLS-SRTP (RFC 5764) for one viewer, using aiortc's RTCDtlsTransport.

aiortc's DTLS transport expects an RTCIceTransport; we hand it `IceStandIn`, which
sends through the one send path and receives from a bounded queue fed by the
server's receive loop. Only DTLS records (first byte 20..63, RFC 7983) are queued;
SRTCP from the viewer is unprotected here, outside aiortc.

Private interfaces used (pinned aiortc==1.16.0, aioice==0.13.0; checked by
tests/test_contract_aiortc.py):

- ``RTCDtlsTransport(transport, [certificate])`` reads ``transport.role``
  ("controlling" makes it the DTLS server) and calls ``await transport._send(data)``
  and ``await transport._recv()``; a ConnectionError from ``_recv`` ends its loops.
- ``RTCDtlsTransport._tx_srtp`` / ``._rx_srtp``: pylibsrtp Sessions, set once
  ``start()`` returned with the transport connected.
- ``RTCDtlsTransport._state`` (aiortc.rtcdtlstransport.State) and its "statechange" event.
- ``aioice.stun``: ``parse_message``, ``Message``, ``Message.check_message_integrity``,
  ``Message.add_message_integrity``, ``Method``, ``Class`` (see ice.py).

Media packets are protected by `RtpWriter`, which calls libsrtp's ``srtp_protect`` on a
buffer of its own, or in place in a send path's staging slot, through pylibsrtp's cffi
binding (``pylibsrtp._binding.lib`` and ``Session._srtp``): the header is packed and the
payload copied straight into that buffer, saving the packet concatenation and the
wrapper's per-call allocations. A self-test against ``Session.protect`` decides at first
use; without those members, or if the outputs differ, it falls back to ``Session.protect``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, cast

import pylibsrtp
from aiortc import RTCCertificate, RTCDtlsFingerprint, RTCDtlsParameters, RTCDtlsTransport
from aiortc.rtcdtlstransport import State as _DtlsState
from OpenSSL import SSL

from srsrelay.webrtc.sendpath import SLOT_SIZE, Staging

DTLS_QUEUE_SIZE = 64
"""Incoming DTLS records queued per viewer; more are dropped (and counted)."""
RTP_BUFFER_SIZE = SLOT_SIZE
"""Bytes of an `RtpWriter`'s packet buffer (and of a send path's staging slot, where it
also writes): the largest RTP packet plus SRTP trailer."""
SRTP_MAX_TRAILER = 16 + 128
"""Room libsrtp may append: SRTP_MAX_TAG_LEN + SRTP_MAX_MKI_LEN (libsrtp srtp.h)."""
RTP_HEADER = struct.Struct("!BBHII")
"""The 12-byte fixed RTP header (RFC 3550 section 5.1): V=2, no padding/extension/CSRC."""


SSL_CONTEXTS = 4
"""Shared SSL contexts kept per certificate (one per set of SRTP profiles offered)."""


class SharedContextCertificate(RTCCertificate):
    """An RTCCertificate whose SSL context is built once and shared by every viewer's
    DTLS connection, instead of one context (about 23 KB) per viewer.

    A shared server context would cache every completed session (up to about 20,000 by
    default): the cache is off, as is needed for bounded memory. OpenSSL also releases a
    connection's idle read and write buffers after the handshake (MODE_RELEASE_BUFFERS),
    saving about 13 KB per viewer. Overrides aiortc's private `_create_ssl_context`
    (tests/test_contract_aiortc.py checks it is still there).
    """

    def __init__(self, key: Any, cert: Any) -> None:
        super().__init__(key=key, cert=cert)
        self._contexts: dict[tuple[bytes, ...], SSL.Context] = {}

    def _create_ssl_context(self, srtp_profiles: list[Any]) -> SSL.Context:
        key = tuple(p.openssl_profile for p in srtp_profiles)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = super()._create_ssl_context(srtp_profiles)
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
            if len(self._contexts) >= SSL_CONTEXTS:
                self._contexts.clear()
            self._contexts[key] = ctx
        return ctx


def generate_certificate() -> RTCCertificate:
    """The server's one DTLS certificate (ECDSA P-256, self-signed), sharing one SSL
    context across viewers."""
    return SharedContextCertificate.generateCertificate()


def sha256_fingerprint(certificate: RTCCertificate) -> str:
    for fp in certificate.getFingerprints():
        if fp.algorithm == "sha-256":
            return str(fp.value)
    raise ValueError("certificate has no sha-256 fingerprint")


class IceStandIn:
    """What RTCDtlsTransport needs of an ICE transport, over our socket and queue."""

    def __init__(
        self,
        send: Callable[[bytes], object],
        queue_size: int = DTLS_QUEUE_SIZE,
        role: str = "controlling",
    ) -> None:
        self.role = role
        """"controlling" makes aiortc's DTLS transport the server, "controlled" the client."""
        self._send_cb = send
        # Bounded by `queue_size` (DTLS_QUEUE_SIZE records): `feed` drops and counts beyond it.
        self._queue: collections.deque[bytes] = collections.deque()
        self._queue_size = queue_size
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.dropped = 0
        """Records dropped because the queue was full or the stand-in was closed."""

    def feed(self, data: bytes) -> bool:
        """Queue one incoming DTLS record; False if dropped."""
        if self._closed or len(self._queue) >= self._queue_size:
            self.dropped += 1
            return False
        self._queue.append(data)
        self._wake()
        return True

    def close(self) -> None:
        """Make the pending and all later `_recv` calls raise ConnectionError."""
        self._closed = True
        self._queue.clear()
        self._wake()

    def release(self) -> None:
        """Drop the send callback (it refers to the owner); later sends are refused."""
        self._send_cb = _refuse_send

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _send(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionError("viewer connection closed")
        self._send_cb(data)

    async def _recv(self) -> bytes:
        while not self._queue:
            if self._closed:
                raise ConnectionError("viewer connection closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()


def _refuse_send(data: bytes) -> None:
    """The send callback of a released stand-in."""


class RtpWriter:
    """Writes RTP packets of one SRTP session: header and payload go straight into a
    preallocated buffer, libsrtp protects them in place, and the result is copied out
    once (the caller may hold it; the buffer is reused by the next packet)."""

    __slots__ = ("_session", "_protect", "_srtp", "_cdata", "_buffer", "_length", "_limit")

    def __init__(self, session: pylibsrtp.Session, direct: bool | None = None) -> None:
        """`direct`: None picks the direct path if it passed its self-test."""
        self._session = session  # keeps libsrtp's context alive while we point at it
        self._protect: Any = None
        self._srtp: Any = None
        self._cdata: Any = None
        self._buffer: Any = None
        self._length: Any = None
        self._limit = RTP_BUFFER_SIZE - SRTP_MAX_TRAILER
        if direct is None:
            direct = _direct_works()
        if not direct:
            return
        try:
            from pylibsrtp._binding import ffi, lib

            self._srtp = session._srtp[0]
            self._protect = lib.srtp_protect
        except (ImportError, AttributeError, TypeError):
            self._protect = None
            return
        self._cdata = ffi.new("char[]", RTP_BUFFER_SIZE)
        self._buffer = ffi.buffer(self._cdata)
        self._length = ffi.new("int *")

    @property
    def direct(self) -> bool:
        """True when packets are protected in our buffer, False when through pylibsrtp."""
        return self._protect is not None

    def write(self, second: int, seq: int, timestamp: int, ssrc: int, payload: bytes) -> bytes:
        """The SRTP packet of `payload` under a fixed header whose second byte (marker bit
        and payload type) is `second`."""
        if self._protect is None:
            packet = RTP_HEADER.pack(0x80, second, seq, timestamp, ssrc) + payload
            out: bytes = self._session.protect(packet)
            return out
        size = len(payload) + 12
        if size > self._limit:
            raise ValueError(
                f"RTP packet of {size} bytes is longer than {self._limit}: lower rtc.payload_size"
            )
        buffer = self._buffer
        RTP_HEADER.pack_into(buffer, 0, 0x80, second, seq, timestamp, ssrc)
        buffer[12:size] = payload
        length = self._length
        length[0] = size
        err = self._protect(self._srtp, self._cdata, length)
        if err:
            raise pylibsrtp.Error(f"srtp_protect failed with libsrtp error {err}")
        data: bytes = buffer[0 : length[0]]
        return data

    def write_into(
        self,
        staging: Staging,
        index: int,
        second: int,
        seq: int,
        timestamp: int,
        ssrc: int,
        payload: bytes,
    ) -> None:
        """`write` into slot `index` of a send path's staging area, protected in place
        when the direct path is on (no copy at all), and set that slot's length."""
        pointer = staging.pointers[index]
        if self._protect is None or pointer is None:
            staging.put(index, self.write(second, seq, timestamp, ssrc, payload))
            return
        size = len(payload) + 12
        if size > self._limit:
            raise ValueError(
                f"RTP packet of {size} bytes is longer than {self._limit}: lower rtc.payload_size"
            )
        view = staging.views[index]
        RTP_HEADER.pack_into(view, 0, 0x80, second, seq, timestamp, ssrc)
        view[12:size] = payload
        length = self._length
        length[0] = size
        err = self._protect(self._srtp, pointer, length)
        if err:
            raise pylibsrtp.Error(f"srtp_protect failed with libsrtp error {err}")
        staging.lengths[index] = length[0]


@functools.cache
def _direct_works() -> bool:
    """Whether `RtpWriter`'s direct path produces what pylibsrtp's protect does (checked
    once, on throwaway sessions with one random key)."""
    from pylibsrtp import Policy, Session

    key = os.urandom(30)
    sessions = [
        Session(
            Policy(
                key=key,
                ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
            )
        )
        for _ in range(2)
    ]
    direct = RtpWriter(sessions[0], direct=True)
    if not direct.direct:
        return False
    payload = bytes(range(200))
    try:
        for seq in (1, 2):
            mine = direct.write(0x80 | 96, seq, 1234, 5678, payload)
            theirs = sessions[1].protect(
                RTP_HEADER.pack(0x80, 0x80 | 96, seq, 1234, 5678) + payload
            )
            if mine != theirs:
                return False
    except (pylibsrtp.Error, TypeError, ValueError):
        return False
    return True


class DtlsSrtp:
    """DTLS server handshake for one viewer, then SRTP/SRTCP protection."""

    def __init__(
        self,
        certificate: RTCCertificate,
        send: Callable[[bytes], object],
        on_closed: Callable[[], None] | None = None,
        role: str = "controlling",
    ) -> None:
        self.ice = IceStandIn(send, role=role)
        # The stand-in provides the members RTCDtlsTransport uses (see module docstring).
        self._transport = RTCDtlsTransport(cast(Any, self.ice), [certificate])
        self._on_closed = on_closed
        self._connected = False
        self._writer: RtpWriter | None = None
        self._transport.on("statechange", self._state_changed)

    @property
    def connected(self) -> bool:
        return self._connected

    def feed(self, data: bytes) -> bool:
        """Hand one DTLS record from the viewer to the handshake / alert handling."""
        return self.ice.feed(data)

    async def start(self, fingerprints: Sequence[tuple[str, str]]) -> bool:
        """Run the handshake; True when SRTP keys are ready. Cancel to abort."""
        params = RTCDtlsParameters(
            fingerprints=[RTCDtlsFingerprint(algorithm=a, value=v) for a, v in fingerprints]
        )
        await self._transport.start(params)
        self._connected = self._transport._state == _DtlsState.CONNECTED
        if self._connected:
            self._writer = RtpWriter(self._transport._tx_srtp)
        return self._connected

    def _state_changed(self) -> None:
        state = self._transport._state
        if self._connected and state in (_DtlsState.CLOSED, _DtlsState.FAILED):
            self._connected = False
            if self._on_closed is not None:
                self._on_closed()

    def protect_rtp(self, packet: bytes) -> bytes:
        out: bytes = self._transport._tx_srtp.protect(packet)
        return out

    @property
    def rtp_writer(self) -> RtpWriter:
        """Builds and protects outgoing RTP packets; exists once `start` succeeded."""
        if self._writer is None:
            raise RuntimeError("no SRTP keys yet: the DTLS handshake has not completed")
        return self._writer

    def protect_rtcp(self, packet: bytes) -> bytes:
        out: bytes = self._transport._tx_srtp.protect_rtcp(packet)
        return out

    def unprotect_rtcp(self, packet: bytes) -> bytes | None:
        """Decrypt and authenticate SRTCP from the viewer; None if it fails."""
        if not self._connected:
            return None
        try:
            out: bytes = self._transport._rx_srtp.unprotect_rtcp(packet)
        except pylibsrtp.Error:
            return None
        return out

    def unprotect_rtp(self, packet: bytes) -> bytes | None:
        """Decrypt SRTP (used by tests and a DTLS client); None if it fails."""
        if not self._connected:
            return None
        try:
            out: bytes = self._transport._rx_srtp.unprotect(packet)
        except pylibsrtp.Error:
            return None
        return out

    async def stop(self) -> None:
        """Send close_notify if connected, then stop receiving and let go of the owner.

        The transport's listener and the stand-in's send callback point back at their
        owners; dropping them here breaks the reference cycles, so a closed viewer's
        OpenSSL and libsrtp state is freed at once rather than at the next full
        garbage collection (which, with sessions coming and going, grows RSS).
        """
        was_connected = self._connected
        self._connected = False
        if was_connected:
            await self._transport.stop()
        self.ice.close()
        self._transport.remove_all_listeners()
        self._on_closed = None
        self._writer = None
        self.ice.release()
