"""The one send path: every UDP datagram the relay emits leaves through `SendPath.send`.

`send` calls ``sendto`` on a non-blocking socket. When the kernel refuses a datagram
(EAGAIN) the path becomes *blocked* and registers ``loop.add_writer``: until the socket
is writable again, media and retransmissions are dropped without a syscall, while
STUN, DTLS and RTCP wait in a small bounded priority queue that is sent first once the
socket drains. Nothing else is ever buffered.

Every outcome is counted per viewer and per traffic kind, and once more in the path's
global counters. At any moment, per kind::

    attempted == sent + dropped (all reasons) + errors + queued

where ``queued`` is the number of datagrams currently held in the control queue; a
queued datagram is resolved later to sent, dropped or error.

With ``IP_RECVERR`` on, ICMP errors (e.g. port unreachable from a vanished viewer) land
in the socket's error queue. epoll reports such a socket readable/erroneous until the
queue is empty, so `drain_errqueue` must run on every read wakeup.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import socket
import struct
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
CONTROL_QUEUE = 256
"""Default bound of the control queue, datagrams (config: rtc.control_queue)."""
MAX_ERRQUEUE_PER_DRAIN = 64
"""Error-queue messages read per `drain_errqueue` call; the rest wait for the next wakeup."""

# Linux values; Python 3.11 does not export them (uapi/linux/in.h, in6.h, socket.h).
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")
"""struct sock_extended_err: ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data."""
_ERRQUEUE_ANC_SIZE = socket.CMSG_SPACE(_SOCK_EXTENDED_ERR.size + 28)  # + sockaddr_in6
_ASYNC_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EPROTO}
)
"""Errors that an ICMP message for an earlier datagram (to any peer) leaves pending on the
socket: the next sendto reports it instead of sending. Drain the error queue and retry."""


class TrafficKind(enum.Enum):
    MEDIA = "media"
    RETRANSMIT = "retransmit"
    RTCP = "rtcp"
    DTLS = "dtls"
    STUN = "stun"

    # Members are singletons compared by identity: hash them by identity too, in C,
    # rather than Enum's hash(name) in Python (a dict lookup per datagram sent).
    __hash__ = object.__hash__


CONTROL_PRIORITY = (TrafficKind.STUN, TrafficKind.DTLS, TrafficKind.RTCP)
"""Kinds held in the control queue while the socket is blocked, highest priority first:
STUN keeps ICE consent alive, DTLS completes handshakes, RTCP carries reports."""


class SendOutcome(enum.Enum):
    SENT = "sent"
    QUEUED = "queued"
    """Held in the control queue; resolved later to one of the other outcomes."""
    DROPPED_WOULD_BLOCK = "dropped_would_block"
    """The socket buffer is full (EAGAIN), or the path is blocked and this is media."""
    DROPPED_NO_BUFFER = "dropped_no_buffer"
    """The kernel has no buffer memory (ENOBUFS)."""
    DROPPED_QUEUE_FULL = "dropped_queue_full"
    """Evicted from (or refused by) the full control queue."""
    DROPPED_CLOSED = "dropped_closed"
    """Sent after, or still queued at, `SendPath.close`."""
    ERROR = "error"
    """Any other OSError; its errno is counted."""

    __hash__ = object.__hash__  # see TrafficKind


_SENT = SendOutcome.SENT
_SENT_NO_ERROR = (_SENT, 0)
"""What `_sendto` returns for a datagram the kernel took (one tuple for all of them)."""

_DROP_WORDS = {
    SendOutcome.DROPPED_WOULD_BLOCK: "would block",
    SendOutcome.DROPPED_NO_BUFFER: "no buffer",
    SendOutcome.DROPPED_QUEUE_FULL: "control queue full",
    SendOutcome.DROPPED_CLOSED: "send path closed",
    SendOutcome.ERROR: "send error",
}


@dataclass(slots=True)
class KindCounters:
    """Counts for one traffic kind; attempted == sent + dropped + errors + queued."""

    attempted: int = 0
    """Datagrams handed to `SendPath.send`."""
    sent: int = 0
    """Datagrams the kernel accepted."""
    queued: int = 0
    """Datagrams held in the control queue right now (not yet resolved)."""
    dropped_would_block: int = 0
    """Datagrams dropped because the socket buffer was full."""
    dropped_no_buffer: int = 0
    """Datagrams dropped because the kernel had no buffer memory."""
    dropped_queue_full: int = 0
    """Control datagrams dropped because the control queue was full."""
    dropped_closed: int = 0
    """Datagrams dropped because the send path was closed."""
    errors: int = 0
    """Datagrams that failed with another OSError."""
    bytes_sent: int = 0
    """Payload bytes of the sent datagrams."""

    @property
    def dropped(self) -> int:
        return (
            self.dropped_would_block
            + self.dropped_no_buffer
            + self.dropped_queue_full
            + self.dropped_closed
        )

    def balanced(self) -> bool:
        """The outcome invariant: every attempt is sent, dropped, failed or still queued."""
        return self.attempted == self.sent + self.dropped + self.errors + self.queued

    def as_dict(self) -> dict[str, int]:
        return {
            "attempted": self.attempted,
            "sent": self.sent,
            "queued": self.queued,
            "dropped_would_block": self.dropped_would_block,
            "dropped_no_buffer": self.dropped_no_buffer,
            "dropped_queue_full": self.dropped_queue_full,
            "dropped_closed": self.dropped_closed,
            "errors": self.errors,
            "bytes_sent": self.bytes_sent,
        }


def _count_errno(table: dict[int, int], err: int) -> None:
    key = err if err in table or len(table) < MAX_ERRNOS else 0
    table[key] = table.get(key, 0) + 1


def _errno_names(table: dict[int, int]) -> dict[str, int]:
    return {(errno.errorcode.get(e, str(e)) if e else "other"): n for e, n in table.items()}


class SendCounters:
    """Send outcomes of one viewer (or of the whole server), per traffic kind.

    Drops and errors are also accumulated for a summary log line written at most
    once per `LOG_INTERVAL`; `flush_log` writes what is pending once the interval
    has passed, so call it periodically.
    """

    def __init__(
        self, name: str, clock: Callable[[], float] = time.monotonic, log_drops: bool = True
    ) -> None:
        self.name = name
        self._log_drops = log_drops
        self.kinds: dict[TrafficKind, KindCounters] = {k: KindCounters() for k in TrafficKind}
        self.errors_by_errno: dict[int, int] = {}
        """errno -> count, at most MAX_ERRNOS keys; 0 collects the rest."""
        self.icmp_errors = 0
        """Error-queue messages (ICMP errors) about datagrams sent to this viewer."""
        self._clock = clock
        self._pending: dict[tuple[TrafficKind, SendOutcome], int] = {}
        self._last_log = -LOG_INTERVAL
        self.log_lines = 0
        """Summary lines written so far."""

    def balanced(self) -> bool:
        return all(c.balanced() for c in self.kinds.values())

    def record(self, kind: TrafficKind, outcome: SendOutcome, size: int, err: int = 0) -> None:
        """Count one attempt and its outcome (QUEUED: to be `resolve`d later)."""
        c = self.kinds[kind]
        c.attempted += 1
        if outcome is SendOutcome.QUEUED:
            c.queued += 1
            return
        self._count(c, kind, outcome, size, err)

    def resolve(self, kind: TrafficKind, outcome: SendOutcome, size: int, err: int = 0) -> None:
        """Turn one QUEUED datagram of `kind` into its final outcome."""
        c = self.kinds[kind]
        c.queued -= 1
        self._count(c, kind, outcome, size, err)

    def _count(
        self, c: KindCounters, kind: TrafficKind, outcome: SendOutcome, size: int, err: int
    ) -> None:
        if outcome is SendOutcome.SENT:
            c.sent += 1
            c.bytes_sent += size
            return
        if outcome is SendOutcome.DROPPED_WOULD_BLOCK:
            c.dropped_would_block += 1
        elif outcome is SendOutcome.DROPPED_NO_BUFFER:
            c.dropped_no_buffer += 1
        elif outcome is SendOutcome.DROPPED_QUEUE_FULL:
            c.dropped_queue_full += 1
        elif outcome is SendOutcome.DROPPED_CLOSED:
            c.dropped_closed += 1
        elif outcome is SendOutcome.ERROR:
            c.errors += 1
            _count_errno(self.errors_by_errno, err)
        else:
            raise ValueError(f"{outcome} is not a final send outcome")
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
            "errors_by_errno": _errno_names(self.errors_by_errno),
            "icmp_errors": self.icmp_errors,
        }


@dataclass(slots=True)
class _Queued:
    """A control datagram waiting for the socket to become writable."""

    data: bytes
    """The datagram."""
    addr: tuple[str, int]
    """Its destination."""
    kind: TrafficKind
    """STUN, DTLS or RTCP."""
    counters: SendCounters
    """The viewer's counters, resolved when the datagram leaves the queue (even if the
    viewer has closed meanwhile)."""


CountersFor = Callable[[tuple[str, int]], SendCounters | None]
"""Finds the counters of the viewer at a remote address, for ICMP attribution."""


class SendPath:
    """Sends datagrams on one non-blocking UDP socket, counting every outcome.

    Never raises to callers. `send` is the only caller of ``sendto``. Blocking needs a
    running event loop (for ``add_writer``); without one a refused datagram is simply
    dropped and the path never becomes blocked.
    """

    def __init__(
        self,
        sock: socket.socket,
        counters: SendCounters | None = None,
        *,
        control_queue: int = CONTROL_QUEUE,
        counters_for: CountersFor | None = None,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._sock_sendto = sock.sendto
        self._fd = sock.fileno()
        self.counters = counters if counters is not None else SendCounters("all", log_drops=False)
        """Counts over all viewers."""
        self.control_queue_limit = control_queue
        self._counters_for = counters_for
        # Together bounded by `control_queue` (rtc.control_queue) datagrams: `_enqueue`
        # drops the oldest of the lowest priority once `_queued` reaches it.
        self._queues: dict[TrafficKind, collections.deque[_Queued]] = {
            k: collections.deque() for k in CONTROL_PRIORITY
        }
        self._queued = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._blocked = False
        self._closed = False
        self.times_blocked = 0
        """Transitions into the blocked state."""
        self.queue_high_water = 0
        """Largest control-queue length seen."""
        self.queue_dropped: dict[TrafficKind, int] = {k: 0 for k in CONTROL_PRIORITY}
        """Control datagrams dropped because the queue was full, per kind."""
        self.errqueue_drained = 0
        """Messages read from the socket's error queue."""
        self.icmp_by_errno: dict[int, int] = {}
        """Error-queue messages per errno, at most MAX_ERRNOS keys; 0 collects the rest."""
        self.icmp_unattributed = 0
        """Error-queue messages about an address no viewer has."""
        self._recverr = self._enable_recverr(sock)

    @staticmethod
    def _enable_recverr(sock: socket.socket) -> bool:
        """Queue ICMP errors on the socket (ip(7) IP_RECVERR) instead of losing them."""
        try:
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            elif sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
                try:  # IPv4-mapped peers on a dual-stack socket
                    sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
                except OSError:
                    pass
            else:
                return False
        except OSError:
            return False
        return True

    @property
    def blocked(self) -> bool:
        """The kernel refused a datagram and the socket has not become writable since.

        While blocked, media and retransmissions are dropped without a syscall; senders
        of multi-packet frames should skip whole frames instead.
        """
        return self._blocked

    @property
    def queued(self) -> int:
        """Control datagrams waiting in the queue."""
        return self._queued

    def send(
        self,
        data: bytes,
        addr: tuple[str, int],
        kind: TrafficKind,
        counters: SendCounters,
    ) -> SendOutcome:
        if self._closed or self._blocked:
            return self._send_held(data, addr, kind, counters)
        outcome, err = self._sendto(data, addr)
        if outcome is _SENT:
            # counters.record(kind, SENT, size) and the same for the global counters,
            # inlined: this runs for every packet to every viewer.
            size = len(data)
            c = counters.kinds[kind]
            c.attempted += 1
            c.sent += 1
            c.bytes_sent += size
            if counters is not self.counters:
                c = self.counters.kinds[kind]
                c.attempted += 1
                c.sent += 1
                c.bytes_sent += size
            return _SENT
        if outcome is SendOutcome.DROPPED_WOULD_BLOCK and self._block() and kind in self._queues:
            return self._enqueue(_Queued(data, addr, kind, counters))
        return self._record(counters, kind, outcome, len(data), err)

    def close(self) -> None:
        """Stop sending: drop (and count) what is queued, remove the writer. Idempotent.

        Call before closing the socket; later sends are dropped as DROPPED_CLOSED.
        """
        self._closed = True
        self._unblock()
        for q in self._queues.values():
            while q:
                item = q.popleft()
                self._resolve(item, SendOutcome.DROPPED_CLOSED)
        self._queued = 0

    def drain_errqueue(self) -> int:
        """Read pending error-queue messages (bounded); count and attribute them.

        Returns how many were read. Also clears the socket's pending error, which
        the kernel sets from the oldest queued ICMP error.
        """
        if not self._recverr or self._closed:
            return 0
        drained = 0
        for _ in range(MAX_ERRQUEUE_PER_DRAIN):
            try:
                _, ancdata, _, addr = self._sock.recvmsg(0, _ERRQUEUE_ANC_SIZE, MSG_ERRQUEUE)
            except OSError:  # EAGAIN: the queue is empty
                break
            drained += 1
            err = 0
            for level, type_, cdata in ancdata:
                if (level, type_) in (
                    (socket.SOL_IP, IP_RECVERR),
                    (socket.IPPROTO_IPV6, IPV6_RECVERR),
                ) and len(cdata) >= _SOCK_EXTENDED_ERR.size:
                    err = _SOCK_EXTENDED_ERR.unpack_from(cdata)[0]
            _count_errno(self.icmp_by_errno, err)
            # msg_name is the original destination of the offending datagram (ip(7)).
            viewer = None
            if self._counters_for is not None and isinstance(addr, tuple) and len(addr) >= 2:
                viewer = self._counters_for((str(addr[0]), int(addr[1])))
            if viewer is None:
                self.icmp_unattributed += 1
            else:
                viewer.icmp_errors += 1
        self.errqueue_drained += drained
        return drained

    def stats(self) -> dict[str, Any]:
        return {
            "blocked": self._blocked,
            "times_blocked": self.times_blocked,
            "control_queue": self._queued,
            "control_queue_high_water": self.queue_high_water,
            "control_queue_limit": self.control_queue_limit,
            "control_queue_dropped": {k.value: n for k, n in self.queue_dropped.items()},
            "errqueue_drained": self.errqueue_drained,
            "icmp_errors": _errno_names(self.icmp_by_errno),
            "icmp_unattributed": self.icmp_unattributed,
        }

    # -- internals -------------------------------------------------------------------

    def _send_held(
        self, data: bytes, addr: tuple[str, int], kind: TrafficKind, counters: SendCounters
    ) -> SendOutcome:
        """`send` while closed or blocked: queue control datagrams, drop the rest."""
        size = len(data)
        if self._closed:
            return self._record(counters, kind, SendOutcome.DROPPED_CLOSED, size)
        if kind in self._queues:
            return self._enqueue(_Queued(data, addr, kind, counters))
        return self._record(counters, kind, SendOutcome.DROPPED_WOULD_BLOCK, size)

    def _sendto(
        self, data: bytes, addr: tuple[str, int], retry: bool = True
    ) -> tuple[SendOutcome, int]:
        """The one call of ``sendto``."""
        try:
            self._sock_sendto(data, addr)
            return _SENT_NO_ERROR
        except BlockingIOError:
            return SendOutcome.DROPPED_WOULD_BLOCK, 0
        except OSError as exc:
            err = exc.errno or 0
        if err == errno.ENOBUFS:
            return SendOutcome.DROPPED_NO_BUFFER, err
        if retry and self._recverr and err in _ASYNC_ERRNOS:
            # The error belongs to an earlier datagram; this one was not sent.
            self.drain_errqueue()
            return self._sendto(data, addr, retry=False)
        return SendOutcome.ERROR, err

    def _record(
        self,
        counters: SendCounters,
        kind: TrafficKind,
        outcome: SendOutcome,
        size: int,
        err: int = 0,
    ) -> SendOutcome:
        counters.record(kind, outcome, size, err)
        if counters is not self.counters:
            self.counters.record(kind, outcome, size, err)
        return outcome

    def _resolve(self, item: _Queued, outcome: SendOutcome, err: int = 0) -> None:
        size = len(item.data)
        item.counters.resolve(item.kind, outcome, size, err)
        if item.counters is not self.counters:
            self.counters.resolve(item.kind, outcome, size, err)

    def _enqueue(self, item: _Queued) -> SendOutcome:
        """Queue a control datagram. When full, the oldest datagram of the lowest-priority
        kind present (counting the new one) is dropped: a new STUN reply evicts the oldest
        queued RTCP; a new RTCP with only STUN/DTLS queued is itself dropped."""
        if self._queued >= self.control_queue_limit:
            victim_kind = next(
                k for k in reversed(CONTROL_PRIORITY) if k is item.kind or self._queues[k]
            )
            victims = self._queues[victim_kind]
            self.queue_dropped[victim_kind] += 1
            if not victims:  # only the new datagram is of that kind
                return self._record(
                    item.counters, item.kind, SendOutcome.DROPPED_QUEUE_FULL, len(item.data)
                )
            self._resolve(victims.popleft(), SendOutcome.DROPPED_QUEUE_FULL)
            self._queued -= 1
        self._queues[item.kind].append(item)
        self._queued += 1
        self.queue_high_water = max(self.queue_high_water, self._queued)
        return self._record(item.counters, item.kind, SendOutcome.QUEUED, len(item.data))

    def _block(self) -> bool:
        """Enter the blocked state and wait for writability; False without a loop."""
        if self._blocked:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.add_writer(self._fd, self._on_writable)
        self._loop = loop
        self._blocked = True
        self.times_blocked += 1
        return True

    def _unblock(self) -> None:
        if self._blocked and self._loop is not None:
            self._loop.remove_writer(self._fd)
        self._blocked = False
        self._loop = None

    def _on_writable(self) -> None:
        # EPOLLERR also wakes writers: an undrained error queue would spin here.
        self.drain_errqueue()
        for kind in CONTROL_PRIORITY:
            q = self._queues[kind]
            while q:
                item = q[0]
                outcome, err = self._sendto(item.data, item.addr)
                if outcome is SendOutcome.DROPPED_WOULD_BLOCK:
                    return  # still full: stay blocked, keep the writer
                q.popleft()
                self._queued -= 1
                self._resolve(item, outcome, err)
        self._unblock()
