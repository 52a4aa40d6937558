"""The ingest <-> worker messages and the pool's feed bound, without processes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from srsrelay.config import Config, ConfigError, DaemonConfig, config_from_dict, worker_count
from srsrelay.hub.frames import MediaKind, RtpFrame
from srsrelay.workers import wire
from srsrelay.workers.pool import FEED_BUFFER_LIMIT, Worker, WorkerPool, WorkerState
from srsrelay.workers.wire import Msg
from srsrelay.workers.worker import worker_config


def frame(kind: MediaKind = MediaKind.VIDEO, keyframe: bool = False, ts: int = 3000) -> RtpFrame:
    payloads = (
        (b"\x7c\x85" + b"a" * 1000, b"\x7c\x45" + b"b" * 10)
        if kind is MediaKind.VIDEO
        else (b"\xfc\x01\x02",)
    )
    return RtpFrame(
        kind=kind,
        timestamp=ts,
        keyframe=keyframe,
        payloads=payloads,
        size=sum(len(p) for p in payloads),
        received_at=1234.5,
    )


def test_frame_round_trip() -> None:
    original = frame(keyframe=True, ts=2**40 + 7)
    messages = wire.Reader().feed(wire.encode_frame(42, original))
    assert [m.kind for m in messages] == [Msg.FRAME]
    stream_id, got = wire.decode_frame(messages[0].body)
    assert stream_id == 42
    assert got == original


def test_audio_before_the_stream_start_keeps_its_negative_timestamp() -> None:
    # Opus frames are stamped back by the encoder's lookahead: the first ones are < 0.
    original = frame(MediaKind.AUDIO, ts=-312)
    message = wire.Reader().feed(wire.encode_frame(1, original))[0]
    assert wire.decode_frame(message.body)[1] == original


def test_reader_splits_and_joins_messages() -> None:
    data = (
        wire.encode_json(Msg.STREAM, {"id": 1, "app": "live"})
        + wire.encode_frame(1, frame(MediaKind.AUDIO))
        + wire.encode_json(Msg.END, {"id": 1, "reason": "gone"})
    )
    reader = wire.Reader()
    got: list[wire.Message] = []
    for i in range(0, len(data), 7):  # arbitrary cuts, as a stream socket delivers them
        got += reader.feed(data[i : i + 7])
    assert [m.kind for m in got] == [Msg.STREAM, Msg.FRAME, Msg.END]
    assert got[0].json() == {"id": 1, "app": "live"}
    assert wire.decode_frame(got[1].body)[1].kind is MediaKind.AUDIO
    assert got[2].json()["reason"] == "gone"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x00\x00\x00\x00\x04", "message length 0 is outside 1-1024 bytes"),
        (b"\x00\x00\x04\x01\x04", "message length 1025 is outside 1-1024 bytes"),
        (b"\x00\x00\x00\x01\x63", "unknown message type 99"),
    ],
)
def test_reader_refuses_broken_framing(data: bytes, error: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        wire.Reader(max_message=1024).feed(data)
    assert str(exc.value) == error


def test_frame_bodies_that_lie_about_their_payloads() -> None:
    body = wire.encode_frame(1, frame())[5:]
    with pytest.raises(wire.WireError, match="ends inside a payload$"):
        wire.decode_frame(body[:-1])
    with pytest.raises(wire.WireError, match="1 bytes after its payloads"):
        wire.decode_frame(body + b"x")
    with pytest.raises(wire.WireError, match="shorter than its header"):
        wire.decode_frame(body[:5])
    bad_kind = bytearray(body)
    bad_kind[4] = 9
    with pytest.raises(wire.WireError, match="unknown media kind 9"):
        wire.decode_frame(bytes(bad_kind))


def test_json_bodies_must_be_objects() -> None:
    with pytest.raises(wire.WireError, match="not a JSON object"):
        wire.decode_json(b"[1]")
    with pytest.raises(wire.WireError, match="not JSON"):
        wire.decode_json(b"\xff")


def test_config_travels_to_workers_unchanged() -> None:
    config = Config(daemon=DaemonConfig(workers="auto"))
    data = json.loads(json.dumps(dataclasses.asdict(config)))
    assert config_from_dict(data) == config


@pytest.mark.parametrize("value", ["0", "65", "two", "-1", ""])
def test_workers_setting_is_checked(value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        worker_count(DaemonConfig(workers=value))
    assert str(exc.value) == (
        f"daemon.workers: must be auto or an integer 1-64, got {json.dumps(value)}"
    )


def test_workers_auto_is_the_cores_this_process_may_use() -> None:
    import os

    assert worker_count(DaemonConfig(workers="auto")) == len(os.sched_getaffinity(0))
    assert worker_count(DaemonConfig(workers="3")) == 3


def test_worker_config_takes_its_own_port_and_leaves_checks_to_the_relay() -> None:
    base = Config()
    assert base.rtc.port == 8000
    one = worker_config(base, 1)
    assert one.rtc.port == 8001
    assert one.http.whep_rate_limit == 0.0
    assert one.api.access == "open"
    free = dataclasses.replace(base, rtc=dataclasses.replace(base.rtc, port=0))
    assert worker_config(free, 3).rtc.port == 0


class FakeLink:
    """Stands in for a worker's socket: records writes, reports a chosen backlog."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.backlog = 0

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def buffered(self) -> int:
        return self.backlog


