"""Measure one fresh viewer of the relay's player page in Chromium (tests and bench)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from tests.chromium import Chromium

NTP_UNIX_OFFSET_MS = 2_208_988_800_000

VIEWER_JS = """
(async () => {
  const p = window.srsrelayPlayer;
  if (!p || !p.timing) return null;
  const out = {timing: p.timing, video: null, audio: null,
               nowNtp: Date.now() + NTP_UNIX_OFFSET_MS};
  if (p.pc) {
    const stats = await p.pc.getStats();
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp') out[s.kind] = s;
    });
  }
  return out;
})()
""".replace("NTP_UNIX_OFFSET_MS", str(NTP_UNIX_OFFSET_MS))


@dataclass
class ViewerResult:
    ttff_ms: float | None
    """From the WHEP POST (sent as soon as the offer is ready) to the first video frame
    shown on the page (requestVideoFrameCallback: presented, so at or after decoding)."""
    jitter_ms: float
    dropped: int
    received: int
    decoded: int
    audio_behind_ms: float | None
    audio_jitter_ms: float
    answer_ms: float | None = None
    """From the WHEP POST to its answer."""
    offer_ms: float | None = None
    """From the start of the attempt to the offer being ready (the browser's own work)."""
    relay: dict[str, Any] | None = None
    """The relay's view of the session at the settle point (GET /api/v1/sessions)."""


def _avg_delay(s: dict[str, Any] | None) -> float:
    if not s or not s.get("jitterBufferEmittedCount"):
        return float("nan")
    return 1000 * s["jitterBufferDelay"] / s["jitterBufferEmittedCount"]


SESSION_JS = """
(async () => {
  const r = await fetch('/api/v1/sessions');
  const j = await r.json();
  const s = j.sessions[0];
  return s ? {nack: s.nack, keyframe: s.keyframe, congestion: s.congestion} : null;
})()
"""


async def one_viewer(browser: Chromium, page_url: str, settle: float) -> ViewerResult:
    await browser.navigate(page_url)
    started = time.monotonic()
    first: dict[str, Any] | None = None
    while time.monotonic() - started < 10:
        snap = await browser.evaluate(VIEWER_JS)
        if snap and snap["timing"].get("firstFrame"):
            first = snap
            break
        await asyncio.sleep(0.02)
    ttff = answer = offer = None
    if first:
        timing = first["timing"]
        ttff = timing["firstFrame"] - timing["offer"]
        answer = timing["answer"] - timing["offer"]
        offer = timing["offer"] - timing["start"]
    await asyncio.sleep(max(0.0, settle - (time.monotonic() - started)))
    snap = await browser.evaluate(VIEWER_JS) or {}
    relay = await browser.evaluate(SESSION_JS)
    video, audio = snap.get("video") or {}, snap.get("audio") or {}
    playout = audio.get("estimatedPlayoutTimestamp")
    behind = snap["nowNtp"] - playout if playout else None
    await browser.evaluate("document.getElementById('stop').click()")
    await asyncio.sleep(0.3)  # let the DELETE go out before the next navigation
    return ViewerResult(
        ttff_ms=ttff,
        jitter_ms=_avg_delay(video),
        dropped=int(video.get("framesDropped", 0)),
        received=int(video.get("framesReceived", 0)),
        decoded=int(video.get("framesDecoded", 0)),
        audio_behind_ms=behind,
        audio_jitter_ms=_avg_delay(audio),
        answer_ms=answer,
        offer_ms=offer,
        relay=relay,
    )
