"""One published stream: FLV tags in, RTP-packetized frames out to every reader.

All work here happens once per stream, synchronously on the publisher's path:
parse, packetize H.264, transcode AAC to Opus, cache the current GOP, fan out.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import time
import typing
from dataclasses import dataclass, field
from typing import Protocol

import av.error
import structlog

from srsrelay.config import AudioConfig, HubConfig, VideoConfig
from srsrelay.hub import av1, h264, hevc, transcode
from srsrelay.hub.frames import AUDIO_CLOCK_RATE, VIDEO_CLOCK_RATE, MediaKind, RtpFrame
from srsrelay.hub.opus import AacToOpus
from srsrelay.hub.timeline import ArrivalAnchor, Timeline, Track
from srsrelay.rtmp import flv

log = structlog.get_logger(__name__)

VIDEO_TICKS_PER_MS = VIDEO_CLOCK_RATE // 1000
DEFAULT_NALU_LENGTH_SIZE = 4
"""Used for NALUs that arrive before any sequence header (what every encoder sends)."""
ERROR_LOG_INTERVAL = 1.0
"""Seconds between two log lines about the same kind of failure in one stream."""


BFRAMES_ADVICE = (
    "set B-frames to 0 in the encoder (ffmpeg: -bf 0 or -tune zerolatency; "
    "OBS: x264 options bframes=0, or Tune zerolatency)"
)


SDP_CODECS = {"AVC": "H264", "HEVC": "H265", "AV1": "AV1"}
"""Video codec names: as the FLV parser gives them -> as SDP (and the API) names them."""

AUDIO_PACE_QUEUE = 50
"""Most Opus packets (1 s) held by the audio pacer; beyond it they are sent at once."""

MAX_CONSECUTIVE_ERRORS = 50
"""Malformed tags in a row after which the publish is rejected (about 1-2 s of media)."""
AAC_OBJECT_TYPES = {1: "Main", 2: "LC", 4: "LTP", 5: "HE-AAC (SBR)", 29: "HE-AACv2 (PS)"}
"""Audio object types FFmpeg's AAC decoder handles (ISO/IEC 14496-3 Table 1.17)."""


class PublishRejected(Exception):
    """The publisher sent input the stream cannot use: its publish should be closed.
    The message names the stream and what is wrong."""


class BframesPolicy(enum.Enum):
    """What the stream does with H.264 B-frames (setting video.bframes)."""

    DROP = "drop"
    """Drop non-reference B-frames; the rest decodes in order at a lower frame rate."""
    TRANSCODE = "transcode"
    """Re-encode the stream once without B-frames (PyAV, libx264 zerolatency)."""
    PASSTHROUGH = "passthrough"
    """Send B-frames unchanged (browsers mostly fail to play them)."""


class PublishState(enum.Enum):
    LIVE = "live"
    """A publisher is attached."""
    WAITING = "waiting"
    """The publisher left; readers stay for hub.reconnect_grace."""
    ENDED = "ended"


