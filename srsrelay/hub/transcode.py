"""Video to H.264 without B-frames, once per stream (PyAV: an FFmpeg decoder + libx264).

Browsers' WebRTC H.264 path decodes in arrival order and expects no reordering, so a
stream with B-frames is re-encoded with x264's zerolatency tune (no B-frames, no
lookahead). HEVC and AV1 streams go the same way for viewers that cannot receive them
(video.transcode_to_h264). Memory stays bounded: zerolatency emits each frame as it goes in, and the
decoder holds at most its reorder depth (a few frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import av.error
import av.video.frame
import structlog

from srsrelay.hub import h264
from srsrelay.rtmp import flv

log = structlog.get_logger(__name__)

TIME_BASE = Fraction(1, 1000)
"""Packet and frame timestamps are RTMP milliseconds."""
ENCODER = "libx264"
ENCODER_PRESET = "veryfast"
DEFAULT_FRAME_RATE = 30
"""Used for the keyframe interval when the publisher's metadata gives no frame rate."""
ERROR_LOG_INTERVAL = 1.0
BACKSTOP_FACTOR = 2
AV1_DECODER = "libdav1d" if "libdav1d" in av.codecs_available else "av1"
"""FFmpeg's AV1 decoder: dav1d when the build has it (FFmpeg's own needs hardware)."""


def available() -> bool:
    """True if this FFmpeg build has the libx264 encoder."""
    return ENCODER in av.codecs_available


@dataclass(frozen=True, slots=True)
class EncodedPicture:
    """One re-encoded access unit."""

    nalus: list[bytes]
    """NAL units, SPS/PPS in front of each IDR."""
    pts_ms: int
    """Presentation time (the same as decode time: no B-frames)."""
    keyframe: bool
    """An IDR picture."""


class H264Transcoder:
    """Decode one stream's access units and re-encode them as H.264 without B-frames."""

    def __init__(
        self,
        record: bytes,
        keyframe_interval: float,
        frame_rate: float,
        decoder: str = "h264",
    ) -> None:
        """`record` is the sequence header's decoder configuration record (avcC, hvcC or
        av1C) for the FFmpeg `decoder` ("h264", "hevc" or AV1_DECODER); access units
        are then in the same form as in the FLV tags."""
        context = av.CodecContext.create(decoder, "r")
        if not isinstance(context, av.VideoCodecContext):
            raise ValueError(f"{decoder} is not a video decoder")
        self._decoder = context
        self._decoder.extradata = record
        self._decoder.open()
        self._keyframe_interval = keyframe_interval
        self._frame_rate = frame_rate if frame_rate > 0 else DEFAULT_FRAME_RATE
        self._encoder: av.VideoCodecContext | None = None
        self._size: tuple[int, int] | None = None
        self._last_pts = -1
        self._last_key_pts: int | None = None
        self.errors = 0
        """Access units that failed to decode or encode."""
        self._last_error_log = -ERROR_LOG_INTERVAL
        self.closed = False

    def _open_encoder(self, width: int, height: int) -> av.VideoCodecContext:
        # Keyframes are forced by time (see _encode_frame); x264's own interval is only
        # a backstop for a publisher whose timestamps stall.
        gop = max(1, round(self._keyframe_interval * self._frame_rate)) * BACKSTOP_FACTOR
        encoder = av.CodecContext.create(ENCODER, "w")
        assert isinstance(encoder, av.VideoCodecContext)
        encoder.width = width
        encoder.height = height
        encoder.pix_fmt = "yuv420p"
        encoder.time_base = TIME_BASE
        encoder.framerate = Fraction(round(self._frame_rate * 1000), 1000)
        encoder.gop_size = gop
        encoder.max_b_frames = 0
        encoder.options = {
            "preset": ENCODER_PRESET,
            "tune": "zerolatency",
            "profile": "baseline",
            # SPS/PPS in front of every IDR, so viewers can join at any keyframe.
            "x264-params": f"keyint={gop}:scenecut=0:repeat-headers=1",
            "forced-idr": "1",
        }
        encoder.open()
        self._size = (width, height)
        log.info("video transcoder started", width=width, height=height, gop=gop)
        return encoder

    def encode(self, avcc: bytes, dts_ms: int, pts_ms: int) -> list[EncodedPicture]:
        """Feed one access unit (AVCC/HVCC NAL units or AV1 OBUs); return the pictures
        the encoder produced (0..n)."""
        if self.closed:
            return []
        try:
            packet = av.Packet(avcc)
            packet.pts = pts_ms
            packet.dts = dts_ms
            packet.time_base = TIME_BASE
            out: list[EncodedPicture] = []
            for frame in self._decoder.decode(packet):
                assert isinstance(frame, av.video.frame.VideoFrame)
                out.extend(self._encode_frame(frame))
            return out
        except (av.error.FFmpegError, ValueError) as exc:
            self.errors += 1
            now = time.monotonic()
            if now - self._last_error_log >= ERROR_LOG_INTERVAL:
                self._last_error_log = now
                log.warning("video frame dropped by the transcoder", error=str(exc))
            return []

    def _encode_frame(self, frame: av.video.frame.VideoFrame) -> list[EncodedPicture]:
        size = (frame.width, frame.height)
        encoder = self._encoder
        if encoder is None or size != self._size:
            encoder = self._encoder = self._open_encoder(*size)
            self._last_key_pts = None
        pts = frame.pts if frame.pts is not None else self._last_pts + 1
        # The encoder refuses timestamps that do not increase.
        pts = max(pts, self._last_pts + 1)
        self._last_pts = pts
        frame = frame.reformat(format="yuv420p") if frame.format.name != "yuv420p" else frame
        frame.pts = pts
        frame.time_base = TIME_BASE
        interval_ms = self._keyframe_interval * 1000
        if self._last_key_pts is None or pts - self._last_key_pts >= interval_ms:
            self._last_key_pts = pts
            frame.pict_type = av.video.frame.PictureType.I
        else:
            frame.pict_type = av.video.frame.PictureType.NONE
        pictures: list[EncodedPicture] = []
        for packet in encoder.encode(frame):
            nalus = h264.split_annexb(bytes(packet))
            if not nalus:
                continue
            pictures.append(
                EncodedPicture(
                    nalus=nalus,
                    pts_ms=int(packet.pts if packet.pts is not None else pts),
                    keyframe=h264.has_idr(nalus),
                )
            )
        return pictures

    def close(self) -> None:
        """Stop; later encode() calls return nothing (PyAV frees the codecs with us).
        May be called from another thread than the one encoding."""
        self.closed = True


