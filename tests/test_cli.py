"""The command line: config checking, startup on ephemeral ports, signals, exit codes."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from srsrelay import __version__
from srsrelay.cli import main
from srsrelay.config import LogConfig
from srsrelay.log import LIBRARY_LOGGERS, configure_logging

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

EPHEMERAL = """
[log]
format = "json"

[rtmp]
listen = "127.0.0.1"
port = 0

[http]
listen = "127.0.0.1"
port = 0

[rtc]
listen = "127.0.0.1"
port = 0

[daemon]
shutdown_timeout = 3.0
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SRSRELAY_"):
            monkeypatch.delenv(name)


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRSRELAY_")}
    env.update(extra)
    return env


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


# -- in-process: argument handling and config checking ------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"srsrelay {__version__}\n"


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_check_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, EPHEMERAL)
    assert main(["--check", "-c", str(path)]) == 0
    assert capsys.readouterr().out == f"srsrelay: config ok: {path}\n"


def test_check_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[rtc]\nport = 70000\n")
    assert main(["--check", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "srsrelay: config error: rtc.port: must be 0-65535, got 70000\n"
    assert captured.out == ""


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.toml"
    assert main(["--check", "-c", str(path)]) == 2
    assert capsys.readouterr().err == f"srsrelay: config error: {path}: file not found\n"


def test_check_bad_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SRSRELAY_RTMP_PROT", "1935")
    assert main(["--check", "-c", str(write(tmp_path, EPHEMERAL))]) == 2
    assert capsys.readouterr().err == (
        "srsrelay: config error: SRSRELAY_RTMP_PROT: unknown key rtmp.prot\n"
    )


def test_default_config_is_conf_relay_toml(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["--check"]) == 0
    assert capsys.readouterr().out == "srsrelay: config ok: conf/relay.toml\n"


def test_builtin_defaults_without_conf_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--check"]) == 0
    assert capsys.readouterr().out == "srsrelay: config ok: built-in defaults\n"


# -- subprocess: the real daemon ---------------------------------------------------------


def spawn(tmp_path: Path, config: Path, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "srsrelay", "-c", str(config)],
            cwd=ROOT,
            env=clean_environ(**env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, log_path


def log_events(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def wait_started(proc: subprocess.Popen[bytes], log_path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for event in log_events(log_path):
            if event.get("event") == "relay started":
                return event
        if proc.poll() is not None:
            raise AssertionError(f"relay exited {proc.returncode}: {log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError(f"no 'relay started' line: {log_path.read_text()}")


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"relay did not exit within {STOP_TIMEOUT} s of {sig.name}") from None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_starts_on_free_ports_and_stops_on_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    proc, log_path = spawn(tmp_path, write(tmp_path, EPHEMERAL))
    try:
        started = wait_started(proc, log_path)
        rtmp, http, rtc = started["rtmp_port"], started["http_port"], started["rtc_port"]
        assert started["rtmp"] == f"127.0.0.1:{rtmp}"
        assert started["http"] == f"127.0.0.1:{http}"
        assert started["rtc"] == f"127.0.0.1:{rtc}"
        assert started["level"] == "info"
        assert "timestamp" in started
        assert all(isinstance(p, int) and p > 0 for p in (rtmp, http, rtc)), started

        with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/v1/streams", timeout=5) as r:
            assert json.load(r) == {"code": 0, "streams": []}
        with socket.create_connection(("127.0.0.1", rtmp), timeout=5):
            pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            with pytest.raises(OSError):  # the RTC port is taken by the relay
                udp.bind(("127.0.0.1", rtc))
    finally:
        code = stop(proc, sig)
    assert code == 0, log_path.read_text()
    events = [e.get("event") for e in log_events(log_path)]
    assert "relay stopping" in events, events
    assert events[-1] == "relay stopped", events


def test_port_in_use_names_the_setting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, log_path = spawn(tmp_path, write(tmp_path, EPHEMERAL), SRSRELAY_HTTP_PORT=str(port))
        code = proc.wait(START_TIMEOUT)
    assert code == 1
    lines = log_path.read_text().splitlines()
    assert lines[-1] == (
        f"srsrelay: http.port: cannot listen on 127.0.0.1:{port}: address already in use"
    )


def test_bad_config_in_subprocess_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\nlevel = "loud"\n')
    result = subprocess.run(
        [sys.executable, "-m", "srsrelay", "--check", "-c", str(path)],
        cwd=ROOT,
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "srsrelay: config error: "
        'log.level: must be one of debug, info, warning, error, got "loud"\n'
    )


# -- logging setup -----------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {n: logging.getLogger(n).level for n in ("srsrelay", *LIBRARY_LOGGERS)}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, lvl in named.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def test_json_logs_filter_levels_and_quiet_libraries(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging(LogConfig(level="info", format="auto"), out)  # not a TTY: JSON
    log = structlog.get_logger("srsrelay.test")
    log.debug("hidden debug")
    log.info("relay started", rtmp="127.0.0.1:1935")
    logging.getLogger("aiortc.rtcdtlstransport").info("hidden library info")
    logging.getLogger("aioice.ice").warning("library warning %d", 7)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["level"], e["logger"]) for e in lines] == [
        ("relay started", "info", "srsrelay.test"),
        ("library warning 7", "warning", "aioice.ice"),
    ]
    assert lines[0]["rtmp"] == "127.0.0.1:1935"
    assert lines[0]["timestamp"].endswith("Z")


def test_console_logs_and_reconfiguration(restore_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(LogConfig(level="error", format="json"), first)
    configure_logging(LogConfig(level="debug", format="console"), second)
    structlog.get_logger("srsrelay.test").debug("now visible", stream="live/x")
    assert first.getvalue() == ""
    text = second.getvalue()
    assert "now visible" in text and "stream=live/x" in text, text
    assert not text.lstrip().startswith("{"), text
