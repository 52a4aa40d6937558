"""Relay memory per viewer: RSS and where it goes.

Builds `--viewers` real ViewerSessions of one stream with completed DTLS-SRTP handshakes
(bench/hotpath.py's rig: one SendPath on one UDP socket, an in-process DTLS client per
viewer), then feeds them `--seconds` stream-seconds of synthetic frames (enough that the
audio and video NACK histories are full), and lets the timers run for a moment (Sender
Reports, congestion ticks). The DTLS clients are stopped and dropped before measuring;
their sockets stay open so the viewers keep sending without ICMP errors.

Two child processes measure the same setup:

- rss: VmRSS after the viewers minus VmRSS before them (after a warm-up batch, with
  gc.collect() and malloc_trim(0) before each reading), divided by the viewer count;
- trace: tracemalloc started after the warm-up; the allocations still alive at the end,
  by component (source file) and by line, per viewer.

"C / untraced" is rss minus traced: OpenSSL (per-viewer SSL context and connection),
libsrtp sessions and allocator overhead, which tracemalloc does not see.

    python bench/viewer_memory.py                  # this tree, 200 viewers
    python bench/viewer_memory.py --compare HEAD   # HEAD's srsrelay, then this tree
    python bench/viewer_memory.py --json           # one JSON object per source

MEMBENCH_SRC=<dir> imports srsrelay from <dir> instead of this tree (as HOTPATH_SRC does
for bench/hotpath.py, whose helpers this script imports).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

ROOT = Path(__file__).resolve().parent.parent
if os.environ.get("MEMBENCH_SRC"):
    os.environ["HOTPATH_SRC"] = os.environ["MEMBENCH_SRC"]
sys.path.insert(0, str(ROOT / "bench"))

import hotpath  # noqa: E402

from srsrelay.config import RtcConfig  # noqa: E402
from srsrelay.webrtc.sendpath import SendPath  # noqa: E402
from srsrelay.webrtc.viewer import SessionState  # noqa: E402

WARMUP_VIEWERS = 8
"""Viewers connected, fed and closed before the baseline reading (imports, caches)."""
SETTLE_SECONDS = 1.5
"""Wall-clock seconds the event loop runs after feeding (timers: SRs, congestion ticks)."""
CONSENT_INTERVAL = 1.0
"""Seconds between two simulated consent checks of every viewer."""
TOP_LINES = 15
"""Source lines listed in the breakdown."""

COMPONENTS = (
    ("srsrelay/webrtc/nack.py", "NACK history, RTT, budget (nack.py)"),
    ("srsrelay/webrtc/congestion.py", "congestion windows (congestion.py)"),
    ("srsrelay/webrtc/ice.py", "ICE session (ice.py)"),
    ("srsrelay/webrtc/sendpath.py", "send counters (sendpath.py)"),
    ("srsrelay/webrtc/dtls.py", "DTLS stand-in, RtpWriter (dtls.py)"),
    ("srsrelay/webrtc/viewer.py", "ViewerSession, tracks, wire ints (viewer.py)"),
    ("srsrelay/webrtc/sdp.py", "SDP answer (sdp.py)"),
    ("srsrelay/webrtc/keyframe.py", "keyframe requests (keyframe.py)"),
    ("srsrelay/", "other srsrelay"),
    ("aiortc/", "aiortc DTLS transport (Python side)"),
    ("OpenSSL/", "pyOpenSSL wrappers"),
    ("cryptography/", "cryptography wrappers"),
    ("pylibsrtp/", "pylibsrtp wrappers"),
    ("pyee/", "pyee event emitter"),
    ("asyncio/", "asyncio tasks, futures, handles"),
    ("bench/", "bench rig (DTLS client sockets)"),
)


def component(filename: str) -> str:
    name = filename.replace(os.sep, "/")
    for part, label in COMPONENTS:
        if part in name:
            return label
    return "other Python"


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _trim() -> None:
    """Collect cycles and hand free heap pages back, so RSS counts live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Measurement:
    mode: str
    viewers: int
    kb_per_viewer: float
    """RSS delta per viewer (rss) or traced bytes per viewer (trace), KB."""
    rss_before_kb: int
    rss_after_kb: int
    components: dict[str, float] = field(default_factory=dict)
    """KB per viewer by component (trace mode)."""
    lines: list[tuple[str, float, int]] = field(default_factory=list)
    """(file:line, KB per viewer, blocks per viewer x 100) of the largest lines (trace)."""


async def _drop_clients(rig: hotpath.Rig, keep: list[socket.socket]) -> None:
    """Stop the in-process DTLS clients without telling the viewers (their close_notify
    would close the sessions); keep their sockets so sends do not fail."""
    for peer in rig.peers:
        peer.dtls.ice.release()
        await peer.dtls.stop()
        keep.append(peer.sock)
    rig.peers.clear()


def _consent(rig: hotpath.Rig) -> None:
    """A consent check from every viewer (browsers send one every few seconds), so no
    session times out while hundreds are being set up and fed."""
    now = time.monotonic()
    for session in rig.sessions:
        addr = session.ice.remote_addr
        if addr is not None:
            session.ice.on_binding(addr, True, now)


async def _keep_consent(rig: hotpath.Rig) -> None:
    while True:
        _consent(rig)
        await asyncio.sleep(CONSENT_INTERVAL)


async def _feed(rig: hotpath.Rig, seconds: int, bitrate: int, payload: int) -> None:
    for second in hotpath.make_frames(bitrate, seconds, payload):
        _consent(rig)
        hotpath._fan_out_second(rig.stream, list(rig.sessions), second)
        await asyncio.sleep(0)
    await asyncio.sleep(SETTLE_SECONDS)
    closed = [s.close_reason for s in rig.sessions if s.state is not SessionState.CONNECTED]
    if closed:
        raise RuntimeError(f"{len(closed)} viewers closed while measuring: {closed[0]}")


