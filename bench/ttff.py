"""Time to first frame in headless Chromium, and what the fast start costs the browser.

Starts the relay and an ffmpeg publisher (720p30, 2 Mbit/s, configurable GOP), then
opens the relay's player page N times in one headless Chromium (after one uncounted
warm-up viewer), one fresh WHEP session each, joining at different points of the GOP.
For every viewer it records:

- TTFF: from the WHEP POST to the first video frame shown (requestVideoFrameCallback,
  so at or after decoding), as the page measures it; and, for reference, how long the
  browser itself took to create the offer before that;
- after `--settle` seconds: the average jitter-buffer delay
  (jitterBufferDelay / jitterBufferEmittedCount), frames dropped / received, and how
  far audio plays behind the relay's live edge (now - estimatedPlayoutTimestamp,
  which the browser derives from our Sender Reports).

With several `--speed` values the same publisher is measured once per catch-up speed,
side by side in one run.

    python bench/ttff.py --viewers 20 --gop 300 --speed 4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chromium import Chromium  # noqa: E402
from tests.conftest import ffmpeg_publish_args, start_relay, wait_live  # noqa: E402
from tests.player_probe import ViewerResult, one_viewer  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(speed: float, args: argparse.Namespace) -> list[ViewerResult]:
    with tempfile.TemporaryDirectory(prefix="srsrelay-ttff-") as tmp:
        relay = start_relay(Path(tmp), extra=f"catchup_speed = {speed}")
        size = "1280x720"
        extra = ["-g", str(args.gop), "-b:v", "2M", "-maxrate", "2M", "-bufsize", "2M"]
        publisher = await asyncio.create_subprocess_exec(
            *ffmpeg_publish_args(relay.rtmp_url("live/test"), size=size, extra=extra),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        browser = Chromium()
        try:
            await wait_live(relay, "live/test")
            await browser.start()
            results = []
            url = f"{relay.http}/?stream=live/test"
            # A throwaway first viewer: the browser's first WebRTC session pays for codec
            # and audio-device start-up, which no relay can help.
            await one_viewer(browser, url, 2.0)
            for i in range(args.viewers):
                # Join at different points of the GOP.
                await asyncio.sleep((i * 0.37) % 1.0)
                results.append(await one_viewer(browser, url, args.settle))
            return results
        finally:
            publisher.terminate()
            await publisher.wait()
            relay.stop()
            await browser.close()


def summary(speed: float, gop: int, results: list[ViewerResult]) -> str:
    ttffs = [r.ttff_ms for r in results if r.ttff_ms is not None]
    jitter = [r.jitter_ms for r in results if r.jitter_ms == r.jitter_ms]
    behind = [r.audio_behind_ms for r in results if r.audio_behind_ms is not None]
    dropped = sum(r.dropped for r in results)
    received = sum(r.received for r in results) or 1
    failed = len(results) - len(ttffs)
    offers = [r.offer_ms for r in results if r.offer_ms is not None]
    audio_jb = [r.audio_jitter_ms for r in results if r.audio_jitter_ms == r.audio_jitter_ms]
    return (
        f"{gop / 30:>5.0f}s {speed:>5.1f}x {len(results):>3} {failed:>4}"
        f" {pct(ttffs, 0.5):>7.0f} {pct(ttffs, 0.95):>7.0f} {max(ttffs, default=0):>7.0f}"
        f" {statistics.fmean(jitter) if jitter else float('nan'):>8.0f}"
        f" {max(jitter, default=float('nan')):>7.0f}"
        f" {100 * dropped / received:>7.2f}%"
        f" {pct(audio_jb, 0.5):>7.0f} {pct(audio_jb, 0.95):>7.0f}"
        f" {pct(behind, 0.5):>8.0f} {max(behind, default=float('nan')):>7.0f}"
        f" {pct(offers, 0.5):>7.0f}"
    )


HEADER = (
    f"{'GOP':>6} {'speed':>6} {'n':>3} {'fail':>4} {'ttff50':>7} {'ttff95':>7} {'max':>7}"
    f" {'jb avg':>8} {'jb max':>7} {'dropped':>8} {'ajb50':>7} {'ajb95':>7}"
    f" {'behind50':>8} {'max':>7} {'offer50':>7}"
)
UNITS = (
    "ms; TTFF = WHEP POST to first frame shown; jb = video jitter-buffer delay 5 s in;"
    " ajb = audio jitter-buffer delay 5 s in; behind = audio playout behind the relay's"
    " live edge (estimatedPlayoutTimestamp, includes transcoding and the audio output);"
    " offer = the browser's own offer creation before the POST; dropped = of frames received"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--gop", type=int, default=300, help="keyframe interval, frames")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before stats")
    parser.add_argument("--speed", type=float, action="append", help="catch-up speed(s)")
    parser.add_argument("--verbose", action="store_true", help="one line per viewer")
    args = parser.parse_args()
    rows = []
    for speed in args.speed or [4.0]:
        results = asyncio.run(measure(speed, args))
        if args.verbose:
            for r in results:
                print(speed, r)
        rows.append(summary(speed, args.gop, results))
    print(HEADER)
    for row in rows:
        print(row)
    print(UNITS)


if __name__ == "__main__":
    main()
