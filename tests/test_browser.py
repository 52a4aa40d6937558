"""A real browser: headless Chromium loads the relay's player page and plays over WHEP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.chromium import Chromium
from tests.conftest import RelayProcess, wait_live

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
    finally:
        await browser.close()

    assert video["mimeType"] == "video/H264", video
    assert video.get("framesDecoded", 0) >= 200, video
    assert audio["mimeType"] == "audio/opus", audio
    assert audio.get("packetsReceived", 0) > 0, audio
    assert "rtmp://" in page_text and "/whep/live/test" in page_text, page_text
