"""One published stream: FLV tags in, RTP-packetized frames out to every reader.

All work here happens once per stream, synchronously on the publisher's path:
parse, packetize H.264, transcode AAC to Opus, cache the current GOP, fan out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import av.error
import structlog

from srsrelay.config import AudioConfig, HubConfig
from srsrelay.hub import h264
from srsrelay.hub.frames import VIDEO_CLOCK_RATE, MediaKind, RtpFrame
from srsrelay.hub.opus import AacToOpus
from srsrelay.rtmp import flv

log = structlog.get_logger(__name__)

VIDEO_TICKS_PER_MS = VIDEO_CLOCK_RATE // 1000
DEFAULT_NALU_LENGTH_SIZE = 4
"""Used for NALUs that arrive before any sequence header (what every encoder sends)."""
ERROR_LOG_INTERVAL = 1.0
"""Seconds between two log lines about the same kind of failure in one stream."""


class StreamReader(Protocol):
    """A consumer of a stream's frames (one per viewer)."""

    def on_frame(self, frame: RtpFrame) -> None:
        """Called synchronously from the publisher path; must not block or raise."""

    def on_stream_end(self) -> None:
        """The stream stopped (unpublish, takeover or shutdown); no more frames follow."""


@dataclass
class GopCache:
    """Video frames of the current GOP, starting at its keyframe, for new readers."""

    generation: int = 0
    """Increments whenever a new GOP starts (a keyframe arrives)."""
    frames: list[RtpFrame] = field(default_factory=list)
    """frames[0].keyframe is True when non-empty. Only appended to; a new GOP gets a new list."""
    truncated: bool = False
    """The GOP hit hub.gop_cache_frames or hub.gop_cache_bytes: later frames are not cached."""
    size: int = 0
    """Sum of the cached frames' payload bytes."""


@dataclass
class StreamStats:
    """Counters of one stream, for logs and the API."""

    frames_in: int = 0
    """Audio and video tags received from the publisher."""
    bytes_in: int = 0
    """Bytes of those tag bodies."""
    video_frames: int = 0
    """Video access units sent to readers."""
    audio_frames: int = 0
    """Opus packets sent to readers."""
    errors: int = 0
    """Malformed tags or frames that failed to transcode."""
    reader_errors: int = 0
    """Exceptions raised by readers (a reader bug; the frame still went to the others)."""


