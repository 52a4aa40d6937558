"""One Prometheus exposition out of the main process's and its workers'.

Every process renders the same families from its own parts (srsrelay.metrics). The main
process serves /metrics: it parses its own text and each worker's, sums the samples, takes
the worst event-loop lag, and keeps the families that only describe the ingest process
from itself. Pure: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

MAIN_ONLY = frozenset(
    {
        "srsrelay_build_info",
        "srsrelay_start_time_seconds",
        "srsrelay_publishers",
        "srsrelay_streams",
        "srsrelay_workers",
    }
)
"""Families (as exposed: counters with `_total`) describing the ingest process: taken
from the main process only, ignored in workers. See also MAIN_ONLY_PREFIXES."""
MAIN_ONLY_PREFIXES = ("srsrelay_rtmp_", "srsrelay_worker_")
"""Family name prefixes that are main-only as well (RTMP ingest and the worker pool run in
the main process)."""
MAX_FAMILIES = frozenset(
    {"srsrelay_event_loop_lag_last_seconds", "srsrelay_event_loop_lag_max_seconds"}
)
"""Gauges merged by taking the maximum (the worst event loop) instead of the sum."""

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
"""(sample name, sorted labels): what identifies a sample across processes."""


def exposed_name(family: Metric) -> str:
    """The family's name as the text format writes it (the parser drops a counter's `_total`)."""
    return family.name + "_total" if family.type == "counter" else family.name


def is_main_only(name: str) -> bool:
    """Whether the family named `name` (as exposed) is taken from the main process only."""
    return name in MAIN_ONLY or name.startswith(MAIN_ONLY_PREFIXES)


class _Merged:
    """One family being merged: its type and help come from the first process that has it."""

    def __init__(self, family: Metric) -> None:
        self.family = family
        self.samples: dict[SampleKey, tuple[str, dict[str, str], float]] = {}
        self.take_max = exposed_name(family) in MAX_FAMILIES
        self.add(family)

    def add(self, family: Metric) -> None:
        for s in family.samples:
            if s.name.endswith("_created"):
                continue  # a creation time is not a count: summing it means nothing
            key = (s.name, tuple(sorted(s.labels.items())))
            old = self.samples.get(key)
            value = float(s.value)
            if old is not None:
                value = max(old[2], value) if self.take_max else old[2] + value
            self.samples[key] = (s.name, dict(s.labels), value)

    def metric(self) -> Metric:
        out = Metric(self.family.name, self.family.documentation, self.family.type)
        for name, labels, value in self.samples.values():
            out.add_sample(name, labels, value)
        return out


class _Fixed(Collector):
    """Yields metrics built beforehand (so that generate_latest writes them)."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics


def _parse(text: bytes) -> list[Metric]:
    # A list, so that a text failing halfway is rejected whole.
    return list(text_string_to_metric_families(text.decode("utf-8")))


def merge_expositions(main: bytes, workers: Sequence[bytes]) -> bytes:
    """The exposition of `main` with every worker's samples merged in.

    Samples are keyed by (name, labels) and summed, except MAX_FAMILIES (maximum);
    main-only families (is_main_only) come from `main` alone. Families keep main's order,
    then come those found only in workers, in the order first seen. A worker text that
    does not parse, or a worker family whose type differs from main's, is skipped with a
    warning. `main` comes from this process's own Metrics.render: a ValueError there is a bug
    and is raised.
    """
    merged: dict[str, _Merged] = {}
    for family in _parse(main):
        merged[exposed_name(family)] = _Merged(family)
    for index, text in enumerate(workers):
        try:
            families = _parse(text)
        except Exception as exc:  # any garbage from a worker must not break /metrics
            log.warning(
                "worker metrics skipped", worker=index, error=f"{type(exc).__name__}: {exc}"
            )
            continue
        for family in families:
            name = exposed_name(family)
            if is_main_only(name):
                continue
            into = merged.get(name)
            if into is None:
                merged[name] = _Merged(family)
            elif into.family.type != family.type:
                log.warning(
                    "worker metric family skipped",
                    worker=index,
                    family=name,
                    error=f"type {family.type} differs from {into.family.type}",
                )
            else:
                into.add(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(m.metric() for m in merged.values()))
    return generate_latest(registry)
