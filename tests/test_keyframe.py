from __future__ import annotations

from srsrelay.webrtc.keyframe import KeyframeAnswer, KeyframeRequests


def test_requests_are_rate_limited_per_interval() -> None:
    k = KeyframeRequests(interval=1.0, cache_age=1.0)
    assert k.on_request(10.0, 0.2) is KeyframeAnswer.FROM_CACHE
    assert k.on_request(10.5, 0.7) is KeyframeAnswer.IGNORED
    assert k.on_request(10.99, 0.2) is KeyframeAnswer.IGNORED
    assert k.on_request(11.0, 0.2) is KeyframeAnswer.FROM_CACHE
    assert k.counters.as_dict() == {
        "requests": 4,
        "answered_from_cache": 2,
        "waited_for_idr": 0,
        "ignored": 2,
    }


def test_old_or_missing_cache_waits_for_the_next_idr() -> None:
    k = KeyframeRequests(interval=0.0, cache_age=1.0)
    assert k.on_request(1.0, 1.0) is KeyframeAnswer.FROM_CACHE  # exactly the limit
    assert k.on_request(2.0, 1.01) is KeyframeAnswer.WAIT_FOR_IDR
    assert k.on_request(3.0, None) is KeyframeAnswer.WAIT_FOR_IDR
    assert k.on_request(4.0, -0.5) is KeyframeAnswer.WAIT_FOR_IDR  # clock oddity: not cached
    assert (k.counters.answered_from_cache, k.counters.waited_for_idr) == (1, 3)
