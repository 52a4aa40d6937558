"""End to end: a real ffmpeg publishes over RTMP, a real aiortc viewer plays over WHEP."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest

from tests.conftest import Publisher, RelayProcess, session_count, wait_live
from tests.whep_client import WhepViewer

pytestmark = pytest.mark.integration


async def wait_sessions(relay: RelayProcess, expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    count = await session_count(relay)
    while count != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        count = await session_count(relay)
    return count


async def test_publish_and_play(relay: RelayProcess, publish, http_session) -> None:  # type: ignore[no-untyped-def]
    publish(relay.rtmp_url("live/test"))
    stream = await wait_live(relay, "live/test")
    assert stream["audio"], stream

    viewer = WhepViewer(relay.http, "/whep/live/test")
    try:
        await viewer.start(http_session)
        assert viewer.result.status == 201
        assert await wait_sessions(relay, 1) == 1
        await asyncio.sleep(10)
    finally:
        status = await viewer.delete(http_session) if viewer.result.location else None
        await viewer.close()

    result = viewer.result
    assert status == 200
    assert result.video_size == (1280, 720)
    decoded = len(result.video_pts)
    assert decoded >= 200, f"decoded only {decoded} frames in 10 s"
    assert decoded >= 0.9 * result.frames_expected, (decoded, result.frames_expected)
    assert result.audio_frames > 100, f"only {result.audio_frames} audio frames"
    assert await wait_sessions(relay, 0) == 0


async def test_srs_compatible_route(relay: RelayProcess, publish, http_session) -> None:  # type: ignore[no-untyped-def]
    publish(relay.rtmp_url("live/srs"), size="320x240")
    await wait_live(relay, "live/srs")
    viewer = WhepViewer(relay.http, "/rtc/v1/whep/?app=live&stream=srs")
    try:
        await viewer.start(http_session)
        await asyncio.sleep(3)
        assert len(viewer.result.video_pts) > 30
        assert await viewer.delete(http_session) == 200
    finally:
        await viewer.close()
    assert await wait_sessions(relay, 0) == 0


async def test_second_publisher_is_refused(relay: RelayProcess, publish) -> None:  # type: ignore[no-untyped-def]
    first: Publisher = publish(relay.rtmp_url("live/busy"), size="320x240")
    await wait_live(relay, "live/busy")
    second: Publisher = publish(relay.rtmp_url("live/busy"), size="320x240")
    code = await asyncio.get_running_loop().run_in_executor(None, second.proc.wait, 15)
    assert code != 0
    assert first.proc.poll() is None, "the first publisher must keep publishing"
    events = [line.get("event") for line in relay.log_lines()]
    assert any("refused" in str(e) or "busy" in str(e) for e in events), events


def rtmp_handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"\x03" + bytes(1536))
    received = b""
    while len(received) < 1 + 1536 * 2:
        chunk = sock.recv(8192)
        assert chunk, "relay closed during the handshake"
        received += chunk
    sock.sendall(received[1 : 1 + 1536])  # C2 echoes S1
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_bad_input_keeps_viewer_playing(  # type: ignore[no-untyped-def]
    relay: RelayProcess, publish, http_session: aiohttp.ClientSession
) -> None:
    publish(relay.rtmp_url("live/test"), size="640x360")
    await wait_live(relay, "live/test")
    viewer = WhepViewer(relay.http, "/whep/live/test")
    await viewer.start(http_session)
    try:
        await asyncio.sleep(2)
        before = len(viewer.result.video_pts)
        before_at = time.monotonic()
        assert before > 20

        loop = asyncio.get_running_loop()

        # Garbage on the RTMP port: the relay closes that connection.
        def garbage() -> bool:
            with socket.create_connection(("127.0.0.1", relay.rtmp_port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
                return read_until_closed(s, 5)

        assert await loop.run_in_executor(None, garbage)

        # A publisher that stops mid-chunk: a connect command cut in half.
        def mid_chunk() -> None:
            s = rtmp_handshake(relay.rtmp_port)
            header = b"\x03" + b"\x00\x00\x00" + (200).to_bytes(3, "big") + b"\x14" + bytes(4)
            s.sendall(header + b"\x02\x00\x07connect" + bytes(20))
            s.close()

        await loop.run_in_executor(None, mid_chunk)

        whep = relay.http + "/whep/live/test"
        sdp = {"Content-Type": "application/sdp"}
        cases = [
            ({"Content-Type": "text/plain"}, b"v=0\r\n", 415, "application/sdp"),
            (sdp, b"", 400, "SDP"),
            (sdp, b"hello, not an offer", 400, "SDP"),
            (sdp, VP8_PCMU_OFFER.encode(), 400, "H.264"),
            (sdp, b"v=0\r\n" + b"a=x\r\n" * 40000, 413, "too large"),
        ]
        for headers, body, status, needle in cases:
            async with http_session.post(whep, data=body, headers=headers) as resp:
                text = await resp.text()
                assert resp.status == status, (status, resp.status, text)
                assert needle.lower() in text.lower(), (needle, text)
        async with http_session.post(
            relay.http + "/whep/live/nope", data=VP8_PCMU_OFFER, headers=sdp
        ) as resp:
            assert resp.status == 409
            assert resp.headers["Retry-After"].isdigit()
            assert "live/nope" in await resp.text()

        await asyncio.sleep(2)
        after = len(viewer.result.video_pts)
        elapsed = time.monotonic() - before_at
        # 30 fps published; allow for decode jitter but not for a stall.
        assert after - before >= 0.8 * 30 * elapsed, (
            f"viewer stalled: {before} -> {after} frames in {elapsed:.1f} s"
        )
        assert relay.proc.poll() is None
    finally:
        await viewer.close()


VP8_PCMU_OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "c=IN IP4 0.0.0.0",
        "a=mid:0",
        "a=recvonly",
        "a=rtcp-mux",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
        "a=setup:actpass",
        "a=rtpmap:96 VP8/90000",
        "m=audio 9 UDP/TLS/RTP/SAVPF 0",
        "c=IN IP4 0.0.0.0",
        "a=mid:1",
        "a=recvonly",
        "a=rtcp-mux",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
        "a=setup:actpass",
        "a=rtpmap:0 PCMU/8000",
        "",
    ]
)
