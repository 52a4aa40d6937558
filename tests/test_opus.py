"""AAC to Opus with real AAC written by ffmpeg."""

from __future__ import annotations

import shutil
import subprocess
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest

from srsrelay.config import AudioConfig, HubConfig
from srsrelay.hub.frames import RtpFrame
from srsrelay.hub.opus import OPUS_FRAME_SAMPLES, OPUS_LOOKAHEAD, AacToOpus
from srsrelay.hub.stream import Stream
from srsrelay.rtmp import flv
from tests.test_flv import TAG_AUDIO, FileTag, make_flv, read_flv_tags

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
    # Stamped with the time of the audio each packet plays (minus the encoder's lookahead).
    assert timestamps[0] == (1000 + frames[0][0]) * 48 - OPUS_LOOKAHEAD
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
    assert later[0][1] == (10_000 + frames[0][0]) * 48 - OPUS_LOOKAHEAD
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


def _audio_flv(path: Path, codec: str, rate: int, channels: int) -> list[FileTag]:
    cmd = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}", "-t", "2",
        "-c:a", codec, "-ar", str(rate), "-ac", str(channels), str(path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=60)
    return [t for t in read_flv_tags(path) if t.kind == TAG_AUDIO]


def _through_stream(tags: list[FileTag]) -> tuple[Stream, list[RtpFrame]]:
    stream = Stream("live", "a", "pub-1", HubConfig(), AudioConfig(opus_bitrate=32_000), 1200)
    frames: list[RtpFrame] = []

    class Reader:
        def on_frame(self, frame: RtpFrame) -> None:
            frames.append(frame)

        def on_stream_end(self) -> None:
            pass

    stream.add_reader(Reader())
    for tag in tags:
        stream.on_audio_tag(tag.timestamp_ms, tag.body, 1.0)
    return stream, frames


def _decoded_level(frames: list[RtpFrame]) -> tuple[int, int, float]:
    """(sample rate, channels, RMS) of the Opus packets decoded as a browser would."""
    decoder = av.CodecContext.create("opus", "r")
    decoder.sample_rate = 48_000
    decoder.layout = "stereo"
    samples = []
    rate = channels = 0
    for frame in frames:
        for out in decoder.decode(av.Packet(frame.payloads[0])):
            rate, channels = out.sample_rate, out.layout.nb_channels
            samples.append(out.to_ndarray().astype(np.float64).ravel())
    pcm = np.concatenate(samples)
    return rate, channels, float(np.sqrt(np.mean(pcm**2)))


@pytest.mark.parametrize(
    ("codec", "rate", "channels", "sound_format"),
    [
        ("aac", 44_100, 1, flv.SOUND_FORMAT_AAC),
        ("aac", 16_000, 1, flv.SOUND_FORMAT_AAC),
        ("libmp3lame", 44_100, 2, flv.SOUND_FORMAT_MP3),
        ("libmp3lame", 22_050, 1, flv.SOUND_FORMAT_MP3),
    ],
)
def test_any_audio_shape_becomes_opus_48k_stereo(
    tmp_path: Path, codec: str, rate: int, channels: int, sound_format: int
) -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    tags = _audio_flv(tmp_path / "a.flv", codec, rate, channels)
    assert flv.parse_audio_tag(tags[-1].body).sound_format == sound_format
    stream, frames = _through_stream(tags)
    assert stream.has_audio and not stream.has_video
    assert stream.stats.errors == 0
    # 2 s of audio in 20 ms Opus frames, give or take the encoders' priming and padding.
    assert 95 <= len(frames) <= 110, len(frames)
    assert all(b.timestamp - a.timestamp == OPUS_FRAME_SAMPLES for a, b in pairwise(frames))
    out_rate, out_channels, rms = _decoded_level(frames)
    assert (out_rate, out_channels) == (48_000, 2)
    assert rms > 0.05, "the tone must come through, not silence"
