"""Per-viewer hot path: microseconds per RTP packet and viewers per core.

Builds `--viewers` real ViewerSessions of one stream, each with a real DTLS-SRTP
handshake (an in-process DTLS client per viewer on its own loopback socket), all
sending through one real SendPath on one UDP socket, as the server does. Then it
fans synthetic frames out the way the hub does (every reader's ``on_frame``, frame
by frame) as fast as the CPU allows, and times it with the process CPU clock
(user + system, so the send system calls count: one sendmmsg per video frame to a
viewer where the send path batches, else one sendto per packet):

- us/packet: CPU per media RTP packet sent (header rewrite, SRTP, system calls, counters,
  NACK history, congestion and latency accounting, per-frame work spread over
  the frame's packets);
- viewers/core: viewer-seconds of stream served per CPU second.

Video is 30 fps of `--payload`-byte packets summing to the bitrate (a keyframe every
2 s), audio 50 packets/s of 120 bytes (Opus at ~48 kbit/s). Nothing reads the
viewers' sockets once the handshake is done: the kernel drops what overflows them,
as a NIC would take it, so the sender's cost is what is measured. The event loop
runs between two stream-seconds (timers, Sender Reports).

    python bench/hotpath.py                      # this tree
    python bench/hotpath.py --compare HEAD       # HEAD's srsrelay, then this tree, alternately
    python bench/hotpath.py --sendto             # this tree, one sendto per packet (no batches)

Short repetitions, many of them, best counts: on a shared machine that filters out
the time other processes take from this one's caches and cores.
    python bench/hotpath.py --json               # one JSON object (used by --compare)
    py-spy record --format raw -o stacks.txt -- python bench/hotpath.py --seconds 20
    python bench/hotpath.py --top stacks.txt     # self time per function in the fan-out

HOTPATH_SRC=<dir> imports srsrelay from <dir> instead of this tree.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("HOTPATH_SRC") or str(ROOT))

from srsrelay.config import RtcConfig  # noqa: E402
from srsrelay.hub.frames import MediaKind, RtpFrame  # noqa: E402
from srsrelay.webrtc.dtls import DtlsSrtp, generate_certificate  # noqa: E402

try:
    from srsrelay.hub.timeline import ArrivalAnchor
except ImportError:  # an older revision (--compare): its viewers keep their own anchor
    ArrivalAnchor = None  # type: ignore[assignment,misc]
from srsrelay.webrtc.latency import LatencyHistogram  # noqa: E402
from srsrelay.webrtc.sdp import parse_offer  # noqa: E402
from srsrelay.webrtc.sendpath import SendPath, TrafficKind  # noqa: E402
from srsrelay.webrtc.viewer import (  # noqa: E402
    FrameReader,
    GopView,
    SessionState,
    StreamSource,
    ViewerSession,
)

FPS = 30
AUDIO_PER_SECOND = 50
AUDIO_PAYLOAD = 120
KEYFRAME_EVERY = 2 * FPS
HANDSHAKE_BATCH = 16
"""Viewers whose DTLS handshakes run at the same time during setup."""
SINK_RCVBUF = 4096
"""SO_RCVBUF of each viewer's socket once connected: overflow is dropped unread."""
FAN_OUT_MARK = "_fan_out_second"
"""The function whose stacks `--top` counts (the measured loop)."""

OFFER = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 102 103\r\na=mid:0\r\na=recvonly\r\n"
    "a=ice-ufrag:them\r\na=ice-pwd:theirpassword1234567890\r\n"
    "a=fingerprint:sha-256 {fp}\r\na=setup:actpass\r\n"
    "a=rtpmap:102 H264/90000\r\n"
    "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n"
    "a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=recvonly\r\n"
    "a=rtpmap:111 opus/48000/2\r\n"
)


class _Gop:
    generation = 0
    frames: list[RtpFrame] = []
    truncated = False


