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
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any, cast

import pylibsrtp
from aiortc import RTCCertificate, RTCDtlsFingerprint, RTCDtlsParameters, RTCDtlsTransport
from aiortc.rtcdtlstransport import State as _DtlsState

DTLS_QUEUE_SIZE = 64
"""Incoming DTLS records queued per viewer; more are dropped (and counted)."""


def generate_certificate() -> RTCCertificate:
    """The server's one DTLS certificate (ECDSA P-256, self-signed)."""
    return RTCCertificate.generateCertificate()


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
        self.ice.release()
