"""FLV writing: video/audio tag bodies (legacy and enhanced RTMP), codec configuration
records, and whole .flv files, plus a reader for replaying a file over RTMP.

Pure bytes, no I/O. References: Adobe FLV File Format Specification v10.1 (E.2 header,
E.3 body, E.4 tags), the veovera Enhanced RTMP specification (ExVideoTagHeader),
ISO/IEC 14496-15 8.3.3.1 (HEVCDecoderConfigurationRecord), H.265 7.3.2.2 (SPS),
AV1-ISOBMFF 2.3 (av1C) and AV1 5.5 (sequence header OBU).
"""

from __future__ import annotations

from srsrelay.hub.h264 import unescape_rbsp
from srsrelay.rtmp.flv import (
    CODEC_AV1,
    CODEC_AVC,
    CODEC_HEVC,
    CODEC_ID_AVC,
    EX_VIDEO_HEADER_FLAG,
    FOURCC_AV1,
    FOURCC_HEVC,
    SOUND_FORMAT_AAC,
    AacPacketType,
    AvcPacketType,
    ExVideoPacketType,
    FlvError,
    VideoFrameType,
)

TAG_AUDIO = 8
TAG_VIDEO = 9
TAG_SCRIPT = 18
FLV_HEADER_SIZE = 9
TAG_HEADER_SIZE = 11
PREVIOUS_TAG_SIZE_SIZE = 4
MAX_TAG_BODY_SIZE = 0xFFFFFF
"""DataSize is 24 bits."""
MAX_TIMESTAMP_MS = 0xFFFFFFFF
"""24-bit timestamp plus the 8-bit TimestampExtended."""
SI24_MIN = -0x800000
SI24_MAX = 0x7FFFFF

AAC_TAG_FLAGS = (SOUND_FORMAT_AAC << 4) | 0x0F
"""AAC, "44 kHz", 16-bit, stereo: FLV says AAC always uses these (E.4.2.1)."""
HEVC_NALU_LENGTH_SIZE = 4
AV1C_MARKER_VERSION = 0x81
"""av1C marker (1) and version (1)."""
OBU_SEQUENCE_HEADER = 1
OBU_HAS_SIZE_FIELD = 0x02
OBU_EXTENSION_FLAG = 0x04
MAX_LEB128_BYTES = 8
UVLC_MAX_ZEROS = 32

_AVC_TO_EX_PACKET_TYPE = {
    AvcPacketType.SEQUENCE_HEADER: ExVideoPacketType.SEQUENCE_START,
    AvcPacketType.NALU: ExVideoPacketType.CODED_FRAMES,
    AvcPacketType.END_OF_SEQUENCE: ExVideoPacketType.SEQUENCE_END,
}
_HEVC_VPS = 32
_HEVC_SPS = 33
_HEVC_PPS = 34


def video_tag_body(
    codec: str,
    frame_type: VideoFrameType,
    packet_type: AvcPacketType,
    cts_ms: int,
    data: bytes,
) -> bytes:
    """An RTMP type 9 body: the legacy AVC header for "AVC", the enhanced header with
    FourCC 'hvc1' for "HEVC" (CodedFramesX when cts_ms is 0) or 'av01' for "AV1" (which
    has no composition time: cts_ms must be 0)."""
    if not SI24_MIN <= cts_ms <= SI24_MAX:
        raise ValueError(f"composition time {cts_ms} ms does not fit in a signed 24-bit field")
    cts = (cts_ms & 0xFFFFFF).to_bytes(3, "big")
    if codec == CODEC_AVC:
        return bytes(((frame_type << 4) | CODEC_ID_AVC, packet_type)) + cts + data
    if codec == CODEC_HEVC:
        fourcc = FOURCC_HEVC
    elif codec == CODEC_AV1:
        fourcc = FOURCC_AV1
        if cts_ms:
            raise ValueError(f"AV1 tags have no composition time, got {cts_ms} ms")
    else:
        raise ValueError(f"video codec {codec!r} has no FLV mapping (use AVC, HEVC or AV1)")
    ex_type = _AVC_TO_EX_PACKET_TYPE[packet_type]
    if ex_type is ExVideoPacketType.CODED_FRAMES and codec == CODEC_HEVC and cts_ms == 0:
        ex_type = ExVideoPacketType.CODED_FRAMES_X
    first = EX_VIDEO_HEADER_FLAG | (frame_type << 4) | ex_type
    if ex_type is ExVideoPacketType.CODED_FRAMES and codec == CODEC_HEVC:
        return bytes((first,)) + fourcc + cts + data
    return bytes((first,)) + fourcc + data


def aac_tag_body(packet_type: AacPacketType, data: bytes) -> bytes:
    """An RTMP type 8 body for AAC: an AudioSpecificConfig or one raw AAC frame."""
    return bytes((AAC_TAG_FLAGS, packet_type)) + data