def ready_worker() -> tuple[Worker, FakeLink]:
    worker = Worker(index=0, http_path="unused", state=WorkerState.READY)
    link = FakeLink()
    worker.link = link  # type: ignore[assignment]
    return worker, link


def write(pool: WorkerPool, worker: Worker, f: RtpFrame) -> None:
    pool._write(worker, 7, f, wire.encode_frame(7, f))


def test_a_worker_behind_loses_whole_frames_until_the_next_keyframe(
    monkeypatch: Any,
) -> None:
    from srsrelay.hub.registry import Hub

    config = Config()
    hub = Hub(config.hub, config.audio, config.rtc.payload_size)
    pool = WorkerPool(config, 2, hub, hooks=None)  # type: ignore[arg-type]
    worker, link = ready_worker()
    write(pool, worker, frame(keyframe=True))
    assert len(link.sent) == 1
    link.backlog = FEED_BUFFER_LIMIT + 1
    write(pool, worker, frame())  # over the bound: dropped, the stream now skips
    assert worker.skipping == {7}
    link.backlog = 0
    write(pool, worker, frame())  # the backlog cleared, but no keyframe yet
    write(pool, worker, frame(MediaKind.AUDIO))  # audio goes on
    assert len(link.sent) == 2
    write(pool, worker, frame(keyframe=True, ts=9000))
    write(pool, worker, frame(ts=12000))
    assert len(link.sent) == 4
    assert worker.skipping == set()
    assert worker.feed_dropped == 2
    kinds = [wire.decode_frame(m[5:])[1] for m in link.sent]
    assert [(f.kind, f.keyframe) for f in kinds] == [
        (MediaKind.VIDEO, True),
        (MediaKind.AUDIO, False),
        (MediaKind.VIDEO, True),
        (MediaKind.VIDEO, False),
    ]


def test_worker_ports_must_fit_below_65536() -> None:
    from srsrelay.config import RtcConfig, validate

    rtc = dataclasses.replace(RtcConfig(), port=65534)
    with pytest.raises(ConfigError) as exc:
        validate(Config(daemon=DaemonConfig(workers="4"), rtc=rtc))
    assert str(exc.value) == (
        "rtc.port: 4 worker processes (daemon.workers) take ports 65534-65537, beyond 65535; "
        "lower rtc.port"
    )
    validate(Config(daemon=DaemonConfig(workers="2"), rtc=rtc))  # 65534-65535 fit


