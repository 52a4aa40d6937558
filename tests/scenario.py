"""Low-bandwidth scenarios, run inside a network namespace (see tests/netns.py).

    ip netns exec NS python -m tests.scenario weak --duration 120 --out result.json
    ip netns exec NS python -m tests.scenario saturate --duration 30 --out result.json
    ip netns exec NS python -m tests.scenario contrast --duration 10 --out result.json

`weak` and `saturate` start the relay (fixed ports: the namespace is private), an
ffmpeg publisher at 2 Mbit/s and one child process with all aiortc viewers; they
sample the relay's RSS every second, poll its API, end the viewers with DELETE, stop
the relay with SIGTERM and write everything measured as JSON. The shaping itself is
set up from outside by `run_in_netns`, which the tests and bench/lowbw.py call.

`contrast` sends the same saturating load once through a plain asyncio datagram
transport and once through srsrelay's SendPath, sampling what each one holds.

`relay` runs the relay daemon and dumps its live objects per type every 10 s,
including what only the cyclic garbage collector frees (`run_in_netns(objects=True)`).

Viewers do not decode: a counting decoder replaces aiortc's, so "frames delivered"
are complete encoded frames aiortc's jitter buffer handed to the decoder. aiortc's
receiver still sends RTCP receiver reports, NACKs and PLIs by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
RTMP_PORT = 1935
HTTP_PORT = 1985
RTC_PORT = 8000
BASE_URL = f"http://{HOST}:{HTTP_PORT}"
STREAM = "live/lowbw"
FPS = 30
VIDEO_CLOCK = 90_000
BITRATE = "2M"
SIZE = "640x360"
POLL_INTERVAL = 2.0
"""Seconds between two API polls while a scenario runs."""
CONTRAST_SINK = ("127.0.0.2", 9000)
"""Where the contrast load goes (a socket that is never read)."""
DATAGRAM = 1200
"""Bytes per contrast datagram, the size of a full RTP media packet."""
RECONNECT_POLL = 1.0
"""Seconds between two checks, in the viewers process, for sessions the relay closed."""
MAX_STATES = 200
"""Connection state changes kept per viewer."""
OBJECT_DUMP_INTERVAL = 10.0
"""Seconds between two object-count dumps of a relay run with --objects."""
MAX_LOG_SAMPLES = 40
"""Warning/error log lines kept verbatim in the result; the rest are only counted."""


def weak_addr(i: int) -> str:
    return f"127.0.1.{i + 1}"


def strong_addr(i: int) -> str:
    return f"127.0.2.{i + 1}"


def read_rss_kb(pid: int) -> int | None:
    """VmRSS of `pid` in KiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def slope_per_min(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, in value per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mt) * (v - mv) for t, v in samples)
    return cov / var * 60.0


def rss_summary(samples: Sequence[tuple[float, int]], warmup: float) -> dict[str, Any]:
    """Slope (KB/min) and growth (KB) of RSS samples taken after `warmup` seconds."""
    after = [(t, float(v)) for t, v in samples if t >= warmup]
    slope = slope_per_min(after)
    span = (after[-1][0] - after[0][0]) if len(after) > 1 else 0.0
    return {
        "warmup_s": warmup,
        "samples_after_warmup": len(after),
        "start_kb": int(after[0][1]) if after else None,
        "end_kb": int(after[-1][1]) if after else None,
        "min_kb": int(min(v for _, v in after)) if after else None,
        "max_kb": int(max(v for _, v in after)) if after else None,
        "slope_kb_per_min": round(slope, 1),
        "fitted_growth_kb": round(slope * span / 60.0, 1),
    }


def outcome_violations(kinds: dict[str, dict[str, int]]) -> list[str]:
    """Kinds whose counters break attempted == sent + dropped_* + errors (+ queued).

    Written over whatever keys the snapshot has, so new drop reasons are included.
    """
    bad = []
    for kind, c in kinds.items():
        outcomes = sum(
            v for k, v in c.items() if k in ("sent", "errors", "queued") or k.startswith("dropped_")
        )
        if c.get("attempted", 0) != outcomes:
            bad.append(f"{kind}: attempted {c.get('attempted')} != {outcomes} ({c})")
    return bad


def frames_expected(ts_first: int | None, ts_last: int | None) -> int:
    """Frames a 30 fps publisher produced between two RTP timestamps (inclusive)."""
    if ts_first is None or ts_last is None:
        return 0
    return round((ts_last - ts_first) * FPS / VIDEO_CLOCK) + 1


