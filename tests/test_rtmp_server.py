from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from srsrelay.config import RtmpConfig
from srsrelay.hub.registry import StreamBusy
from srsrelay.rtmp import amf0
from srsrelay.rtmp.chunk import ChunkReader, ChunkWriter, RtmpMessage
from srsrelay.rtmp.server import RtmpServer, TagRate


class RecordingStream:
    def __init__(
        self, app: str, name: str, kick: Callable[[str], None], changed: asyncio.Event
    ) -> None:
        self.changed = changed
        self.key = f"{app}/{name}"
        self.kick = kick
        self.metadata: list[dict[str, object]] = []
        self.video: list[tuple[int, bytes]] = []
        self.audio: list[tuple[int, bytes]] = []
        self.fail_on_video = False

    def on_metadata(self, meta: dict[str, object]) -> None:
        self.metadata.append(meta)

    def on_video_tag(self, timestamp_ms: int, body: bytes, received_at: float) -> None:
        if self.fail_on_video:
            raise ValueError("broken stream")
        self.video.append((timestamp_ms, body))
        self.changed.set()

    def on_audio_tag(self, timestamp_ms: int, body: bytes, received_at: float) -> None:
        self.audio.append((timestamp_ms, body))


class RecordingHub:
    def __init__(self) -> None:
        self.streams: list[RecordingStream] = []
        self.unpublished: list[RecordingStream] = []
        self.publisher_ids: list[str] = []
        self.busy = False
        self.fail_on_video = False
        self.changed = asyncio.Event()

    def publish(
        self, app: str, name: str, publisher_id: str, kick: Callable[[str], None]
    ) -> RecordingStream:
        if self.busy:
            raise StreamBusy(f"stream {app}/{name} is already being published")
        stream = RecordingStream(app, name, kick, self.changed)
        stream.fail_on_video = self.fail_on_video
        self.streams.append(stream)
        self.publisher_ids.append(publisher_id)
        self.changed.set()
        return stream

    def unpublish(self, stream: RecordingStream) -> None:
        self.unpublished.append(stream)
        self.changed.set()


@pytest.fixture
def hub() -> RecordingHub:
    return RecordingHub()


def make_config(**overrides: Any) -> RtmpConfig:
    settings: dict[str, Any] = {"listen": "127.0.0.1", "port": 0, **overrides}
    return RtmpConfig(**settings)


@pytest.fixture
async def server(hub: RecordingHub) -> AsyncIterator[RtmpServer]:
    srv = RtmpServer(make_config(), hub)  # type: ignore[arg-type]
    await srv.start()
    yield srv
    await srv.stop()


