"""The stream clock: rebasing, reconnects, jumps, wraps and clamping."""

from __future__ import annotations

import pytest

from srsrelay.hub.timeline import (
    ANCHOR_LEAK,
    JUMP_BACKWARD_MS,
    JUMP_FORWARD_MS,
    ArrivalAnchor,
    Mapped,
    Timeline,
    Track,
)

V, A = Track.VIDEO, Track.AUDIO


def test_starts_at_zero_even_far_from_zero() -> None:
    clock = Timeline()
    start = 2**32 - 5_000  # near the 32-bit wrap, as unwrapped by the RTMP layer
    assert clock.map(V, start, 10.0) == Mapped(0, False, False)
    assert clock.map(A, start + 20, 10.0).ms == 20
    # Across the 2**32 ms wrap (the RTMP layer unwraps to values above 2**32).
    assert clock.map(V, 2**32 + 1_000, 16.0).ms == 6_000
    assert clock.jumps == 0


def test_extended_timestamp_boundary_is_not_a_jump() -> None:
    clock = Timeline()
    t = 16_770_000
    for i in range(400):  # 13 s at 30 fps, across 2**24 ms = 16 777 216
        assert clock.map(V, t + i * 33, 1.0 + i * 0.033).ms == i * 33
    assert clock.jumps == 0 and clock.clamps == 0


def test_backward_jump_continues_from_the_last_frame() -> None:
    clock = Timeline()
    clock.map(V, 50_000, 1.0)
    clock.map(A, 50_010, 1.0)
    clock.map(V, 50_033, 1.033)
    # The publisher restarts its clock at 0, 0.5 s of wall clock later.
    jumped = clock.map(V, 0, 1.533)
    assert jumped == Mapped(533, True, False)
    # Audio follows with the shared offset: no second jump, A/V stay aligned.
    assert clock.map(A, 10, 1.54).ms == 543
    assert clock.jumps == 1


def test_forward_jump_and_small_steps_back() -> None:
    clock = Timeline()
    clock.map(V, 1_000, 1.0)
    assert clock.map(V, 1_000 + JUMP_FORWARD_MS + 1, 1.04).ms == 40
    # A small step back is clamped, not re-anchored.
    assert clock.map(V, 1_000 + JUMP_FORWARD_MS + 1 - (JUMP_BACKWARD_MS // 2), 1.08) == Mapped(
        40, False, True
    )
    assert clock.clamps == 1


def test_new_publisher_continues_after_the_wall_clock_gap() -> None:
    clock = Timeline()
    for i in range(10):
        clock.map(V, 5_000 + i * 100, 1.0 + i * 0.1)
    last = clock.map(A, 5_900, 1.9).ms
    assert last == 900
    clock.new_publisher()
    # Two seconds later a new publisher starts at 0.
    first = clock.map(V, 0, 3.9).ms
    assert first == 900 + 2_000
    assert clock.map(A, 0, 3.9).ms == first
    assert clock.map(V, 33, 3.933).ms == first + 33
    assert clock.end_ms(4.0) == first + 33 + 67


def test_arrival_anchor_keeps_the_earliest_arrival_and_leaks_up() -> None:
    anchor = ArrivalAnchor()
    assert anchor.at(5.0) is None
    # Stream time 0 at 100.0, then 1.0 s of stream arriving 40 ms late (jitter).
    assert anchor.update(100.0, 0.0) == 100.0
    assert anchor.update(101.04, 1.0) == pytest.approx(100.0 + 1.04 * ANCHOR_LEAK)
    # An earlier arrival (relative to stream time) moves it down at once.
    assert anchor.update(101.5, 1.51) == pytest.approx(99.99)
    # Without earlier arrivals it rises by ANCHOR_LEAK seconds per second.
    assert anchor.at(111.5) == pytest.approx(99.99 + 10 * ANCHOR_LEAK)