async def measure(mode: str, viewers: int, seconds: int, bitrate: int, payload: int) -> Measurement:
    config = RtcConfig()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.sndbuf)
    stream = hotpath.BenchStream()
    send_path = SendPath(sock, control_queue=config.control_queue)
    rig = hotpath.Rig(stream, send_path, sock, [], [])
    sinks: list[socket.socket] = []
    keeper = asyncio.get_running_loop().create_task(_keep_consent(rig))
    try:
        await hotpath._connect(rig, WARMUP_VIEWERS, config)
        await _drop_clients(rig, sinks)
        await _feed(rig, seconds, bitrate, payload)
        # Closed before the baseline: fed again later, they would count as new allocations.
        for session in rig.sessions:
            await session.close("warm-up over")
        rig.sessions.clear()
        _trim()
        before = rss_kb()
        snapshot = None
        if mode == "trace":
            tracemalloc.start(1)
            snapshot = tracemalloc.take_snapshot()
        await hotpath._connect(rig, viewers, config)
        await _drop_clients(rig, sinks)
        await _feed(rig, seconds, bitrate, payload)
        _trim()
        after = rss_kb()
        result = Measurement(mode, viewers, (after - before) / viewers, before, after)
        if snapshot is not None:
            final = tracemalloc.take_snapshot()
            tracemalloc.stop()
            diffs = final.compare_to(snapshot, "lineno")
            by_component: collections.Counter[str] = collections.Counter()
            traced = 0
            for d in diffs:
                frame = d.traceback[0]
                by_component[component(frame.filename)] += d.size_diff
                traced += d.size_diff
            result.kb_per_viewer = traced / viewers / 1024
            result.components = {
                k: round(v / viewers / 1024, 2) for k, v in by_component.most_common()
            }
            top = sorted(diffs, key=lambda d: d.size_diff, reverse=True)[:TOP_LINES]
            for d in top:
                frame = d.traceback[0]
                where = f"{_short(frame.filename)}:{frame.lineno}"
                result.lines.append(
                    (where, round(d.size_diff / viewers / 1024, 2), d.count_diff * 100 // viewers)
                )
        return result
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        for s in rig.sessions:
            await s.close("bench over")
        send_path.close()
        sock.close()
        for sink in sinks:
            sink.close()


def _short(filename: str) -> str:
    name = filename.replace(os.sep, "/")
    for marker in ("/srsrelay/", "/site-packages/", "/lib/python3", "/bench/"):
        if marker in name:
            return name[name.index(marker) + 1 :]
    return name


def _child(src: Path | None, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("MEMBENCH_SRC", None)
    if src is not None:
        env["MEMBENCH_SRC"] = str(src)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        f"--viewers={args.viewers}",
        f"--seconds={args.seconds}",
        f"--bitrate={args.bitrate}",
        f"--payload={args.payload}",
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run_source(src: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    rss = _child(src, "rss", args)
    trace = _child(src, "trace", args)
    untraced = rss["kb_per_viewer"] - trace["kb_per_viewer"]
    return {"rss": rss, "trace": trace, "untraced_kb_per_viewer": round(untraced, 1)}


def print_table(label: str, r: dict[str, Any]) -> None:
    rss, trace = r["rss"], r["trace"]
    print(
        f"== {label}: {rss['viewers']} viewers, RSS {rss['rss_before_kb'] / 1024:.1f} -> "
        f"{rss['rss_after_kb'] / 1024:.1f} MB"
    )
    print(f"{'component':<48} {'KB/viewer':>10}")
    for name, kb in trace["components"].items():
        if abs(kb) >= 0.05:
            print(f"{name:<48} {kb:>10.1f}")
    print(f"{'= traced by tracemalloc (Python heap)':<48} {trace['kb_per_viewer']:>10.1f}")
    print(f"{'C / untraced (OpenSSL, libsrtp, malloc)':<48} {r['untraced_kb_per_viewer']:>10.1f}")
    print(f"{'= RSS per viewer':<48} {rss['kb_per_viewer']:>10.1f}")
    print("largest lines (KB/viewer, blocks/viewer):")
    for where, kb, blocks100 in trace["lines"]:
        print(f"  {kb:>7.2f} {blocks100 / 100:>7.1f}  {where}")


def compare(rev: str, args: argparse.Namespace) -> None:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "srsrelay"], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        before = run_source(Path(tmp), args)
    after = run_source(None, args)
    print_table(rev, before)
    print()
    print_table("this tree", after)
    print()
    b, a = before["rss"]["kb_per_viewer"], after["rss"]["kb_per_viewer"]
    print(f"RSS per viewer: {rev} {b:.1f} KB -> this tree {a:.1f} KB ({a - b:+.1f} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=12, help="stream-seconds fed")
    parser.add_argument("--bitrate", type=int, default=2000, help="video kbit/s")
    parser.add_argument("--payload", type=int, default=1200, help="video RTP payload bytes")
    parser.add_argument("--compare", metavar="REV", help="also measure REV's srsrelay")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", choices=("rss", "trace"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.child:
        result = asyncio.run(
            measure(args.child, args.viewers, args.seconds, args.bitrate, args.payload)
        )
        print(json.dumps(asdict(result)))
        return
    if args.compare:
        compare(args.compare, args)
        return
    r = run_source(None, args)
    if args.json:
        print(json.dumps(r))
    else:
        print_table("this tree", r)


if __name__ == "__main__":
    main()
