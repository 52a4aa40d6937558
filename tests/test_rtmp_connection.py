from __future__ import annotations

import struct
from pathlib import Path

import pytest

from srsrelay.config import RtmpConfig
from srsrelay.rtmp import amf0
from srsrelay.rtmp.chunk import ChunkReader, ChunkWriter, RtmpMessage
from srsrelay.rtmp.connection import (
    Connected,
    ConnectionState,
    Event,
    MediaReceived,
    MetadataReceived,
    PlayRejected,
    ProtocolError,
    PublishEnded,
    PublishRequested,
    RtmpConnection,
)

CONFIG = RtmpConfig(chunk_size=4096, window_ack_size=2_500_000, max_message_size=100_000)
C1 = struct.pack(">II", 1234, 0) + bytes(i % 256 for i in range(1528))
C2 = bytes(1536)
S1_RANDOM = bytes(range(200)) * 7 + bytes(128)


class Client:
    """Drives an RtmpConnection the way ffmpeg does, decoding the replies."""

    def __init__(self, config: RtmpConfig = CONFIG) -> None:
        self.conn = RtmpConnection(config, handshake_random=S1_RANDOM)
        self.writer = ChunkWriter()
        self.reader = ChunkReader(1 << 20)
        self.sent = 0

    def send(self, data: bytes) -> list[Event]:
        self.sent += len(data)
        return self.conn.receive_data(data, 1.0)

    def handshake(self) -> None:
        assert self.send(b"\x03" + C1) == []
        out = self.conn.data_to_send()
        assert out == b"\x03" + struct.pack(">II", 0, 0) + S1_RANDOM + C1
        assert self.send(C2) == []
        assert self.conn.state is ConnectionState.WAIT_CONNECT

    def command(
        self, *values: amf0.Amf0Value, stream_id: int = 0, msg_type: int = 20
    ) -> list[Event]:
        body = amf0.encode(*values)
        if msg_type == 17:
            body = b"\x00" + body
        return self.send(self.writer.write(3, msg_type, stream_id, 0, body))

    def replies(self) -> list[RtmpMessage]:
        return self.reader.feed(self.conn.data_to_send())

    def connect(self) -> None:
        self.handshake()
        events = self.command(
            "connect",
            1.0,
            {"app": "live", "tcUrl": "rtmp://127.0.0.1/live", "objectEncoding": 0.0},
        )
        assert events == [Connected("live", "rtmp://127.0.0.1/live")]
        self.replies()

    def publish(self, name: str = "test") -> list[Event]:
        self.connect()
        self.command("createStream", 4.0, None)
        self.replies()
        return self.command("publish", 5.0, None, name, "live", stream_id=1)


def decoded(msg: RtmpMessage) -> list[amf0.Amf0Value]:
    assert msg.msg_type == 20
    return amf0.decode_all(msg.payload)


def status(msg: RtmpMessage) -> tuple[str, str]:
    values = decoded(msg)
    assert values[0] == "onStatus"
    info = values[3]
    assert isinstance(info, dict)
    return str(info["level"]), str(info["code"])


def test_handshake_garbage_is_a_handshake_error() -> None:
    conn = RtmpConnection(CONFIG)
    events = conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    assert events == [
        ProtocolError(
            "handshake",
            "unsupported RTMP version 0x47 in C0, expected 0x03 "
            "(an HTTP request; RTMP clients must use rtmp:// on this port)",
        )
    ]
    assert conn.state is ConnectionState.CLOSED
    assert conn.data_to_send() == b""
    assert conn.receive_data(b"\x03" + C1, 1.0) == []


def test_handshake_unknown_version() -> None:
    events = RtmpConnection(CONFIG).receive_data(b"\x01", 0.0)
    assert events == [
        ProtocolError(
            "handshake", "unsupported RTMP version 0x01 in C0, expected 0x03 (not an RTMP client)"
        )
    ]


def test_handshake_byte_by_byte_and_chunks_after_c2() -> None:
    client = Client()
    body = amf0.encode("connect", 1.0, {"app": "live"})
    data = b"\x03" + C1 + C2 + ChunkWriter().write(3, 20, 0, 0, body)
    events: list[Event] = []
    for i in range(len(data)):
        events += client.conn.receive_data(data[i : i + 1], 0.0)
    assert events == [Connected("live", "")]
    out = client.conn.data_to_send()
    assert out[:3073] == b"\x03" + struct.pack(">II", 0, 0) + S1_RANDOM + C1
    assert [m.msg_type for m in client.reader.feed(out[3073:])] == [5, 6, 1, 20]