class Reader:
    """A viewer stand-in on a stream copy."""

    def __init__(self) -> None:
        self.frames: list[RtpFrame] = []
        self.ended = 0

    def on_frame(self, f: RtpFrame) -> None:
        self.frames.append(f)

    def on_stream_end(self) -> None:
        self.ended += 1


def msg(kind: Msg, body: dict[str, Any]) -> wire.Message:
    return wire.Reader().feed(wire.encode_json(kind, body))[0]


def frame_msg(stream_id: int, f: RtpFrame) -> wire.Message:
    return wire.Reader().feed(wire.encode_frame(stream_id, f))[0]


def describe(stream_id: int, **fields: Any) -> wire.Message:
    body = {
        "id": stream_id,
        "app": "live",
        "name": "s",
        "publisher_id": "pub-1",
        "video_codec": "H264",
        "video_fmtp": "",
        "profile_level_id": "42e01f",
        "has_video": True,
        "has_audio": True,
        "rendition_of": None,
    }
    return msg(Msg.STREAM, {**body, **fields})


def test_a_worker_keeps_copies_of_the_streams_it_is_fed() -> None:
    from srsrelay.workers.worker import WorkerRelay

    relay = WorkerRelay(Config(), 0, "unused")
    relay.apply(describe(1))
    copy = relay.hub.find("live", "s")
    assert (copy.video_codec, copy.profile_level_id, copy.has_audio) == ("H264", "42e01f", True)
    reader = Reader()
    copy.add_reader(reader)
    relay.apply(frame_msg(1, frame(keyframe=True)))
    relay.apply(frame_msg(1, frame(MediaKind.AUDIO)))
    relay.apply(frame_msg(1, frame(ts=6000)))
    relay.apply(frame_msg(9, frame()))  # a stream it does not know: ignored
    assert [f.kind for f in reader.frames] == [MediaKind.VIDEO, MediaKind.AUDIO, MediaKind.VIDEO]
    assert len(copy.gop.frames) == 2  # the GOP for new viewers, audio not cached
    # A codec change: viewers renegotiate, and new ones get no frames of the old codec.
    relay.apply(msg(Msg.DROP, {"id": 1, "reason": "video codec changed from H264 to AV1"}))
    relay.apply(describe(1, video_codec="AV1", video_fmtp="profile=0", profile_level_id=None))
    assert reader.ended == 1 and copy.readers == []
    assert copy.gop.frames == [] and copy.video_codec == "AV1"
    # Its H.264 rendition hangs off it, and ends alone.
    relay.apply(describe(2, rendition_of=1))
    assert copy.rendition is relay.streams[2]
    relay.apply(msg(Msg.END, {"id": 2, "reason": "transcoder failed"}))
    assert copy.rendition is None and not copy.ended
    relay.apply(msg(Msg.END, {"id": 1, "reason": "publisher left"}))
    assert copy.ended and relay.hub.streams() == [] and relay.streams == {}
    relay.apply(msg(Msg.END, {"id": 1, "reason": "again"}))  # idempotent


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (describe(3, rendition_of=7), "rendition of unknown stream 7"),
        (msg(Msg.STREAM, {"id": "x"}), "id must be an integer, got 'x'"),
        (msg(Msg.END, {}), "id must be an integer, got None"),
        (msg(Msg.CONFIG, {"config": {"rtc": {"port": -1}}}), "configuration not valid: "),
        (msg(Msg.CONFIG, {}), "the message carries no configuration"),
        (msg(Msg.READY, {"rtc_port": 1}), "a worker does not take READY messages"),
    ],
)
def test_a_worker_refuses_messages_that_make_no_sense(message: wire.Message, error: str) -> None:
    from srsrelay.workers.worker import WorkerRelay

    relay = WorkerRelay(Config(), 0, "unused")
    with pytest.raises(wire.WireError) as exc:
        relay.apply(message)
    assert str(exc.value).startswith(error)
