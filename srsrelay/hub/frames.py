"""Frames as the hub hands them to readers: packetized once per stream."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class MediaKind(enum.Enum):
    VIDEO = "video"
    AUDIO = "audio"


VIDEO_CLOCK_RATE = 90_000
AUDIO_CLOCK_RATE = 48_000


@dataclass(frozen=True, slots=True)
class RtpFrame:
    """One access unit (video) or one Opus packet (audio), already RTP-packetized.

    Readers rewrite only SSRC, sequence number, timestamp and payload type.
    """

    kind: MediaKind
    """Which track this frame belongs to."""
    timestamp: int
    """RTP timestamp in the track's clock (90 kHz video, 48 kHz audio), stream-relative
    and unwrapped; readers add their own offset and wrap at 2**32."""
    keyframe: bool
    """True for a video IDR access unit (SPS/PPS are already in front of it)."""
    payloads: tuple[bytes, ...]
    """RTP payloads in send order (STAP-A / FU-A / single NAL, or one Opus packet)."""
    size: int
    """Sum of payload sizes, bytes."""
    received_at: float
    """time.monotonic() when the RTMP message carrying it arrived."""

    @property
    def marker_index(self) -> int:
        """Index of the packet that carries the RTP marker bit (last of a video frame)."""
        return len(self.payloads) - 1 if self.kind is MediaKind.VIDEO else -1
