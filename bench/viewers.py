"""Viewers per core: relay CPU, memory and loss as WHEP viewers are added.

Starts the relay with an ffmpeg publisher (720p30, libx264 ultrafast/zerolatency,
GOP 2 s, AAC) at each `--bitrates` value, then for each `--steps` count N runs N
lightweight viewers (bench/lightviewer.py: real WHEP, ICE, DTLS-SRTP, RTCP receiver
reports, no decoding) in a separate process. After `--warmup` seconds it measures,
over `--window` seconds:

- relay CPU (utime + stime of /proc/<pid>/stat, all threads), as ms per second;
- relay RSS (VmRSS) at the end of the window;
- packets lost as the viewers see them (sequence gaps), and media the relay's send
  path dropped (its own counters, /api/v1/rtc);
- handshake time, WHEP POST -> first RTP;
- relay-added latency, if the relay reports it (see LATENCY_FIELD; "n/a" otherwise).

The relay is pinned to CPU 0 and everything else (publisher, viewers, this script) to
CPU 1, so the relay's figures are those of one core. Per bitrate, least squares over
the steps give the CPU per viewer-second (the slope), viewers per core (1000 / slope)
and RSS per viewer.

The same viewers are then served by a baseline: stock aiortc fan-out (one
RTCPeerConnection per viewer, a MediaRelay of one MediaPlayer that demuxes H.264 +
Opus from a second ffmpeg without decoding), measured the same way at `--baseline-steps`.

Last, the multi-process mode ("workers": `[daemon] workers = K`, `--workers K`, by
default one per CPU this script may use; 0 skips it) at `--workers-bitrates` and the same
steps. Worker k is pinned to CPU k % (CPUs); the relay (ingest) process, the publisher,
the viewers and this script are not pinned, so the load generator shares the cores with
the workers. CPU, CPU wait and RSS are summed over the relay process and all its worker
processes (their pids are read from /api/v1/workers at each window: a worker may have
been restarted); send drops and relay-added latency are merged over the workers'
/api/v1/rtc reports. Viewers per machine = 1000 * K / slope (K processes serving viewers,
each at most one core), compared with the single-process viewers per core at the same
bitrate (the issue asks for >= WORKERS_RATIO_TARGET times).

    python bench/viewers.py                     # full run, a few minutes
    python bench/viewers.py --quick             # under a minute, proves it works
    python bench/viewers.py --steps 0,100,200,400 --bitrates 2000 --json out.json
    python bench/viewers.py --bitrates '' --baseline-steps '' --workers 2   # workers only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from srsrelay.webrtc.latency import LatencyHistogram  # noqa: E402
from tests.conftest import (  # noqa: E402
    FFMPEG,
    RelayProcess,
    ffmpeg_publish_args,
    free_port,
    start_relay,
    wait_live,
)

LIGHTVIEWER = ROOT / "bench" / "lightviewer.py"
SELF = Path(__file__).resolve()
UDP_INPUT_OPTIONS = "overrun_nonfatal=1&fifo_size=100000&buffer_size=4194304"
"""The baseline's MPEG-TS input: a large buffer, and an overrun loses data, not the stream."""
RELAY_CPU = 0
"""The CPU the relay (or the baseline server) is pinned to."""
OTHER_CPU = 1
"""The CPU of the publisher, the viewers and this script."""
LATENCY_FIELD = "latency"
"""GET /api/v1/rtc -> rtc["latency"]["video"]["counts"]: the relay's histogram of the time
from an RTMP message's arrival to the last RTP packet of its frame leaving for a viewer
(srsrelay/webrtc/latency.py); the step's window is the difference of two snapshots."""
SATURATED_MS = 900.0
"""Relay CPU ms per second at which a step counts as saturated (left out of the fit)."""
PUBLISHER_FPS = 30
"""Frames per second the publisher sends."""
DELIVERY_MIN = 0.97
"""A step whose viewers get fewer than this share of the video frames is degraded: the relay
dropped whole frames (no sequence gap shows that), so it is left out of the fit."""
VIEWER_BUSY_PCT = 90.0
"""Viewer-process CPU % above which its own losses may be the viewers' fault."""
LOSS_TARGET_PCT = 0.5
RSS_TARGET_KB = 200.0
VIEWERS_TARGET = {600: 1000, 2000: 300}
"""Viewers per core the issue asks for, by bitrate (kbit/s)."""
WORKERS_RATIO_TARGET = 1.8
"""Viewers per machine with worker processes, as a multiple of the single-process viewers
per core, that the issue asks for."""
READY_TIMEOUT = 60.0
"""Seconds the viewer process may take to connect, plus 0.2 s per viewer."""

CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_CPUS = tuple(sorted(os.sched_getaffinity(0)))
"""The CPUs this script may use (read before it pins itself)."""


# -- measuring a process -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of all threads of `pid` (proc(5), fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runqueue_wait_seconds(pid: int) -> float:
    """Time the threads of `pid` waited for a CPU while runnable (/proc/<pid>/task/*/schedstat,
    second field, ns): high when something else runs on the relay's core."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[1])
    return total / 1e9


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of `pid` (threads made later inherit it)."""
    if pinning():
        _set_affinity(pid, {cpu})