class StreamTap(Protocol):
    """What receives every stream's frames once, for other processes (srsrelay.workers):
    not a viewer, so it survives a codec change and is not counted as a reader."""

    def on_frame(self, stream: Stream, frame: RtpFrame) -> None:
        """A frame went to `stream`'s readers; must not block or raise."""

    def on_drop(self, stream: Stream, reason: str) -> None:
        """`stream` dropped its readers (they renegotiate)."""

    def on_end(self, stream: Stream, reason: str) -> None:
        """`stream` ended; nothing more of it follows."""


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
    bframes_dropped: int = 0
    """Non-reference B-frames dropped (video.bframes = "drop")."""
    frames_transcoded: int = 0
    """Video frames re-encoded without B-frames."""
    timestamp_jumps: int = 0
    """Publisher timestamps that jumped and were re-anchored on the stream clock."""
    publishers: int = 0
    """Publishers that published this stream (more than 1 after reconnects)."""
    reader_errors: int = 0
    """Exceptions raised by readers (a reader bug; the frame still went to the others)."""
    keyframes: int = 0
    """Video keyframes sent to readers."""
    last_keyframe_ts: int = 0
    """RTP timestamp (90 kHz) of the last of those keyframes."""
    gop_ticks: int = 0
    """RTP ticks (90 kHz) between the last two keyframes: the GOP length; 0 before two."""

    def count_keyframe(self, timestamp: int, keyframe: bool) -> None:
        """Note a video frame sent to readers at RTP `timestamp` (for the GOP length)."""
        if not keyframe:
            return
        if self.keyframes and timestamp > self.last_keyframe_ts:
            self.gop_ticks = timestamp - self.last_keyframe_ts
        self.keyframes += 1
        self.last_keyframe_ts = timestamp


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
        video_config: VideoConfig | None = None,
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
        self.tap: StreamTap | None = None
        """Gets every frame too (the hub sets it; renditions inherit it)."""
        self.stats = StreamStats()
        self.avc_config: flv.AvcConfig | None = None
        self.video_codec = "H264"
        """SDP name of the video codec: H264, or H265 / AV1 passed through from an
        enhanced-RTMP publisher."""
        self.video_fmtp = ""
        """H265 and AV1: the format parameters viewers are answered with."""
        self.hevc_config: hevc.HevcConfig | None = None
        self.av1_config: av1.Av1Config | None = None
        self._video_record = b""
        """The HEVC or AV1 sequence header record (the transcoder's extradata)."""
        self.rendition: Stream | None = None
        """H.264 made once from an HEVC or AV1 stream (video.transcode_to_h264), for
        viewers that cannot receive the original; it shares this stream's audio."""
        self.aac_config: flv.AacConfig | None = None
        self.ended = False
        self.state = PublishState.LIVE
        self.left_at: float | None = None
        """time.monotonic() when the publisher left (state WAITING), else None."""
        self._video_config = video_config or VideoConfig()
        self.bframes_policy = BframesPolicy(self._video_config.bframes)
        """The active B-frame policy: the configured one, unless a fallback replaced it."""
        self.has_bframes = False
        """The stream's video reorders pictures (B-frames or a composition time offset)."""
        self._bframes_logged = False
        self._timeline = Timeline()
        self._timeline_jumps_logged = False
        self._last_video_ts = -1
        """RTP timestamp of the last video frame sent (drop/transcode keep it increasing)."""
        self._await_keyframe = False
        """Drop video until the next IDR (after a new publisher attached, or the policy
        switched to transcoding)."""
        self._video_transcoder: transcode.H264Transcoder | transcode.ThreadedTranscoder | None = (
            None
        )
        self._transcode_generation = 0
        """Changes whenever the video transcoder is replaced: late results are ignored."""
        self._audio_codec = "aac"
        self.stats.publishers = 1
        self._hub_config = hub_config
        self._audio_config = audio_config
        self._payload_size = payload_size
        self._asc: bytes | None = None
        self._transcoder: AacToOpus | None = None
        self._unsupported_logged: set[str] = set()
        self._tag_error_log = _Throttle(ERROR_LOG_INTERVAL)
        self._reader_error_log = _Throttle(ERROR_LOG_INTERVAL)
        self._raw_before_config_logged = False
        self._consecutive_errors = 0
        # Opus packets held by the pacer with the monotonic time they are due: bounded by
        # AUDIO_PACE_QUEUE (`_pace_audio` sends at once instead of holding more).
        self._audio_queue: collections.deque[tuple[float, RtpFrame]] = collections.deque()
        self._audio_timer: asyncio.TimerHandle | None = None
        self._audio_arrival = ArrivalAnchor()
        """When audio arrives, for the pacer (audio alone: it may trail video)."""
        self.arrival = ArrivalAnchor()
        """When frames of either track arrive: the one mapping of stream time to our
        clock that viewers' Sender Reports use for both tracks."""

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
            if tag.codec != "AVC":
                self._on_passthrough_tag(tag, timestamp_ms, received_at)
            elif tag.packet_type is flv.AvcPacketType.SEQUENCE_HEADER:
                try:
                    config = flv.parse_avc_config(tag.data)
                    self._on_avc_config(config)
                except flv.FlvError as exc:
                    self._reject(f"unusable AVC sequence header: {exc}")
            elif tag.packet_type is flv.AvcPacketType.NALU:
                dts = self._map_time(Track.VIDEO, timestamp_ms, received_at)
                self._on_nalus(dts, tag.composition_time, tag.data, received_at)
            self._consecutive_errors = 0
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
            if tag.sound_format == flv.SOUND_FORMAT_MP3:
                self._on_mp3(received_at)
            elif tag.packet_type is flv.AacPacketType.SEQUENCE_HEADER:
                self._on_aac_config(tag.data, received_at)
                return
            ts = self._map_time(Track.AUDIO, timestamp_ms, received_at)
            self._on_aac_frame(ts, tag.data, received_at)
            self._consecutive_errors = 0
        except flv.UnsupportedCodec as exc:
            self._unsupported(exc)
        except flv.FlvError as exc:
            self._tag_error("audio tag dropped", exc, received_at)

    def _map_time(self, track: Track, timestamp_ms: int, now: float) -> int:
        mapped = self._timeline.map(track, timestamp_ms, now)
        if mapped.jumped:
            self.stats.timestamp_jumps += 1
            if not self._timeline_jumps_logged:
                self._timeline_jumps_logged = True
                log.warning(
                    "publisher timestamps jumped; stream clock continued from the last frame",
                    stream=self.key,
                    track=track.value,
                    timestamp_ms=timestamp_ms,
                    stream_ms=mapped.ms,
                )
        return mapped.ms

    # -- publishers come and go ---------------------------------------------------------

    @property
    def publishing(self) -> bool:
        """A publisher is attached (False while waiting for a reconnect)."""
        return self.state is PublishState.LIVE

    def _set_state(self, new: PublishState, **extra: object) -> None:
        old, self.state = self.state, new
        log.info("stream state", stream=self.key, old=old.value, new=new.value, **extra)

    def detach(self, now: float) -> None:
        """The publisher left; readers stay attached until attach() or end()."""
        if self.state is not PublishState.LIVE:
            return
        self.left_at = now
        self._set_state(PublishState.WAITING, publisher=self.publisher_id)

    def attach(self, publisher_id: str) -> None:
        """A new publisher continues this stream: its timestamps continue the stream
        clock and video resumes at its first keyframe."""
        if self.ended:
            raise RuntimeError(f"stream {self.key} has ended")
        previous = self.publisher_id
        self.publisher_id = publisher_id
        self.left_at = None
        self.stats.publishers += 1
        self._timeline.new_publisher()
        self._await_keyframe = True
        if self._video_transcoder is not None:
            # The new publisher starts a new coded stream: decode it from its keyframe.
            self._stop_video_transcoder()
        self._set_state(PublishState.LIVE, publisher=publisher_id, previous=previous)

    # -- video ----------------------------------------------------------------------

    def _set_video_codec(self, codec: str) -> None:
        """A sequence header in `codec` arrived: viewers of another codec must renegotiate."""
        if codec == self.video_codec:
            return
        old, self.video_codec = self.video_codec, codec
        if self.has_video:
            self.drop_readers(f"video codec changed from {old} to {codec}")
        else:
            self.gop = GopCache(generation=self.gop.generation + 1)
        self._stop_video_transcoder()
        self.avc_config = self.hevc_config = self.av1_config = None
        self.profile_level_id = None
        self.video_fmtp = ""
        self._await_keyframe = True

    def drop_readers(self, reason: str) -> None:
        """End every reader's session (they renegotiate when they come back, in the new
        codec): the cached GOP is of the old one, so new readers start at the next
        keyframe."""
        log.info(
            "stream readers dropped", stream=self.key, readers=len(self.readers), reason=reason
        )
        if self.rendition is not None:
            self.rendition.end(reason)
            self.rendition = None
        self._end_readers()
        self.gop = GopCache(generation=self.gop.generation + 1)
        if self.tap is not None:
            self.tap.on_drop(self, reason)

    def _end_readers(self) -> None:
        """Detach every reader and tell it the stream ended for it."""
        readers, self.readers = self.readers, []
        for reader in readers:
            try:
                reader.on_stream_end()
            except Exception:
                log.exception("reader failed on stream end", stream=self.key)

    def relay_frame(self, frame: RtpFrame) -> None:
        """A frame made by another process's copy of this stream: cache it (video) and
        send it to the readers, as if it had been made here."""
        if frame.kind is MediaKind.VIDEO:
            self._cache(frame)
            self.stats.video_frames += 1
            self.stats.count_keyframe(frame.timestamp, frame.keyframe)
        else:
            self.stats.audio_frames += 1
        self._fan_out(frame)

    def _on_avc_config(self, config: flv.AvcConfig) -> None:
        self._set_video_codec("H264")
        if config == self.avc_config:
            return
        try:
            profile = h264.profile_level_id(config.sps[0])
        except ValueError as exc:
            raise flv.FlvError(f"AVC sequence header: {exc}") from None
        changed = self.avc_config is not None
        self.avc_config = config
        self.has_video = True
        if self._video_transcoder is None:
            self.profile_level_id = profile
        else:
            # New parameter sets: restart decoding at the next keyframe.
            self._stop_video_transcoder()
            self._await_keyframe = True
        log.info(
            "video config changed" if changed else "video config",
            stream=self.key,
            profile_level_id=profile,
            nalu_length_size=config.nalu_length_size,
        )

    def _on_nalus(self, dts_ms: int, cts_ms: int, data: bytes, received_at: float) -> None:
        config = self.avc_config
        length_size = config.nalu_length_size if config else DEFAULT_NALU_LENGTH_SIZE
        nalus = flv.split_nalus(data, length_size)
        keyframe = h264.has_idr(nalus)
        info = h264.picture_info(nalus)
        if not self.has_bframes and (cts_ms != 0 or (info is not None and info.is_b)):
            self.has_bframes = True
        if self.has_bframes:
            self._on_bframes(info)
        policy = self.bframes_policy
        if self.has_bframes and policy is BframesPolicy.TRANSCODE:
            self._transcode(data, dts_ms, dts_ms + cts_ms, keyframe, received_at)
            return
        if (
            self.has_bframes
            and policy is BframesPolicy.DROP
            and info is not None
            and info.is_b
            and not info.is_reference
        ):
            self.stats.bframes_dropped += 1
            return
        if keyframe and config is not None:
            nalus = h264.with_parameter_sets(nalus, config.sps, config.pps)
        timestamp = max(0, dts_ms + cts_ms) * VIDEO_TICKS_PER_MS
        if policy is not BframesPolicy.PASSTHROUGH:
            # What is left is in presentation order; keep it strictly increasing.
            timestamp = max(timestamp, self._last_video_ts + 1)
        self._emit_video(nalus, timestamp, keyframe, received_at)

    # -- HEVC and AV1 (enhanced RTMP) -----------------------------------------------------

    def _on_passthrough_tag(self, tag: flv.VideoTag, timestamp_ms: int, received_at: float) -> None:
        codec = SDP_CODECS[tag.codec]
        if tag.packet_type is flv.AvcPacketType.SEQUENCE_HEADER:
            try:
                if codec == "H265":
                    self._on_hevc_config(hevc.parse_hevc_config(tag.data), tag.data)
                else:
                    self._on_av1_config(av1.parse_av1_config(tag.data), tag.data)
            except flv.FlvError as exc:
                self._reject(f"unusable {tag.codec} sequence header: {exc}")
            return
        if tag.packet_type is not flv.AvcPacketType.NALU:
            return  # end of sequence, metadata
        if codec != self.video_codec or (self.hevc_config is None and self.av1_config is None):
            raise flv.FlvError(f"{tag.codec} frame before its sequence header")
        dts = self._map_time(Track.VIDEO, timestamp_ms, received_at)
        pts = max(0, dts + tag.composition_time)
        if self.hevc_config is not None:
            nalus = flv.split_nalus(tag.data, self.hevc_config.nalu_length_size)
            keyframe = hevc.is_irap(nalus)
            if keyframe:
                nalus = hevc.with_parameter_sets(nalus, self.hevc_config)
            payloads = hevc.packetize(nalus, self._payload_size)
        else:
            assert self.av1_config is not None
            keyframe = tag.frame_type is flv.VideoFrameType.KEY
            payloads = av1.packetize(
                tag.data,
                self._payload_size,
                keyframe=keyframe,
                sequence_header=self.av1_config.config_obus or None,
            )
        if tag.composition_time != 0 and not self.has_bframes:
            self.has_bframes = True
            log.warning(
                "stream reorders pictures; passed through as they are",
                stream=self.key,
                codec=tag.codec,
                advice=BFRAMES_ADVICE,
            )
        timestamp = pts * VIDEO_TICKS_PER_MS
        if tag.composition_time == 0:
            timestamp = max(timestamp, self._last_video_ts + 1)
        if self.rendition is not None:
            self._transcode(tag.data, dts, pts, keyframe, received_at)
        self._emit_payloads(payloads, timestamp, keyframe, received_at)

    def _on_hevc_config(self, config: hevc.HevcConfig, record: bytes) -> None:
        self._set_video_codec("H265")
        if config == self.hevc_config:
            return
        changed = self.hevc_config is not None
        self.hevc_config = config
        self._on_passthrough_config(hevc.fmtp(config), record, changed)

    def _on_av1_config(self, config: av1.Av1Config, record: bytes) -> None:
        self._set_video_codec("AV1")
        if config == self.av1_config:
            return
        changed = self.av1_config is not None
        self.av1_config = config
        self._on_passthrough_config(av1.fmtp(config), record, changed)

    def _on_passthrough_config(self, fmtp: str, record: bytes, changed: bool) -> None:
        self.has_video = True
        self.video_fmtp = fmtp
        self._video_record = record
        if self._video_transcoder is not None:
            # New parameters: the transcoder restarts at the next keyframe.
            self._stop_video_transcoder()
        if self._video_config.transcode_to_h264 and self.rendition is None:
            if transcode.available():
                self.rendition = self._new_rendition()
            else:
                log.warning(
                    "libx264 is not available for video.transcode_to_h264; viewers without "
                    f"{self.video_codec} get 406",
                    stream=self.key,
                )
        log.info(
            "video config changed" if changed else "video config",
            stream=self.key,
            codec=self.video_codec,
            fmtp=fmtp,
            h264_rendition=self.rendition is not None,
        )

    def _new_rendition(self) -> Stream:
        rendition = Stream(
            self.app,
            self.name,
            self.publisher_id,
            self._hub_config,
            self._audio_config,
            self._payload_size,
            self._video_config,
        )
        # Same key: to viewers, limits and the API it is the same stream.
        rendition.tap = self.tap
        rendition.has_video = True
        rendition.has_audio = self.has_audio
        return rendition

    def _on_bframes(self, info: h264.PictureInfo | None) -> None:
        """Log the B-frames once; fall back when dropping them is unsafe."""
        if not self._bframes_logged:
            self._bframes_logged = True
            log.warning(
                "stream has B-frames",
                stream=self.key,
                policy=self.bframes_policy.value,
                advice=BFRAMES_ADVICE,
            )
        if self.bframes_policy is BframesPolicy.DROP and info is not None:
            if info.is_b and info.is_reference:
                # B-pyramid: later pictures predict from this B-frame, dropping it
                # would break them.
                fallback = (
                    BframesPolicy.TRANSCODE if transcode.available() else BframesPolicy.PASSTHROUGH
                )
                log.warning(
                    "stream uses B-frames as references (B-pyramid): they cannot be dropped",
                    stream=self.key,
                    policy=fallback.value,
                    advice=BFRAMES_ADVICE + ", or b-pyramid=none",
                )
                self._switch_policy(fallback)
        if self.bframes_policy is BframesPolicy.TRANSCODE and not transcode.available():
            log.warning(
                "libx264 is not available for video.bframes = transcode; passing B-frames through",
                stream=self.key,
            )
            self._switch_policy(BframesPolicy.PASSTHROUGH)

    def _switch_policy(self, policy: BframesPolicy) -> None:
        self.bframes_policy = policy
        if policy is BframesPolicy.TRANSCODE:
            self._await_keyframe = True

    def _transcode(
        self, data: bytes, dts_ms: int, pts_ms: int, keyframe: bool, received_at: float
    ) -> None:
        if self._video_transcoder is None:
            decoder = self._decoder_config()
            if not keyframe or decoder is None:
                self._await_keyframe = True
                return  # the decoder must start at a keyframe with its parameter sets
            try:
                transcoder = transcode.H264Transcoder(
                    decoder[1],
                    self._video_config.transcode_keyframe_interval,
                    _frame_rate(self.metadata),
                    decoder=decoder[0],
                )
            except (av.error.FFmpegError, ValueError) as exc:
                if self.rendition is not None:
                    log.warning(
                        "video transcoder failed to start; no H.264 for this stream",
                        stream=self.key,
                        error=str(exc),
                    )
                    self.rendition.end("transcoder failed")
                    self.rendition = None
                    return
                log.warning(
                    "video transcoder failed to start; passing B-frames through",
                    stream=self.key,
                    error=str(exc),
                )
                self.bframes_policy = BframesPolicy.PASSTHROUGH
                return
            self._transcode_generation += 1
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._video_transcoder = transcoder  # no loop: transcode inline
            else:
                output = functools.partial(self._on_transcoded, self._transcode_generation)
                self._video_transcoder = transcode.ThreadedTranscoder(transcoder, loop, output)
        worker = self._video_transcoder
        if isinstance(worker, transcode.ThreadedTranscoder):
            worker.submit(data, dts_ms, pts_ms, keyframe, received_at)
            return
        errors_before = worker.errors
        pictures = worker.encode(data, dts_ms, pts_ms)
        self.stats.errors += worker.errors - errors_before
        self._on_transcoded(self._transcode_generation, pictures, received_at)

    def _decoder_config(self) -> tuple[str, bytes] | None:
        """(FFmpeg decoder, extradata) for the current video codec, if configured."""
        if self.video_codec == "H264":
            if self.avc_config is None:
                return None
            return "h264", transcode.avc_record(self.avc_config)
        if not self._video_record:
            return None
        return ("hevc" if self.video_codec == "H265" else transcode.AV1_DECODER), self._video_record

    def _stop_video_transcoder(self) -> None:
        if self._video_transcoder is not None:
            self._video_transcoder.close()
            self._video_transcoder = None
        self._transcode_generation += 1

    def _on_transcoded(
        self, generation: int, pictures: list[transcode.EncodedPicture], received_at: float
    ) -> None:
        if self.ended or generation != self._transcode_generation:
            return  # from a transcoder that was replaced or stopped since
        # B-frames removed: into this stream; HEVC/AV1 made H.264: into the rendition.
        target = self.rendition if self.rendition is not None else self
        for picture in pictures:
            self.stats.frames_transcoded += 1
            if picture.keyframe:
                sps = next((n for n in picture.nalus if h264.nal_type(n) == h264.NAL_SPS), None)
                if sps is not None and len(sps) >= 4:
                    target.profile_level_id = h264.profile_level_id(sps)
            timestamp = max(max(0, picture.pts_ms) * VIDEO_TICKS_PER_MS, target._last_video_ts + 1)
            target._emit_video(picture.nalus, timestamp, picture.keyframe, received_at)

    def _emit_video(
        self, nalus: list[bytes], timestamp: int, keyframe: bool, received_at: float
    ) -> None:
        self._emit_payloads(
            h264.packetize(nalus, self._payload_size), timestamp, keyframe, received_at
        )

    def _emit_payloads(
        self, packets: list[bytes], timestamp: int, keyframe: bool, received_at: float
    ) -> None:
        if self._await_keyframe:
            if not keyframe:
                return
            self._await_keyframe = False
        payloads = tuple(packets)
        if not payloads:
            return  # only AUD / filler / temporal delimiters
        frame = RtpFrame(
            kind=MediaKind.VIDEO,
            timestamp=timestamp,
            keyframe=keyframe,
            payloads=payloads,
            size=sum(len(p) for p in payloads),
            received_at=received_at,
        )
        self._last_video_ts = max(self._last_video_ts, timestamp)
        self._cache(frame)
        self.stats.video_frames += 1
        self.stats.count_keyframe(timestamp, keyframe)
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

    def _on_mp3(self, received_at: float) -> None:
        """Start the MP3 decoder at the first MP3 tag (MP3 has no sequence header)."""
        if self._audio_codec == "mp3" and self._transcoder is not None:
            return
        self._close_transcoder()
        self._audio_codec = "mp3"
        try:
            self._transcoder = AacToOpus(None, self._audio_config.opus_bitrate, codec="mp3")
        except (av.error.FFmpegError, ValueError) as exc:
            self._tag_error("MP3 decoder failed to start", exc, received_at)
            return
        self.has_audio = True
        if self.rendition is not None:
            self.rendition.has_audio = True
        log.info("audio config", stream=self.key, codec="MP3")

    def _on_aac_config(self, asc: bytes, received_at: float) -> None:
        if asc == self._asc and self._audio_codec == "aac":
            return
        try:
            config = flv.parse_audio_specific_config(asc)
        except flv.FlvError as exc:
            self._reject(f"unusable AAC sequence header: {exc}")
        if config.object_type not in AAC_OBJECT_TYPES:
            self._reject(
                f"AAC audio object type {config.object_type} is not supported "
                f"(supported: {', '.join(AAC_OBJECT_TYPES.values())}; use AAC-LC)"
            )
        self._close_transcoder()
        self._asc = asc
        self._audio_codec = "aac"
        try:
            self._transcoder = AacToOpus(asc, self._audio_config.opus_bitrate)
        except (av.error.FFmpegError, ValueError) as exc:
            self._tag_error("AAC config rejected by the decoder", exc, received_at)
            return
        self.aac_config = config
        self.has_audio = True
        if self.rendition is not None:
            self.rendition.has_audio = True
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
            self._pace_audio(frame)

    def _pace_audio(self, frame: RtpFrame) -> None:
        """Send audio at its own timestamps: `audio.pacing` seconds after the earliest
        arrival (relative to the stream clock) seen, in order, never later than that."""
        delay = self._audio_config.pacing
        seconds = frame.timestamp / AUDIO_CLOCK_RATE
        due = self._audio_arrival.update(frame.received_at, seconds) + seconds + delay
        queue = self._audio_queue
        if delay > 0 and len(queue) < AUDIO_PACE_QUEUE:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None  # no loop (unit tests): send at once
            if loop is not None and (queue or due > time.monotonic()):
                queue.append((due, frame))
                if self._audio_timer is None:
                    self._schedule_audio(loop)
                return
        self._flush_audio(float("inf"))
        self._send_audio(frame)

    def _schedule_audio(self, loop: asyncio.AbstractEventLoop) -> None:
        wait = max(0.0, self._audio_queue[0][0] - time.monotonic())
        self._audio_timer = loop.call_later(wait, self._release_audio)

    def _release_audio(self) -> None:
        self._audio_timer = None
        if self.ended:
            return
        self._flush_audio(time.monotonic())
        if self._audio_queue:
            self._schedule_audio(asyncio.get_running_loop())

    def _flush_audio(self, until: float) -> None:
        queue = self._audio_queue
        while queue and queue[0][0] <= until:
            self._send_audio(queue.popleft()[1])

    def _send_audio(self, frame: RtpFrame) -> None:
        self.stats.audio_frames += 1
        self._fan_out(frame)
        if self.rendition is not None:
            self.rendition._fan_out(frame)

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
        self._consecutive_errors += 1
        if self._tag_error_log.ready(now):
            log.warning(event, stream=self.key, error=str(exc), errors=self.stats.errors)
        if self._consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
            self._reject(f"{self._consecutive_errors} malformed tags in a row, the last: {exc}")

    def _reject(self, reason: str) -> typing.NoReturn:
        log.warning("publish rejected", stream=self.key, reason=reason)
        raise PublishRejected(f"stream {self.key}: {reason}")

    def _fan_out(self, frame: RtpFrame) -> None:
        rate = VIDEO_CLOCK_RATE if frame.kind is MediaKind.VIDEO else AUDIO_CLOCK_RATE
        self.arrival.update(frame.received_at, frame.timestamp / rate)
        # A copy: a reader may remove itself (or others) from inside on_frame.
        for reader in tuple(self.readers):
            try:
                reader.on_frame(frame)
            except Exception as exc:
                self.stats.reader_errors += 1
                if self._reader_error_log.ready(frame.received_at):
                    log.exception("reader failed on a frame", stream=self.key, error=repr(exc))
        if self.tap is not None:
            try:
                self.tap.on_frame(self, frame)
            except Exception as exc:
                self.stats.reader_errors += 1
                if self._reader_error_log.ready(frame.received_at):
                    log.exception("stream tap failed on a frame", stream=self.key, error=repr(exc))

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

    def end(self, reason: str = "unpublished") -> None:
        """Stop the stream: tell every reader, release the transcoders. Idempotent."""
        if self.ended:
            return
        self.ended = True
        self._set_state(PublishState.ENDED, reason=reason)
        self._end_readers()
        if self.tap is not None:
            self.tap.on_end(self, reason)
        self._close_transcoder()
        if self._audio_timer is not None:
            self._audio_timer.cancel()
            self._audio_timer = None
        self._audio_queue.clear()
        if self._video_transcoder is not None:
            self._stop_video_transcoder()
        if self.rendition is not None:
            self.rendition.end(reason)
            self.rendition = None
        self.gop = GopCache(generation=self.gop.generation + 1)
        log.info(
            "stream ended",
            stream=self.key,
            reason=reason,
            publishers=self.stats.publishers,
            has_bframes=self.has_bframes,
            bframes_policy=self.bframes_policy.value,
            bframes_dropped=self.stats.bframes_dropped,
            timestamp_jumps=self.stats.timestamp_jumps,
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


def _frame_rate(metadata: dict[str, object]) -> float:
    """The publisher's frame rate from onMetaData, or 0 if it gave none."""
    value = metadata.get("framerate", metadata.get("videoframerate"))
    if isinstance(value, int | float) and 0 < value <= 240:
        return float(value)
    return 0.0
