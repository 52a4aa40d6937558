"""The hub: which streams are live, who publishes them."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from srsrelay.config import AudioConfig, HubConfig
from srsrelay.hub.stream import Stream

log = structlog.get_logger(__name__)


class StreamBusy(Exception):
    """Someone already publishes this stream and hub.takeover is off."""


class StreamNotFound(Exception):
    """Nobody publishes this stream."""


class Hub:
    """Live streams by "app/name". Everything is synchronous: no awaits, no tasks."""

    def __init__(self, hub_config: HubConfig, audio_config: AudioConfig, payload_size: int) -> None:
        self._hub_config = hub_config
        self._audio_config = audio_config
        self._payload_size = payload_size
        self._streams: dict[str, Stream] = {}
        self._kicks: dict[str, Callable[[str], None]] = {}

    def publish(
        self, app: str, name: str, publisher_id: str, kick: Callable[[str], None]
    ) -> Stream:
        """Register a new live stream; `kick(reason)` disconnects its publisher.

        Raises StreamBusy if the stream is live, unless hub.takeover is set: then the
        old publisher is kicked and its stream ended (its readers get on_stream_end).
        """
        key = f"{app}/{name}"
        old = self._streams.get(key)
        if old is not None:
            if not self._hub_config.takeover:
                raise StreamBusy(
                    f"stream {key} is already being published "
                    f"(set hub.takeover = true to let a new publisher replace it)"
                )
            old_kick = self._kicks[key]
            log.info("publish taken over", stream=key, old=old.publisher_id, new=publisher_id)
            self.unpublish(old)
            self._call_kick(old, old_kick, f"taken over by {publisher_id}")
        stream = Stream(
            app,
            name,
            publisher_id,
            self._hub_config,
            self._audio_config,
            self._payload_size,
        )
        self._streams[key] = stream
        self._kicks[key] = kick
        log.info("publish started", stream=key, publisher=publisher_id)
        return stream

    def unpublish(self, stream: Stream) -> None:
        """End `stream` (readers get on_stream_end). Idempotent; a stream already
        replaced by a takeover does not remove its successor."""
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]
            del self._kicks[stream.key]
        stream.end()

    def find(self, app: str, name: str) -> Stream:
        """The live stream app/name; raises StreamNotFound."""
        key = f"{app}/{name}"
        stream = self._streams.get(key)
        if stream is None:
            raise StreamNotFound(f"stream {key} is not live")
        return stream

    def streams(self) -> list[Stream]:
        """All live streams, oldest first."""
        return list(self._streams.values())

    def close(self) -> None:
        """Shutdown: end every stream and kick its publisher."""
        for stream in list(self._streams.values()):
            kick = self._kicks[stream.key]
            self.unpublish(stream)
            self._call_kick(stream, kick, "relay is shutting down")

    @staticmethod
    def _call_kick(stream: Stream, kick: Callable[[str], None], reason: str) -> None:
        try:
            kick(reason)
        except Exception:
            log.exception("kicking the publisher failed", stream=stream.key)
