"""Batches of datagrams to one address in one sendmmsg(2) call (SendPath.send_staged)."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from pylibsrtp import Policy, Session

from srsrelay.config import RtcConfig
from srsrelay.webrtc import sendpath
from srsrelay.webrtc.dtls import RTP_HEADER, RtpWriter
from srsrelay.webrtc.nack import RTP_HEADER_SIZE
from srsrelay.webrtc.sendpath import (
    MAX_BATCH,
    SLOT_SIZE,
    SendCounters,
    SendOutcome,
    SendPath,
    Staging,
    TrafficKind,
)
from tests.test_viewer import _wait, make_rig, video

MEDIA = TrafficKind.MEDIA


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


@pytest.fixture
def fresh_binding() -> Iterator[None]:
    """Reload the C binding before and after a test that changes what it finds."""
    sendpath._c_binding.cache_clear()
    yield
    sendpath._c_binding.cache_clear()


def _addr(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def _stage(path: SendPath, datagrams: list[bytes]) -> int:
    for i, data in enumerate(datagrams):
        path.staging.put(i, data)
    return len(datagrams)


def _datagrams(count: int, size: int = 300) -> list[bytes]:
    return [bytes([i]) * (size + i) for i in range(count)]


def _received(rx: socket.socket, count: int) -> list[bytes]:
    return [rx.recv(SLOT_SIZE) for _ in range(count)]


def _nothing_more(rx: socket.socket) -> bool:
    rx.setblocking(False)
    try:
        rx.recv(SLOT_SIZE)
    except BlockingIOError:
        return True
    return False


def _balanced(*all_counters: SendCounters) -> None:
    for counters in all_counters:
        for c in counters.kinds.values():
            assert c.attempted == c.sent + c.dropped + c.errors + c.queued
            assert c.queued >= 0


class ScriptedSendmmsg:
    """libc's sendmmsg, letting `budget` datagrams through in total (really sent), then
    failing with `err`: the kernel's way to report a full socket part way through."""

    def __init__(self, budget: int, err: int) -> None:
        binding = sendpath._c_binding()
        assert binding is not None and binding.sendmmsg is not None
        self.binding = sendpath._CBinding(binding.ffi, self, None)  # batches: no UDP_SEGMENT
        self._ffi = binding.ffi
        self._real = binding.sendmmsg
        self.budget = budget
        self.err = err
        self.calls = 0

    def __call__(self, fd: int, msgs: Any, vlen: int, flags: int) -> int:
        self.calls += 1
        if self.budget <= 0:
            self._ffi.errno = self.err
            return -1
        sent: int = self._real(fd, msgs, min(vlen, self.budget), flags)
        self.budget -= sent
        return sent


def _scripted(monkeypatch: pytest.MonkeyPatch, budget: int, err: int) -> ScriptedSendmmsg:
    scripted = ScriptedSendmmsg(budget, err)
    monkeypatch.setattr(sendpath, "_c_binding", lambda: scripted.binding)
    return scripted


class ScriptedSendmsg:
    """libc's sendmsg for UDP_SEGMENT sends, failing the first `failures` calls with `err`."""

    def __init__(self, failures: int, err: int) -> None:
        binding = sendpath._c_binding()
        assert binding is not None and binding.sendmsg is not None
        self.binding = sendpath._CBinding(binding.ffi, binding.sendmmsg, self)
        self._ffi = binding.ffi
        self._real = binding.sendmsg
        self.failures = failures
        self.err = err
        self.calls = 0

    def __call__(self, fd: int, hdr: Any, flags: int) -> int:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            self._ffi.errno = self.err
            return -1
        sent: int = self._real(fd, hdr, flags)
        return sent


def _frame_datagrams() -> list[bytes]:
    """A video frame's packets: all of one size but the last, which is shorter."""
    return [bytes([i]) * 1210 for i in range(6)] + [b"\xff" * 700]


