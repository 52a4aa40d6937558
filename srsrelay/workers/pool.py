"""Worker processes (daemon.workers): each serves viewers on its own RTC port.

This (the ingest) process keeps RTMP, the hub, HTTP and the API. It is the hub's
StreamTap: every frame a stream makes is serialized once and written to each worker
over that worker's unix socket. Workers keep a copy of each stream (GOP cache and all)
and serve their viewers from it.

A worker that exits, stops sending its heartbeat or breaks the protocol is killed if
needed, its viewers are accounted as closed (on_stop hooks, API, metrics) and it is
started again; the publishers and the other workers carry on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from srsrelay.config import Config
from srsrelay.hooks import HookClient
from srsrelay.hub.frames import MediaKind, RtpFrame
from srsrelay.hub.registry import Hub
from srsrelay.hub.stream import Stream
from srsrelay.workers import wire
from srsrelay.workers.wire import Msg

log = structlog.get_logger(__name__)

FEED_BUFFER_LIMIT = 8 * 1024 * 1024
"""Bytes of frames waiting to be written to one worker's socket. Beyond it that worker
loses whole frames: its copy of a stream skips to the next keyframe."""
READY_TIMEOUT = 30.0
"""Seconds a started worker has to connect and report its RTC port."""
HEARTBEAT_INTERVAL = 1.0
"""Seconds between two heartbeats of a worker."""
HEARTBEAT_TIMEOUT = 10.0
"""Seconds without a heartbeat after which a worker counts as hung and is killed."""
RESTART_DELAY = 0.5
"""Seconds before a dead worker is started again; doubles per quick death."""
RESTART_DELAY_MAX = 10.0
"""Longest wait before a restart."""
STABLE_AFTER = 30.0
"""A worker that ran this long before dying is restarted after RESTART_DELAY again."""
LINK_GRACE = 1.0
"""Seconds a worker whose socket closed has to exit by itself before it is killed."""
API_TIMEOUT = 2.0
"""Seconds the API waits for one worker's answer; a worker that does not answer is
reported as unreachable."""
PROXY_MARGIN = 10.0
"""Seconds a forwarded WHEP request may take beyond http.whep_wait_for_publisher and
hooks.timeout."""
SESSION_HEADER = "X-Srsrelay-Session"
"""Response header a worker names a new viewer session with (not passed on)."""
HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Keep-Alive",
        "Date",
        "Server",
        "Vary",
        SESSION_HEADER,
        "X-Forwarded-For",
    )
)
"""Headers not copied between the client's request or response and a worker's."""


class WorkerState(enum.Enum):
    STARTING = "starting"
    """The process runs; it has not reported its RTC port yet."""
    READY = "ready"
    """It serves viewers."""
    DOWN = "down"
    """Not running (waiting for its restart, or the pool stopped)."""


@dataclass
class Viewer:
    """A viewer session a worker reported."""

    stream: str
    """Its stream key (app/name)."""
    hook: dict[str, Any] | None = None
    """Its on_stop hook body (None: the hook is not told)."""


@dataclass(frozen=True)
class Forwarded:
    """A worker's answer to a forwarded request."""

    status: int
    body: bytes
    headers: list[tuple[str, str]]
    """Headers to pass on (hop-by-hop and CORS headers removed)."""
    session: str | None
    """The viewer session the request created (POST), else None."""


class WorkerStartError(Exception):
    """A worker did not start; the message says which and what to look at."""


class WorkerUnavailable(Exception):
    """No worker could take the request; the message says why."""


