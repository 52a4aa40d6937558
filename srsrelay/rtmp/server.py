"""asyncio adapter: accepts RTMP publishers and feeds their media into the hub.

One task per connection reads from the socket, feeds RtmpConnection and writes its
replies. Every hub call is guarded: an exception closes that connection, not the server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import time
from dataclasses import dataclass

import structlog

from srsrelay.config import AuthConfig, RtmpConfig
from srsrelay.hooks import HookClient, PublishAuth, publish_key, request_body
from srsrelay.hub.registry import Hub, StreamBusy, TooManyPublishers
from srsrelay.hub.stream import PublishRejected, Stream
from srsrelay.limits import LimitHits
from srsrelay.rtmp.connection import (
    ConnectionState,
    Event,
    MediaReceived,
    MetadataReceived,
    PlayRejected,
    ProtocolError,
    PublishEnded,
    PublishRequested,
    RtmpConnection,
)

log = structlog.get_logger(__name__)

READ_SIZE = 64 * 1024
"""Bytes read from a socket at once; also the StreamReader buffer limit."""
MAX_CONNECTIONS = 1000
"""Most simultaneous RTMP connections; more are closed right after accept."""
TAG_BURST_SECONDS = 4.0
"""Seconds of rtmp.max_tag_rate a publisher may send at once (a backlog after a stall)."""


class TagRate:
    """Token bucket on a publisher's audio and video messages (sans-I/O: `now` is passed in).

    A publisher may send `rate` messages per second on average and a burst of
    TAG_BURST_SECONDS worth; `take` says when it is over.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.burst = rate * TAG_BURST_SECONDS
        self._tokens = self.burst
        self._last: float | None = None

    def take(self, count: int, now: float) -> bool:
        """Spend `count` tokens; False when the bucket is empty (the publisher is over)."""
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= count
        return self._tokens >= 0


@dataclass(frozen=True, slots=True)
class RtmpClient:
    """A snapshot of one RTMP connection, for the API."""

    id: str
    """The publisher id ("pub-" and 8 hex digits), also for connections not publishing."""
    peer: str
    """The client's "address:port"."""
    ip: str
    """The client's address."""
    stream: str
    """The stream key ("app/name") it publishes, or "" before (or after) a publish."""
    publishing: bool
    """It publishes `stream` now."""
    bytes_in: int
    """Bytes received from the client."""
    bytes_out: int
    """Bytes sent to the client."""
    connected_at: float
    """Unix time of the connection."""
    alive: float
    """Seconds since the connection."""


