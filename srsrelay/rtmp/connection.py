"""Sans-I/O RTMP server connection: handshake, chunk stream, NetConnection/NetStream commands.

Feed bytes with `receive_data(data, now)`, act on the returned events, write
`data_to_send()` to the client. Protocol violations do not raise: they are returned as a
ProtocolError event (after PublishEnded if a publish was live) and the connection turns
CLOSED; the caller should flush `data_to_send()` and close the socket.

Publishing: on PublishRequested the caller answers with `accept_publish()` or
`reject_publish(code, description)`. Events of one `receive_data` call are computed
before the caller answers, so media may follow PublishRequested in the same list.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import structlog

from srsrelay.config import RtmpConfig
from srsrelay.rtmp import amf0
from srsrelay.rtmp.amf0 import UNDEFINED, Amf0Error, Amf0Value
from srsrelay.rtmp.chunk import (
    AckTracker,
    ChunkError,
    ChunkReader,
    ChunkWriter,
    MessageType,
    RtmpMessage,
)
from srsrelay.rtmp.handshake import HandshakeError, HandshakeState, ServerHandshake

log = structlog.get_logger(__name__)

CSID_CONTROL = 2
"""Chunk stream for protocol control messages (section 5.4)."""
CSID_COMMAND = 3
"""Chunk stream for NetConnection command replies."""
CSID_STREAM = 5
"""Chunk stream for NetStream status messages."""
PEER_BANDWIDTH_DYNAMIC = 2
USER_CONTROL_STREAM_BEGIN = 0
USER_CONTROL_PING_REQUEST = 6
USER_CONTROL_PING_RESPONSE = 7
FMS_VERSION = "FMS/3,5,3,888"
CAPABILITIES = 127.0
MAX_WRITE_BUFFER = 1024 * 1024
"""Most reply bytes we queue for a client that does not read; more is a protocol error."""

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_WRAP = 1 << 32


class ConnectionState(enum.Enum):
    HANDSHAKE = "handshake"
    WAIT_CONNECT = "wait_connect"
    CONNECTED = "connected"
    PUBLISH_PENDING = "publish_pending"
    PUBLISHING = "publishing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Connected:
    """The client sent `connect` and we accepted it."""

    app: str
    """Application name from the connect command (query string removed)."""
    tc_url: str
    """tcUrl the client announced (may be empty)."""


@dataclass(frozen=True, slots=True)
class PublishRequested:
    """The client wants to publish; answer with accept_publish() or reject_publish()."""

    app: str
    """Application name (from connect)."""
    stream_name: str
    """Stream name from the publish command, without its query string."""
    query: str
    """Query string after '?' in the stream name (and in the app, joined by '&'); may be empty."""


@dataclass(frozen=True, slots=True)
class PublishEnded:
    """The publish that was requested or live is over."""

    stream_name: str
    """Stream name of the ended publish."""
    reason: str
    """FCUnpublish, deleteStream, closeStream, disconnected or a protocol error."""


@dataclass(frozen=True, slots=True)
class PlayRejected:
    """The client asked to play; we refused (egress is WebRTC only)."""

    stream_name: str
    """Stream name the client asked for."""


@dataclass(frozen=True, slots=True)
class MetadataReceived:
    """onMetaData (directly or via @setDataFrame) from the publisher."""

    metadata: dict[str, object]
    """The metadata object, e.g. width, height, framerate, videocodecid."""


@dataclass(frozen=True, slots=True)
class MediaReceived:
    """An audio or video message: the body of an FLV audio/video tag."""

    kind: str
    """"audio" or "video"."""
    timestamp_ms: int
    """Milliseconds, unwrapped past 2**32 so it keeps increasing."""
    body: bytes
    """FLV tag body (codec header byte(s) included)."""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The client broke the protocol; the connection is now CLOSED."""

    kind: str
    """handshake, chunk, size, amf or command."""
    message: str
    """What was wrong, for the log."""


Event = (
    Connected
    | PublishRequested
    | PublishEnded
    | PlayRejected
    | MetadataReceived
    | MediaReceived
    | ProtocolError
)


