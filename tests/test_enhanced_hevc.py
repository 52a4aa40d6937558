"""An enhanced RTMP HEVC ('hvc1') publish played end to end by an aiortc viewer that
receives H265 (tests/h265_viewer.py): RFC 7798 depayloading, decoding, 406 for H.264-only
viewers and what the streams API says.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import av
import pytest
from aiortc import RTCRtpReceiver, rtcrtpreceiver
from aiortc import codecs as aiortc_codecs
from aiortc.jitterbuffer import JitterFrame

from srsrelay.hub import hevc
from srsrelay.rtmp.flvwrite import TAG_VIDEO, read_flv
from tests.conftest import RelayProcess, start_relay
from tests.h265_viewer import H265Decoder, H265Viewer, h265_depayload, h265_receiving
from tests.raw_publisher import RawPublisher, replay_flv
from tests.test_enhanced_rtmp import h264_only_offer, stream_info, wait_audio_and_video

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent / "fixtures"
HEVC_FLV = FIXTURES / "hevc_aac.flv"
"""4 s of 320x240 25 fps HEVC Main (IDR each second, no B-frames) and AAC, looped."""
HEVC_FMTP = "profile-space=0;tier-flag=0;profile-id=1;level-id=60"
"""The fixture's HEVCDecoderConfigurationRecord: Main profile, Main tier, level 2."""
FIXTURE_SIZE = (320, 240)
FPS = 25
FRAME_TICKS = 90_000 // FPS
REPLAY_SECONDS = 30.0
"""Upper bound: the test stops its publisher when it is done."""
PLAY_SECONDS = 8.0
START = b"\x00\x00\x00\x01"


# -- the depayloader, without sockets ---------------------------------------------------


def test_single_nal_unit_packet_gets_a_start_code() -> None:
    # A TRAIL_R slice (type 1): header 0x02 0x01.
    assert h265_depayload(b"\x02\x01\xaa\xbb") == START + b"\x02\x01\xaa\xbb"


def test_aggregation_packet_yields_each_nal_unit() -> None:
    vps = b"\x40\x01\x0c\x01"
    sps = b"\x42\x01\x01\x01\x60"
    ap = b"\x60\x01" + b"\x00\x04" + vps + b"\x00\x05" + sps
    assert h265_depayload(ap) == START + vps + START + sps


def test_fragments_rebuild_the_nal_unit_header() -> None:
    # IDR_W_RADL (type 19) with nuh_temporal_id_plus1 = 1, split in three.
    payload_header = bytes((49 << 1, 0x01))
    first = payload_header + bytes((0x80 | 19,)) + b"\x01\x02"
    middle = payload_header + bytes((19,)) + b"\x03"
    last = payload_header + bytes((0x40 | 19,)) + b"\x04\x05"
    joined = b"".join(h265_depayload(p) for p in (first, middle, last))
    assert joined == START + bytes((19 << 1, 0x01)) + b"\x01\x02\x03\x04\x05"


def test_fragment_keeps_the_layer_id_bit_of_the_first_byte() -> None:
    # nuh_layer_id = 32: its top bit is the low bit of the first byte (H.265 7.3.1.2).
    payload_header = bytes(((49 << 1) | 0x01, 0x01))
    first = payload_header + bytes((0x80 | 1,)) + b"\xee"
    assert h265_depayload(first) == START + bytes(((1 << 1) | 0x01, 0x01)) + b"\xee"


