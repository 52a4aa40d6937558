"""The one send path: every UDP datagram the relay emits leaves through `SendPath`.

`send` hands one datagram to the kernel; `send_staged` hands a batch of datagrams to
one address that the caller built in place in the path's `Staging` slots (a video
frame to one viewer), in one sendmmsg(2) call where libc has it. Both go through
`SendPath._transmit`, the only function that calls into the kernel, on a
non-blocking socket. When the kernel refuses a datagram
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
import functools
import importlib
import socket
import struct
import sys
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
MAX_BATCH = 64
"""Staging slots, so datagrams per `send_staged` call (and per sendmmsg(2) call)."""
SLOT_SIZE = 2048
"""Bytes of one staging slot: the largest datagram a sender can build in place."""
SOCKADDR_CACHE = 1024
"""Encoded destination addresses kept by a batching send path (emptied when full)."""

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
_WOULD_BLOCK_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EWOULDBLOCK, errno.EALREADY, errno.EINPROGRESS}
)
"""What Python raises BlockingIOError for."""

# glibc/musl layouts on Linux (sys/socket.h, bits/uio.h); musl's int msg_iovlen and
# socklen_t msg_controllen are padded to these sizes, low half first on little endian.
_MMSG_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct msghdr {
    void *msg_name; unsigned int msg_namelen;
    struct iovec *msg_iov; size_t msg_iovlen;
    void *msg_control; size_t msg_controllen;
    int msg_flags;
};
struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
ssize_t sendmsg(int sockfd, const struct msghdr *msg, int flags);
"""
SOL_UDP = 17
UDP_SEGMENT = 103
"""udp(7) UDP_SEGMENT (Linux 4.18, uapi/linux/udp.h): the kernel splits one buffer into
datagrams of this size (the last may be shorter), passing the stack once for all."""
GSO_MIN_SEGMENTS = 4
"""Fewest datagrams sent as one UDP_SEGMENT send: below it sendmmsg costs about the same
(bench/hotpath.py at 600 kbit/s, 2-3 packets a frame)."""
GSO_MAX_SEGMENTS = 64
"""Most datagrams in one UDP_SEGMENT send (UDP_MAX_SEGMENTS of older kernels)."""
GSO_MAX_BYTES = 65_000
"""Most bytes in one UDP_SEGMENT send (it must fit one IP packet's length field)."""
_GSO_CMSG = struct.Struct("=QiiH")
"""struct cmsghdr (cmsg_len, cmsg_level, cmsg_type) and the u16 segment size."""
_GSO_CMSG_SPACE = 24
"""CMSG_SPACE(sizeof(uint16_t)) with an 8-byte size_t."""
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
"""What a kernel or device without UDP segmentation answers (e.g. no checksum offload):
the path stops trying and sends batches with sendmmsg."""
_SOCKADDR_SIZE: dict[int, int] = {socket.AF_INET: 16, socket.AF_INET6: 28}
"""sizeof(struct sockaddr_in) and sizeof(struct sockaddr_in6)."""
_SA_FAMILY = struct.Struct("=H")
_SA_IN = struct.Struct("!H4s")
"""sockaddr_in after the family: port, address (network order)."""
_SA_IN6 = struct.Struct("!HI16s")
"""sockaddr_in6 after the family: port, flow info, address; the scope id follows."""
_SA_SCOPE = struct.Struct("=I")


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
_ONE_SENT = (1, 0)
"""What `_transmit` returns for a single datagram the kernel took (one tuple for all)."""


def _outcome(err: int) -> SendOutcome:
    """The outcome of a datagram the kernel refused with `err`."""
    if err in _WOULD_BLOCK_ERRNOS:
        return SendOutcome.DROPPED_WOULD_BLOCK
    if err == errno.ENOBUFS:
        return SendOutcome.DROPPED_NO_BUFFER
    return SendOutcome.ERROR


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


