"""Prometheus metrics: rates, event-loop lag, the collector's families and values."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from srsrelay.app import Relay
from srsrelay.config import ApiConfig, Config, RtcConfig
from srsrelay.metrics import LAG_BUCKETS, LagStats, Monitor, RateBook
from srsrelay.webrtc.server import RtcServer, close_category
from tests.conftest import inproc_config

GOLDEN = Path(__file__).parent / "fixtures" / "metrics_golden.txt"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[list[str], Samples]:
    """("name type" of every family as the TYPE lines say, {(sample, labels): value})."""
    families = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            families.append(f"{name} {kind}")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def scrape(relay: Relay, headers: dict[str, str] | None = None) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{relay.http_port}/metrics", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            return await resp.text()


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    r = Relay(inproc_config())
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


# -- rates and lag ----------------------------------------------------------------


def test_rate_over_window_of_samples() -> None:
    book = RateBook(history=31)
    assert book.rate("a", 10) is None
    book.sample("a", 0, 100.0)
    assert book.rate("a", 10) is None  # one sample is no rate
    for second in range(1, 31):
        # 1000 units a second for 20 s, then 4000 a second.
        total = 1000 * second if second <= 20 else 20_000 + 4000 * (second - 20)
        book.sample("a", total, 100.0 + second)
    assert book.rate("a", 10) == pytest.approx(4000)
    assert book.rate("a", 30) == pytest.approx(60_000 / 30)
    assert book.rate("a", 15) == pytest.approx((60_000 - 15_000) / 15)


def test_rate_history_is_bounded() -> None:
    book = RateBook(history=3)
    for second, total in enumerate((0, 100, 300, 600)):
        book.sample("a", total, float(second))
    # Only the last 3 samples are kept: the rate cannot reach back further.
    assert book.rate("a", 60) == pytest.approx((600 - 100) / 2)


def test_rate_restarts_when_the_counter_goes_back() -> None:
    book = RateBook()
    book.sample("s", 5000, 1.0)
    book.sample("s", 6000, 2.0)
    book.sample("s", 100, 3.0)  # a new stream under the same key
    assert book.rate("s", 10) is None
    book.sample("s", 600, 4.0)
    assert book.rate("s", 10) == pytest.approx(500)


def test_rate_book_is_bounded_and_forgets_what_is_gone() -> None:
    book = RateBook(max_keys=2)
    for key in ("a", "b", "c"):
        book.sample(key, 1, 0.0)
        book.sample(key, 2, 1.0)
    assert len(book) == 2
    assert book.rate("c", 10) is None
    book.retain(["b"])
    assert len(book) == 1
    assert book.rate("a", 10) is None
    assert book.rate("b", 10) == pytest.approx(1)


def test_lag_histogram_is_cumulative() -> None:
    lag = LagStats()
    for seconds in (0.0, 0.003, 0.2, 9.0, -0.001):
        lag.record(seconds)
    assert lag.last == 0.0  # a negative lag (early wake-up) counts as none
    assert lag.max == 9.0
    assert lag.count == 5
    assert lag.sum == pytest.approx(9.203)
    buckets = dict(lag.cumulative())
    assert buckets["0.001"] == 2
    assert buckets["0.005"] == 3
    assert buckets["0.25"] == 4
    assert buckets[f"{LAG_BUCKETS[-1]:g}"] == 4
    assert buckets["+Inf"] == 5


async def test_monitor_sees_a_blocked_event_loop_and_samples() -> None:
    lag = LagStats()
    sampled: list[float] = []
    monitor = Monitor(lag, sampled.append, interval=0.02)
    monitor.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.15)  # noqa: ASYNC251 - blocks the loop on purpose: the wake-up is late
        await asyncio.sleep(0.12)
    finally:
        await monitor.stop()
    assert lag.max >= 0.1, lag.max
    assert lag.count >= 3
    assert sampled, "the rate sampler never ran"


# -- viewer close reasons and totals ---------------------------------------------


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("viewer sent DELETE", "deleted"),
        ("kicked: by the API", "kicked"),
        ("stream ended", "stream_ended"),
        ("ice consent timeout", "consent_timeout"),
        ("dtls handshake failed", "dtls_failed"),
        ("dtls timeout", "dtls_timeout"),
        ("dtls closed by viewer", "dtls_closed"),
        ("overloaded: congested for 10.2 s (loss 0.3)", "overload"),
        ("server stopping", "shutdown"),
        ("relay is shutting down", "shutdown"),
        ("refused by the on_play hook", "refused"),
        ("send failed: OSError: boom", "error"),
        ("something new", "other"),
        (None, "other"),
    ],
)
def test_close_reasons_map_to_a_fixed_set(reason: str | None, category: str) -> None:
    assert close_category(reason) == category


def fake_session(session_id: str, nacks: int, plis: int, dropped: int) -> Any:
    """The parts of a ViewerSession that RtcServer's accounting reads."""
    nack = SimpleNamespace(
        requested=nacks * 2,
        retransmitted=nacks,
        retransmitted_bytes=nacks * 1000,
        over_budget=1,
        not_found=0,
        too_soon=0,
    )
    return SimpleNamespace(
        id=session_id,
        ice=SimpleNamespace(ufrag=f"u{session_id}", remote_addr=None),
        close_reason="kicked: test",
        rtcp=SimpleNamespace(nacks=nacks, plis=plis, firs=0),
        nack=SimpleNamespace(counters=nack),
        frames_dropped={"congestion": dropped, "blocked": 0},
    )