class BenchStream:
    """A stream with no cached GOP (so no catch-up): viewers go live at the first keyframe."""

    key = "bench/hotpath"
    profile_level_id: str | None = "42e01f"
    video_codec = "H264"
    video_fmtp = ""
    rendition: StreamSource | None = None
    has_video = True
    has_audio = True

    def __init__(self) -> None:
        self.readers: list[FrameReader] = []
        self.arrival: Any = ArrivalAnchor() if ArrivalAnchor is not None else None

    @property
    def gop(self) -> GopView:
        return _Gop()

    def add_reader(self, reader: FrameReader) -> None:
        self.readers.append(reader)

    def remove_reader(self, reader: FrameReader) -> None:
        self.readers.remove(reader)


def make_frames(bitrate_kbps: int, seconds: int, payload: int) -> list[list[RtpFrame]]:
    """Per stream-second, the frames in arrival order (video and audio interleaved)."""
    frame_bytes = bitrate_kbps * 1000 // 8 // FPS
    full, rest = divmod(frame_bytes, payload)
    blob = os.urandom(payload)
    video_payloads = tuple([blob] * full + ([blob[:rest]] if rest else []))
    audio_payloads = (blob[:AUDIO_PAYLOAD],)
    out = []
    now = time.monotonic()
    for s in range(seconds):
        events: list[tuple[float, RtpFrame]] = []
        for i in range(FPS):
            n = s * FPS + i
            frame = RtpFrame(
                MediaKind.VIDEO, n * 3000, n % KEYFRAME_EVERY == 0, video_payloads, frame_bytes, now
            )
            events.append((i / FPS, frame))
        for i in range(AUDIO_PER_SECOND):
            n = s * AUDIO_PER_SECOND + i
            frame = RtpFrame(MediaKind.AUDIO, n * 960, False, audio_payloads, AUDIO_PAYLOAD, now)
            events.append((i / AUDIO_PER_SECOND, frame))
        events.sort(key=lambda e: e[0])
        out.append([f for _, f in events])
    return out


@dataclass
class Peer:
    """The browser side of one viewer, during the handshake."""

    sock: socket.socket
    dtls: DtlsSrtp
    reader: asyncio.Task[None] | None = None


async def _read_dtls(peer: Peer) -> None:
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.sock_recv(peer.sock, 2048)
        if 20 <= data[0] <= 63:
            peer.dtls.feed(data)


@dataclass
class Rig:
    stream: BenchStream
    send_path: SendPath
    sock: socket.socket
    sessions: list[ViewerSession]
    peers: list[Peer]


async def _connect(rig: Rig, count: int, config: RtcConfig) -> None:
    cert = generate_certificate()
    server_fp = [(f.algorithm, f.value) for f in cert.getFingerprints()]
    peer_cert = generate_certificate()
    peer_fp = next(f.value for f in peer_cert.getFingerprints() if f.algorithm == "sha-256")
    offer = parse_offer(OFFER.format(fp=peer_fp), profile_level_id="42e01f")
    latency = {MediaKind.VIDEO: LatencyHistogram(), MediaKind.AUDIO: LatencyHistogram()}
    loop = asyncio.get_running_loop()

    async def one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        session = ViewerSession(
            stream=rig.stream,
            offer=offer,
            config=config,
            send_path=rig.send_path,
            certificate=cert,
            port=rig.sock.getsockname()[1],
            latency=latency,
        )
        peer = Peer(sock, DtlsSrtp(peer_cert, session.handle_dtls, role="controlled"))
        rig.sessions.append(session)
        rig.peers.append(peer)
        rig.stream.add_reader(session)
        session.start()
        peer.reader = loop.create_task(_read_dtls(peer))
        addr = sock.getsockname()
        session.ice.on_binding(addr, True, loop.time())
        session.on_remote_address(addr)
        if not await asyncio.wait_for(peer.dtls.start(server_fp), 10):
            raise RuntimeError("DTLS handshake with a viewer failed")
        for _ in range(500):
            if session.state is SessionState.CONNECTED:
                break
            await asyncio.sleep(0.01)
        peer.reader.cancel()
        await asyncio.gather(peer.reader, return_exceptions=True)
        peer.reader = None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SINK_RCVBUF)

    for start in range(0, count, HANDSHAKE_BATCH):
        await asyncio.gather(*(one() for _ in range(min(HANDSHAKE_BATCH, count - start))))
    bad = [s.id for s in rig.sessions if s.state is not SessionState.CONNECTED]
    if bad:
        raise RuntimeError(f"{len(bad)} viewers did not connect")


