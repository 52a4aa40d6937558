"""Configured limits: each one, when hit, refuses or closes only the client over it, is
counted under its config key and logged at most once a second."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from srsrelay.config import AudioConfig, HubConfig
from srsrelay.hub.registry import Hub, StreamBusy, TooManyPublishers
from srsrelay.limits import LOG_INTERVAL, LimitHits
from tests.conftest import Publisher, RelayProcess, start_relay, wait_live
from tests.test_rtmp_server import RawClient, status_code
from tests.test_whep import LiveViewer, http_counters, make_offer, post

# -- counting ------------------------------------------------------------------------------


def test_limit_hits_count_every_hit_and_log_once_a_second() -> None:
    hits = LimitHits()
    assert hits.hit("rtmp.max_publishers", 10.0) == 1
    assert hits.hit("rtmp.max_publishers", 10.5) is None
    assert hits.hit("rtmp.max_publishers", 10.9) is None
    # Another limit has its own interval.
    assert hits.hit("http.max_body_size", 10.9) == 1
    assert hits.hit("rtmp.max_publishers", 10.0 + LOG_INTERVAL) == 3
    assert hits.hit("rtmp.max_publishers", 11.2) is None
    assert hits == {"rtmp.max_publishers": 5, "http.max_body_size": 1}
    assert isinstance(hits.copy(), LimitHits) and hits.copy() == hits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_hub(max_publishers: int, **hub: Any) -> tuple[Hub, Clock]:
    clock = Clock()
    config = HubConfig(**hub)
    return Hub(config, AudioConfig(), 1200, clock=clock, max_publishers=max_publishers), clock


def test_max_publishers_refuses_one_more() -> None:
    hub, _ = make_hub(2)
    hub.publish("live", "a", "pub-1", lambda reason: None)
    hub.publish("live", "b", "pub-2", lambda reason: None)
    with pytest.raises(TooManyPublishers) as exc:
        hub.publish("live", "c", "pub-3", lambda reason: None)
    assert str(exc.value) == (
        "stream live/c refused: the relay has its maximum of 2 publishers (rtmp.max_publishers)"
    )
    # A stream already published is busy, whatever the count.
    with pytest.raises(StreamBusy):
        hub.publish("live", "a", "pub-4", lambda reason: None)
    assert hub.limit_hits == {"rtmp.max_publishers": 1}
    assert [s.key for s in hub.streams()] == ["live/a", "live/b"]
    # One leaves: the next one is let in.
    hub.unpublish(hub.find("live", "b"))
    hub.publish("live", "c", "pub-5", lambda reason: None)
    assert hub.publisher_count == 2


def test_waiting_streams_do_not_count_but_their_returning_publisher_does() -> None:
    hub, _ = make_hub(1, reconnect_grace=10.0)
    stream = hub.publish("live", "a", "pub-1", lambda reason: None)
    hub.unpublish(stream)  # waits for its publisher
    assert hub.publisher_count == 0
    hub.publish("live", "b", "pub-2", lambda reason: None)
    with pytest.raises(TooManyPublishers):
        hub.publish("live", "a", "pub-3", lambda reason: None)
    assert hub.limit_hits["rtmp.max_publishers"] == 1


def test_takeover_does_not_add_a_publisher() -> None:
    hub, _ = make_hub(1, takeover=True)
    kicked: list[str] = []
    hub.publish("live", "a", "pub-1", kicked.append)
    hub.publish("live", "a", "pub-2", lambda reason: None)
    assert kicked == ["taken over by pub-2"] and hub.publisher_count == 1
    assert not hub.limit_hits


def test_lowering_max_publishers_keeps_running_publishes() -> None:
    hub, _ = make_hub(3)
    for name in ("a", "b", "c"):
        hub.publish("live", name, f"pub-{name}", lambda reason: None)
    hub.max_publishers = 1  # as a reload does
    assert hub.publisher_count == 3
    with pytest.raises(TooManyPublishers):
        hub.publish("live", "d", "pub-d", lambda reason: None)
    hub.unpublish(hub.find("live", "a"))
    hub.unpublish(hub.find("live", "b"))
    with pytest.raises(TooManyPublishers):
        hub.publish("live", "d", "pub-d", lambda reason: None)
    hub.unpublish(hub.find("live", "c"))
    hub.publish("live", "d", "pub-d", lambda reason: None)


# -- the daemon ----------------------------------------------------------------------------


@contextlib.contextmanager
def relay_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rtc: str = "", **settings: str
) -> Iterator[RelayProcess]:
    """A relay with extra [rtc] lines and other settings given as SRSRELAY_* variables,
    e.g. rtmp_max_publishers="1"."""
    for key, value in settings.items():
        monkeypatch.setenv(f"SRSRELAY_{key.upper()}", value)
    relay = start_relay(tmp_path, extra=rtc)
    try:
        yield relay
    finally:
        code = relay.stop()
        assert code == 0, f"relay exited {code}: {relay.log_path.read_text()[-4000:]}"


def limit_lines(relay: RelayProcess, setting: str) -> list[dict[str, Any]]:
    return [
        line
        for line in relay.log_lines()
        if line.get("event") == "limit reached" and line.get("setting") == setting
    ]


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def rtmp_handshake(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """Connect and do the RTMP handshake; None if the relay closed the connection instead."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x03" + bytes(1536))
    try:
        await asyncio.wait_for(reader.readexactly(3073), 5)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        writer.close()
        return None
    return reader, writer


