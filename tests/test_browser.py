"""A real browser: headless Chromium loads the relay's player page and plays over WHEP."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import av
import numpy as np
import pytest

from tests.chromium import Chromium
from tests.conftest import RelayProcess, start_relay, wait_live
from tests.player_probe import one_viewer

pytestmark = pytest.mark.integration

STATS_JS = """
(async () => {
  const player = window.srsrelayPlayer;
  if (!player || !player.pc) return null;
  const stats = await player.pc.getStats();
  const out = {inbound: [], codecs: {}};
  stats.forEach((s) => {
    if (s.type === 'inbound-rtp') out.inbound.push(s);
    if (s.type === 'codec') out.codecs[s.id] = s.mimeType;
  });
  return out;
})()
"""


def track(stats: dict[str, Any], kind: str) -> dict[str, Any]:
    for s in stats["inbound"]:
        if s["kind"] == kind:
            return dict(s, mimeType=stats["codecs"].get(s.get("codecId")))
    raise AssertionError(f"no inbound {kind} track in {stats}")


async def test_chromium_plays_player_page(relay: RelayProcess, publish) -> None:  # type: ignore[no-untyped-def]
    publish(relay.rtmp_url("live/test"))
    await wait_live(relay, "live/test")

    browser = Chromium()
    await browser.start()
    try:
        await browser.navigate(f"{relay.http}/?stream=live/test")
        await asyncio.sleep(10)
        stats = await browser.evaluate(STATS_JS)
        assert stats is not None, f"player did not start: {browser.console}"
        video = track(stats, "video")
        audio = track(stats, "audio")
        page_text = await browser.evaluate("document.body.innerText")
        picture = await video_screenshot(browser)
    finally:
        await browser.close()

    # testsrc2 is colourful and moving: a real picture is neither black nor flat.
    assert picture.mean() > 40 and picture.std() > 30, (picture.mean(), picture.std())

    assert video["mimeType"] == "video/H264", video
    assert video.get("framesDecoded", 0) >= 200, video
    assert audio["mimeType"] == "audio/opus", audio
    assert audio.get("packetsReceived", 0) > 0, audio
    assert "rtmp://" in page_text and "/whep/live/test" in page_text, page_text


async def video_screenshot(browser: Chromium) -> np.ndarray[Any, Any]:
    """A screenshot of the page's <video> element, as RGB pixels."""
    box = await browser.evaluate(
        "(() => { const r = document.getElementById('video').getBoundingClientRect();"
        " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()"
    )
    assert box["width"] > 0 and box["height"] > 0, box
    shot = await browser.call("Page.captureScreenshot", format="png", clip=dict(box, scale=1))
    png = base64.b64decode(shot["data"])
    with av.open(io.BytesIO(png), format="png_pipe") as container:
        frame = next(container.decode(video=0))
    return frame.to_ndarray(format="rgb24")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def test_instant_start_with_a_10_s_gop(relay: RelayProcess, publish) -> None:  # type: ignore[no-untyped-def]
    """20 fresh viewers of a 10 s GOP stream: TTFF p95 <= 300 ms, and 5 s in, the browser
    has not paid for it (jitter buffer, dropped frames, audio delay), at p95 too.

    One throwaway viewer first warms the browser up (its first WebRTC session pays for
    codec and audio-device start-up, which no relay can help); it is not counted.
    """
    # 360p keeps the publisher's and the browser's decoding cost from crowding the two
    # cores of the test machine; bench/ttff.py measures 720p.
    publish(
        relay.rtmp_url("live/test"),
        size="640x360",
        extra=["-g", "300", "-b:v", "1M", "-maxrate", "1M", "-bufsize", "1M"],
    )
    await wait_live(relay, "live/test")
    browser = Chromium()
    await browser.start()
    results = []
    page = f"{relay.http}/?stream=live/test"
    try:
        await one_viewer(browser, page, 2.0)
        for i in range(20):
            await asyncio.sleep((i * 0.37) % 1.0)  # join at different points of the GOP
            results.append(await one_viewer(browser, page, 5.0))
    finally:
        await browser.close()
    summary = "\n".join(str(r) for r in results)
    assert all(r.ttff_ms is not None for r in results), summary
    assert p95([r.ttff_ms for r in results if r.ttff_ms is not None]) <= 300, summary
    assert p95([r.jitter_ms for r in results]) <= 150, summary
    assert p95([r.dropped / max(r.received, 1) for r in results]) <= 0.02, summary
    # Audio plays from the live edge: what the browser buffers stays under 100 ms.
    assert p95([r.audio_jitter_ms for r in results]) <= 100, summary


async def test_page_recovers_after_the_publisher_restarts(publish, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With no reconnect grace the stream ends with its publisher: the page says so,
    backs off, and plays again (a new WHEP session) once the stream is back."""
    relay = start_relay(tmp_path, extra="\n[hub]\nreconnect_grace = 0.0\n")
    try:
        first = publish(relay.rtmp_url("live/test"), size="640x360")
        await wait_live(relay, "live/test")
        browser = Chromium()
        await browser.start()
        try:
            await browser.navigate(f"{relay.http}/?stream=live/test")
            await wait_until(lambda: browser.evaluate(DECODED_JS), lambda n: n > 30, 10)
            first.stop()
            await wait_until(lambda: browser.evaluate(STATUS_JS), lambda s: s == "waiting", 10)
            assert "live/test" in await browser.evaluate("document.body.innerText")
            publish(relay.rtmp_url("live/test"), size="640x360")
            await wait_until(lambda: browser.evaluate(DECODED_JS), lambda n: n > 30, 20)
            assert await browser.evaluate(STATUS_JS) == "playing"
        finally:
            await browser.close()
    finally:
        assert relay.stop() == 0


DECODED_JS = """(async () => {
  const stats = await window.srsrelayPlayer?.pc?.getStats();
  let n = 0;
  stats?.forEach((x) => {
    if (x.type === 'inbound-rtp' && x.kind === 'video') n = x.framesDecoded;
  });
  return n;
})()"""
STATUS_JS = "window.srsrelayPlayer?.state.status"


async def wait_until(get: Any, ok: Any, timeout: float) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await get()
        if ok(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {value!r} after {timeout} s")
        await asyncio.sleep(0.2)
