"""The Dockerfile's install, run without Docker: its builder stage's COPY and RUN steps
executed as written into a fresh virtual environment, then the installed `srsrelay`
started with the shipped conf/relay.toml and environment overrides, as the image does."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

DOCKERFILE = ROOT / "Dockerfile"
VENV = "/opt/srsrelay"
"""Where the Dockerfile builds the virtual environment (and the final stage copies it)."""
INSTALL_TIMEOUT = 600


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)
    """(INSTRUCTION, arguments) with continuation lines joined."""


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{instruction} before FROM"
            stages[-1].instructions.append((instruction, args.strip()))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_dockerfile_shape() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert [(s.base, s.name) for s in stages] == [
        ("python:3.11-slim-bookworm", "builder"),
        ("python:3.11-slim-bookworm", None),
    ]
    builder, final = stages
    runs = [exec_form(a) for i, a in builder.instructions if i == "RUN"]
    assert runs == [["python", "-m", "venv", VENV], [f"{VENV}/bin/pip", "install", "."]]
    final_steps = dict(final.instructions)
    assert final_steps["USER"] == "srsrelay"
    assert final_steps["COPY"] == "conf/relay.toml /etc/srsrelay/relay.toml"
    assert f"--from=builder {VENV} {VENV}" in [a for i, a in final.instructions if i == "COPY"]
    assert final_steps["EXPOSE"].split() == ["1935/tcp", "1985/tcp", "8000/udp"]
    assert exec_form(final_steps["CMD"]) == ["srsrelay", "-c", "/etc/srsrelay/relay.toml"]
    # No apt-get: PyAV's wheel bundles FFmpeg.
    assert "apt-get" not in DOCKERFILE.read_text()
    health = final_steps["HEALTHCHECK"]
    assert health.split(" CMD ")[1].startswith('["python", "-c", ')
    assert "/api/v1/health" in health


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"
    kept = {rule[1:] for rule in rules if rule.startswith("!")}
    copied = set()
    for stage in parse_dockerfile(DOCKERFILE.read_text()):
        for instruction, args in stage.instructions:
            if instruction == "COPY" and not args.startswith("--from"):
                copied.update(shlex.split(args)[:-1])
    assert copied == kept


def copy_context(builder: Stage, context: Path) -> Path:
    """Carry out the builder's WORKDIR and COPY steps from the checkout into `context`."""
    workdir = context
    for instruction, args in builder.instructions:
        if instruction == "WORKDIR":
            workdir = context / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = shlex.split(args)
            target = workdir / dest
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(
                        src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)
    return workdir


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
def test_dockerfile_install_runs(tmp_path: Path) -> None:
    (builder, final) = parse_dockerfile(DOCKERFILE.read_text())
    workdir = copy_context(builder, tmp_path / "context")
    venv = tmp_path / "venv"
    started = time.monotonic()
    for instruction, args in builder.instructions:
        if instruction != "RUN":
            continue
        argv = [
            sys.executable if word == "python" else word.replace(VENV, str(venv))
            for word in exec_form(args)
        ]
        done = subprocess.run(
            argv, cwd=workdir, capture_output=True, text=True, timeout=INSTALL_TIMEOUT
        )
        assert done.returncode == 0, f"RUN {args} failed:\n{done.stdout[-3000:]}{done.stderr}"
    print(f"install took {time.monotonic() - started:.1f} s")

    # As in the image: nothing from the checkout or this environment's settings.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SRSRELAY_", "PYTHON"))}
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import srsrelay; print(srsrelay.__file__)"],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    http = free_port()
    env = {
        **clean,
        "SRSRELAY_RTMP_LISTEN": "127.0.0.1",
        "SRSRELAY_RTMP_PORT": str(free_port()),
        "SRSRELAY_HTTP_LISTEN": "127.0.0.1",
        "SRSRELAY_HTTP_PORT": str(http),
        "SRSRELAY_RTC_LISTEN": "127.0.0.1",
        "SRSRELAY_RTC_PORT": str(free_port(socket.SOCK_DGRAM)),
        "SRSRELAY_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(venv / "bin" / "srsrelay"), "-c", str(ROOT / "conf" / "relay.toml")],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 20
        status = 0
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):  # not listening yet
                status = http_status(base + "/api/v1/health")
                if status:
                    break
            time.sleep(0.1)
        assert status == 200, f"/api/v1/health answered {status}: {log_path.read_text()}"
        # The player page is packaged with the code.
        assert http_status(base + "/") == 200
        # The image's HEALTHCHECK command; the image's PATH starts with the venv.
        health = dict(final.instructions)["HEALTHCHECK"].split(" CMD ", 1)[1]
        python = str(venv / "bin" / "python")
        argv = [python if w == "python" else w for w in exec_form(health)]
        assert subprocess.run(argv, env=env, timeout=10).returncode == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
    assert code == 0, log_path.read_text()[-3000:]