# -- viewers (one child process) --------------------------------------------------------

_NACKS: dict[int, list[int]] = {}
"""id(RTCRtpReceiver) -> [NACK packets sent, sequence numbers NACKed, PLIs sent]."""


class CountingDecoder:
    """Stands in for aiortc's decoders: hands the encoded frame on without decoding."""

    def decode(self, encoded_frame: Any) -> list[Any]:
        return [encoded_frame]


def _patch_aiortc() -> None:
    import aiortc.rtcrtpreceiver as rr

    setattr(rr, "get_decoder", lambda codec: CountingDecoder())  # noqa: B010
    orig_nack = rr.RTCRtpReceiver._send_rtcp_nack
    orig_pli = rr.RTCRtpReceiver._send_rtcp_pli

    async def send_nack(self: Any, media_ssrc: int, lost: list[int]) -> None:
        c = _NACKS.setdefault(id(self), [0, 0, 0])
        c[0] += 1
        c[1] += len(lost)
        await orig_nack(self, media_ssrc, lost)

    async def send_pli(self: Any, media_ssrc: int) -> None:
        _NACKS.setdefault(id(self), [0, 0, 0])[2] += 1
        await orig_pli(self, media_ssrc)

    rr.RTCRtpReceiver._send_rtcp_nack = send_nack  # type: ignore[method-assign]
    rr.RTCRtpReceiver._send_rtcp_pli = send_pli  # type: ignore[method-assign]


@contextlib.contextmanager
def bound_to(addr: str) -> Iterator[None]:
    """Make aioice gather a single host candidate on `addr` (gathering happens in
    setLocalDescription), so the shaping can tell viewers apart by address."""
    import aioice.ice

    with mock.patch.object(aioice.ice, "get_host_addresses", return_value=[addr]):
        yield