def test_full_publish_sequence() -> None:
    client = Client()
    client.handshake()
    events = client.command(
        "connect",
        1.0,
        {"app": "live", "tcUrl": "rtmp://127.0.0.1:1935/live", "objectEncoding": 3.0},
    )
    assert events == [Connected("live", "rtmp://127.0.0.1:1935/live")]
    window, bandwidth, chunk_size, result = client.replies()
    assert (window.msg_type, window.csid, window.payload) == (5, 2, struct.pack(">I", 2_500_000))
    assert (bandwidth.msg_type, bandwidth.payload) == (6, struct.pack(">I", 2_500_000) + b"\x02")
    assert (chunk_size.msg_type, chunk_size.payload) == (1, struct.pack(">I", 4096))
    assert client.reader.chunk_size == 4096
    name, txn, props, info = decoded(result)
    assert (name, txn) == ("_result", 1.0)
    assert isinstance(props, dict) and props["fmsVer"] == "FMS/3,5,3,888"
    assert props["capabilities"] == 127.0
    assert isinstance(info, dict)
    assert info["code"] == "NetConnection.Connect.Success"
    assert info["level"] == "status"
    assert info["objectEncoding"] == 3.0

    assert client.command("releaseStream", 2.0, None, "test") == []
    assert client.command("FCPublish", 3.0, None, "test") == []
    assert client.command("createStream", 4.0, None) == []
    replies = [decoded(m) for m in client.replies()]
    assert replies == [
        ["_result", 2.0, None, None],
        ["_result", 3.0, None, None],
        ["_result", 4.0, None, 1.0],
    ]

    events = client.command("publish", 5.0, None, "test?key=abc", "live", stream_id=1)
    assert events == [PublishRequested("live", "test", "key=abc")]
    assert client.replies() == []  # nothing until the application decides
    assert client.conn.state is ConnectionState.PUBLISH_PENDING
    client.conn.accept_publish()
    begin, start = client.replies()
    assert (begin.msg_type, begin.payload) == (4, b"\x00\x00\x00\x00\x00\x01")
    assert start.stream_id == 1
    assert status(start) == ("status", "NetStream.Publish.Start")
    assert client.conn.state is ConnectionState.PUBLISHING

    meta = amf0.encode(
        "@setDataFrame", "onMetaData", amf0.EcmaArray({"width": 320.0, "height": 240.0})
    )
    events = client.send(client.writer.write(4, 18, 1, 0, meta))
    assert events == [MetadataReceived({"width": 320.0, "height": 240.0})]
    video = b"\x17\x00\x00\x00\x00" + bytes(300)
    events = client.send(
        client.writer.write(6, 9, 1, 0, video)
        + client.writer.write(4, 8, 1, 21, b"\xaf\x01abc")
        + client.writer.write(6, 9, 1, 33, b"\x27\x01\x00\x00\x00xyz")
    )
    assert events == [
        MediaReceived("video", 0, video),
        MediaReceived("audio", 21, b"\xaf\x01abc"),
        MediaReceived("video", 33, b"\x27\x01\x00\x00\x00xyz"),
    ]

    events = client.command("FCUnpublish", 6.0, None, "test")
    assert events == [PublishEnded("test", "FCUnpublish")]
    assert [decoded(m) for m in client.replies()] == [["_result", 6.0, None, None]]
    assert client.command("deleteStream", 7.0, None, 1.0) == []
    assert client.conn.state is ConnectionState.CONNECTED
    assert client.conn.close("disconnected") == []
    assert client.conn.state is ConnectionState.CLOSED


def test_amf3_command_message_type_17() -> None:
    client = Client()
    client.handshake()
    events = client.command("connect", 1.0, {"app": "live/"}, msg_type=17)
    assert events == [Connected("live", "")]
    assert decoded(client.replies()[-1])[0] == "_result"


def test_delete_stream_ends_publish() -> None:
    client = Client()
    client.publish()
    client.conn.accept_publish()
    assert client.command("deleteStream", 0.0, None, 1.0) == [PublishEnded("test", "deleteStream")]


