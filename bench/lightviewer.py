"""Many lightweight WHEP viewers in one process, for load tests.

Every viewer does what a browser does on the wire, minus decoding: a real WHEP POST,
ICE as the controlling agent (Binding requests with USE-CANDIDATE, then consent
every 5 s, RFC 7675; it also answers the peer's own checks, for a full-ICE server),
a DTLS-SRTP client handshake, SRTP/SRTCP decryption of every packet, and an RTCP
receiver report (loss, jitter, LSR/DLSR) per track every second. It counts packets,
bytes and sequence gaps per track and the handshake time (POST sent -> first RTP).

    python bench/lightviewer.py --url http://127.0.0.1:1985/whep/live/test --count 50

With --duration it connects, measures for that many seconds, prints one report and
exits. Without it, it is driven over stdin, one word per line:

- ``mark``: start a measuring window (counters and this process's CPU time);
- ``report``: print the window's figures;
- ``stop``: DELETE every session and exit.

Events go to stdout as one JSON object per line ({"event": "ready" | "marked" |
"report" | "stopped", ...}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import secrets
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aioice import stun
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from srsrelay.webrtc.dtls import DtlsSrtp, generate_certificate, sha256_fingerprint  # noqa: E402

RECV_SIZE = 2048
"""Largest datagram read, bytes (the relay sends at most ~1250)."""
RCVBUF = 1 << 20
"""SO_RCVBUF of each viewer's socket, bytes: room for bursts while the process is busy."""
PENDING_LIMIT = 256
"""SRTP datagrams held per viewer while its DTLS handshake is finishing; more are dropped."""
ICE_RETRY = 0.05
"""Seconds between Binding request retransmissions until the first response."""
CONSENT_INTERVAL = 5.0
"""Seconds between consent freshness requests (RFC 7675 section 5.1)."""
REPORT_INTERVAL = 1.0
"""Seconds between RTCP receiver reports."""
CONNECT_TIMEOUT = 15.0
"""Seconds a viewer has from its POST to its first RTP packet."""
CONNECT_CONCURRENCY = 16
"""Viewers connecting at the same time."""
RTCP_SR = 200
RTCP_RR = 201
RTCP_SDES = 202


def _answer_value(sdp: str, name: str) -> str:
    m = re.search(rf"^a={name}:(.+?)\s*$", sdp, re.M)
    if m is None:
        raise ValueError(f"WHEP answer has no a={name}")
    return m.group(1)


@dataclass(frozen=True, slots=True)
class Answer:
    """What a viewer needs from the server's SDP answer."""

    ice_ufrag: str
    """The server's ice-ufrag."""
    ice_pwd: str
    """The server's ice-pwd."""
    fingerprint: str
    """The server's sha-256 certificate fingerprint."""
    address: tuple[str, int]
    """The first IPv4 UDP host candidate."""
    clock_rates: dict[int, int]
    """RTP clock rate by payload type."""
    rtx: frozenset[int]
    """Payload types of RTX (retransmissions)."""


def parse_answer(sdp: str) -> Answer:
    cand = re.search(
        r"^a=candidate:\S+ 1 udp \d+ (\d+\.\d+\.\d+\.\d+) (\d+) typ host", sdp, re.M | re.I
    )
    if cand is None:
        raise ValueError("WHEP answer has no IPv4 UDP host candidate")
    rates: dict[int, int] = {}
    rtx: set[int] = set()
    for pt, name, rate in re.findall(r"^a=rtpmap:(\d+) ([\w-]+)/(\d+)", sdp, re.M):
        rates[int(pt)] = int(rate)
        if name.lower() == "rtx":
            rtx.add(int(pt))
    fp = _answer_value(sdp, "fingerprint")
    algorithm, _, value = fp.partition(" ")
    if algorithm.lower() != "sha-256":
        raise ValueError(f"WHEP answer fingerprint is {algorithm}, not sha-256")
    return Answer(
        ice_ufrag=_answer_value(sdp, "ice-ufrag"),
        ice_pwd=_answer_value(sdp, "ice-pwd"),
        fingerprint=value,
        address=(cand.group(1), int(cand.group(2))),
        clock_rates=rates,
        rtx=frozenset(rtx),
    )