def test_a_frame_of_equal_size_packets_is_one_segmented_send(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    path = SendPath(tx)
    assert path.stats()["segmentation"] is True
    viewer = SendCounters("ab12")
    datagrams = _frame_datagrams()
    assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, viewer) == 7
    assert (path.send_calls, path.segmented_sends) == (1, 1)
    # The kernel split it back into the same datagrams, in order.
    assert _received(rx, 7) == datagrams
    assert _nothing_more(rx)
    media = viewer.kinds[MEDIA]
    assert (media.attempted, media.sent, media.bytes_sent) == (7, 7, sum(map(len, datagrams)))
    _balanced(viewer, path.counters)
    # Sizes that differ in the middle (a last one longer, too), or fewer than
    # GSO_MIN_SEGMENTS datagrams, are a sendmmsg batch.
    assert sendpath.GSO_MIN_SEGMENTS == 4
    for uneven in (_datagrams(5), [b"a" * 500, b"b" * 500, b"c" * 500, b"d" * 600], [b"e"] * 3):
        rx.settimeout(2)
        assert path.send_staged(_stage(path, uneven), _addr(rx), MEDIA, viewer) == len(uneven)
        assert _received(rx, len(uneven)) == uneven
    assert (path.send_calls, path.segmented_sends) == (4, 1)
    path.close()


def test_segmentation_can_be_turned_off(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    path = SendPath(tx, gso=False)
    assert path.stats()["segmentation"] is False
    datagrams = _frame_datagrams()
    assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, SendCounters("x")) == 7
    assert (path.send_calls, path.segmented_sends) == (1, 0)
    assert _received(rx, 7) == datagrams


def test_a_kernel_that_refuses_segmentation_gets_batches(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    tx, rx = pair
    scripted = ScriptedSendmsg(failures=1, err=errno.EIO)  # no checksum offload
    monkeypatch.setattr(sendpath, "_c_binding", lambda: scripted.binding)
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    datagrams = _frame_datagrams()
    for _ in range(2):
        assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, viewer) == 7
        assert _received(rx, 7) == datagrams
    # Tried once, then never again; every datagram counted once.
    assert scripted.calls == 1 and path.segmented_sends == 0
    assert path.stats()["segmentation"] is False
    media = viewer.kinds[MEDIA]
    assert (media.attempted, media.sent) == (14, 14)
    _balanced(viewer, path.counters)


async def test_a_full_socket_refuses_the_whole_segmented_send(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    tx, rx = pair
    scripted = ScriptedSendmsg(failures=1, err=errno.EAGAIN)
    monkeypatch.setattr(sendpath, "_c_binding", lambda: scripted.binding)
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    datagrams = _frame_datagrams()
    assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, viewer) == 0
    assert path.blocked
    media = viewer.kinds[MEDIA]
    assert (media.attempted, media.sent, media.dropped_would_block) == (7, 0, 7)
    _balanced(viewer, path.counters)
    assert _nothing_more(rx)
    # Segmentation itself still works: the next frame after the socket drained.
    for _ in range(100):
        if not path.blocked:
            break
        await asyncio.sleep(0.01)
    assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, viewer) == 7
    assert path.segmented_sends == 1
    rx.setblocking(True)
    rx.settimeout(2)
    assert _received(rx, 7) == datagrams
    path.close()


def test_batch_leaves_in_one_system_call(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    path = SendPath(tx)
    assert path.batching and path.stats()["batching"] is True
    viewer = SendCounters("ab12")
    datagrams = _datagrams(7)
    assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, viewer) == 7
    assert path.send_calls == 1
    assert _received(rx, 7) == datagrams
    media = viewer.kinds[MEDIA]
    assert (media.attempted, media.sent, media.bytes_sent) == (7, 7, sum(map(len, datagrams)))
    total = path.counters.kinds[MEDIA]
    assert (total.attempted, total.sent) == (7, 7)
    _balanced(viewer, path.counters)
    # A full batch, and the slots are reused by the next one.
    datagrams = _datagrams(MAX_BATCH, 100)
    assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, viewer) == MAX_BATCH
    assert path.send_calls == 2
    assert _received(rx, MAX_BATCH) == datagrams
    assert path.stats()["send_calls"] == 2


