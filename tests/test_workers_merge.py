"""Merging the Prometheus expositions of the main process and its workers."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from srsrelay.app import Relay
from srsrelay.config import Config
from srsrelay.metrics import LAG_BUCKETS
from srsrelay.webrtc.sendpath import TrafficKind
from srsrelay.workers.merge import MAIN_ONLY, is_main_only, merge_expositions

GOLDEN = Path(__file__).parent / "fixtures" / "metrics_golden.txt"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def families(text: bytes) -> list[str]:
    """ "name type" of every family, as the TYPE lines say, in order."""
    out = []
    for line in text.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            out.append(f"{name} {kind}")
    return out


def samples(text: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def at(values: Samples, name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


MAIN = b"""\
# HELP srsrelay_build_info Always 1; the version is a label.
# TYPE srsrelay_build_info gauge
srsrelay_build_info{version="0.1.0"} 1.0
# HELP srsrelay_streams Streams live or waiting for their publisher.
# TYPE srsrelay_streams gauge
srsrelay_streams 2.0
# HELP srsrelay_viewers Open WebRTC viewer sessions.
# TYPE srsrelay_viewers gauge
srsrelay_viewers 1.0
# HELP srsrelay_rtmp_received_bytes_total Bytes received from RTMP clients.
# TYPE srsrelay_rtmp_received_bytes_total counter
srsrelay_rtmp_received_bytes_total 5000.0
# HELP srsrelay_send_bytes_total UDP payload bytes sent, by traffic kind.
# TYPE srsrelay_send_bytes_total counter
srsrelay_send_bytes_total{kind="media"} 100.0
srsrelay_send_bytes_total{kind="stun"} 7.0
# HELP srsrelay_send_datagrams_total UDP datagrams handed to the send path.
# TYPE srsrelay_send_datagrams_total counter
srsrelay_send_datagrams_total{kind="media",outcome="sent"} 10.0
# HELP srsrelay_event_loop_lag_last_seconds How late the last probe woke up.
# TYPE srsrelay_event_loop_lag_last_seconds gauge
srsrelay_event_loop_lag_last_seconds 0.002
# HELP srsrelay_event_loop_lag_max_seconds The latest probe wake-up.
# TYPE srsrelay_event_loop_lag_max_seconds gauge
srsrelay_event_loop_lag_max_seconds 0.3
# HELP srsrelay_event_loop_lag_seconds How late the event-loop probes woke up.
# TYPE srsrelay_event_loop_lag_seconds histogram
srsrelay_event_loop_lag_seconds_bucket{le="0.01"} 3.0
srsrelay_event_loop_lag_seconds_bucket{le="0.5"} 4.0
srsrelay_event_loop_lag_seconds_bucket{le="+Inf"} 4.0
srsrelay_event_loop_lag_seconds_count 4.0
srsrelay_event_loop_lag_seconds_sum 0.31
"""

WORKER_1 = b"""\
# HELP srsrelay_build_info Always 1; the version is a label.
# TYPE srsrelay_build_info gauge
srsrelay_build_info{version="9.9.9"} 1.0
# HELP srsrelay_streams Streams live or waiting for their publisher.
# TYPE srsrelay_streams gauge
srsrelay_streams 5.0
# HELP srsrelay_viewers Open WebRTC viewer sessions.
# TYPE srsrelay_viewers gauge
srsrelay_viewers 30.0
# HELP srsrelay_rtmp_received_bytes_total Bytes received from RTMP clients.
# TYPE srsrelay_rtmp_received_bytes_total counter
srsrelay_rtmp_received_bytes_total 77.0
# HELP srsrelay_send_bytes_total UDP payload bytes sent, by traffic kind.
# TYPE srsrelay_send_bytes_total counter
srsrelay_send_bytes_total{kind="media"} 1000.0
srsrelay_send_bytes_total{kind="rtcp"} 50.0
# HELP srsrelay_send_datagrams_total UDP datagrams handed to the send path.
# TYPE srsrelay_send_datagrams_total counter
srsrelay_send_datagrams_total{outcome="sent",kind="media"} 90.0
# HELP srsrelay_event_loop_lag_last_seconds How late the last probe woke up.
# TYPE srsrelay_event_loop_lag_last_seconds gauge
srsrelay_event_loop_lag_last_seconds 0.04
# HELP srsrelay_event_loop_lag_max_seconds The latest probe wake-up.
# TYPE srsrelay_event_loop_lag_max_seconds gauge
srsrelay_event_loop_lag_max_seconds 0.1
# HELP srsrelay_event_loop_lag_seconds How late the event-loop probes woke up.
# TYPE srsrelay_event_loop_lag_seconds histogram
srsrelay_event_loop_lag_seconds_bucket{le="0.01"} 1.0
srsrelay_event_loop_lag_seconds_bucket{le="0.5"} 2.0
srsrelay_event_loop_lag_seconds_bucket{le="+Inf"} 3.0
srsrelay_event_loop_lag_seconds_count 3.0
srsrelay_event_loop_lag_seconds_sum 2.5
# HELP srsrelay_only_in_workers_total Only workers count this.
# TYPE srsrelay_only_in_workers_total counter
srsrelay_only_in_workers_total{kind="a"} 4.0
"""

WORKER_2 = b"""\
# HELP srsrelay_viewers Open WebRTC viewer sessions.
# TYPE srsrelay_viewers gauge
srsrelay_viewers 12.0
# HELP srsrelay_send_bytes_total UDP payload bytes sent, by traffic kind.
# TYPE srsrelay_send_bytes_total counter
srsrelay_send_bytes_total{kind="media"} 20000.0
# HELP srsrelay_event_loop_lag_last_seconds How late the last probe woke up.
# TYPE srsrelay_event_loop_lag_last_seconds gauge
srsrelay_event_loop_lag_last_seconds 0.001
# HELP srsrelay_only_in_workers_total Only workers count this.
# TYPE srsrelay_only_in_workers_total counter
srsrelay_only_in_workers_total{kind="a"} 1.0
srsrelay_only_in_workers_total{kind="b"} 2.0
"""


def test_counters_and_gauges_are_summed_by_name_and_labels() -> None:
    merged = samples(merge_expositions(MAIN, [WORKER_1, WORKER_2]))
    assert at(merged, "srsrelay_send_bytes_total", kind="media") == 100 + 1000 + 20000
    assert at(merged, "srsrelay_send_bytes_total", kind="stun") == 7  # main only
    assert at(merged, "srsrelay_send_bytes_total", kind="rtcp") == 50  # a worker only
    # Label order in the text does not matter.
    assert at(merged, "srsrelay_send_datagrams_total", kind="media", outcome="sent") == 100
    assert at(merged, "srsrelay_viewers") == 1 + 30 + 12
    assert at(merged, "srsrelay_only_in_workers_total", kind="a") == 5
    assert at(merged, "srsrelay_only_in_workers_total", kind="b") == 2


def test_histogram_buckets_count_and_sum_are_summed() -> None:
    merged = samples(merge_expositions(MAIN, [WORKER_1, WORKER_2]))
    name = "srsrelay_event_loop_lag_seconds"
    assert at(merged, f"{name}_bucket", le="0.01") == 4
    assert at(merged, f"{name}_bucket", le="0.5") == 6
    assert at(merged, f"{name}_bucket", le="+Inf") == 7
    assert at(merged, f"{name}_count") == 7
    assert at(merged, f"{name}_sum") == 0.31 + 2.5


def test_lag_gauges_take_the_worst_loop() -> None:
    merged = samples(merge_expositions(MAIN, [WORKER_1, WORKER_2]))
    assert at(merged, "srsrelay_event_loop_lag_last_seconds") == 0.04
    assert at(merged, "srsrelay_event_loop_lag_max_seconds") == 0.3


def test_main_only_families_come_from_main() -> None:
    merged = samples(merge_expositions(MAIN, [WORKER_1, WORKER_2]))
    assert at(merged, "srsrelay_build_info", version="0.1.0") == 1
    assert ("srsrelay_build_info", frozenset({("version", "9.9.9")})) not in merged
    assert at(merged, "srsrelay_streams") == 2
    assert at(merged, "srsrelay_rtmp_received_bytes_total") == 5000


def test_main_only_covers_the_ingest_families() -> None:
    for name in (
        "srsrelay_build_info",
        "srsrelay_start_time_seconds",
        "srsrelay_publishers",
        "srsrelay_streams",
        "srsrelay_rtmp_connections",
        "srsrelay_rtmp_protocol_errors_total",
        "srsrelay_workers",
        "srsrelay_worker_restarts_total",
        "srsrelay_worker_viewers_lost_total",
    ):
        assert is_main_only(name), name
    for name in (
        "srsrelay_viewers",
        "srsrelay_send_bytes_total",
        "srsrelay_rtc_received_datagrams_total",
    ):
        assert not is_main_only(name), name
    assert "srsrelay_workers" in MAIN_ONLY


def test_main_only_family_missing_from_main_is_not_taken_from_a_worker() -> None:
    main = b"# HELP srsrelay_viewers V.\n# TYPE srsrelay_viewers gauge\nsrsrelay_viewers 1.0\n"
    worker = b"# HELP srsrelay_workers W.\n# TYPE srsrelay_workers gauge\nsrsrelay_workers 4.0\n"
    assert families(merge_expositions(main, [worker])) == ["srsrelay_viewers gauge"]


def test_family_order_is_main_then_worker_only() -> None:
    assert families(merge_expositions(MAIN, [WORKER_1, WORKER_2])) == [
        *families(MAIN),
        "srsrelay_only_in_workers_total counter",
    ]


def test_output_names_and_help_equal_the_input() -> None:
    text = merge_expositions(MAIN, [WORKER_1]).decode()
    assert "# HELP srsrelay_send_bytes_total UDP payload bytes sent, by traffic kind.\n" in text
    assert "# TYPE srsrelay_send_bytes_total counter\n" in text
    assert 'srsrelay_send_bytes_total{kind="media"} 1100.0\n' in text
    assert "# TYPE srsrelay_event_loop_lag_seconds histogram\n" in text
    # It reads back: a second merge of the output alone changes nothing.
    assert merge_expositions(text.encode(), []) == text.encode()


def test_worker_that_does_not_parse_is_skipped_with_a_warning() -> None:
    with capture_logs() as logs:
        merged = merge_expositions(
            MAIN, [b"srsrelay_viewers{kind= garbage\n", WORKER_2, b"\xff\xfe"]
        )
    assert at(samples(merged), "srsrelay_viewers") == 1 + 12
    assert [(e["event"], e["worker"], e["log_level"]) for e in logs] == [
        ("worker metrics skipped", 0, "warning"),
        ("worker metrics skipped", 2, "warning"),
    ]
    assert logs[0]["error"] == "ValueError: could not convert string to float: '{kind='"
    assert logs[1]["error"].startswith("UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff")


def test_half_parsed_worker_adds_nothing() -> None:
    worker = WORKER_2 + b"srsrelay_viewers not_a_number\n"
    with capture_logs() as logs:
        merged = merge_expositions(MAIN, [worker])
    assert merged == merge_expositions(MAIN, [])
    assert len(logs) == 1


def test_worker_family_of_another_type_is_skipped() -> None:
    worker = b"# HELP srsrelay_viewers V.\n# TYPE srsrelay_viewers untyped\nsrsrelay_viewers 5\n"
    with capture_logs() as logs:
        merged = merge_expositions(MAIN, [WORKER_2, worker])
    assert at(samples(merged), "srsrelay_viewers") == 1 + 12
    assert [(e["event"], e["worker"], e["family"]) for e in logs] == [
        ("worker metric family skipped", 1, "srsrelay_viewers")
    ]
    assert logs[0]["error"] == "type unknown differs from gauge"


# -- real renders -------------------------------------------------------------------


def relay(media_bytes: int, kicked: int, lags: list[float], rtmp_errors: int) -> Relay:
    r = Relay(Config())
    r.rtc.counters.kinds[TrafficKind.MEDIA].bytes_sent = media_bytes
    r.rtc.closed["kicked"] += kicked
    r.rtmp.protocol_errors["bad_chunk"] += rtmp_errors
    for lag in lags:
        r.metrics.lag.record(lag)
    return r


def test_real_renders_merge() -> None:
    main = relay(media_bytes=10, kicked=0, lags=[0.002], rtmp_errors=3).metrics.render()
    w1 = relay(media_bytes=200, kicked=2, lags=[0.03, 0.7], rtmp_errors=5).metrics.render()
    w2 = relay(media_bytes=3000, kicked=1, lags=[0.0005], rtmp_errors=0).metrics.render()
    merged = merge_expositions(main, [w1, w2])
    values = samples(merged)
    assert at(values, "srsrelay_send_bytes_total", kind="media") == 3210
    assert at(values, "srsrelay_send_bytes_total", kind="rtcp") == 0
    assert at(values, "srsrelay_viewer_sessions_closed_total", reason="kicked") == 3
    assert at(values, "srsrelay_rtmp_protocol_errors_total", kind="bad_chunk") == 3
    assert at(values, "srsrelay_event_loop_lag_last_seconds") == 0.7
    assert at(values, "srsrelay_event_loop_lag_max_seconds") == 0.7
    assert at(values, "srsrelay_event_loop_lag_seconds_count") == 4
    assert at(values, "srsrelay_event_loop_lag_seconds_sum") == 0.002 + 0.03 + 0.7 + 0.0005
    buckets = [
        at(values, "srsrelay_event_loop_lag_seconds_bucket", le=f"{b:g}") for b in LAG_BUCKETS
    ]
    assert buckets == [1, 2, 2, 2, 3, 3, 3, 3, 4, 4]
    assert at(values, "srsrelay_start_time_seconds") == at(
        samples(main), "srsrelay_start_time_seconds"
    )
    # Same families, same order as one process renders.
    assert families(merged) == families(main)


def test_merged_real_render_families_match_the_golden_list() -> None:
    main = relay(media_bytes=1, kicked=1, lags=[0.01], rtmp_errors=1).metrics.render()
    merged = merge_expositions(main, [main, main])
    golden = [line for line in GOLDEN.read_text().split("\n") if line]
    assert sorted(families(merged)) == sorted(golden)


def test_real_render_alone_is_unchanged() -> None:
    main = relay(media_bytes=12345, kicked=1, lags=[0.01, 0.2], rtmp_errors=1).metrics.render()
    assert merge_expositions(main, []) == main
