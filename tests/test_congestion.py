from __future__ import annotations

import pytest

from srsrelay.webrtc.congestion import (
    CLEAR_AFTER,
    REMB_STARTUP_GRACE,
    REPORT_MAX_AGE,
    WINDOW,
    CongestionMonitor,
    CongestionState,
)

OK = CongestionState.OK
CONGESTED = CongestionState.CONGESTED


def _run(monitor: CongestionMonitor, start: float, end: float, step: float = 0.25) -> float:
    """Tick from `start` to `end` while sending 48 packets/s and 1 Mbit/s of media."""
    now = start
    while now < end:
        monitor.on_media_sent(12, now)
        monitor.on_offered(31_250, now)
        monitor.tick(now)
        now += step
    return now


def test_rr_loss_starts_and_clears_with_hysteresis() -> None:
    m = CongestionMonitor(loss_threshold=0.1, overload_timeout=10.0, now=0.0)
    assert m.tick(0.0) is None and m.state is OK
    m.on_report(int(0.3 * 256), 1.0)
    change = m.tick(1.0)
    assert change is not None and (change.old, change.new) == (OK, CONGESTED)
    assert change.reason.startswith("loss 30% (rr 30%, nack 0%), send drops 0")
    # 7% is below the threshold but not below half of it: stays congested.
    for t in (2.0, 3.0, 4.0, 5.0):
        m.on_report(int(0.07 * 256), t)
        assert m.tick(t) is None
    assert m.state is CONGESTED
    # Calm (2%) must last CLEAR_AFTER seconds.
    m.on_report(5, 6.0)
    assert m.tick(6.0) is None
    m.on_report(5, 7.0)
    assert m.tick(7.0) is None
    m.on_report(5, 6.0 + CLEAR_AFTER)
    change = m.tick(6.0 + CLEAR_AFTER)
    assert change is not None and change.new is OK
    assert m.transitions == 2


def test_a_stale_report_stops_counting() -> None:
    m = CongestionMonitor(0.1, 10.0, now=0.0)
    m.on_report(128, 0.0)
    m.tick(0.0)
    assert m.state is CONGESTED and m.loss == 0.5
    m.tick(REPORT_MAX_AGE + 0.1)
    assert m.loss == 0.0


def test_send_drops_congest_until_the_window_is_clean() -> None:
    m = CongestionMonitor(0.1, 10.0, now=0.0)
    m.on_send_drops(0, 0.0)
    assert m.tick(0.0) is None
    m.on_send_drops(3, 1.0)
    change = m.tick(1.0)
    assert change is not None and "send drops 3" in change.reason
    # The drop stays in the window for WINDOW seconds, then calm must last CLEAR_AFTER.
    assert m.tick(1.0 + WINDOW - 0.25) is None
    assert m.tick(1.0 + WINDOW + 0.25) is None  # calm starts
    assert m.state is CONGESTED
    change = m.tick(1.0 + WINDOW + 0.25 + CLEAR_AFTER)
    assert change is not None and change.new is OK


def test_nack_rate_needs_enough_packets() -> None:
    m = CongestionMonitor(0.1, 10.0, now=0.0)
    m.on_media_sent(20, 0.0)
    m.on_nack(10, 0.0)
    m.tick(0.0)
    assert m.state is OK  # 20 packets: too few to judge
    m.on_media_sent(80, 0.5)
    m.on_nack(10, 0.5)
    m.tick(0.5)
    assert m.state is CONGESTED
    assert m.loss == pytest.approx(0.2)
    assert "nack 20%" in m.describe()


def test_remb_below_the_media_rate() -> None:
    m = CongestionMonitor(0.1, 100.0, now=0.0)
    now = _run(m, 0.0, REMB_STARTUP_GRACE)  # 1 Mbit/s of media
    assert m.state is OK
    m.on_remb(900_000, now)  # above 0.8 x 1 Mbit/s
    now = _run(m, now, now + 1.0)
    assert m.state is OK
    # While a recent REMB is fine, a low one does not congest (peak over the window).
    m.on_remb(500_000, now)
    m.tick(now)
    assert m.state is OK
    now = _run(m, now, now + WINDOW + 0.5)  # the 900k REMB left the window
    m.on_remb(500_000, now)
    m.tick(now)
    assert m.state is CONGESTED
    assert "remb 500 kbit/s for 1000 kbit/s" in m.describe()


def test_remb_is_ignored_while_receivers_ramp_up() -> None:
    m = CongestionMonitor(0.1, 100.0, now=0.0)
    now = _run(m, 0.0, 1.0)
    m.on_remb(100_000, now)
    m.tick(now)
    assert m.state is OK


def test_overload_times_out() -> None:
    m = CongestionMonitor(0.1, overload_timeout=10.0, now=0.0)
    assert m.overloaded_for(0.0) == 0.0
    t = 0.0
    while t <= 10.0:
        m.on_report(100, t)
        m.tick(t)
        t += 1.0
    assert m.state is CONGESTED
    assert m.overloaded_for(9.5) == pytest.approx(9.5)
    assert not m.overloaded(9.5)
    assert m.overloaded(10.0)


def test_relapse_continues_the_overload_and_recovery_resets_it() -> None:
    m = CongestionMonitor(0.1, overload_timeout=10.0, now=0.0)
    m.on_report(100, 0.0)
    m.tick(0.0)
    m.tick(REPORT_MAX_AGE + 1)  # report stale: calm from here
    m.tick(REPORT_MAX_AGE + 1 + CLEAR_AFTER)
    assert m.state is OK
    relapse = REPORT_MAX_AGE + 2 + CLEAR_AFTER
    m.on_report(100, relapse)
    m.tick(relapse)
    assert m.state is CONGESTED
    assert m.overloaded_for(relapse) == pytest.approx(relapse)  # counted from t=0
    # Clear and stay well for longer than the grace: a new overload starts from zero.
    m.tick(relapse + REPORT_MAX_AGE + 1)
    m.tick(relapse + REPORT_MAX_AGE + 1 + CLEAR_AFTER)
    assert m.state is OK
    later = relapse + 30.0
    m.on_report(100, later)
    m.tick(later)
    assert m.overloaded_for(later + 1.0) == pytest.approx(1.0)


def test_send_drops_alone_shed_frames_but_never_overload() -> None:
    # The socket is shared: drops mean the relay's uplink is full, not this viewer's path.
    m = CongestionMonitor(0.1, overload_timeout=10.0, now=0.0)
    t = 0.0
    while t <= 30.0:
        m.on_send_drops(5, t)
        m.tick(t)
        t += 0.25
    assert m.state is CONGESTED
    assert m.overloaded_for(t) == 0.0
    assert not m.overloaded(t)
    # Once the viewer's own reports turn bad, the overload clock starts from there.
    m.on_report(100, t)
    m.tick(t)
    assert m.overloaded_for(t + 4.0) == pytest.approx(4.0)