class _Bits:
    """Big-endian bit reader over an RBSP or OBU payload; ValueError names `what`."""

    def __init__(self, data: bytes, what: str) -> None:
        self._value = int.from_bytes(data, "big")
        self._total = len(data) * 8
        self._pos = 0
        self._what = what

    def read(self, bits: int) -> int:
        if self._pos + bits > self._total:
            raise ValueError(
                f"{self._what} truncated: need {self._pos + bits} bits, got {self._total}"
            )
        self._pos += bits
        return (self._value >> (self._total - self._pos)) & ((1 << bits) - 1)

    def leading_zeros(self, limit: int) -> int:
        zeros = 0
        while not self.read(1):
            zeros += 1
            if zeros > limit:
                raise ValueError(f"{self._what} has a variable-length code over {limit} bits")
        return zeros

    def ue(self) -> int:
        """Exp-Golomb ue(v) (H.265 9.2)."""
        zeros = self.leading_zeros(31)
        return (1 << zeros) - 1 + self.read(zeros)

    def uvlc(self) -> int:
        """AV1 uvlc() (4.10.3): 32 or more leading zeros mean 2^32 - 1, no value bits."""
        zeros = self.leading_zeros(self._total)
        if zeros >= UVLC_MAX_ZEROS:
            return (1 << UVLC_MAX_ZEROS) - 1
        return (1 << zeros) - 1 + self.read(zeros)


def hevc_config_record(
    vps: bytes, sps: bytes, pps: bytes, *, nalu_length_size: int = HEVC_NALU_LENGTH_SIZE
) -> bytes:
    """A HEVCDecoderConfigurationRecord holding one VPS, SPS and PPS.

    Profile, tier, level, chroma format, bit depths and temporal layers come from the SPS;
    the optional hints (segmentation, parallelism, frame rate) are written as "unknown".
    """
    if nalu_length_size not in (1, 2, 4):
        raise ValueError(f"NALU length size must be 1, 2 or 4, not {nalu_length_size}")
    for nal, kind, name in (
        (vps, _HEVC_VPS, "VPS"),
        (sps, _HEVC_SPS, "SPS"),
        (pps, _HEVC_PPS, "PPS"),
    ):
        if len(nal) < 2 or (nal[0] >> 1) & 0x3F != kind:
            raise ValueError(f"{name} argument is not an HEVC {name} NAL unit (type {kind})")
    # H.265 7.3.2.2.1: after the 2-byte NAL header, 1 byte of ids/flags then
    # profile_tier_level(), whose first 12 bytes are the record's bytes 1..12.
    rbsp = unescape_rbsp(sps[2:])
    bits = _Bits(rbsp, "HEVC SPS")
    bits.read(4)  # sps_video_parameter_set_id
    max_sub_layers_minus1 = bits.read(3)
    temporal_id_nesting = bits.read(1)
    general = bytes(bits.read(8) for _ in range(12))
    sub_layer_flags = [(bits.read(1), bits.read(1)) for _ in range(max_sub_layers_minus1)]
    if max_sub_layers_minus1:
        bits.read(2 * (8 - max_sub_layers_minus1))  # reserved_zero_2bits
    for profile_present, level_present in sub_layer_flags:
        bits.read(88 * profile_present + 8 * level_present)
    bits.ue()  # sps_seq_parameter_set_id
    chroma_format_idc = bits.ue()
    if chroma_format_idc == 3:
        bits.read(1)  # separate_colour_plane_flag
    bits.ue()  # pic_width_in_luma_samples
    bits.ue()  # pic_height_in_luma_samples
    if bits.read(1):  # conformance_window_flag
        for _ in range(4):
            bits.ue()
    bit_depth_luma_minus8 = bits.ue()
    bit_depth_chroma_minus8 = bits.ue()
    out = bytearray((1,))
    out += general
    out += b"\xf0\x00"  # reserved 1111, min_spatial_segmentation_idc 0
    out.append(0xFC)  # reserved, parallelismType 0 (unknown)
    out.append(0xFC | (chroma_format_idc & 0x03))
    out.append(0xF8 | (bit_depth_luma_minus8 & 0x07))
    out.append(0xF8 | (bit_depth_chroma_minus8 & 0x07))
    out += b"\x00\x00"  # avgFrameRate unknown
    # constantFrameRate 0, numTemporalLayers, temporalIdNested, lengthSizeMinusOne
    out.append(
        ((max_sub_layers_minus1 + 1) << 3) | (temporal_id_nesting << 2) | (nalu_length_size - 1)
    )
    out.append(3)  # numOfArrays
    for kind, nal in ((_HEVC_VPS, vps), (_HEVC_SPS, sps), (_HEVC_PPS, pps)):
        out.append(0x80 | kind)  # array_completeness = 1: all sets of this kind are here
        out += (1).to_bytes(2, "big") + len(nal).to_bytes(2, "big") + nal
    return bytes(out)


