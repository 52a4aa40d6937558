"""The load benchmark: its light viewer's RTCP and counters, and one --quick run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import lightviewer, viewers
from srsrelay.webrtc.latency import BUCKET_BOUNDS_MS
from srsrelay.webrtc.rtcp import ReportPacket, parse_rtcp

ROOT = Path(__file__).resolve().parent.parent

ANSWER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 102 103\r\n"
    "a=ice-ufrag:abcd1234\r\na=ice-pwd:0123456789abcdefghijklmn\r\n"
    "a=fingerprint:sha-256 AA:BB:CC\r\na=setup:passive\r\n"
    "a=candidate:1 1 udp 2130706431 127.0.0.1 8000 typ host\r\n"
    "a=rtpmap:102 H264/90000\r\na=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
)


def test_parse_answer() -> None:
    answer = lightviewer.parse_answer(ANSWER)
    assert (answer.ice_ufrag, answer.ice_pwd) == ("abcd1234", "0123456789abcdefghijklmn")
    assert answer.fingerprint == "AA:BB:CC"
    assert answer.address == ("127.0.0.1", 8000)
    assert answer.clock_rates == {102: 90000, 103: 90000, 111: 48000}
    assert answer.rtx == frozenset({103})


def test_parse_answer_without_candidate() -> None:
    with pytest.raises(ValueError) as err:
        lightviewer.parse_answer(ANSWER.replace("a=candidate", "a=x-candidate"))
    assert str(err.value) == "WHEP answer has no IPv4 UDP host candidate"


def test_track_counts_gaps_across_the_sequence_wrap() -> None:
    track = lightviewer.TrackStats(7, 90000, True, 65533, 65533, mark_max_ext=65532)
    for seq in (65533, 65534, 1, 2):  # 65535 and 0 are lost
        track.on_packet(seq, 0, 100, 0.0, seq % 2 == 1)
    assert track.max_ext == 65536 + 2
    assert (track.expected, track.received, track.frames) == (6, 4, 2)
    track.mark()
    for seq in (3, 5):  # 4 is lost
        track.on_packet(seq, 0, 100, 0.0, seq % 2 == 1)
    assert (track.max_ext - track.mark_max_ext, track.received - track.mark_received) == (3, 2)


def test_receiver_report_parses_as_the_relay_reads_it() -> None:
    track = lightviewer.TrackStats(0x1234, 90000, True, 100, 100, mark_max_ext=99)
    for seq in range(100, 200):
        if seq % 10 != 0:  # lose 10 of 100
            track.on_packet(seq, seq * 3000, 1000, seq / 30, False)
    track.lsr, track.lsr_at = 0xAABBCCDD, 10.0
    viewer = object.__new__(lightviewer.LightViewer)
    viewer.tracks = {track.ssrc: track}
    viewer.ufrag = "cname"
    viewer._rtcp_ssrc = 99
    messages = parse_rtcp(viewer._receiver_report(now=10.5))
    report = messages[0]
    assert isinstance(report, ReportPacket) and report.sender_ssrc == 99
    (block,) = report.reports
    assert block.ssrc == 0x1234
    assert block.packets_lost == 10
    assert block.fraction_lost == (10 << 8) // 100
    assert block.highest_sequence == 199
    assert (block.lsr, block.dlsr) == (0xAABBCCDD, 32768)


def test_least_squares_and_summary() -> None:
    assert viewers.least_squares([0, 10, 20], [100, 150, 200]) == pytest.approx((5.0, 100.0))
    assert viewers.least_squares([5, 5], [1, 2]) is None
    steps = [
        viewers.Step("srsrelay", 2000, n, connected=n, cpu_ms_per_s=100 + 4 * n, rss_kb=1000 + n)
        for n in (0, 50, 100)
    ]
    steps.append(viewers.Step("srsrelay", 2000, 300, connected=300, cpu_ms_per_s=990))
    s = viewers.summarize("srsrelay", 2000, steps)
    assert s.ms_per_viewer_s == pytest.approx(4.0)
    assert s.viewers_per_core == pytest.approx(250.0)
    assert s.saturated_at == 300


def _rtc(attempted: int, dropped: int, counts: list[int]) -> dict[str, object]:
    """A single-process /api/v1/rtc "rtc" object, reduced to what the bench reads."""
    return {
        "send": {"kinds": {"media": {"attempted": attempted, "dropped_full": dropped}}},
        "latency": {"video": {"counts": counts}},
    }


def _counts(**by_bucket: int) -> list[int]:
    counts = [0] * (len(BUCKET_BOUNDS_MS) + 1)
    for name, n in by_bucket.items():
        counts[int(name[1:])] = n
    return counts


def test_media_and_latency_windows_of_one_process() -> None:
    before = _rtc(100, 1, _counts(b3=10))
    after = _rtc(300, 3, _counts(b3=10, b20=50))
    assert viewers._media_counts(after) == (300, 3)
    assert viewers._media_window(before, after) == (200, 2)
    # Only the window's frames count: all 50 are in bucket 20.
    assert viewers._latency_window(before, after) == (BUCKET_BOUNDS_MS[20], BUCKET_BOUNDS_MS[20])
    assert viewers._latency_window(None, {"send": {}}) == (None, None)


def test_media_and_latency_windows_merge_the_workers() -> None:
    def pooled(*parts: dict[str, object] | None) -> dict[str, object]:
        workers = [{"worker": k, "rtc": part} for k, part in enumerate(parts)]
        return {"sessions": 0, "workers": workers}

    before = pooled(_rtc(100, 0, _counts(b10=5)), _rtc(1000, 10, _counts(b30=7)))
    # Worker 1 was restarted: its counters began again, so they count from 0.
    after = pooled(_rtc(200, 4, _counts(b10=104)), _rtc(50, 1, _counts(b30=1)), None)
    assert viewers._media_counts(after) == (250, 5)
    assert viewers._media_window(before, after) == (150, 5)
    # 99 frames of worker 0 in bucket 10 and 1 of worker 1 in bucket 30, added.
    p50, p99 = viewers._latency_window(before, after)
    assert (p50, p99) == (BUCKET_BOUNDS_MS[10], BUCKET_BOUNDS_MS[10])
    after = pooled(_rtc(200, 4, _counts(b10=5)), _rtc(1000, 10, _counts(b30=107)))
    assert viewers._latency_window(before, after) == (BUCKET_BOUNDS_MS[30], BUCKET_BOUNDS_MS[30])


def test_workers_summary_and_verdict() -> None:
    steps = [
        viewers.Step("workers", 2000, n, connected=n, cpu_ms_per_s=200 + 5 * n)
        for n in (0, 100, 200)
    ]
    # 1200 ms/s is more than one core, not more than two: not saturated with two workers.
    steps.append(viewers.Step("workers", 2000, 300, connected=300, cpu_ms_per_s=1850))
    s = viewers.summarize("workers", 2000, steps, workers=2)
    assert s.saturated_at == 300
    assert s.viewers_per_core == pytest.approx(200.0)
    assert s.viewers_per_machine == pytest.approx(400.0)
    single = viewers.summarize(
        "srsrelay",
        2000,
        [viewers.Step("srsrelay", 2000, n, connected=n, cpu_ms_per_s=50 + 4 * n) for n in (0, 50)],
    )
    assert single.viewers_per_machine is None
    assert viewers.workers_verdict(s, single) == (
        "workers (K=2) at 2000 kbit/s: 400 viewers per machine = 1.60x the single-process"
        " figure (target >= 1.8x): gap"
    )
    assert viewers.workers_verdict(s, None) == (
        "workers (K=2) at 2000 kbit/s: 400 viewers per machine"
        " (no single-process figure at this bitrate to compare)"
    )


def test_one_worker_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "viewers.py"), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.endswith(
        "error: --workers: 0 skips the workers system, else 2 or more processes\n"
    )


@pytest.mark.integration
def test_quick_run_prints_a_sane_table(tmp_path: Path) -> None:
    out = tmp_path / "viewers.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "viewers.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| system   | kbit/s | N  | connected | CPU ms/s |" in proc.stdout
    assert "viewers/core" in proc.stdout
    data = json.loads(out.read_text())
    relay = {s["viewers"]: s for s in data["steps"] if s["system"] == "srsrelay"}
    assert sorted(relay) == [0, 5, 10]
    for n in (5, 10):
        step = relay[n]
        assert step["connected"] == n and step["failed"] == 0 and step["starved"] == 0
        assert len(step["handshake_ms"]) == n and max(step["handshake_ms"]) < 10_000
        assert step["loss_pct"] < 5
        # A 2 Mbit/s publisher: each viewer receives roughly that (plus Opus).
        assert 1000 < step["kbit_per_viewer"] < 4000
    # More viewers cost the relay more CPU.
    assert relay[10]["cpu_ms_per_s"] > relay[0]["cpu_ms_per_s"]
    assert relay[0]["rss_kb"] > 10_000
    summary = next(s for s in data["summaries"] if s["system"] == "srsrelay")
    assert summary["ms_per_viewer_s"] > 0 and summary["viewers_per_core"] > 0
    baseline = {s["viewers"]: s for s in data["steps"] if s["system"] == "aiortc"}
    assert baseline[5]["connected"] == 5 and baseline[5]["kbit_per_viewer"] > 1000
    if viewers.default_workers() < 2:
        return  # one CPU: no workers system
    # The workers system: K worker processes plus the relay, every viewer served.
    workers = {s["viewers"]: s for s in data["steps"] if s["system"] == "workers"}
    assert sorted(workers) == [0, 5]
    assert workers[5]["connected"] == 5 and workers[5]["failed"] == 0
    assert workers[5]["starved"] == 0 and 1000 < workers[5]["kbit_per_viewer"] < 4000
    k = viewers.default_workers()
    assert {s["processes"] for s in workers.values()} == {1 + k}
    assert workers[5]["cpu_ms_per_s"] > workers[0]["cpu_ms_per_s"] > 0
    # Three processes of Python: more than the single process's RSS.
    assert workers[0]["rss_kb"] > relay[0]["rss_kb"]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    table = [[c.strip() for c in row] for row in rows if row[0].strip() == "workers"]
    assert [(r[2], r[3]) for r in table if len(r) == 15] == [("0", "0"), ("5", "5")]
    summary = next(s for s in data["summaries"] if s["system"] == "workers")
    assert summary["workers"] == k and summary["viewers_per_machine"] > 0
    line = next(x for x in proc.stdout.splitlines() if x.startswith(f"- workers (K={k}) at 2000"))
    assert "viewers per machine = " in line and line.endswith(("met", "gap"))
