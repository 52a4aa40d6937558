"""AAC to Opus with real AAC written by ffmpeg."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest

from srsrelay.hub.opus import OPUS_FRAME_SAMPLES, AacToOpus
from srsrelay.rtmp import flv
from tests.test_flv import TAG_AUDIO, make_flv, read_flv_tags

AacStream = tuple[bytes, list[tuple[int, bytes]]]


def aac_stream(path: Path) -> AacStream:
    """(AudioSpecificConfig, [(timestamp_ms, raw AAC frame)]) of an FLV file."""
    asc = b""
    frames = []
    for tag in read_flv_tags(path):
        if tag.kind != TAG_AUDIO:
            continue
        audio = flv.parse_audio_tag(tag.body)
        if audio.packet_type is flv.AacPacketType.SEQUENCE_HEADER:
            asc = audio.data
        else:
            frames.append((tag.timestamp_ms, audio.data))
    assert asc and frames
    return asc, frames


@pytest.fixture(scope="module", params=[(44100, 2), (44100, 1), (22050, 1), (48000, 2)])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AacStream:
    rate, channels = request.param
    path = tmp_path_factory.mktemp("aac") / f"a{rate}_{channels}.flv"
    return aac_stream(make_flv(path, seconds=2, audio_rate=rate, channels=channels))


def transcode(
    source: AacStream, offset_ms: int = 0, transcoder: AacToOpus | None = None
) -> list[tuple[bytes, int]]:
    asc, frames = source
    transcoder = transcoder or AacToOpus(asc, 64_000)
    out = []
    for ts, data in frames:
        out.extend(transcoder.encode(data, ts + offset_ms))
    return out


def decode_opus(packets: list[bytes]) -> np.ndarray:
    decoder = av.CodecContext.create("opus", "r")
    decoder.sample_rate = 48000
    decoder.layout = "stereo"
    chunks = []
    for packet in packets:
        for frame in decoder.decode(av.Packet(packet)):
            assert frame.sample_rate == 48000
            chunks.append(frame.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float64)


def test_packets_timestamps_and_audio(source: AacStream) -> None:
    asc, frames = source
    packets = transcode(source, offset_ms=1000)
    rate = flv.parse_audio_specific_config(asc).sample_rate
    duration_ms = len(frames) * 1024 * 1000 / rate
    # 50 packets a second; the resampler holds back less than one frame.
    assert duration_ms / 20 - 2 <= len(packets) <= duration_ms / 20
    timestamps = [ts for _, ts in packets]
    assert timestamps[0] == (1000 + frames[0][0]) * 48
    assert all(b - a == OPUS_FRAME_SAMPLES for a, b in pairwise(timestamps))
    # Decodes back to a loud sine (amplitude 1/8 full scale from lavfi's sine).
    samples = decode_opus([p for p, _ in packets])
    assert len(samples) >= 48000 * 2  # stereo, > 0.5 s
    tail = samples[len(samples) // 4 :]
    rms = float(np.sqrt(np.mean(tail**2)))
    peak = float(np.max(np.abs(tail)))
    assert rms > 0.05 * peak > 0
    assert peak > 0.05  # float samples, full scale 1.0


def test_timestamp_jump_resyncs(source: AacStream) -> None:
    asc, frames = source
    transcoder = AacToOpus(asc, 32_000)
    first = transcode(source, transcoder=transcoder)
    later = transcode(source, offset_ms=10_000, transcoder=transcoder)
    assert transcoder.resyncs == 1
    assert later[0][1] == (10_000 + frames[0][0]) * 48
    assert first[-1][1] < later[0][1]
    assert transcoder.errors == 0


def test_small_timestamp_jitter_keeps_clock(source: AacStream) -> None:
    asc, frames = source
    transcoder = AacToOpus(asc, 64_000)
    out = []
    for index, (ts, data) in enumerate(frames):
        jitter = (index % 3 - 1) * 40  # +-40 ms, as an unsteady encoder sends
        out.extend(transcoder.encode(data, max(0, ts + jitter)))
    assert transcoder.resyncs == 0
    timestamps = [ts for _, ts in out]
    assert all(b - a == OPUS_FRAME_SAMPLES for a, b in pairwise(timestamps))


def test_garbage_is_counted_not_raised() -> None:
    asc = bytes.fromhex("1210")  # AAC LC 44.1 kHz stereo
    transcoder = AacToOpus(asc, 64_000)
    for i in range(5):
        assert transcoder.encode(b"\xff" * 50, i * 23) == []
    assert transcoder.errors == 5


def test_recovers_after_garbage(source: AacStream) -> None:
    asc, frames = source
    transcoder = AacToOpus(asc, 64_000)
    assert transcoder.encode(b"\xff" * 50, 0) == []
    assert transcoder.errors == 1
    assert len(transcode(source, transcoder=transcoder)) > 80


def test_closed_transcoder_returns_nothing(source: AacStream) -> None:
    asc, frames = source
    transcoder = AacToOpus(asc, 64_000)
    transcoder.close()
    assert transcoder.encode(frames[0][1], 0) == []


def test_bad_config_is_rejected() -> None:
    with pytest.raises(av.error.FFmpegError):
        AacToOpus(b"\xff\xff\xff", 64_000)
