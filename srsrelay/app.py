"""The relay: the hub plus its three listeners (RTMP in, WebRTC out, HTTP signalling)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import structlog

from srsrelay.config import Config, worker_count
from srsrelay.hooks import HookClient, PublishAuth
from srsrelay.http.api import Api
from srsrelay.http.server import HttpServer
from srsrelay.hub.registry import Hub
from srsrelay.metrics import Metrics
from srsrelay.reload import ReloadPlan, plan_reload
from srsrelay.rtmp.server import RtmpServer
from srsrelay.webrtc.server import RtcServer
from srsrelay.workers.pool import WorkerPool, WorkerStartError

log = structlog.get_logger(__name__)

SHUTDOWN_REASON = "relay is shutting down"


class StartError(Exception):
    """A listener could not be opened; the message names the setting to change."""


class Relay:
    """Starts and stops the parts in order. One instance per process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.hub = Hub(
            config.hub,
            config.audio,
            config.rtc.payload_size,
            config.video,
            max_publishers=config.rtmp.max_publishers,
        )
        self.rtc = RtcServer(config.rtc)
        self.auth = PublishAuth(config.auth)
        """auth.publish_keys; `update` applies a reload."""
        self.hooks = HookClient(config.hooks)
        """[hooks] callbacks; `update` applies a reload."""
        self.rtmp = RtmpServer(config.rtmp, self.hub, auth=self.auth, hooks=self.hooks)
        workers = worker_count(config.daemon)
        self.pool: WorkerPool | None = (
            WorkerPool(config, workers, self.hub, self.hooks) if workers > 1 else None
        )
        """daemon.workers > 1: worker processes serve the viewers (self.rtc stays closed)."""
        self.http: HttpServer | None = None
        self.metrics = Metrics(self)
        """Prometheus registry of this relay, event-loop lag and rates for the API."""
        self._started: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        """Stop callables of the parts that started, in start order."""
        self._stopped = False

    @property
    def rtmp_port(self) -> int:
        return self.rtmp.port

    @property
    def rtc_port(self) -> int:
        """The RTC port; with worker processes, the first worker's."""
        if self.pool is not None:
            return self.pool.workers[0].rtc_port if self.pool.workers else 0
        return self.rtc.port

    @property
    def http_port(self) -> int:
        if self.http is None:
            raise RuntimeError("the relay is not started")
        return self.http.port

    @property
    def api(self) -> Api | None:
        """The JSON API (None before start); `update` applies a reload of [api]."""
        return self.http.api if self.http is not None else None

    async def start(self) -> None:
        """Open the RTC socket, then the RTMP and HTTP listeners.

        Raises StartError naming the setting if a port cannot be bound; whatever had
        started by then is stopped again.
        """
        cfg = self.config
        try:
            await self.hooks.start()
            self._started.append(("hooks", self.hooks.stop))
            if self.pool is not None:
                self.hub.tap = self.pool
                self._started.append(("workers", self.pool.stop))
                try:
                    await self.pool.start()
                except WorkerStartError as exc:
                    raise StartError(f"daemon.workers: {exc}") from None
            else:
                await _listen("rtc.port", cfg.rtc.listen, cfg.rtc.port, self.rtc.start)
                self._started.append(("rtc", self.rtc.stop))
            await _listen("rtmp.port", cfg.rtmp.listen, cfg.rtmp.port, self.rtmp.start)
            self._started.append(("rtmp", self.rtmp.stop))
            self.http = HttpServer(
                cfg.http,
                self.hub,
                self.rtc,
                rtmp_port=self.rtmp.port,
                hooks=self.hooks,
                api=cfg.api,
                rtmp=self.rtmp,
                metrics=self.metrics,
                pool=self.pool,
            )
            await _listen("http.port", cfg.http.listen, cfg.http.port, self.http.start)
            self._started.append(("http", self.http.stop))
            self.metrics.start()
            self._started.append(("metrics", self.metrics.stop))
        except BaseException:
            await self.stop()
            raise

    def reload(self, new: Config) -> ReloadPlan:
        """Switch to a reloaded configuration without dropping sessions.

        The keys in srsrelay.reload.RELOADABLE take effect for what comes next (requests,
        connections, publishes); other changed keys are logged as needing a restart and
        kept. log.level is in the plan but applied by the caller, which owns logging.
        Raises ConfigError (nothing applied) if the resulting mix is not valid.
        """
        plan = plan_reload(self.config, new)
        if plan.needs_restart:
            log.warning("setting changed; needs a restart", keys=list(plan.needs_restart))
        cfg = self.config = plan.config
        # Every part holds frozen config sections: swap them here, in one place.
        self.rtmp._config = cfg.rtmp
        self.hub.max_publishers = cfg.rtmp.max_publishers
        self.rtc.config = cfg.rtc
        if self.http is not None:
            self.http.reconfigure(cfg.http)
        if self.api is not None:
            self.api.update(cfg.api)
        if self.pool is not None:
            self.pool.reload(cfg)
        self.auth.update(cfg.auth)
        self.hooks.update(cfg.hooks)
        log.info("config reloaded", applied=list(plan.applied))
        return plan

    async def stop(self) -> None:
        """Stop accepting (HTTP, RTMP), close viewer sessions, end every stream.

        The graceful part is bounded by daemon.shutdown_timeout; after it the RTC
        socket is closed regardless. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        started = dict(self._started)
        timeout = self.config.daemon.shutdown_timeout
        try:
            async with asyncio.timeout(timeout):
                for name in ("http", "rtmp"):
                    if name in started:
                        await started[name]()
                for session_id in list(self.rtc.sessions):
                    await self.rtc.close_session(session_id, SHUTDOWN_REASON)
        except TimeoutError:
            log.warning(
                "graceful stop timed out, dropping what is left",
                setting="daemon.shutdown_timeout",
                timeout=timeout,
                sessions=len(self.rtc.sessions),
            )
        if "workers" in started:
            # Bounded by daemon.shutdown_timeout itself; workers close their own viewers.
            await started["workers"]()
        self.hub.close()
        if "rtc" in started:
            await started["rtc"]()
        if "metrics" in started:
            await started["metrics"]()
        # Last: on_unpublish and on_stop of everything closed above (bounded by hooks.timeout).
        if "hooks" in started:
            await started["hooks"]()


async def _listen(setting: str, host: str, port: int, start: Callable[[], Awaitable[None]]) -> None:
    try:
        await start()
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise StartError(f"{setting}: cannot listen on {host}:{port}: {reason}") from exc
