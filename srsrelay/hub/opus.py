"""AAC (from RTMP) to Opus (for WebRTC), once per stream.

Decode with FFmpeg's AAC decoder, resample to 48 kHz stereo in 20 ms frames and
encode with libopus. Memory stays bounded: the resampler holds less than one
Opus frame of samples, the codecs hold at most a frame each.
"""

from __future__ import annotations

import time

import av
import av.error
import structlog

from srsrelay.hub.frames import AUDIO_CLOCK_RATE

log = structlog.get_logger(__name__)

OPUS_FRAME_SAMPLES = 960
"""20 ms at 48 kHz: the frame size WebRTC receivers expect."""
OPUS_LOOKAHEAD = 312
"""libopus's encoder delay at 48 kHz (6.5 ms, the pre-skip of RFC 7845 section 4.2):
the first decoded samples of a packet are input from that long before its start."""
OPUS_SAMPLE_FORMAT = "s16"
"""libopus accepts s16 or flt; s16 halves the copy size."""
SAMPLES_PER_MS = AUDIO_CLOCK_RATE // 1000
RESYNC_THRESHOLD_MS = 500
"""An RTMP timestamp this far from the running sample count restarts the audio clock."""
ERROR_LOG_INTERVAL = 1.0
"""Seconds between two log lines about failing AAC frames."""


class AacToOpus:
    """Transcode one stream's AAC frames to Opus packets with 48 kHz RTP timestamps."""

    def __init__(self, asc: bytes | None, bitrate: int, codec: str = "aac") -> None:
        """`asc` is the AudioSpecificConfig from the AAC sequence header (None for
        `codec` "mp3", whose frames carry their own headers).

        Raises av.error.FFmpegError (or ValueError) if FFmpeg rejects the config.
        """
        decoder = av.CodecContext.create(codec, "r")
        if not isinstance(decoder, av.AudioCodecContext):
            raise ValueError(f"{codec} is not an audio codec")
        self._decoder = decoder
        if asc is not None:
            self._decoder.extradata = asc
        self._decoder.open()
        self._encoder = av.CodecContext.create("libopus", "w")
        self._encoder.sample_rate = AUDIO_CLOCK_RATE
        self._encoder.layout = "stereo"
        self._encoder.format = OPUS_SAMPLE_FORMAT
        self._encoder.bit_rate = bitrate
        self._encoder.open()
        self._resampler = self._new_resampler()
        self._base: int | None = None
        """RTP timestamp (48 kHz) where the current run of continuous audio starts."""
        self._in_samples = 0.0
        """Input samples decoded since `_base`, converted to 48 kHz."""
        self._out_samples = 0
        """Samples encoded into Opus packets since `_base`."""
        self.errors = 0
        """AAC frames that failed to decode or transcode."""
        self.resyncs = 0
        """Times the audio clock was restarted from the RTMP timestamp."""
        self._last_error_log = -ERROR_LOG_INTERVAL
        self._closed = False

    @staticmethod
    def _new_resampler() -> av.AudioResampler:
        return av.AudioResampler(
            format=OPUS_SAMPLE_FORMAT,
            layout="stereo",
            rate=AUDIO_CLOCK_RATE,
            frame_size=OPUS_FRAME_SAMPLES,
        )

    def encode(self, aac_frame: bytes, timestamp_ms: int) -> list[tuple[bytes, int]]:
        """Transcode one raw AAC frame (or MP3 tag body); return (Opus packet, RTP
        timestamp) pairs.

        Usually 0..2 packets: Opus frames are 20 ms, AAC frames ~21-46 ms. Never raises
        for bad input: failures are counted in `errors` and logged at most once a second.
        """
        if self._closed:
            return []
        target = timestamp_ms * SAMPLES_PER_MS
        if self._base is None or abs(target - self._input_position()) > (
            RESYNC_THRESHOLD_MS * SAMPLES_PER_MS
        ):
            if self._base is not None:
                self.resyncs += 1
                log.info(
                    "audio clock resynced",
                    expected_ms=round(self._input_position() / SAMPLES_PER_MS),
                    timestamp_ms=timestamp_ms,
                )
                # Drop the partial frame held by the resampler: it belongs to the old run.
                self._resampler = self._new_resampler()
            self._base = target
            self._in_samples = 0.0
            self._out_samples = 0
        try:
            return self._transcode(aac_frame)
        except (av.error.FFmpegError, ValueError) as exc:
            self.errors += 1
            self._resampler = self._new_resampler()
            now = time.monotonic()
            if now - self._last_error_log >= ERROR_LOG_INTERVAL:
                self._last_error_log = now
                log.warning("AAC frame dropped", error=str(exc), errors=self.errors)
            return []

    def _input_position(self) -> float:
        assert self._base is not None
        return self._base + self._in_samples

    def _transcode(self, aac_frame: bytes) -> list[tuple[bytes, int]]:
        assert self._base is not None
        out: list[tuple[bytes, int]] = []
        for decoded in self._decoder.decode(av.Packet(aac_frame)):
            self._in_samples += decoded.samples * AUDIO_CLOCK_RATE / decoded.sample_rate
            for frame in self._resampler.resample(decoded):
                for packet in self._encoder.encode(frame):
                    # The decoder's output lags the input by the encoder's lookahead:
                    # stamp the packet with the time of the audio it plays.
                    stamp = self._base + self._out_samples - OPUS_LOOKAHEAD
                    out.append((bytes(packet), stamp))
                    self._out_samples += packet.duration or OPUS_FRAME_SAMPLES
        return out

    def close(self) -> None:
        """Stop transcoding; later encode() calls return nothing.

        The FFmpeg contexts are freed when the owner drops this object (PyAV has no
        explicit close for codec contexts).
        """
        self._closed = True