class RawClient:
    """A minimal publisher speaking RTMP over a real socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer
        self.chunks = ChunkWriter()
        self.parser = ChunkReader(1 << 20)
        self.pending: list[RtmpMessage] = []

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def handshake(self) -> None:
        c1 = bytes(1536)
        self.w.write(b"\x03" + c1)
        s0s1s2 = await self.r.readexactly(3073)
        assert s0s1s2[0] == 3 and s0s1s2[1537:] == c1
        self.w.write(bytes(1536))

    async def command(self, *values: amf0.Amf0Value, stream_id: int = 0) -> None:
        self.w.write(self.chunks.write(3, 20, stream_id, 0, amf0.encode(*values)))
        await self.w.drain()

    async def next_command(self) -> list[amf0.Amf0Value]:
        while True:
            while self.pending:
                msg = self.pending.pop(0)
                if msg.msg_type == 20:
                    return amf0.decode_all(msg.payload)
            data = await asyncio.wait_for(self.r.read(65536), 5)
            assert data, "server closed the connection"
            self.pending += self.parser.feed(data)

    async def publish(self, name: str) -> list[amf0.Amf0Value]:
        await self.handshake()
        await self.command("connect", 1.0, {"app": "live", "tcUrl": "rtmp://x/live"})
        assert (await self.next_command())[0] == "_result"
        await self.command("createStream", 2.0, None)
        assert (await self.next_command())[:2] == ["_result", 2.0]
        await self.command("publish", 3.0, None, name, "live", stream_id=1)
        return await self.next_command()

    async def send_video(self, timestamp: int, body: bytes) -> None:
        self.w.write(self.chunks.write(6, 9, 1, timestamp, body))
        await self.w.drain()

    async def wait_closed(self) -> None:
        while await asyncio.wait_for(self.r.read(65536), 5):
            pass
        self.w.close()


async def wait_for(predicate: Callable[[], bool], hub: RecordingHub) -> None:
    async with asyncio.timeout(5):
        while not predicate():
            hub.changed.clear()
            await hub.changed.wait()


def status_code(values: list[amf0.Amf0Value]) -> str:
    assert values[0] == "onStatus"
    info = values[3]
    assert isinstance(info, dict)
    return str(info["code"])


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
async def test_ffmpeg_publish(server: RtmpServer, hub: RecordingHub) -> None:
    # A real encoder exercises the digest handshake, chunking and command order.
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg",
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=30",
        "-f",
        "lavfi",
        "-i",
        "sine",
        "-t",
        "3",
        "-c:v",
        "libx264",
        "-tune",
        "zerolatency",
        "-c:a",
        "aac",
        "-f",
        "flv",
        f"rtmp://127.0.0.1:{server.port}/live/test?key=1",
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    await wait_for(lambda: len(hub.unpublished) == 1, hub)

    (stream,) = hub.streams
    assert stream.key == "live/test"
    assert hub.unpublished == [stream]
    assert hub.publisher_ids[0].startswith("pub-")
    (meta,) = stream.metadata
    assert meta["width"] == 320.0 and meta["height"] == 240.0
    first_video = stream.video[0][1]
    assert first_video[0] & 0x0F == 7 and first_video[1] == 0  # AVC sequence header
    assert stream.audio[0][1][0] >> 4 == 10 and stream.audio[0][1][1] == 0  # AAC header
    assert len(stream.audio) > 100
    assert len(stream.video) > 80
    video_ts = [ts for ts, _ in stream.video]
    audio_ts = [ts for ts, _ in stream.audio]
    assert video_ts == sorted(video_ts)
    assert audio_ts == sorted(audio_ts)
    assert 2800 <= video_ts[-1] <= 3100
    assert 2800 <= audio_ts[-1] <= 3100
    assert server.connection_count == 0


async def test_stream_busy_is_rejected(server: RtmpServer, hub: RecordingHub) -> None:
    hub.busy = True
    client = await RawClient.open(server.port)
    reply = await client.publish("test")
    assert status_code(reply) == "NetStream.Publish.BadName"
    info = reply[3]
    assert isinstance(info, dict)
    assert info["description"] == "stream live/test is already being published"
    await client.wait_closed()
    assert hub.unpublished == []


async def test_kick_closes_publisher(server: RtmpServer, hub: RecordingHub) -> None:
    client = await RawClient.open(server.port)
    assert status_code(await client.publish("cam")) == "NetStream.Publish.Start"
    await client.send_video(0, b"\x17\x00\x00\x00\x00\x01")
    await wait_for(lambda: bool(hub.streams and hub.streams[0].video), hub)
    hub.streams[0].kick("taken over by pub-x")
    await client.wait_closed()
    await asyncio.sleep(0)
    assert server.connection_count == 0


async def test_disconnect_unpublishes(server: RtmpServer, hub: RecordingHub) -> None:
    client = await RawClient.open(server.port)
    assert status_code(await client.publish("cam")) == "NetStream.Publish.Start"
    # Half a message, then the publisher goes away.
    client.w.write(client.chunks.write(6, 9, 1, 0, bytes(5000))[:1000])
    await client.w.drain()
    client.w.close()
    await wait_for(lambda: len(hub.unpublished) == 1, hub)
    assert hub.streams[0].video == []


async def test_hub_exception_closes_only_that_connection(
    server: RtmpServer, hub: RecordingHub
) -> None:
    hub.fail_on_video = True
    client = await RawClient.open(server.port)
    assert status_code(await client.publish("bad")) == "NetStream.Publish.Start"
    await client.send_video(0, b"\x17\x01\x00\x00\x00\x00")
    await client.wait_closed()
    await wait_for(lambda: len(hub.unpublished) == 1, hub)
    # The server still takes new publishers.
    hub.fail_on_video = False
    other = await RawClient.open(server.port)
    assert status_code(await other.publish("good")) == "NetStream.Publish.Start"
    other.w.close()


async def test_garbage_closes_connection(server: RtmpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()


async def test_handshake_timeout(hub: RecordingHub) -> None:
    srv = RtmpServer(make_config(handshake_timeout=0.2), hub)  # type: ignore[arg-type]
    await srv.start()
    try:
        client = await RawClient.open(srv.port)
        await client.handshake()
        # Connected but never publishes: closed after rtmp.handshake_timeout.
        await client.wait_closed()
    finally:
        await srv.stop()


async def test_idle_timeout_while_publishing(hub: RecordingHub) -> None:
    srv = RtmpServer(make_config(idle_timeout=0.2), hub)  # type: ignore[arg-type]
    await srv.start()
    try:
        client = await RawClient.open(srv.port)
        assert status_code(await client.publish("cam")) == "NetStream.Publish.Start"
        await client.wait_closed()
        await wait_for(lambda: len(hub.unpublished) == 1, hub)
    finally:
        await srv.stop()


async def test_stop_closes_connections(hub: RecordingHub) -> None:
    srv = RtmpServer(make_config(), hub)  # type: ignore[arg-type]
    await srv.start()
    port = srv.port
    client = await RawClient.open(port)
    assert status_code(await client.publish("cam")) == "NetStream.Publish.Start"
    assert srv.connection_count == 1
    await srv.stop()
    assert srv.connection_count == 0
    assert len(hub.unpublished) == 1
    await client.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_bind_error_names_the_setting(hub: RecordingHub, server: RtmpServer) -> None:
    other = RtmpServer(make_config(port=server.port), hub)  # type: ignore[arg-type]
    with pytest.raises(OSError) as exc:
        await other.start()
    assert f"cannot listen for RTMP on 127.0.0.1:{server.port} (rtmp.listen/rtmp.port)" in str(
        exc.value
    )


def test_raw_client_message_framing() -> None:
    # The test client's own chunking must round-trip, or the tests above prove nothing.
    data = ChunkWriter().write(6, 9, 1, 5, bytes(300))
    assert ChunkReader(1000).feed(data) == [RtmpMessage(9, 1, 5, bytes(300), 6)]
    assert struct.unpack(">I", ChunkWriter().write(2, 1, 0, 0, b"\0\0\0\1")[-4:]) == (1,)


def test_tag_rate_allows_the_burst_then_the_rate() -> None:
    rate = TagRate(300)
    assert rate.burst == 1200
    # A backlog after a stall: the whole burst at once is fine, one more is not.
    assert rate.take(1200, 10.0)
    assert not rate.take(1, 10.0)
    # Refilled at 300 a second, never beyond the burst.
    rate = TagRate(300)
    assert rate.take(1200, 0.0)
    assert rate.take(300, 1.0)
    assert not rate.take(1, 1.0)
    assert rate.take(1200, 100.0)


def test_tag_rate_of_a_normal_stream_never_runs_out() -> None:
    # 60 fps video and AAC at 48 kHz (about 47 frames a second) for ten minutes.
    rate = TagRate(300)
    now = 0.0
    for _ in range(600 * 100):
        now += 0.01
        assert rate.take(2, now)
