"""FLV audio/video tag bodies as carried in RTMP messages 8 (audio) and 9 (video).

Pure parsing, no I/O. References: Adobe FLV File Format Specification v10.1
(E.4.2 audio tags, E.4.3 video tags), ISO/IEC 14496-15 5.2.4.1
(AVCDecoderConfigurationRecord), ISO/IEC 14496-3 1.6.2.1 (AudioSpecificConfig) and the
veovera Enhanced RTMP specification (v1/v2, "ExVideoTagHeader") for HEVC and AV1.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FlvError(ValueError):
    """A tag body or codec configuration is malformed; the message says what is wrong."""


class UnsupportedCodec(FlvError):
    """The tag is well-formed but uses a codec we do not handle (yet)."""

    def __init__(self, kind: str, codec: str) -> None:
        super().__init__(f"{kind} codec {codec} is not supported")
        self.kind = kind
        """"audio" or "video"."""
        self.codec = codec
        """Human-readable codec name, e.g. "HEVC (enhanced RTMP 'hvc1')" or "MP3"."""


class VideoFrameType(enum.IntEnum):
    KEY = 1
    INTER = 2
    DISPOSABLE_INTER = 3
    GENERATED_KEY = 4
    INFO = 5
    """Video info/command frame: carries no picture."""


class AvcPacketType(enum.IntEnum):
    SEQUENCE_HEADER = 0
    NALU = 1
    END_OF_SEQUENCE = 2


class ExVideoPacketType(enum.IntEnum):
    """Enhanced RTMP VideoPacketType: the low nibble of byte 0 when IsExHeader is set."""

    SEQUENCE_START = 0
    CODED_FRAMES = 1
    SEQUENCE_END = 2
    CODED_FRAMES_X = 3
    """Coded frames with an implied composition time of 0 (no SI24 field)."""
    METADATA = 4
    MPEG2TS_SEQUENCE_START = 5
    MULTITRACK = 6
    MOD_EX = 7


class AacPacketType(enum.IntEnum):
    SEQUENCE_HEADER = 0
    """Data is an AudioSpecificConfig."""
    RAW = 1
    """Data is one raw AAC frame."""


CODEC_ID_AVC = 7
CODEC_ID_HEVC = 12
"""Non-standard legacy id for HEVC (AVC-style header) sent by several hardware encoders."""
CODEC_AVC = "AVC"
CODEC_HEVC = "HEVC"
CODEC_AV1 = "AV1"
FOURCC_AVC = b"avc1"
FOURCC_HEVC = b"hvc1"
FOURCC_AV1 = b"av01"
EX_VIDEO_HEADER_FLAG = 0x80
"""IsExHeader: bit 7 of byte 0 of an enhanced RTMP video tag."""
SI24_SIZE = 3
MOD_EX_LARGE_SIZE = 256
"""A one-byte ModEx size of 255 (+1 = 256) means a 16-bit size follows."""
SOUND_FORMAT_MP3 = 2
SOUND_FORMAT_AAC = 10
AVC_TAG_HEADER_SIZE = 5
AAC_TAG_HEADER_SIZE = 2
AVC_RECORD_MIN_SIZE = 7
"""Fixed fields of an AVCDecoderConfigurationRecord with zero SPS (6) plus the PPS count."""

_VIDEO_CODECS = {
    1: "JPEG",
    2: "Sorenson H.263",
    3: "Screen video",
    4: "On2 VP6",
    5: "On2 VP6 with alpha",
    6: "Screen video v2",
    7: "AVC",
    12: "HEVC",
}

_FOURCC_CODECS = {
    FOURCC_AVC: CODEC_AVC,
    FOURCC_HEVC: CODEC_HEVC,
    FOURCC_AV1: CODEC_AV1,
}

# Enhanced RTMP FourCCs we know but do not relay, named for the error message.
_UNSUPPORTED_FOURCCS = {
    b"vp08": "VP8",
    b"vp09": "VP9",
    b"vvc1": "VVC",
}

_EX_TO_AVC_PACKET_TYPE = {
    ExVideoPacketType.SEQUENCE_START: AvcPacketType.SEQUENCE_HEADER,
    ExVideoPacketType.CODED_FRAMES: AvcPacketType.NALU,
    ExVideoPacketType.CODED_FRAMES_X: AvcPacketType.NALU,
    ExVideoPacketType.SEQUENCE_END: AvcPacketType.END_OF_SEQUENCE,
}

_SOUND_FORMATS = {
    0: "linear PCM (platform endian)",
    1: "ADPCM",
    2: "MP3",
    3: "linear PCM (little endian)",
    4: "Nellymoser 16 kHz",
    5: "Nellymoser 8 kHz",
    6: "Nellymoser",
    7: "G.711 A-law",
    8: "G.711 mu-law",
    9: "enhanced RTMP audio",
    10: "AAC",
    11: "Speex",
    13: "Opus",
    14: "MP3 8 kHz",
    15: "device-specific",
}

_SOUND_RATES = (5512, 11025, 22050, 44100)

# ISO/IEC 14496-3 Table 1.18; indexes 13 and 14 are reserved, 15 means "explicit".
_AAC_SAMPLE_RATES = (
    96000,
    88200,
    64000,
    48000,
    44100,
    32000,
    24000,
    22050,
    16000,
    12000,
    11025,
    8000,
    7350,
)


@dataclass(frozen=True, slots=True)
class VideoTag:
    """A parsed AVC, HEVC or AV1 video tag body (legacy or enhanced RTMP header)."""

    frame_type: VideoFrameType
    """Key, inter, ... or INFO (no picture data: command or metadata frame)."""
    packet_type: AvcPacketType | None
    """Sequence header, coded frame(s) or end of sequence; None for an INFO frame.
    Enhanced packet types map onto these: SequenceStart -> SEQUENCE_HEADER,
    CodedFrames/CodedFramesX -> NALU, SequenceEnd -> END_OF_SEQUENCE."""
    composition_time: int
    """PTS minus DTS in milliseconds (signed 24-bit); always 0 for AV1."""
    data: bytes
    """Sequence header: AVCDecoderConfigurationRecord, HEVCDecoderConfigurationRecord or
    AV1CodecConfigurationRecord. Coded frames: length-prefixed NALUs (AVC, HEVC) or a
    temporal unit of OBUs (AV1). INFO: the command byte or AMF metadata."""
    codec: str = CODEC_AVC
    """CODEC_AVC, CODEC_HEVC or CODEC_AV1."""


@dataclass(frozen=True, slots=True)
class AvcConfig:
    """An AVCDecoderConfigurationRecord (ISO/IEC 14496-15 5.2.4.1)."""

    version: int
    """configurationVersion, always 1."""
    profile: int
    """AVCProfileIndication (66 baseline, 77 main, 100 high, ...)."""
    compatibility: int
    """profile_compatibility (constraint flags)."""
    level: int
    """AVCLevelIndication (31 = level 3.1)."""
    nalu_length_size: int
    """Bytes of the length prefix in front of each NALU: 1, 2 or 4."""
    sps: tuple[bytes, ...]
    """Sequence parameter set NALUs, at least one."""
    pps: tuple[bytes, ...]
    """Picture parameter set NALUs, at least one."""


@dataclass(frozen=True, slots=True)
class AudioTag:
    """A parsed AAC or MP3 audio tag body."""

    sound_format: int
    """SOUND_FORMAT_AAC or SOUND_FORMAT_MP3."""
    sound_rate: int
    """Nominal rate from the tag header (AAC always says 44100; the ASC is authoritative)."""
    sound_size: int
    """Sample size in bits, 8 or 16."""
    channels: int
    """1 (mono) or 2 (stereo) from the tag header."""
    packet_type: AacPacketType
    """AudioSpecificConfig or raw frame (MP3 is always RAW)."""
    data: bytes
    """AudioSpecificConfig bytes, one raw AAC frame, or MP3 frames with their headers."""


@dataclass(frozen=True, slots=True)
class AacConfig:
    """The fields of an AudioSpecificConfig we need (ISO/IEC 14496-3 1.6.2.1)."""

    object_type: int
    """audioObjectType (2 = AAC LC, 5 = SBR, 29 = PS), escape 31 already resolved."""
    sample_rate: int
    """Sampling frequency in Hz (from the index or the explicit 24-bit value)."""
    channel_config: int
    """channelConfiguration (0 = defined in the program config element)."""


def parse_video_tag(body: bytes) -> VideoTag:
    """Parse an RTMP type 9 message body: legacy AVC (codec id 7) or HEVC (id 12) headers,
    or an enhanced RTMP header with FourCC 'avc1', 'hvc1' or 'av01'.

    Raises UnsupportedCodec for other codecs and FlvError for malformed tags.
    """
    if not body:
        raise FlvError("video tag is empty")
    first = body[0]
    if first & EX_VIDEO_HEADER_FLAG:
        return _parse_ex_video_tag(body)
    frame_type_value = first >> 4
    codec_id = first & 0x0F
    if codec_id == CODEC_ID_AVC:
        codec = CODEC_AVC
    elif codec_id == CODEC_ID_HEVC:
        codec = CODEC_HEVC
    else:
        raise UnsupportedCodec("video", _VIDEO_CODECS.get(codec_id, f"id {codec_id}"))
    frame_type = _frame_type(frame_type_value)
    if frame_type is VideoFrameType.INFO:
        return VideoTag(frame_type, None, 0, bytes(body[1:]), codec)
    if len(body) < AVC_TAG_HEADER_SIZE:
        raise FlvError(
            f"{codec} video tag truncated: need {AVC_TAG_HEADER_SIZE} bytes, got {len(body)}"
        )
    try:
        packet_type = AvcPacketType(body[1])
    except ValueError:
        raise FlvError(f"{codec} video tag has unknown packet type {body[1]}") from None
    cts = _si24(body, 2)
    return VideoTag(frame_type, packet_type, cts, bytes(body[5:]), codec)


def _frame_type(value: int) -> VideoFrameType:
    try:
        return VideoFrameType(value)
    except ValueError:
        raise FlvError(f"video tag has unknown frame type {value}") from None


def _si24(body: bytes, pos: int) -> int:
    value = int.from_bytes(body[pos : pos + SI24_SIZE], "big")
    return value - 0x1000000 if value & 0x800000 else value


def _parse_ex_video_tag(body: bytes) -> VideoTag:
    """Enhanced RTMP ExVideoTagHeader: frame type in bits 4-6, VideoPacketType in bits 0-3."""
    packet_type_value = body[0] & 0x0F
    pos = 1
    while packet_type_value == ExVideoPacketType.MOD_EX:
        packet_type_value, pos = _skip_mod_ex(body, pos)
    try:
        packet_type = ExVideoPacketType(packet_type_value)
    except ValueError:
        raise FlvError(
            f"enhanced RTMP video tag has unknown packet type {packet_type_value}"
        ) from None
    # Metadata frames ignore the frame type bits (spec: "should be ignored").
    if packet_type is ExVideoPacketType.METADATA:
        frame_type = VideoFrameType.INFO
    else:
        frame_type = _frame_type((body[0] >> 4) & 0x07)
    if frame_type is VideoFrameType.INFO and packet_type is not ExVideoPacketType.METADATA:
        # A video command frame: one command byte, no FourCC and no picture.
        return VideoTag(frame_type, None, 0, bytes(body[pos:]))
    if packet_type is ExVideoPacketType.MULTITRACK:
        raise UnsupportedCodec("video", "enhanced RTMP multitrack video")
    if len(body) < pos + 4:
        raise FlvError(
            f"enhanced RTMP video tag truncated: need {pos + 4} bytes for the FourCC, "
            f"got {len(body)}"
        )
    fourcc = bytes(body[pos : pos + 4])
    pos += 4
    codec = _FOURCC_CODECS.get(fourcc)
    if codec is None:
        name = fourcc.decode("latin-1")
        known = _UNSUPPORTED_FOURCCS.get(fourcc)
        raise UnsupportedCodec(
            "video", f"{known} (enhanced RTMP {name!r})" if known else f"enhanced RTMP {name!r}"
        )
    if packet_type is ExVideoPacketType.METADATA:
        # AMF-encoded metadata (e.g. HDR colour info): nothing a WebRTC viewer needs.
        return VideoTag(frame_type, None, 0, bytes(body[pos:]), codec)
    if packet_type is ExVideoPacketType.MPEG2TS_SEQUENCE_START:
        raise FlvError(
            f"enhanced RTMP {fourcc.decode('latin-1')!r} MPEG2TSSequenceStart (packet type 5) "
            "is not supported: the publisher must send a SequenceStart with the codec "
            "configuration record"
        )
    cts = 0
    if packet_type is ExVideoPacketType.CODED_FRAMES and codec != CODEC_AV1:
        # 'avc1' and 'hvc1' CodedFrames carry an SI24 composition time; 'av01' does not.
        if len(body) < pos + SI24_SIZE:
            raise FlvError(
                f"enhanced RTMP {fourcc.decode('latin-1')!r} video tag truncated: need "
                f"{pos + SI24_SIZE} bytes for the composition time, got {len(body)}"
            )
        cts = _si24(body, pos)
        pos += SI24_SIZE
    return VideoTag(frame_type, _EX_TO_AVC_PACKET_TYPE[packet_type], cts, bytes(body[pos:]), codec)


def _skip_mod_ex(body: bytes, pos: int) -> tuple[int, int]:
    """Skip one ModEx block (E-RTMP v2); return the real packet type and the next offset.

    The only ModEx defined so far is a sub-millisecond timestamp offset, which RTP at
    90 kHz from millisecond FLV timestamps cannot use anyway.
    """
    if pos >= len(body):
        raise FlvError("enhanced RTMP video tag truncated: ModEx size missing")
    size = body[pos] + 1
    pos += 1
    if size == MOD_EX_LARGE_SIZE:
        if pos + 2 > len(body):
            raise FlvError("enhanced RTMP video tag truncated: ModEx 16-bit size missing")
        size = int.from_bytes(body[pos : pos + 2], "big") + 1
        pos += 2
    pos += size
    if pos >= len(body):
        raise FlvError(
            f"enhanced RTMP video tag truncated: ModEx data of {size} bytes needs "
            f"{pos + 1} bytes, got {len(body)}"
        )
    # High nibble: VideoPacketModExType; low nibble: the packet type that follows.
    return body[pos] & 0x0F, pos + 1


def parse_avc_config(record: bytes) -> AvcConfig:
    """Parse an AVCDecoderConfigurationRecord; trailing (high profile) fields are ignored."""
    if len(record) < AVC_RECORD_MIN_SIZE:
        raise FlvError(
            f"AVC sequence header truncated: need {AVC_RECORD_MIN_SIZE} bytes, got {len(record)}"
        )
    version = record[0]
    if version != 1:
        raise FlvError(f"AVC sequence header has version {version}, expected 1")
    length_size = (record[4] & 0x03) + 1
    if length_size == 3:
        raise FlvError("AVC sequence header has NALU length size 3 (must be 1, 2 or 4)")
    pos = 5
    sps, pos = _parameter_sets(record, pos, record[pos] & 0x1F, "SPS")
    if pos >= len(record):
        raise FlvError(
            f"AVC sequence header truncated: need the PPS count at offset {pos}, "
            f"got {len(record)} bytes"
        )
    pps, pos = _parameter_sets(record, pos, record[pos], "PPS")
    if not sps:
        raise FlvError("AVC sequence header has no SPS")
    if not pps:
        raise FlvError("AVC sequence header has no PPS")
    return AvcConfig(
        version=version,
        profile=record[1],
        compatibility=record[2],
        level=record[3],
        nalu_length_size=length_size,
        sps=tuple(sps),
        pps=tuple(pps),
    )


def _parameter_sets(record: bytes, pos: int, count: int, what: str) -> tuple[list[bytes], int]:
    """Read `count` 16-bit length-prefixed parameter sets after the count byte at `pos`."""
    pos += 1
    found: list[bytes] = []
    for index in range(1, count + 1):
        if pos + 2 > len(record):
            raise FlvError(
                f"AVC sequence header truncated: {what} {index} length at offset {pos}, "
                f"got {len(record)} bytes"
            )
        size = int.from_bytes(record[pos : pos + 2], "big")
        pos += 2
        if pos + size > len(record):
            raise FlvError(
                f"AVC sequence header truncated: {what} {index} needs {size} bytes "
                f"at offset {pos}, got {len(record) - pos}"
            )
        if size == 0:
            raise FlvError(f"AVC sequence header has an empty {what} {index}")
        found.append(bytes(record[pos : pos + size]))
        pos += size
    return found, pos


def split_nalus(data: bytes, length_size: int) -> list[bytes]:
    """Split AVCC data (each NALU preceded by a big-endian length) into NALUs.

    Zero-length entries are skipped.
    """
    if length_size not in (1, 2, 4):
        raise ValueError(f"NALU length size must be 1, 2 or 4, not {length_size}")
    nalus: list[bytes] = []
    pos = 0
    end = len(data)
    while pos < end:
        if pos + length_size > end:
            raise FlvError(
                f"NALU length at offset {pos} truncated: need {length_size} bytes, got {end - pos}"
            )
        size = int.from_bytes(data[pos : pos + length_size], "big")
        pos += length_size
        if pos + size > end:
            raise FlvError(
                f"NALU length {size} at offset {pos - length_size} runs past the end "
                f"of the {end}-byte packet"
            )
        if size:
            nalus.append(bytes(data[pos : pos + size]))
        pos += size
    return nalus


def parse_audio_tag(body: bytes) -> AudioTag:
    """Parse an RTMP type 8 message body. Raises UnsupportedCodec for anything but AAC
    and MP3."""
    if not body:
        raise FlvError("audio tag is empty")
    first = body[0]
    sound_format = first >> 4
    if sound_format == SOUND_FORMAT_MP3:
        # No packet type byte: the rest is MP3 frames, each with its own header.
        return AudioTag(
            sound_format=SOUND_FORMAT_MP3,
            sound_rate=_SOUND_RATES[(first >> 2) & 0x03],
            sound_size=16 if first & 0x02 else 8,
            channels=2 if first & 0x01 else 1,
            packet_type=AacPacketType.RAW,
            data=bytes(body[1:]),
        )
    if sound_format != SOUND_FORMAT_AAC:
        raise UnsupportedCodec("audio", _SOUND_FORMATS.get(sound_format, f"id {sound_format}"))
    if len(body) < AAC_TAG_HEADER_SIZE:
        raise FlvError(
            f"AAC audio tag truncated: need {AAC_TAG_HEADER_SIZE} bytes, got {len(body)}"
        )
    try:
        packet_type = AacPacketType(body[1])
    except ValueError:
        raise FlvError(f"AAC audio tag has unknown packet type {body[1]}") from None
    return AudioTag(
        sound_format=SOUND_FORMAT_AAC,
        sound_rate=_SOUND_RATES[(first >> 2) & 0x03],
        sound_size=16 if first & 0x02 else 8,
        channels=2 if first & 0x01 else 1,
        packet_type=packet_type,
        data=bytes(body[2:]),
    )


class _BitReader:
    def __init__(self, data: bytes, what: str) -> None:
        self._value = int.from_bytes(data, "big")
        self._total = len(data) * 8
        self._pos = 0
        self._what = what

    def read(self, bits: int) -> int:
        if self._pos + bits > self._total:
            need = (self._pos + bits + 7) // 8
            raise FlvError(f"{self._what} truncated: need {need} bytes, got {self._total // 8}")
        self._pos += bits
        return (self._value >> (self._total - self._pos)) & ((1 << bits) - 1)


def parse_audio_specific_config(asc: bytes) -> AacConfig:
    """Parse the leading fields of an AudioSpecificConfig."""
    reader = _BitReader(asc, "AudioSpecificConfig")
    object_type = reader.read(5)
    if object_type == 31:
        object_type = 32 + reader.read(6)
    if object_type == 0:
        raise FlvError("AudioSpecificConfig has audio object type 0 (null)")
    index = reader.read(4)
    if index == 15:
        sample_rate = reader.read(24)
    elif index < len(_AAC_SAMPLE_RATES):
        sample_rate = _AAC_SAMPLE_RATES[index]
    else:
        raise FlvError(f"AudioSpecificConfig sampling frequency index {index} is reserved")
    if sample_rate == 0:
        raise FlvError("AudioSpecificConfig has sampling frequency 0")
    channel_config = reader.read(4)
    return AacConfig(object_type, sample_rate, channel_config)
