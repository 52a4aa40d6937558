from __future__ import annotations

import random
import struct

import pytest

from srsrelay.rtmp.chunk import (
    AckTracker,
    ChunkError,
    ChunkReader,
    ChunkWriter,
    RtmpMessage,
    split_aggregate,
)

MAX = 1_000_000


# Chunk headers built by hand (RTMP spec 1.0, section 5.3.1), independent of ChunkWriter.
def basic(fmt: int, csid: int) -> bytes:
    if csid < 64:
        return bytes([(fmt << 6) | csid])
    if csid < 320:
        return bytes([fmt << 6, csid - 64])
    return bytes([(fmt << 6) | 1, (csid - 64) % 256, (csid - 64) // 256])


def u24(value: int) -> bytes:
    return value.to_bytes(3, "big")


def fmt0(csid: int, ts: int, length: int, msg_type: int, sid: int = 1) -> bytes:
    ext = ts >= 0xFFFFFF
    head = basic(0, csid) + u24(0xFFFFFF if ext else ts) + u24(length) + bytes([msg_type])
    return head + struct.pack("<I", sid) + (struct.pack(">I", ts) if ext else b"")


def fmt1(csid: int, delta: int, length: int, msg_type: int) -> bytes:
    ext = delta >= 0xFFFFFF
    head = basic(1, csid) + u24(0xFFFFFF if ext else delta) + u24(length) + bytes([msg_type])
    return head + (struct.pack(">I", delta) if ext else b"")


def fmt2(csid: int, delta: int) -> bytes:
    ext = delta >= 0xFFFFFF
    return (
        basic(2, csid)
        + u24(0xFFFFFF if ext else delta)
        + (struct.pack(">I", delta) if ext else b"")
    )


def fmt3(csid: int, ext: int | None = None) -> bytes:
    return basic(3, csid) + (struct.pack(">I", ext) if ext is not None else b"")


def summary(msgs: list[RtmpMessage]) -> list[tuple[int, int, int, bytes]]:
    return [(m.msg_type, m.csid, m.timestamp, m.payload) for m in msgs]


def test_fmt0_single_message_literal_bytes() -> None:
    data = bytes.fromhex("04 000064 000003 09 01000000") + b"abc"
    msgs = ChunkReader(MAX).feed(data)
    assert msgs == [RtmpMessage(9, 1, 100, b"abc", 4)]


def test_fmt1_and_fmt2_apply_deltas() -> None:
    data = (
        fmt0(6, 1000, 3, 9)
        + b"AAA"
        + fmt1(6, 40, 2, 8)
        + b"BB"
        + fmt2(6, 20)
        + b"CC"
        + fmt0(6, 5, 1, 9)
        + b"D"
    )
    msgs = ChunkReader(MAX).feed(data)
    assert summary(msgs) == [
        (9, 6, 1000, b"AAA"),
        (8, 6, 1040, b"BB"),
        (8, 6, 1060, b"CC"),
        (9, 6, 5, b"D"),
    ]
    assert {m.stream_id for m in msgs} == {1}


def test_fmt3_new_message_reapplies_delta() -> None:
    data = fmt0(4, 0, 4, 8) + b"aaaa" + fmt2(4, 23) + b"bbbb"
    data += fmt3(4) + b"cccc" + fmt3(4) + b"dddd" + fmt3(4) + b"eeee"
    msgs = ChunkReader(MAX).feed(data)
    assert [m.timestamp for m in msgs] == [0, 23, 46, 69, 92]
    assert [m.payload for m in msgs] == [b"aaaa", b"bbbb", b"cccc", b"dddd", b"eeee"]


def test_fmt3_continuation_does_not_change_timestamp() -> None:
    payload = bytes(range(200))
    data = fmt0(4, 10, 200, 9) + payload[:128] + fmt3(4) + payload[128:]
    data += fmt1(4, 33, 200, 9) + payload[:128] + fmt3(4) + payload[128:]
    msgs = ChunkReader(MAX).feed(data)
    assert summary(msgs) == [(9, 4, 10, payload), (9, 4, 43, payload)]


def test_extended_timestamp_on_every_chunk() -> None:
    ts = 16_777_300
    payload = bytes(i % 251 for i in range(300))
    data = (
        fmt0(4, ts, 300, 9)
        + payload[:128]
        + fmt3(4, ts)
        + payload[128:256]
        + fmt3(4, ts)
        + payload[256:]
        # The next message must still be in sync after the 4-byte fields.
        + fmt1(4, 10, 5, 9)
        + b"after"
        + fmt3(4)
        + b"again"
    )
    msgs = ChunkReader(MAX).feed(data)
    assert summary(msgs) == [
        (9, 4, ts, payload),
        (9, 4, ts + 10, b"after"),
        (9, 4, ts + 20, b"again"),
    ]


def test_extended_delta_on_fmt1_fmt2_and_fmt3_new_message() -> None:
    data = (
        fmt0(5, 1000, 1, 8)
        + b"a"
        + fmt1(5, 20_000_000, 1, 8)
        + b"b"
        + fmt2(5, 16_777_216)
        + b"c"
        + fmt3(5, 16_777_216)
        + b"d"
    )
    msgs = ChunkReader(MAX).feed(data)
    assert [m.timestamp for m in msgs] == [1000, 20_001_000, 36_778_216, 53_555_432]
    assert [m.payload for m in msgs] == [b"a", b"b", b"c", b"d"]


def test_timestamp_wraps_at_32_bits() -> None:
    data = fmt0(4, 0xFFFFFFF0, 1, 9) + b"a" + fmt2(4, 0x20) + b"b"
    msgs = ChunkReader(MAX).feed(data)
    assert [m.timestamp for m in msgs] == [0xFFFFFFF0, 0x10]


def test_set_chunk_size_mid_stream() -> None:
    payload = bytes(range(25))
    data = (
        fmt0(4, 0, 25, 9)
        + payload  # fits the default 128
        + fmt0(2, 0, 4, 1, sid=0)
        + struct.pack(">I", 10)
        + fmt1(4, 1, 25, 9)
        + payload[:10]
        + fmt3(4)
        + payload[10:20]
        + fmt3(4)
        + payload[20:]
    )
    reader = ChunkReader(MAX)
    msgs = reader.feed(data)
    assert [(m.msg_type, m.payload) for m in msgs] == [
        (9, payload),
        (1, b"\x00\x00\x00\x0a"),
        (9, payload),
    ]
    assert reader.chunk_size == 10


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0x80000000, "Set Chunk Size 2147483648 is outside 1..2147483647 (top bit must be 0)"),
        (0, "Set Chunk Size 0 is outside 1..2147483647 (top bit must be 0)"),
    ],
)
def test_set_chunk_size_invalid(value: int, message: str) -> None:
    with pytest.raises(ChunkError) as exc:
        ChunkReader(MAX).feed(fmt0(2, 0, 4, 1, sid=0) + struct.pack(">I", value))
    assert str(exc.value) == message
    assert exc.value.kind == "chunk"


