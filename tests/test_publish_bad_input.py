"""Bad input from an RTMP publisher: each case gets a clear log line and a closed publish,
while a good stream keeps playing to a WebRTC viewer."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from srsrelay.rtmp.chunk import MessageType
from tests.conftest import FFMPEG, RelayProcess, wait_live
from tests.raw_publisher import RawPublisher
from tests.whep_client import WhepViewer

pytestmark = pytest.mark.integration

MAX_MESSAGE_SIZE = 8 * 1024 * 1024
"""The default rtmp.max_message_size."""
FLOOD_RATE = 1000
"""Tiny tags per second in the flood cases."""
FLOOD_SECONDS = 3.0


def try_send(action: Callable[[], None]) -> bool:
    """Run a send; False when the relay had already closed the connection."""
    try:
        action()
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def flv_tags(data: bytes) -> list[tuple[int, bytes]]:
    """(tag type, body) of every tag of an FLV file."""
    assert data[:3] == b"FLV", data[:16]
    pos = int.from_bytes(data[5:9], "big") + 4
    tags = []
    while pos + 11 <= len(data):
        size = int.from_bytes(data[pos + 1 : pos + 4], "big")
        tags.append((data[pos], data[pos + 11 : pos + 11 + size]))
        pos += 11 + size + 4
    return tags


@pytest.fixture(scope="module")
def avc_sequence_header(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real AVC sequence header tag body, from ffmpeg's FLV muxer."""
    path: Path = tmp_path_factory.mktemp("flv") / "one.flv"
    subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi"]
        + ["-i", "testsrc2=size=320x240:rate=30", "-frames:v", "2", "-c:v", "libx264"]
        + ["-f", "flv", str(path)],
        check=True,
        timeout=30,
    )
    for tag_type, body in flv_tags(path.read_bytes()):
        if tag_type == MessageType.VIDEO and body[:2] == b"\x17\x00":
            return body
    raise AssertionError("ffmpeg wrote no AVC sequence header")


# AVC sequence header with zero SPS: version 1, High profile, level 3.1, 4-byte NALU
# lengths (0xFF), 0xE0 = zero SPS, then one 4-byte PPS.
ZERO_SPS_HEADER = bytes([0x17, 0x00, 0, 0, 0, 1, 0x64, 0x00, 0x1F, 0xFF, 0xE0, 1, 0, 4]) + (
    b"\x68\xee\x3c\x80"
)
# A NALU tag whose 4-byte length claims 65536 bytes; 12 follow.
OVERRUN_TAG = bytes([0x27, 0x01, 0, 0, 0]) + (65536).to_bytes(4, "big") + b"\x41\x9a" + bytes(10)
# AudioSpecificConfig: object type 31 + escape 63 = 95, 44.1 kHz, stereo.
ASC_TYPE_95 = bytes([0b11111_111, 0b111_0100_0, 0b010_00000])
ASC_TYPE_0 = bytes([0b00000_010, 0b0_0010_000])  # object type 0, 44.1 kHz, stereo
AAC_HEADER = bytes([0xAF, 0x00])
# 5-byte video tags: AVC with an unknown packet type (garbage) / an empty NALU tag (valid).
GARBAGE_TINY_TAG = bytes([0x27, 0x07, 0, 0, 0])
EMPTY_TINY_TAG = bytes([0x27, 0x01, 0, 0, 0])


def flood(pub: RawPublisher, body: bytes, seconds: float) -> bool:
    """Send FLOOD_RATE tiny tags per second; False if the relay closed the connection."""
    batch = FLOOD_RATE // 20
    start = time.monotonic()
    ts = 0
    while time.monotonic() - start < seconds:
        for _ in range(batch):
            ts += 1
            if not try_send(functools.partial(pub.video, ts, body)):
                return False
        next_at = start + pub.sent_tags / FLOOD_RATE
        time.sleep(max(0.0, next_at - time.monotonic()))
    return True


def events_for(relay: RelayProcess, event: str, **match: str) -> list[dict[str, object]]:
    return [
        line
        for line in relay.log_lines()
        if line.get("event") == event and all(line.get(k) == v for k, v in match.items())
    ]


def rejected_reason(relay: RelayProcess, stream: str) -> str:
    found = events_for(relay, "rtmp publish rejected", stream=stream)
    assert len(found) == 1, (stream, found, relay.log_path.read_text()[-3000:])
    return str(found[0]["reason"])


def connection_closed_reason(relay: RelayProcess, peer: str) -> str:
    found = events_for(relay, "rtmp connection closed", peer=peer)
    assert len(found) == 1, (peer, found)
    return str(found[0]["reason"])