class Viewer:
    def __init__(self, name: str, addr: str, weak: bool, t0: float) -> None:
        self.name = name
        self.addr = addr
        self.weak = weak
        self.t0 = t0
        self.location: str | None = None
        self.sessions: list[str] = []
        """Relay session ids, one per (re)connection."""
        self.started_at = 0.0
        self.error: str | None = None
        self.pc: Any = None
        self.video_frames = 0
        self.audio_frames = 0
        self.ts_first: int | None = None
        self.ts_last: int | None = None
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        self.states: list[tuple[float, str]] = []
        self.frozen: dict[str, Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._receivers: set[int] = set()
        """Receivers of every peer connection so far (their NACK counts add up)."""

    async def start(self, http: Any) -> None:
        from aiortc import (
            RTCConfiguration,
            RTCPeerConnection,
            RTCRtpReceiver,
            RTCSessionDescription,
        )

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc = pc
        self.started_at = time.monotonic()
        self.ts_first = self.ts_last = None  # a new session has a new RTP timeline
        for kind, mime in (("video", "video/H264"), ("audio", "audio/opus")):
            t = pc.addTransceiver(kind, direction="recvonly")
            caps = RTCRtpReceiver.getCapabilities(kind)
            assert caps is not None
            t.setCodecPreferences([c for c in caps.codecs if c.mimeType in (mime, "video/rtx")])

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if len(self.states) < MAX_STATES:
                self.states.append((round(time.monotonic() - self.t0, 2), pc.connectionState))

        @pc.on("track")
        def on_track(track: Any) -> None:
            self._tasks.append(asyncio.ensure_future(self._consume(track)))

        with bound_to(self.addr):
            await pc.setLocalDescription(await pc.createOffer())
        async with http.post(
            f"{BASE_URL}/whep/{STREAM}",
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            body = await resp.text()
            if resp.status != 201:
                raise RuntimeError(f"WHEP POST answered {resp.status}: {body.strip()}")
            self.location = resp.headers["Location"]
            self.sessions.append(self.location.rsplit("/", 1)[-1])
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))

    async def restart(self, http: Any) -> None:
        """Connect again, as a player does after the relay closed its session."""
        await self.close()
        self._tasks.clear()
        try:
            await self.start(http)
        except Exception as exc:
            self.error = f"reconnect: {type(exc).__name__}: {exc}"

    async def _consume(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await track.recv()
                if self.frozen is not None:
                    continue
                if track.kind != "video":
                    self.audio_frames += 1
                    continue
                now = time.monotonic() - self.t0
                self.video_frames += 1
                self.ts_last = int(frame.timestamp)
                self.last_frame_at = now
                if self.ts_first is None:
                    self.ts_first = self.ts_last
                    self.first_frame_at = now
        except MediaStreamError:
            return

    def freeze(self) -> dict[str, Any]:
        """Stop counting and report."""
        nack = [0, 0, 0]
        ice_state = None
        if self.pc is not None:
            ice_state = self.pc.iceConnectionState
            self._receivers.update(id(r) for r in self.pc.getReceivers())
        for rid in self._receivers:
            c = _NACKS.get(rid, [0, 0, 0])
            nack = [a + b for a, b in zip(nack, c, strict=True)]
        now = round(time.monotonic() - self.t0, 2)
        connected_at = next((t for t, st in self.states if st == "connected"), None)
        self.frozen = {
            "name": self.name,
            "addr": self.addr,
            "weak": self.weak,
            "location": self.location,
            "session": self.sessions[-1] if self.sessions else None,
            "sessions": self.sessions,
            "error": self.error,
            "video_frames": self.video_frames,
            "audio_frames": self.audio_frames,
            "ts_first": self.ts_first,
            "ts_last": self.ts_last,
            "frames_expected": frames_expected(self.ts_first, self.ts_last),
            "frames_expected_wall": round(FPS * (now - connected_at)) if connected_at else 0,
            "frozen_at": now,
            "started_at": round(self.started_at - self.t0, 2),
            "connected_at": connected_at,
            "first_frame_at": self.first_frame_at,
            "last_frame_at": self.last_frame_at,
            "states": self.states,
            "final_state": self.pc.connectionState if self.pc is not None else None,
            "ice_state": ice_state,
            "nacks_sent": nack[0],
            "nacked_seqs": nack[1],
            "plis_sent": nack[2],
        }
        return self.frozen

    async def close(self) -> None:
        if self.pc is not None:
            self._receivers.update(id(r) for r in self.pc.getReceivers())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), 5)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def run_viewers(args: argparse.Namespace) -> None:
    """Child process: start the viewers, print one JSON line, then obey stdin:
    "stop" prints the counts, "close" closes the peer connections and exits."""
    import aiohttp

    _patch_aiortc()
    t0 = time.monotonic()
    viewers = [Viewer(f"weak{i}", weak_addr(i), True, t0) for i in range(args.weak)]
    viewers += [Viewer(f"strong{i}", strong_addr(i), False, t0) for i in range(args.strong)]
    async with aiohttp.ClientSession() as http:
        for v in viewers:
            try:
                await v.start(http)
            except Exception as exc:
                v.error = f"{type(exc).__name__}: {exc}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
        v.pc is not None and v.pc.connectionState in ("new", "connecting") for v in viewers
    ):
        await asyncio.sleep(0.2)
    _emit({"ready": [{"name": v.name, "location": v.location, "error": v.error} for v in viewers]})
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with aiohttp.ClientSession() as http:
        supervisor = None
        if args.reconnect > 0:
            weak = [v for v in viewers if v.weak]
            supervisor = asyncio.create_task(_reconnect_closed(http, weak, args.reconnect))
        while line := (await reader.readline()).decode().strip():
            if line == "stop":
                if supervisor is not None:
                    supervisor.cancel()
                    await asyncio.gather(supervisor, return_exceptions=True)
                _emit({"viewers": [v.freeze() for v in viewers]})
            elif line == "close":
                break
    await asyncio.gather(*(v.close() for v in viewers))
    _emit({"closed": True})


async def _reconnect_closed(http: Any, viewers: list[Viewer], delay: float) -> None:
    """Reconnect viewers whose session the relay closed, `delay` seconds after."""
    while True:
        await asyncio.sleep(RECONNECT_POLL)
        try:
            async with http.get(f"{BASE_URL}/api/v1/sessions", timeout=5) as resp:
                live = {s["id"] for s in (await resp.json())["sessions"]}
        except Exception:
            continue
        now = time.monotonic()
        gone = [
            v
            for v in viewers
            if v.sessions and v.sessions[-1] not in live and now - v.started_at > 2 * delay
        ]
        if gone:
            await asyncio.sleep(delay)
            for v in gone:
                await v.restart(http)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- the driver: relay, publisher, viewers, sampling --------------------------------------