def _fan_out_second(
    stream: BenchStream, readers: list[ViewerSession], frames: list[RtpFrame]
) -> None:
    # What the hub's Stream._fan_out does for each frame.
    arrival = stream.arrival
    for frame in frames:
        if arrival is not None:
            rate = 90_000 if frame.kind is MediaKind.VIDEO else 48_000
            arrival.update(frame.received_at, frame.timestamp / rate)
        for reader in readers:
            reader.on_frame(frame)


def _media(rig: Rig) -> tuple[int, int]:
    """(sent, not sent) media datagrams over all viewers."""
    sent = lost = 0
    for s in rig.sessions:
        c = s.counters.kinds[TrafficKind.MEDIA]
        sent += c.sent
        lost += c.attempted - c.sent
    return sent, lost


@dataclass
class Result:
    bitrate_kbps: int
    viewers: int
    stream_seconds: int
    packets: int
    """Media packets sent in the best repetition."""
    not_sent: int
    """Media packets attempted but not sent (dropped/errors) in that repetition."""
    frames_dropped: int
    """Video frames the viewers skipped (congestion, blocked send path) in it."""
    cpu_seconds: float
    wall_seconds: float
    us_per_packet: float
    viewers_per_core: float
    packets_per_viewer_second: float
    cpu_seconds_all: list[float]


async def run(
    viewers: int,
    seconds: int,
    bitrates: list[int],
    repeat: int,
    payload: int,
    sendto: bool = False,
) -> list[Result]:
    config = RtcConfig()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.sndbuf)
    # Only this tree's SendPath knows `batch`: pass it only when asked.
    options: dict[str, Any] = {"batch": False} if sendto else {}
    path = SendPath(sock, control_queue=config.control_queue, **options)
    rig = Rig(BenchStream(), path, sock, [], [])
    results = []
    try:
        await _connect(rig, viewers, config)
        for bitrate in bitrates:
            runs = []
            for _ in range(repeat):
                frames = make_frames(bitrate, seconds, payload)
                sent0, lost0 = _media(rig)
                drop0 = sum(sum(s.frames_dropped.values()) for s in rig.sessions)
                await asyncio.sleep(0)
                readers = list(rig.sessions)
                cpu = wall = 0.0
                for second in frames:
                    c0, w0 = time.process_time(), time.perf_counter()
                    _fan_out_second(rig.stream, readers, second)
                    cpu += time.process_time() - c0
                    wall += time.perf_counter() - w0
                    await asyncio.sleep(0)  # timers between stream-seconds (not timed)
                sent, lost = _media(rig)
                drops = sum(sum(s.frames_dropped.values()) for s in rig.sessions) - drop0
                runs.append((cpu, wall, sent - sent0, lost - lost0, drops))
            cpu, wall, packets, lost, drops = min(runs)
            results.append(
                Result(
                    bitrate_kbps=bitrate,
                    viewers=viewers,
                    stream_seconds=seconds,
                    packets=packets,
                    not_sent=lost,
                    frames_dropped=drops,
                    cpu_seconds=round(cpu, 4),
                    wall_seconds=round(wall, 4),
                    us_per_packet=round(cpu / max(packets, 1) * 1e6, 3),
                    viewers_per_core=round(viewers * seconds / cpu, 1),
                    packets_per_viewer_second=round(packets / viewers / seconds, 1),
                    cpu_seconds_all=[round(r[0], 4) for r in runs],
                )
            )
    finally:
        for s in rig.sessions:
            await s.close("bench over")
        for p in rig.peers:
            await p.dtls.stop()
            p.sock.close()
        rig.send_path.close()
        sock.close()
    return results


def print_results(results: list[Result]) -> None:
    print(
        f"{'kbit/s':>7} {'viewers':>7} {'pkt/s/viewer':>12} {'us/packet':>9} "
        f"{'viewers/core':>12} {'not sent':>8} {'frames dropped':>14}"
    )
    for r in results:
        print(
            f"{r.bitrate_kbps:>7} {r.viewers:>7} {r.packets_per_viewer_second:>12} "
            f"{r.us_per_packet:>9.2f} {r.viewers_per_core:>12.0f} {r.not_sent:>8} "
            f"{r.frames_dropped:>14}"
        )