def unpin(pid: int) -> None:
    """Let every thread of `pid` run on any of ALL_CPUS."""
    if pinning():
        _set_affinity(pid, set(ALL_CPUS))


def _set_affinity(pid: int, cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def pinning() -> bool:
    return len(os.sched_getaffinity(0) | {RELAY_CPU, OTHER_CPU}) >= 2 and (os.cpu_count() or 1) > 1


def on_other_cpu() -> Callable[[], None] | None:
    if not pinning():
        return None
    return lambda: os.sched_setaffinity(0, {OTHER_CPU})


def on_any_cpu() -> Callable[[], None] | None:
    if not pinning():
        return None
    return lambda: os.sched_setaffinity(0, set(ALL_CPUS))


def worker_cpu(index: int) -> int:
    """The CPU worker process `index` is pinned to."""
    return ALL_CPUS[index % len(ALL_CPUS)]


def default_workers() -> int:
    """One worker process per CPU this script may use; 0 (skip) with a single CPU."""
    return len(ALL_CPUS) if len(ALL_CPUS) >= 2 else 0


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """(slope, intercept) of the best line through the points, None with < 2 distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


# -- results -------------------------------------------------------------------------


@dataclass
class Step:
    """One measured viewer count."""

    system: str
    """"srsrelay", "aiortc" or "workers"."""
    kbit: int
    """Publisher video bitrate, kbit/s."""
    viewers: int
    """Viewers asked for."""
    connected: int = 0
    """Viewers that got media."""
    failed: int = 0
    """Viewers that did not connect."""
    errors: list[str] = field(default_factory=list)
    """First distinct connect errors."""
    cpu_ms_per_s: float = 0.0
    """Server CPU ms per wall second over the window."""
    wait_ms_per_s: float = 0.0
    """Server threads runnable but not running, ms per wall second (CPU contention)."""
    rss_kb: int = 0
    """Server RSS at the end of the window."""
    loss_pct: float = 0.0
    """Media packets lost as the viewers see them (sequence gaps), %."""
    send_drop_pct: float | None = None
    """Media datagrams the relay's send path dropped, % of attempted (srsrelay only)."""
    kbit_per_viewer: float = 0.0
    """Media received per viewer, kbit/s."""
    handshake_ms: list[float] = field(default_factory=list)
    """POST -> first RTP of every viewer."""
    latency_p50_ms: float | None = None
    """Relay-added latency, if the relay reports it."""
    latency_p99_ms: float | None = None
    """Relay-added latency, if the relay reports it."""
    viewer_cpu_pct: float = 0.0
    """CPU of the viewers' process, % of one core."""
    starved: int = 0
    """Connected viewers that received nothing in the window."""
    video_fps: float | None = None
    """Video frames per second each viewer received (publisher: PUBLISHER_FPS)."""
    relay_frames_dropped: dict[str, int] = field(default_factory=dict)
    """Frames the relay did not send to its viewers in the window, by reason (srsrelay)."""

    publisher_fps: float | None = None
    """Video frames per second the relay received from the publisher in the window
    (srsrelay: /api/v1/streams); a busy machine can make ffmpeg fall below PUBLISHER_FPS."""
    processes: int = 1
    """Processes whose CPU, CPU wait and RSS are summed (workers: the relay and its
    worker processes, as found at the end of the window)."""

    @property
    def frames_missing_pct(self) -> float:
        if self.video_fps is None:
            return 0.0
        sent = self.publisher_fps or PUBLISHER_FPS
        return max(0.0, 100 * (1 - self.video_fps / sent))

    @property
    def unconnected(self) -> bool:
        """The viewers were not all ready in time: nothing was measured."""
        return self.viewers > 0 and self.connected == 0

    @property
    def degraded(self) -> bool:
        return self.unconnected or self.frames_missing_pct > 100 * (1 - DELIVERY_MIN)


@dataclass
class Summary:
    """Least-squares figures of one system at one bitrate."""

    system: str
    kbit: int
    ms_per_viewer_s: float | None
    """Server CPU ms per viewer-second (slope)."""
    fixed_ms_per_s: float | None
    """CPU ms per second with no viewers (intercept: ingest, transcoding, idle)."""
    viewers_per_core: float | None
    """1000 / slope."""
    rss_kb_per_viewer: float | None
    loss_pct: float
    """Worst step's packet loss (sequence gaps), of the steps in the fit."""
    frames_missing_pct: float
    """Worst step's share of video frames not received, of the steps in the fit."""
    degraded_at: int | None
    """First step whose viewers got too few frames (left out of the fit)."""
    handshake_p50_ms: float | None
    handshake_p95_ms: float | None
    saturated_at: int | None
    """First step at or above SATURATED_MS (left out of the fit)."""
    viewer_limited: bool
    """Some step's viewer process was busier than VIEWER_BUSY_PCT."""
    workers: int = 0
    """Worker processes serving the viewers (system "workers"), else 0."""
    unconnected_at: int | None = None
    """First step whose viewers were not ready in time (not measured)."""
    viewers_per_machine: float | None = None
    """workers: 1000 * workers / slope, each worker at most one core."""


def summarize(system: str, kbit: int, steps: list[Step], workers: int = 0) -> Summary:
    """Least squares over `steps`; `workers`: the worker processes that serve the viewers
    (their CPU is summed, so a step saturates at SATURATED_MS per worker)."""
    limit = SATURATED_MS * max(1, workers)
    fit = [s for s in steps if s.cpu_ms_per_s < limit and not s.degraded]
    saturated = next((s.viewers for s in steps if s.cpu_ms_per_s >= limit), None)
    degraded = next((s.viewers for s in steps if s.degraded), None)
    cpu = least_squares([s.connected for s in fit], [s.cpu_ms_per_s for s in fit])
    rss = least_squares([s.connected for s in fit], [s.rss_kb for s in fit])
    slope = cpu[0] if cpu else None
    handshakes = [h for s in steps for h in s.handshake_ms]
    return Summary(
        system=system,
        kbit=kbit,
        ms_per_viewer_s=slope,
        fixed_ms_per_s=cpu[1] if cpu else None,
        viewers_per_core=1000 / slope if slope and slope > 0 else None,
        rss_kb_per_viewer=rss[0] if rss else None,
        loss_pct=max((s.loss_pct for s in fit), default=0.0),
        frames_missing_pct=max((s.frames_missing_pct for s in fit), default=0.0),
        degraded_at=degraded,
        handshake_p50_ms=pct(handshakes, 0.5),
        handshake_p95_ms=pct(handshakes, 0.95),
        saturated_at=saturated,
        viewer_limited=any(s.viewer_cpu_pct > VIEWER_BUSY_PCT for s in steps),
        workers=workers,
        viewers_per_machine=1000 * workers / slope if workers and slope and slope > 0 else None,
        unconnected_at=next((s.viewers for s in steps if s.unconnected), None),
    )


# -- one step ------------------------------------------------------------------------


@dataclass
class Server:
    """What is measured: a process, its WHEP endpoint and (srsrelay) its stats URL."""

    system: str
    pid: int
    whep_url: str
    rtc_stats_url: str | None
    workers_url: str | None = None
    """workers: GET /api/v1/workers, for the worker processes' pids."""

    @property
    def pinned(self) -> bool:
        """The server is on RELAY_CPU and the load generator on OTHER_CPU."""
        return self.workers_url is None


async def server_pids(server: Server) -> list[int]:
    """The server's processes: itself, then (workers) each running worker process, which is
    pinned to worker_cpu(index) here (a restarted worker has a new pid)."""
    if server.workers_url is None:
        return [server.pid]
    async with aiohttp.ClientSession() as http, http.get(server.workers_url) as resp:
        data = await resp.json()
    pids = [server.pid]
    for worker in data["workers"]["workers"]:
        pid = worker.get("pid")
        if pid is None or worker.get("state") == "down":
            continue
        with contextlib.suppress(OSError):
            pin(int(pid), worker_cpu(int(worker["index"])))
            pids.append(int(pid))
    return pids


def _per_pid(pids: Sequence[int], read: Callable[[int], float]) -> dict[int, float]:
    """read(pid) for each pid still running."""
    values = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            values[pid] = read(pid)
    return values


def _delta(before: dict[int, float], after: dict[int, float]) -> float:
    """Growth of a per-process counter, summed; a process started since counts from 0."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


async def _rtc_stats(server: Server) -> dict[str, Any] | None:
    if server.rtc_stats_url is None:
        return None
    async with aiohttp.ClientSession() as http, http.get(server.rtc_stats_url) as resp:
        data = await resp.json()
    rtc: dict[str, Any] = data["rtc"]
    return rtc


async def _frames_dropped(server: Server) -> dict[str, dict[str, int]]:
    """Frames each srsrelay session did not send, by reason, keyed by session id."""
    if server.rtc_stats_url is None:
        return {}
    url = server.rtc_stats_url.replace("/api/v1/rtc", "/api/v1/sessions")
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        data = await resp.json()
    return {
        str(s["id"]): dict(s.get("congestion", {}).get("frames_dropped", {}))
        for s in data["sessions"]
    }


async def _video_frames_in(server: Server) -> int | None:
    """Video frames the relay has received from the publisher of live/test."""
    if server.rtc_stats_url is None:
        return None
    url = server.rtc_stats_url.replace("/api/v1/rtc", "/api/v1/streams")
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        data = await resp.json()
    for stream in data["streams"]:
        video = (stream.get("tracks") or {}).get("video")
        if f"{stream['app']}/{stream['name']}" == "live/test" and video:
            return int(video["frames"])
    return None


def _rtc_parts(rtc: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """The single-process rtc reports in a /api/v1/rtc "rtc" object, by worker index: the
    relay's own (index 0), or each worker's that answered (worker processes)."""
    if rtc is None:
        return {}
    if "workers" not in rtc:
        return {0: rtc}
    return {int(w["worker"]): w["rtc"] for w in rtc["workers"] if isinstance(w.get("rtc"), dict)}


def _media_counts(rtc: dict[str, Any] | None) -> tuple[int, int]:
    """(attempted, dropped) media sends of the relay so far, summed over its workers."""
    attempted = dropped = 0
    for part in _rtc_parts(rtc).values():
        media = part["send"]["kinds"].get("media", {})
        attempted += int(media.get("attempted", 0))
        dropped += sum(int(v) for k, v in media.items() if k.startswith("dropped") or k == "errors")
    return attempted, dropped


def _media_window(before: dict[str, Any] | None, after: dict[str, Any]) -> tuple[int, int]:
    """(attempted, dropped) media sends between two /api/v1/rtc snapshots, per worker; a
    worker whose counters went back (it was restarted) counts from 0."""
    old = _rtc_parts(before)
    attempted = dropped = 0
    for index, part in _rtc_parts(after).items():
        a1, d1 = _media_counts(part)
        a0, d0 = _media_counts(old.get(index))
        if a1 < a0 or d1 < d0:
            a0 = d0 = 0
        attempted += a1 - a0
        dropped += d1 - d0
    return attempted, dropped


class ViewerProcess:
    """bench/lightviewer.py driven over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    @contextlib.asynccontextmanager
    async def run(cls, url: str, count: int, pinned: bool = True) -> AsyncIterator[ViewerProcess]:
        """`pinned`: on OTHER_CPU, else on any CPU."""
        args = [sys.executable, str(LIGHTVIEWER), "--url", url, "--count", str(count)]
        if pinning() and pinned:
            args += ["--cpu", str(OTHER_CPU)]
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=None if pinned else on_any_cpu(),
        )
        try:
            yield cls(proc)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    assert proc.stdin is not None
                    proc.stdin.write(b"stop\n")
                    await proc.stdin.drain()
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    async def event(self, name: str, within: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(within):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"viewer process exited ({self.proc.returncode})")
                event: dict[str, Any] = json.loads(line)
                if event.get("event") == name:
                    return event

    async def command(self, word: str, reply: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.event(reply, 30)


async def measure_step(server: Server, kbit: int, n: int, args: argparse.Namespace) -> Step:
    step = Step(server.system, kbit, n)
    if n == 0:
        await asyncio.sleep(args.warmup)
        await _window(server, step, args.window, None)
        return step
    async with ViewerProcess.run(server.whep_url, n, server.pinned) as viewers:
        within = READY_TIMEOUT + 0.2 * n
        try:
            ready = await viewers.event("ready", within)
        except (TimeoutError, RuntimeError) as exc:
            # The machine is past saturation (or the viewers broke): report, go on.
            step.failed = n
            step.errors = [f"viewers not all ready within {within:g} s ({exc!r})"]
            return step
        step.connected, step.failed = ready["connected"], ready["failed"]
        step.errors, step.handshake_ms = ready["errors"], ready["handshake_ms"]
        await asyncio.sleep(args.warmup)
        await _window(server, step, args.window, viewers)
    return step


async def _window(
    server: Server, step: Step, seconds: float, viewers: ViewerProcess | None
) -> None:
    before = await _rtc_stats(server)
    dropped_before = await _frames_dropped(server)
    frames_before = await _video_frames_in(server)
    if viewers is not None:
        await viewers.command("mark", "marked")
    pids = await server_pids(server)
    cpu0, t0 = _per_pid(pids, cpu_seconds), time.monotonic()
    wait0 = _per_pid(pids, runqueue_wait_seconds)
    await asyncio.sleep(seconds)
    pids = await server_pids(server)
    cpu1, t1 = _per_pid(pids, cpu_seconds), time.monotonic()
    wait1 = _per_pid(pids, runqueue_wait_seconds)
    step.wait_ms_per_s = 1000 * _delta(wait0, wait1) / (t1 - t0)
    frames_after = await _video_frames_in(server)
    if frames_before is not None and frames_after is not None:
        step.publisher_fps = (frames_after - frames_before) / (t1 - t0)
    step.rss_kb = int(sum(_per_pid(pids, rss_kb).values()))
    step.processes = len(cpu1)
    step.cpu_ms_per_s = 1000 * _delta(cpu0, cpu1) / (t1 - t0)
    if viewers is not None:
        report = await viewers.command("report", "report")
        tracks = report["tracks"]
        expected = sum(t["expected"] for t in tracks.values())
        lost = sum(t["lost"] for t in tracks.values())
        step.loss_pct = 100 * lost / expected if expected else 0.0
        step.kbit_per_viewer = sum(t["kbit_per_viewer"] for t in tracks.values())
        step.video_fps = tracks["video"]["frames_per_viewer_s"]
        step.viewer_cpu_pct = report["cpu_pct"]
        step.starved = report["starved"]
    after = await _rtc_stats(server)
    for sid, reasons in (await _frames_dropped(server)).items():
        for reason, count in reasons.items():
            delta = count - dropped_before.get(sid, {}).get(reason, 0)
            step.relay_frames_dropped[reason] = step.relay_frames_dropped.get(reason, 0) + delta
    if after is not None:
        attempted, dropped = _media_window(before, after)
        step.send_drop_pct = 100 * dropped / attempted if attempted > 0 else 0.0
        step.latency_p50_ms, step.latency_p99_ms = _latency_window(before, after)


def _video_counts(rtc: dict[str, Any] | None) -> list[int] | None:
    """The video latency histogram's counts of one single-process rtc report."""
    if rtc is None:
        return None
    try:
        return [int(c) for c in rtc[LATENCY_FIELD]["video"]["counts"]]
    except (KeyError, TypeError):
        return None


def _latency_window(
    before: dict[str, Any] | None, after: dict[str, Any]
) -> tuple[float | None, float | None]:
    """Video p50/p99 (ms) of the frames sent between two /api/v1/rtc snapshots. With worker
    processes the workers' windows are added bucket by bucket (the buckets are the same
    constant, srsrelay/webrtc/latency.py; a report of another length is left out)."""
    window = LatencyHistogram()
    old = _rtc_parts(before)
    found = False
    for index, part in _rtc_parts(after).items():
        counts = _video_counts(part)
        if counts is None or len(counts) != len(window.counts):
            continue
        base = _video_counts(old.get(index)) or [0] * len(counts)
        if len(base) != len(counts) or any(a < b for a, b in zip(counts, base, strict=True)):
            base = [0] * len(counts)  # restarted: its histogram began again
        window.counts = [w + a - b for w, a, b in zip(window.counts, counts, base, strict=True)]
        found = True
    if not found:
        return None, None
    window.total = sum(window.counts)
    p50, p99 = window.percentile(0.5), window.percentile(0.99)
    return (
        None if math.isnan(p50) else p50,
        None if math.isnan(p99) else p99,
    )


# -- the systems under test ----------------------------------------------------------


def video_args(kbit: int) -> list[str]:
    """libx264 ultrafast/zerolatency at `kbit`, GOP 2 s (60 frames at 30 fps)."""
    rate = f"{kbit}k"
    return [
        *("-preset", "ultrafast", "-tune", "zerolatency"),
        *("-g", "60", "-keyint_min", "60", "-sc_threshold", "0"),
        *("-b:v", rate, "-maxrate", rate, "-bufsize", rate),
    ]


def start_bench_relay(tmp: Path, max_viewers: int, workers: int = 1) -> RelayProcess:
    """The relay on loopback, with the per-IP WHEP rate limit off (all viewers share an IP);
    `workers` > 1: that many worker processes, each on a free RTC port."""
    extra = f"max_viewers = {max(max_viewers, 1)}\n"
    env = {"SRSRELAY_HTTP_WHEP_RATE_LIMIT": "0"}
    if workers > 1:
        extra += f"[daemon]\nworkers = {workers}\n"
        # Workers take rtc.port + k; the ports after the free one need not be free.
        env["SRSRELAY_RTC_PORT"] = "0"
    return start_relay(tmp, extra, env=env)


@contextlib.asynccontextmanager
async def srsrelay_server(kbit: int, max_viewers: int, workers: int = 1) -> AsyncIterator[Server]:
    """srsrelay and its publisher. One process (`workers` 1): pinned to RELAY_CPU, the
    publisher to OTHER_CPU. With worker processes: each worker pinned to
    worker_cpu(index) (server_pids); the relay, the publisher and the viewers on any CPU."""
    pooled = workers > 1
    prefix = "srsrelay-workers-" if pooled else "srsrelay-viewers-"
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        relay = await asyncio.to_thread(start_bench_relay, Path(tmp), max_viewers, workers)
        if pooled:
            unpin(relay.proc.pid)
        else:
            pin(relay.proc.pid, RELAY_CPU)
        publisher = await asyncio.create_subprocess_exec(
            *ffmpeg_publish_args(relay.rtmp_url("live/test"), "1280x720", video_args(kbit)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=on_any_cpu() if pooled else on_other_cpu(),
        )
        try:
            await wait_live(relay, "live/test")
            server = Server(
                "workers" if pooled else "srsrelay",
                relay.proc.pid,
                f"{relay.http}/whep/live/test",
                f"{relay.http}/api/v1/rtc",
                f"{relay.http}/api/v1/workers" if pooled else None,
            )
            if pooled:
                running = len(await server_pids(server)) - 1
                if running != workers:
                    raise RuntimeError(
                        f"{running} of {workers} worker processes run (see {relay.log_path})"
                    )
            yield server
        finally:
            await _terminate(publisher)
            await asyncio.to_thread(_stop_relay, relay)


@contextlib.contextmanager
def _any_cpu() -> Iterator[None]:
    """This script's main thread on any CPU for a while (it shares the cores)."""
    if not pinning():
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(ALL_CPUS))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _stop_relay(relay: RelayProcess) -> None:
    try:
        relay.stop()
    except AssertionError as exc:
        print(f"warning: {exc}", file=sys.stderr)


@contextlib.asynccontextmanager
async def aiortc_server(kbit: int) -> AsyncIterator[Server]:
    media_port, http_port = free_port(socket.SOCK_DGRAM), free_port()
    publisher = await asyncio.create_subprocess_exec(
        *[
            *(FFMPEG, "-hide_banner", "-loglevel", "error", "-re"),
            *("-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"),
            *("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"),
            *("-c:v", "libx264", *video_args(kbit), "-bsf:v", "dump_extra"),
            *("-c:a", "libopus", "-b:a", "64k", "-ac", "2"),
            *("-f", "mpegts", f"udp://127.0.0.1:{media_port}?pkt_size=1316"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=on_other_cpu(),
    )
    server = await asyncio.create_subprocess_exec(
        *[
            *(sys.executable, str(SELF), "--serve-aiortc"),
            # Overruns of ffmpeg's UDP input buffer must not end the stream.
            *(str(http_port), f"udp://127.0.0.1:{media_port}?{UDP_INPUT_OPTIONS}"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        pin(server.pid, RELAY_CPU)
        assert server.stdout is not None
        line = await asyncio.wait_for(server.stdout.readline(), 30)
        if not line.startswith(b"ready"):
            raise RuntimeError(f"aiortc baseline did not start: {line!r}")
        pin(server.pid, RELAY_CPU)  # the media player's thread exists now
        yield Server("aiortc", server.pid, f"http://127.0.0.1:{http_port}/whep", None)
    finally:
        await _terminate(server)
        await _terminate(publisher)


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def serve_aiortc(http_port: int, source: str) -> None:
    """The baseline: aiortc as its examples fan out one source to many peers."""
    import logging
    from unittest import mock

    import aioice.ice
    from aiohttp import web
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaPlayer, MediaRelay

    logging.disable(logging.WARNING)
    # aioice never gathers 127.0.0.1; everything here stays on loopback.
    mock.patch.object(aioice.ice, "get_host_addresses", return_value=["127.0.0.1"]).start()
    player = MediaPlayer(source, format="mpegts", decode=False)
    relay = MediaRelay()
    pcs: dict[str, Any] = {}

    async def post(request: web.Request) -> web.Response:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        key = f"{id(pc):x}"
        pcs[key] = pc
        await pc.setRemoteDescription(RTCSessionDescription(await request.text(), "offer"))
        for track in (player.video, player.audio):
            if track is not None:
                pc.addTrack(relay.subscribe(track, buffered=False))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/whep/{key}"},
        )

    async def delete(request: web.Request) -> web.Response:
        pc = pcs.pop(request.match_info["key"], None)
        if pc is not None:
            await pc.close()
        return web.Response(status=200)

    async def on_startup(app: web.Application) -> None:
        print("ready", flush=True)

    async def on_shutdown(app: web.Application) -> None:
        await asyncio.gather(*(pc.close() for pc in pcs.values()))
        for track in (player.video, player.audio):
            if track is not None:
                track.stop()  # joins the player's thread while the loop still runs

    app = web.Application()
    app.router.add_post("/whep", post)
    app.router.add_delete("/whep/{key}", delete)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    web.run_app(app, host="127.0.0.1", port=http_port, print=None, access_log=None)


# -- the run -------------------------------------------------------------------------


async def run_system(
    system: str, kbit: int, steps: list[int], args: argparse.Namespace
) -> list[Step]:
    factory: contextlib.AbstractAsyncContextManager[Server]
    if system == "srsrelay":
        factory = srsrelay_server(kbit, max(steps))
    elif system == "workers":
        factory = srsrelay_server(kbit, max(steps), args.workers)
    else:
        factory = aiortc_server(kbit)
    results = []
    with _any_cpu() if system == "workers" else contextlib.nullcontext():
        async with factory as server:
            for n in steps:
                step = await measure_step(server, kbit, n, args)
                results.append(step)
                print(f"  {system} {kbit} kbit/s, {n} viewers: {_step_line(step)}", flush=True)
    return results


def _step_line(s: Step) -> str:
    line = (
        f"{s.connected} connected, {s.cpu_ms_per_s:.0f} ms/s CPU, {s.rss_kb / 1024:.1f} MB,"
        f" loss {s.loss_pct:.2f}%, viewers' CPU {s.viewer_cpu_pct:.0f}%"
    )
    if s.system == "workers":
        line += f" ({s.processes} processes summed)"
    if s.unconnected:
        line += f"; {s.errors[0]}"
    return line


def _fmt(value: float | None, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in [headers, *rows]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def steps_table(steps: list[Step]) -> str:
    rows = []
    for s in steps:
        rows.append(
            [
                s.system,
                str(s.kbit),
                str(s.viewers),
                f"{s.connected}" + (f" ({s.failed} failed)" if s.failed else ""),
                _fmt(s.cpu_ms_per_s),
                _fmt(s.wait_ms_per_s),
                _fmt(s.rss_kb / 1024, ".1f"),
                _fmt(s.loss_pct, ".2f"),
                _fmt(s.send_drop_pct, ".2f"),
                _fmt(s.kbit_per_viewer),
                f"{_fmt(s.video_fps, '.1f')} / {_fmt(s.publisher_fps, '.1f')}",
                str(sum(s.relay_frames_dropped.values())) if s.system != "aiortc" else "n/a",
                f"{_fmt(pct(s.handshake_ms, 0.5))} / {_fmt(pct(s.handshake_ms, 0.95))}",
                f"{_fmt(s.latency_p50_ms, '.1f')} / {_fmt(s.latency_p99_ms, '.1f')}",
                _fmt(s.viewer_cpu_pct),
            ]
        )
    headers = [
        "system", "kbit/s", "N", "connected", "CPU ms/s", "CPU wait ms/s", "RSS MB", "loss %",
        "send drops %", "kbit/s/viewer", "fps viewer/publisher", "relay frame drops",
        "handshake p50/p95 ms", "latency p50/p99 ms", "viewers' CPU %",
    ]  # fmt: skip
    return table(headers, rows)


def summary_table(summaries: list[Summary]) -> str:
    rows = []
    for s in summaries:
        notes = []
        if s.saturated_at is not None:
            notes.append(f"saturated at N={s.saturated_at}")
        if s.degraded_at is not None:
            notes.append(f"frames missing from N={s.degraded_at}")
        if s.viewer_limited:
            notes.append("viewer process busy: loss may be its own")
        if s.unconnected_at is not None:
            notes.append(f"viewers not ready in time at N={s.unconnected_at}")
        if s.workers:
            notes.append(f"{s.workers} workers: {_fmt(s.viewers_per_machine)} viewers per machine")
        rows.append(
            [
                s.system,
                str(s.kbit),
                _fmt(s.ms_per_viewer_s, ".2f"),
                _fmt(s.fixed_ms_per_s),
                _fmt(s.viewers_per_core),
                _fmt(s.rss_kb_per_viewer),
                _fmt(s.loss_pct, ".2f"),
                _fmt(s.frames_missing_pct, ".1f"),
                f"{_fmt(s.handshake_p50_ms)} / {_fmt(s.handshake_p95_ms)}",
                "; ".join(notes) or "-",
            ]
        )
    headers = [
        "system", "kbit/s", "CPU ms per viewer-s", "fixed CPU ms/s", "viewers/core",
        "RSS KB/viewer", "worst loss %", "frames missing %", "handshake p50/p95 ms", "notes",
    ]  # fmt: skip
    return table(headers, rows)


def verdicts(summaries: list[Summary]) -> list[str]:
    lines = []
    by_key = {(s.system, s.kbit): s for s in summaries}
    for s in summaries:
        if s.system != "srsrelay":
            continue
        target = VIEWERS_TARGET.get(s.kbit)
        if target is not None and s.viewers_per_core is not None:
            loss = max(s.loss_pct, s.frames_missing_pct)
            met = s.viewers_per_core >= target and loss <= LOSS_TARGET_PCT
            lines.append(
                f"{s.kbit} kbit/s: {s.viewers_per_core:.0f} viewers/core (fit below saturation),"
                f" worst loss or missing frames {loss:.2f}%"
                f" (target {target} at <= {LOSS_TARGET_PCT}%):"
                f" {'met' if met else 'gap'}"
            )
        if s.degraded_at is not None:
            lines.append(
                f"{s.kbit} kbit/s: viewers got < {DELIVERY_MIN:.0%} of the video frames"
                f" from N={s.degraded_at}"
            )
        if s.rss_kb_per_viewer is not None:
            met = s.rss_kb_per_viewer <= RSS_TARGET_KB
            lines.append(
                f"{s.kbit} kbit/s: {s.rss_kb_per_viewer:.0f} KB RSS per viewer"
                f" (target <= {RSS_TARGET_KB:.0f}): {'met' if met else 'gap'}"
            )
        base = by_key.get(("aiortc", s.kbit))
        if base and base.viewers_per_core and s.viewers_per_core:
            lines.append(
                f"{s.kbit} kbit/s: srsrelay/aiortc viewers per core ="
                f" {s.viewers_per_core / base.viewers_per_core:.1f}x"
            )
    for s in summaries:
        if s.system == "workers":
            lines.append(workers_verdict(s, by_key.get(("srsrelay", s.kbit))))
    return lines


def workers_verdict(s: Summary, single: Summary | None) -> str:
    """The issue's target for worker processes: viewers per machine against the
    single-process viewers per core at the same bitrate."""
    head = f"workers (K={s.workers}) at {s.kbit} kbit/s: "
    if s.viewers_per_machine is None:
        return head + "n/a viewers per machine (no CPU slope)"
    head += f"{s.viewers_per_machine:.0f} viewers per machine"
    if single is None or not single.viewers_per_core:
        return head + " (no single-process figure at this bitrate to compare)"
    ratio = s.viewers_per_machine / single.viewers_per_core
    met = ratio >= WORKERS_RATIO_TARGET
    return (
        f"{head} = {ratio:.2f}x the single-process figure"
        f" (target >= {WORKERS_RATIO_TARGET}x): {'met' if met else 'gap'}"
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    steps: list[Step] = []
    summaries: list[Summary] = []
    runs = [("srsrelay", kbit, args.steps) for kbit in args.bitrates]
    if args.baseline_steps:
        runs.append(("aiortc", args.baseline_bitrate, args.baseline_steps))
    if args.workers:
        runs += [("workers", kbit, args.workers_steps) for kbit in args.workers_bitrates]
    for system, kbit, counts in runs:
        more = f", K = {args.workers} worker processes" if system == "workers" else ""
        print(f"{system} at {kbit} kbit/s, N = {counts}{more}", flush=True)
        got = await run_system(system, kbit, counts, args)
        steps += got
        summaries.append(summarize(system, kbit, got, args.workers if system == "workers" else 0))
    return {"steps": steps, "summaries": summaries}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one bitrate, N = 0, 5, 10 (workers: 0, 5); < 60 s"
    )
    parser.add_argument("--bitrates", type=_ints, help="video kbit/s (default 600,2000)")
    parser.add_argument("--steps", type=_ints, help="viewer counts (default 0,25,50,100,200)")
    parser.add_argument(
        "--baseline-steps", type=_ints, help="aiortc viewer counts (default 0,10,25,50; '' skips)"
    )
    parser.add_argument("--baseline-bitrate", type=int, default=2000, help="kbit/s (2000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help=f"worker processes of the workers system (default {default_workers()}:"
        " one per CPU; 0 skips it)",
    )
    parser.add_argument(
        "--workers-bitrates", type=_ints, default=[2000], help="workers system kbit/s (2000)"
    )
    parser.add_argument("--warmup", type=float, help="seconds before each window (default 5)")
    parser.add_argument("--window", type=float, help="seconds measured per step (default 10)")
    parser.add_argument("--json", type=Path, help="also write the results here ('-': stdout)")
    parser.add_argument(
        "--serve-aiortc", nargs=2, metavar=("PORT", "SOURCE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve_aiortc:
        serve_aiortc(int(args.serve_aiortc[0]), args.serve_aiortc[1])
        return 0
    if args.workers == 1 or args.workers < 0:
        parser.error("--workers: 0 skips the workers system, else 2 or more processes")
    quick = args.quick
    args.workers_steps = args.steps or ([0, 5] if quick else [0, 25, 50, 100, 200])
    if quick:
        args.workers_bitrates = args.workers_bitrates[:1]
    args.bitrates = (
        args.bitrates if args.bitrates is not None else ([2000] if quick else [600, 2000])
    )
    args.steps = args.steps or ([0, 5, 10] if quick else [0, 25, 50, 100, 200])
    if args.baseline_steps is None:
        args.baseline_steps = [0, 5] if quick else [0, 10, 25, 50]
    args.warmup = args.warmup if args.warmup is not None else (1.5 if quick else 5.0)
    args.window = args.window if args.window is not None else (3.0 if quick else 10.0)
    if pinning():
        os.sched_setaffinity(0, {OTHER_CPU})
    else:
        print("note: one CPU only, nothing is pinned; figures are not per core", flush=True)
    load = os.getloadavg()[0]
    started = time.monotonic()
    result = asyncio.run(bench(args))
    steps: list[Step] = result["steps"]
    summaries: list[Summary] = result["summaries"]
    print()
    print(steps_table(steps))
    print()
    print(summary_table(summaries))
    print()
    for line in verdicts(summaries):
        print(f"- {line}")
    has_latency = any(s.latency_p50_ms is not None for s in steps)
    pinned = any(s.system != "workers" for s in steps)
    latency = (
        f"rtc.{LATENCY_FIELD}" if has_latency else f"n/a (no rtc.{LATENCY_FIELD} in /api/v1/rtc)"
    )
    print(
        "\n"
        + (f"relay on CPU {RELAY_CPU}, everything else on CPU {OTHER_CPU}; " if pinned else "")
        + f"load average {load:.2f} at start; {time.monotonic() - started:.0f} s;"
        f" warm-up {args.warmup:g} s, window {args.window:g} s; latency: {latency}"
    )
    if any(s.system == "workers" for s in steps):
        print(
            f"workers: worker k on CPU k % {len(ALL_CPUS)}; the relay (ingest) process, the"
            " publisher, the viewers and this script unpinned: the load generator shares the"
            f" cores. CPU, CPU wait and RSS: the relay process + its {args.workers} workers,"
            " summed; send drops and latency: merged over the workers"
        )
    if args.json is not None:
        data = {
            "steps": [asdict(s) for s in steps],
            "summaries": [asdict(s) for s in summaries],
            "load_average": load,
            "warmup": args.warmup,
            "window": args.window,
        }
        text = json.dumps(data, indent=1)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
