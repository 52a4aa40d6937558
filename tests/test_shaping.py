"""The relay under real network shaping, each test in its own network namespace.

See tests/scenario.py for what runs inside and tests/netns.py for the shaping. The
figures each test measured are printed (run with -s to see them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import unavailable_reason
from tests.scenario import close_reasons, outcome_violations, report, run_in_netns

pytestmark = pytest.mark.integration

WEAK_SECONDS = 120.0
WARMUP = 30.0
RECONNECT_DELAY = 2.0
"""Seconds a disconnected weak viewer waits before it connects again."""
RSS_GROWTH_LIMIT_KB = 2048
MIN_FRAME_SHARE = 0.95
"""Share of the published frames an unshaped viewer must receive."""
SATURATE_SECONDS = 30.0
CONTRAST_SECONDS = 10.0
FAILURE_REASONS = (
    "ice consent timeout",
    "dtls timeout",
    "dtls handshake failed",
    "dtls closed by viewer",
    "send failed",
)
"""Close reasons that mean a session broke, as opposed to being ended by policy."""


@pytest.fixture(scope="module", autouse=True)
def _netns_available() -> Iterator[None]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    yield


def check_outcomes(result: dict[str, Any]) -> None:
    """The invariant over all viewers, and over each session's latest stats (sessions
    the relay closed during the run keep the figures of the last poll)."""
    bad = outcome_violations(result["rtc_end"]["send"]["kinds"])
    for sid, s in result["session_last"].items():
        bad += [f"session {sid}: {b}" for b in outcome_violations(s["send"]["kinds"])]
    assert not bad, "outcome invariant broken:\n" + "\n".join(bad)


def check_rss(result: dict[str, Any]) -> None:
    r = result["rss_summary"]
    print(f"relay RSS after warm-up: slope {r['slope_kb_per_min']} KB/min, {r}")
    assert r["samples_after_warmup"] >= 5, r
    assert r["fitted_growth_kb"] <= RSS_GROWTH_LIMIT_KB, f"relay RSS grew after warm-up: {r}"


def policy_reason(reason: str | None) -> bool:
    return bool(reason) and not str(reason).startswith(FAILURE_REASONS)


def test_weak_viewers(tmp_path: Path) -> None:
    """2 Mbit/s, 10 viewers with a 500 kbit/s downlink (they reconnect, as a player
    does, when the relay disconnects them) and 2 unshaped viewers."""
    result = run_in_netns(
        "weak",
        WEAK_SECONDS,
        weak=10,
        strong=2,
        warmup=WARMUP,
        reconnect=RECONNECT_DELAY,
        workdir=tmp_path,
    )
    print(report(result))
    print("close reasons:", close_reasons(result))
    assert all(v["error"] is None for v in result["viewers"]), result["viewers"]
    check_rss(result)
    check_outcomes(result)

    live = {s["id"]: s["state"] for s in result["sessions_end"]}
    closed = {c["viewer"]: c["reason"] for c in result["log"]["closed"]}
    for v in result["viewers"]:
        if not v["weak"]:
            continue
        for sid in v["sessions"]:
            if sid in live:
                # Connected with consent held, or connecting since the last reconnect.
                just_started = sid == v["session"] and v["frozen_at"] - v["started_at"] < 10
                assert live[sid] == "connected" or just_started, (v["name"], sid, live[sid])
            else:
                reason = closed.get(sid)
                assert policy_reason(reason), f"{v['name']} session {sid} broke: {reason}"

    for v in result["viewers"]:
        if v["weak"]:
            continue
        assert live.get(v["session"]) == "connected", (v["name"], closed.get(v["session"]))
        share = v["video_frames"] / max(1, v["frames_expected"])
        print(f"{v['name']}: {v['video_frames']}/{v['frames_expected']} frames ({share:.1%})")
        assert share >= MIN_FRAME_SHARE, v
        # Frames kept coming until the end (the share alone would pass a viewer that froze).
        assert v["frozen_at"] - (v["last_frame_at"] or 0) < 2.0, v

    by_name = {v["name"]: v for v in result["viewers"]}
    for d in result["deletes"]:
        sid = by_name[d["viewer"]]["session"]
        # 404: the relay closed it by policy between the last poll and the DELETE.
        assert d["status"] == 200 or policy_reason(closed.get(sid)), d
        assert d["seconds"] < 1.0, d
    assert result["sessions_after_delete"] == 0
    assert result["shutdown"]["exit_code"] == 0, result["shutdown"]


def test_saturated_egress(tmp_path: Path) -> None:
    """The relay's own uplink at 1 Mbit/s (long qdisc queue, 32 KiB SO_SNDBUF) while
    4 viewers ask for 2 Mbit/s each: the send path must stay bounded, keep answering
    STUN, and DELETE and shutdown must stay fast."""
    result = run_in_netns(
        "saturate",
        SATURATE_SECONDS,
        weak=0,
        strong=4,
        keep=2,
        warmup=10.0,
        sndbuf=32 * 1024,
        # Only the send path is under test here: no disconnects for being overloaded.
        rtc=["overload_timeout = 3600.0"],
        workdir=tmp_path,
    )
    print(report(result))
    rtc = result["rtc_end"]
    path = rtc["send_path"]
    print("send path:", json.dumps(path))
    # The load really saturated the socket...
    media = rtc["send"]["kinds"]["media"]
    assert path["times_blocked"] > 0 and media["dropped_would_block"] > 0, path
    # ...and the path held no more than its bounded control queue.
    limit = path["control_queue_limit"]
    assert path["control_queue_high_water"] <= limit, path
    for poll in result["polls"]:
        if "rtc" in poll:
            assert poll["rtc"]["send_path"]["control_queue"] <= limit, poll
    check_rss(result)
    check_outcomes(result)

    # Consent answered throughout: no STUN reply lost, every session connected at
    # every poll, every viewer still connected on its side.
    for s in result["sessions_end"]:
        stun = s["send"]["kinds"]["stun"]
        assert stun["attempted"] > 0 and stun["sent"] + stun.get("queued", 0) == stun["attempted"]
    reasons = [c["reason"] for c in result["log"]["closed"]]
    assert "ice consent timeout" not in reasons, reasons
    for poll in result["polls"]:
        if "states" in poll:
            assert len(poll["states"]) == 4, poll
            assert set(poll["states"].values()) == {"connected"}, poll
    for v in result["viewers"]:
        assert v["final_state"] == "connected", v
        assert v["audio_frames"] > 0, v

    deletes = result["deletes"]
    print("DELETE seconds:", [round(d["seconds"], 3) for d in deletes])
    print("shutdown:", result["shutdown"])
    assert len(deletes) == 2 and all(d["status"] == 200 for d in deletes), deletes
    assert max(d["seconds"] for d in deletes) < 1.0, deletes
    assert result["shutdown"]["exit_code"] == 0, result["shutdown"]
    assert result["shutdown"]["seconds"] < 1.0, result["shutdown"]


def test_contrast_plain_asyncio_transport(tmp_path: Path) -> None:
    """The same saturation through loop.create_datagram_endpoint (stock aiortc) grows
    its buffer without bound; through SendPath nothing accumulates."""
    sndbuf = 32 * 1024
    result = run_in_netns("contrast", CONTRAST_SECONDS, sndbuf=sndbuf, workdir=tmp_path)
    plain, bounded = result["plain"], result["sendpath"]
    head = ("t", "asyncio buffer", "kernel", "RSS KiB", "SendPath held", "kernel", "RSS KiB")
    print("{:>5} | {:>14} {:>8} {:>8} | {:>13} {:>8} {:>8}    sent dropped".format(*head))
    for a, b in zip(plain, bounded, strict=False):
        print(
            f"{a['t']:5.1f} | {a['buffered']:14d} {a['kernel']:8d} {a['rss_kb']:8d} | "
            f"{b['held']:13d} {b['kernel']:8d} {b['rss_kb']:8d} {b['sent']:6d} {b['dropped']:7d}"
        )
    print("asyncio transport close:", result["plain_close"])

    buffered = [s["buffered"] for s in plain]
    assert buffered[-1] > 5_000_000, buffered
    assert all(b > a for a, b in zip(buffered, buffered[1:], strict=False)), buffered
    assert plain[-1]["rss_kb"] - plain[0]["rss_kb"] > 4096, plain
    # close() cannot finish: the buffer drains at the shaped rate.
    assert result["plain_close"]["buffered_after_2s"] > 4_000_000, result["plain_close"]

    assert bounded[-1]["dropped"] > 0 and bounded[-1]["sent"] > 0, bounded
    assert max(s["held"] for s in bounded) == 0, bounded  # media is never queued
    assert max(s["kernel"] for s in bounded) <= 4 * sndbuf, bounded
    assert bounded[-1]["rss_kb"] - bounded[0]["rss_kb"] < 1024, bounded
    assert not outcome_violations(result["sendpath_counters"]["kinds"])