@dataclass
class Worker:
    """One worker process and what this process knows of it."""

    index: int
    http_path: str
    state: WorkerState = WorkerState.DOWN
    process: asyncio.subprocess.Process | None = None
    link: _Link | None = None
    rtc_port: int = 0
    started_at: float = 0.0
    last_seen: float = 0.0
    """time.monotonic() of its last message."""
    restarts: int = 0
    """Times it was started again after dying."""
    viewers: dict[str, Viewer] = field(default_factory=dict)
    """Its open viewer sessions by id; at most rtc.max_viewers (the pool refuses more)."""
    pending: int = 0
    """Forwarded POSTs not answered yet (for spreading the load)."""
    killed_for: str | None = None
    """Why this process killed it ("hung", "protocol"), until its exit is seen."""
    skipping: set[int] = field(default_factory=set)
    """Stream ids whose frames it lost to FEED_BUFFER_LIMIT: it gets their next keyframe."""
    feed_dropped: int = 0
    """Frames not written to it (FEED_BUFFER_LIMIT)."""
    feed_bytes: int = 0
    """Bytes of frames written to it."""
    client: aiohttp.ClientSession | None = None
    watcher: asyncio.Task[None] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "state": self.state.value,
            "pid": self.process.pid if self.process is not None else None,
            "rtc_port": self.rtc_port,
            "viewers": len(self.viewers),
            "restarts": self.restarts,
            "feed_bytes": self.feed_bytes,
            "feed_dropped": self.feed_dropped,
        }


