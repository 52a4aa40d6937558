from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import structlog.testing

from srsrelay.webrtc.sendpath import (
    LOG_INTERVAL,
    MAX_ERRNOS,
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
        dropped = c.dropped_would_block + c.dropped_no_buffer
        assert c.attempted == c.sent + dropped + c.errors


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

    def sendto(self, *args: Any) -> int:  # type: ignore[override]
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