def _child(src: Path | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    env = dict(os.environ)
    env.pop("HOTPATH_SRC", None)
    if src is not None:
        env["HOTPATH_SRC"] = str(src)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--json",
        f"--viewers={args.viewers}",
        f"--seconds={args.seconds}",
        f"--repeat={args.repeat}",
        f"--payload={args.payload}",
        f"--bitrates={args.bitrates}",
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    results: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
    return results


def compare(rev: str, args: argparse.Namespace) -> None:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "srsrelay"], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        before: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
        after: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
        for _ in range(args.rounds):  # alternate, so load from elsewhere hits both
            for r in _child(Path(tmp), args):
                before[r["bitrate_kbps"]].append(r)
            for r in _child(None, args):
                after[r["bitrate_kbps"]].append(r)
    print(
        f"{args.viewers} viewers, {args.seconds} stream-seconds, "
        f"best of {args.repeat} x {args.rounds} runs"
    )
    print(
        f"{'kbit/s':>7} {'pkt/s/viewer':>12} {'us/packet ' + rev:>18} {'us/packet now':>14} "
        f"{'viewers/core ' + rev:>21} {'viewers/core now':>17} {'speedup':>8}"
    )
    for bitrate in before:
        b = min(before[bitrate], key=lambda r: float(r["us_per_packet"]))
        a = min(after[bitrate], key=lambda r: float(r["us_per_packet"]))
        print(
            f"{bitrate:>7} {a['packets_per_viewer_second']:>12} {b['us_per_packet']:>18.2f} "
            f"{a['us_per_packet']:>14.2f} {b['viewers_per_core']:>21.0f} "
            f"{a['viewers_per_core']:>17.0f} {b['us_per_packet'] / a['us_per_packet']:>7.2f}x"
        )
        if b["not_sent"] or a["not_sent"] or b["frames_dropped"] or a["frames_dropped"]:
            print(
                f"        (not sent {b['not_sent']}/{a['not_sent']}, frames dropped "
                f"{b['frames_dropped']}/{a['frames_dropped']}: figures include drops)"
            )


def top(path: Path, count: int) -> None:
    """Self time per function and per line over the stacks of the measured loop
    (py-spy ``--format raw`` output)."""
    by_line: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if FAN_OUT_MARK not in stack or not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        name, _, where = leaf.partition(" (")
        by_line[leaf] += int(n)
        by_function[f"{name} ({where.rpartition(':')[0]})"] += int(n)
        total += int(n)
    print(f"{total} samples in {FAN_OUT_MARK}; self time by function:")
    for name, samples in by_function.most_common(count):
        print(f"{100 * samples / total:6.1f}%  {name}")
    print("by line:")
    for name, samples in by_line.most_common(count):
        print(f"{100 * samples / total:6.1f}%  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=1, help="stream-seconds per repetition")
    parser.add_argument("--bitrates", default="2000,600", help="video kbit/s, comma separated")
    parser.add_argument("--repeat", type=int, default=8, help="repetitions; the best counts")
    parser.add_argument("--payload", type=int, default=1200, help="video RTP payload bytes")
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    parser.add_argument("--compare", metavar="REV", help="also run REV's srsrelay (git archive)")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: alternating rounds")
    parser.add_argument("--top", type=Path, help="summarize py-spy raw stacks and exit")
    parser.add_argument(
        "--sendto", action="store_true", help="no sendmmsg batches: one sendto per packet"
    )
    args = parser.parse_args()
    # Session state changes are logged at info: keep the table readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.top is not None:
        top(args.top, 15)
        return
    if args.compare:
        if args.sendto:
            parser.error("--sendto runs this tree only; it does not combine with --compare")
        compare(args.compare, args)
        return
    bitrates = [int(b) for b in args.bitrates.split(",")]
    results = asyncio.run(
        run(args.viewers, args.seconds, bitrates, args.repeat, args.payload, args.sendto)
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print_results(results)
        spread = [statistics.pstdev(r.cpu_seconds_all) / r.cpu_seconds for r in results]
        print(f"repetitions spread (stdev/best): {', '.join(f'{s:.0%}' for s in spread)}")


if __name__ == "__main__":
    main()