def test_reject_publish() -> None:
    client = Client()
    assert client.publish("busy") == [PublishRequested("live", "busy", "")]
    client.conn.reject_publish("NetStream.Publish.BadName", "stream live/busy is already live")
    (reply,) = client.replies()
    assert status(reply) == ("error", "NetStream.Publish.BadName")
    info = decoded(reply)[3]
    assert isinstance(info, dict) and info["description"] == "stream live/busy is already live"
    assert client.conn.state is ConnectionState.CONNECTED
    # Media after a rejection is dropped.
    assert client.send(client.writer.write(6, 9, 1, 0, b"\x17\x01")) == []


def test_app_query_joined_with_stream_query() -> None:
    client = Client()
    client.handshake()
    client.command("connect", 1.0, {"app": "live?token=1"})
    client.command("createStream", 2.0, None)
    events = client.command("publish", 3.0, None, "cam?x=2", "live", stream_id=1)
    assert events == [PublishRequested("live", "cam", "token=1&x=2")]


def test_publish_without_name() -> None:
    client = Client()
    description = "publish without a stream name; use rtmp://host/app/stream"
    assert client.publish("") == [ProtocolError("command", description)]
    (reply,) = client.replies()
    assert status(reply) == ("error", "NetStream.Publish.BadName")
    assert client.conn.state is ConnectionState.CLOSED


def test_play_is_rejected() -> None:
    client = Client()
    client.connect()
    events = client.command("play", 4.0, None, "test", stream_id=1)
    assert events == [PlayRejected("test")]
    (reply,) = client.replies()
    assert status(reply) == ("error", "NetStream.Play.Failed")


def test_unknown_command_gets_error_reply() -> None:
    client = Client()
    client.connect()
    assert client.command("getStreamLength", 9.0, None, "x") == []
    (reply,) = client.replies()
    name, txn, _, info = decoded(reply)
    assert (name, txn) == ("_error", 9.0)
    assert isinstance(info, dict) and info["description"] == "unknown command getStreamLength"


def test_command_before_connect() -> None:
    client = Client()
    client.handshake()
    assert client.command("createStream", 2.0, None) == [
        ProtocolError("command", "createStream received before connect")
    ]


def test_connect_twice() -> None:
    client = Client()
    client.connect()
    assert client.command("connect", 2.0, {"app": "live"}) == [
        ProtocolError("command", "connect received twice")
    ]


def test_bad_amf_in_command() -> None:
    client = Client()
    client.handshake()
    data = client.writer.write(3, 20, 0, 0, b"\x02\x00\x07connect\x00\x3f")
    assert client.send(data) == [
        ProtocolError("amf", "AMF0 input truncated: number at offset 11 needs 8 bytes, 1 left")
    ]


def test_media_before_publish_is_ignored() -> None:
    client = Client()
    client.connect()
    assert client.send(client.writer.write(6, 9, 1, 0, b"\x17\x00")) == []


def test_publisher_stopping_mid_chunk() -> None:
    client = Client()
    client.publish()
    client.conn.accept_publish()
    client.replies()
    message = client.writer.write(6, 9, 1, 0, bytes(1000))
    assert client.send(message[:400]) == []
    assert client.conn.close("client closed the connection") == [
        PublishEnded("test", "client closed the connection")
    ]
    assert client.send(message[400:]) == []


def test_oversized_message_while_publishing() -> None:
    client = Client()
    client.publish()
    client.conn.accept_publish()
    header = bytes.fromhex("06 000000 0186a1 09 01000000")  # 100_001 bytes
    message = "RTMP message of 100001 bytes (type 9) is larger than rtmp.max_message_size=100000"
    assert client.send(header) == [
        PublishEnded("test", f"protocol error: {message}"),
        ProtocolError("size", message),
    ]
    assert client.conn.state is ConnectionState.CLOSED


def test_timestamps_unwrap_past_32_bits() -> None:
    client = Client()
    client.publish()
    client.conn.accept_publish()
    data = (
        client.writer.write(6, 9, 1, 0xFFFFFFF0, b"\x27\x01a")
        + client.writer.write(6, 9, 1, 0x10, b"\x27\x01b")
        # A slightly older audio message from before the wrap stays before it.
        + client.writer.write(4, 8, 1, 0xFFFFFFFA, b"\xaf\x01c")
    )
    events = client.send(data)
    assert [e.timestamp_ms for e in events if isinstance(e, MediaReceived)] == [
        0xFFFFFFF0,
        0x1_0000_0010,
        0xFFFFFFFA,
    ]