@dataclass(frozen=True, slots=True)
class _CBinding:
    """cffi (ABI mode: no compiler needed) and, where libc has it, sendmmsg(2)."""

    ffi: Any
    """A cffi FFI with `_MMSG_CDEF` declared."""
    sendmmsg: Any
    """libc's sendmmsg, or None (not Linux, or a libc without it)."""
    sendmsg: Any
    """libc's sendmsg (for UDP_SEGMENT), or None."""


@functools.cache
def _c_binding() -> _CBinding | None:
    """The binding, loaded once; None without cffi."""
    try:
        cffi = importlib.import_module("cffi")  # no type stubs: Any
    except ImportError:
        return None
    ffi = cffi.FFI()
    ffi.cdef(_MMSG_CDEF)
    sendmmsg = sendmsg = None
    # `_Mmsg` writes iov_len as an unsigned long (what size_t is on Linux).
    words = ffi.sizeof("struct iovec") == 2 * ffi.sizeof("unsigned long")
    if sys.platform.startswith("linux") and words:
        try:
            libc = ffi.dlopen(None)
            sendmmsg = libc.sendmmsg
            sendmsg = libc.sendmsg
        except (OSError, AttributeError):
            pass
    return _CBinding(ffi, sendmmsg, sendmsg)


class Staging:
    """`MAX_BATCH` slots of `SLOT_SIZE` bytes where a sender builds datagrams in place
    (e.g. SRTP packets protected where they lie), then hands the first n of them to
    `SendPath.send_staged`: nothing is copied between building and the kernel.

    Slots live in C memory when cffi is available (`pointers` then address them, for C
    functions that write in place), else in a bytearray (`pointers` are None). A slot's
    content is valid until the next `send_staged` call: build and send without awaiting.
    """

    __slots__ = ("views", "pointers", "lengths", "_memory")

    def __init__(self, ffi: Any | None) -> None:
        size = MAX_BATCH * SLOT_SIZE
        memory: Any
        if ffi is None:
            memory = bytearray(size)
            base = memoryview(memory)
            self.pointers: list[Any] = [None] * MAX_BATCH
        else:
            memory = ffi.new("char[]", size)
            base = memoryview(ffi.buffer(memory))
            self.pointers = [memory + i * SLOT_SIZE for i in range(MAX_BATCH)]
        self._memory = memory  # the slots' storage: kept alive with the views
        self.views: list[memoryview] = [
            base[i * SLOT_SIZE : (i + 1) * SLOT_SIZE] for i in range(MAX_BATCH)
        ]
        """A writable view of each slot."""
        self.lengths: list[int] = [0] * MAX_BATCH
        """Length of the datagram in each slot, set by whoever builds it."""

    def put(self, index: int, data: bytes) -> None:
        """Copy `data` into slot `index`."""
        size = len(data)
        if size > SLOT_SIZE:
            raise ValueError(f"datagram of {size} bytes does not fit a {SLOT_SIZE}-byte slot")
        self.views[index][:size] = data
        self.lengths[index] = size


