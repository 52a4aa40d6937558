"""Nothing outlives its viewer: DELETE, a vanished browser and a clean disconnect.

The relay runs in this process so its tasks and registries can be counted; each
viewer is a real aiortc WHEP client in its own process, so killing it makes the
browser vanish without a DELETE or a DTLS close_notify.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from srsrelay.app import Relay
from srsrelay.webrtc.viewer import SessionState
from tests.conftest import ROOT, ffmpeg_publish_args, inproc_config

pytestmark = pytest.mark.integration

CONSENT_TIMEOUT = 3.0


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    relay = Relay(inproc_config(consent_timeout=CONSENT_TIMEOUT))
    await relay.start()
    yield relay
    await relay.stop()


def registries(relay: Relay) -> dict[str, int]:
    """Sizes of everything a viewer adds to, plus the event loop's tasks."""
    rtc = relay.rtc
    streams = relay.hub.streams()
    return {
        "tasks": len(asyncio.all_tasks()),
        "sessions": len(rtc.sessions),
        "by_ufrag": len(rtc._by_ufrag),
        "by_addr": len(rtc._by_addr),
        "ice": len(rtc._ice._sessions),
        "readers": sum(len(s.readers) for s in streams),
    }


async def wait_for(predicate: Any, timeout: float, show: Any = None) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not met within {timeout} s: {show() if show else ''}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def back_to(relay: Relay, baseline: dict[str, int], timeout: float) -> float:
    def show() -> str:
        now = registries(relay)
        tasks = sorted(repr(t.get_coro()) for t in asyncio.all_tasks())
        return f"{baseline} -> {now}; tasks: {tasks}"

    return await wait_for(lambda: registries(relay) == baseline, timeout, show)


class ViewerProcess:
    running: list[ViewerProcess] = []
    """Started and not yet reaped: killed when a test fails half-way."""

    def __init__(self, url: str) -> None:
        ViewerProcess.running.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.whep_client", url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    async def connected(self) -> str:
        """Wait for the first decoded frame; return the session's Location."""
        assert self.proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline)
        assert line, "viewer process exited before playing"
        return str(json.loads(line)["location"])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self) -> int:
        code = self.proc.wait(15)
        ViewerProcess.running.remove(self)
        return code

    @classmethod
    def kill_all(cls) -> None:
        for viewer in cls.running:
            viewer.proc.kill()
            viewer.proc.wait()
        cls.running.clear()


async def start_publisher(relay: Relay) -> subprocess.Popen[bytes]:
    url = f"rtmp://127.0.0.1:{relay.rtmp_port}/live/test"
    proc = subprocess.Popen(
        ffmpeg_publish_args(url, size="320x240"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await wait_for(
        lambda: any(s.has_video and s.gop.frames for s in relay.hub.streams()), timeout=15
    )
    return proc


def freed_without_gc(refs: list[weakref.ref[Any]]) -> list[str]:
    """Objects of a closed session still alive: only reference cycles keep them."""
    return [repr(r()) for r in refs if r() is not None]


def session_refs(relay: Relay) -> list[weakref.ref[Any]]:
    session = next(iter(relay.rtc.sessions.values()))
    dtls = session._dtls
    return [weakref.ref(o) for o in (session, dtls, dtls._transport, dtls.ice, session.ice)]


async def test_nothing_outlives_its_viewer(relay: Relay) -> None:
    publisher = await start_publisher(relay)
    http = f"http://127.0.0.1:{relay.http_port}"
    # With the cycle collector off, a closed session must be freed by reference
    # counting alone: its OpenSSL and libsrtp state is then released at once.
    gc.disable()
    try:
        await asyncio.sleep(0.5)
        baseline = registries(relay)
        assert baseline["sessions"] == 0

        # 1. DELETE: the session is gone at once.
        viewer = ViewerProcess(http + "/whep/live/test")
        location = await viewer.connected()
        assert registries(relay)["sessions"] == 1
        refs = session_refs(relay)
        async with aiohttp.ClientSession() as client:
            async with client.delete(http + location) as resp:
                assert resp.status == 200
        await back_to(relay, baseline, timeout=2)
        await asyncio.sleep(0.1)
        assert freed_without_gc(refs) == []
        viewer.signal(signal.SIGKILL)
        viewer.wait()

        # 2. A browser that vanishes (no DELETE, no close_notify): freed by consent.
        viewer = ViewerProcess(http + "/whep/live/test")
        await viewer.connected()
        session = next(iter(relay.rtc.sessions.values()))
        assert session.state is SessionState.CONNECTED
        viewer.signal(signal.SIGKILL)
        viewer.wait()
        refs = session_refs(relay)
        waited = await back_to(relay, baseline, timeout=CONSENT_TIMEOUT + 3)
        assert session.close_reason == "ice consent timeout"
        assert waited <= CONSENT_TIMEOUT + 2, waited
        del session
        await asyncio.sleep(0.1)
        assert freed_without_gc(refs) == []

        # 3. A clean disconnect (DTLS close_notify, no DELETE).
        viewer = ViewerProcess(http + "/whep/live/test")
        await viewer.connected()
        session = next(iter(relay.rtc.sessions.values()))
        viewer.signal(signal.SIGTERM)
        assert viewer.wait() == 0
        refs = session_refs(relay)
        await back_to(relay, baseline, timeout=2)
        assert session.close_reason == "dtls closed by viewer"
        del session
        await asyncio.sleep(0.1)
        assert freed_without_gc(refs) == []
    finally:
        ViewerProcess.kill_all()
        gc.enable()
        publisher.send_signal(signal.SIGINT)
        publisher.wait(5)