def test_relay_packetizer_round_trips() -> None:
    nalus = [b"\x40\x01" + bytes(10), b"\x42\x01" + bytes(20), b"\x26\x01" + bytes(range(250)) * 9]
    payloads = hevc.packetize(nalus, 1200)
    assert [p[0] >> 1 for p in payloads[:2]] == [48, 49]  # an AP, then FUs
    assert b"".join(h265_depayload(p) for p in payloads) == b"".join(START + n for n in nalus)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x02\x01", "H265 payload of 2 bytes is shorter than 3"),
        (b"\x64\x01\x00", "H265 payload type 50 is not supported"),
        (b"\x60\x01\x00", "H265 AP size field truncated at offset 2"),
        (b"\x60\x01\x00\x09\x02\x01", "H265 AP NAL unit of 9 bytes at offset 4 is invalid"),
        (b"\x62\x01\x93", "H265 FU of 3 bytes carries no data"),
    ],
)
def test_malformed_payloads_are_rejected(payload: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        h265_depayload(payload)
    assert str(info.value) == message


def fixture_frames() -> tuple[hevc.HevcConfig, list[list[bytes]]]:
    """The fixture's decoder configuration and its video access units, in order."""
    bodies = [body for kind, _, body in read_flv(HEVC_FLV.read_bytes()) if kind == TAG_VIDEO]
    # Enhanced RTMP: 1 byte of frame type / packet type, then the FourCC.
    config = hevc.parse_hevc_config(bodies[0][5:])
    frames = []
    for body in bodies[1:]:
        data = body[5:]
        pos, nalus = 0, []
        while pos < len(data):
            size = int.from_bytes(data[pos : pos + config.nalu_length_size], "big")
            pos += config.nalu_length_size
            nalus.append(data[pos : pos + size])
            pos += size
        frames.append(nalus)
    return config, frames


def test_decoder_decodes_the_fixture_from_rtp_payloads() -> None:
    config, frames = fixture_frames()
    assert len(frames) == 4 * FPS
    decoder = H265Decoder()
    decoded = []
    for index, nalus in enumerate(frames):
        payloads = hevc.packetize(hevc.with_parameter_sets(nalus, config), 1200)
        data = b"".join(h265_depayload(p) for p in payloads)
        decoded += decoder.decode(JitterFrame(data, index * FRAME_TICKS))
    decoded += decoder.codec.decode(None)  # drain
    pictures = [f for f in decoded if isinstance(f, av.VideoFrame)]
    assert len(pictures) == len(decoded) == len(frames)
    assert {(f.width, f.height) for f in pictures} == {FIXTURE_SIZE}


def test_h265_receiving_patches_and_restores_aiortc() -> None:
    before = list(aiortc_codecs.CODECS["video"])

    def mimes() -> list[str]:
        caps = RTCRtpReceiver.getCapabilities("video")
        assert caps is not None
        return [c.mimeType for c in caps.codecs]

    assert "video/H265" not in mimes()
    with h265_receiving():
        assert "video/H265" in mimes()
        h265 = next(c for c in aiortc_codecs.CODECS["video"] if c.mimeType == "video/H265")
        # The receiver module's own references (it imported them by name).
        patched = vars(rtcrtpreceiver)
        assert isinstance(patched["get_decoder"](h265), H265Decoder)
        assert patched["depayload"](h265, b"\x02\x01\xaa") == START + b"\x02\x01\xaa"
    assert aiortc_codecs.CODECS["video"] == before
    assert "video/H265" not in mimes()
    restored = vars(rtcrtpreceiver)
    assert restored["get_decoder"] is aiortc_codecs.get_decoder
    assert restored["depayload"] is aiortc_codecs.depayload


# -- end to end ---------------------------------------------------------------------------


class CountingPublisher(RawPublisher):
    """Counts the coded video frames it sent (read from the test's thread)."""

    video_frames = 0

    def video(self, ts: int, body: bytes) -> None:
        super().video(ts, body)
        if body[0] & 0x0F != 0:  # not the enhanced RTMP SequenceStart
            self.video_frames += 1


class Replay:
    """hevc_aac.flv published in real time on its own thread."""

    def __init__(self, relay: RelayProcess, name: str) -> None:
        self.stop = threading.Event()
        self.pub = CountingPublisher(relay.rtmp_port, "live", name)
        flv = HEVC_FLV.read_bytes()

        def run() -> None:
            try:
                replay_flv(self.pub, flv, REPLAY_SECONDS, self.stop)
            except OSError:
                pass  # the relay closed the connection; the test says why

        self._thread = threading.Thread(target=run, name=f"replay-{name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(5)
        self.pub.close()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    r = start_relay(tmp_path)
    yield r
    assert r.stop() == 0, r.log_path.read_text()[-4000:]


@pytest.fixture
def replay(relay: RelayProcess) -> Iterator[Replay]:
    r = Replay(relay, "hevc")
    yield r
    r.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def offered_payload_type(offer: str) -> int:
    m = re.search(r"^a=rtpmap:(\d+) H265/90000\r?$", offer, re.M)
    assert m, offer
    return int(m.group(1))


async def test_hevc_plays_in_an_h265_viewer_and_h264_viewers_get_406(
    relay: RelayProcess, replay: Replay, http: aiohttp.ClientSession
) -> None:
    await wait_audio_and_video(relay, "live/hevc")
    info = await stream_info(http, relay, "live/hevc")
    assert info["video"] == {"codec": "H265", "fmtp": HEVC_FMTP, "h264_rendition": False}, info
    assert info["audio"] == {"codec": "opus"}, info

    # A viewer that only takes H.264: 406, and the message names HEVC.
    pc, offer = await h264_only_offer()
    try:
        async with http.post(
            f"{relay.http}/whep/live/hevc", data=offer, headers={"Content-Type": "application/sdp"}
        ) as resp:
            status, text = resp.status, await resp.text()
    finally:
        await pc.close()
    assert status == 406, (status, text)
    assert text.startswith(f"stream live/hevc: the stream's video is HEVC (H.265) ({HEVC_FMTP})")
    assert "video.transcode_to_h264" in text, text

    with h265_receiving():
        viewer = H265Viewer(relay.http, "/whep/live/hevc")
        try:
            await viewer.start(http)
            sent_before = replay.pub.video_frames
            assert viewer.result.status == 201, viewer.result.answer
            await asyncio.sleep(PLAY_SECONDS)
            sent_while_connected = replay.pub.video_frames - sent_before
        finally:
            await viewer.close()
    result = viewer.result

    # The answer uses the offered payload type and carries the stream's format parameters.
    answer = result.answer
    pt = offered_payload_type(result.offer)
    assert f"a=rtpmap:{pt} H265/90000" in answer.splitlines(), answer
    assert f"a=fmtp:{pt} {HEVC_FMTP}" in answer.splitlines(), answer
    assert "m=audio" in answer and "opus/48000/2" in answer, answer

    # About 8 s of 25 fps went out while connected; the viewer decoded nearly all of it
    # (the GOP cache also gives it the frames of the current GOP before it joined).
    assert sent_while_connected >= (PLAY_SECONDS - 1) * FPS, sent_while_connected
    decoded = len(set(result.video_pts))
    assert decoded >= 0.9 * sent_while_connected, (decoded, sent_while_connected)
    assert len(result.video_pts) == decoded, "frames decoded twice"
    # No hole: the decoded pictures are 40 ms apart.
    steps = [b - a for a, b in zip(result.video_pts, result.video_pts[1:], strict=False)]
    assert steps.count(FRAME_TICKS) >= 0.9 * len(steps), steps
    assert result.video_size == FIXTURE_SIZE, result.video_size
    # 20 ms Opus frames: 50 a second.
    assert result.audio_frames >= (PLAY_SECONDS - 2) * 50, result.audio_frames

    info = await stream_info(http, relay, "live/hevc")
    assert info["errors"] == 0 and info["state"] == "live", info
