"""Measure audio/video sync in a browser: a flash-and-beep publisher and an in-page probe.

The publisher shows a white picture exactly while it plays a beep, once per second. The
probe watches the player page's <video> element frame by frame (requestVideoFrameCallback)
and the remote audio track sample by sample (an AudioWorklet), and records both onsets in
performance.now() milliseconds: when the frame is expected on screen, and when the first
loud sample leaves the audio output.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from tests.conftest import FFMPEG

PULSE_S = 0.1
"""How long each flash and beep lasts: 3 frames at 30 fps."""
BEEP_HZ = 1000
PAIR_WINDOW_MS = 500.0
"""A flash and a beep closer than this belong to the same pulse (pulses are 1 s apart)."""


def flash_beep_publish_args(url: str) -> list[str]:
    """ffmpeg pushing 640x360 30 fps H.264 (no B-frames) and AAC over RTMP: dark noise with a
    white flash and a beep, both on the same edges (every second, for PULSE_S)."""
    on = f"lt(mod(t,1),{PULSE_S})"
    # Noise keeps the video near a real stream's bitrate: a flat black picture costs a few
    # kbit/s, too little for the browser's bandwidth estimate to describe a real stream.
    video = (
        "color=c=0x202020:size=640x360:rate=30,noise=alls=40:allf=t+u,"
        f"drawbox=x=0:y=0:w=iw:h=ih:color=white:t=fill:enable='{on}'"
    )
    # aevalsrc is evaluated per sample, so the beep's edges are exact (no frame rounding).
    audio = f"aevalsrc='if({on},0.5*sin(2*PI*{BEEP_HZ}*t),0)':s=48000:c=mono"
    return [
        FFMPEG,
        "-hide_banner",
        "-loglevel",
        "warning",
        "-re",
        "-f",
        "lavfi",
        "-i",
        video,
        "-f",
        "lavfi",
        "-i",
        audio,
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-tune",
        "zerolatency",
        "-bf",
        "0",
        "-g",
        "60",
        "-b:v",
        "800k",
        "-maxrate",
        "800k",
        "-bufsize",
        "800k",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-b:a",
        "96k",
        "-ar",
        "48000",
        "-f",
        "flv",
        url,
    ]


# Runs in the AudioWorkletGlobalScope: `currentTime` is the context time of the first
# sample of this render quantum, so onsets are sample-accurate on the context clock.
WORKLET_JS = """
class OnsetDetector extends AudioWorkletProcessor {
  constructor() { super(); this.lastLoud = -1e9; }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) {
      for (let i = 0; i < ch.length; i++) {
        if (Math.abs(ch[i]) > THRESHOLD) {
          const t = currentTime + i / sampleRate;
          if (t - this.lastLoud > QUIET_S) this.port.postMessage(t);
          this.lastLoud = t;
        }
      }
    }
    return true;
  }
}
registerProcessor('onset-detector', OnsetDetector);
"""

PROBE_JS = """
(async () => {
  const video = document.getElementById('video');
  const stream = video && video.srcObject;
  const audioTrack = stream && stream.getAudioTracks()[0];
  if (!audioTrack || !('requestVideoFrameCallback' in video)) return 'no audio track yet';
  const probe = {
    flashes: [], beeps: [], frames: 0, start: performance.now(), ctx: null, srSkew: [],
  };
  window.avSyncProbe = probe;

  // Video: the first white frame after a dark one, at the time it is expected on screen.
  const canvas = document.createElement('canvas');
  canvas.width = 16;
  canvas.height = 9;
  const g = canvas.getContext('2d', { willReadFrequently: true });
  let wasWhite = false;
  const onFrame = (now, meta) => {
    g.drawImage(video, 0, 0, canvas.width, canvas.height);
    const px = g.getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0;
    for (let i = 0; i < px.length; i += 4) sum += px[i + 1];
    const white = sum / (px.length / 4) > 128;
    if (white && !wasWhite) {
      probe.flashes.push({ t: meta.expectedDisplayTime, rtp: meta.rtpTimestamp ?? null });
    }
    wasWhite = white;
    probe.frames += 1;
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);

  // Audio: the remote track into WebAudio; the <video> element keeps playing it, which
  // is what makes Chromium pull audio out of its jitter buffer at all.
  const ctx = new AudioContext({ latencyHint: 'interactive' });
  probe.ctx = ctx;
  const module = new Blob([WORKLET], { type: 'application/javascript' });
  await ctx.audioWorklet.addModule(URL.createObjectURL(module));
  const source = ctx.createMediaStreamSource(new MediaStream([audioTrack]));
  const detector = new AudioWorkletNode(ctx, 'onset-detector');
  const sink = ctx.createGain();
  sink.gain.value = 0;
  source.connect(detector).connect(sink).connect(ctx.destination);
  detector.port.onmessage = (event) => {
    // Map context time to performance time at the audio output (the HTML spec's
    // getOutputTimestamp pairs the two clocks at the moment the output is heard).
    const stamp = ctx.getOutputTimestamp();
    const t = stamp.performanceTime + (event.data - stamp.contextTime) * 1000;
    probe.beeps.push({ t });
  };
  await ctx.resume();

  // Chromium's own view, once a second: how far apart the two tracks play in sender
  // (SR) time. It is ~0 once Chromium has lined the tracks up by the relay's SRs.
  probe.timer = setInterval(async () => {
    const pc = window.srsrelayPlayer.pc;
    if (!pc) return;
    const at = {};
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp') at[s.kind] = s.estimatedPlayoutTimestamp;
    });
    if (at.audio && at.video) probe.srSkew.push([performance.now(), at.video - at.audio]);
  }, 1000);
  return 'started';
})()
"""

RESULT_JS = """
(async () => {
  const probe = window.avSyncProbe;
  if (!probe) return null;
  const out = {
    flashes: probe.flashes, beeps: probe.beeps, frames: probe.frames, start: probe.start,
    srSkew: probe.srSkew,
    now: performance.now(), sampleRate: probe.ctx.sampleRate,
    baseLatency: probe.ctx.baseLatency, outputLatency: probe.ctx.outputLatency, stats: {},
  };
  const pc = window.srsrelayPlayer.pc;
  const stats = pc ? await pc.getStats() : new Map();
  stats.forEach((s) => {
    if (s.type !== 'inbound-rtp') return;
    out.stats[s.kind] = {
      estimatedPlayoutTimestamp: s.estimatedPlayoutTimestamp ?? null,
      jitterBufferDelay: s.jitterBufferDelay, jitterBufferEmittedCount: s.jitterBufferEmittedCount,
      jitterBufferTargetDelay: s.jitterBufferTargetDelay ?? null,
      packetsLost: s.packetsLost, framesDropped: s.framesDropped ?? null,
      framesDecoded: s.framesDecoded ?? null,
    };
  });
  return out;
})()
"""


def probe_js(threshold: float = 0.1, quiet_s: float = 0.3) -> str:
    """The page script that starts the probe; `threshold` is the beep's onset level
    (full scale 1.0) and `quiet_s` the silence that must come before an onset."""
    worklet = WORKLET_JS.replace("THRESHOLD", repr(threshold)).replace("QUIET_S", repr(quiet_s))
    return PROBE_JS.replace("WORKLET", json.dumps(worklet))


@dataclass
class SyncResult:
    offsets_ms: list[float]
    """Per pulse: beep onset minus flash onset (positive: audio late), in pulse order."""
    flashes: int
    """Flash onsets seen in the measured window."""
    beeps: int
    """Beep onsets heard in the measured window."""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.offsets_ms)

    def summary(self) -> str:
        shown = ", ".join(f"{o:+.0f}" for o in self.offsets_ms)
        median = f"{self.median_ms:+.1f}" if self.offsets_ms else "n/a"
        return (
            f"A/V offset (audio minus video) median {median} ms over {len(self.offsets_ms)} "
            f"pulses [{shown}]; {self.flashes} flashes, {self.beeps} beeps seen"
        )


def pair_pulses(
    flashes: list[float], beeps: list[float], window_ms: float = PAIR_WINDOW_MS
) -> list[float]:
    """Offsets (beep - flash, ms) of each flash paired with its nearest beep within
    `window_ms`; a flash or beep with no partner (missed or late) is left out."""
    offsets = []
    used: set[int] = set()
    for flash in sorted(flashes):
        best: int | None = None
        for i, beep in enumerate(beeps):
            if i in used or abs(beep - flash) >= window_ms:
                continue
            if best is None or abs(beep - flash) < abs(beeps[best] - flash):
                best = i
        if best is not None:
            used.add(best)
            offsets.append(beeps[best] - flash)
    return offsets


def measure(flashes: list[float], beeps: list[float], after: float) -> SyncResult:
    """Pair the onsets at or after `after` (performance ms), leaving out the start."""
    f = [t for t in flashes if t >= after]
    b = [t for t in beeps if t >= after]
    return SyncResult(pair_pulses(f, b), len(f), len(b))


def describe(result: SyncResult, data: dict[str, Any]) -> str:
    """The measurement and what Chromium reported beside it, for the test output."""
    skew = ", ".join(f"{(t - data['start']) / 1000:.0f}s:{d:+.0f}" for t, d in data["srSkew"])
    targets = []
    for kind in ("audio", "video"):
        s = data["stats"].get(kind) or {}
        if s.get("jitterBufferEmittedCount") and s.get("jitterBufferTargetDelay") is not None:
            avg = 1000 * s["jitterBufferTargetDelay"] / s["jitterBufferEmittedCount"]
            targets.append(f"{kind} {avg:.0f} ms")
    return (
        f"{result.summary()}; {data['frames']} video frames shown; jitter buffer targets "
        f"(average) {', '.join(targets) or 'n/a'}; WebAudio output latency "
        f"{1000 * (data['outputLatency'] or 0):.0f} ms; Chromium's own view, video minus "
        f"audio playout in SR time (ms, by time since the probe started): [{skew}]"
    )
