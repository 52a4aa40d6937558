"""Server side of the RTMP handshake (RTMP specification 1.0, section 5.2).

We answer with the simple handshake: S1 carries our time, a zero version field and
random bytes; S2 echoes C1. Clients that send a digest C1 (Flash, OBS, ffmpeg) accept
this because a zero version field in S1 tells them not to look for a server digest.
C2 is read and ignored.
"""

from __future__ import annotations

import enum
import os
import struct

RTMP_VERSION = 3
HANDSHAKE_SIZE = 1536
"""Size of C1/C2/S1/S2 (section 5.2.3)."""

_KNOWN_VERSIONS = {
    6: "RTMPE (encrypted RTMP), which this server does not support",
    0x16: "a TLS handshake; use rtmp:// rather than rtmps://",
    ord("G"): "an HTTP request; RTMP clients must use rtmp:// on this port",
    ord("P"): "an HTTP request; RTMP clients must use rtmp:// on this port",
}


class HandshakeError(ValueError):
    """The client's handshake is not RTMP version 3."""


class HandshakeState(enum.Enum):
    WAIT_C0C1 = "wait_c0c1"
    WAIT_C2 = "wait_c2"
    DONE = "done"


class ServerHandshake:
    """Feed client bytes; collect S0/S1/S2 from `data_to_send()`.

    Once `state` is DONE, `receive` returns the bytes that followed C2 (the
    first chunks), which belong to the chunk stream.
    """

    def __init__(self, epoch_ms: int = 0, random_bytes: bytes | None = None) -> None:
        if random_bytes is None:
            random_bytes = os.urandom(HANDSHAKE_SIZE - 8)
        if len(random_bytes) != HANDSHAKE_SIZE - 8:
            raise ValueError(f"S1 random part must be {HANDSHAKE_SIZE - 8} bytes")
        self._s1 = struct.pack(">II", epoch_ms & 0xFFFFFFFF, 0) + random_bytes
        self._buf = bytearray()
        self._out = bytearray()
        self.state = HandshakeState.WAIT_C0C1

    def receive(self, data: bytes) -> bytes:
        """Consume handshake bytes; return any bytes past the end of C2."""
        if self.state is HandshakeState.DONE:
            return data
        self._buf += data
        if self.state is HandshakeState.WAIT_C0C1:
            if not self._buf:
                return b""
            version = self._buf[0]
            if version != RTMP_VERSION:
                hint = _KNOWN_VERSIONS.get(version, "not an RTMP client")
                raise HandshakeError(
                    f"unsupported RTMP version 0x{version:02x} in C0, expected 0x03 ({hint})"
                )
            if len(self._buf) < 1 + HANDSHAKE_SIZE:
                return b""
            c1 = bytes(self._buf[1 : 1 + HANDSHAKE_SIZE])
            del self._buf[: 1 + HANDSHAKE_SIZE]
            # S2 echoes C1 whole: time, time2 and random (section 5.2.4).
            self._out += bytes([RTMP_VERSION]) + self._s1 + c1
            self.state = HandshakeState.WAIT_C2
        if self.state is HandshakeState.WAIT_C2:
            if len(self._buf) < HANDSHAKE_SIZE:
                return b""
            rest = bytes(self._buf[HANDSHAKE_SIZE:])
            self._buf.clear()
            self.state = HandshakeState.DONE
            return rest
        return b""

    def data_to_send(self) -> bytes:
        """Bytes to write to the client (S0+S1+S2 once C0+C1 are in)."""
        out = bytes(self._out)
        self._out.clear()
        return out