class _Mmsg:
    """sendmmsg(2) over the slots of one `Staging`: one mmsghdr and one iovec per slot,
    linked once; per call only the destination and the lengths are written."""

    __slots__ = (
        "_sendmmsg",
        "_sendmsg",
        "_gso_hdr",
        "_gso_control",
        "_gso_view",
        "gso",
        "_ffi",
        "_iov",
        "_iov_words",
        "_msgs",
        "_name",
        "_name_view",
        "_family",
        "_names",
    )

    def __init__(self, binding: _CBinding, staging: Staging, family: int, gso: bool = True) -> None:
        ffi = binding.ffi
        self._ffi = ffi
        self._sendmmsg = binding.sendmmsg
        self._family = family
        namelen = _SOCKADDR_SIZE[family]
        self._name = ffi.new("char[]", namelen)
        self._name_view = memoryview(ffi.buffer(self._name))
        _SA_FAMILY.pack_into(self._name_view, 0, family)
        self._iov = ffi.new("struct iovec[]", MAX_BATCH)
        # The iovecs as words (iov_base, iov_len; `_c_binding` checked the sizes): a
        # length is then one store, a fraction of a cffi struct field assignment.
        self._iov_words = memoryview(ffi.buffer(self._iov)).cast("L")
        self._msgs = ffi.new("struct mmsghdr[]", MAX_BATCH)
        # Bounded by SOCKADDR_CACHE entries: `address` empties it when full.
        self._names: dict[tuple[str, int], bytes] = {}
        for i in range(MAX_BATCH):
            self._iov[i].iov_base = staging.pointers[i]
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = self._name
            hdr.msg_namelen = namelen
            hdr.msg_iov = self._iov + i
            hdr.msg_iovlen = 1
        # One message over several slots' iovecs, with a UDP_SEGMENT control message.
        self._sendmsg = binding.sendmsg
        self.gso = gso and binding.sendmsg is not None and ffi.sizeof("size_t") == 8
        """Equal-size datagrams go out as one UDP_SEGMENT send; False after the kernel
        refused one (see _GSO_REFUSED)."""
        self._gso_control = ffi.new("char[]", _GSO_CMSG_SPACE)
        self._gso_view = memoryview(ffi.buffer(self._gso_control))
        self._gso_hdr = ffi.new("struct msghdr *")
        self._gso_hdr.msg_name = self._name
        self._gso_hdr.msg_namelen = namelen
        self._gso_hdr.msg_control = self._gso_control
        self._gso_hdr.msg_controllen = _GSO_CMSG_SPACE

    def address(self, addr: tuple[str, int]) -> bool:
        """Make `addr` the destination of every message; False if it cannot be encoded
        here (e.g. a scoped IPv6 address): send those with sendto, which resolves it."""
        name = self._names.get(addr)
        if name is None:
            name = self._encode(addr)
            if name is None:
                return False
            if len(self._names) >= SOCKADDR_CACHE:
                self._names.clear()
            self._names[addr] = name
        self._name_view[2:] = name
        return True

    def _encode(self, addr: tuple[str, int]) -> bytes | None:
        """The sockaddr of `addr` after its family field, or None."""
        try:
            if self._family == socket.AF_INET:
                return _SA_IN.pack(addr[1], socket.inet_pton(self._family, addr[0])) + bytes(8)
            flow, scope = (addr[2], addr[3]) if len(addr) >= 4 else (0, 0)
            packed = socket.inet_pton(self._family, addr[0])
            return _SA_IN6.pack(addr[1], flow, packed) + _SA_SCOPE.pack(scope)
        except (OSError, ValueError, TypeError, IndexError, struct.error):
            return None

    def send(self, fd: int, start: int, count: int, lengths: list[int]) -> tuple[int, int]:
        """One sendmmsg call for slots start..count-1: (datagrams sent, errno or 0)."""
        words = self._iov_words
        for i in range(start, count):
            words[2 * i + 1] = lengths[i]
        msgs = self._msgs + start if start else self._msgs
        sent = self._sendmmsg(fd, msgs, count - start, 0)
        if sent > 0:
            return sent, 0
        return 0, self._ffi.errno or errno.EIO

    def send_segmented(
        self, fd: int, start: int, count: int, lengths: list[int]
    ) -> tuple[int, int] | None:
        """Slots start..count-1 in one UDP_SEGMENT sendmsg when they allow it (at least
        GSO_MIN_SEGMENTS, all of one size but the last, which may be shorter):
        (datagrams sent, errno or 0), all or none. None: not segmentable, send them
        another way."""
        n = count - start
        if n < GSO_MIN_SEGMENTS or n > GSO_MAX_SEGMENTS:
            return None
        size = lengths[start]
        last = count - 1
        if lengths[last] > size or size * n > GSO_MAX_BYTES:
            return None
        for i in range(start + 1, last):
            if lengths[i] != size:
                return None
        words = self._iov_words
        for i in range(start, count):
            words[2 * i + 1] = lengths[i]
        _GSO_CMSG.pack_into(self._gso_view, 0, 18, SOL_UDP, UDP_SEGMENT, size)
        hdr = self._gso_hdr
        hdr.msg_iov = self._iov + start
        hdr.msg_iovlen = n
        if self._sendmsg(fd, hdr, 0) >= 0:
            return n, 0
        err = self._ffi.errno or errno.EIO
        if err in _GSO_REFUSED:
            self.gso = False
            log.info("udp segmentation refused by the kernel; sending batches", errno=err)
            return None
        return 0, err