def build_offer(ufrag: str, pwd: str, fingerprint: str, port: int) -> str:
    """A recvonly H.264 + Opus offer; setup:active (we are the DTLS client)."""
    common = (
        "c=IN IP4 0.0.0.0\r\n"
        f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n"
        f"a=fingerprint:sha-256 {fingerprint}\r\na=setup:active\r\n"
        "a=recvonly\r\na=rtcp-mux\r\n"
        f"a=candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host\r\n"
        "a=end-of-candidates\r\n"
    )
    return (
        "v=0\r\n"
        f"o=- {random.getrandbits(62)} 1 IN IP4 127.0.0.1\r\n"
        "s=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 102 103\r\n"
        f"{common}a=mid:0\r\n"
        "a=rtpmap:102 H264/90000\r\n"
        "a=rtcp-fb:102 nack\r\na=rtcp-fb:102 nack pli\r\n"
        "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n"
        "a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
        f"{common}a=mid:1\r\n"
        "a=rtpmap:111 opus/48000/2\r\n"
    )


@dataclass(slots=True)
class TrackStats:
    """Reception state of one SSRC (RFC 3550 appendix A.1, A.3, A.8)."""

    ssrc: int
    """The sender's SSRC."""
    clock_rate: int
    """RTP clock rate of its payload type, Hz."""
    video: bool
    """Video (clock 90 kHz) rather than audio."""
    base_ext: int
    """Extended sequence number of the first packet."""
    max_ext: int
    """Highest extended sequence number seen."""
    received: int = 0
    """Packets received."""
    octets: int = 0
    """Payload-carrying datagram bytes received (after SRTP)."""
    frames: int = 0
    """Packets with the marker bit: for video, the last packet of each frame (RFC 6184)."""
    jitter: float = 0.0
    """Interarrival jitter, timestamp units."""
    last_transit: int | None = None
    """Arrival time minus RTP timestamp of the previous packet, timestamp units."""
    expected_prior: int = 0
    """Expected count at the previous RR (for fraction lost)."""
    received_prior: int = 0
    """Received count at the previous RR."""
    mark_max_ext: int = 0
    """max_ext at the start of the measuring window."""
    mark_received: int = 0
    """received at the start of the measuring window."""
    mark_octets: int = 0
    """octets at the start of the measuring window."""
    mark_frames: int = 0
    """frames at the start of the measuring window."""
    lsr: int = 0
    """Middle 32 bits of the NTP time of the last SR about this SSRC."""
    lsr_at: float = 0.0
    """When that SR arrived (monotonic)."""

    def on_packet(self, seq: int, timestamp: int, size: int, now: float, marker: bool) -> None:
        prev = self.max_ext & 0xFFFF
        delta = (seq - prev) & 0xFFFF
        if delta < 0x8000:
            self.max_ext += delta
        # Older packets (reordering) count as received and leave max_ext alone.
        self.received += 1
        self.octets += size
        self.frames += marker
        transit = int(now * self.clock_rate) - timestamp
        if self.last_transit is not None:
            d = abs(transit - self.last_transit)
            self.jitter += (d - self.jitter) / 16
        self.last_transit = transit

    @property
    def expected(self) -> int:
        return self.max_ext - self.base_ext + 1

    def report_block(self, now: float) -> bytes:
        expected = self.expected
        lost = max(0, expected - self.received)
        interval_expected = expected - self.expected_prior
        interval_lost = interval_expected - (self.received - self.received_prior)
        self.expected_prior, self.received_prior = expected, self.received
        fraction = 0
        if interval_expected > 0 and interval_lost > 0:
            fraction = min(255, (interval_lost << 8) // interval_expected)
        dlsr = int((now - self.lsr_at) * 65536) if self.lsr else 0
        return struct.pack(
            "!IB3sIIII",
            self.ssrc,
            fraction,
            min(lost, 0x7FFFFF).to_bytes(3, "big"),
            self.max_ext & 0xFFFFFFFF,
            int(self.jitter),
            self.lsr,
            dlsr & 0xFFFFFFFF,
        )

    def mark(self) -> None:
        self.mark_max_ext, self.mark_received = self.max_ext, self.received
        self.mark_octets, self.mark_frames = self.octets, self.frames


@dataclass(slots=True)
class WindowCounts:
    """Sums over the measuring window."""

    expected: int = 0
    """Packets the sequence numbers say were sent."""
    received: int = 0
    """Packets received."""
    octets: int = 0
    """Bytes received."""
    frames: int = 0
    """Packets with the marker bit (video: frames completed)."""


class LightViewer:
    """One viewer: a UDP socket, ICE-controlling checks, a DTLS client and counters."""

    def __init__(self, url: str, cert: Any, fingerprint: str) -> None:
        self.url = url
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.ufrag = secrets.token_hex(4)
        self.pwd = secrets.token_hex(12)
        self.fingerprint = fingerprint
        self.dtls = DtlsSrtp(cert, self._send, role="controlled")
        self.answer: Answer | None = None
        self.location: str | None = None
        self.tracks: dict[int, TrackStats] = {}
        self.rtx_packets = 0
        self.undecryptable = 0
        self.pending: list[bytes] = []
        self.pending_dropped = 0
        self.posted_at = 0.0
        self.first_rtp_at: float | None = None
        self.error: str | None = None
        self._ice_tid: bytes | None = None
        self._ice_ok = asyncio.Event()
        self._first_rtp = asyncio.Event()
        self._tiebreaker = random.getrandbits(64)
        self._rtcp_ssrc = random.getrandbits(32)
        self._tasks: list[asyncio.Task[Any]] = []
        self._reading = False

    @property
    def handshake_ms(self) -> float | None:
        if self.first_rtp_at is None:
            return None
        return (self.first_rtp_at - self.posted_at) * 1000

    def _send(self, data: bytes) -> None:
        assert self.answer is not None
        try:
            self.sock.sendto(data, self.answer.address)
        except OSError:
            pass  # a full loopback buffer loses the datagram, as a network would

    # -- connect -------------------------------------------------------------------

    async def connect(self, http: aiohttp.ClientSession) -> None:
        port = self.sock.getsockname()[1]
        offer = build_offer(self.ufrag, self.pwd, self.fingerprint, port)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._on_readable)
        self._reading = True
        self.posted_at = time.monotonic()
        async with http.post(
            self.url, data=offer, headers={"Content-Type": "application/sdp"}
        ) as resp:
            body = await resp.text()
            if resp.status != 201:
                raise RuntimeError(f"WHEP POST answered {resp.status}: {body[:200]}")
            location = resp.headers.get("Location")
        if location is not None:
            self.location = str(resp.url.join(URL(location)))
        self.answer = parse_answer(body)
        for _ in range(int(5 / ICE_RETRY)):
            self._send_binding(nominate=True)
            try:
                await asyncio.wait_for(self._ice_ok.wait(), ICE_RETRY)
                break
            except TimeoutError:
                continue
        else:
            raise RuntimeError("no STUN Binding response within 5 s")
        self._tasks.append(loop.create_task(self._rtcp_loop()))
        if not await self.dtls.start([("sha-256", self.answer.fingerprint)]):
            raise RuntimeError("DTLS handshake failed")
        for data in self.pending:
            self._on_srtp(data, time.monotonic())
        self.pending.clear()
        await self._first_rtp.wait()

    def _send_binding(self, nominate: bool) -> None:
        assert self.answer is not None
        attrs: dict[str, Any] = {
            "USERNAME": f"{self.answer.ice_ufrag}:{self.ufrag}",
            "PRIORITY": 1853824767,
            "ICE-CONTROLLING": self._tiebreaker,
        }
        if nominate:
            attrs["USE-CANDIDATE"] = None
        request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, attributes=attrs)
        request.add_message_integrity(self.answer.ice_pwd.encode())
        self._ice_tid = request.transaction_id
        self._send(bytes(request))

    def _on_stun(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            message = stun.parse_message(data)
        except ValueError:
            return
        if message.message_method != stun.Method.BINDING:
            return
        if message.message_class == stun.Class.RESPONSE:
            if message.transaction_id == self._ice_tid:
                self._ice_ok.set()
        elif message.message_class == stun.Class.REQUEST:
            # A full-ICE server checks us too (RFC 8445 section 7.3): answer with our pwd.
            if not message.check_message_integrity(self.pwd.encode()):
                return
            response = stun.Message(
                stun.Method.BINDING,
                stun.Class.RESPONSE,
                transaction_id=message.transaction_id,
                attributes={"XOR-MAPPED-ADDRESS": addr},
            )
            response.add_message_integrity(self.pwd.encode())
            try:
                self.sock.sendto(bytes(response), addr)
            except OSError:
                pass

    # -- receive -------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self.sock
        now = time.monotonic()
        while True:
            try:
                data, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if not data:
                continue
            first = data[0]
            if first < 4:
                self._on_stun(data, addr)
            elif 20 <= first <= 63:
                self.dtls.feed(data)
            elif 128 <= first <= 191:
                if self.dtls.connected:
                    self._on_srtp(data, now)
                elif len(self.pending) < PENDING_LIMIT:
                    self.pending.append(data)
                else:
                    self.pending_dropped += 1

    def _on_srtp(self, data: bytes, now: float) -> None:
        if 192 <= data[1] <= 223:  # RFC 5761 section 4
            plain = self.dtls.unprotect_rtcp(data)
            if plain is None:
                self.undecryptable += 1
            else:
                self._on_rtcp(plain, now)
            return
        plain = self.dtls.unprotect_rtp(data)
        if plain is None:
            self.undecryptable += 1
            return
        pt = plain[1] & 0x7F
        assert self.answer is not None
        if pt in self.answer.rtx:
            self.rtx_packets += 1
            return
        seq, timestamp, ssrc = struct.unpack_from("!HII", plain, 2)
        track = self.tracks.get(ssrc)
        if track is None:
            rate = self.answer.clock_rates.get(pt, 90000)
            track = TrackStats(ssrc, rate, rate == 90000, seq, seq, mark_max_ext=seq - 1)
            self.tracks[ssrc] = track
        track.on_packet(seq, timestamp, len(plain), now, plain[1] >= 0x80)
        if self.first_rtp_at is None:
            self.first_rtp_at = now
            self._first_rtp.set()

    def _on_rtcp(self, plain: bytes, now: float) -> None:
        offset = 0
        while offset + 8 <= len(plain):
            pt = plain[offset + 1]
            length = (struct.unpack_from("!H", plain, offset + 2)[0] + 1) * 4
            if pt == RTCP_SR and offset + 16 <= len(plain):
                ssrc, ntp = struct.unpack_from("!IQ", plain, offset + 4)
                track = self.tracks.get(ssrc)
                if track is not None:
                    track.lsr = (ntp >> 16) & 0xFFFFFFFF
                    track.lsr_at = now
            offset += length

    # -- RTCP and consent ----------------------------------------------------------

    async def _rtcp_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(REPORT_INTERVAL * random.uniform(0.9, 1.1))
            ticks += 1
            if ticks % int(CONSENT_INTERVAL / REPORT_INTERVAL) == 0:
                self._send_binding(nominate=True)
            if self.dtls.connected and self.tracks:
                self._send(self.dtls.protect_rtcp(self._receiver_report(time.monotonic())))

    def _receiver_report(self, now: float) -> bytes:
        blocks = b"".join(t.report_block(now) for t in list(self.tracks.values())[:31])
        count = len(blocks) // 24
        rr = struct.pack("!BBHI", 0x80 | count, RTCP_RR, 1 + len(blocks) // 4, self._rtcp_ssrc)
        cname = self.ufrag.encode()
        item = bytes([1, len(cname)]) + cname
        chunk = struct.pack("!I", self._rtcp_ssrc) + item + b"\x00"
        chunk += bytes(-len(chunk) % 4)
        sdes = struct.pack("!BBH", 0x81, RTCP_SDES, len(chunk) // 4) + chunk
        return rr + blocks + sdes

    # -- window and stop -----------------------------------------------------------

    def mark(self) -> None:
        for track in self.tracks.values():
            track.mark()

    def window(self) -> dict[str, WindowCounts]:
        out = {"video": WindowCounts(), "audio": WindowCounts()}
        for track in self.tracks.values():
            w = out["video" if track.video else "audio"]
            w.expected += track.max_ext - track.mark_max_ext
            w.received += track.received - track.mark_received
            w.octets += track.octets - track.mark_octets
            w.frames += track.frames - track.mark_frames
        return out

    async def close(self, http: aiohttp.ClientSession | None) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if http is not None and self.location is not None:
            try:
                async with http.delete(self.location) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False
        await self.dtls.stop()
        self.sock.close()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Swarm:
    """All viewers of this process and the measuring window."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.count = count
        self.viewers: list[LightViewer] = []
        self._mark_cpu = 0.0
        self._mark_wall = 0.0
        self.http: aiohttp.ClientSession | None = None

    async def connect(self) -> dict[str, Any]:
        cert = generate_certificate()
        fingerprint = sha256_fingerprint(cert)
        connector = aiohttp.TCPConnector(limit=CONNECT_CONCURRENCY)
        self.http = aiohttp.ClientSession(connector=connector)
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        started = time.monotonic()

        async def one() -> None:
            viewer = LightViewer(self.url, cert, fingerprint)
            self.viewers.append(viewer)
            async with gate:
                assert self.http is not None
                try:
                    await asyncio.wait_for(viewer.connect(self.http), CONNECT_TIMEOUT)
                except (TimeoutError, RuntimeError, ValueError, aiohttp.ClientError) as exc:
                    viewer.error = f"{type(exc).__name__}: {exc}"

        await asyncio.gather(*(one() for _ in range(self.count)))
        handshakes = [v.handshake_ms for v in self.viewers if v.handshake_ms is not None]
        errors = [v.error for v in self.viewers if v.error]
        return {
            "event": "ready",
            "connected": len(handshakes),
            "failed": len(errors),
            "errors": sorted(set(errors))[:5],
            "connect_seconds": round(time.monotonic() - started, 3),
            "handshake_ms": [round(h, 1) for h in handshakes],
        }

    def mark(self) -> dict[str, Any]:
        for v in self.viewers:
            v.mark()
        self._mark_cpu = _cpu_seconds()
        self._mark_wall = time.monotonic()
        return {"event": "marked"}

    def report(self) -> dict[str, Any]:
        wall = time.monotonic() - self._mark_wall
        cpu = _cpu_seconds() - self._mark_cpu
        kinds: dict[str, dict[str, float]] = {}
        starved = 0
        alive = max(1, len([v for v in self.viewers if v.error is None]))
        for kind in ("video", "audio"):
            total = WindowCounts()
            for v in self.viewers:
                w = v.window()[kind]
                total.expected += w.expected
                total.received += w.received
                total.octets += w.octets
                total.frames += w.frames
            lost = max(0, total.expected - total.received)
            kinds[kind] = {
                "expected": total.expected,
                "received": total.received,
                "lost": lost,
                "loss_pct": 100 * lost / total.expected if total.expected else 0.0,
                "kbit_per_viewer": total.octets * 8 / 1000 / wall / alive,
                "frames_per_viewer_s": total.frames / wall / alive,
            }
        for v in self.viewers:
            if v.error is None and sum(w.received for w in v.window().values()) == 0:
                starved += 1
        return {
            "event": "report",
            "viewers": len([v for v in self.viewers if v.error is None]),
            "starved": starved,
            "wall_seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3),
            "cpu_pct": round(100 * cpu / wall, 1) if wall > 0 else 0.0,
            "tracks": kinds,
            "rtx_packets": sum(v.rtx_packets for v in self.viewers),
            "undecryptable": sum(v.undecryptable for v in self.viewers),
            "pending_dropped": sum(v.pending_dropped for v in self.viewers),
        }

    async def stop(self) -> dict[str, Any]:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(v: LightViewer) -> None:
            async with gate:
                await v.close(self.http)

        await asyncio.gather(*(one(v) for v in self.viewers), return_exceptions=True)
        if self.http is not None:
            await self.http.close()
        return {"event": "stopped"}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=4096)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run(args: argparse.Namespace) -> int:
    swarm = Swarm(args.url, args.count)
    _emit(await swarm.connect())
    try:
        if args.duration is not None:
            _emit(swarm.mark())
            await asyncio.sleep(args.duration)
            _emit(swarm.report())
            return 0
        reader = await _commands()
        while True:
            line = (await reader.readline()).decode().strip()
            if line == "mark":
                _emit(swarm.mark())
            elif line == "report":
                _emit(swarm.report())
            elif line in ("stop", ""):  # "" is EOF: the controller went away
                return 0
            else:
                _emit({"event": "error", "message": f"unknown command {line!r}"})
    finally:
        _emit(await swarm.stop())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="WHEP endpoint, e.g. .../whep/live/test")
    parser.add_argument("--count", type=int, default=10, help="viewers (default 10)")
    parser.add_argument("--duration", type=float, help="measure this long, report and exit")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