def test_abort_drops_partial_message() -> None:
    payload = bytes(200)
    data = (
        fmt0(4, 0, 200, 9)
        + payload[:128]
        + fmt0(2, 0, 4, 2, sid=0)
        + struct.pack(">I", 4)
        # Without the abort this fmt0 would collide with the incomplete message.
        + fmt0(4, 50, 3, 9)
        + b"new"
    )
    msgs = ChunkReader(MAX).feed(data)
    assert [(m.msg_type, m.timestamp, m.payload) for m in msgs] == [
        (2, 0, b"\x00\x00\x00\x04"),
        (9, 50, b"new"),
    ]


def test_header_while_message_incomplete_is_an_error() -> None:
    data = fmt0(4, 0, 200, 9) + bytes(128) + fmt1(4, 10, 5, 9) + b"12345"
    with pytest.raises(ChunkError) as exc:
        ChunkReader(MAX).feed(data)
    assert str(exc.value) == (
        "chunk stream 4: format 1 header while a message is incomplete (128 of 200 bytes)"
    )


def test_fmt1_without_fmt0_is_an_error() -> None:
    with pytest.raises(ChunkError) as exc:
        ChunkReader(MAX).feed(fmt1(7, 10, 1, 9) + b"x")
    assert str(exc.value) == "chunk stream 7: format 1 chunk without a format 0 header"


def test_fmt3_without_header_is_an_error() -> None:
    with pytest.raises(ChunkError) as exc:
        ChunkReader(MAX).feed(fmt3(7) + b"x")
    assert str(exc.value) == "chunk stream 7: format 3 chunk without a header"