@pytest.mark.integration
async def test_publishers_and_connections_per_ip(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish
) -> None:
    with relay_env(
        tmp_path, monkeypatch, rtmp_max_publishers="1", rtmp_max_connections_per_ip="3"
    ) as relay:
        first: Publisher = publish(relay.rtmp_url("live/test"), size="320x240")
        await wait_live(relay, "live/test")
        async with aiohttp.ClientSession() as http:
            live = LiveViewer(relay)
            await live.start(http)
            try:
                # rtmp.max_publishers = 1: a second ffmpeg is refused and gives up.
                second: Publisher = publish(relay.rtmp_url("live/two"), size="320x240")
                await until(lambda: second.proc.poll() is not None, "the refused ffmpeg", 10)
                assert second.proc.returncode != 0
                # The status it got, as a raw client sees it.
                client = await RawClient.open(relay.rtmp_port)
                reply = await client.publish("three")
                assert status_code(reply) == "NetStream.Publish.Rejected"
                assert isinstance(reply[3], dict)
                assert reply[3]["description"] == (
                    "stream live/three refused: the relay has its maximum of 1 publishers "
                    "(rtmp.max_publishers)"
                )
                await client.wait_closed()
                lines = limit_lines(relay, "rtmp.max_publishers")
                assert lines[0]["stream"] == "live/two" and lines[0]["total"] == 1
                assert lines[0]["level"] == "warning"

                # rtmp.max_connections_per_ip = 3: ffmpeg has one, two more are let in...
                await until(lambda: _connections(relay) == 1, "one RTMP connection left")
                kept = [await rtmp_handshake(relay.rtmp_port) for _ in range(2)]
                assert all(k is not None for k in kept)
                # ... the fourth is closed at accept, without a handshake reply.
                assert await rtmp_handshake(relay.rtmp_port) is None
                (line,) = limit_lines(relay, "rtmp.max_connections_per_ip")
                assert line["ip"] == "127.0.0.1" and line["limit"] == 3 and line["total"] == 1
                # One leaves: a new connection is let in again.
                kept_one = kept.pop()
                assert kept_one is not None
                kept_one[1].close()
                again = None
                deadline = time.monotonic() + 5
                while again is None and time.monotonic() < deadline:
                    again = await rtmp_handshake(relay.rtmp_port)
                assert again is not None, "a freed connection slot was not given back"
                for k in [*kept, again]:
                    if k is not None:
                        k[1].close()

                # The first publisher and its viewer never noticed.
                await live.assert_playing()
                assert first.proc.poll() is None
            finally:
                await live.close()