class _Throttle:
    """Allows one event per interval (for log lines, never per packet)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last = -interval - 1.0

    def ready(self, now: float) -> bool:
        if now - self._last >= self._interval:
            self._last = now
            return True
        return False


class Stream:
    """A live stream and its readers. Created and ended by the Hub."""

    def __init__(
        self,
        app: str,
        name: str,
        publisher_id: str,
        hub_config: HubConfig,
        audio_config: AudioConfig,
        payload_size: int,
    ) -> None:
        self.app = app
        self.name = name
        self.key = f"{app}/{name}"
        self.publisher_id = publisher_id
        self.started_at = time.time()
        self.gop = GopCache()
        self.profile_level_id: str | None = None
        self.has_video = False
        self.has_audio = False
        self.metadata: dict[str, object] = {}
        self.readers: list[StreamReader] = []
        self.stats = StreamStats()
        self.avc_config: flv.AvcConfig | None = None
        self.aac_config: flv.AacConfig | None = None
        self.ended = False
        self._hub_config = hub_config
        self._audio_config = audio_config
        self._payload_size = payload_size
        self._asc: bytes | None = None
        self._transcoder: AacToOpus | None = None
        self._unsupported_logged: set[str] = set()
        self._tag_error_log = _Throttle(ERROR_LOG_INTERVAL)
        self._reader_error_log = _Throttle(ERROR_LOG_INTERVAL)
        self._raw_before_config_logged = False

    # -- publisher side -------------------------------------------------------------

    def on_metadata(self, meta: dict[str, object]) -> None:
        """@setDataFrame / onMetaData from the publisher (informational only)."""
        self.metadata = dict(meta)
        log.info("stream metadata", stream=self.key, metadata={k: str(v) for k, v in meta.items()})

    def on_video_tag(self, timestamp_ms: int, body: bytes, received_at: float) -> None:
        """An RTMP video message: `timestamp_ms` is the unwrapped DTS, `received_at` monotonic."""
        if self.ended:
            return
        self.stats.frames_in += 1
        self.stats.bytes_in += len(body)
        try:
            tag = flv.parse_video_tag(body)
            if tag.packet_type is flv.AvcPacketType.SEQUENCE_HEADER:
                self._on_avc_config(flv.parse_avc_config(tag.data))
            elif tag.packet_type is flv.AvcPacketType.NALU:
                self._on_nalus(timestamp_ms + tag.composition_time, tag.data, received_at)
        except flv.UnsupportedCodec as exc:
            self._unsupported(exc)
        except flv.FlvError as exc:
            self._tag_error("video tag dropped", exc, received_at)

    def on_audio_tag(self, timestamp_ms: int, body: bytes, received_at: float) -> None:
        """An RTMP audio message: `timestamp_ms` is the unwrapped timestamp."""
        if self.ended:
            return
        self.stats.frames_in += 1
        self.stats.bytes_in += len(body)
        try:
            tag = flv.parse_audio_tag(body)
            if tag.packet_type is flv.AacPacketType.SEQUENCE_HEADER:
                self._on_aac_config(tag.data, received_at)
            else:
                self._on_aac_frame(timestamp_ms, tag.data, received_at)
        except flv.UnsupportedCodec as exc:
            self._unsupported(exc)
        except flv.FlvError as exc:
            self._tag_error("audio tag dropped", exc, received_at)

    def _on_avc_config(self, config: flv.AvcConfig) -> None:
        if config == self.avc_config:
            return
        self.avc_config = config
        self.has_video = True
        try:
            self.profile_level_id = h264.profile_level_id(config.sps[0])
        except ValueError as exc:
            raise flv.FlvError(f"AVC sequence header: {exc}") from None
        log.info(
            "video config",
            stream=self.key,
            profile_level_id=self.profile_level_id,
            nalu_length_size=config.nalu_length_size,
        )

    def _on_nalus(self, pts_ms: int, data: bytes, received_at: float) -> None:
        config = self.avc_config
        length_size = config.nalu_length_size if config else DEFAULT_NALU_LENGTH_SIZE
        nalus = flv.split_nalus(data, length_size)
        keyframe = h264.has_idr(nalus)
        if keyframe and config is not None:
            nalus = h264.with_parameter_sets(nalus, config.sps, config.pps)
        payloads = tuple(h264.packetize(nalus, self._payload_size))
        if not payloads:
            return  # only AUD / filler
        frame = RtpFrame(
            kind=MediaKind.VIDEO,
            timestamp=max(0, pts_ms) * VIDEO_TICKS_PER_MS,
            keyframe=keyframe,
            payloads=payloads,
            size=sum(len(p) for p in payloads),
            received_at=received_at,
        )
        self._cache(frame)
        self.stats.video_frames += 1
        self._fan_out(frame)

    def _cache(self, frame: RtpFrame) -> None:
        gop = self.gop
        if frame.keyframe:
            # A new object: readers may still hold the previous GOP's list.
            gop = self.gop = GopCache(generation=gop.generation + 1)
        elif not gop.frames or gop.truncated:
            return  # no keyframe yet, or this GOP is already over its bounds
        if (
            len(gop.frames) >= self._hub_config.gop_cache_frames
            or gop.size + frame.size > self._hub_config.gop_cache_bytes
        ):
            gop.truncated = True
            return
        gop.frames.append(frame)
        gop.size += frame.size

    def _on_aac_config(self, asc: bytes, received_at: float) -> None:
        if asc == self._asc:
            return
        config = flv.parse_audio_specific_config(asc)
        self._close_transcoder()
        self._asc = asc
        try:
            self._transcoder = AacToOpus(asc, self._audio_config.opus_bitrate)
        except (av.error.FFmpegError, ValueError) as exc:
            self._tag_error("AAC config rejected by the decoder", exc, received_at)
            return
        self.aac_config = config
        self.has_audio = True
        log.info(
            "audio config",
            stream=self.key,
            object_type=config.object_type,
            sample_rate=config.sample_rate,
            channels=config.channel_config,
        )

    def _on_aac_frame(self, timestamp_ms: int, data: bytes, received_at: float) -> None:
        transcoder = self._transcoder
        if transcoder is None:
            if not self._raw_before_config_logged:
                self._raw_before_config_logged = True
                log.warning(
                    "AAC frames without a usable AAC sequence header dropped", stream=self.key
                )
            return
        errors_before = transcoder.errors
        packets = transcoder.encode(data, timestamp_ms)
        self.stats.errors += transcoder.errors - errors_before
        for packet, rtp_timestamp in packets:
            frame = RtpFrame(
                kind=MediaKind.AUDIO,
                timestamp=rtp_timestamp,
                keyframe=False,
                payloads=(packet,),
                size=len(packet),
                received_at=received_at,
            )
            self.stats.audio_frames += 1
            self._fan_out(frame)

    def _unsupported(self, exc: flv.UnsupportedCodec) -> None:
        if exc.kind not in self._unsupported_logged:
            self._unsupported_logged.add(exc.kind)
            log.warning(
                f"{exc.kind} codec not supported, {exc.kind} dropped",
                stream=self.key,
                codec=exc.codec,
            )

    def _tag_error(self, event: str, exc: Exception, now: float) -> None:
        self.stats.errors += 1
        if self._tag_error_log.ready(now):
            log.warning(event, stream=self.key, error=str(exc), errors=self.stats.errors)

    def _fan_out(self, frame: RtpFrame) -> None:
        # A copy: a reader may remove itself (or others) from inside on_frame.
        for reader in tuple(self.readers):
            try:
                reader.on_frame(frame)
            except Exception as exc:
                self.stats.reader_errors += 1
                if self._reader_error_log.ready(frame.received_at):
                    log.exception("reader failed on a frame", stream=self.key, error=repr(exc))

    # -- reader side ----------------------------------------------------------------

    def add_reader(self, reader: StreamReader) -> None:
        """Start delivering frames; on an ended stream, on_stream_end is called at once."""
        if self.ended:
            reader.on_stream_end()
            return
        if reader not in self.readers:
            self.readers.append(reader)

    def remove_reader(self, reader: StreamReader) -> None:
        """Stop delivering frames (idempotent; on_stream_end is not called)."""
        if reader in self.readers:
            self.readers.remove(reader)

    def end(self) -> None:
        """Stop the stream: tell every reader, release the transcoder. Idempotent."""
        if self.ended:
            return
        self.ended = True
        readers, self.readers = self.readers, []
        for reader in readers:
            try:
                reader.on_stream_end()
            except Exception:
                log.exception("reader failed on stream end", stream=self.key)
        self._close_transcoder()
        self.gop = GopCache(generation=self.gop.generation + 1)
        log.info(
            "stream ended",
            stream=self.key,
            duration=round(time.time() - self.started_at, 1),
            frames_in=self.stats.frames_in,
            bytes_in=self.stats.bytes_in,
            errors=self.stats.errors,
        )

    def _close_transcoder(self) -> None:
        if self._transcoder is not None:
            self._transcoder.close()
            self._transcoder = None
        self._asc = None