def test_acknowledgement_after_window() -> None:
    client = Client()
    client.connect()
    assert client.send(client.writer.write(2, 5, 0, 0, struct.pack(">I", 5000))) == []
    assert client.replies() == []
    assert client.sent < 5000  # handshake and connect count too
    filler = client.writer.write(3, 20, 0, 0, amf0.encode("onBWDone", 0.0, None))
    while True:
        client.send(filler)
        replies = client.replies()
        if client.sent >= 5000:
            break
        assert replies == []
    (ack,) = replies
    assert ack.msg_type == 3
    assert ack.payload == struct.pack(">I", client.sent)
    assert client.sent >= 5000


def test_ping_request_gets_response() -> None:
    client = Client()
    client.connect()
    client.send(client.writer.write(2, 4, 0, 0, b"\x00\x06\x00\x00\x12\x34"))
    (pong,) = client.replies()
    assert (pong.msg_type, pong.payload) == (4, b"\x00\x07\x00\x00\x12\x34")


def test_accept_without_request_is_a_bug() -> None:
    client = Client()
    client.connect()
    with pytest.raises(RuntimeError, match="accept_publish in state connected"):
        client.conn.accept_publish()


def test_media_pipelined_after_publish_is_delivered() -> None:
    client = Client()
    client.connect()
    client.command("createStream", 2.0, None)
    publish = amf0.encode("publish", 3.0, None, "cam", "live")
    data = client.writer.write(5, 20, 1, 0, publish) + client.writer.write(6, 9, 1, 40, b"\x17\x00")
    assert client.send(data) == [
        PublishRequested("live", "cam", ""),
        MediaReceived("video", 40, b"\x17\x00"),
    ]


def test_metadata_as_amf3_data_message() -> None:
    client = Client()
    client.publish()
    client.conn.accept_publish()
    body = b"\x00" + amf0.encode("onMetaData", {"framerate": 30.0})
    assert client.send(client.writer.write(4, 15, 1, 0, body)) == [
        MetadataReceived({"framerate": 30.0})
    ]
    # Other data messages are not metadata.
    body = amf0.encode("onTextData", {"text": "hi"})
    assert client.send(client.writer.write(4, 18, 1, 0, body)) == []


FFMPEG_CAPTURE = Path(__file__).parent / "fixtures" / "rtmp_ffmpeg_publish.bin"
"""Every byte ffmpeg 5.1 sent for a 1 s publish (x264 160x120 10 fps, AAC 44.1 kHz) to
rtmp://127.0.0.1/live/fixture, handshake included."""


def replay(data: bytes, step: int) -> list[Event]:
    conn = RtmpConnection(CONFIG)
    events: list[Event] = []
    for i in range(0, len(data), step):
        new = conn.receive_data(data[i : i + step], 0.0)
        if any(isinstance(e, PublishRequested) for e in new):
            conn.accept_publish()
        events += new
    conn.data_to_send()
    return events


def test_replay_ffmpeg_capture() -> None:
    data = FFMPEG_CAPTURE.read_bytes()
    events = replay(data, 4096)
    assert isinstance(events[0], Connected) and events[0].app == "live"
    assert events[1] == PublishRequested("live", "fixture", "")
    meta = events[2]
    assert isinstance(meta, MetadataReceived)
    assert meta.metadata["width"] == 160.0 and meta.metadata["videocodecid"] == 7.0
    assert events[-1] == PublishEnded("fixture", "FCUnpublish")
    media = [e for e in events if isinstance(e, MediaReceived)]
    video = [e for e in media if e.kind == "video"]
    audio = [e for e in media if e.kind == "audio"]
    assert (len(video), len(audio)) == (12, 46)
    assert video[0].body[:2] == b"\x17\x00"  # AVC sequence header
    assert audio[0].body[:2] == b"\xaf\x00"  # AAC sequence header
    assert [e.timestamp_ms for e in video] == [0, 23, *range(123, 924, 100), 923]
    assert [e.timestamp_ms for e in audio[:4]] == [0, 0, 23, 46]
    assert audio[-1].timestamp_ms == 1021
    # The same bytes one at a time give the same events.
    assert replay(data, 1) == events
