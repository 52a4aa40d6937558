"""Configuration reload: which keys apply while running, SIGHUP on the daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from srsrelay.app import Relay
from srsrelay.cli import reload_config
from srsrelay.config import Config, HttpConfig, RtcConfig, RtmpConfig
from srsrelay.reload import RELOADABLE, changed_keys, plan_reload
from tests.conftest import RelayProcess, inproc_config, start_relay, wait_live
from tests.test_rtmp_server import RawClient, status_code
from tests.test_whep import LiveViewer, make_offer, post


def test_reloadable_keys_are_settings() -> None:
    config = Config()
    settings = {
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(Config)
        for key in dataclasses.fields(getattr(config, section.name))
    }
    assert RELOADABLE <= settings, RELOADABLE - settings
    # What cannot change under running sockets and sessions is not in the list.
    assert not {"rtmp.port", "http.listen", "rtc.port", "rtc.candidates"} & RELOADABLE


def test_nothing_changed() -> None:
    plan = plan_reload(Config(), Config())
    assert plan.applied == () and plan.needs_restart == ()
    assert plan.config == Config()


def test_reloadable_keys_apply_and_others_are_kept() -> None:
    old = Config()
    new = dataclasses.replace(
        old,
        rtmp=RtmpConfig(port=1936, max_publishers=3, idle_timeout=5.0),
        http=HttpConfig(whep_tokens=("abc",), whep_rate_limit=2.0, listen="127.0.0.1"),
        rtc=RtcConfig(max_viewers=7, nack_history=1024),
    )
    assert changed_keys(old, new) == [
        "http.listen",
        "http.whep_rate_limit",
        "http.whep_tokens",
        "rtc.max_viewers",
        "rtc.nack_history",
        "rtmp.idle_timeout",
        "rtmp.max_publishers",
        "rtmp.port",
    ]
    plan = plan_reload(old, new)
    assert plan.applied == (
        "http.whep_rate_limit",
        "http.whep_tokens",
        "rtc.max_viewers",
        "rtmp.idle_timeout",
        "rtmp.max_publishers",
    )
    assert plan.needs_restart == ("http.listen", "rtc.nack_history", "rtmp.port")
    cfg = plan.config
    assert cfg.rtmp == dataclasses.replace(old.rtmp, max_publishers=3, idle_timeout=5.0)
    assert cfg.http == dataclasses.replace(old.http, whep_tokens=("abc",), whep_rate_limit=2.0)
    assert cfg.rtc == dataclasses.replace(old.rtc, max_viewers=7)
    assert cfg.hub is old.hub and cfg.video is old.video


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reload_config_applies_to_the_parts(tmp_path: Path) -> None:
    relay = Relay(inproc_config())
    config = _write(
        tmp_path / "relay.toml",
        "[rtmp]\nmax_publishers = 2\nmax_connections_per_ip = 4\nchunk_size = 8192\n"
        "[rtc]\nmax_viewers = 9\nmax_viewers_per_stream = 3\n"
        '[log]\nformat = "json"\n',
    )
    with capture_logs() as logs:
        assert reload_config(relay, config)
    assert relay.hub.max_publishers == 2
    assert relay.rtmp._config.max_connections_per_ip == 4
    assert relay.rtmp._config.chunk_size == RtmpConfig().chunk_size  # needs a restart
    assert relay.rtc.config.max_viewers == 9 and relay.rtc.config.max_viewers_per_stream == 3
    assert relay.config.rtmp is relay.rtmp._config and relay.config.rtc is relay.rtc.config
    events = {e["event"]: e for e in logs}
    # inproc_config listens on 127.0.0.1 with port 0; the file keeps the defaults.
    assert events["setting changed; needs a restart"]["keys"] == [
        "http.listen",
        "http.port",
        "rtc.listen",
        "rtc.port",
        "rtmp.chunk_size",
        "rtmp.listen",
        "rtmp.port",
    ]
    assert events["config reloaded"]["applied"] == [
        "rtc.max_viewers",
        "rtc.max_viewers_per_stream",
        "rtmp.max_connections_per_ip",
        "rtmp.max_publishers",
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[rtmp]\nmax_publishers = 0\n", "rtmp.max_publishers: must be greater than 0, got 0"),
        ("[rtc]\nmax_viewer = 3\n", "rtc.max_viewer: unknown key"),
        ("[rtmp\n", "{path}: TOML syntax error: Expected ']' at the end of a table declaration"),
    ],
)
def test_invalid_file_keeps_the_running_config(tmp_path: Path, text: str, error: str) -> None:
    relay = Relay(inproc_config(max_viewers=5))
    before = relay.config
    # A valid change before the bad line is not applied either.
    path = _write(tmp_path / "relay.toml", '[http]\nwhep_tokens = ["t"]\n' + text)
    with capture_logs() as logs:
        assert not reload_config(relay, path)
    assert relay.config is before and relay.rtc.config.max_viewers == 5
    assert relay.config.http.whep_tokens == ()
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("reloading configuration", "info"),
        ("config reload failed; keeping the running configuration", "error"),
    ]
    assert logs[1]["error"].startswith(error.format(path=path))


def test_missing_file_is_named(tmp_path: Path) -> None:
    relay = Relay(inproc_config())
    with capture_logs() as logs:
        assert not reload_config(relay, tmp_path / "gone.toml")
    assert logs[-1]["error"] == f"{tmp_path / 'gone.toml'}: file not found"


# -- the daemon --------------------------------------------------------------------------


def _events(relay: RelayProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in relay.log_lines() if line.get("event") == name]


async def _hangup(relay: RelayProcess, event: str) -> dict[str, Any]:
    """SIGHUP the daemon and wait for the next `event` line."""
    before = len(_events(relay, event))
    relay.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = _events(relay, event)
        if len(found) > before:
            return found[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event!r} after SIGHUP: {relay.log_path.read_text()[-3000:]}")


@pytest.mark.integration
async def test_sighup_reloads_without_dropping_sessions(  # type: ignore[no-untyped-def]
    tmp_path: Path, publish
) -> None:
    relay = start_relay(tmp_path)
    try:
        publish(relay.rtmp_url("live/test"), size="320x240")
        await wait_live(relay, "live/test")
        original = relay.config_path.read_text()
        async with aiohttp.ClientSession() as http:
            live = LiveViewer(relay)
            await live.start(http)
            try:
                # A bad file: nothing changes, the error says what is wrong.
                relay.config_path.write_text(
                    original.replace("[rtmp]\n", "[rtmp]\nmax_publishers = -1\n")
                )
                failed = await _hangup(
                    relay, "config reload failed; keeping the running configuration"
                )
                assert failed["level"] == "error"
                assert failed["error"] == "rtmp.max_publishers: must be greater than 0, got -1"

                # A good one: tokens and the publisher limit apply, ports need a restart.
                relay.config_path.write_text(
                    original.replace("[rtmp]\n", "[rtmp]\nmax_publishers = 1\n")
                    .replace("[http]\n", '[http]\nwhep_tokens = ["s3cret"]\n')
                    .replace(f"port = {relay.rtc_port}\n", "port = 1\n")
                    + "\n[hub]\ntakeover = true\n"
                )
                reloaded = await _hangup(relay, "config reloaded")
                assert reloaded["applied"] == ["http.whep_tokens", "rtmp.max_publishers"]
                restart = _events(relay, "setting changed; needs a restart")
                assert restart[-1]["keys"] == ["hub.takeover", "rtc.port"]
                assert restart[-1]["level"] == "warning"

                url = relay.http + "/whep/live/test"
                resp, _ = await post(http, url, make_offer()[0])
                assert resp.status == 401
                auth = {"Content-Type": "application/sdp", "Authorization": "Bearer s3cret"}
                resp, text = await post(http, url, make_offer()[0], auth)
                assert resp.status == 201, text
                # rtmp.max_publishers = 1 now: a second stream is refused.
                client = await RawClient.open(relay.rtmp_port)
                reply = await client.publish("other")
                assert status_code(reply) == "NetStream.Publish.Rejected"
                client.w.close()
                # The viewer that was playing before both reloads still is.
                await live.assert_playing()
            finally:
                await live.close()
    finally:
        code = relay.stop()
    assert code == 0, relay.log_path.read_text()[-3000:]