class RtmpServer:
    """Listens on rtmp.listen:rtmp.port and runs one session task per connection."""

    def __init__(
        self,
        config: RtmpConfig,
        hub: Hub,
        *,
        auth: PublishAuth | None = None,
        hooks: HookClient | None = None,
    ) -> None:
        self._config = config
        self._hub = hub
        self.auth = auth if auth is not None else PublishAuth(AuthConfig())
        """auth.publish_keys, checked on every publish (its `update` applies a reload)."""
        self.hooks = hooks
        """on_publish / on_unpublish; None: no hooks."""
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_ip: dict[str, int] = {}
        """Open connections per client IP; only IPs with one open (at most MAX_CONNECTIONS)."""
        self.limit_hits = LimitHits()
        """Connections refused or closed by a limit, by its config key."""
        self.protocol_errors: collections.Counter[str] = collections.Counter()
        """Connections closed for a protocol error, by ProtocolError.kind."""
        self._closed_bytes_in = 0
        self._closed_bytes_out = 0
        """Bytes of the connections that have closed (open ones count their own)."""

    @property
    def port(self) -> int:
        """The bound TCP port (useful when rtmp.port is 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("RTMP server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connection_count(self) -> int:
        """Open RTMP connections."""
        return len(self._sessions)

    @property
    def bytes_in(self) -> int:
        """Bytes received from RTMP clients since start."""
        return self._closed_bytes_in + sum(s.bytes_in for s in self._sessions)

    @property
    def bytes_out(self) -> int:
        """Bytes sent to RTMP clients since start."""
        return self._closed_bytes_out + sum(s.bytes_out for s in self._sessions)

    def clients(self) -> list[RtmpClient]:
        """The open connections, oldest first."""
        now = time.time()
        return [s.snapshot(now) for s in sorted(self._sessions, key=lambda s: s.connected_at)]

    def kick(self, client_id: str, reason: str) -> bool:
        """Close the connection `client_id`; a publish ends as if the client had left.
        False if no open connection has that id. The connection is gone once its task
        has finished (at the next turn of the event loop)."""
        for session in list(self._sessions):
            if session.publisher_id == client_id:
                log.info("rtmp client kicked", peer=session.peer, id=client_id, reason=reason)
                session.close(f"kicked: {reason}")
                return True
        return False

    async def start(self) -> None:
        """Start listening; raises OSError naming the address if it cannot bind."""
        if self._server is not None:
            raise RuntimeError("RTMP server already started")
        host, port = self._config.listen, self._config.port
        try:
            self._server = await asyncio.start_server(self._on_client, host, port, limit=READ_SIZE)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen for RTMP on {host}:{port} (rtmp.listen/rtmp.port): {exc}"
            ) from exc
        log.info("rtmp listening", listen=host, port=self.port)

    async def stop(self) -> None:
        """Stop accepting, close every connection and wait for their tasks to end."""
        server = self._server
        if server is None:
            return
        server.close()
        for session in list(self._sessions):
            session.close("server stopping")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        self._server = None
        log.info("rtmp stopped")

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer_name(writer)
        if len(self._sessions) >= MAX_CONNECTIONS:
            log.warning("rtmp connection refused", peer=peer, reason="too many connections")
            writer.close()
            return
        ip = _peer_ip(writer)
        open_from_ip = self._per_ip.get(ip, 0)
        if open_from_ip >= self._config.max_connections_per_ip:
            self._limit_hit(
                "rtmp.max_connections_per_ip",
                ip=ip,
                peer=peer,
                limit=self._config.max_connections_per_ip,
            )
            writer.close()
            return
        self._per_ip[ip] = open_from_ip + 1
        session = _Session(
            self._config, self._hub, reader, writer, peer, auth=self.auth, hooks=self.hooks
        )
        task = asyncio.create_task(session.run(), name=f"rtmp {peer}")
        session.task = task
        self._sessions.add(session)
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            # A task cancelled before its first step never ran its own cleanup.
            writer.close()
            self._tasks.discard(finished)
            self._sessions.discard(session)
            left = self._per_ip.pop(ip, 1) - 1
            if left > 0:
                self._per_ip[ip] = left
            if session.limit_hit is not None:
                self._limit_hit(session.limit_hit, peer=peer, id=session.publisher_id)
            if session.protocol_error is not None:
                self.protocol_errors[session.protocol_error] += 1
            self._closed_bytes_in += session.bytes_in
            self._closed_bytes_out += session.bytes_out

        task.add_done_callback(done)

    def _limit_hit(self, setting: str, **context: object) -> None:
        """Count a connection refused or closed by `setting`; log at most once a second."""
        since = self.limit_hits.hit(setting, time.monotonic())
        if since is not None:
            log.warning(
                "limit reached",
                setting=setting,
                hits=since,
                total=self.limit_hits[setting],
                **context,
            )


def _peer_ip(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class _Session:
    """One client connection: socket I/O around an RtmpConnection."""

    def __init__(
        self,
        config: RtmpConfig,
        hub: Hub,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        *,
        auth: PublishAuth | None = None,
        hooks: HookClient | None = None,
    ) -> None:
        self._config = config
        self._hub = hub
        self._auth = auth
        self._hooks = hooks
        self._published: dict[str, str] | None = None
        """Hook body of the publish that was authorized (for on_unpublish), until it ends."""
        self._reader = reader
        self._writer = writer
        self.peer = peer
        self.publisher_id = "pub-" + secrets.token_hex(4)
        self.task: asyncio.Task[None] | None = None
        self._conn = RtmpConnection(config)
        self._stream: Stream | None = None
        self._stream_key = ""
        self._close_reason: str | None = None
        """Set when we decide to close; the read loop stops at the next turn."""
        self.limit_hit: str | None = None
        """The config key of the limit that closed the connection, if one did."""
        self._cancelled_by_us = False
        self._tag_rate = TagRate(config.max_tag_rate)
        self.protocol_error: str | None = None
        """The ProtocolError.kind that closed the connection, if one did."""
        self.bytes_in = 0
        """Bytes read from the socket."""
        self.bytes_out = 0
        """Bytes written to the socket."""
        self.connected_at = time.time()
        """Unix time of the connection."""

    def snapshot(self, now: float) -> RtmpClient:
        """The connection as the API lists it; `now` is a Unix time."""
        ip, _, _ = self.peer.rpartition(":")
        return RtmpClient(
            id=self.publisher_id,
            peer=self.peer,
            ip=ip.strip("[]") or self.peer,
            stream=self._stream_key if self._stream is not None else "",
            publishing=self._stream is not None,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            connected_at=self.connected_at,
            alive=max(0.0, now - self.connected_at),
        )

    def close(self, reason: str) -> None:
        """Close from outside the session task (kick, shutdown)."""
        if self._close_reason is None:
            self._close_reason = reason
        if self.task is not None and not self.task.done() and self.task is not _current_task():
            self._cancelled_by_us = True
            self.task.cancel()

    def kick(self, reason: str) -> None:
        """Called by the hub when another publisher took over (the hub already ended
        our stream)."""
        log.info("rtmp publisher kicked", peer=self.peer, id=self.publisher_id, reason=reason)
        self._stream = None
        self.close(f"kicked: {reason}")

    async def run(self) -> None:
        log.info("rtmp connection opened", peer=self.peer, id=self.publisher_id)
        try:
            await self._serve()
        except asyncio.CancelledError:
            if not self._cancelled_by_us:
                raise
        except OSError as exc:  # ConnectionResetError and friends
            self._set_reason(f"socket error: {exc}")
        except Exception:
            log.exception("rtmp connection failed", peer=self.peer, id=self.publisher_id)
            self._set_reason("internal error")
        finally:
            self._finish()

    def _set_reason(self, reason: str) -> None:
        if self._close_reason is None:
            self._close_reason = reason

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self._conn
        # Only the first publish has to happen within rtmp.handshake_timeout.
        handshake_deadline: float | None = loop.time() + self._config.handshake_timeout
        while self._close_reason is None:
            if conn.state is ConnectionState.PUBLISHING:
                handshake_deadline = None
            timeout = self._config.idle_timeout
            if handshake_deadline is not None:
                timeout = min(timeout, handshake_deadline - loop.time())
            try:
                if timeout <= 0:
                    raise TimeoutError
                async with asyncio.timeout(timeout):
                    data = await self._reader.read(READ_SIZE)
            except TimeoutError:
                if handshake_deadline is not None and loop.time() >= handshake_deadline:
                    self.limit_hit = "rtmp.handshake_timeout"
                    self._set_reason(
                        f"no publish within rtmp.handshake_timeout="
                        f"{self._config.handshake_timeout}s"
                    )
                else:
                    self.limit_hit = "rtmp.idle_timeout"
                    self._set_reason(f"no data for rtmp.idle_timeout={self._config.idle_timeout}s")
                break
            if not data:
                self._set_reason("client closed the connection")
                break
            self.bytes_in += len(data)
            # The read loop waits while a publish is being authorized (hooks.timeout at
            # most): the client's media stays in the socket buffer meanwhile.
            await self._handle(conn.receive_data(data, loop.time()))
            out = conn.data_to_send()
            if out:
                self._writer.write(out)
                self.bytes_out += len(out)
                try:
                    async with asyncio.timeout(self._config.idle_timeout):
                        await self._writer.drain()
                except TimeoutError:
                    self.limit_hit = "rtmp.idle_timeout"
                    self._set_reason(
                        f"client did not read for rtmp.idle_timeout={self._config.idle_timeout}s"
                    )

    async def _handle(self, events: list[Event]) -> None:
        received_at = time.monotonic()
        media = sum(1 for event in events if isinstance(event, MediaReceived))
        if media and self._stream is not None and not self._tag_rate.take(media, received_at):
            rate = self._config.max_tag_rate
            reason = (
                f"stream {self._stream_key}: more than {rate} audio/video messages per second "
                f"(rtmp.max_tag_rate={rate}, burst {TAG_BURST_SECONDS:g} s)"
            )
            log.warning(
                "rtmp publish rejected", peer=self.peer, stream=self._stream_key, reason=reason
            )
            self.limit_hit = "rtmp.max_tag_rate"
            self._set_reason(f"publish rejected: {reason}")
            self._reject(reason)
            return
        for event in events:
            if self._close_reason is not None:
                return
            if isinstance(event, MediaReceived):
                stream = self._stream
                if stream is None:
                    continue
                try:
                    if event.kind == "video":
                        stream.on_video_tag(event.timestamp_ms, event.body, received_at)
                    else:
                        stream.on_audio_tag(event.timestamp_ms, event.body, received_at)
                except PublishRejected as exc:
                    # The publisher's data cannot be relayed (e.g. no SPS): say why, no traceback.
                    log.warning(
                        "rtmp publish rejected",
                        peer=self.peer,
                        stream=self._stream_key,
                        reason=str(exc),
                    )
                    self._set_reason(f"publish rejected: {exc}")
                    self._reject(str(exc))
                except Exception:
                    self._hub_failed("media")
            elif isinstance(event, MetadataReceived):
                if self._stream is not None:
                    try:
                        self._stream.on_metadata(event.metadata)
                    except Exception:
                        self._hub_failed("metadata")
            elif isinstance(event, PublishRequested):
                await self._publish(event)
            elif isinstance(event, PublishEnded):
                self._unpublish(event.reason)
            elif isinstance(event, PlayRejected):
                self._set_reason(f"play of {event.stream_name!r} refused (RTMP is ingest only)")
            elif isinstance(event, ProtocolError):
                log.warning(
                    "rtmp protocol error",
                    peer=self.peer,
                    id=self.publisher_id,
                    kind=event.kind,
                    error=event.message,
                )
                self.protocol_error = event.kind
                self._set_reason(f"protocol error ({event.kind})")

    async def _publish(self, event: PublishRequested) -> None:
        key = f"{event.app}/{event.stream_name}"
        if not await self._authorize_publish(event, key):
            return
        try:
            stream = self._hub.publish(event.app, event.stream_name, self.publisher_id, self.kick)
        except TooManyPublishers as exc:
            self._conn.reject_publish("NetStream.Publish.Rejected", str(exc))
            self._set_reason("publish refused: rtmp.max_publishers reached")
            return
        except StreamBusy as exc:
            self._conn.reject_publish("NetStream.Publish.BadName", str(exc))
            log.info("rtmp publish refused", peer=self.peer, stream=key, reason=str(exc))
            self._set_reason("publish refused: stream busy")
            return
        except Exception:
            log.exception("rtmp publish failed", peer=self.peer, stream=key)
            self._conn.reject_publish("NetStream.Publish.Failed", f"cannot publish {key}")
            self._set_reason("publish failed")
            return
        self._stream = stream
        self._stream_key = key
        self._conn.accept_publish()
        log.info("rtmp publish", peer=self.peer, id=self.publisher_id, stream=key)

    async def _authorize_publish(self, event: PublishRequested, key: str) -> bool:
        """auth.publish_keys, then the on_publish hook. A refusal answers onStatus
        NetStream.Publish.Unauthorized and closes the connection."""
        body = request_body(
            client_id=self.publisher_id,
            ip=_peer_ip(self._writer),
            app=event.app,
            stream=event.stream_name,
            param=event.query,
            token=publish_key(event.query),
        )
        reason = self._auth.check(event.query) if self._auth is not None else None
        if reason is None and self._hooks is not None:
            allowed, why = await self._hooks.check("on_publish", body)
            reason = None if allowed else why
        if reason is not None:
            self._conn.reject_publish(
                "NetStream.Publish.Unauthorized", f"publish of {key} refused: {reason}"
            )
            log.info("rtmp publish refused", peer=self.peer, stream=key, reason=reason)
            self._set_reason(f"publish refused: {reason}")
            return False
        self._published = body
        return True

    def _unpublish(self, reason: str) -> None:
        # on_unpublish for every publish that on_publish allowed (as SRS), once.
        published, self._published = self._published, None
        if published is not None and self._hooks is not None:
            self._hooks.notify("on_unpublish", {**published, "reason": reason})
        stream = self._stream
        if stream is None:
            return
        self._stream = None
        log.info("rtmp unpublish", peer=self.peer, stream=self._stream_key, reason=reason)
        try:
            self._hub.unpublish(stream)
        except Exception:
            log.exception("rtmp unpublish failed", peer=self.peer, stream=self._stream_key)

    def _reject(self, reason: str) -> None:
        """End the stream at once (no reconnect grace): its data cannot be relayed."""
        stream = self._stream
        if stream is None:
            return
        self._stream = None
        try:
            self._hub.end(stream, f"publish rejected: {reason}")
        except Exception:
            log.exception("rtmp unpublish failed", peer=self.peer, stream=self._stream_key)

    def _hub_failed(self, what: str) -> None:
        log.exception(
            "rtmp stream rejected data", peer=self.peer, stream=self._stream_key, what=what
        )
        self._set_reason(f"stream failed on {what}")
        self._unpublish("stream error")

    def _finish(self) -> None:
        reason = self._close_reason or "closed"
        self._conn.close(reason)
        self._unpublish(reason)
        self._writer.close()
        log.info("rtmp connection closed", peer=self.peer, id=self.publisher_id, reason=reason)


def _current_task() -> asyncio.Task[object] | None:
    with contextlib.suppress(RuntimeError):
        return asyncio.current_task()
    return None
