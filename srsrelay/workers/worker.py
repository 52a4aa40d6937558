"""A worker process: serves viewers of the streams the ingest process feeds it.

Started by WorkerPool as ``python -m srsrelay.workers.worker --socket S --index K --http H``.
It connects to the ingest process's unix socket S, says which worker it is, gets the
configuration, opens its own RTC port (rtc.port + K, or a free one when rtc.port is 0)
and an HTTP server on the unix socket H (WHEP and the API, reached only through the
ingest process). Every stream is a copy made from the frames it is fed. It exits when
the ingest process goes away, and stops gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from srsrelay.config import Config, ConfigError, config_from_dict
from srsrelay.hooks import HookClient
from srsrelay.http.server import HttpServer
from srsrelay.hub.registry import Hub
from srsrelay.hub.stream import Stream
from srsrelay.log import configure_logging
from srsrelay.metrics import Metrics
from srsrelay.rtmp.server import RtmpServer
from srsrelay.webrtc.server import RtcServer
from srsrelay.webrtc.viewer import ViewerSession
from srsrelay.workers import wire
from srsrelay.workers.pool import HEARTBEAT_INTERVAL, WorkerPool
from srsrelay.workers.wire import Msg

# Named, not __name__: run with -m, this module is __main__.
log = structlog.get_logger("srsrelay.workers.worker")

READ_SIZE = 256 * 1024
"""Bytes read from the ingest socket at a time."""
MAX_STREAMS = 100_000
"""Most stream copies kept; the ingest process ends streams it no longer has."""


def worker_config(config: Config, index: int) -> Config:
    """The relay's configuration as worker `index` runs it: its own RTC port; no rate
    limit or API access check of its own (the ingest process applies them; only it can
    reach this worker's HTTP socket)."""
    rtc = config.rtc
    port = rtc.port + index if rtc.port else 0
    return dataclasses.replace(
        config,
        rtc=dataclasses.replace(rtc, port=port),
        http=dataclasses.replace(config.http, whep_rate_limit=0.0),
        api=dataclasses.replace(config.api, access="open"),
    )


class WorkerRelay:
    """The parts of one worker process (the metrics collector reads them)."""

    def __init__(self, config: Config, index: int, http_path: str) -> None:
        self.index = index
        self.config = config = worker_config(config, index)
        self._http_path = http_path
        self.hub = Hub(
            config.hub,
            config.audio,
            config.rtc.payload_size,
            config.video,
            max_publishers=MAX_STREAMS,
        )
        self.rtc = RtcServer(config.rtc)
        self.hooks = HookClient(config.hooks)
        self.rtmp = RtmpServer(config.rtmp, self.hub)
        """Never started: the metrics read its (empty) counters."""
        self.http: HttpServer | None = None
        self.pool: WorkerPool | None = None
        """Workers run no workers of their own (the metrics read this)."""
        self.metrics = Metrics(self)
        self.streams: dict[int, Stream] = {}
        """Copies of the ingest process's streams, by their wire id."""
        self._link: asyncio.StreamWriter | None = None

    async def start(self, link: asyncio.StreamWriter) -> None:
        self._link = link
        await self.hooks.start()
        await self.rtc.start()
        self.rtc.closed_listeners.append(self._closed)
        self.http = HttpServer(
            self.config.http,
            self.hub,
            self.rtc,
            rtmp_port=self.config.rtmp.port,
            hooks=self.hooks,
            api=self.config.api,
            metrics=self.metrics,
            unix_path=self._http_path,
        )
        self.http.opened_listeners.append(self._opened)
        await self.http.start()
        self.metrics.start()
        self._send(Msg.READY, {"rtc_port": self.rtc.port})
        log.info("worker serving", worker=self.index, rtc_port=self.rtc.port, pid=os.getpid())

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.rtc.stop()
        self.hub.close()
        await self.metrics.stop()
        await self.hooks.stop()

    def reload(self, config: Config) -> None:
        cfg = self.config = worker_config(config, self.index)
        self.rtc.config = dataclasses.replace(cfg.rtc, port=self.rtc.config.port)
        if self.http is not None:
            self.http.reconfigure(cfg.http)
            self.http.api.update(cfg.api)
        self.hooks.update(cfg.hooks)
        log.info("worker config reloaded", worker=self.index)

    # -- the feed ------------------------------------------------------------------

    def apply(self, message: wire.Message) -> None:
        """One message from the ingest process; raises WireError if it makes no sense."""
        kind = message.kind
        if kind is Msg.FRAME:
            stream_id, frame = wire.decode_frame(message.body)
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.relay_frame(frame)
            return
        body = message.json()
        if kind is Msg.STREAM:
            self._describe(body)
        elif kind is Msg.END:
            self._end(_int(body, "id"), str(body.get("reason", "ended")))
        elif kind is Msg.DROP:
            stream = self.streams.get(_int(body, "id"))
            if stream is not None:
                stream.drop_readers(str(body.get("reason", "")))
        elif kind is Msg.CONFIG:
            self.reload(_config(body))
        else:
            raise wire.WireError(f"a worker does not take {kind.name} messages")

    def _describe(self, body: dict[str, Any]) -> None:
        stream_id = _int(body, "id")
        stream = self.streams.get(stream_id)
        if stream is None:
            if len(self.streams) >= MAX_STREAMS:
                raise wire.WireError(f"more than {MAX_STREAMS} streams")
            app, name = str(body.get("app", "")), str(body.get("name", ""))
            publisher = str(body.get("publisher_id", ""))
            parent_id = body.get("rendition_of")
            if parent_id is None:
                stream = self.hub.publish(app, name, publisher, kick=_no_kick)
            else:
                parent = self.streams.get(int(parent_id))
                if parent is None:
                    raise wire.WireError(f"rendition of unknown stream {parent_id}")
                cfg = self.config
                stream = Stream(
                    app, name, publisher, cfg.hub, cfg.audio, cfg.rtc.payload_size, cfg.video
                )
                parent.rendition = stream
            self.streams[stream_id] = stream
        stream.video_codec = str(body.get("video_codec", "H264"))
        stream.video_fmtp = str(body.get("video_fmtp", ""))
        profile = body.get("profile_level_id")
        stream.profile_level_id = str(profile) if profile is not None else None
        stream.has_video = bool(body.get("has_video"))
        stream.has_audio = bool(body.get("has_audio"))

    def _end(self, stream_id: int, reason: str) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        parent = next((s for s in self.streams.values() if s.rendition is stream), None)
        if parent is not None:
            parent.rendition = None
            stream.end(reason)
        else:
            self.hub.end(stream, reason)

    # -- sessions, told to the ingest process ----------------------------------------

    def _opened(self, session: ViewerSession, hook: dict[str, str]) -> None:
        self._send(Msg.OPENED, {"id": session.id, "stream": session.stream.key, "hook": hook})

    def _closed(self, session: ViewerSession) -> None:
        self._send(Msg.CLOSED, {"id": session.id, "reason": session.close_reason or "closed"})

    def ping(self) -> None:
        self._send(Msg.PING, {})

    def _send(self, kind: Msg, body: dict[str, Any]) -> None:
        link = self._link
        if link is not None and not link.is_closing():
            link.write(wire.encode_json(kind, body))


def _no_kick(reason: str) -> None:
    """A stream copy has no publisher connection here to close."""


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise wire.WireError(f"{key} must be an integer, got {value!r}")
    return value


def _config(body: dict[str, Any]) -> Config:
    data = body.get("config")
    if not isinstance(data, dict):
        raise wire.WireError("the message carries no configuration")
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise wire.WireError(f"configuration not valid: {exc}") from None


async def run(socket_path: str, index: int, http_path: str) -> int:
    """Serve until the ingest process goes away or SIGTERM; returns the exit code."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024
    )
    writer.write(wire.encode_json(Msg.JOIN, {"index": index}))
    parser = wire.Reader()
    messages: list[wire.Message] = []
    while not messages:
        data = await reader.read(READ_SIZE)
        if not data:
            return 1
        messages = parser.feed(data)
    hello = messages.pop(0)
    if hello.kind is not Msg.HELLO:
        print(f"srsrelay worker {index}: expected HELLO, got {hello.kind.name}", file=sys.stderr)
        return 1
    config = _config(hello.json())
    configure_logging(config.log)
    structlog.contextvars.bind_contextvars(worker=index)
    relay = WorkerRelay(config, index, http_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # A terminal's Ctrl-C reaches the whole process group: the ingest process stops its
    # workers in order, and reloads them on SIGHUP.
    for sig in (signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda: None)

    async def heartbeat() -> None:
        while True:
            relay.ping()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def feed() -> None:
        for message in messages:
            relay.apply(message)
        while data := await reader.read(READ_SIZE):
            for message in parser.feed(data):
                relay.apply(message)
        log.warning("ingest process went away; stopping", worker=index)

    code = 0
    try:
        await relay.start(writer)
    except OSError as exc:
        log.error("worker failed to start", worker=index, error=str(exc))
        await relay.stop()
        return 1
    tasks = [
        asyncio.create_task(heartbeat(), name="heartbeat"),
        asyncio.create_task(feed(), name="feed"),
        asyncio.create_task(stop.wait(), name="stop"),
    ]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        failure = task.exception()
        if failure is not None:
            log.error("worker failed", worker=index, error=repr(failure))
            code = 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await relay.stop()
    writer.close()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srsrelay-worker")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--http", required=True)
    args = parser.parse_args(argv)
    return asyncio.run(run(args.socket, args.index, args.http))


if __name__ == "__main__":
    sys.exit(main())