class _CommandError(Exception):
    """A command arrived out of order or malformed."""


class _TimestampUnwrapper:
    """Extends 32-bit RTMP timestamps past the wrap; small steps backwards stay backwards."""

    def __init__(self) -> None:
        self._last: int | None = None

    def unwrap(self, timestamp: int) -> int:
        if self._last is None:
            self._last = timestamp
            return timestamp
        step = (timestamp - self._last + (_WRAP >> 1)) % _WRAP - (_WRAP >> 1)
        self._last += step
        return self._last


def _split_query(value: str) -> tuple[str, str]:
    name, _, query = value.partition("?")
    return name.strip("/"), query


class RtmpConnection:
    """Server side of one RTMP connection, without I/O."""

    def __init__(self, config: RtmpConfig, *, handshake_random: bytes | None = None) -> None:
        self._config = config
        self._handshake = ServerHandshake(random_bytes=handshake_random)
        self._reader = ChunkReader(config.max_message_size)
        self._writer = ChunkWriter()
        self._ack = AckTracker()
        self._unwrapper = _TimestampUnwrapper()
        self._out = bytearray()
        self._state = ConnectionState.HANDSHAKE
        self._app = ""
        self._app_query = ""
        self._next_stream_id = 1
        self._publish_name = ""
        self._publish_stream_id = 0
        self.last_receive = 0.0
        """`now` of the latest receive_data call."""

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def app(self) -> str:
        return self._app

    def _set_state(self, state: ConnectionState) -> None:
        log.debug("rtmp connection state", old=self._state.value, new=state.value)
        self._state = state

    # --- public API -------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Consume bytes from the client; return what happened."""
        events: list[Event] = []
        if self._state is ConnectionState.CLOSED:
            return events
        self.last_receive = now
        try:
            ack = self._ack.on_bytes(len(data))
            if self._state is ConnectionState.HANDSHAKE:
                data = self._handshake.receive(data)
                self._out += self._handshake.data_to_send()
                if self._handshake.state is not HandshakeState.DONE:
                    return events
                self._set_state(ConnectionState.WAIT_CONNECT)
            if data:
                for msg in self._reader.feed(data):
                    self._handle_message(msg, events)
            if ack is not None:
                self._send(CSID_CONTROL, MessageType.ACKNOWLEDGEMENT, 0, _U32.pack(ack))
            if len(self._out) > MAX_WRITE_BUFFER:
                self._fail(events, "size", "client does not read our replies")
        except HandshakeError as exc:
            self._fail(events, "handshake", str(exc))
        except ChunkError as exc:
            self._fail(events, exc.kind, str(exc))
        except Amf0Error as exc:
            self._fail(events, "amf", str(exc))
        except _CommandError as exc:
            self._fail(events, "command", str(exc))
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write to the client; empties the buffer."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def accept_publish(self) -> None:
        """Answer PublishRequested: send NetStream.Publish.Start."""
        if self._state is not ConnectionState.PUBLISH_PENDING:
            raise RuntimeError(f"accept_publish in state {self._state.value}")
        sid = self._publish_stream_id
        self._send(
            CSID_CONTROL,
            MessageType.USER_CONTROL,
            0,
            _U16.pack(USER_CONTROL_STREAM_BEGIN) + _U32.pack(sid),
        )
        self._on_status(
            sid, "status", "NetStream.Publish.Start", f"{self._publish_name} is now published."
        )
        self._set_state(ConnectionState.PUBLISHING)

    def reject_publish(self, code: str, description: str) -> None:
        """Answer PublishRequested with an error status, e.g. NetStream.Publish.BadName."""
        if self._state is not ConnectionState.PUBLISH_PENDING:
            raise RuntimeError(f"reject_publish in state {self._state.value}")
        self._on_status(self._publish_stream_id, "error", code, description)
        self._set_state(ConnectionState.CONNECTED)

    def close(self, reason: str) -> list[Event]:
        """The socket is closing (EOF, timeout, kick, shutdown)."""
        events: list[Event] = []
        if self._state in (ConnectionState.PUBLISH_PENDING, ConnectionState.PUBLISHING):
            events.append(PublishEnded(self._publish_name, reason))
        if self._state is not ConnectionState.CLOSED:
            self._set_state(ConnectionState.CLOSED)
        return events

    # --- internals --------------------------------------------------------------------------

    def _fail(self, events: list[Event], kind: str, message: str) -> None:
        events.extend(self.close(f"protocol error: {message}"))
        events.append(ProtocolError(kind, message))

    def _send(self, csid: int, msg_type: int, stream_id: int, payload: bytes) -> None:
        self._out += self._writer.write(csid, msg_type, stream_id, 0, payload)

    def _send_command(self, csid: int, stream_id: int, *values: Amf0Value) -> None:
        self._send(csid, MessageType.AMF0_COMMAND, stream_id, amf0.encode(*values))

    def _on_status(self, stream_id: int, level: str, code: str, description: str) -> None:
        info: dict[str, Amf0Value] = {"level": level, "code": code, "description": description}
        self._send_command(CSID_STREAM, stream_id, "onStatus", 0.0, None, info)

    def _handle_message(self, msg: RtmpMessage, events: list[Event]) -> None:
        msg_type = msg.msg_type
        if msg_type == MessageType.VIDEO or msg_type == MessageType.AUDIO:
            if msg.payload and self._state in (
                ConnectionState.PUBLISH_PENDING,
                ConnectionState.PUBLISHING,
            ):
                kind = "video" if msg_type == MessageType.VIDEO else "audio"
                timestamp = self._unwrapper.unwrap(msg.timestamp)
                events.append(MediaReceived(kind, timestamp, msg.payload))
        elif msg_type == MessageType.AMF0_COMMAND or msg_type == MessageType.AMF3_COMMAND:
            self._handle_command(msg, _amf0_body(msg), events)
        elif msg_type == MessageType.AMF0_DATA or msg_type == MessageType.AMF3_DATA:
            self._handle_data(_amf0_body(msg), events)
        elif msg_type == MessageType.WINDOW_ACK_SIZE:
            if len(msg.payload) < 4:
                raise ChunkError("chunk", "Window Acknowledgement Size message shorter than 4")
            self._ack.window = _U32.unpack_from(msg.payload)[0]
        elif msg_type == MessageType.USER_CONTROL:
            payload = msg.payload
            if len(payload) >= 6 and _U16.unpack_from(payload)[0] == USER_CONTROL_PING_REQUEST:
                self._send(
                    CSID_CONTROL,
                    MessageType.USER_CONTROL,
                    0,
                    _U16.pack(USER_CONTROL_PING_RESPONSE) + payload[2:6],
                )
        # Set Chunk Size and Abort were applied by the reader; Acknowledgement and Set Peer
        # Bandwidth from a publisher need no action.

    def _handle_data(self, body: bytes, events: list[Event]) -> None:
        if self._state not in (ConnectionState.PUBLISH_PENDING, ConnectionState.PUBLISHING):
            return
        values = amf0.decode_all(body)
        if values and values[0] == "@setDataFrame":
            values = values[1:]
        if len(values) >= 2 and values[0] == "onMetaData" and isinstance(values[1], dict):
            events.append(MetadataReceived(dict(values[1])))

    def _handle_command(self, msg: RtmpMessage, body: bytes, events: list[Event]) -> None:
        values = amf0.decode_all(body)
        if not values or not isinstance(values[0], str):
            raise _CommandError("command message does not start with a command name")
        name = values[0]
        txn = values[1] if len(values) > 1 and isinstance(values[1], float) else 0.0
        args = values[3:]
        state = self._state
        if name == "connect":
            if state is not ConnectionState.WAIT_CONNECT:
                raise _CommandError("connect received twice")
            command = values[2] if len(values) > 2 and isinstance(values[2], dict) else {}
            self._connect(txn, command, events)
            return
        if state is ConnectionState.WAIT_CONNECT:
            raise _CommandError(f"{name} received before connect")
        if name in ("releaseStream", "FCPublish"):
            self._result(txn, None, UNDEFINED)
        elif name == "createStream":
            stream_id = self._next_stream_id
            self._next_stream_id += 1
            self._result(txn, None, float(stream_id))
        elif name == "publish":
            self._publish(msg.stream_id, args, events)
        elif name in ("FCUnpublish", "deleteStream", "closeStream"):
            if state in (ConnectionState.PUBLISH_PENDING, ConnectionState.PUBLISHING):
                events.append(PublishEnded(self._publish_name, name))
                self._set_state(ConnectionState.CONNECTED)
            if name == "FCUnpublish":
                self._result(txn, None, UNDEFINED)
        elif name == "play":
            stream_name = args[0] if args and isinstance(args[0], str) else ""
            self._on_status(
                msg.stream_id,
                "error",
                "NetStream.Play.Failed",
                "this server does not play RTMP; watch the stream over WebRTC (WHEP)",
            )
            events.append(PlayRejected(stream_name))
        elif name in ("_result", "_error", "onStatus", "onBWDone", "_checkbw"):
            pass
        else:
            self._error(txn, f"unknown command {name}")

    def _connect(self, txn: float, command: dict[str, Amf0Value], events: list[Event]) -> None:
        app = command.get("app")
        tc_url = command.get("tcUrl")
        encoding = command.get("objectEncoding")
        self._app, self._app_query = _split_query(app if isinstance(app, str) else "")
        window = self._config.window_ack_size
        self._send(CSID_CONTROL, MessageType.WINDOW_ACK_SIZE, 0, _U32.pack(window))
        self._send(
            CSID_CONTROL,
            MessageType.SET_PEER_BANDWIDTH,
            0,
            _U32.pack(window) + bytes([PEER_BANDWIDTH_DYNAMIC]),
        )
        chunk_size = self._config.chunk_size
        self._send(CSID_CONTROL, MessageType.SET_CHUNK_SIZE, 0, _U32.pack(chunk_size))
        self._writer.chunk_size = chunk_size
        properties: dict[str, Amf0Value] = {
            "fmsVer": FMS_VERSION,
            "capabilities": CAPABILITIES,
            "mode": 1.0,
        }
        info: dict[str, Amf0Value] = {
            "level": "status",
            "code": "NetConnection.Connect.Success",
            "description": "Connection succeeded.",
            "objectEncoding": encoding if isinstance(encoding, float) else 0.0,
        }
        self._send_command(CSID_COMMAND, 0, "_result", txn, properties, info)
        self._set_state(ConnectionState.CONNECTED)
        events.append(Connected(self._app, tc_url if isinstance(tc_url, str) else ""))

    def _publish(self, stream_id: int, args: list[Amf0Value], events: list[Event]) -> None:
        if self._state is not ConnectionState.CONNECTED:
            raise _CommandError(f"publish while already publishing {self._publish_name!r}")
        raw = args[0] if args and isinstance(args[0], str) else ""
        stream_name, query = _split_query(raw)
        if not stream_name:
            description = "publish without a stream name; use rtmp://host/app/stream"
            self._on_status(stream_id, "error", "NetStream.Publish.BadName", description)
            raise _CommandError(description)
        self._publish_name = stream_name
        self._publish_stream_id = stream_id
        self._set_state(ConnectionState.PUBLISH_PENDING)
        joined = "&".join(q for q in (self._app_query, query) if q)
        events.append(PublishRequested(self._app, stream_name, joined))

    def _result(self, txn: float, properties: Amf0Value, info: Amf0Value) -> None:
        if txn:
            self._send_command(CSID_COMMAND, 0, "_result", txn, properties, info)

    def _error(self, txn: float, description: str) -> None:
        if txn:
            info: dict[str, Amf0Value] = {
                "level": "error",
                "code": "NetConnection.Call.Failed",
                "description": description,
            }
            self._send_command(CSID_COMMAND, 0, "_error", txn, None, info)


def _amf0_body(msg: RtmpMessage) -> bytes:
    """Body of a command/data message as AMF0 (AMF3 types start with a 0x00 format byte)."""
    payload = msg.payload
    if msg.msg_type in (MessageType.AMF3_COMMAND, MessageType.AMF3_DATA) and payload[:1] == b"\0":
        return payload[1:]
    return payload