def aggregate_payload() -> bytes:
    def tag(msg_type: int, ts: int, body: bytes) -> bytes:
        header = bytes([msg_type]) + u24(len(body)) + u24(ts & 0xFFFFFF) + bytes([ts >> 24])
        header += b"\x00\x00\x00"
        return header + body + struct.pack(">I", 11 + len(body))

    return (
        tag(9, 1000, b"\x17\x01video")
        + tag(8, 1010, b"\xaf\x01aud")
        + tag(9, 1033, b"\x27\x01v2")
        # Sub timestamp past 24 bits (uses the extension byte).
        + tag(9, 0x01000000 + 1000, b"far")
    )


def test_aggregate_split_with_relative_timestamps() -> None:
    payload = aggregate_payload()
    data = fmt0(4, 5000, len(payload), 22) + payload
    msgs = ChunkReader(MAX).feed(data)
    assert [(m.msg_type, m.stream_id, m.timestamp, m.payload) for m in msgs] == [
        (9, 1, 5000, b"\x17\x01video"),
        (8, 1, 5010, b"\xaf\x01aud"),
        (9, 1, 5033, b"\x27\x01v2"),
        (9, 1, 5000 + 0x01000000, b"far"),
    ]


def test_aggregate_truncated() -> None:
    payload = aggregate_payload()[:-2]
    with pytest.raises(ChunkError) as exc:
        split_aggregate(RtmpMessage(22, 1, 0, payload))
    assert str(exc.value) == "aggregate sub-message at offset 61 needs 18 bytes, 16 left"


def test_aggregate_rejects_control_sub_message() -> None:
    bad = b"\x01\x00\x00\x04" + bytes(7) + b"\x00\x00\x00\x80" + b"\x00\x00\x00\x0f"
    with pytest.raises(ChunkError) as exc:
        split_aggregate(RtmpMessage(22, 1, 0, bad))
    assert str(exc.value) == "aggregate message contains message type 1 at offset 0"


def test_oversized_message() -> None:
    with pytest.raises(ChunkError) as exc:
        ChunkReader(1000).feed(fmt0(4, 0, 1001, 9))
    assert exc.value.kind == "size"
    assert str(exc.value) == (
        "RTMP message of 1001 bytes (type 9) is larger than rtmp.max_message_size=1000"
    )
    # Exactly the limit is fine.
    assert len(ChunkReader(1000).feed(fmt0(4, 0, 1000, 9) + bytes(128))) == 0


def test_too_many_chunk_streams_in_flight() -> None:
    reader = ChunkReader(MAX)
    data = b"".join(fmt0(10 + i, 0, 200, 9) + bytes(128) for i in range(64))
    assert reader.feed(data) == []
    with pytest.raises(ChunkError) as exc:
        reader.feed(fmt0(100, 0, 200, 9))
    assert exc.value.kind == "size"
    assert str(exc.value) == "more than 64 chunk streams with incomplete messages"


def test_partial_bytes_bound() -> None:
    reader = ChunkReader(1000)
    reader.feed(fmt0(4, 0, 1000, 9) + bytes(128) + fmt0(5, 0, 1000, 9) + bytes(128))
    with pytest.raises(ChunkError) as exc:
        reader.feed(fmt0(6, 0, 1000, 9))
    assert str(exc.value) == (
        "incomplete messages would hold more than 2 x rtmp.max_message_size=1000 bytes"
    )


@pytest.mark.parametrize(
    ("csid", "header"),
    [
        (63, b"\x3f"),
        (64, b"\x00\x00"),
        (319, b"\x00\xff"),
        (320, b"\x01\x00\x01"),
        (65599, b"\x01\xff\xff"),
    ],
)
def test_basic_header_forms(csid: int, header: bytes) -> None:
    data = header + u24(7) + u24(2) + b"\x08" + b"\x01\x00\x00\x00" + b"hi"
    data += bytes([0xC0 | header[0]]) + header[1:] + b"yo"  # fmt 3, same csid form
    msgs = ChunkReader(MAX).feed(data)
    assert summary(msgs) == [(8, csid, 7, b"hi"), (8, csid, 14, b"yo")]
    assert ChunkWriter().write(csid, 8, 1, 7, b"hi") == data[: len(header) + 13]