async def stream_info(
    http: aiohttp.ClientSession, relay: RelayProcess, key: str
) -> dict[str, object]:
    async with http.get(relay.http + "/api/v1/streams") as resp:
        assert resp.status == 200
        data = await resp.json()
    for s in data["streams"]:
        if s["id"] == key:
            return dict(s)
    raise AssertionError(f"{key} not listed: {data}")


class GoodViewer:
    """Checks that the viewer of the good stream keeps decoding at the published rate."""

    def __init__(self, viewer: WhepViewer) -> None:
        self.viewer = viewer
        self.frames = len(viewer.result.video_pts)
        self.since = time.monotonic()

    def assert_playing(self, case: str) -> None:
        frames = len(self.viewer.result.video_pts)
        elapsed = time.monotonic() - self.since
        # 30 fps published; allow decode jitter, not a stall.
        assert frames - self.frames >= 0.8 * 30 * elapsed - 5, (
            f"good viewer stalled during {case}: {self.frames} -> {frames} in {elapsed:.1f} s"
        )
        self.frames, self.since = frames, time.monotonic()


async def test_bad_publishers_are_closed_and_others_keep_playing(  # type: ignore[no-untyped-def]
    relay: RelayProcess, publish, http_session: aiohttp.ClientSession, avc_sequence_header: bytes
) -> None:
    publish(relay.rtmp_url("live/good"), size="640x360")
    await wait_live(relay, "live/good")
    viewer = WhepViewer(relay.http, "/whep/live/good")
    await viewer.start(http_session)
    loop = asyncio.get_running_loop()

    async def run(action: Callable[[], object]) -> object:
        return await loop.run_in_executor(None, action)

    async def open_publisher(name: str) -> RawPublisher:
        pub = await run(lambda: RawPublisher(relay.rtmp_port, "live", name))
        assert isinstance(pub, RawPublisher)
        return pub

    try:
        await asyncio.sleep(2)
        good = GoodViewer(viewer)
        assert good.frames > 20, good.frames

        # 1. AVC sequence header with zero SPS: rejected at once.
        pub = await open_publisher("zero-sps")
        await run(lambda: try_send(lambda: pub.video(0, ZERO_SPS_HEADER)))
        assert await run(lambda: pub.closed_by_relay(5)), "zero-SPS publish left open"
        pub.close()
        reason = rejected_reason(relay, "live/zero-sps")
        assert reason == (
            "stream live/zero-sps: unusable AVC sequence header: AVC sequence header has no SPS"
        ), reason
        assert connection_closed_reason(relay, pub.peer).startswith("publish rejected: ")
        good.assert_playing("zero SPS")

        # 2. NAL lengths that overrun the tag, after a valid sequence header: each tag is
        # dropped with a (throttled) warning; 50 in a row reject the publish.
        pub = await open_publisher("overrun")

        def send_overruns() -> None:
            pub.video(0, avc_sequence_header)
            for ts in range(1, 101):
                if not try_send(functools.partial(pub.video, ts * 33, OVERRUN_TAG)):
                    return

        await run(send_overruns)
        assert await run(lambda: pub.closed_by_relay(5)), "NAL overrun publish left open"
        pub.close()
        dropped = events_for(relay, "video tag dropped", stream="live/overrun")
        assert dropped, "no warning for a dropped tag"
        assert (
            "NALU length 65536 at offset 0 runs past the end of the 16-byte packet"
            == (dropped[0]["error"])
        ), dropped[0]
        reason = rejected_reason(relay, "live/overrun")
        assert reason == (
            "stream live/overrun: 50 malformed tags in a row, the last: NALU length 65536 "
            "at offset 0 runs past the end of the 16-byte packet"
        ), reason
        # The stream ends at once (no reconnect grace for data that cannot be relayed),
        # after taking the valid header and counting every bad tag.
        ended = events_for(relay, "stream ended", stream="live/overrun")
        assert len(ended) == 1, ended
        assert str(ended[0]["reason"]).startswith("publish rejected: "), ended
        assert ended[0]["frames_in"] == 51 and ended[0]["errors"] == 50, ended
        async with http_session.get(relay.http + "/api/v1/streams") as resp:
            listed = [st["id"] for st in (await resp.json())["streams"]]
        assert "live/overrun" not in listed, listed
        good.assert_playing("NAL overrun")

        # 3. AAC configs with an unknown audio object type (95 via the escape, and 0).
        for name, asc, expected in [
            ("aac-95", ASC_TYPE_95, "AAC audio object type 95 is not supported"),
            (
                "aac-0",
                ASC_TYPE_0,
                "unusable AAC sequence header: AudioSpecificConfig has audio object type 0 (null)",
            ),
        ]:
            pub = await open_publisher(name)
            await run(
                functools.partial(try_send, functools.partial(pub.audio, 0, AAC_HEADER + asc))
            )
            assert await run(functools.partial(pub.closed_by_relay, 5)), f"{name} publish left open"
            pub.close()
            reason = rejected_reason(relay, f"live/{name}")
            assert reason.startswith(f"stream live/{name}: {expected}"), reason
        assert "use AAC-LC" in rejected_reason(relay, "live/aac-95")
        good.assert_playing("AAC object type")

        # 4a. 1000 garbage 5-byte tags per second: rejected after 50 in a row.
        pub = await open_publisher("flood-garbage")
        still_open = await run(lambda: flood(pub, GARBAGE_TINY_TAG, FLOOD_SECONDS))
        closed = still_open is False or await run(lambda: pub.closed_by_relay(5))
        assert closed, f"garbage flood left open after {pub.sent_tags} tags"
        pub.close()
        reason = rejected_reason(relay, "live/flood-garbage")
        assert reason == (
            "stream live/flood-garbage: 50 malformed tags in a row, the last: "
            "AVC video tag has unknown packet type 7"
        ), reason
        good.assert_playing("garbage flood")

        # 4b. 1000 valid but empty 5-byte NALU tags per second: well formed, but far over
        # rtmp.max_tag_rate (300 a second, 4 s burst), so the publish is closed within
        # about 2 s while the API stays responsive.
        pub = await open_publisher("flood-empty")
        flooding = asyncio.ensure_future(run(lambda: flood(pub, EMPTY_TINY_TAG, FLOOD_SECONDS)))
        api_latency = 0.0
        while not flooding.done():
            started = time.monotonic()
            await stream_info(http_session, relay, "live/good")
            api_latency = max(api_latency, time.monotonic() - started)
            await asyncio.sleep(0.2)
        closed = await flooding is False or await run(lambda: pub.closed_by_relay(5))
        assert closed, f"empty-tag flood left open after {pub.sent_tags} tags"
        # Burst (1200) plus 300 a second: about 1.7 s of a 1000/s flood; never before the
        # burst is spent.
        assert 1200 <= pub.sent_tags < 0.9 * FLOOD_RATE * FLOOD_SECONDS, pub.sent_tags
        assert api_latency < 1.0, f"API took {api_latency:.2f} s during the flood"
        pub.close()
        reason = rejected_reason(relay, "live/flood-empty")
        assert reason == (
            "stream live/flood-empty: more than 300 audio/video messages per second "
            "(rtmp.max_tag_rate=300, burst 4 s)"
        ), reason
        ended = events_for(relay, "stream ended", stream="live/flood-empty")
        assert len(ended) == 1 and str(ended[0]["reason"]).startswith("publish rejected: ")
        good.assert_playing("empty-tag flood")

        # 5. An 8 MB video tag, above rtmp.max_message_size: refused from its header.
        pub = await open_publisher("huge")
        body = b"\x27\x01\x00\x00\x00" + bytes(MAX_MESSAGE_SIZE + 1024 - 5)
        await run(lambda: try_send(lambda: pub.video(0, body)))
        assert await run(lambda: pub.closed_by_relay(5)), "8 MB tag publish left open"
        pub.close()
        errors = events_for(relay, "rtmp protocol error", peer=pub.peer)
        assert len(errors) == 1, errors
        assert errors[0]["kind"] == "size", errors[0]
        assert errors[0]["error"] == (
            f"RTMP message of {MAX_MESSAGE_SIZE + 1024} bytes (type 9) is larger than "
            f"rtmp.max_message_size={MAX_MESSAGE_SIZE}"
        ), errors[0]
        assert connection_closed_reason(relay, pub.peer) == "protocol error (size)"
        unpublished = events_for(relay, "rtmp unpublish", stream="live/huge")
        assert len(unpublished) == 1, unpublished
        good.assert_playing("8 MB tag")

        # The good stream was never touched; the relay logged no internal error.
        assert relay.proc.poll() is None
        good_info = await stream_info(http_session, relay, "live/good")
        assert good_info["state"] == "live" and good_info["errors"] == 0, good_info
        assert not [
            line for line in relay.log_lines() if line.get("level") in ("error", "critical")
        ]
        assert not [
            line
            for line in relay.log_lines()
            if "live/good" in str(line.get("stream"))
            and ("rejected" in str(line.get("event")) or "dropped" in str(line.get("event")))
        ]
    finally:
        await viewer.close()
