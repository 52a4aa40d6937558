"""Hostile datagrams on the RTC port are counted and ignored; the viewer keeps playing.

The relay runs in this process (to read its counters); the viewer is a real aiortc
WHEP client in the same loop, so garbage can also be sent from the viewer's own
ICE-selected address, which is what a broken browser would do.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aioice import stun

from srsrelay.app import Relay
from srsrelay.webrtc.ice import StunDrop
from srsrelay.webrtc.server import RecvCount
from srsrelay.webrtc.viewer import SessionState
from tests.conftest import ffmpeg_publish_args, inproc_config
from tests.whep_client import WhepViewer

pytestmark = pytest.mark.integration


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    relay = Relay(inproc_config())
    await relay.start()
    yield relay
    await relay.stop()


def stun_request(username: str, key: bytes) -> bytes:
    msg = stun.Message(
        stun.Method.BINDING,
        stun.Class.REQUEST,
        attributes={"USERNAME": username, "PRIORITY": 1, "ICE-CONTROLLING": 1},
    )
    msg.add_message_integrity(key)
    return bytes(msg)


async def frames_grow(viewer: WhepViewer, seconds: float) -> int:
    before = len(viewer.result.video_pts)
    await asyncio.sleep(seconds)
    return len(viewer.result.video_pts) - before


async def test_garbage_is_counted_and_viewer_keeps_playing(relay: Relay) -> None:
    url = f"rtmp://127.0.0.1:{relay.rtmp_port}/live/test"
    publisher = subprocess.Popen(
        ffmpeg_publish_args(url, size="320x240"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    viewer = WhepViewer(f"http://127.0.0.1:{relay.http_port}", "/whep/live/test")
    try:
        for _ in range(150):
            if any(s.gop.frames for s in relay.hub.streams()):
                break
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as http:
            await viewer.start(http)
        assert await frames_grow(viewer, 2) > 20
        session = next(iter(relay.rtc.sessions.values()))
        assert session.state is SessionState.CONNECTED
        rtc = relay.rtc
        drops = rtc._ice.drops
        port = relay.rtc_port

        # From a stranger's address.
        good_username = f"{session.ice.ufrag}:{session.ice.remote_ufrag}"
        bad_fingerprint = bytearray(stun_request(good_username, session.ice.pwd.encode()))
        bad_fingerprint[-1] ^= 0xFF
        stranger = [
            stun_request("nobody:nobody", b"x"),  # unknown username
            stun_request(good_username, b"not the password"),  # bad MESSAGE-INTEGRITY
            bytes(bad_fingerprint),  # bad FINGERPRINT
            b"\x00\x01\x00\x00" + os.urandom(40),  # STUN-range garbage
            b"\x16\xfe\xfd" + os.urandom(200),  # DTLS-range garbage, unknown address
            b"\x80\xc8" + os.urandom(100),  # RTCP-range garbage, unknown address
            b"\x64" + os.urandom(50),  # outside every RFC 7983 range
            os.urandom(1) + b"\x00" * 9000,  # oversized
            b"",
        ]
        unknown_before = rtc.received[RecvCount.UNKNOWN_ADDRESS]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            for data in stranger:
                s.sendto(data, ("127.0.0.1", port))
        await asyncio.sleep(0.3)
        assert drops[StunDrop.UNKNOWN_UFRAG] >= 1
        assert drops[StunDrop.BAD_INTEGRITY] >= 1
        assert drops[StunDrop.BAD_FINGERPRINT] >= 1
        assert rtc.received[RecvCount.UNKNOWN_ADDRESS] >= unknown_before + 2

        # From the viewer's own address, through its ICE connection.
        assert viewer._pc is not None
        dtls = viewer._pc.getTransceivers()[0].receiver.transport
        connection = dtls.transport._connection
        undecryptable = session.rtcp.undecryptable
        for _ in range(20):
            await connection.send(b"\x17\xfe\xfd\x00\x01" + os.urandom(300))  # DTLS junk
            await connection.send(b"\x81\xc9\x00\x07" + os.urandom(60))  # forged SRTCP
        assert await frames_grow(viewer, 2) > 30
        assert session.rtcp.undecryptable >= undecryptable + 20
        assert session.state is SessionState.CONNECTED
        assert rtc.received[RecvCount.HANDLER_ERRORS] == 0
    finally:
        await viewer.close()
        publisher.terminate()
        publisher.wait(5)