CountersFor = Callable[[tuple[str, int]], SendCounters | None]
"""Finds the counters of the viewer at a remote address, for ICMP attribution."""


class SendPath:
    """Sends datagrams on one non-blocking UDP socket, counting every outcome.

    Never raises to callers. `_transmit` is the only caller of ``sendto`` and
    ``sendmmsg``. Blocking needs a running event loop (for ``add_writer``); without one
    a refused datagram is simply dropped and the path never becomes blocked.
    """

    def __init__(
        self,
        sock: socket.socket,
        counters: SendCounters | None = None,
        *,
        control_queue: int = CONTROL_QUEUE,
        counters_for: CountersFor | None = None,
        batch: bool = True,
        gso: bool = True,
    ) -> None:
        """`batch`: send staged batches with one sendmmsg(2) call where libc has it;
        False (or no sendmmsg) sends them one ``sendto`` per datagram. `gso`: a batch of
        equal-size datagrams (a video frame's packets) is one UDP_SEGMENT send instead,
        where the kernel takes it."""
        sock.setblocking(False)
        self._sock = sock
        self._sock_sendto = sock.sendto
        self._fd = sock.fileno()
        binding = _c_binding()
        self.staging = Staging(binding.ffi if binding is not None else None)
        """Where senders build the datagrams of a `send_staged` batch."""
        self._mmsg: _Mmsg | None = None
        if (
            batch
            and binding is not None
            and binding.sendmmsg is not None
            and sock.family in _SOCKADDR_SIZE
            # A subclass that overrides `send` sees every datagram: no batches bypass it.
            and type(self).send is SendPath.send
        ):
            self._mmsg = _Mmsg(binding, self.staging, sock.family, gso)
        self.segmented_sends = 0
        """UDP_SEGMENT sends the kernel took (each several datagrams)."""
        self.send_calls = 0
        """System calls that sent (or tried to send) datagrams: sendto and sendmmsg."""
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

    @property
    def batching(self) -> bool:
        """`send_staged` sends a batch with one sendmmsg(2) call (else one sendto each)."""
        return self._mmsg is not None

    def send(
        self,
        data: bytes,
        addr: tuple[str, int],
        kind: TrafficKind,
        counters: SendCounters,
    ) -> SendOutcome:
        if self._closed or self._blocked:
            return self._send_held(data, addr, kind, counters)
        sent, err = self._transmit(addr, 1, data)
        if sent:
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
        outcome = _outcome(err)
        if outcome is SendOutcome.DROPPED_WOULD_BLOCK and self._block() and kind in self._queues:
            return self._enqueue(_Queued(data, addr, kind, counters))
        return self._record(counters, kind, outcome, len(data), err)

    def send_staged(
        self,
        count: int,
        addr: tuple[str, int],
        kind: TrafficKind,
        counters: SendCounters,
    ) -> int:
        """Send the datagrams in `staging` slots 0..count-1 (lengths in `staging.lengths`)
        to `addr`; returns how many the kernel took, always the first ones.

        Each datagram is counted like one `send`: once the kernel refuses one, it and the
        rest of the batch get the outcome of that refusal (EAGAIN: DROPPED_WOULD_BLOCK and
        the path blocks; control kinds are copied into the control queue instead).
        """
        if not 0 < count <= MAX_BATCH:
            raise ValueError(f"a staged batch holds 1 to {MAX_BATCH} datagrams, not {count}")
        if self._closed:
            self._refuse_staged(0, count, addr, kind, counters, SendOutcome.DROPPED_CLOSED, 0)
            return 0
        if self._blocked:
            self._refuse_staged(0, count, addr, kind, counters, SendOutcome.DROPPED_WOULD_BLOCK, 0)
            return 0
        sent, err = self._transmit(addr, count)
        if sent:
            # As in `send`, inlined: counted once per batch.
            size = sum(self.staging.lengths[:sent])
            c = counters.kinds[kind]
            c.attempted += sent
            c.sent += sent
            c.bytes_sent += size
            if counters is not self.counters:
                c = self.counters.kinds[kind]
                c.attempted += sent
                c.sent += sent
                c.bytes_sent += size
        if sent < count:
            self._refuse_staged(sent, count, addr, kind, counters, _outcome(err), err)
        return sent

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
            "batching": self.batching,
            "send_calls": self.send_calls,
            "segmentation": self._mmsg is not None and self._mmsg.gso,
            "segmented_sends": self.segmented_sends,
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

    def _refuse_staged(
        self,
        start: int,
        count: int,
        addr: tuple[str, int],
        kind: TrafficKind,
        counters: SendCounters,
        outcome: SendOutcome,
        err: int,
    ) -> None:
        """Count staged datagrams start..count-1 as `outcome`, or queue copies of them
        (control kinds, when the socket is full and the path blocks)."""
        staging = self.staging
        # A full socket blocks the path (whatever the kind); control datagrams then wait.
        queue = (
            outcome is SendOutcome.DROPPED_WOULD_BLOCK
            and not self._closed
            and self._block()
            and kind in self._queues
        )
        for i in range(start, count):
            size = staging.lengths[i]
            if queue:
                data = bytes(staging.views[i][:size])
                self._enqueue(_Queued(data, addr, kind, counters))
            else:
                self._record(counters, kind, outcome, size, err)

    def _transmit(
        self, addr: tuple[str, int], count: int, data: bytes | None = None
    ) -> tuple[int, int]:
        """The one function that hands datagrams to the kernel: `data` alone, or else
        staging slots 0..count-1, in order. Returns how many the kernel took and the
        errno that refused the next one (0 when all were taken).

        A batch goes out in one sendmmsg call; it returns early when a datagram fails and
        loses that error (sendmmsg(2)), so the rest is sent again from there to learn it.
        With IP_RECVERR an error of an earlier datagram may be pending on the socket and
        refuse this one: drain the error queue and try that datagram once more.
        """
        if data is not None:  # one datagram, the common case for everything but media
            self.send_calls += 1
            try:
                self._sock_sendto(data, addr)
                return _ONE_SENT
            except OSError as exc:
                err = exc.errno or 0
            if self._recverr and err in _ASYNC_ERRNOS:
                self.drain_errqueue()
                self.send_calls += 1
                try:
                    self._sock_sendto(data, addr)
                    return _ONE_SENT
                except OSError as exc:
                    err = exc.errno or 0
            return 0, err
        staging = self.staging
        mmsg = self._mmsg
        batch = mmsg is not None and count > 1 and mmsg.address(addr)
        sent = 0
        retried = False  # per datagram: a success resets it
        while sent < count:
            self.send_calls += 1
            if batch:
                assert mmsg is not None
                segmented = (
                    mmsg.send_segmented(self._fd, sent, count, staging.lengths)
                    if mmsg.gso
                    else None
                )
                if segmented is not None:
                    n, err = segmented
                    self.segmented_sends += n > 0
                else:
                    n, err = mmsg.send(self._fd, sent, count, staging.lengths)
            else:
                try:
                    self._sock_sendto(staging.views[sent][: staging.lengths[sent]], addr)
                    n, err = 1, 0
                except OSError as exc:
                    n, err = 0, exc.errno or 0
            if n:
                sent += n
                retried = False
                continue
            if err == errno.EINTR:
                continue
            if not retried and self._recverr and err in _ASYNC_ERRNOS:
                retried = True
                self.drain_errqueue()
                continue
            return sent, err
        return count, 0

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
                sent, err = self._transmit(item.addr, 1, item.data)
                outcome = _SENT if sent else _outcome(err)
                if outcome is SendOutcome.DROPPED_WOULD_BLOCK:
                    return  # still full: stay blocked, keep the writer
                q.popleft()
                self._queued -= 1
                self._resolve(item, outcome, err)
        self._unblock()
