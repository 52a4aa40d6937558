"""The hub: which streams are live, who publishes them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from srsrelay.config import AudioConfig, HubConfig, RtmpConfig, VideoConfig
from srsrelay.hub.stream import PublishState, Stream, StreamTap
from srsrelay.limits import LimitHits

log = structlog.get_logger(__name__)


class StreamBusy(Exception):
    """Someone already publishes this stream and hub.takeover is off."""


class StreamNotFound(Exception):
    """Nobody publishes this stream."""


class TooManyPublishers(Exception):
    """rtmp.max_publishers streams are being published; the message names the setting."""


class Hub:
    """Live streams by "app/name". Synchronous: no awaits; the only timers are the
    reconnect-grace expiries, scheduled on the running loop when there is one."""

    def __init__(
        self,
        hub_config: HubConfig,
        audio_config: AudioConfig,
        payload_size: int,
        video_config: VideoConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_publishers: int = RtmpConfig.max_publishers,
    ) -> None:
        self.max_publishers = max_publishers
        """rtmp.max_publishers; the relay changes it on reload (existing publishers stay)."""
        self.limit_hits = LimitHits()
        """Publishes refused by a limit, by its config key."""
        self._hub_config = hub_config
        self._audio_config = audio_config
        self._video_config = video_config or VideoConfig()
        self._payload_size = payload_size
        self._clock = clock
        self._streams: dict[str, Stream] = {}
        self._kicks: dict[str, Callable[[str], None]] = {}
        """Publisher disconnect callbacks of the streams that have a publisher."""
        self._timers: dict[str, asyncio.TimerHandle] = {}
        """Grace expiry timers of the streams waiting for their publisher."""
        self.tap: StreamTap | None = None
        """Given to every new stream: receives its frames once (worker processes)."""

    def publish(
        self, app: str, name: str, publisher_id: str, kick: Callable[[str], None]
    ) -> Stream:
        """Register a publisher of app/name; `kick(reason)` disconnects it.

        A stream waiting for its publisher (hub.reconnect_grace) is continued by the
        new one, readers and all. A live stream raises StreamBusy unless hub.takeover
        is set: then the old publisher is kicked and the new one continues the stream
        (with reconnect_grace = 0, the old stream ends and a new one starts). A publish
        that would make one publisher more than rtmp.max_publishers raises
        TooManyPublishers (a takeover does not add one).
        """
        key = f"{app}/{name}"
        old = self._streams.get(key)
        if old is None or old.state is PublishState.WAITING:
            self._check_publishers(key)
        if old is not None and old.state is PublishState.WAITING:
            self._cancel_timer(key)
            waited = self._clock() - (old.left_at or self._clock())
            old.attach(publisher_id)
            self._kicks[key] = kick
            log.info("publish resumed", stream=key, publisher=publisher_id, waited=round(waited, 2))
            return old
        if old is not None:
            if not self._hub_config.takeover:
                raise StreamBusy(
                    f"stream {key} is already being published "
                    f"(set hub.takeover = true to let a new publisher replace it)"
                )
            old_kick = self._kicks.pop(key)
            log.info("publish taken over", stream=key, old=old.publisher_id, new=publisher_id)
            reason = f"taken over by {publisher_id}"
            if self._hub_config.reconnect_grace > 0:
                old.attach(publisher_id)
                self._kicks[key] = kick
                self._call_kick(old, old_kick, reason)
                return old
            self._remove(old, reason)
            self._call_kick(old, old_kick, reason)
        stream = Stream(
            app,
            name,
            publisher_id,
            self._hub_config,
            self._audio_config,
            self._payload_size,
            self._video_config,
        )
        stream.tap = self.tap
        self._streams[key] = stream
        self._kicks[key] = kick
        log.info("publish started", stream=key, publisher=publisher_id)
        return stream

    @property
    def publisher_count(self) -> int:
        """Streams that have a publisher now (not those waiting for one to come back)."""
        return len(self._kicks)

    def _check_publishers(self, key: str) -> None:
        limit = self.max_publishers
        if len(self._kicks) < limit:
            return
        since = self.limit_hits.hit("rtmp.max_publishers", self._clock())
        if since is not None:
            log.warning(
                "limit reached",
                setting="rtmp.max_publishers",
                limit=limit,
                stream=key,
                hits=since,
                total=self.limit_hits["rtmp.max_publishers"],
            )
        raise TooManyPublishers(
            f"stream {key} refused: the relay has its maximum of {limit} publishers "
            f"(rtmp.max_publishers)"
        )

    def unpublish(self, stream: Stream) -> None:
        """The publisher of `stream` left. With hub.reconnect_grace > 0 the stream and
        its readers wait that long for a new publisher; otherwise it ends (readers get
        on_stream_end). Idempotent; a stream already replaced does not touch its
        successor."""
        key = stream.key
        if self._streams.get(key) is not stream:
            stream.end("publisher left")
            return
        if stream.state is not PublishState.LIVE:
            return
        grace = self._hub_config.reconnect_grace
        if grace <= 0:
            self._remove(stream, "publisher left")
            return
        self._kicks.pop(key, None)
        stream.detach(self._clock())
        log.info("publisher left, waiting for it to come back", stream=key, grace=grace)
        self._schedule_expiry(key, grace)

    def end(self, stream: Stream, reason: str) -> None:
        """End `stream` now, without waiting out hub.reconnect_grace: its publisher sent
        data that cannot be relayed, and the same publisher coming back would too."""
        self._cancel_timer(stream.key)
        self._remove(stream, reason)

    def expire(self, now: float) -> None:
        """End every stream whose publisher left at least hub.reconnect_grace ago."""
        grace = self._hub_config.reconnect_grace
        for stream in list(self._streams.values()):
            left_at = stream.left_at
            if stream.state is PublishState.WAITING and left_at is not None:
                if now - left_at >= grace:
                    self._expire(stream)

    def _expire(self, stream: Stream) -> None:
        self._cancel_timer(stream.key)
        grace = self._hub_config.reconnect_grace
        self._remove(stream, f"publisher did not come back within hub.reconnect_grace={grace:g}s")

    def find(self, app: str, name: str) -> Stream:
        """The stream app/name (live, or waiting for its publisher); raises StreamNotFound."""
        key = f"{app}/{name}"
        stream = self._streams.get(key)
        if stream is None:
            raise StreamNotFound(f"stream {key} is not live")
        return stream

    def streams(self) -> list[Stream]:
        """All streams, live or waiting for their publisher, oldest first."""
        return list(self._streams.values())

    def close(self) -> None:
        """Shutdown: end every stream and kick its publisher."""
        for stream in list(self._streams.values()):
            kick = self._kicks.get(stream.key)
            self._cancel_timer(stream.key)
            self._remove(stream, "relay is shutting down")
            if kick is not None:
                self._call_kick(stream, kick, "relay is shutting down")

    def _remove(self, stream: Stream, reason: str) -> None:
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]
            self._kicks.pop(stream.key, None)
        stream.end(reason)

    def _schedule_expiry(self, key: str, grace: float) -> None:
        self._cancel_timer(key)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (unit tests): the caller drives expire()
        self._timers[key] = loop.call_later(grace, self._on_timer, key)

    def _on_timer(self, key: str) -> None:
        # The timer is cancelled when a publisher comes back: a stream still waiting has
        # waited the whole grace period (the loop may fire a tick early, so no comparison).
        self._timers.pop(key, None)
        stream = self._streams.get(key)
        if stream is not None and stream.state is PublishState.WAITING:
            self._expire(stream)

    def _cancel_timer(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    @staticmethod
    def _call_kick(stream: Stream, kick: Callable[[str], None], reason: str) -> None:
        try:
            kick(reason)
        except Exception:
            log.exception("kicking the publisher failed", stream=stream.key)
