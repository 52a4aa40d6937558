"""The load benchmark: its light viewer's RTCP and counters, and one --quick run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import lightviewer, viewers
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