def relay_config(rtc_extra: Sequence[str]) -> str:
    lines = [
        "[log]",
        'format = "json"',
        'level = "info"',
        "[rtmp]",
        f'listen = "{HOST}"',
        f"port = {RTMP_PORT}",
        "[http]",
        f'listen = "{HOST}"',
        f"port = {HTTP_PORT}",
        "[rtc]",
        f'listen = "{HOST}"',
        f"port = {RTC_PORT}",
        f'candidates = ["{HOST}"]',
        *rtc_extra,
    ]
    return "\n".join(lines) + "\n"


def ffmpeg_args() -> list[str]:
    return [
        "ffmpeg",
        "-hide_banner",
        "-loglevel",
        "warning",
        "-re",
        "-f",
        "lavfi",
        # Noise keeps x264 at the target bitrate (a plain test pattern compresses to little).
        "-i",
        f"testsrc2=size={SIZE}:rate={FPS},noise=alls=16:allf=t",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=44100",
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-tune",
        "zerolatency",
        "-g",
        str(2 * FPS),
        "-b:v",
        BITRATE,
        "-maxrate",
        BITRATE,
        "-bufsize",
        "1M",
        "-c:a",
        "aac",
        "-f",
        "flv",
        f"rtmp://{HOST}:{RTMP_PORT}/{STREAM}",
    ]


async def _get(http: Any, path: str) -> dict[str, Any]:
    async with http.get(BASE_URL + path, timeout=5) as resp:
        data: dict[str, Any] = await resp.json()
        return data


def _tail(path: Path, size: int = 2000) -> str:
    return path.read_text(errors="replace")[-size:]


async def _wait_http(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited {proc.returncode}: {_tail(log_path)}")
        try:
            _, w = await asyncio.open_connection(HOST, HTTP_PORT)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"relay did not start: {_tail(log_path)}")


async def _wait_live(http: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = await _get(http, "/api/v1/streams")
        if any(s["id"] == STREAM and s.get("video") for s in data["streams"]):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"stream {STREAM} never went live")