def test_totals_of_closed_viewers_do_not_go_backwards() -> None:
    rtc = RtcServer(RtcConfig())
    a, b = fake_session("a", nacks=3, plis=2, dropped=5), fake_session("b", 4, 1, 0)
    rtc._sessions.update({"a": a, "b": b})
    before = rtc.viewer_totals()
    assert before["nacks_received"] == 7
    assert before["retransmitted_bytes"] == 7000
    assert before["plis"] == 3
    assert before["nack_over_budget"] == 2
    assert before["frames_dropped:congestion"] == 5

    rtc._session_closed(a)
    assert "a" not in rtc.sessions
    assert rtc.viewer_totals() == before
    assert rtc.closed == {"kicked": 1}


# -- the collector ----------------------------------------------------------------


async def test_metric_families_match_the_golden_list(relay: Relay) -> None:
    families, _ = parse(await scrape(relay))
    golden = GOLDEN.read_text().split("\n")
    assert sorted(families) == sorted(line for line in golden if line), (
        "metric families changed: update tests/fixtures/metrics_golden.txt and the README"
    )
    assert all(f.split(" ")[0].startswith("srsrelay_") for f in families)
    counters = [f.split(" ")[0] for f in families if f.endswith(" counter")]
    assert all(name.endswith("_total") for name in counters), counters


async def test_values_of_an_idle_relay(relay: Relay) -> None:
    await asyncio.sleep(0.6)  # two lag probes
    _, samples = parse(await scrape(relay))
    assert value(samples, "srsrelay_streams") == 0
    assert value(samples, "srsrelay_viewers") == 0
    assert value(samples, "srsrelay_build_info", version="0.1.0") == 1
    assert value(samples, "srsrelay_send_datagrams_total", kind="media", outcome="sent") == 0
    assert value(samples, "srsrelay_viewer_sessions_closed_total", reason="kicked") == 0
    assert value(samples, "srsrelay_http_refused_total", reason="rate_limited") == 0
    assert value(samples, "srsrelay_event_loop_lag_seconds_count") >= 2
    assert value(samples, "srsrelay_start_time_seconds") == pytest.approx(time.time(), abs=60)


async def test_two_relays_in_one_process_count_separately() -> None:
    first, second = Relay(inproc_config()), Relay(inproc_config())
    await first.start()
    await second.start()
    try:
        # Garbage on the first relay's RTMP port: a handshake protocol error there only.
        reader, writer = await asyncio.open_connection("127.0.0.1", first.rtmp_port)
        writer.write(b"\x07" + bytes(1536))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and first.rtmp.connection_count:
            await asyncio.sleep(0.02)
        _, one = parse(await scrape(first))
        _, two = parse(await scrape(second))
    finally:
        await first.stop()
        await second.stop()
    assert value(one, "srsrelay_rtmp_protocol_errors_total", kind="handshake") == 1
    assert value(one, "srsrelay_rtmp_received_bytes_total") == 1537
    assert ("srsrelay_rtmp_protocol_errors_total", frozenset({("kind", "handshake")})) not in two
    assert value(two, "srsrelay_rtmp_received_bytes_total") == 0


async def test_metrics_follow_api_access() -> None:
    config: Config = inproc_config()
    config = dataclasses.replace(config, api=ApiConfig(access="token", tokens=("s3cret",)))
    relay = Relay(config)
    await relay.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{relay.http_port}/metrics"
            async with http.get(url) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == 'Bearer realm="srsrelay"'
                body = await resp.json()
        assert body["error"].startswith('the API needs a bearer token (api.access = "token")')
        text = await scrape(relay, {"Authorization": "Bearer s3cret"})
        assert "srsrelay_viewers 0.0" in text
    finally:
        await relay.stop()
