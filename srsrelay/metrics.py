"""Prometheus metrics, event-loop lag and byte/frame rates.

One collector reads the relay's parts when /metrics is scraped: nothing is counted twice
and nothing is updated per packet for the metrics' sake. Each Relay has its own
CollectorRegistry (several relays may run in one process). Label sets are bounded: no
per-viewer or per-stream labels.

A monitor task wakes every MONITOR_INTERVAL: how late it wakes is the event-loop lag, and
once a second it samples the cumulative counters the API turns into rates (kbps, fps).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from srsrelay import __version__
from srsrelay.hub.stream import PublishState
from srsrelay.webrtc.sendpath import SendOutcome, TrafficKind
from srsrelay.webrtc.server import CLOSE_CATEGORIES

if TYPE_CHECKING:
    from srsrelay.http.server import HttpServer
    from srsrelay.hub.registry import Hub
    from srsrelay.rtmp.server import RtmpServer
    from srsrelay.webrtc.server import RtcServer
    from srsrelay.workers.pool import WorkerPool

log = structlog.get_logger(__name__)

MONITOR_INTERVAL = 0.25
"""Seconds between two event-loop lag probes."""
RATE_SAMPLE_TICKS = 4
"""Lag probes between two rate samples (one sample a second)."""
RATE_HISTORY = 31
"""Samples kept per counter: 30 s of history at one sample a second."""
MAX_RATE_KEYS = 16_384
"""Counters whose samples are kept; beyond it new counters are not tracked."""
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds (seconds) of the event-loop lag histogram buckets."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format."""

SEND_OUTCOMES = tuple(o for o in SendOutcome if o is not SendOutcome.QUEUED)
"""Final outcomes of a send (QUEUED is a state, reported as a gauge)."""
NACK_UNANSWERED = ("over_budget", "not_found", "too_soon")
"""Reasons a packet asked for in a NACK was not retransmitted (NackCounters fields)."""
HTTP_REFUSALS = ("rate_limited", "unauthorized", "not_live", "full", "malformed")
"""HttpServer.stats() keys that count refused requests."""


class RateBook:
    """Rates of cumulative counters from samples (sans-I/O: `now` is passed in).

    Each counter keeps its last RATE_HISTORY samples; at most `max_keys` counters are
    tracked. A counter that goes backwards (a new stream on the same key) starts over.
    """

    def __init__(self, history: int = RATE_HISTORY, max_keys: int = MAX_RATE_KEYS) -> None:
        self.history = history
        self.max_keys = max_keys
        self._samples: dict[Hashable, collections.deque[tuple[float, int]]] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def sample(self, key: Hashable, total: int, now: float) -> None:
        samples = self._samples.get(key)
        if samples is None:
            if len(self._samples) >= self.max_keys:
                return
            samples = self._samples[key] = collections.deque(maxlen=self.history)
        elif samples and total < samples[-1][1]:
            samples.clear()
        samples.append((now, total))

    def rate(self, key: Hashable, window: float) -> float | None:
        """Units per second over the last `window` seconds of samples; None before two
        samples exist."""
        samples = self._samples.get(key)
        if not samples or len(samples) < 2:
            return None
        last_at, last = samples[-1]
        first_at, first = samples[-1]
        for at, value in reversed(samples):
            if last_at - at > window + 1e-6:
                break
            first_at, first = at, value
        if last_at <= first_at:
            return None
        return (last - first) / (last_at - first_at)

    def retain(self, keys: Iterable[Hashable]) -> None:
        """Forget every counter not in `keys` (closed sessions, ended streams)."""
        keep = set(keys)
        for key in [k for k in self._samples if k not in keep]:
            del self._samples[key]