def parse_relay_log(path: Path) -> dict[str, Any]:
    """Warnings/errors (counted by event, a few kept) and why sessions closed."""
    by_event: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    closed: list[dict[str, Any]] = []
    unparsed = 0
    for raw in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            unparsed += 1
            if len(samples) < MAX_LOG_SAMPLES:
                samples.append({"level": "raw", "event": raw[:300]})
            continue
        if not isinstance(line, dict):
            continue
        event = str(line.get("event", ""))
        if line.get("level") in ("warning", "error", "critical"):
            # Summary lines carry the viewer id in the text: count them by their shape.
            key = f"{line['level']}: " + (
                "viewer <id>: " + event.split(": ", 1)[1] if event.startswith("viewer ") else event
            )
            key = key if len(key) < 120 else key[:120]
            by_event[key] = by_event.get(key, 0) + 1
            if len(samples) < MAX_LOG_SAMPLES:
                samples.append(line)
        if event == "viewer state" and line.get("new") == "closed":
            closed.append(
                {
                    "viewer": line.get("viewer"),
                    "reason": line.get("reason"),
                    "at": line.get("timestamp"),
                }
            )
    return {
        "warnings_by_event": by_event,
        "warning_samples": samples,
        "closed": closed,
        "unparsed_lines": unparsed,
    }


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _compact_rtc(rtc: dict[str, Any]) -> dict[str, Any]:
    """The /api/v1/rtc fields worth a time series (everything except per-errno detail)."""
    out = {k: v for k, v in rtc.items() if k != "send"}
    send = rtc.get("send", {})
    out["send"] = {k: v for k, v in send.items() if k != "errors_by_errno"}
    return out


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    work = Path(args.workdir)
    cfg = work / "relay.toml"
    config = relay_config(args.rtc)
    _write(cfg, config)
    log_path = work / "relay.log"
    result: dict[str, Any] = {"mode": args.mode, "duration": args.duration, "config": config}
    relay_cmd = [sys.executable, "-m", "srsrelay", "-c", str(cfg)]
    if args.objects is not None:
        relay_cmd = [sys.executable, "-m", "tests.scenario", "relay", "-c", str(cfg)]
        relay_cmd += ["--objects", str(args.objects)]
    relay = subprocess.Popen(
        relay_cmd,
        cwd=ROOT,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    ffmpeg: subprocess.Popen[bytes] | None = None
    viewers: asyncio.subprocess.Process | None = None
    t_relay = time.monotonic()
    rss: list[tuple[float, int]] = []
    polls: list[dict[str, Any]] = []
    last_stats: dict[str, dict[str, Any]] = {}
    """Session id -> its latest stats (kept after the session closes)."""
    stop_sampling = asyncio.Event()
    t0 = t_relay

    async def sample(http: Any) -> None:
        next_poll = 0.0
        while not stop_sampling.is_set():
            now = time.monotonic()
            kb = read_rss_kb(relay.pid)
            if kb is not None:
                rss.append((round(now - t0, 2), kb))
            if now >= next_poll and t0 != t_relay:
                next_poll = now + POLL_INTERVAL
                try:
                    rtc = (await _get(http, "/api/v1/rtc"))["rtc"]
                    sessions = (await _get(http, "/api/v1/sessions"))["sessions"]
                    last_stats.update((s["id"], s) for s in sessions)
                    polls.append(
                        {
                            "t": round(now - t0, 2),
                            "rtc": _compact_rtc(rtc),
                            "states": {s["id"]: s.get("state") for s in sessions},
                        }
                    )
                except Exception as exc:
                    polls.append({"t": round(now - t0, 2), "error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), 1.0)

    try:
        async with aiohttp.ClientSession() as http:
            await _wait_http(relay, log_path)
            ffmpeg = subprocess.Popen(
                ffmpeg_args(),
                stdin=subprocess.DEVNULL,
                stdout=(work / "ffmpeg.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            sampler = asyncio.create_task(sample(http))
            await _wait_live(http)
            viewers = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.scenario",
                "viewers",
                "--weak",
                str(args.weak),
                "--strong",
                str(args.strong),
                "--reconnect",
                str(args.reconnect),
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=(work / "viewers.log").open("wb"),
            )
            assert viewers.stdin is not None and viewers.stdout is not None
            ready = json.loads(await asyncio.wait_for(viewers.stdout.readline(), 120))
            # Time 0 of every series: all viewers have their answer (and are connected).
            t0 = time.monotonic()
            rss[:] = [(round(t - (t0 - t_relay), 2), v) for t, v in rss]
            result["ready"] = ready["ready"]
            await asyncio.sleep(args.duration)

            result["sessions_end"] = (await _get(http, "/api/v1/sessions"))["sessions"]
            last_stats.update((s["id"], s) for s in result["sessions_end"])
            result["session_last"] = last_stats
            result["rtc_end"] = (await _get(http, "/api/v1/rtc"))["rtc"]
            result["streams_end"] = (await _get(http, "/api/v1/streams"))["streams"]
            viewers.stdin.write(b"stop\n")
            await viewers.stdin.drain()
            result["viewers"] = json.loads(await asyncio.wait_for(viewers.stdout.readline(), 30))[
                "viewers"
            ]
            result["t_end"] = round(time.monotonic() - t0, 2)

            deletes = []
            keep = max(0, min(args.keep, len(result["viewers"])))
            for v in result["viewers"][: len(result["viewers"]) - keep]:
                if not v["location"]:
                    continue
                start = time.monotonic()
                timeout = aiohttp.ClientTimeout(total=10)
                async with http.delete(BASE_URL + v["location"], timeout=timeout) as resp:
                    status = resp.status
                deletes.append(
                    {"viewer": v["name"], "status": status, "seconds": time.monotonic() - start}
                )
            result["deletes"] = deletes
            result["sessions_after_delete"] = len(
                (await _get(http, "/api/v1/sessions"))["sessions"]
            )
            stop_sampling.set()
            await sampler
        # Shutdown with `keep` viewers still attached.
        start = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        try:
            code: int | None = relay.wait(15)
        except subprocess.TimeoutExpired:
            code = None
        result["shutdown"] = {"seconds": time.monotonic() - start, "exit_code": code}
        viewers.stdin.write(b"close\n")
        await viewers.stdin.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(viewers.wait(), 20)
    finally:
        stop_sampling.set()
        for proc in (relay, ffmpeg):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if viewers is not None and viewers.returncode is None:
            viewers.kill()
            await viewers.wait()
    result["rss"] = rss
    result["rss_summary"] = rss_summary(rss, args.warmup)
    result["polls"] = polls
    result["log"] = parse_relay_log(log_path)
    result["ffmpeg_log_tail"] = (work / "ffmpeg.log").read_text(errors="replace")[-2000:]
    result["viewers_log_tail"] = (work / "viewers.log").read_text(errors="replace")[-2000:]
    return result


# -- contrast: plain asyncio transport vs SendPath ---------------------------------------


def _outq(sock: socket.socket) -> int:
    """Bytes the kernel still holds for `sock` (SIOCOUTQ: qdisc plus socket buffer)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(buf, sys.byteorder)


async def _pace(send: Any, rate_bps: int, duration: float, on_second: Any) -> None:
    """Call send() (one DATAGRAM-byte datagram) at `rate_bps`, on_second() each second."""
    per_second = rate_bps / 8 / DATAGRAM
    start = time.monotonic()
    sent = 0
    next_sample = start + 1.0
    while (now := time.monotonic()) - start < duration:
        while sent < (now - start) * per_second:
            send()
            sent += 1
        if now >= next_sample:
            next_sample += 1.0
            on_second(round(now - start, 1))
        await asyncio.sleep(0.01)
    on_second(round(time.monotonic() - start, 1))


async def contrast(args: argparse.Namespace) -> dict[str, Any]:
    from srsrelay.webrtc.sendpath import SendCounters, SendPath, TrafficKind

    loop = asyncio.get_running_loop()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink.bind(CONTRAST_SINK)
    result: dict[str, Any] = {"mode": "contrast", "rate_bps": args.rate, "duration": args.duration}

    # 1. What stock aiortc does: loop.create_datagram_endpoint and transport.sendto.
    # Any: get_write_buffer_size is on the selector transport, not the ABC.
    transport: Any
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=(HOST, RTC_PORT)
    )
    tsock = transport.get_extra_info("socket")
    plain: list[dict[str, Any]] = []
    plain_sock = socket.socket(fileno=os.dup(tsock.fileno()))

    def plain_second(t: float) -> None:
        plain.append(
            {
                "t": t,
                "buffered": transport.get_write_buffer_size(),
                "kernel": _outq(plain_sock),
                "rss_kb": read_rss_kb(os.getpid()),
            }
        )

    # A fresh bytes object per datagram, as aiortc's SRTP output is.
    await _pace(
        lambda: transport.sendto(bytes(DATAGRAM), CONTRAST_SINK),
        args.rate,
        args.duration,
        plain_second,
    )
    # close() waits for the buffer to drain at the shaped rate; abort() discards it.
    start = time.monotonic()
    transport.close()
    for _ in range(20):
        await asyncio.sleep(0.1)
        if transport.get_write_buffer_size() == 0:
            break
    result["plain_close"] = {
        "buffered_after_2s": transport.get_write_buffer_size(),
        "seconds": round(time.monotonic() - start, 2),
    }
    transport.abort()
    plain_sock.close()
    await asyncio.sleep(0.5)

    # 2. The same load through srsrelay's send path on a socket with a small SO_SNDBUF.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, RTC_PORT))
    path = make_send_path(SendPath, sock)
    counters = SendCounters("contrast", log_drops=False)
    bounded: list[dict[str, Any]] = []

    def bounded_second(t: float) -> None:
        media = counters.snapshot()["kinds"]["media"]
        bounded.append(
            {
                "t": t,
                "held": send_path_held(path),
                "kernel": _outq(sock),
                "rss_kb": read_rss_kb(os.getpid()),
                "sent": media["sent"],
                "dropped": sum(v for k, v in media.items() if k.startswith("dropped_")),
            }
        )

    await _pace(
        lambda: path.send(bytes(DATAGRAM), CONTRAST_SINK, TrafficKind.MEDIA, counters),
        args.rate,
        args.duration,
        bounded_second,
    )
    result["sendpath_counters"] = counters.snapshot()
    close = getattr(path, "close", None)
    if callable(close):
        close()
    sock.close()
    sink.close()
    result["plain"] = plain
    result["sendpath"] = bounded
    return result


def make_send_path(cls: Any, sock: socket.socket) -> Any:
    """SendPath(sock, ...) with whatever extra arguments its constructor needs."""
    import inspect

    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "control_queue" in params:
        kwargs["control_queue"] = 256
    return cls(sock, **kwargs)


def send_path_held(path: Any) -> int:
    """Datagrams the send path holds in user space (its control queue, if it has one)."""
    for name in ("queued", "control_queued", "queue_len"):
        value = getattr(path, name, None)
        if isinstance(value, int):
            return value
    queue = getattr(path, "_control", None) or getattr(path, "_queue", None)
    return len(queue) if queue is not None else 0


# -- tables -----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def session_fates(result: dict[str, Any]) -> dict[str, str]:
    """Session id -> its state at the end, or "closed: <reason>" if it closed before."""
    fates = {s["id"]: str(s.get("state")) for s in result.get("sessions_end", [])}
    for c in result.get("log", {}).get("closed", []):
        if c["viewer"] not in fates and c["reason"] != "viewer sent DELETE":
            fates[c["viewer"]] = f"closed: {c['reason']}"
    return fates


def _sum_dicts(dicts: Iterator[dict[str, Any]]) -> dict[str, int]:
    """Key-wise sums of the integer values (booleans and floats are left out)."""
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, int) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


def close_reasons(result: dict[str, Any]) -> dict[str, int]:
    """How many sessions closed for each reason (before the final DELETEs)."""
    counts: dict[str, int] = {}
    for c in result.get("log", {}).get("closed", []):
        # Reasons carry figures ("congested for 10.7 s (loss 22%...)"): count by their head.
        head = str(c["reason"]).split(":", 1)[0]
        counts[head] = counts.get(head, 0) + 1
    return counts


def report(result: dict[str, Any]) -> str:
    """RSS, outcome counters, NACK handling and frames per viewer, as tables."""
    out = []
    r = result["rss_summary"]
    out.append(
        table(
            ["RSS after warm-up", "start MiB", "end MiB", "max MiB", "slope KB/min", "growth KB"],
            [
                [
                    f"{r['samples_after_warmup']} samples from t={r['warmup_s']:.0f} s",
                    (r["start_kb"] or 0) / 1024,
                    (r["end_kb"] or 0) / 1024,
                    (r["max_kb"] or 0) / 1024,
                    r["slope_kb_per_min"],
                    r["fitted_growth_kb"],
                ]
            ],
        )
    )
    kinds: dict[str, dict[str, int]] = result.get("rtc_end", {}).get("send", {}).get("kinds", {})
    cols = sorted({k for c in kinds.values() for k in c if k not in ("attempted", "bytes_sent")})
    cols = [c for c in cols if any(kc.get(c) for kc in kinds.values())] or ["sent"]
    out.append(
        table(
            ["kind (all viewers)", "attempted", *cols, "MB sent"],
            [
                [k, c.get("attempted"), *(c.get(col, 0) for col in cols), c["bytes_sent"] / 1e6]
                for k, c in kinds.items()
            ],
        )
    )
    last = result.get("session_last", {})
    fates = session_fates(result)
    rows = []
    for v in result.get("viewers", []):
        stats = [last[i] for i in v["sessions"] if i in last]
        nack = _sum_dicts(s.get("nack", {}) for s in stats)
        cong = _sum_dicts(s.get("congestion", {}).get("frames_dropped", {}) for s in stats)
        exp = v["frames_expected_wall"]
        fate = fates.get(v["session"] or "", v["error"] or "?")
        rows.append(
            [
                v["name"],
                v["addr"],
                len(v["sessions"]),
                fate if len(fate) <= 40 else fate[:37] + "...",
                v["video_frames"],
                exp,
                f"{100 * v['video_frames'] / exp:.1f}%" if exp else "-",
                v["audio_frames"],
                v["nacked_seqs"],
                nack.get("received"),
                nack.get("requested"),
                nack.get("retransmitted"),
                nack.get("over_budget"),
                nack.get("too_soon"),
                sum(cong.values()) if cong else None,
            ]
        )
    out.append(
        table(
            [
                "viewer",
                "address",
                "sessions",
                "last session",
                "video frames",
                "published since connected",
                "delivered",
                "audio frames",
                "seqs NACKed",
                "NACKs rcvd",
                "seqs asked",
                "retransmitted",
                "over budget",
                "too soon",
                "frames dropped",
            ],
            rows,
        )
    )
    return "\n\n".join(out)


# -- running a scenario in a fresh namespace ---------------------------------------------


def run_in_netns(
    mode: str,
    duration: float,
    *,
    weak: int = 10,
    strong: int = 2,
    weak_kbit: int = 500,
    egress_kbit: int = 1000,
    sndbuf: int = 32 * 1024,
    rtc: Sequence[str] = (),
    keep: int = 0,
    reconnect: float = 0.0,
    warmup: float = 30.0,
    workdir: Path | None = None,
    objects: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Create a namespace, shape it for `mode`, run this module inside, return its JSON.

    The namespace and everything in it are removed before returning, even on failure.
    """
    from tests.netns import Netns, shape_downlinks, shape_egress

    work = Path(workdir or tempfile.mkdtemp(prefix=f"lowbw-{mode}-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "result.json"
    cmd = [
        sys.executable, "-m", "tests.scenario", mode,
        "--duration", str(duration), "--out", str(out), "--workdir", str(work),
        "--weak", str(weak), "--strong", str(strong), "--keep", str(keep),
        "--warmup", str(warmup), "--sndbuf", str(sndbuf), "--reconnect", str(reconnect),
    ]  # fmt: skip
    for line in rtc:
        cmd += ["--rtc", line]
    if objects:
        cmd += ["--objects", str(work / "objects.jsonl")]
    with Netns.create() as ns:
        if mode == "weak":
            shape_downlinks(ns, [weak_addr(i) for i in range(weak)], weak_kbit)
        else:
            shape_egress(ns, RTC_PORT, egress_kbit)
        proc = subprocess.run(
            ns.command(cmd),
            cwd=ROOT,
            stdout=(work / "scenario.log").open("wb"),
            stderr=subprocess.STDOUT,
            timeout=timeout if timeout is not None else duration * 2 + 180,
        )
        qdisc = ns.qdisc_stats()
    if proc.returncode != 0 or not out.exists():
        tail = (work / "scenario.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"scenario {mode} failed ({proc.returncode}), see {work}:\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["qdisc"] = qdisc
    result["workdir"] = str(work)
    return result


def run_relay_with_object_counts(config: str, out: Path) -> int:
    """Run the relay daemon; every OBJECT_DUMP_INTERVAL seconds append a JSON line with
    the number of live objects per type (gc) to `out`, to find what accumulates."""
    import collections
    import gc

    from srsrelay.cli import main as relay_main

    orig_run = asyncio.run

    def run(coro: Any, **kwargs: Any) -> Any:
        async def with_dumps() -> Any:
            async def dump() -> None:
                start = time.monotonic()
                while True:
                    await asyncio.sleep(OBJECT_DUMP_INTERVAL)
                    # Objects only the cyclic collector can free (reference cycles):
                    # DEBUG_SAVEALL keeps them in gc.garbage to be counted, then dropped.
                    gc.set_debug(gc.DEBUG_SAVEALL)
                    unreachable = gc.collect()
                    gc.set_debug(0)
                    cyclic = collections.Counter(type(o).__qualname__ for o in gc.garbage)
                    gc.garbage.clear()
                    gc.collect()
                    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
                    line = {
                        "t": round(time.monotonic() - start, 1),
                        "tasks": len(asyncio.all_tasks()),
                        "cyclic_garbage": unreachable,
                        "cyclic_types": dict(cyclic.most_common(40)),
                        "top": dict(counts.most_common(60)),
                    }
                    with out.open("a") as f:
                        f.write(json.dumps(line) + "\n")

            task = asyncio.create_task(dump())
            try:
                return await coro
            finally:
                task.cancel()

        return orig_run(with_dumps(), **kwargs)

    asyncio.run = run  # type: ignore[assignment]
    return relay_main(["-c", config])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.scenario")
    parser.add_argument("mode", choices=("weak", "saturate", "contrast", "viewers", "relay"))
    parser.add_argument("-c", dest="config", help="relay mode: the relay's config file")
    parser.add_argument("--objects", type=Path, help="dump the relay's object counts here")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--weak", type=int, default=0, help="viewers on shaped addresses")
    parser.add_argument("--strong", type=int, default=0, help="viewers on unshaped addresses")
    parser.add_argument("--keep", type=int, default=0, help="viewers left attached at shutdown")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before RSS counts")
    parser.add_argument("--sndbuf", type=int, default=32 * 1024)
    parser.add_argument(
        "--reconnect", type=float, default=0.0, help="weak viewers reconnect after S seconds"
    )
    parser.add_argument("--rate", type=int, default=8_000_000, help="contrast load, bit/s")
    parser.add_argument("--rtc", action="append", default=[], help="extra [rtc] TOML line")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.mode == "relay":
        return run_relay_with_object_counts(args.config, args.objects)
    if args.mode == "viewers":
        asyncio.run(run_viewers(args))
        return 0
    if args.mode == "contrast":
        result = asyncio.run(contrast(args))
    else:
        args.rtc = [f"sndbuf = {args.sndbuf}", *args.rtc]
        result = asyncio.run(drive(args))
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
