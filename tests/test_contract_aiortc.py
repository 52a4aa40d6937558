"""The private parts of aiortc/aioice we rely on (listed in srsrelay/webrtc/dtls.py)."""

from __future__ import annotations

import asyncio
import inspect
import struct

import aioice
import aiortc
import pylibsrtp
import pytest
from aioice import stun
from aiortc import RTCCertificate, RTCDtlsTransport
from aiortc.rtcdtlstransport import State
from OpenSSL import SSL

from srsrelay.webrtc.dtls import (
    DtlsSrtp,
    IceStandIn,
    SharedContextCertificate,
    generate_certificate,
)


def test_pinned_versions() -> None:
    assert aiortc.__version__ == "1.16.0"
    assert aioice.__version__ == "0.13.0"
    assert pylibsrtp.__version__ == "1.0.0"


def test_dtls_transport_members() -> None:
    src = inspect.getsource(RTCDtlsTransport)
    # The transport is only used through these members.
    assert "self.transport.role" in src
    assert "self.transport._send(" in src
    assert "self.transport._recv()" in src
    assert "except ConnectionError" in src
    params = list(inspect.signature(RTCDtlsTransport.__init__).parameters)
    assert params == ["self", "transport", "certificates"]
    assert inspect.iscoroutinefunction(RTCDtlsTransport.start)
    assert inspect.iscoroutinefunction(RTCDtlsTransport.stop)
    dtls = RTCDtlsTransport(IceStandIn(lambda d: None), [generate_certificate()])  # type: ignore[arg-type]
    assert dtls._tx_srtp is None and dtls._rx_srtp is None
    assert dtls._state is State.NEW
    assert {s.name for s in State} >= {"NEW", "CONNECTING", "CONNECTED", "CLOSED", "FAILED"}
    assert callable(dtls.on)


def test_srtp_session_methods() -> None:
    for name in ("protect", "protect_rtcp", "unprotect", "unprotect_rtcp"):
        assert callable(getattr(pylibsrtp.Session, name))


def test_stun_members() -> None:
    assert list(inspect.signature(stun.parse_message).parameters) == ["data"]
    assert callable(stun.Message.add_message_integrity)
    assert callable(stun.Message.check_message_integrity)
    assert callable(stun.Message.add_fingerprint)
    for name in (
        "USERNAME",
        "XOR-MAPPED-ADDRESS",
        "MESSAGE-INTEGRITY",
        "FINGERPRINT",
        "USE-CANDIDATE",
        "ICE-CONTROLLING",
    ):
        assert name in stun.ATTRIBUTES_BY_NAME
    assert stun.Method.BINDING == 1 and stun.Class.REQUEST == 0


def test_certificate_fingerprint() -> None:
    cert = generate_certificate()
    assert isinstance(cert, RTCCertificate)
    algorithms = [f.algorithm for f in cert.getFingerprints()]
    assert "sha-256" in algorithms


def _rtp(seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 96, seq, 1234, 0xDEADBEEF) + b"payload" * 20


def _rtcp_rr() -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, 0xCAFEBABE)


async def test_loopback_handshake_gives_working_srtp() -> None:
    cert_server, cert_client = generate_certificate(), generate_certificate()
    server: DtlsSrtp
    client: DtlsSrtp
    # Wire the two stand-ins back to back in memory.
    server = DtlsSrtp(cert_server, lambda data: client.feed(data))
    client = DtlsSrtp(cert_client, lambda data: server.feed(data), role="controlled")

    def fps(cert: RTCCertificate) -> list[tuple[str, str]]:
        return [(f.algorithm, f.value) for f in cert.getFingerprints()]

    ok_server, ok_client = await asyncio.wait_for(
        asyncio.gather(server.start(fps(cert_client)), client.start(fps(cert_server))), 10
    )
    assert ok_server and ok_client
    assert server.connected and client.connected

    packet = _rtp(1)
    protected = server.protect_rtp(packet)
    assert protected != packet and len(protected) > len(packet)
    assert client.unprotect_rtp(protected) == packet
    assert client.unprotect_rtp(protected[:-1] + bytes([protected[-1] ^ 1])) is None

    rr = _rtcp_rr()
    assert server.unprotect_rtcp(client.protect_rtcp(rr)) == rr
    assert server.unprotect_rtcp(b"\x80\xc9" + bytes(30)) is None

    closed = asyncio.Event()
    client._on_closed = closed.set
    await server.stop()  # close_notify makes the client's transport close
    await asyncio.wait_for(closed.wait(), 5)
    assert not client.connected
    await client.stop()


async def test_fingerprint_mismatch_fails() -> None:
    cert_server, cert_client = generate_certificate(), generate_certificate()
    server: DtlsSrtp
    client: DtlsSrtp
    server = DtlsSrtp(cert_server, lambda data: client.feed(data))
    client = DtlsSrtp(cert_client, lambda data: server.feed(data), role="controlled")
    wrong = [("sha-256", "00:" * 31 + "00")]
    right = [(f.algorithm, f.value) for f in cert_server.getFingerprints()]
    ok_server, _ = await asyncio.wait_for(
        asyncio.gather(server.start(wrong), client.start(right)), 10
    )
    assert not ok_server and not server.connected
    await server.stop()
    await client.stop()


async def test_stand_in_queue_is_bounded_and_close_raises() -> None:
    stand_in = IceStandIn(lambda d: None, queue_size=2)
    assert stand_in.feed(b"\x16a") and stand_in.feed(b"\x16b")
    assert not stand_in.feed(b"\x16c")
    assert stand_in.dropped == 1
    assert await stand_in._recv() == b"\x16a"
    assert await stand_in._recv() == b"\x16b"
    waiter = asyncio.create_task(stand_in._recv())
    await asyncio.sleep(0)
    stand_in.close()
    with pytest.raises(ConnectionError):
        await waiter
    with pytest.raises(ConnectionError):
        await stand_in._send(b"x")


def test_shared_ssl_context_hook() -> None:
    # SharedContextCertificate overrides this private method; aiortc must still call it
    # once per DTLS connection with the SRTP profiles.
    params = list(inspect.signature(RTCCertificate._create_ssl_context).parameters)
    assert params == ["self", "srtp_profiles"]
    assert "_create_ssl_context(" in inspect.getsource(RTCDtlsTransport.start)
    cert = generate_certificate()
    assert isinstance(cert, SharedContextCertificate)
    dtls = RTCDtlsTransport(IceStandIn(lambda d: None), [cert])  # type: ignore[arg-type]
    profiles = dtls._srtp_profiles
    first = cert._create_ssl_context(srtp_profiles=profiles)
    assert cert._create_ssl_context(srtp_profiles=profiles) is first
    # No session cache on the shared context: memory stays bounded.
    assert first.get_session_cache_mode() == SSL.SESS_CACHE_OFF
