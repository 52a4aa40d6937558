"""A minimal RTMP publisher for tests: sends whatever media messages a case needs,
including recorded FLV files replayed in real time."""

from __future__ import annotations

import socket
import threading
import time

from srsrelay.rtmp import amf0
from srsrelay.rtmp.chunk import ChunkWriter, MessageType
from srsrelay.rtmp.flvwrite import TAG_AUDIO, TAG_VIDEO, read_flv

CHUNK_SIZE = 60_000
CSID_COMMAND = 3
CSID_STREAM_COMMAND = 8
CSID_AUDIO = 4
CSID_VIDEO = 6
MEDIA_STREAM_ID = 1
REPLY_LIMIT = 1 << 20
"""Most reply bytes kept while waiting for the publish to start."""


class RawPublisher:
    """A minimal RTMP publisher that sends whatever media messages a case needs."""

    def __init__(self, port: int, app: str, name: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        host, local_port = self.sock.getsockname()[:2]
        self.peer = f"{host}:{local_port}"
        """How the relay's log names this connection."""
        self.writer = ChunkWriter()
        self.sent_tags = 0
        self._handshake()
        self._start_publish(port, app, name)

    def _handshake(self) -> None:
        self.sock.sendall(b"\x03" + bytes(1536))  # C0 + C1
        received = self._recv_at_least(1 + 1536 * 2, b"")
        self.sock.sendall(received[1 : 1 + 1536])  # C2 echoes S1

    def _recv_at_least(self, size: int, received: bytes) -> bytes:
        while len(received) < size:
            chunk = self.sock.recv(65536)
            assert chunk, "relay closed the connection during the handshake"
            received += chunk
        return received

    def _send(self, csid: int, msg_type: int, stream_id: int, ts: int, payload: bytes) -> None:
        self.sock.sendall(self.writer.write(csid, msg_type, stream_id, ts, payload))

    def _start_publish(self, port: int, app: str, name: str) -> None:
        self._send(2, MessageType.SET_CHUNK_SIZE, 0, 0, CHUNK_SIZE.to_bytes(4, "big"))
        self.writer.chunk_size = CHUNK_SIZE
        connect = amf0.encode(
            "connect",
            1.0,
            {"app": app, "type": "nonprivate", "tcUrl": f"rtmp://127.0.0.1:{port}/{app}"},
        )
        self._send(CSID_COMMAND, MessageType.AMF0_COMMAND, 0, 0, connect)
        create = amf0.encode("createStream", 2.0, None)
        self._send(CSID_COMMAND, MessageType.AMF0_COMMAND, 0, 0, create)
        publish = amf0.encode("publish", 3.0, None, name, "live")
        self._send(CSID_STREAM_COMMAND, MessageType.AMF0_COMMAND, MEDIA_STREAM_ID, 0, publish)
        # Replies are read loosely: enough to know the publish started.
        replies = b""
        while b"NetStream.Publish.Start" not in replies:
            chunk = self.sock.recv(65536)
            assert chunk, f"relay closed before the publish started: {replies!r}"
            replies = (replies + chunk)[-REPLY_LIMIT:]

    def video(self, ts: int, body: bytes) -> None:
        self._send(CSID_VIDEO, MessageType.VIDEO, MEDIA_STREAM_ID, ts, body)
        self.sent_tags += 1

    def audio(self, ts: int, body: bytes) -> None:
        self._send(CSID_AUDIO, MessageType.AUDIO, MEDIA_STREAM_ID, ts, body)
        self.sent_tags += 1

    def closed_by_relay(self, timeout: float) -> bool:
        """True when the relay closes the connection within `timeout` seconds."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def replay_flv(
    pub: RawPublisher, flv: bytes, seconds: float, stop: threading.Event | None = None
) -> int:
    """Send the audio and video tags of an FLV file in real time, looped with continuous
    timestamps, for `seconds` or until `stop` is set. Returns the tags sent."""
    tags = [(kind, ts, body) for kind, ts, body in read_flv(flv) if kind in (TAG_AUDIO, TAG_VIDEO)]
    assert tags, "the FLV file has no audio or video tags"
    first = min(ts for _, ts, _ in tags)
    length = max(ts for _, ts, _ in tags) - first + 40
    started = time.monotonic()
    offset = 0
    sent = 0
    while True:
        for kind, ts, body in tags:
            if offset and _is_sequence_header(kind, body):
                continue  # sequence headers once, at the start
            at = offset + ts - first
            delay = started + at / 1000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() - started > seconds or (stop is not None and stop.is_set()):
                return sent
            (pub.video if kind == TAG_VIDEO else pub.audio)(at, body)
            sent += 1
        offset += length


def _is_sequence_header(kind: int, body: bytes) -> bool:
    if kind == TAG_AUDIO:
        return len(body) > 1 and body[1] == 0
    if body and body[0] & 0x80:
        return body[0] & 0x0F == 0  # enhanced RTMP SequenceStart
    return len(body) > 1 and body[1] == 0