class _Link(asyncio.Protocol):
    """The ingest end of one worker's unix socket."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self._reader = wire.Reader()
        self.transport: asyncio.Transport | None = None
        self.worker: Worker | None = None
        """Set once the worker said which one it is (JOIN)."""
        self.peer_pid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.peer_pid = struct.unpack("3i", creds)[0]

    def data_received(self, data: bytes) -> None:
        try:
            for message in self._reader.feed(data):
                self._pool._on_message(self, message)
        except wire.WireError as exc:
            log.error("worker broke the protocol", worker=self._index(), error=str(exc))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool._on_link_lost(self)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _index(self) -> int | None:
        return self.worker.index if self.worker is not None else None


def worker_config_json(config: Config) -> dict[str, Any]:
    """The configuration as JSON for a worker (tuples become lists)."""
    return dataclasses.asdict(config)


class WorkerPool:
    """Starts, feeds, watches and restarts the worker processes. The hub's StreamTap."""

    def __init__(
        self,
        config: Config,
        count: int,
        hub: Hub,
        hooks: HookClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.count = count
        self._hub = hub
        self._hooks = hooks
        self._clock = clock
        self._dir = ""
        self._server: asyncio.AbstractServer | None = None
        self.workers: list[Worker] = []
        self._owner: dict[str, Worker] = {}
        """Viewer session id -> the worker serving it."""
        self._ids: dict[int, int] = {}
        """id() of a stream (or rendition) this process made -> its id on the wire."""
        self._streams: dict[int, Stream] = {}
        """Wire id -> the stream, for as long as it lives."""
        self._described: dict[int, tuple[object, ...]] = {}
        """Wire id -> the description the workers last got."""
        self._parents: dict[int, int] = {}
        """Wire id of a rendition -> wire id of the stream it was made from."""
        self._next_id = 1
        self._stopping = False
        self._starting = True
        """Until every worker was ready once: a worker that dies then fails the start."""
        self._monitor: asyncio.Task[None] | None = None
        self.viewers_lost = 0
        """Viewer sessions ended because their worker died."""
        self.deaths: collections.Counter[str] = collections.Counter()
        """Workers that died, by how (exited, hung, protocol)."""

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Listen on a private unix socket and start the workers; returns once every
        worker is ready (raises WorkerStartError naming the worker if one is not)."""
        self._dir = tempfile.mkdtemp(prefix="srsrelay-")
        os.chmod(self._dir, 0o700)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _Link(self), os.path.join(self._dir, "feed.sock")
        )
        self.workers = [
            Worker(index=k, http_path=os.path.join(self._dir, f"worker{k}.sock"))
            for k in range(self.count)
        ]
        for worker in self.workers:
            await self._spawn(worker)
        self._monitor = asyncio.create_task(self._watch_heartbeats(), name="worker heartbeats")
        deadline = self._clock() + READY_TIMEOUT
        for worker in self.workers:
            while worker.state is not WorkerState.READY:
                process = worker.process
                if process is not None and process.returncode is not None:
                    raise WorkerStartError(
                        f"worker {worker.index} exited while starting (exit code "
                        f"{process.returncode}); see its log lines above, e.g. its RTC "
                        f"port {self._port_of(worker)} in use (rtc.port + {worker.index})"
                    )
                if self._clock() > deadline:
                    raise WorkerStartError(
                        f"worker {worker.index} did not start within {READY_TIMEOUT:g} s "
                        f"(see its log lines above)"
                    )
                await asyncio.sleep(0.05)
        self._starting = False
        log.info(
            "workers ready",
            workers=self.count,
            rtc_ports=",".join(str(w.rtc_port) for w in self.workers),
        )

    async def stop(self) -> None:
        """Stop every worker gracefully (they close their viewers), within
        daemon.shutdown_timeout; then kill what is left. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._hub.tap = None
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        timeout = self.config.daemon.shutdown_timeout

        async def stopped(worker: Worker, process: asyncio.subprocess.Process) -> None:
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.warning("worker did not stop in time; killing it", worker=worker.index)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

        await asyncio.gather(
            *(stopped(w, w.process) for w in self.workers if w.process is not None)
        )
        for worker in self.workers:
            if worker.watcher is not None:
                worker.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.watcher
            await self._close_client(worker)
            if worker.link is not None:
                worker.link.close()
            worker.state = WorkerState.DOWN
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def reload(self, config: Config) -> None:
        """Pass a reloaded configuration on to every running worker."""
        self.config = config
        message = wire.encode_json(Msg.CONFIG, {"config": worker_config_json(config)})
        for worker in self.workers:
            if worker.link is not None:
                worker.link.send(message)

    async def _spawn(self, worker: Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.http_path)
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "srsrelay.workers.worker",
            "--socket",
            os.path.join(self._dir, "feed.sock"),
            "--index",
            str(worker.index),
            "--http",
            worker.http_path,
            stdin=asyncio.subprocess.DEVNULL,
        )
        worker.state = WorkerState.STARTING
        worker.started_at = worker.last_seen = self._clock()
        worker.watcher = asyncio.create_task(
            self._watch_exit(worker, worker.process), name=f"worker {worker.index}"
        )
        log.info("worker started", worker=worker.index, pid=worker.process.pid)

    def _port_of(self, worker: Worker) -> int | str:
        port = self.config.rtc.port
        return port + worker.index if port else "(any)"

    async def _watch_exit(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self._stopping or self._starting:
            return  # start() reports a worker that dies while starting
        how, worker.killed_for = worker.killed_for or "exited", None
        self.deaths[how] += 1
        log.error(
            "worker died",
            worker=worker.index,
            pid=process.pid,
            code=code,
            how=how,
            viewers=len(worker.viewers),
        )
        self._lose(worker, f"worker {worker.index} died (exit code {code})")
        await self._close_client(worker)
        lived = self._clock() - worker.started_at
        delay = (
            RESTART_DELAY
            if lived >= STABLE_AFTER
            else min(RESTART_DELAY_MAX, RESTART_DELAY * 2 ** min(worker.restarts, 5))
        )
        while True:
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn(worker)
            except OSError as exc:  # no process could be made (memory, process limits)
                log.error("worker could not be started again", worker=worker.index, error=str(exc))
                delay = RESTART_DELAY_MAX
                continue
            worker.restarts += 1
            return

    async def _watch_heartbeats(self) -> None:
        last = self._clock()
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            now = self._clock()
            stalled = now - last > 2 * HEARTBEAT_INTERVAL
            last = now
            if stalled:
                # This loop was busy: the workers' heartbeats may be waiting to be read.
                continue
            for worker in self.workers:
                process = worker.process
                if process is None or process.returncode is not None:
                    continue
                timeout = (
                    READY_TIMEOUT if worker.state is WorkerState.STARTING else (HEARTBEAT_TIMEOUT)
                )
                if now - worker.last_seen > timeout:
                    worker.killed_for = "hung"
                    log.error(
                        "worker stopped answering; killing it",
                        worker=worker.index,
                        pid=process.pid,
                        silent=round(now - worker.last_seen, 1),
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()  # _watch_exit restarts it

    def _lose(self, worker: Worker, reason: str) -> None:
        """`worker` is gone: its viewers' sessions ended with it."""
        worker.state = WorkerState.DOWN
        worker.rtc_port = 0
        worker.skipping.clear()
        if worker.link is not None:
            worker.link.worker = None
            worker.link.close()
            worker.link = None
        viewers, worker.viewers = worker.viewers, {}
        for session_id, viewer in viewers.items():
            self._owner.pop(session_id, None)
            if viewer.hook is not None:
                self._hooks.notify("on_stop", {**viewer.hook, "reason": reason})
        self.viewers_lost += len(viewers)
        if viewers:
            log.warning("viewers lost with their worker", worker=worker.index, viewers=len(viewers))

    async def _close_client(self, worker: Worker) -> None:
        client, worker.client = worker.client, None
        if client is not None:
            await client.close()

    # -- messages from workers -------------------------------------------------------

    def _on_message(self, link: _Link, message: wire.Message) -> None:
        worker = link.worker
        if worker is None:
            if message.kind is not Msg.JOIN:
                raise wire.WireError(f"first message is {message.kind.name}, not JOIN")
            self._join(link, message.json())
            return
        worker.last_seen = self._clock()
        kind = message.kind
        if kind is Msg.PING:
            return
        body = message.json()
        if kind is Msg.OPENED:
            session_id, stream = str(body.get("id", "")), str(body.get("stream", ""))
            hook = body.get("hook")
            worker.viewers[session_id] = Viewer(stream, hook if isinstance(hook, dict) else None)
            self._owner[session_id] = worker
        elif kind is Msg.CLOSED:
            session_id = str(body.get("id", ""))
            worker.viewers.pop(session_id, None)
            if self._owner.get(session_id) is worker:
                del self._owner[session_id]
        elif kind is Msg.READY:
            worker.rtc_port = int(body.get("rtc_port", 0))
            worker.state = WorkerState.READY
            worker.client = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=worker.http_path)
            )
            self._sync(worker)
            log.info("worker ready", worker=worker.index, rtc_port=worker.rtc_port)
        else:
            raise wire.WireError(f"a worker may not send {kind.name}")

    def _join(self, link: _Link, body: Mapping[str, Any]) -> None:
        index = body.get("index")
        worker = (
            self.workers[index]
            if isinstance(index, int) and 0 <= index < len(self.workers)
            else None
        )
        process = worker.process if worker is not None else None
        if worker is None or process is None or process.pid != link.peer_pid:
            raise wire.WireError(f"JOIN from pid {link.peer_pid} names no worker it runs")
        if worker.link is not None:
            raise wire.WireError(f"worker {worker.index} joined twice")
        link.worker = worker
        worker.link = link
        worker.last_seen = self._clock()
        link.send(
            wire.encode_json(
                Msg.HELLO, {"index": worker.index, "config": worker_config_json(self.config)}
            )
        )

    def _on_link_lost(self, link: _Link) -> None:
        worker = link.worker
        if worker is None or worker.link is not link:
            return
        worker.link = None
        process = worker.process
        if not self._stopping and process is not None and process.returncode is None:
            # A worker that failed closes its socket as it exits: give it that moment.
            asyncio.get_running_loop().call_later(LINK_GRACE, self._kill_unlinked, worker, process)

    def _kill_unlinked(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        if self._stopping or process.returncode is not None or worker.process is not process:
            return
        worker.killed_for = "protocol"
        log.error("worker link lost; killing it", worker=worker.index, pid=process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.kill()  # _watch_exit accounts for its viewers and restarts it

    def _sync(self, worker: Worker) -> None:
        """A worker became ready: describe every stream and send its current GOP."""
        link = worker.link
        if link is None:
            return
        for stream in self._hub.streams():
            for each in (stream, stream.rendition):
                if each is None or (not each.has_video and not each.has_audio):
                    continue
                stream_id = self._id_of(each)
                link.send(wire.encode_json(Msg.STREAM, self._describe(stream_id, each)))
                for frame in list(each.gop.frames):
                    self._write(worker, stream_id, frame, wire.encode_frame(stream_id, frame))

    # -- the hub's tap ---------------------------------------------------------------

    def on_frame(self, stream: Stream, frame: RtpFrame) -> None:
        stream_id = self._id_of(stream)
        parent_id = self._parents.get(stream_id)
        if parent_id is not None and parent_id in self._streams:
            self._announce(parent_id, self._streams[parent_id])  # workers need it first
        self._announce(stream_id, stream)
        data = wire.encode_frame(stream_id, frame)
        for worker in self.workers:
            if worker.state is WorkerState.READY:
                self._write(worker, stream_id, frame, data)

    def _announce(self, stream_id: int, stream: Stream) -> None:
        """Describe the stream to the workers if they have not got this description."""
        description = self._describe(stream_id, stream)
        key = tuple(description.values())
        if self._described.get(stream_id) != key:
            self._described[stream_id] = key
            self._broadcast(wire.encode_json(Msg.STREAM, description))

    def on_drop(self, stream: Stream, reason: str) -> None:
        stream_id = self._ids.get(id(stream))
        if stream_id is not None:
            self._broadcast(wire.encode_json(Msg.DROP, {"id": stream_id, "reason": reason}))

    def on_end(self, stream: Stream, reason: str) -> None:
        stream_id = self._ids.pop(id(stream), None)
        if stream_id is None:
            return
        self._streams.pop(stream_id, None)
        self._described.pop(stream_id, None)
        self._parents.pop(stream_id, None)
        for worker in self.workers:
            worker.skipping.discard(stream_id)
        self._broadcast(wire.encode_json(Msg.END, {"id": stream_id, "reason": reason}))

    def _id_of(self, stream: Stream) -> int:
        stream_id = self._ids.get(id(stream))
        if stream_id is None:
            stream_id = self._ids[id(stream)] = self._next_id
            self._streams[stream_id] = stream
            self._next_id += 1
            # A rendition is not in the hub: it hangs off the stream it was made from.
            parent = next((s for s in self._hub.streams() if s.rendition is stream), None)
            if parent is not None:
                self._parents[stream_id] = self._id_of(parent)
        return stream_id

    def _describe(self, stream_id: int, stream: Stream) -> dict[str, Any]:
        return {
            "id": stream_id,
            "app": stream.app,
            "name": stream.name,
            "publisher_id": stream.publisher_id,
            "video_codec": stream.video_codec,
            "video_fmtp": stream.video_fmtp,
            "profile_level_id": stream.profile_level_id,
            "has_video": stream.has_video,
            "has_audio": stream.has_audio,
            "rendition_of": self._parents.get(stream_id),
        }

    def _broadcast(self, data: bytes) -> None:
        for worker in self.workers:
            if worker.link is not None and worker.state is WorkerState.READY:
                worker.link.send(data)

    def _write(self, worker: Worker, stream_id: int, frame: RtpFrame, data: bytes) -> None:
        link = worker.link
        if link is None:
            return
        video = frame.kind is MediaKind.VIDEO
        if stream_id in worker.skipping and video:
            if not frame.keyframe:
                worker.feed_dropped += 1
                return
            worker.skipping.discard(stream_id)
        if link.buffered() > FEED_BUFFER_LIMIT:
            worker.feed_dropped += 1
            if video:
                worker.skipping.add(stream_id)
            return
        link.send(data)
        worker.feed_bytes += len(data)

    # -- serving requests ----------------------------------------------------------

    def ready(self) -> list[Worker]:
        return [w for w in self.workers if w.state is WorkerState.READY]

    def pick(self) -> Worker:
        """The ready worker with the fewest viewers; raises WorkerUnavailable."""
        ready = self.ready()
        if not ready:
            raise WorkerUnavailable("no worker process is running (they are restarting)")
        return min(ready, key=lambda w: (len(w.viewers) + w.pending, w.index))

    def owner(self, session_id: str) -> Worker | None:
        worker = self._owner.get(session_id)
        return worker if worker is not None and worker.state is WorkerState.READY else None

    def viewer_count(self) -> int:
        return sum(len(w.viewers) + w.pending for w in self.workers)

    def viewers_by_stream(self) -> collections.Counter[str]:
        return collections.Counter(v.stream for w in self.workers for v in w.viewers.values())

    def proxy_timeout(self) -> float:
        cfg = self.config
        return cfg.http.whep_wait_for_publisher + cfg.hooks.timeout + PROXY_MARGIN

    async def forward(
        self,
        worker: Worker,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        client: str,
        stream: str | None = None,
    ) -> Forwarded:
        """Send a request on to `worker`'s HTTP server; raises WorkerUnavailable if it
        cannot answer. A created session (POST) is noted as `worker`'s at once."""
        session = worker.client
        if session is None:
            raise WorkerUnavailable(f"worker {worker.index} is not running")
        out = {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
        out["X-Forwarded-For"] = client
        worker.pending += method == "POST"
        try:
            async with session.request(
                method,
                f"http://worker{path_qs}",
                headers=out,
                data=body if body else None,
                timeout=aiohttp.ClientTimeout(total=self.proxy_timeout()),
                allow_redirects=False,
            ) as response:
                data = await response.read()
                kept = [
                    (k, v)
                    for k, v in response.headers.items()
                    if k.lower() not in HOP_HEADERS and not k.lower().startswith("access-control-")
                ]
                created = response.headers.get(SESSION_HEADER)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WorkerUnavailable(
                f"worker {worker.index} did not answer ({type(exc).__name__})"
            ) from None
        finally:
            worker.pending -= method == "POST"
        if created and worker.state is WorkerState.READY:
            self._owner[created] = worker
            worker.viewers.setdefault(created, Viewer(stream or ""))
        return Forwarded(response.status, data, kept, created)

    async def fetch_json(self, path: str) -> list[tuple[Worker, dict[str, Any] | None]]:
        """GET `path` from every ready worker's API at once; None for one that failed."""

        async def one(worker: Worker) -> tuple[Worker, dict[str, Any] | None]:
            client = worker.client
            if client is None:
                return worker, None
            try:
                async with client.get(
                    f"http://worker{path}", timeout=aiohttp.ClientTimeout(total=API_TIMEOUT)
                ) as response:
                    if response.status != 200:
                        return worker, None
                    data = json.loads(await response.read())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("worker api failed", worker=worker.index, path=path, error=repr(exc))
                return worker, None
            return worker, data if isinstance(data, dict) else None

        return list(await asyncio.gather(*(one(w) for w in self.ready())))

    async def fetch_text(self, path: str) -> list[bytes]:
        """GET `path` from every ready worker (the metrics text); failures are skipped."""

        async def one(worker: Worker) -> bytes | None:
            client = worker.client
            if client is None:
                return None
            try:
                async with client.get(
                    f"http://worker{path}", timeout=aiohttp.ClientTimeout(total=API_TIMEOUT)
                ) as response:
                    return await response.read() if response.status == 200 else None
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("worker api failed", worker=worker.index, path=path, error=repr(exc))
                return None

        texts = await asyncio.gather(*(one(w) for w in self.ready()))
        return [t for t in texts if t is not None]

    def stats(self) -> dict[str, Any]:
        return {
            "configured": self.count,
            "running": len(self.ready()),
            "restarts": sum(w.restarts for w in self.workers),
            "deaths": dict(self.deaths),
            "viewers_lost": self.viewers_lost,
            "workers": [w.snapshot() for w in self.workers],
        }
