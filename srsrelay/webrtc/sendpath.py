"""The one send path: every UDP datagram the relay emits leaves through `SendPath.send`.

`send` calls ``sendto`` on a non-blocking socket and never buffers: a datagram the
kernel will not take right now is dropped and counted. Every outcome is counted per
viewer and per traffic kind, and once more in the path's global counters.
"""

from __future__ import annotations

import enum
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MAX_ERRNOS = 16
"""Distinct errno values tracked per counters object; later ones are lumped under 0."""
LOG_INTERVAL = 1.0
"""Seconds between two drop/error summary log lines of one counters object."""


class TrafficKind(enum.Enum):
    MEDIA = "media"
    RETRANSMIT = "retransmit"
    RTCP = "rtcp"
    DTLS = "dtls"
    STUN = "stun"


class SendOutcome(enum.Enum):
    SENT = "sent"
    DROPPED_WOULD_BLOCK = "dropped_would_block"
    """The socket buffer is full (EAGAIN)."""
    DROPPED_NO_BUFFER = "dropped_no_buffer"
    """The kernel has no buffer memory (ENOBUFS)."""
    ERROR = "error"
    """Any other OSError; its errno is counted."""


_DROP_WORDS = {
    SendOutcome.DROPPED_WOULD_BLOCK: "would block",
    SendOutcome.DROPPED_NO_BUFFER: "no buffer",
    SendOutcome.ERROR: "send error",
}


@dataclass(slots=True)
class KindCounters:
    """Counts for one traffic kind; attempted == sent + dropped + errors."""

    attempted: int = 0
    """Datagrams handed to `SendPath.send`."""
    sent: int = 0
    """Datagrams the kernel accepted."""
    dropped_would_block: int = 0
    """Datagrams dropped because the socket buffer was full."""
    dropped_no_buffer: int = 0
    """Datagrams dropped because the kernel had no buffer memory."""
    errors: int = 0
    """Datagrams that failed with another OSError."""
    bytes_sent: int = 0
    """Payload bytes of the sent datagrams."""

    def as_dict(self) -> dict[str, int]:
        return {
            "attempted": self.attempted,
            "sent": self.sent,
            "dropped_would_block": self.dropped_would_block,
            "dropped_no_buffer": self.dropped_no_buffer,
            "errors": self.errors,
            "bytes_sent": self.bytes_sent,
        }


class SendCounters:
    """Send outcomes of one viewer (or of the whole server), per traffic kind.

    Drops and errors are also accumulated for a summary log line written at most
    once per `LOG_INTERVAL`.
    """

    def __init__(
        self, name: str, clock: Callable[[], float] = time.monotonic, log_drops: bool = True
    ) -> None:
        self.name = name
        self._log_drops = log_drops
        self.kinds: dict[TrafficKind, KindCounters] = {k: KindCounters() for k in TrafficKind}
        self.errors_by_errno: dict[int, int] = {}
        """errno -> count, at most MAX_ERRNOS keys; 0 collects the rest."""
        self._clock = clock
        self._pending: dict[tuple[TrafficKind, SendOutcome], int] = {}
        self._last_log = -LOG_INTERVAL
        self.log_lines = 0
        """Summary lines written so far."""

    def record(self, kind: TrafficKind, outcome: SendOutcome, size: int, err: int = 0) -> None:
        c = self.kinds[kind]
        c.attempted += 1
        if outcome is SendOutcome.SENT:
            c.sent += 1
            c.bytes_sent += size
            return
        if outcome is SendOutcome.DROPPED_WOULD_BLOCK:
            c.dropped_would_block += 1
        elif outcome is SendOutcome.DROPPED_NO_BUFFER:
            c.dropped_no_buffer += 1
        else:
            c.errors += 1
            key = (
                err if err in self.errors_by_errno or len(self.errors_by_errno) < MAX_ERRNOS else 0
            )
            self.errors_by_errno[key] = self.errors_by_errno.get(key, 0) + 1
        if not self._log_drops:
            return
        pending_key = (kind, outcome)
        self._pending[pending_key] = self._pending.get(pending_key, 0) + 1
        self.flush_log()

    def flush_log(self) -> None:
        """Log the drops/errors counted since the last line, if LOG_INTERVAL has passed."""
        if not self._pending:
            return
        now = self._clock()
        if now - self._last_log < LOG_INTERVAL:
            return
        self._last_log = now
        parts = [
            f"dropped {count} {kind.value} datagrams ({_DROP_WORDS[outcome]})"
            for (kind, outcome), count in self._pending.items()
        ]
        self._pending.clear()
        self.log_lines += 1
        log.warning(f"viewer {self.name}: " + ", ".join(parts), viewer=self.name)

    def snapshot(self) -> dict[str, Any]:
        return {
            "kinds": {k.value: c.as_dict() for k, c in self.kinds.items()},
            "errors_by_errno": {
                (errno.errorcode.get(e, str(e)) if e else "other"): n
                for e, n in self.errors_by_errno.items()
            },
        }


class SendPath:
    """Sends datagrams on one non-blocking UDP socket, counting every outcome.

    Never raises to callers and never buffers. A later prioritised queue drained by
    ``loop.add_writer`` belongs in `send`, which stays the only caller of ``sendto``.
    """

    def __init__(self, sock: socket.socket, counters: SendCounters | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.counters = counters if counters is not None else SendCounters("all", log_drops=False)
        """Counts over all viewers."""

    def send(
        self,
        data: bytes,
        addr: tuple[str, int],
        kind: TrafficKind,
        counters: SendCounters,
    ) -> SendOutcome:
        err = 0
        try:
            self._sock.sendto(data, addr)
            outcome = SendOutcome.SENT
        except BlockingIOError:
            outcome = SendOutcome.DROPPED_WOULD_BLOCK
        except OSError as exc:
            err = exc.errno or 0
            outcome = SendOutcome.DROPPED_NO_BUFFER if err == errno.ENOBUFS else SendOutcome.ERROR
        size = len(data)
        counters.record(kind, outcome, size, err)
        if counters is not self.counters:
            self.counters.record(kind, outcome, size, err)
        return outcome