def test_zero_length_message() -> None:
    msgs = ChunkReader(MAX).feed(fmt0(4, 5, 0, 9) + fmt0(4, 6, 1, 9) + b"x")
    assert summary(msgs) == [(9, 4, 5, b""), (9, 4, 6, b"x")]


def full_session_bytes() -> bytes:
    payload = bytes(i % 256 for i in range(1000))
    agg = aggregate_payload()
    ts = 16_777_300
    return (
        fmt0(3, 0, 6, 20, sid=0)
        + b"cmd..."
        + fmt0(4, ts, 300, 9)
        + payload[:128]
        + fmt0(6, 0, 4, 8)  # interleaved audio between video chunks
        + b"aud1"
        + fmt3(4, ts)
        + payload[128:256]
        + fmt3(4, ts)
        + payload[256:300]
        + fmt0(2, 0, 4, 1, sid=0)
        + struct.pack(">I", 300)
        + fmt1(4, 40, 1000, 9)
        + payload[:300]
        + fmt2(6, 23)
        + b"aud2"
        + fmt3(4)
        + payload[300:600]
        + fmt3(4)
        + payload[600:900]
        + fmt3(4)
        + payload[900:]
        + fmt3(6)
        + b"aud3"
        + fmt0(8, 7000, len(agg), 22)
        + agg
        + basic(0, 320)
        + u24(9)
        + u24(2)
        + b"\x12\x01\x00\x00\x00"
        + b"ok"
    )


def test_split_feeding_gives_identical_messages() -> None:
    data = full_session_bytes()
    whole = ChunkReader(MAX).feed(data)
    assert [m.msg_type for m in whole] == [20, 8, 9, 1, 8, 9, 8, 9, 8, 9, 9, 18]
    assert [m.timestamp for m in whole if m.csid == 6] == [0, 23, 46]
    one = ChunkReader(MAX)
    bytewise = [m for i in range(len(data)) for m in one.feed(data[i : i + 1])]
    assert bytewise == whole
    rng = random.Random(1)
    for _ in range(20):
        reader = ChunkReader(MAX)
        pos, pieces = 0, []
        while pos < len(data):
            step = rng.randint(1, 200)
            pieces.extend(reader.feed(data[pos : pos + step]))
            pos += step
        assert pieces == whole


def test_incomplete_message_is_not_emitted() -> None:
    reader = ChunkReader(MAX)
    assert reader.feed(fmt0(4, 0, 200, 9) + bytes(128) + fmt3(4) + bytes(71)) == []
    assert len(reader.feed(b"\x00")) == 1


@pytest.mark.parametrize("timestamp", [0, 1234, 0xFFFFFE, 0xFFFFFF, 16_777_300, 0xFFFFFFFF])
@pytest.mark.parametrize("chunk_size", [1, 128, 4096])
def test_writer_roundtrip(timestamp: int, chunk_size: int) -> None:
    payload = bytes(i % 256 for i in range(1000))
    writer = ChunkWriter(chunk_size)
    data = writer.write(5, 20, 1, timestamp, payload) + writer.write(5, 9, 1, timestamp, b"x")
    reader = ChunkReader(MAX)
    reader.chunk_size = chunk_size
    assert summary(reader.feed(data)) == [
        (20, 5, timestamp, payload),
        (9, 5, timestamp, b"x"),
    ]


def test_writer_literal_bytes() -> None:
    data = ChunkWriter(4).write(3, 20, 0, 0x01000000, b"abcdef")
    assert data == (
        bytes.fromhex("03 ffffff 000006 14 00000000 01000000")
        + b"abcd"
        + bytes.fromhex("c3 01000000")
        + b"ef"
    )


def test_ack_tracker_window() -> None:
    ack = AckTracker()
    assert ack.on_bytes(5000) is None  # no window announced yet
    ack.window = 1000
    assert ack.on_bytes(1) == 5001  # bytes before the window count too
    assert ack.on_bytes(999) is None
    assert ack.on_bytes(1) == 6001
    assert ack.on_bytes(998) is None
    assert ack.on_bytes(3) == 7002


def test_ack_sequence_number_wraps() -> None:
    ack = AckTracker()
    ack.window = 1 << 20
    ack.on_bytes((1 << 32) - 10)
    assert ack.on_bytes(1 << 20) == (1 << 20) - 10