def test_batch_size_is_checked(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    for count in (0, MAX_BATCH + 1):
        with pytest.raises(
            ValueError, match=f"^a staged batch holds 1 to 64 datagrams, not {count}$"
        ):
            path.send_staged(count, _addr(rx), MEDIA, viewer)
    with pytest.raises(ValueError, match="^datagram of 2049 bytes does not fit a 2048-byte slot$"):
        path.staging.put(0, bytes(SLOT_SIZE + 1))
    assert viewer.kinds[MEDIA].attempted == 0 and path.send_calls == 0


async def test_eagain_part_way_drops_the_rest_and_blocks(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    tx, rx = pair
    scripted = _scripted(monkeypatch, budget=3, err=errno.EAGAIN)
    path = SendPath(tx)
    assert path.batching
    viewer = SendCounters("ab12")
    datagrams = _datagrams(7)
    assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, viewer) == 3
    # The first call took 3 and lost the error; the second from the 4th reported it.
    assert scripted.calls == 2 and path.send_calls == 2
    assert path.blocked and path.times_blocked == 1
    media = viewer.kinds[MEDIA]
    assert (media.attempted, media.sent, media.dropped_would_block) == (7, 3, 4)
    assert media.bytes_sent == sum(map(len, datagrams[:3]))
    assert path.counters.kinds[MEDIA].dropped_would_block == 4
    _balanced(viewer, path.counters)
    # While blocked, a media batch is dropped without a system call.
    assert path.send_staged(_stage(path, datagrams[:2]), _addr(rx), MEDIA, viewer) == 0
    assert scripted.calls == 2 and path.send_calls == 2
    assert media.dropped_would_block == 6
    _balanced(viewer, path.counters)
    assert _received(rx, 3) == datagrams[:3]
    assert _nothing_more(rx)
    # The socket is writable: the writer fires and unblocks the path.
    for _ in range(100):
        if not path.blocked:
            break
        await asyncio.sleep(0.01)
    assert not path.blocked
    path.close()


async def test_eagain_part_way_queues_control_datagrams(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    tx, rx = pair
    _scripted(monkeypatch, budget=2, err=errno.EAGAIN)
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    datagrams = _datagrams(5)
    assert path.send_staged(_stage(path, datagrams), _addr(rx), TrafficKind.RTCP, viewer) == 2
    rtcp = viewer.kinds[TrafficKind.RTCP]
    assert (rtcp.attempted, rtcp.sent, rtcp.queued) == (5, 2, 3)
    assert path.blocked and path.queued == 3
    _balanced(viewer, path.counters)
    # The queue holds copies: reusing the slots does not change what is sent later.
    _stage(path, _datagrams(5, 50))
    for _ in range(100):
        if not path.blocked:
            break
        await asyncio.sleep(0.01)
    assert not path.blocked and path.queued == 0
    assert _received(rx, 5) == datagrams
    assert (rtcp.attempted, rtcp.sent, rtcp.queued) == (5, 5, 0)
    _balanced(viewer, path.counters)
    path.close()


@pytest.mark.parametrize(
    ("err", "field"),
    [(errno.ENOBUFS, "dropped_no_buffer"), (errno.EPERM, "errors")],
)
def test_other_errors_part_way(
    pair: tuple[socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    err: int,
    field: str,
) -> None:
    tx, rx = pair
    _scripted(monkeypatch, budget=4, err=err)
    path = SendPath(tx)
    viewer = SendCounters("ab12")
    assert path.send_staged(_stage(path, _datagrams(6)), _addr(rx), MEDIA, viewer) == 4
    media = viewer.kinds[MEDIA]
    assert (media.attempted, media.sent, getattr(media, field)) == (6, 4, 2)
    assert viewer.errors_by_errno == ({errno.EPERM: 2} if err == errno.EPERM else {})
    assert not path.blocked  # only a full socket blocks the path
    _balanced(viewer, path.counters)


def test_closed_path_drops_a_batch_without_a_system_call(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    path = SendPath(tx)
    path.close()
    viewer = SendCounters("ab12")
    assert path.send_staged(_stage(path, _datagrams(3)), _addr(rx), MEDIA, viewer) == 0
    assert viewer.kinds[MEDIA].dropped_closed == 3 and path.send_calls == 0
    _balanced(viewer, path.counters)


def _closed_port() -> tuple[str, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return _addr(s)


def test_batch_to_a_vanished_viewer_is_sent_to_the_end(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Each datagram to a closed port comes back as an ICMP error at once on loopback,
    which refuses the next datagram of the same sendmmsg call: the kernel stops there
    and loses the error. The path carries on from there until all are taken."""
    tx, _ = pair
    path = SendPath(tx)
    viewer = SendCounters("gone")
    assert path.send_staged(_stage(path, _datagrams(5)), _closed_port(), MEDIA, viewer) == 5
    assert 1 <= path.send_calls <= 10
    media = viewer.kinds[MEDIA]
    assert (media.attempted, media.sent, media.errors) == (5, 5, 0)


def test_pending_icmp_error_does_not_cost_the_batch(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    path = SendPath(tx)
    gone, other = SendCounters("gone"), SendCounters("other")
    path.send(b"hello?", _closed_port(), MEDIA, gone)
    assert select.select([tx], [], [], 2)[0]  # the ICMP error is back, and pending
    datagrams = _datagrams(4)
    assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, other) == 4
    assert _received(rx, 4) == datagrams
    assert other.kinds[MEDIA].errors == 0 and other.errors_by_errno == {}
    assert path.stats()["icmp_errors"] == {"ECONNREFUSED": 1}


def test_ipv6_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            tx.bind(("::", 0))
            rx6.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
        rx4.bind(("127.0.0.1", 0))
        for rx in (rx6, rx4):
            rx.settimeout(2)
        path = SendPath(tx)
        assert path.batching
        viewer = SendCounters("v6")
        datagrams = _datagrams(3)
        assert path.send_staged(_stage(path, datagrams), _addr(rx6), MEDIA, viewer) == 3
        assert _received(rx6, 3) == datagrams
        # The 4-tuple form recvfrom gives, and an IPv4-mapped peer of a dual-stack socket.
        host, port, flow, scope = rx6.getsockname()
        full: Any = (host, port, flow, scope)
        assert path.send_staged(_stage(path, datagrams), full, MEDIA, viewer) == 3
        assert _received(rx6, 3) == datagrams
        mapped = ("::ffff:127.0.0.1", rx4.getsockname()[1])
        assert path.send_staged(_stage(path, datagrams), mapped, MEDIA, viewer) == 3
        assert _received(rx4, 3) == datagrams
        assert path.send_calls == 3
        # A scoped address is left to sendto, which resolves the scope name.
        scoped = (f"{host}%1", port)
        assert path.send_staged(_stage(path, datagrams), scoped, MEDIA, viewer) == 3
        assert path.send_calls == 6
        assert _received(rx6, 3) == datagrams
        _balanced(viewer)
    finally:
        for s in (tx, rx6, rx4):
            s.close()


# -- without sendmmsg: one sendto per datagram -------------------------------------------


def _check_fallback(tx: socket.socket, rx: socket.socket, path: SendPath) -> None:
    assert not path.batching and path.stats()["batching"] is False
    viewer = SendCounters("ab12")
    datagrams = _datagrams(5)
    assert path.send_staged(_stage(path, datagrams), _addr(rx), MEDIA, viewer) == 5
    assert path.send_calls == 5
    assert _received(rx, 5) == datagrams
    media = viewer.kinds[MEDIA]
    assert (media.attempted, media.sent, media.bytes_sent) == (5, 5, sum(map(len, datagrams)))
    _balanced(viewer, path.counters)


@pytest.mark.usefixtures("fresh_binding")
def test_fallback_without_cffi(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cffi", None)  # import cffi raises ImportError
    assert sendpath._c_binding() is None
    tx, rx = pair
    path = SendPath(tx)
    assert path.staging.pointers == [None] * MAX_BATCH  # slots in a bytearray
    _check_fallback(tx, rx, path)


@pytest.mark.usefixtures("fresh_binding")
def test_fallback_without_sendmmsg(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    binding = sendpath._c_binding()
    assert binding is not None and binding.sendmmsg is None
    tx, rx = pair
    path = SendPath(tx)
    assert path.staging.pointers[0] is not None  # C memory all the same
    _check_fallback(tx, rx, path)


def test_fallback_when_asked(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    _check_fallback(tx, rx, SendPath(tx, batch=False))


def test_a_subclass_overriding_send_sees_every_datagram(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    class Watched(SendPath):
        def send(
            self, data: bytes, addr: tuple[str, int], kind: TrafficKind, counters: SendCounters
        ) -> SendOutcome:
            return super().send(data, addr, kind, counters)

    tx, _ = pair
    assert not Watched(tx).batching


# -- RtpWriter builds packets in the slots ----------------------------------------------


def _sessions() -> tuple[Session, Session]:
    """Two outbound sessions with one key: the second checks what the first protected."""
    key = os.urandom(30)
    policies = [
        Policy(
            key=key,
            ssrc_type=Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
        )
        for _ in range(2)
    ]
    return Session(policies[0]), Session(policies[1])


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("c_memory", [True, False])
def test_rtp_writer_builds_in_place_what_write_returns(direct: bool, c_memory: bool) -> None:
    mine, theirs = _sessions()
    writer = RtpWriter(mine, direct=direct)
    assert writer.direct is direct
    binding = sendpath._c_binding()
    staging = Staging(binding.ffi if c_memory and binding is not None else None)
    payloads = [os.urandom(100 + 500 * i) for i in range(3)]
    for i, payload in enumerate(payloads):
        writer.write_into(staging, i, 0x80 | 96, 1000 + i, 1234, 5678, payload)
    for i, payload in enumerate(payloads):
        expected = theirs.protect(RTP_HEADER.pack(0x80, 0x80 | 96, 1000 + i, 1234, 5678) + payload)
        assert staging.lengths[i] == len(expected)
        assert bytes(staging.views[i][: staging.lengths[i]]) == expected
    # Too long for the buffer (ours, or pylibsrtp's when not direct).
    message = "RTP packet of 1913 bytes is longer than 1904" if direct else "packet is too long"
    with pytest.raises(ValueError, match=f"^{message}"):
        writer.write_into(staging, 0, 96, 1, 2, 3, bytes(1901))


# -- a viewer sends each frame in one system call ------------------------------------------


async def test_viewer_sends_a_frame_in_one_system_call() -> None:
    async with make_rig(RtcConfig()) as rig:
        path, track = rig.send_path, rig.session.video
        assert path.batching and track is not None
        first = track.seq
        calls = path.send_calls
        rig.stream.push(video(0, keyframe=True, packets=7, size=900))
        assert path.send_calls == calls + 1
        count = MAX_BATCH + 6  # two batches
        rig.stream.push(video(1, packets=count, size=300))
        assert path.send_calls == calls + 3
        await _wait(lambda: len(rig.browser.packets(102)) == 7 + count)
        got = rig.browser.packets(102)
        assert [p.sequence_number for p in got] == [(first + i) & 0xFFFF for i in range(7 + count)]
        assert [i for i, p in enumerate(got) if p.marker] == [6, 7 + count - 1]
        assert [len(p.payload) for p in got] == [900] * 7 + [300] * count
        media = rig.session.counters.kinds[MEDIA]
        assert (media.attempted, media.sent) == (7 + count, 7 + count)
        assert (track.packets, track.octets) == (7 + count, 7 * 900 + count * 300)


async def test_viewer_frame_refused_part_way(monkeypatch: pytest.MonkeyPatch) -> None:
    # The DTLS handshake needs a few single sends (sendto); budget counts batches only.
    _scripted(monkeypatch, budget=7 + 3, err=errno.ENOBUFS)
    async with make_rig(RtcConfig()) as rig:
        session, track = rig.session, rig.session.video
        assert track is not None
        first = track.seq
        tokens, fraction = session.nack.budget.tokens, session.nack.budget.fraction
        rig.stream.push(video(0, keyframe=True, packets=7, size=100))
        rig.stream.push(video(1, packets=6, size=50))  # 3 sent, 3 refused
        await _wait(lambda: len(rig.browser.packets(102)) == 10)
        dropped = session.stats()["congestion"]["frames_dropped"]
        assert dropped["broken"] == 1
        media = session.counters.kinds[MEDIA]
        assert (media.attempted, media.sent, media.dropped_no_buffer) == (13, 10, 3)
        # All 13 were numbered and protected: they are in the history, for NACKs.
        assert (track.packets, track.octets) == (13, 7 * 100 + 6 * 50)
        assert track.seq == (first + 13) & 0xFFFF
        assert track.history.find((first + 12) & 0xFFFF) != -1
        # Retransmit credit only for what left, headers included.
        earned = (7 * 100 + 3 * 50 + 10 * RTP_HEADER_SIZE) * fraction
        assert session.nack.budget.tokens == pytest.approx(tokens + earned)
        _balanced(session.counters, rig.send_path.counters)