def avc_record(config: flv.AvcConfig) -> bytes:
    """An AVCDecoderConfigurationRecord (ISO/IEC 14496-15 5.2.4.1) for the decoder."""
    parts = [
        bytes(
            (
                1,
                config.profile,
                config.compatibility,
                config.level,
                0xFC | (config.nalu_length_size - 1),
                0xE0 | len(config.sps),
            )
        )
    ]
    for sps in config.sps:
        parts.append(len(sps).to_bytes(2, "big") + sps)
    parts.append(bytes((len(config.pps),)))
    for pps in config.pps:
        parts.append(len(pps).to_bytes(2, "big") + pps)
    return b"".join(parts)


QUEUE_FRAMES = 60
"""Access units waiting for the transcoding thread (2 s at 30 fps). When it is full the
thread is behind: input is dropped until the next keyframe."""

Output = Callable[[list[EncodedPicture], float], None]
"""Receives the pictures made from one access unit and that unit's arrival time."""


class ThreadedTranscoder:
    """An H264Transcoder on its own thread, so decoding and encoding (FFmpeg releases
    the GIL there) do not hold up the event loop. Results come back on the loop."""

    def __init__(
        self, transcoder: H264Transcoder, loop: asyncio.AbstractEventLoop, output: Output
    ) -> None:
        self._transcoder = transcoder
        self._loop = loop
        self._output = output
        self._queue: queue.Queue[tuple[bytes, int, int, float] | None] = queue.Queue(QUEUE_FRAMES)
        self._skip_to_keyframe = False
        self.dropped = 0
        """Access units dropped because the thread was behind."""
        self._thread = threading.Thread(target=self._run, name="h264-transcoder", daemon=True)
        self._thread.start()

    @property
    def errors(self) -> int:
        return self._transcoder.errors

    def submit(self, avcc: bytes, dts_ms: int, pts_ms: int, keyframe: bool, at: float) -> None:
        """Queue one access unit; never blocks."""
        if self._transcoder.closed:
            return
        if self._skip_to_keyframe and not keyframe:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((avcc, dts_ms, pts_ms, at))
            self._skip_to_keyframe = False
        except queue.Full:
            self.dropped += 1
            self._skip_to_keyframe = True
            log.warning("video transcoder is behind; dropping to the next keyframe")

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._transcoder.closed:
                return
            avcc, dts_ms, pts_ms, at = item
            pictures = self._transcoder.encode(avcc, dts_ms, pts_ms)
            if pictures:
                try:
                    self._loop.call_soon_threadsafe(self._output, pictures, at)
                except RuntimeError:
                    return  # the loop is closed

    def close(self) -> None:
        """Stop the thread after the unit it is working on; queued units are dropped."""
        self._transcoder.close()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
