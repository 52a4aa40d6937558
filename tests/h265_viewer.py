"""Receive HEVC (H.265) with aiortc, for tests.

aiortc 1.16.0 knows no H265: `h265_receiving()` adds it for the duration of a block (the
codec in the receiver's offer, an RFC 7798 depayloader and PyAV's "hevc" decoder) and
restores aiortc afterwards. `H265Viewer` is a WHEP viewer that offers only H265 and Opus.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast
from unittest import mock

import aiohttp
import av
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
    rtcrtpreceiver,
)
from aiortc import codecs as aiortc_codecs
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import VIDEO_TIME_BASE, MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters
from av.frame import Frame

from tests.whep_client import loopback_candidates

H265_MIME = "video/H265"
H265_CLOCK = 90_000
H265_PARAMETERS = {"profile-id": "1"}
"""Main profile (RFC 7798 section 7.1); the relay answers with the stream's own fmtp."""

START_CODE = b"\x00\x00\x00\x01"
"""The "hevc" decoder reads Annex B byte streams (H.265 Annex B)."""
NAL_HEADER_SIZE = 2
FU_HEADER_SIZE = 1
AP_LENGTH_SIZE = 2
NAL_AP = 48
"""Aggregation Packet (RFC 7798 section 4.4.2)."""
NAL_FU = 49
"""Fragmentation Unit (RFC 7798 section 4.4.3)."""
NAL_PACI = 50
"""PACI packet (RFC 7798 section 4.4.4): not sent by the relay, not supported here."""
_FU_START = 0x80
_FU_TYPE_MASK = 0x3F
_KEEP_F_AND_LAYER = 0x81
"""First NAL header byte without the 6-bit type: F and the top bit of nuh_layer_id."""


def payload_type_of(payload: bytes) -> int:
    """The Type field of the 2-byte payload header (RFC 7798 section 1.1.4)."""
    return (payload[0] >> 1) & 0x3F


def h265_depayload(payload: bytes) -> bytes:
    """Annex B bytes for one RTP payload (RFC 7798, no DONL: sprop-max-don-diff is 0).

    The jitter buffer joins the results of a picture's packets in sequence order, so a
    continuation fragment returns its bytes without a start code. Raises ValueError,
    which aiortc's receiver counts as a malformed payload.
    """
    if len(payload) < NAL_HEADER_SIZE + 1:
        raise ValueError(f"H265 payload of {len(payload)} bytes is shorter than 3")
    kind = payload_type_of(payload)
    if kind < NAL_AP:
        # Single NAL unit packet (4.4.1): the payload is the NAL unit.
        return START_CODE + payload
    if kind == NAL_AP:
        return _depayload_ap(payload)
    if kind == NAL_FU:
        return _depayload_fu(payload)
    raise ValueError(f"H265 payload type {kind} is not supported")


def _depayload_ap(payload: bytes) -> bytes:
    # 4.4.2: after the PayloadHdr, each NAL unit follows its 16-bit size.
    out = bytearray()
    pos = NAL_HEADER_SIZE
    while pos < len(payload):
        if pos + AP_LENGTH_SIZE > len(payload):
            raise ValueError(f"H265 AP size field truncated at offset {pos}")
        size = int.from_bytes(payload[pos : pos + AP_LENGTH_SIZE], "big")
        pos += AP_LENGTH_SIZE
        if size < NAL_HEADER_SIZE or pos + size > len(payload):
            raise ValueError(f"H265 AP NAL unit of {size} bytes at offset {pos} is invalid")
        out += START_CODE + payload[pos : pos + size]
        pos += size
    if not out:
        raise ValueError("H265 AP carries no NAL unit")
    return bytes(out)


def _depayload_fu(payload: bytes) -> bytes:
    # 4.4.3: the NAL unit header is the PayloadHdr with Type replaced by FuType;
    # it is sent only once, implied by the start fragment.
    if len(payload) < NAL_HEADER_SIZE + FU_HEADER_SIZE + 1:
        raise ValueError(f"H265 FU of {len(payload)} bytes carries no data")
    fu_header = payload[NAL_HEADER_SIZE]
    data = payload[NAL_HEADER_SIZE + FU_HEADER_SIZE :]
    if not fu_header & _FU_START:
        return data
    fu_type = fu_header & _FU_TYPE_MASK
    header = bytes(((payload[0] & _KEEP_F_AND_LAYER) | (fu_type << 1), payload[1]))
    return START_CODE + header + data


