"""A WHEP viewer built on aiortc, for tests: real ICE, DTLS-SRTP, RTCP and decoding."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import aiohttp
import aioice.ice
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEO_CLOCK = 90_000


@contextlib.contextmanager
def loopback_candidates() -> Iterator[None]:
    """aioice never gathers 127.0.0.1; the relay's tests run on loopback only."""
    with mock.patch.object(aioice.ice, "get_host_addresses", return_value=["127.0.0.1"]):
        yield


def _prefer(transceiver: RTCRtpTransceiver, kind: str, mime: str) -> None:
    # Without preferences aiortc answers with the first codec it knows (VP8).
    codecs = [c for c in RTCRtpReceiver.getCapabilities(kind).codecs if c.mimeType == mime]
    transceiver.setCodecPreferences(codecs)


@dataclass
class PlayResult:
    status: int = 0
    location: str | None = None
    video_pts: list[int] = field(default_factory=list)
    """pts (90 kHz) of every decoded video frame, in arrival order."""
    video_size: tuple[int, int] | None = None
    audio_frames: int = 0
    first_video_at: float | None = None
    """Seconds from the POST to the first decoded video frame."""

    @property
    def frames_expected(self) -> int:
        """Frames a 30 fps publisher produced between the first and last decoded frame."""
        if len(self.video_pts) < 2:
            return len(self.video_pts)
        span = max(self.video_pts) - min(self.video_pts)
        return round(span * 30 / VIDEO_CLOCK) + 1


class WhepViewer:
    def __init__(self, base_url: str, path: str) -> None:
        self.base_url = base_url
        self.path = path
        self.result = PlayResult()
        self._pc: RTCPeerConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = 0.0

    async def start(self, session: aiohttp.ClientSession) -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pc = pc
        _prefer(pc.addTransceiver("video", direction="recvonly"), "video", "video/H264")
        _prefer(pc.addTransceiver("audio", direction="recvonly"), "audio", "audio/opus")

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.ensure_future(self._consume(track)))

        with loopback_candidates():
            await pc.setLocalDescription(await pc.createOffer())
        self._started = time.monotonic()
        async with session.post(
            self.base_url + self.path,
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            self.result.status = resp.status
            body = await resp.text()
            if resp.status != 201:
                raise AssertionError(f"WHEP POST answered {resp.status}: {body}")
            self.result.location = resp.headers.get("Location")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))

    async def _consume(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    if self.result.first_video_at is None:
                        self.result.first_video_at = time.monotonic() - self._started
                    self.result.video_pts.append(int(frame.pts))
                    self.result.video_size = (frame.width, frame.height)
                else:
                    self.result.audio_frames += 1
        except MediaStreamError:
            return

    async def delete(self, session: aiohttp.ClientSession) -> int:
        assert self.result.location is not None
        url = self.result.location
        if url.startswith("/"):
            url = self.base_url + url
        async with session.delete(url) as resp:
            return resp.status

    async def close(self) -> None:
        if self._pc is not None:
            await self._pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _play_until_signalled(url: str) -> None:
    """Play `url` and print one JSON line when connected; SIGTERM closes cleanly."""
    import json
    import signal

    base, path = _split(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # force_close: no keep-alive connection left open on the relay while playing.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        viewer = WhepViewer(base, path)
        await viewer.start(http)
        while not viewer.result.video_pts:
            await asyncio.sleep(0.05)
        print(json.dumps({"location": viewer.result.location}), flush=True)
        await stop.wait()
        await viewer.close()
        print(json.dumps({"frames": len(viewer.result.video_pts)}), flush=True)


def _split(url: str) -> tuple[str, str]:
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    return f"{scheme}://{host}", "/" + path


if __name__ == "__main__":
    import sys

    asyncio.run(_play_until_signalled(sys.argv[1]))