class LagStats:
    """Event-loop lag: the last value, the maximum and a histogram (seconds)."""

    def __init__(self) -> None:
        self.last = 0.0
        self.max = 0.0
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * len(LAG_BUCKETS)
        """Probes per bucket (not cumulative); probes above the last bound only count."""

    def record(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.last = lag
        self.max = max(self.max, lag)
        self.count += 1
        self.sum += lag
        for i, bound in enumerate(LAG_BUCKETS):
            if lag <= bound:
                self.buckets[i] += 1
                break

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, probes at or below it) as Prometheus wants, ending with +Inf."""
        out = []
        running = 0
        for bound, n in zip(LAG_BUCKETS, self.buckets, strict=True):
            running += n
            out.append((f"{bound:g}", float(running)))
        out.append(("+Inf", float(self.count)))
        return out


class RelayParts(Protocol):
    """What the collector reads (a Relay)."""

    @property
    def hub(self) -> Hub: ...

    @property
    def rtc(self) -> RtcServer: ...

    @property
    def rtmp(self) -> RtmpServer: ...

    @property
    def http(self) -> HttpServer | None: ...

    @property
    def pool(self) -> WorkerPool | None: ...


class Monitor:
    """A task probing event-loop lag every MONITOR_INTERVAL and calling `sample(now)`
    once a second. `start` and `stop` bracket it."""

    def __init__(
        self, lag: LagStats, sample: Callable[[float], None], interval: float = MONITOR_INTERVAL
    ) -> None:
        self.lag = lag
        self._sample = sample
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        ticks = 0
        while True:
            expected = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            self.lag.record(loop.time() - expected)
            ticks += 1
            if ticks % RATE_SAMPLE_TICKS == 0:
                try:
                    self._sample(time.monotonic())
                except Exception:  # a bug here must not stop the lag probe
                    log.exception("rate sampling failed")


class Metrics:
    """The registry, the collector and the monitor of one relay."""

    def __init__(self, parts: RelayParts) -> None:
        self.parts = parts
        self.rates = RateBook()
        self.lag = LagStats()
        self.monitor = Monitor(self.lag, self.sample)
        self.started_at = time.time()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(parts, self))

    def start(self) -> None:
        self.started_at = time.time()
        self.monitor.start()

    async def stop(self) -> None:
        await self.monitor.stop()

    def render(self) -> bytes:
        """The exposition text of every metric, read now."""
        return generate_latest(self.registry)

    def sample(self, now: float) -> None:
        """Sample the counters the API reports as rates; forget what has gone."""
        parts, rates = self.parts, self.rates
        keys: list[Hashable] = []
        for stream in parts.hub.streams():
            for key, total in (
                (("stream_bytes_in", stream.key), stream.stats.bytes_in),
                (("stream_video_frames", stream.key), stream.stats.video_frames),
            ):
                rates.sample(key, total, now)
                keys.append(key)
        for client in parts.rtmp.clients():
            for key, total in (
                (("rtmp_in", client.id), client.bytes_in),
                (("rtmp_out", client.id), client.bytes_out),
            ):
                rates.sample(key, total, now)
                keys.append(key)
        for session in list(parts.rtc.sessions.values()):
            key = ("viewer_out", session.id)
            rates.sample(key, sum(c.bytes_sent for c in session.counters.kinds.values()), now)
            keys.append(key)
        rates.retain(keys)


class RelayCollector(Collector):
    """Reads every metric from the relay's parts at scrape time."""

    def __init__(self, parts: RelayParts, metrics: Metrics) -> None:
        self._parts = parts
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._process()
        yield from self._media()
        yield from self._send()
        yield from self._feedback()
        yield from self._refusals()
        yield from self._loop()
        yield from self._workers()

    def _process(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "srsrelay_build_info", "Always 1; the version is a label.", labels=["version"]
        )
        info.add_metric([__version__], 1.0)
        yield info
        yield GaugeMetricFamily(
            "srsrelay_start_time_seconds",
            "Unix time the relay started.",
            value=self._metrics.started_at,
        )

    def _media(self) -> Iterator[Metric]:
        parts = self._parts
        streams = parts.hub.streams()
        yield GaugeMetricFamily(
            "srsrelay_streams", "Streams live or waiting for their publisher.", value=len(streams)
        )
        yield GaugeMetricFamily(
            "srsrelay_publishers",
            "Streams with a publisher attached.",
            value=sum(1 for s in streams if s.state is PublishState.LIVE),
        )
        yield GaugeMetricFamily(
            "srsrelay_viewers", "Open WebRTC viewer sessions.", value=len(parts.rtc.sessions)
        )
        yield GaugeMetricFamily(
            "srsrelay_rtmp_connections",
            "Open RTMP connections.",
            value=parts.rtmp.connection_count,
        )
        yield CounterMetricFamily(
            "srsrelay_rtmp_received_bytes",
            "Bytes received from RTMP clients.",
            value=parts.rtmp.bytes_in,
        )
        yield CounterMetricFamily(
            "srsrelay_rtmp_sent_bytes", "Bytes sent to RTMP clients.", value=parts.rtmp.bytes_out
        )
        errors = CounterMetricFamily(
            "srsrelay_rtmp_protocol_errors",
            "RTMP connections closed for breaking the protocol, by kind.",
            labels=["kind"],
        )
        for kind, n in sorted(parts.rtmp.protocol_errors.items()):
            errors.add_metric([kind], n)
        yield errors

    def _send(self) -> Iterator[Metric]:
        rtc = self._parts.rtc
        counters = rtc.counters
        datagrams = CounterMetricFamily(
            "srsrelay_send_datagrams",
            "UDP datagrams handed to the send path, by traffic kind and final outcome.",
            labels=["kind", "outcome"],
        )
        sent_bytes = CounterMetricFamily(
            "srsrelay_send_bytes", "UDP payload bytes sent, by traffic kind.", labels=["kind"]
        )
        queued = GaugeMetricFamily(
            "srsrelay_send_queued_datagrams",
            "Control datagrams waiting for the blocked socket, by traffic kind.",
            labels=["kind"],
        )
        for kind in TrafficKind:
            c = counters.kinds[kind]
            values = c.as_dict()
            for outcome in SEND_OUTCOMES:
                name = "errors" if outcome is SendOutcome.ERROR else outcome.value
                datagrams.add_metric([kind.value, outcome.value], values[name])
            sent_bytes.add_metric([kind.value], c.bytes_sent)
            queued.add_metric([kind.value], c.queued)
        yield datagrams
        yield sent_bytes
        yield queued
        errnos = CounterMetricFamily(
            "srsrelay_send_errors",
            'Failed sends by errno (at most 16 values; "other" collects the rest).',
            labels=["errno"],
        )
        for name, n in sorted(counters.snapshot()["errors_by_errno"].items()):
            errnos.add_metric([name], n)
        yield errnos
        path = rtc.stats().get("send_path") or {}
        yield CounterMetricFamily(
            "srsrelay_send_blocked",
            "Times the socket refused a datagram and the send path waited for it.",
            value=path.get("times_blocked", 0),
        )
        icmp = CounterMetricFamily(
            "srsrelay_icmp_errors",
            "ICMP errors read from the socket's error queue, by errno.",
            labels=["errno"],
        )
        for name, n in sorted(path.get("icmp_errors", {}).items()):
            icmp.add_metric([name], n)
        yield icmp
        received = CounterMetricFamily(
            "srsrelay_rtc_received_datagrams",
            "UDP datagrams received on the WebRTC port, by kind (and receive errors).",
            labels=["kind"],
        )
        for recv_kind, n in rtc.received.items():
            received.add_metric([recv_kind.value], n)
        yield received

    def _feedback(self) -> Iterator[Metric]:
        rtc = self._parts.rtc
        totals = rtc.viewer_totals()
        yield CounterMetricFamily(
            "srsrelay_nacks_received",
            "RTCP generic NACK messages received from viewers.",
            value=totals["nacks_received"],
        )
        yield CounterMetricFamily(
            "srsrelay_nack_requested_packets",
            "RTP packets viewers asked for in NACKs.",
            value=totals["nack_requested"],
        )
        yield CounterMetricFamily(
            "srsrelay_retransmitted_packets",
            "RTP packets retransmitted after NACKs.",
            value=totals["retransmitted"],
        )
        yield CounterMetricFamily(
            "srsrelay_retransmitted_bytes",
            "RTP bytes retransmitted after NACKs.",
            value=totals["retransmitted_bytes"],
        )
        unanswered = CounterMetricFamily(
            "srsrelay_nack_unanswered_packets",
            "Packets asked for in NACKs and not retransmitted, by reason.",
            labels=["reason"],
        )
        for reason in NACK_UNANSWERED:
            unanswered.add_metric([reason], totals[f"nack_{reason}"])
        yield unanswered
        keyframes = CounterMetricFamily(
            "srsrelay_keyframe_requests",
            "Keyframe requests received from viewers, by type.",
            labels=["type"],
        )
        keyframes.add_metric(["pli"], totals["plis"])
        keyframes.add_metric(["fir"], totals["firs"])
        yield keyframes
        dropped = CounterMetricFamily(
            "srsrelay_video_frames_dropped",
            "Video frames not sent to a viewer, by reason.",
            labels=["reason"],
        )
        prefix = "frames_dropped:"
        for key, n in sorted(totals.items()):
            if key.startswith(prefix):
                dropped.add_metric([key[len(prefix) :]], n)
        yield dropped
        closed = CounterMetricFamily(
            "srsrelay_viewer_sessions_closed",
            "Viewer sessions closed, by reason.",
            labels=["reason"],
        )
        # Every category, zeros included, so that rate() and alerts see the series.
        for reason in sorted({c for _, c in CLOSE_CATEGORIES} | {"other"} | set(rtc.closed)):
            closed.add_metric([reason], rtc.closed[reason])
        yield closed

    def _refusals(self) -> Iterator[Metric]:
        parts = self._parts
        limits = CounterMetricFamily(
            "srsrelay_limit_hits",
            "Requests or connections refused or closed at a configured limit, by setting.",
            labels=["limit"],
        )
        hits: collections.Counter[str] = collections.Counter()
        for part in (parts.rtmp, parts.http, parts.hub, parts.rtc):
            hits.update(_counter(part, "limit_hits"))
        for limit, n in sorted(hits.items()):
            limits.add_metric([limit], n)
        yield limits
        hooks = CounterMetricFamily(
            "srsrelay_hook_results",
            "HTTP hook calls by hook and outcome.",
            labels=["hook", "outcome"],
        )
        results = _counter(getattr(parts, "hooks", None), "results")
        for key, n in sorted(results.items(), key=lambda item: str(item[0])):
            if isinstance(key, tuple) and len(key) == 2:
                hooks.add_metric([str(key[0]), str(key[1])], n)
        yield hooks
        refused = CounterMetricFamily(
            "srsrelay_http_refused",
            "HTTP requests refused, by reason.",
            labels=["reason"],
        )
        http = parts.http
        stats = http.stats() if http is not None else {}
        for reason in HTTP_REFUSALS:
            refused.add_metric([reason], int(stats.get(reason, 0)))
        yield refused

    def _loop(self) -> Iterator[Metric]:
        lag = self._metrics.lag
        yield GaugeMetricFamily(
            "srsrelay_event_loop_lag_last_seconds",
            f"How late the last {MONITOR_INTERVAL:g} s probe of the event loop woke up.",
            value=lag.last,
        )
        yield GaugeMetricFamily(
            "srsrelay_event_loop_lag_max_seconds",
            "The latest event-loop probe wake-up since the relay started.",
            value=lag.max,
        )
        yield HistogramMetricFamily(
            "srsrelay_event_loop_lag_seconds",
            "How late the event-loop probes woke up.",
            buckets=lag.cumulative(),
            sum_value=lag.sum,
        )

    def _workers(self) -> Iterator[Metric]:
        pool = self._parts.pool
        workers = pool.workers if pool is not None else []
        yield GaugeMetricFamily(
            "srsrelay_workers",
            "Worker processes serving viewers (daemon.workers > 1; 0 without them).",
            value=sum(1 for w in workers if w.state.value == "ready"),
        )
        yield CounterMetricFamily(
            "srsrelay_worker_restarts",
            "Worker processes started again after they died or hung.",
            value=sum(w.restarts for w in workers),
        )
        yield CounterMetricFamily(
            "srsrelay_worker_viewers_lost",
            "Viewer sessions that ended because their worker process died.",
            value=pool.viewers_lost if pool is not None else 0,
        )
        yield CounterMetricFamily(
            "srsrelay_worker_feed_dropped_frames",
            "Frames not passed to a worker process that was behind (worker feed bound).",
            value=sum(w.feed_dropped for w in workers),
        )


def _counter(part: object, name: str) -> collections.Counter[Any]:
    """`part.<name>` if it is a Counter (parts add their counters independently)."""
    value = getattr(part, name, None)
    return value if isinstance(value, collections.Counter) else collections.Counter()