class H265Decoder(Decoder):
    """PyAV's "hevc" decoder fed one access unit (Annex B) per jitter-buffer frame."""

    def __init__(self) -> None:
        self.codec = av.CodecContext.create("hevc", "r")

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        packet = av.Packet(encoded_frame.data)
        packet.pts = encoded_frame.timestamp
        packet.time_base = VIDEO_TIME_BASE
        return cast(list[Frame], self.codec.decode(packet))


def _h265_codecs() -> list[RTCRtpCodecParameters]:
    used = {
        c.payloadType
        for kind in aiortc_codecs.CODECS.values()
        for c in kind
        if c.payloadType is not None
    }
    payload_type = max(used) + 1
    return [
        RTCRtpCodecParameters(
            mimeType=H265_MIME,
            clockRate=H265_CLOCK,
            payloadType=payload_type,
            rtcpFeedback=[
                RTCRtcpFeedback(type="nack"),
                RTCRtcpFeedback(type="nack", parameter="pli"),
            ],
            parameters=dict(H265_PARAMETERS),
        ),
        RTCRtpCodecParameters(
            mimeType="video/rtx",
            clockRate=H265_CLOCK,
            payloadType=payload_type + 1,
            parameters={"apt": payload_type},
        ),
    ]


@contextlib.contextmanager
def h265_receiving() -> Iterator[None]:
    """aiortc offers, depayloads and decodes H265 inside the block; restored after.

    The block must cover the peer connection's whole life: the receiver's decoder
    thread looks the decoder up when the first frame arrives.
    """
    added = _h265_codecs()
    # rtcrtpreceiver imported these by name: its own references are the ones to patch.
    original_depayload = aiortc_codecs.depayload
    original_get_decoder = aiortc_codecs.get_decoder

    def depayload(codec: RTCRtpCodecParameters, payload: bytes) -> bytes:
        if codec.mimeType.lower() == H265_MIME.lower():
            return h265_depayload(payload)
        return original_depayload(codec, payload)

    def get_decoder(codec: RTCRtpCodecParameters) -> Decoder:
        if codec.mimeType.lower() == H265_MIME.lower():
            return H265Decoder()
        return original_get_decoder(codec)

    video = aiortc_codecs.CODECS["video"]
    video.extend(added)
    try:
        with (
            mock.patch.object(rtcrtpreceiver, "depayload", depayload),
            mock.patch.object(rtcrtpreceiver, "get_decoder", get_decoder),
        ):
            yield
    finally:
        for codec in added:
            video.remove(codec)


def _prefer(transceiver: RTCRtpTransceiver, kind: str, mime: str) -> None:
    # The codec and its RTX (RFC 4588), nothing else.
    caps = RTCRtpReceiver.getCapabilities(kind)
    assert caps is not None
    wanted = [c for c in caps.codecs if c.mimeType.lower() in (mime.lower(), f"{kind}/rtx")]
    transceiver.setCodecPreferences(wanted)


@dataclass
class H265Result:
    status: int = 0
    offer: str = ""
    """The viewer's SDP offer."""
    answer: str = ""
    """The relay's SDP answer (or the error body when status is not 201)."""
    video_pts: list[int] = field(default_factory=list)
    """pts (90 kHz) of every decoded video frame, in arrival order."""
    video_size: tuple[int, int] | None = None
    """Width and height of the last decoded frame."""
    audio_frames: int = 0
    """Decoded Opus frames."""


class H265Viewer:
    """A WHEP viewer offering only H265 (with RTX) and Opus. Use inside h265_receiving()."""

    def __init__(self, base_url: str, path: str) -> None:
        self.url = base_url + path
        self.result = H265Result()
        self._pc: RTCPeerConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, http: aiohttp.ClientSession) -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pc = pc
        video = pc.addTransceiver("video", direction="recvonly")
        _prefer(video, "video", H265_MIME)
        _prefer(pc.addTransceiver("audio", direction="recvonly"), "audio", "audio/opus")

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.ensure_future(self._consume(track)))

        with loopback_candidates():
            await pc.setLocalDescription(await pc.createOffer())
        self.result.offer = pc.localDescription.sdp
        async with http.post(
            self.url, data=self.result.offer, headers={"Content-Type": "application/sdp"}
        ) as resp:
            self.result.status = resp.status
            self.result.answer = await resp.text()
        if self.result.status != 201:
            return
        await pc.setRemoteDescription(RTCSessionDescription(sdp=self.result.answer, type="answer"))

    async def _consume(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    assert frame.pts is not None
                    self.result.video_pts.append(frame.pts)
                    self.result.video_size = (frame.width, frame.height)
                else:
                    self.result.audio_frames += 1
        except MediaStreamError:
            return

    async def close(self) -> None:
        if self._pc is not None:
            await self._pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
