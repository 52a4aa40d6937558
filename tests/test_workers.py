"""daemon.workers: viewers served by worker processes, end to end.

A real relay process with two workers, a real ffmpeg publisher and aiortc WHEP viewers:
viewers on both workers play, the API and /metrics count them across workers, a killed or
hung worker is detected and started again while the publisher and the other worker carry
on, and a stranger on the feed socket changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, Publisher, RelayProcess, start_relay, wait_live
from tests.test_hooks import HookServer, running_hook_server
from tests.whep_client import WhepViewer

STREAM = "live/w"
TWO_WORKERS = "\n[daemon]\nworkers = 2\n"


@pytest.fixture
def workers_relay(tmp_path: Path) -> Iterator[RelayProcess]:
    relay = start_relay(tmp_path, TWO_WORKERS)
    yield relay
    code = relay.stop()
    assert code == 0, f"relay exited {code}: {relay.log_path.read_text()[-4000:]}"


@pytest.fixture
async def live_relay(
    workers_relay: RelayProcess, publish: Callable[..., Publisher]
) -> RelayProcess:
    """The relay with two workers, and STREAM published to it and live."""
    publish(workers_relay.rtmp_url(STREAM), size="320x240")
    await wait_live(workers_relay, STREAM)
    return workers_relay


async def get(http: aiohttp.ClientSession, relay: RelayProcess, path: str) -> dict[str, Any]:
    async with http.get(relay.http + path) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def metric(http: aiohttp.ClientSession, relay: RelayProcess, name: str) -> float:
    async with http.get(relay.http + "/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


async def workers(http: aiohttp.ClientSession, relay: RelayProcess) -> list[dict[str, Any]]:
    data = await get(http, relay, "/api/v1/workers")
    return list(data["workers"]["workers"])


async def viewer_clients(http: aiohttp.ClientSession, relay: RelayProcess) -> list[dict[str, Any]]:
    data = await get(http, relay, "/api/v1/clients")
    return [c for c in data["clients"] if c["type"] == "whep-play"]


async def until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll the async `check` until it returns something true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s (last: {last!r})")


async def start_viewers(
    http: aiohttp.ClientSession, relay: RelayProcess, n: int
) -> list[WhepViewer]:
    viewers = [WhepViewer(relay.http, f"/whep/{STREAM}") for _ in range(n)]
    for viewer in viewers:
        await viewer.start(http)
    return viewers


async def playing(viewers: list[WhepViewer], frames: int = 30) -> None:
    """Wait until every viewer decoded `frames` more video frames and some audio."""
    start = [len(v.result.video_pts) for v in viewers]

    async def check() -> bool:
        return all(
            len(v.result.video_pts) - s >= frames and v.result.audio_frames > 0
            for v, s in zip(viewers, start, strict=True)
        )

    await until(check, f"{len(viewers)} viewers decoding {frames} frames")


def answer_port(viewer: WhepViewer) -> int:
    assert viewer._pc is not None and viewer._pc.remoteDescription is not None
    ports = {
        int(m.group(1))
        for m in re.finditer(
            r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 (\d+) typ host",
            viewer._pc.remoteDescription.sdp,
        )
    }
    assert len(ports) == 1, viewer._pc.remoteDescription.sdp
    return ports.pop()


async def close_all(viewers: list[WhepViewer]) -> None:
    await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)


async def test_viewers_on_both_workers_play_and_the_api_counts_them(
    live_relay: RelayProcess,
) -> None:
    relay = live_relay
    async with aiohttp.ClientSession() as http:
        viewers = await start_viewers(http, relay, 4)
        try:
            await playing(viewers)
            procs = await workers(http, relay)
            assert [w["state"] for w in procs] == ["ready", "ready"]
            assert [w["viewers"] for w in procs] == [2, 2]
            ports = {w["rtc_port"] for w in procs}
            assert len(ports) == 2 and 0 not in ports
            # Each answer names the port of the worker that serves it.
            assert {answer_port(v) for v in viewers} == ports

            clients = await viewer_clients(http, relay)
            assert sorted(c["worker"] for c in clients) == [0, 0, 1, 1]
            ids = {v.result.location.rsplit("/", 1)[1] for v in viewers if v.result.location}
            assert {c["id"] for c in clients} == ids
            stream = (await get(http, relay, f"/api/v1/streams/{STREAM}"))["stream"]
            assert (stream["viewers"], stream["clients"]) == (4, 4)
            assert len((await get(http, relay, "/api/v1/sessions"))["sessions"]) == 4
            rtc = (await get(http, relay, "/api/v1/rtc"))["rtc"]
            assert rtc["sessions"] == 4 and len(rtc["workers"]) == 2
            assert await metric(http, relay, "srsrelay_viewers") == 4
            assert await metric(http, relay, "srsrelay_workers") == 2
            assert await metric(http, relay, "srsrelay_streams") == 1

            # WHEP DELETE goes to the worker serving the session.
            assert await viewers[0].delete(http) == 200
            async with http.delete(relay.http + viewers[0].result.location) as resp:  # type: ignore[operator]
                assert resp.status == 404
            # A kick through the API too.
            victim = next(
                c for c in clients if c["id"] != viewers[0].result.location.rsplit("/", 1)[1]
            )  # type: ignore[union-attr]
            async with http.delete(relay.http + f"/api/v1/clients/{victim['id']}") as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["kicked"] == victim["id"]

            async def two_left() -> bool:
                stream = (await get(http, relay, f"/api/v1/streams/{STREAM}"))["stream"]
                return stream["viewers"] == 2 and await metric(http, relay, "srsrelay_viewers") == 2

            await until(two_left, "viewer counts of 2 after a DELETE and a kick")
            assert len(await viewer_clients(http, relay)) == 2
            async with http.patch(
                relay.http + f"/whep/{STREAM}/no-such-session",
                data="a=ice-ufrag:x\r\n",
                headers={"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"},
            ) as resp:
                assert resp.status == 404
                assert "session no-such-session does not exist" in await resp.text()
        finally:
            await close_all(viewers)


async def test_a_killed_worker_is_restarted_and_the_others_carry_on(
    tmp_path: Path, publish: Callable[..., Publisher]
) -> None:
    async with running_hook_server() as hooks:
        relay = start_relay(tmp_path, TWO_WORKERS + f'[hooks]\non_stop = "{hooks.url}/stop"\n')
        try:
            await _kill_and_recover(relay, hooks, publish)
        finally:
            code = relay.stop()
        assert code == 0, relay.log_path.read_text()[-4000:]


async def _kill_and_recover(
    relay: RelayProcess, hooks: HookServer, publish: Callable[..., Publisher]
) -> None:
    publish(relay.rtmp_url(STREAM), size="320x240")
    await wait_live(relay, STREAM)
    async with aiohttp.ClientSession() as http:
        viewers = await start_viewers(http, relay, 4)
        try:
            await playing(viewers)
            before = await workers(http, relay)
            dead_pid = before[0]["pid"]
            dead_port = before[0]["rtc_port"]
            on_dead = [v for v in viewers if answer_port(v) == dead_port]
            survivors = [v for v in viewers if v not in on_dead]
            assert len(on_dead) == 2 and len(survivors) == 2
            os.kill(dead_pid, signal.SIGKILL)

            async def restarted() -> bool:
                w = (await workers(http, relay))[0]
                return w["state"] == "ready" and w["restarts"] == 1 and w["pid"] != dead_pid

            await until(restarted, "worker 0 restarted")
            deaths = (await get(http, relay, "/api/v1/workers"))["workers"]["deaths"]
            assert deaths == {"exited": 1}
            # Its viewers are gone from the counts and on_stop told about them ...
            clients = await viewer_clients(http, relay)
            assert sorted(c["worker"] for c in clients) == [1, 1]
            assert await metric(http, relay, "srsrelay_worker_viewers_lost_total") == 2
            assert await metric(http, relay, "srsrelay_worker_restarts_total") == 1
            stops = [body for path, body in hooks.received if path == "/stop"]
            assert len(stops) == 2
            assert all("worker 0 died (exit code -9)" in b["reason"] for b in stops)
            dead_ids = {v.result.location.rsplit("/", 1)[1] for v in on_dead if v.result.location}
            assert {b["client_id"] for b in stops} == dead_ids
            # ... the other worker's viewers kept playing, and the stream is still live ...
            await playing(survivors)
            await wait_live(relay, STREAM)
            # ... and the restarted worker serves new viewers from the running stream.
            fresh = await start_viewers(http, relay, 2)
            viewers += fresh
            assert {answer_port(v) for v in fresh} == {(await workers(http, relay))[0]["rtc_port"]}
            await playing(fresh)
        finally:
            await close_all(viewers)
    events = [line.get("event") for line in relay.log_lines()]
    assert "worker died" in events


async def test_a_hung_worker_is_killed_and_restarted(
    live_relay: RelayProcess,
) -> None:
    relay = live_relay
    async with aiohttp.ClientSession() as http:
        hung = (await workers(http, relay))[1]
        os.kill(hung["pid"], signal.SIGSTOP)
        try:

            async def replaced() -> bool:
                w = (await workers(http, relay))[1]
                return w["state"] == "ready" and w["pid"] != hung["pid"]

            await until(replaced, "the stopped worker replaced", timeout=30)
        finally:
            with pytest.raises(ProcessLookupError):
                os.kill(hung["pid"], signal.SIGCONT)  # killed, not just replaced
        viewers = await start_viewers(http, relay, 2)
        try:
            await playing(viewers)
        finally:
            await close_all(viewers)
    assert "worker stopped answering; killing it" in [e.get("event") for e in relay.log_lines()]
    async with aiohttp.ClientSession() as http:
        assert (await get(http, relay, "/api/v1/workers"))["workers"]["deaths"] == {"hung": 1}


def feed_socket(relay: RelayProcess, worker_pid: int) -> str:
    args = Path(f"/proc/{worker_pid}/cmdline").read_bytes().split(b"\0")
    return args[args.index(b"--socket") + 1].decode()


async def test_strangers_on_the_feed_socket_are_refused(
    live_relay: RelayProcess,
) -> None:
    relay = live_relay
    async with aiohttp.ClientSession() as http:
        procs = await workers(http, relay)
        path = feed_socket(relay, procs[0]["pid"])
        assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"
        for attempt in (
            # Claims to be worker 0, from another process: refused by its pid.
            struct.pack("!IB", 12, 32) + b'{"index":0}',
            # Not the protocol at all.
            b"GET / HTTP/1.1\r\n\r\n",
            # A length beyond the bound.
            struct.pack("!IB", 0xFFFFFFFF, 32),
        ):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(path)
                sock.sendall(attempt)
                assert sock.recv(65536) == b""  # closed without a HELLO
        viewers = await start_viewers(http, relay, 2)
        try:
            await playing(viewers)
        finally:
            await close_all(viewers)
        assert [w["pid"] for w in await workers(http, relay)] == [w["pid"] for w in procs]
        assert [w["restarts"] for w in await workers(http, relay)] == [0, 0]
    errors = [e for e in relay.log_lines() if e.get("event") == "worker broke the protocol"]
    assert len(errors) == 3


async def test_a_reload_reaches_the_workers(live_relay: RelayProcess) -> None:
    # Workers check WHEP tokens again: with the old tokens they would refuse the new one.
    relay = live_relay
    text = relay.config_path.read_text()
    for token in ("old", "new"):
        relay.config_path.write_text(
            text.replace("[http]\n", f'[http]\nwhep_tokens = ["{token}"]\n')
        )
        before = sum(1 for e in relay.log_lines() if e.get("event") == "worker config reloaded")
        relay.proc.send_signal(signal.SIGHUP)

        async def reloaded(before: int = before) -> bool:
            lines = relay.log_lines()
            return sum(1 for e in lines if e.get("event") == "worker config reloaded") == before + 2

        await until(reloaded, "both workers reloading")
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer new"}) as http:
        viewers = await start_viewers(http, relay, 2)
        try:
            await playing(viewers)
        finally:
            await close_all(viewers)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer old"}) as http:
        async with http.post(
            relay.http + f"/whep/{STREAM}",
            data="v=0\r\n",
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            assert resp.status == 401


def test_a_worker_that_cannot_start_stops_the_relay_with_a_clear_error(tmp_path: Path) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    base = busy.getsockname()[1] - 1  # worker 1 would take the busy port
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[daemon]\nworkers = 2\n[log]\nformat = "json"\n'
        f'[rtmp]\nlisten = "127.0.0.1"\nport = 0\n[http]\nlisten = "127.0.0.1"\nport = 0\n'
        f'[rtc]\nlisten = "127.0.0.1"\nport = {base}\n'
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "srsrelay", "-c", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        busy.close()
    assert done.returncode == 1, done.stderr[-3000:]
    assert (
        f"srsrelay: daemon.workers: worker 1 exited while starting (exit code 1); see its log "
        f"lines above, e.g. its RTC port {base + 1} in use (rtc.port + 1)"
    ) in done.stderr
    assert f"cannot bind rtc.listen=127.0.0.1 rtc.port={base + 1}" in done.stderr


async def test_chromium_plays_from_a_worker_next_to_an_aiortc_viewer_on_the_other(
    live_relay: RelayProcess,
) -> None:
    from tests.chromium import Chromium
    from tests.test_browser import STATS_JS, track

    relay = live_relay
    browser = Chromium()
    await browser.start()
    async with aiohttp.ClientSession() as http:
        try:
            await browser.navigate(f"{relay.http}/?stream={STREAM}")

            async def browser_viewing() -> bool:
                return [w["viewers"] for w in await workers(http, relay)] == [1, 0]

            await until(browser_viewing, "the page's WHEP session on worker 0")
            viewers = await start_viewers(http, relay, 1)  # the other worker: fewer viewers
            try:
                await playing(viewers)
                assert [w["viewers"] for w in await workers(http, relay)] == [1, 1]
                await asyncio.sleep(5)
                stats = await browser.evaluate(STATS_JS)
            finally:
                await close_all(viewers)
        finally:
            await browser.close()
    assert stats is not None, f"player did not start: {browser.console}"
    video, audio = track(stats, "video"), track(stats, "audio")
    assert video["mimeType"] == "video/H264", video
    assert video.get("framesDecoded", 0) >= 150, video
    assert audio["mimeType"] == "audio/opus" and audio.get("packetsReceived", 0) > 0, audio