def _connections(relay: RelayProcess) -> int:
    opened = sum(1 for line in relay.log_lines() if line.get("event") == "rtmp connection opened")
    closed = sum(1 for line in relay.log_lines() if line.get("event") == "rtmp connection closed")
    return opened - closed


@pytest.mark.integration
async def test_handshake_and_idle_timeouts(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish
) -> None:
    with relay_env(
        tmp_path, monkeypatch, rtmp_handshake_timeout="2", rtmp_idle_timeout="2"
    ) as relay:
        first: Publisher = publish(relay.rtmp_url("live/test"), size="320x240")
        await wait_live(relay, "live/test")
        silent = await RawClient.open(relay.rtmp_port)
        await silent.handshake()  # and never publishes
        idle = await RawClient.open(relay.rtmp_port)
        assert status_code(await idle.publish("idle")) == "NetStream.Publish.Start"
        started = time.monotonic()
        await asyncio.gather(silent.wait_closed(), idle.wait_closed())
        elapsed = time.monotonic() - started
        assert 1.5 < elapsed < 6, elapsed
        # Counted when the connection's task has ended, just after the socket closed.
        await until(
            lambda: all(
                limit_lines(relay, s) for s in ("rtmp.handshake_timeout", "rtmp.idle_timeout")
            ),
            "both timeouts logged",
        )
        (handshake,) = limit_lines(relay, "rtmp.handshake_timeout")
        (idle_line,) = limit_lines(relay, "rtmp.idle_timeout")
        assert handshake["total"] == 1 and idle_line["total"] == 1
        assert idle_line["id"].startswith("pub-")
        # The publisher that sends keeps publishing.
        await asyncio.sleep(0.5)
        assert first.proc.poll() is None
        await wait_live(relay, "live/test", timeout=1)


@pytest.mark.integration
async def test_http_limits(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish
) -> None:
    # A burst of 5 POSTs and (practically) no refill; room for 2 viewers.
    with relay_env(
        tmp_path,
        monkeypatch,
        rtc="max_viewers = 2\ndtls_timeout = 60.0\n",
        http_whep_rate_limit="0.01",
        http_whep_rate_burst="5",
        http_max_body_size="4096",
    ) as relay:
        publish(relay.rtmp_url("live/test"), size="320x240")
        await wait_live(relay, "live/test")
        url = relay.http + "/whep/live/test"
        async with aiohttp.ClientSession() as http:
            live = LiveViewer(relay)
            await live.start(http)  # POST 1
            try:
                offer = make_offer()[0]
                too_large = "v=0\r\n" + "a=x\r\n" * 1000
                statuses = []
                for body in (offer, offer, too_large, offer, offer):  # POSTs 2-6
                    resp, _ = await post(http, url, body)
                    statuses.append(resp.status)
                assert statuses == [201, 503, 413, 503, 429], statuses
                counters: dict[str, Any] = await http_counters(http, relay)
                assert counters["limit_hits"] == {
                    "rtc.max_viewers": 2,
                    "http.max_body_size": 1,
                    "http.whep_rate_limit": 1,
                }
                # The second 503 came within a second of the first: one log line.
                (full,) = limit_lines(relay, "rtc.max_viewers")
                assert full["total"] == 1 and full["limit"] == 2
                (large,) = limit_lines(relay, "http.max_body_size")
                assert large["limit"] == 4096 and large["client"] == "127.0.0.1"
                limited = [
                    line
                    for line in relay.log_lines()
                    if line.get("event") == "whep requests rate limited"
                ]
                assert [line["setting"] for line in limited] == ["http.whep_rate_limit"]
                await live.assert_playing()
            finally:
                await live.close()
