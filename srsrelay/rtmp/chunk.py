"""RTMP chunk stream: reader, writer and acknowledgement counter (RTMP spec 1.0, section 5.3).

The reader consumes chunk payloads as they arrive, so the only bytes it keeps besides
partial messages are the few bytes of an incomplete chunk header.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

DEFAULT_CHUNK_SIZE = 128
"""Chunk size of both directions until a Set Chunk Size message (section 5.4.1)."""
MAX_CHUNK_STREAMS = 256
"""Most chunk stream ids a connection may use; real encoders use fewer than ten."""
MAX_CHUNK_STREAMS_IN_FLIGHT = 64
"""Most chunk streams with a partially received message at the same time."""
PARTIAL_BYTES_FACTOR = 2
"""Incomplete messages of all chunk streams together may declare at most this many
max_message_size bytes (audio interleaved with a maximal video message fits)."""

TIMESTAMP_MASK = 0xFFFFFFFF
EXTENDED_TIMESTAMP = 0xFFFFFF
_MAX_CHUNK_SIZE = 0x7FFFFFFF
_MIN_CSID = 2
_MAX_CSID = 65599
_MESSAGE_HEADER_SIZE = (11, 7, 3, 0)

_U32 = struct.Struct(">I")
_U32_LE = struct.Struct("<I")


class MessageType(enum.IntEnum):
    SET_CHUNK_SIZE = 1
    ABORT = 2
    ACKNOWLEDGEMENT = 3
    USER_CONTROL = 4
    WINDOW_ACK_SIZE = 5
    SET_PEER_BANDWIDTH = 6
    AUDIO = 8
    VIDEO = 9
    AMF3_DATA = 15
    AMF3_COMMAND = 17
    AMF0_DATA = 18
    AMF0_COMMAND = 20
    AGGREGATE = 22


_AGGREGATE_SUB_TYPES = frozenset(
    {MessageType.AUDIO, MessageType.VIDEO, MessageType.AMF0_DATA, MessageType.AMF3_DATA}
)


class ChunkError(ValueError):
    """The chunk stream breaks the RTMP specification or a configured bound."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        """"chunk" for a malformed chunk stream, "size" for an exceeded bound."""


@dataclass(frozen=True, slots=True)
class RtmpMessage:
    """One reassembled RTMP message."""

    msg_type: int
    """Message type id (see MessageType)."""
    stream_id: int
    """Message stream id (0 for protocol control and NetConnection commands)."""
    timestamp: int
    """32-bit timestamp in milliseconds; wraps at 2**32."""
    payload: bytes
    """Message body."""
    csid: int = 3
    """Chunk stream id it arrived on (informational)."""


class _ChunkStream:
    """Header state of one chunk stream id; fields carry over between chunks."""

    __slots__ = (
        "csid",
        "timestamp",
        "delta",
        "length",
        "msg_type",
        "stream_id",
        "extended",
        "partial",
    )

    def __init__(self, csid: int) -> None:
        self.csid = csid
        self.timestamp = 0
        self.delta = 0
        self.length = 0
        self.msg_type = 0
        self.stream_id = 0
        self.extended = False
        self.partial: bytearray | None = None