def leb128(value: int) -> bytes:
    """AV1 leb128() encoding (4.10.5)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(MAX_LEB128_BYTES):
        if pos + i >= len(data):
            raise ValueError("AV1 sequence header OBU truncated: size field incomplete")
        value |= (data[pos + i] & 0x7F) << (7 * i)
        if not data[pos + i] & 0x80:
            return value, pos + i + 1
    raise ValueError(f"AV1 sequence header OBU size field is longer than {MAX_LEB128_BYTES} bytes")


def av1_config_record(seq_header_obu: bytes) -> bytes:
    """An AV1CodecConfigurationRecord (av1C) for one sequence header OBU.

    seq_profile, level, tier, bit depth, monochrome and chroma subsampling are read from
    the OBU, which is stored as configOBUs with obu_has_size_field set.
    """
    if not seq_header_obu:
        raise ValueError("AV1 sequence header OBU is empty")
    header = seq_header_obu[0]
    obu_type = (header >> 3) & 0x0F
    if obu_type != OBU_SEQUENCE_HEADER:
        raise ValueError(f"OBU type {obu_type} is not a sequence header (type 1)")
    pos = 2 if header & OBU_EXTENSION_FLAG else 1
    if pos > len(seq_header_obu):
        raise ValueError("AV1 sequence header OBU truncated: extension header missing")
    if header & OBU_HAS_SIZE_FIELD:
        size, start = _read_leb128(seq_header_obu, pos)
        if start + size > len(seq_header_obu):
            raise ValueError(
                f"AV1 sequence header OBU truncated: payload of {size} bytes, "
                f"got {len(seq_header_obu) - start}"
            )
        payload = seq_header_obu[start : start + size]
    else:
        payload = seq_header_obu[pos:]
    fields = _sequence_header_fields(payload)
    obu = bytes((header | OBU_HAS_SIZE_FIELD,)) + seq_header_obu[1:pos]
    obu += leb128(len(payload)) + payload
    return bytes((AV1C_MARKER_VERSION,) + fields + (0,)) + obu


def _sequence_header_fields(payload: bytes) -> tuple[int, int]:
    """av1C bytes 1 and 2 from sequence_header_obu() (AV1 5.5.1) and color_config() (5.5.2)."""
    bits = _Bits(payload, "AV1 sequence header OBU")
    seq_profile = bits.read(3)
    bits.read(1)  # still_picture
    reduced = bits.read(1)
    seq_tier = 0
    if reduced:
        seq_level_idx = bits.read(5)
    else:
        decoder_model_info = 0
        buffer_delay_length = 0
        if bits.read(1):  # timing_info_present_flag
            bits.read(32)  # num_units_in_display_tick
            bits.read(32)  # time_scale
            if bits.read(1):  # equal_picture_interval
                bits.uvlc()
            decoder_model_info = bits.read(1)
            if decoder_model_info:
                buffer_delay_length = bits.read(5) + 1
                bits.read(32 + 5 + 5)
        initial_display_delay = bits.read(1)
        operating_points = bits.read(5) + 1
        seq_level_idx = 0
        for point in range(operating_points):
            bits.read(12)  # operating_point_idc
            level = bits.read(5)
            tier = bits.read(1) if level > 7 else 0
            if point == 0:
                seq_level_idx, seq_tier = level, tier
            if decoder_model_info and bits.read(1):
                bits.read(2 * buffer_delay_length + 1)
            if initial_display_delay and bits.read(1):
                bits.read(4)
    width_bits = bits.read(4) + 1
    height_bits = bits.read(4) + 1
    bits.read(width_bits + height_bits)  # max_frame_width/height_minus_1
    if not reduced and bits.read(1):  # frame_id_numbers_present_flag
        bits.read(4 + 3)
    bits.read(3)  # use_128x128_superblock, enable_filter_intra, enable_intra_edge_filter
    if not reduced:
        bits.read(4)  # interintra, masked compound, warped motion, dual filter
        order_hint = bits.read(1)
        if order_hint:
            bits.read(2)  # enable_jnt_comp, enable_ref_frame_mvs
        screen_content = 2 if bits.read(1) else bits.read(1)
        if screen_content and not bits.read(1):  # seq_choose_integer_mv
            bits.read(1)  # seq_force_integer_mv
        if order_hint:
            bits.read(3)  # order_hint_bits_minus_1
    bits.read(3)  # enable_superres, enable_cdef, enable_restoration
    high_bitdepth = bits.read(1)
    twelve_bit = bits.read(1) if seq_profile == 2 and high_bitdepth else 0
    monochrome = 0 if seq_profile == 1 else bits.read(1)
    primaries, transfer, matrix = 2, 2, 2  # "unspecified"
    if bits.read(1):  # color_description_present_flag
        primaries, transfer, matrix = bits.read(8), bits.read(8), bits.read(8)
    position = 0
    if monochrome:
        bits.read(1)  # color_range
        sub_x, sub_y = 1, 1
    elif (primaries, transfer, matrix) == (1, 13, 0):  # BT.709 primaries, sRGB, identity
        sub_x, sub_y = 0, 0
    else:
        bits.read(1)  # color_range
        if seq_profile == 0:
            sub_x, sub_y = 1, 1
        elif seq_profile == 1:
            sub_x, sub_y = 0, 0
        elif twelve_bit:
            sub_x = bits.read(1)
            sub_y = bits.read(1) if sub_x else 0
        else:
            sub_x, sub_y = 1, 0
        if sub_x and sub_y:
            position = bits.read(2)
    byte1 = (seq_profile << 5) | seq_level_idx
    byte2 = (
        (seq_tier << 7)
        | (high_bitdepth << 6)
        | (twelve_bit << 5)
        | (monochrome << 4)
        | (sub_x << 3)
        | (sub_y << 2)
        | position
    )
    return byte1, byte2


class FlvFile:
    """Writes the pieces of an .flv file: concatenate header() and one tag() per tag."""

    @staticmethod
    def header(has_audio: bool, has_video: bool) -> bytes:
        """The 9-byte file header followed by PreviousTagSize0 (always 0)."""
        flags = (0x04 if has_audio else 0) | (0x01 if has_video else 0)
        return b"FLV\x01" + bytes((flags,)) + FLV_HEADER_SIZE.to_bytes(4, "big") + bytes(4)

    @staticmethod
    def tag(kind: int, timestamp_ms: int, body: bytes) -> bytes:
        """One tag (TAG_AUDIO, TAG_VIDEO or TAG_SCRIPT) followed by its PreviousTagSize."""
        if kind not in (TAG_AUDIO, TAG_VIDEO, TAG_SCRIPT):
            raise ValueError(f"FLV tag type {kind} is not audio (8), video (9) or script (18)")
        if not 0 <= timestamp_ms <= MAX_TIMESTAMP_MS:
            raise ValueError(f"FLV tag timestamp {timestamp_ms} ms is outside 0..2^32-1")
        if len(body) > MAX_TAG_BODY_SIZE:
            raise ValueError(f"FLV tag body of {len(body)} bytes exceeds {MAX_TAG_BODY_SIZE}")
        header = (
            bytes((kind,))
            + len(body).to_bytes(3, "big")
            + (timestamp_ms & 0xFFFFFF).to_bytes(3, "big")
            + bytes((timestamp_ms >> 24,))
            + bytes(3)  # StreamID, always 0
        )
        return header + body + (TAG_HEADER_SIZE + len(body)).to_bytes(4, "big")


def read_flv(data: bytes) -> list[tuple[int, int, bytes]]:
    """The tags of an .flv file as (kind, timestamp_ms, body), in file order.

    Raises FlvError for a bad signature, a truncated tag or a wrong PreviousTagSize.
    """
    if len(data) < FLV_HEADER_SIZE or data[:3] != b"FLV":
        raise FlvError("not an FLV file: missing the 'FLV' signature")
    pos = int.from_bytes(data[5:9], "big")
    if pos < FLV_HEADER_SIZE:
        raise FlvError(f"FLV header size {pos} is smaller than {FLV_HEADER_SIZE}")
    pos += PREVIOUS_TAG_SIZE_SIZE
    tags: list[tuple[int, int, bytes]] = []
    while pos < len(data):
        if pos + TAG_HEADER_SIZE > len(data):
            raise FlvError(f"FLV tag header at offset {pos} truncated")
        kind = data[pos] & 0x1F  # the top bits are reserved / the filter flag
        size = int.from_bytes(data[pos + 1 : pos + 4], "big")
        timestamp = int.from_bytes(data[pos + 4 : pos + 7], "big") | (data[pos + 7] << 24)
        end = pos + TAG_HEADER_SIZE + size
        if end + PREVIOUS_TAG_SIZE_SIZE > len(data):
            raise FlvError(f"FLV tag at offset {pos} truncated: {size}-byte body")
        previous = int.from_bytes(data[end : end + PREVIOUS_TAG_SIZE_SIZE], "big")
        if previous != TAG_HEADER_SIZE + size:
            raise FlvError(
                f"FLV tag at offset {pos}: PreviousTagSize {previous}, "
                f"expected {TAG_HEADER_SIZE + size}"
            )
        tags.append((kind, timestamp, bytes(data[pos + TAG_HEADER_SIZE : end])))
        pos = end + PREVIOUS_TAG_SIZE_SIZE
    return tags
