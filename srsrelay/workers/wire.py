"""The messages between the ingest process and its workers (sans-I/O).

One unix stream socket per worker carries length-prefixed messages both ways:

    u32 length (of what follows) | u8 type | body

Bodies are JSON objects, except FRAME, which is binary so that a frame is serialized
once per stream and the same bytes go to every worker:

    u32 stream id | u8 kind | u8 keyframe | i64 RTP timestamp | f64 received_at
    | u16 payload count | (u16 length | payload) ...

`received_at` is time.monotonic(); CLOCK_MONOTONIC is shared by every process of a
machine, so relay-added latency measured in a worker includes the hop from ingest.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from srsrelay.hub.frames import MediaKind, RtpFrame

MAX_MESSAGE = 32 * 1024 * 1024
"""Largest message accepted, bytes: a keyframe of rtmp.max_message_size (at most 16 MiB)
packetized, with room for RTP payload headers. A longer length prefix is a protocol
error and ends the connection."""

_PREFIX = struct.Struct("!IB")
_FRAME = struct.Struct("!IBBqdH")
_LEN = struct.Struct("!H")
_KINDS = (MediaKind.VIDEO, MediaKind.AUDIO)
_KIND_CODE = {MediaKind.VIDEO: 0, MediaKind.AUDIO: 1}


class Msg(enum.IntEnum):
    """Message types. Ingest -> worker: HELLO .. DROP; worker -> ingest: JOIN .. PING."""

    HELLO = 1
    """{"index": k, "config": {...}}: the first message a worker receives."""
    CONFIG = 2
    """{"config": {...}}: a reloaded configuration."""
    STREAM = 3
    """A stream appeared or its description changed (stream_info())."""
    FRAME = 4
    """One RtpFrame of a stream (binary, see the module docstring)."""
    END = 5
    """{"id": n, "reason": "..."}: the stream ended; its viewers' sessions end."""
    DROP = 6
    """{"id": n, "reason": "..."}: the stream's viewers must renegotiate (codec change)."""
    JOIN = 32
    """{"index": k}: the first message of a worker (its pid is checked with SO_PEERCRED)."""
    READY = 33
    """{"rtc_port": p}: the worker serves viewers."""
    OPENED = 34
    """{"id": "...", "stream": "app/name", "hook": {...} | null}: a viewer session."""
    CLOSED = 35
    """{"id": "...", "reason": "..."}: that session ended."""
    PING = 36
    """{}: the worker's heartbeat, every HEARTBEAT_INTERVAL."""


class WireError(Exception):
    """The peer broke the protocol; the message says how. The connection is closed."""


def encode_json(kind: Msg, body: dict[str, Any]) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return _PREFIX.pack(len(data) + 1, kind) + data


def encode_frame(stream_id: int, frame: RtpFrame) -> bytes:
    """One FRAME message: built once per frame, written to every worker."""
    payloads = frame.payloads
    parts = [
        b"",
        _FRAME.pack(
            stream_id,
            _KIND_CODE[frame.kind],
            frame.keyframe,
            frame.timestamp,
            frame.received_at,
            len(payloads),
        ),
    ]
    length = 1 + _FRAME.size
    for payload in payloads:
        parts.append(_LEN.pack(len(payload)))
        parts.append(payload)
        length += 2 + len(payload)
    parts[0] = _PREFIX.pack(length, Msg.FRAME)
    return b"".join(parts)


def decode_frame(body: bytes | memoryview) -> tuple[int, RtpFrame]:
    """(stream id, frame) of a FRAME body; raises WireError if it is malformed."""
    view = memoryview(body)
    if len(view) < _FRAME.size:
        raise WireError(f"FRAME message of {len(view)} bytes is shorter than its header")
    stream_id, kind, keyframe, timestamp, received_at, count = _FRAME.unpack_from(view)
    if kind >= len(_KINDS):
        raise WireError(f"FRAME message has an unknown media kind {kind}")
    offset = _FRAME.size
    payloads = []
    for _ in range(count):
        if offset + 2 > len(view):
            raise WireError("FRAME message ends inside a payload length")
        (size,) = _LEN.unpack_from(view, offset)
        offset += 2
        if offset + size > len(view):
            raise WireError("FRAME message ends inside a payload")
        payloads.append(bytes(view[offset : offset + size]))
        offset += size
    if offset != len(view):
        raise WireError(f"FRAME message has {len(view) - offset} bytes after its payloads")
    frame = RtpFrame(
        kind=_KINDS[kind],
        timestamp=timestamp,
        keyframe=bool(keyframe),
        payloads=tuple(payloads),
        size=sum(len(p) for p in payloads),
        received_at=received_at,
    )
    return stream_id, frame


def decode_json(body: bytes | memoryview) -> dict[str, Any]:
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"message body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WireError("message body is not a JSON object")
    return data


@dataclass(frozen=True, slots=True)
class Message:
    kind: Msg
    """The message type."""
    body: bytes
    """Its body (decode_json or decode_frame reads it)."""

    def json(self) -> dict[str, Any]:
        return decode_json(self.body)


class Reader:
    """Splits a byte stream into messages. Holds at most one partial message, and a
    message is at most MAX_MESSAGE bytes."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message

    def feed(self, data: bytes) -> list[Message]:
        """The complete messages in what arrived so far; raises WireError."""
        buf = self._buf
        buf += data
        out: list[Message] = []
        offset = 0
        while len(buf) - offset >= _PREFIX.size:
            length, kind = _PREFIX.unpack_from(buf, offset)
            if length < 1 or length > self._max:
                raise WireError(f"message length {length} is outside 1-{self._max} bytes")
            end = offset + 4 + length
            if end > len(buf):
                break
            try:
                msg = Msg(kind)
            except ValueError:
                raise WireError(f"unknown message type {kind}") from None
            body = bytes(buf[offset + _PREFIX.size : end])
            offset = end
            out.append(Message(msg, body))
        del buf[:offset]
        return out
