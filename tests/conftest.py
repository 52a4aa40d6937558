"""Fixtures that start real parts: the relay daemon and an ffmpeg publisher."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RelayProcess:
    proc: subprocess.Popen[bytes]
    rtmp_port: int
    http_port: int
    rtc_port: int
    log_path: Path
    config_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rtmp_url(self, path: str) -> str:
        return f"rtmp://127.0.0.1:{self.rtmp_port}/{path}"

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("relay did not stop within 15 s of SIGTERM") from None
        return self.proc.returncode


def start_relay(
    tmp_path: Path, extra: str = "", env: Mapping[str, str] | None = None
) -> RelayProcess:
    """The relay on loopback with free ports; `extra` is TOML appended to [rtc] (or new
    sections), `env` adds SRSRELAY_* overrides for keys in sections written here."""
    rtmp, http, rtc = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[log]
format = "json"
level = "info"

[rtmp]
listen = "127.0.0.1"
port = {rtmp}

[http]
listen = "127.0.0.1"
port = {http}

[rtc]
listen = "127.0.0.1"
port = {rtc}
candidates = ["127.0.0.1"]
{extra}
"""
    )
    log_path = tmp_path / "relay.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "srsrelay", "-c", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env} if env else None,
    )
    relay = RelayProcess(proc, rtmp, http, rtc, log_path, config)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"relay exited {proc.returncode}: {log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", http), timeout=0.2):
                return relay
        except OSError:
            time.sleep(0.1)
    relay.stop()
    raise AssertionError(f"relay did not start: {log_path.read_text()}")


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    r = start_relay(tmp_path)
    yield r
    code = r.stop()
    assert code == 0, f"relay exited {code}: {r.log_path.read_text()[-4000:]}"


@dataclass
class Publisher:
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


FFMPEG = shutil.which("ffmpeg") or "ffmpeg"


def ffmpeg_publish_args(
    url: str, size: str = "1280x720", extra: list[str] | None = None
) -> list[str]:
    return [
        FFMPEG,
        "-hide_banner",
        "-loglevel",
        "warning",
        "-re",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={size}:rate=30",
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
        "60",
        "-c:a",
        "aac",
        *(extra or []),
        "-f",
        "flv",
        url,
    ]


@pytest.fixture
def publish(tmp_path: Path) -> Iterator[Callable[..., Publisher]]:
    started: list[Publisher] = []

    def _publish(url: str, **kwargs: object) -> Publisher:
        args = ffmpeg_publish_args(url, **kwargs)  # type: ignore[arg-type]
        log_path = tmp_path / f"ffmpeg-{len(started)}.log"
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log_path.open("wb"), stderr=subprocess.STDOUT
        )
        pub = Publisher(proc, log_path, args)
        started.append(pub)
        return pub

    yield _publish
    for pub in started:
        pub.stop()


async def wait_live(relay: RelayProcess, stream: str, timeout: float = 15.0) -> dict[str, object]:
    """Wait until the relay lists `stream` (app/name) as live with video."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(relay.http + "/api/v1/streams") as resp:
                data = await resp.json()
            for s in data["streams"]:
                if f"{s['app']}/{s['name']}" == stream and s.get("video"):
                    return dict(s)
            await asyncio.sleep(0.2)
    raise AssertionError(f"stream {stream} never went live: {relay.log_path.read_text()[-3000:]}")


async def session_count(relay: RelayProcess) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(relay.http + "/api/v1/sessions") as resp:
            data = await resp.json()
    return len(data["sessions"])


def inproc_config(**rtc: Any) -> Any:
    """A Config for a relay inside the test process, on loopback and free ports."""
    from srsrelay.config import Config, HttpConfig, LogConfig, RtcConfig, RtmpConfig

    return Config(
        log=LogConfig(format="json"),
        rtmp=RtmpConfig(listen="127.0.0.1", port=0),
        http=HttpConfig(listen="127.0.0.1", port=0),
        rtc=dataclasses.replace(RtcConfig(), listen="127.0.0.1", port=0, **rtc),
    )


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Keep the slow end-to-end tests last so unit failures show first.
    items.sort(key=lambda item: 1 if item.get_closest_marker("integration") else 0)


os.environ.setdefault("PYTHONUNBUFFERED", "1")
