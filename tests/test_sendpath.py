from __future__ import annotations

import asyncio
import errno
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from srsrelay.webrtc.sendpath import (
    LOG_INTERVAL,
    MAX_ERRNOS,
    MAX_ERRQUEUE_PER_DRAIN,
    SendCounters,
    SendOutcome,
    SendPath,
    TrafficKind,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    yield tx, rx
    tx.close()
    rx.close()


def _addr(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()
    return str(host), int(port)


def _invariant(counters: SendCounters) -> None:
    for c in counters.kinds.values():
        dropped = (
            c.dropped_would_block + c.dropped_no_buffer + c.dropped_queue_full + c.dropped_closed
        )
        assert c.attempted == c.sent + dropped + c.errors + c.queued
        assert c.queued >= 0
    assert counters.balanced()


def test_sent_over_real_socket(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    assert path.send(b"hello", _addr(rx), TrafficKind.MEDIA, viewer) is SendOutcome.SENT
    assert rx.recvfrom(100)[0] == b"hello"
    media = viewer.kinds[TrafficKind.MEDIA]
    assert (media.attempted, media.sent, media.bytes_sent) == (1, 1, 5)
    assert path.counters.kinds[TrafficKind.MEDIA].sent == 1
    assert viewer.kinds[TrafficKind.RTCP].attempted == 0


def test_oversized_datagram_is_an_error_with_errno(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    outcome = path.send(bytes(70_000), _addr(rx), TrafficKind.MEDIA, viewer)
    assert outcome is SendOutcome.ERROR
    assert viewer.errors_by_errno == {errno.EMSGSIZE: 1}
    assert viewer.snapshot()["errors_by_errno"] == {"EMSGSIZE": 1}
    assert path.counters.kinds[TrafficKind.MEDIA].errors == 1
    _invariant(viewer)


def test_burst_with_tiny_sndbuf_keeps_invariant(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    outcomes = {path.send(bytes(1400), _addr(rx), TrafficKind.MEDIA, viewer) for _ in range(2000)}
    # Loopback hands datagrams straight to the receiver, so drops are not guaranteed.
    assert outcomes <= {SendOutcome.SENT, SendOutcome.DROPPED_WOULD_BLOCK}
    assert viewer.kinds[TrafficKind.MEDIA].attempted == 2000
    _invariant(viewer)
    _invariant(path.counters)


class RaisingSocket(socket.socket):
    """A real UDP socket whose sendto fails the way a full kernel would."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_DGRAM)
        self.exc = exc

    def sendto(self, *args: Any) -> int:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (BlockingIOError(errno.EAGAIN, "would block"), SendOutcome.DROPPED_WOULD_BLOCK),
        (OSError(errno.ENOBUFS, "no buffer"), SendOutcome.DROPPED_NO_BUFFER),
        (OSError(errno.EPERM, "not permitted"), SendOutcome.ERROR),
    ],
)
def test_error_mapping(exc: OSError, outcome: SendOutcome) -> None:
    with RaisingSocket(exc) as sock:
        path = SendPath(sock)
        viewer = SendCounters("ab12")
        assert path.send(b"x", ("127.0.0.1", 9), TrafficKind.DTLS, viewer) is outcome
    dtls = viewer.kinds[TrafficKind.DTLS]
    assert dtls.attempted == 1 and dtls.sent == 0 and dtls.bytes_sent == 0
    assert viewer.errors_by_errno == ({errno.EPERM: 1} if outcome is SendOutcome.ERROR else {})
    _invariant(viewer)


def test_errno_dict_is_bounded() -> None:
    counters = SendCounters("ab12")
    for e in range(1, 100):
        counters.record(TrafficKind.MEDIA, SendOutcome.ERROR, 10, e)
    assert len(counters.errors_by_errno) == MAX_ERRNOS + 1
    assert counters.errors_by_errno[0] == 99 - MAX_ERRNOS
    assert counters.kinds[TrafficKind.MEDIA].errors == 99


def test_drop_log_is_rate_limited() -> None:
    now = [100.0]
    counters = SendCounters("ab12", clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for _ in range(312):
            counters.record(TrafficKind.MEDIA, SendOutcome.DROPPED_WOULD_BLOCK, 1200)
        now[0] += LOG_INTERVAL / 2
        counters.record(TrafficKind.MEDIA, SendOutcome.DROPPED_WOULD_BLOCK, 1200)
        counters.record(TrafficKind.RTCP, SendOutcome.DROPPED_NO_BUFFER, 80)
        assert len(logs) == 1  # the first drop is logged at once, the rest waits
        now[0] += LOG_INTERVAL
        counters.flush_log()
        counters.flush_log()  # nothing pending any more
    assert [e["event"] for e in logs] == [
        "viewer ab12: dropped 1 media datagrams (would block)",
        "viewer ab12: dropped 312 media datagrams (would block),"
        " dropped 1 rtcp datagrams (no buffer)",
    ]
    assert counters.log_lines == 2


def test_global_counters_do_not_log() -> None:
    with RaisingSocket(BlockingIOError(errno.EAGAIN, "x")) as sock:
        path = SendPath(sock)
        viewer = SendCounters("ab12")
        path.send(b"x", ("127.0.0.1", 9), TrafficKind.MEDIA, viewer)
    assert viewer.log_lines == 1
    assert path.counters.log_lines == 0
    assert path.counters.kinds[TrafficKind.MEDIA].dropped_would_block == 1


# -- blocked socket: a unix datagram receiver that does not read gives a real EAGAIN ----

PEER = ("127.0.0.1", 5000)
"""Destination handed to `send`; CountingSocket delivers everything to its connected peer."""


class CountingSocket(socket.socket):
    """A unix datagram socket connected to a receiver; counts sendto syscalls."""

    def __init__(self, path: Path) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Connected, so poll() reports writability from the receiver's queue.
        self.connect(str(path))
        self.calls = 0

    def sendto(self, data: Any, *args: Any) -> int:
        self.calls += 1
        return self.send(data)


@pytest.fixture
def blocked_pair(tmp_path: Path) -> Iterator[tuple[CountingSocket, socket.socket]]:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "viewer"))
    rx.setblocking(False)
    tx = CountingSocket(tmp_path / "viewer")
    yield tx, rx
    tx.close()
    rx.close()


def _fill(path: SendPath, viewer: SendCounters) -> int:
    """Send media until the kernel refuses one; returns how many were accepted."""
    for n in range(10_000):
        outcome = path.send(b"m%d" % n, PEER, TrafficKind.MEDIA, viewer)
        if outcome is SendOutcome.DROPPED_WOULD_BLOCK:
            return n
        assert outcome is SendOutcome.SENT
    raise AssertionError("the receiver queue never filled")


def _read_all(rx: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(rx.recv(100))
        except BlockingIOError:
            return out


async def _until_unblocked(path: SendPath, rx: socket.socket) -> list[bytes]:
    """Read the receiver until the writer callback has drained the path."""
    received: list[bytes] = []
    for _ in range(500):
        received += _read_all(rx)
        if not path.blocked:
            return received + _read_all(rx)
        await asyncio.sleep(0.01)
    raise AssertionError("the send path stayed blocked")


async def test_eagain_blocks_and_drops_media_without_syscalls(
    blocked_pair: tuple[CountingSocket, socket.socket],
) -> None:
    tx, rx = blocked_pair
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    accepted = _fill(path, viewer)
    assert path.blocked and path.times_blocked == 1
    calls = tx.calls
    assert calls == accepted + 1
    for kind in (TrafficKind.MEDIA, TrafficKind.RETRANSMIT):
        for _ in range(100):
            assert path.send(b"x", PEER, kind, viewer) is SendOutcome.DROPPED_WOULD_BLOCK
            _invariant(viewer)
    assert tx.calls == calls  # no syscall while blocked
    media = viewer.kinds[TrafficKind.MEDIA]
    assert (media.sent, media.dropped_would_block) == (accepted, 101)
    assert viewer.kinds[TrafficKind.RETRANSMIT].dropped_would_block == 100
    assert path.counters.kinds[TrafficKind.MEDIA].dropped_would_block == 101
    _invariant(path.counters)
    # Once the receiver reads, the writer fires, the path unblocks and sends again.
    assert len(await _until_unblocked(path, rx)) == accepted
    assert path.send(b"after", PEER, TrafficKind.MEDIA, viewer) is SendOutcome.SENT
    assert tx.calls == calls + 1
    assert rx.recv(100) == b"after"
    assert path.stats()["blocked"] is False
    path.close()


async def test_control_datagrams_queue_by_priority_and_go_first(
    blocked_pair: tuple[CountingSocket, socket.socket],
) -> None:
    tx, rx = blocked_pair
    path = SendPath(tx)
    alice, bob = SendCounters("a1"), SendCounters("b2")
    accepted = _fill(path, alice)
    calls = tx.calls
    sends = [
        (b"rtcp1", TrafficKind.RTCP, alice),
        (b"dtls1", TrafficKind.DTLS, bob),
        (b"stun1", TrafficKind.STUN, alice),
        (b"media", TrafficKind.MEDIA, bob),
        (b"rtcp2", TrafficKind.RTCP, bob),
        (b"stun2", TrafficKind.STUN, bob),
    ]
    for data, kind, viewer in sends:
        expected = SendOutcome.DROPPED_WOULD_BLOCK if data == b"media" else SendOutcome.QUEUED
        assert path.send(data, PEER, kind, viewer) is expected
        for c in (alice, bob, path.counters):
            _invariant(c)
    assert tx.calls == calls
    assert path.queued == 5
    assert alice.kinds[TrafficKind.STUN].queued == 1 and bob.kinds[TrafficKind.STUN].queued == 1
    assert path.counters.kinds[TrafficKind.RTCP].queued == 2
    stats = path.stats()
    assert (stats["control_queue"], stats["control_queue_high_water"]) == (5, 5)

    received = await _until_unblocked(path, rx)
    assert len(received) == accepted + 5
    # The queue is sent before anything new, STUN first, then DTLS, then RTCP.
    assert received[accepted:] == [b"stun1", b"stun2", b"dtls1", b"rtcp1", b"rtcp2"]
    for viewer in (alice, bob, path.counters):
        _invariant(viewer)
        assert all(c.queued == 0 for c in viewer.kinds.values())
    assert alice.kinds[TrafficKind.STUN].sent == 1 and bob.kinds[TrafficKind.STUN].sent == 1
    assert bob.kinds[TrafficKind.DTLS].bytes_sent == 5
    assert path.counters.kinds[TrafficKind.RTCP].sent == 2
    assert path.queued == 0 and path.stats()["control_queue_high_water"] == 5
    # The writer is gone: nothing is registered for the fd any more.
    assert asyncio.get_running_loop().remove_writer(tx.fileno()) is False
    path.close()


async def test_full_control_queue_drops_lowest_priority_oldest(
    blocked_pair: tuple[CountingSocket, socket.socket],
) -> None:
    tx, rx = blocked_pair
    path = SendPath(tx, control_queue=4)
    viewer = SendCounters("ab12")
    accepted = _fill(path, viewer)
    steps = [
        (b"r1", TrafficKind.RTCP, SendOutcome.QUEUED),
        (b"r2", TrafficKind.RTCP, SendOutcome.QUEUED),
        (b"d1", TrafficKind.DTLS, SendOutcome.QUEUED),
        (b"s1", TrafficKind.STUN, SendOutcome.QUEUED),  # full
        (b"s2", TrafficKind.STUN, SendOutcome.QUEUED),  # evicts r1
        (b"r3", TrafficKind.RTCP, SendOutcome.QUEUED),  # evicts r2, the oldest RTCP
        (b"d2", TrafficKind.DTLS, SendOutcome.QUEUED),  # evicts r3
        (b"r4", TrafficKind.RTCP, SendOutcome.DROPPED_QUEUE_FULL),  # lowest: itself
        (b"s3", TrafficKind.STUN, SendOutcome.QUEUED),  # evicts d1
    ]
    for data, kind, outcome in steps:
        assert path.send(data, PEER, kind, viewer) is outcome
        assert path.queued <= 4
        _invariant(viewer)
        _invariant(path.counters)
    rtcp, dtls = viewer.kinds[TrafficKind.RTCP], viewer.kinds[TrafficKind.DTLS]
    assert (rtcp.attempted, rtcp.queued, rtcp.dropped_queue_full) == (4, 0, 4)
    assert (dtls.attempted, dtls.queued, dtls.dropped_queue_full) == (2, 1, 1)
    assert path.stats()["control_queue_dropped"] == {"stun": 0, "dtls": 1, "rtcp": 4}
    received = await _until_unblocked(path, rx)
    assert received[accepted:] == [b"s1", b"s2", b"s3", b"d2"]
    assert viewer.kinds[TrafficKind.STUN].sent == 3
    _invariant(viewer)
    path.close()


async def test_close_while_blocked_drops_queue_and_removes_writer(
    blocked_pair: tuple[CountingSocket, socket.socket],
) -> None:
    tx, rx = blocked_pair
    path = SendPath(tx)
    gone = SendCounters("gone")  # a viewer that closed while its datagrams were queued
    _fill(path, gone)
    for kind in (TrafficKind.STUN, TrafficKind.DTLS, TrafficKind.RTCP):
        assert path.send(b"q", PEER, kind, gone) is SendOutcome.QUEUED
    calls = tx.calls
    path.close()
    assert not path.blocked and path.queued == 0
    assert asyncio.get_running_loop().remove_writer(tx.fileno()) is False
    for kind in (TrafficKind.STUN, TrafficKind.DTLS, TrafficKind.RTCP):
        c = gone.kinds[kind]
        assert (c.attempted, c.queued, c.dropped_closed) == (1, 0, 1)
    assert path.send(b"late", PEER, TrafficKind.RTCP, gone) is SendOutcome.DROPPED_CLOSED
    assert tx.calls == calls
    _invariant(gone)
    _invariant(path.counters)
    assert path.counters.kinds[TrafficKind.RTCP].dropped_closed == 2


def test_queue_drops_are_logged_with_their_reason() -> None:
    counters = SendCounters("ab12", clock=lambda: 100.0)
    with structlog.testing.capture_logs() as logs:
        counters.record(TrafficKind.RTCP, SendOutcome.QUEUED, 80)
        assert logs == []  # queued is not a drop
        counters.resolve(TrafficKind.RTCP, SendOutcome.DROPPED_QUEUE_FULL, 80)
    assert [e["event"] for e in logs] == [
        "viewer ab12: dropped 1 rtcp datagrams (control queue full)"
    ]
    assert counters.balanced()


def test_resolve_needs_a_final_outcome() -> None:
    counters = SendCounters("ab12")
    counters.record(TrafficKind.STUN, SendOutcome.QUEUED, 80)
    with pytest.raises(ValueError, match="^SendOutcome.QUEUED is not a final send outcome$"):
        counters.resolve(TrafficKind.STUN, SendOutcome.QUEUED, 80)


# -- IP_RECVERR: ICMP errors land in the error queue and must be drained ----------------


def _closed_port() -> tuple[str, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return _addr(s)


def _readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def test_icmp_error_is_drained_counted_and_attributed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, _ = pair
    gone = _closed_port()
    viewer = SendCounters("gone")
    path = SendPath(tx, counters_for=lambda addr: viewer if addr == gone else None)
    assert path.send(b"hello?", gone, TrafficKind.MEDIA, viewer) is SendOutcome.SENT
    # The port unreachable sits in the error queue: the fd stays readable until drained.
    assert _readable(tx, 2)
    assert _readable(tx, 0)
    assert path.drain_errqueue() == 1
    assert not _readable(tx, 0)
    assert viewer.icmp_errors == 1
    stats = path.stats()
    assert stats["icmp_errors"] == {"ECONNREFUSED": 1}
    assert (stats["errqueue_drained"], stats["icmp_unattributed"]) == (1, 0)
    assert viewer.snapshot()["icmp_errors"] == 1
    assert path.drain_errqueue() == 0


def test_pending_icmp_error_does_not_cost_the_next_datagram(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """With IP_RECVERR the ICMP error is also left pending on the socket, and the next
    sendto (to anyone) fails with it instead of sending; the path drains and retries."""
    tx, rx = pair
    gone = _closed_port()
    path = SendPath(tx)
    viewer, other = SendCounters("gone"), SendCounters("other")
    path.send(b"hello?", gone, TrafficKind.MEDIA, viewer)
    assert _readable(tx, 2)
    assert path.send(b"still here", _addr(rx), TrafficKind.MEDIA, other) is SendOutcome.SENT
    assert rx.recvfrom(100)[0] == b"still here"
    assert other.kinds[TrafficKind.MEDIA].errors == 0 and other.errors_by_errno == {}
    assert path.stats()["icmp_errors"] == {"ECONNREFUSED": 1}
    assert path.icmp_unattributed == 1
    assert not _readable(tx, 0)


def test_errqueue_drain_is_bounded(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, _ = pair
    gone = _closed_port()
    path = SendPath(tx)
    total = MAX_ERRQUEUE_PER_DRAIN + 10
    # Raw sends pile errors up; `send` would drain when the pending error hits it.
    sent = 0
    while sent < total:
        try:
            tx.sendto(b"x", gone)
            sent += 1
        except ConnectionRefusedError:
            pass
    drains: list[int] = []
    while sum(drains) < total and _readable(tx, 2):
        drains.append(path.drain_errqueue())
    assert sum(drains) == total
    assert max(drains) == MAX_ERRQUEUE_PER_DRAIN  # more were waiting, yet it stopped
    assert len(drains) >= 2
    assert path.errqueue_drained == total
    assert not _readable(tx, 0)


# -- staged batches (SendPath.send_staged) -----------------------------------------------


async def test_staged_batch_refused_part_way_by_a_full_receiver(
    blocked_pair: tuple[CountingSocket, socket.socket],
) -> None:
    """A real EAGAIN in the middle of a batch (here sent one sendto per datagram: the
    socket class wraps sendto): the rest of the batch is dropped and the path blocks."""
    tx, rx = blocked_pair
    path = SendPath(tx)
    assert not path.batching
    viewer = SendCounters("ab12")
    accepted = _fill(path, viewer)
    assert path.blocked
    # Room for two more datagrams, then wait for the writer to unblock the path.
    first = [rx.recv(100), rx.recv(100)]
    for _ in range(500):
        if not path.blocked:
            break
        await asyncio.sleep(0.01)
    assert not path.blocked
    batch = [b"b%d" % i for i in range(5)]
    for i, data in enumerate(batch):
        path.staging.put(i, data)
    calls = tx.calls
    assert path.send_staged(5, PEER, TrafficKind.MEDIA, viewer) == 2
    assert tx.calls == calls + 3  # two taken, the third refused, the rest not tried
    assert path.blocked and path.times_blocked == 2
    media = viewer.kinds[TrafficKind.MEDIA]
    assert (media.attempted, media.sent) == (accepted + 1 + 5, accepted + 2)
    assert media.dropped_would_block == 1 + 3
    _invariant(viewer)
    _invariant(path.counters)
    received = first + await _until_unblocked(path, rx)
    assert received[-2:] == batch[:2] and len(received) == accepted + 2
    path.close()


def test_staged_batch_counts_bytes_once_per_viewer_and_globally(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    for i in range(3):
        path.staging.put(i, bytes(100 + i))
    assert path.send_staged(3, _addr(rx), TrafficKind.MEDIA, viewer) == 3
    assert path.send_staged(2, _addr(rx), TrafficKind.MEDIA, path.counters) == 2
    assert viewer.kinds[TrafficKind.MEDIA].bytes_sent == 303
    total = path.counters.kinds[TrafficKind.MEDIA]
    assert (total.attempted, total.sent, total.bytes_sent) == (5, 5, 303 + 201)
    _invariant(viewer)
    _invariant(path.counters)
    assert [len(rx.recv(200)) for _ in range(5)] == [100, 101, 102, 100, 101]