class ChunkReader:
    """Turns the bytes after the handshake into RtmpMessages.

    Set Chunk Size and Abort take effect inside the reader (they change how the next
    chunk is read) and are returned as well; aggregate messages are returned split
    into their sub-messages.
    """

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self._streams: dict[int, _ChunkStream] = {}
        self._pending = b""
        self._current: _ChunkStream | None = None
        self._current_left = 0
        self._in_flight = 0
        self._reserved = 0
        """Sum of the declared lengths of incomplete messages."""

    def feed(self, data: bytes) -> list[RtmpMessage]:
        """Consume bytes; return every message they complete, in order."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        view = memoryview(data)
        end = len(data)
        pos = 0
        out: list[RtmpMessage] = []
        while pos < end:
            st = self._current
            if st is None:
                new_pos = self._read_header(data, pos, end, out)
                if new_pos < 0:
                    self._pending = data[pos:]
                    break
                pos = new_pos
                st = self._current
                if st is None:  # zero-length message, already emitted
                    continue
                partial = st.partial
                assert partial is not None
                left = self._current_left
                if not partial and left == st.length and pos + left <= end:
                    # Whole message in one chunk and in this buffer: no reassembly copy.
                    self._current = None
                    self._finish(st, bytes(view[pos : pos + left]), out)
                    pos += left
                    continue
            partial = st.partial
            assert partial is not None
            take = min(self._current_left, end - pos)
            partial += view[pos : pos + take]
            pos += take
            self._current_left -= take
            if self._current_left:
                break
            self._current = None
            if len(partial) == st.length:
                self._finish(st, bytes(partial), out)
        return out

    def _read_header(self, data: bytes, pos: int, end: int, out: list[RtmpMessage]) -> int:
        """Parse one chunk header at `pos`; return the payload offset, or -1 if incomplete."""
        b0 = data[pos]
        fmt = b0 >> 6
        csid = b0 & 0x3F
        p = pos + 1
        if csid == 0:
            if p + 1 > end:
                return -1
            csid = 64 + data[p]
            p += 1
        elif csid == 1:
            if p + 2 > end:
                return -1
            csid = 64 + data[p] + (data[p + 1] << 8)
            p += 2
        header_end = p + _MESSAGE_HEADER_SIZE[fmt]
        if header_end > end:
            return -1
        st = self._streams.get(csid)
        if fmt == 3:
            if st is None:
                raise ChunkError("chunk", f"chunk stream {csid}: format 3 chunk without a header")
            if st.extended:
                # Section 5.3.1.3: present on every chunk while the header used it.
                header_end += 4
                if header_end > end:
                    return -1
            if st.partial is not None:
                self._current = st
                self._current_left = min(self.chunk_size, st.length - len(st.partial))
                return header_end
            # A new message reusing every field, the timestamp delta included.
            st.timestamp = (st.timestamp + st.delta) & TIMESTAMP_MASK
            return self._start_message(st, header_end, out)

        ts_field = (data[p] << 16) | (data[p + 1] << 8) | data[p + 2]
        extended = ts_field == EXTENDED_TIMESTAMP
        if extended:
            if header_end + 4 > end:
                return -1
            (ts_field,) = _U32.unpack_from(data, header_end)
            header_end += 4
        if st is None:
            if fmt != 0:
                raise ChunkError(
                    "chunk", f"chunk stream {csid}: format {fmt} chunk without a format 0 header"
                )
            if len(self._streams) >= MAX_CHUNK_STREAMS:
                raise ChunkError(
                    "size", f"more than {MAX_CHUNK_STREAMS} chunk stream ids on one connection"
                )
            st = self._streams[csid] = _ChunkStream(csid)
        elif st.partial is not None:
            raise ChunkError(
                "chunk",
                f"chunk stream {csid}: format {fmt} header while a message is incomplete "
                f"({len(st.partial)} of {st.length} bytes)",
            )
        if fmt <= 1:
            st.length = (data[p + 3] << 16) | (data[p + 4] << 8) | data[p + 5]
            st.msg_type = data[p + 6]
        if fmt == 0:
            st.stream_id = _U32_LE.unpack_from(data, p + 7)[0]
            st.timestamp = ts_field
        else:
            st.timestamp = (st.timestamp + ts_field) & TIMESTAMP_MASK
        # After format 0 the "delta" a format 3 new message re-applies is the timestamp
        # field itself, as ffmpeg and librtmp write and read it.
        st.delta = ts_field
        st.extended = extended
        return self._start_message(st, header_end, out)

    def _start_message(self, st: _ChunkStream, pos: int, out: list[RtmpMessage]) -> int:
        if st.length > self.max_message_size:
            raise ChunkError(
                "size",
                f"RTMP message of {st.length} bytes (type {st.msg_type}) is larger than "
                f"rtmp.max_message_size={self.max_message_size}",
            )
        if st.length == 0:
            self._finish(st, b"", out)
            return pos
        if self._in_flight >= MAX_CHUNK_STREAMS_IN_FLIGHT:
            raise ChunkError(
                "size",
                f"more than {MAX_CHUNK_STREAMS_IN_FLIGHT} chunk streams with incomplete messages",
            )
        if self._reserved + st.length > PARTIAL_BYTES_FACTOR * self.max_message_size:
            raise ChunkError(
                "size",
                f"incomplete messages would hold more than {PARTIAL_BYTES_FACTOR} x "
                f"rtmp.max_message_size={self.max_message_size} bytes",
            )
        self._in_flight += 1
        self._reserved += st.length
        st.partial = bytearray()
        self._current = st
        self._current_left = min(self.chunk_size, st.length)
        return pos

    def _drop_partial(self, st: _ChunkStream) -> None:
        if st.partial is not None:
            self._reserved -= st.length
            self._in_flight -= 1
            st.partial = None

    def _finish(self, st: _ChunkStream, payload: bytes, out: list[RtmpMessage]) -> None:
        if st.partial is not None:
            self._reserved -= st.length
            self._in_flight -= 1
            st.partial = None
        msg = RtmpMessage(st.msg_type, st.stream_id, st.timestamp, payload, st.csid)
        msg_type = st.msg_type
        if msg_type == MessageType.SET_CHUNK_SIZE:
            self.chunk_size = parse_set_chunk_size(payload)
        elif msg_type == MessageType.ABORT:
            if len(payload) < 4:
                raise ChunkError("chunk", f"Abort message of {len(payload)} bytes, expected 4")
            aborted = self._streams.get(_U32.unpack_from(payload)[0])
            if aborted is not None:
                self._drop_partial(aborted)
        elif msg_type == MessageType.AGGREGATE:
            out.extend(split_aggregate(msg))
            return
        out.append(msg)


def parse_set_chunk_size(payload: bytes) -> int:
    """Value of a Set Chunk Size message (section 5.4.1: 1..0x7FFFFFFF, top bit zero)."""
    if len(payload) < 4:
        raise ChunkError("chunk", f"Set Chunk Size message of {len(payload)} bytes, expected 4")
    size: int = _U32.unpack_from(payload)[0]
    if size < 1 or size > _MAX_CHUNK_SIZE:
        raise ChunkError(
            "chunk", f"Set Chunk Size {size} is outside 1..{_MAX_CHUNK_SIZE} (top bit must be 0)"
        )
    return size


def split_aggregate(msg: RtmpMessage) -> list[RtmpMessage]:
    """Split an aggregate message (type 22) into its FLV-tag-like sub-messages.

    Each sub-message is an 11-byte tag header, the body and a 4-byte back pointer.
    Sub-message timestamps are relative: the first maps to the aggregate's timestamp.
    """
    payload = msg.payload
    size = len(payload)
    out: list[RtmpMessage] = []
    first_ts: int | None = None
    off = 0
    while off < size:
        if off + 11 > size:
            raise ChunkError("chunk", f"aggregate message truncated in sub-header at offset {off}")
        sub_type = payload[off]
        body_len = (payload[off + 1] << 16) | (payload[off + 2] << 8) | payload[off + 3]
        sub_ts = (
            (payload[off + 7] << 24)
            | (payload[off + 4] << 16)
            | (payload[off + 5] << 8)
            | payload[off + 6]
        )
        body_end = off + 11 + body_len
        if body_end + 4 > size:
            raise ChunkError(
                "chunk",
                f"aggregate sub-message at offset {off} needs {body_len + 15} bytes, "
                f"{size - off} left",
            )
        if sub_type not in _AGGREGATE_SUB_TYPES:
            raise ChunkError(
                "chunk", f"aggregate message contains message type {sub_type} at offset {off}"
            )
        if first_ts is None:
            first_ts = sub_ts
        timestamp = (msg.timestamp + sub_ts - first_ts) & TIMESTAMP_MASK
        out.append(
            RtmpMessage(sub_type, msg.stream_id, timestamp, payload[off + 11 : body_end], msg.csid)
        )
        off = body_end + 4
    return out


def _basic_header(fmt: int, csid: int) -> bytes:
    if csid < 64:
        return bytes([(fmt << 6) | csid])
    if csid < 320:
        return bytes([fmt << 6, csid - 64])
    return bytes([(fmt << 6) | 1, (csid - 64) & 0xFF, (csid - 64) >> 8])


class ChunkWriter:
    """Serializes messages into chunks: a format 0 chunk, then format 3 continuations."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size

    def write(
        self, csid: int, msg_type: int, stream_id: int, timestamp: int, payload: bytes
    ) -> bytes:
        """Chunks of one message at the current outgoing chunk size."""
        if not _MIN_CSID <= csid <= _MAX_CSID:
            raise ValueError(f"chunk stream id {csid} outside {_MIN_CSID}..{_MAX_CSID}")
        timestamp &= TIMESTAMP_MASK
        extended = timestamp >= EXTENDED_TIMESTAMP
        ts_field = EXTENDED_TIMESTAMP if extended else timestamp
        length = len(payload)
        out = bytearray(_basic_header(0, csid))
        out += ts_field.to_bytes(3, "big")
        out += length.to_bytes(3, "big")
        out.append(msg_type)
        out += _U32_LE.pack(stream_id)
        ext = _U32.pack(timestamp) if extended else b""
        out += ext
        continuation = _basic_header(3, csid) + ext
        size = self.chunk_size
        out += payload[:size]
        for off in range(size, length, size):
            out += continuation
            out += payload[off : off + size]
        return bytes(out)


class AckTracker:
    """Counts received bytes and says when an Acknowledgement is due (section 5.4.3)."""

    def __init__(self) -> None:
        self.window = 0
        """Window Acknowledgement Size announced by the peer; 0 means none yet."""
        self.received = 0
        """Total bytes received on the connection."""
        self._acked = 0

    def on_bytes(self, count: int) -> int | None:
        """Add received bytes; return the sequence number to acknowledge, if one is due."""
        self.received += count
        if self.window and self.received - self._acked >= self.window:
            self._acked = self.received
            return self.received & TIMESTAMP_MASK
        return None
