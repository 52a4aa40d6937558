"""WHEP conformance (draft-ietf-wish-whep; RFC 9725 for the resource model): every status
code and header of the endpoint and session URLs, against the real daemon, with a real
ffmpeg publisher and a real aiortc viewer that must keep playing throughout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aioice import stun

from srsrelay.config import RtcConfig
from srsrelay.http.sdpfrag import parse_sdpfrag
from srsrelay.http.server import (
    MalformedRequestFilter,
    RateLimiter,
    RefusalCounter,
    ice_server_links,
    if_match,
)
from tests.conftest import RelayProcess, start_relay, wait_live
from tests.whep_client import WhepViewer

SDP = {"Content-Type": "application/sdp"}
FRAG = "application/trickle-ice-sdpfrag"
STRONG_ETAG = re.compile(r'^"[^"*]+"$')


# -- pure parts ----------------------------------------------------------------------


def test_rate_limiter_burst_then_rate() -> None:
    limiter = RateLimiter(rate=10.0, burst=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", 0.0) == pytest.approx(0.1)
    assert limiter.take("b", 0.0) == 0.0, "another address has its own bucket"
    assert limiter.take("a", 0.05) == pytest.approx(0.05)
    # 0.2 s at 10 per second: two tokens back; a refused request costs nothing.
    assert [limiter.take("a", 0.2) for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("a", 0.2) == pytest.approx(0.1)
    assert limiter.take("a", 100.0) == 0.0
    assert [limiter.take("a", 100.0) for _ in range(3)][-1] > 0, "refill stops at the burst"


def test_rate_limiter_table_is_bounded_lru() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=3)
    for client in ("a", "b", "c"):
        assert limiter.take(client, 0.0) == 0.0
    assert limiter.take("a", 0.0) > 0, "a is limited and becomes the most recent"
    assert limiter.take("d", 0.0) == 0.0
    assert len(limiter) == 3
    assert limiter.take("b", 0.0) == 0.0, "b was the least recently seen and was forgotten"
    assert limiter.take("a", 0.0) > 0, "a is still remembered"


def test_rate_limiter_off() -> None:
    limiter = RateLimiter(rate=0.0, burst=1)
    assert all(limiter.take("a", 0.0) == 0.0 for _ in range(100))
    assert len(limiter) == 0


def test_refusal_counter_logs_once_a_second() -> None:
    counter = RefusalCounter()
    assert counter.add(10.0) == 1
    assert [counter.add(10.0 + i / 10) for i in range(1, 10)] == [None] * 9
    assert counter.add(11.0) == 10
    assert counter.count == 11


def test_malformed_request_filter_counts_parse_errors_only() -> None:
    from aiohttp.http_exceptions import LineTooLong

    flt = MalformedRequestFilter()
    try:
        raise LineTooLong(b"aaaa", "8190")
    except LineTooLong as exc:
        bad = logging.LogRecord("aiohttp.server", 40, "", 0, "Error", (), (type(exc), exc, None))
    other = logging.LogRecord("aiohttp.server", 40, "", 0, "Error", (), None)
    assert flt.filter(bad) is False
    assert flt.filter(other) is True
    assert flt.refused.count == 1


def test_if_match() -> None:
    assert if_match('"abc-0"', '"abc-0"')
    assert if_match('"x", "abc-0"', '"abc-0"')
    assert if_match("*", '"abc-0"')
    assert not if_match('"abc-1"', '"abc-0"')
    assert not if_match('W/"abc-0"', '"abc-0"'), "If-Match compares strongly"
    assert not if_match("abc-0", '"abc-0"')


def test_ice_server_links() -> None:
    rtc = RtcConfig(
        ice_servers=("stun:stun.example.org:3478", "turns:turn.example.org?transport=tcp"),
        ice_username="user",
        ice_credential="pw",
    )
    assert ice_server_links(rtc) == [
        '<stun:stun.example.org:3478>; rel="ice-server"',
        '<turns:turn.example.org?transport=tcp>; rel="ice-server"; username="user"; '
        'credential="pw"; credential-type="password"',
    ]
    assert ice_server_links(RtcConfig()) == []


# -- against the daemon ----------------------------------------------------------------


@contextlib.contextmanager
def relay_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rtc: str = "", **http: str
) -> Iterator[RelayProcess]:
    """A relay with extra [rtc] lines and [http] settings (given as environment overrides)."""
    for key, value in http.items():
        monkeypatch.setenv(f"SRSRELAY_HTTP_{key.upper()}", value)
    relay = start_relay(tmp_path, extra=rtc)
    try:
        yield relay
    finally:
        code = relay.stop()
        assert code == 0, f"relay exited {code}: {relay.log_path.read_text()[-4000:]}"


def make_offer(
    ufrag: str | None = None, videos: int = 1, audio: bool = True, video_codec: str = "H264"
) -> tuple[str, str]:
    """An SDP offer as a browser would send it, and its ice-ufrag."""
    ufrag = ufrag or secrets.token_hex(4)
    pwd = secrets.token_hex(12)
    mids = [str(i) for i in range(videos + (1 if audio else 0))]
    lines = [
        "v=0",
        f"o=- {secrets.randbits(60)} 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE " + " ".join(mids),
        "a=msid-semantic: WMS",
    ]

    def section(kind: str, mid: str, rtpmap: list[str]) -> None:
        pts = " ".join(line.split()[0] for line in rtpmap)
        lines.extend(
            [
                f"m={kind} 9 UDP/TLS/RTP/SAVPF {pts}",
                "c=IN IP4 0.0.0.0",
                f"a=ice-ufrag:{ufrag}",
                f"a=ice-pwd:{pwd}",
                "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
                "a=setup:actpass",
                f"a=mid:{mid}",
                "a=recvonly",
                "a=rtcp-mux",
            ]
        )
        for line in rtpmap:
            pt, _, rest = line.partition(" ")
            lines.append(f"a=rtpmap:{pt} {rest}")
            if "H264" in rest:
                lines.append(
                    f"a=fmtp:{pt} level-asymmetry-allowed=1;packetization-mode=1;"
                    "profile-level-id=42e01f"
                )

    for i in range(videos):
        section("video", str(i), [f"{102 + i} {video_codec}/90000"])
    if audio:
        section("audio", str(videos), ["111 opus/48000/2"])
    return "\r\n".join(lines) + "\r\n", ufrag


def ice_pwd_of(sdp: str) -> str:
    match = re.search(r"^a=ice-pwd:(\S+)", sdp, re.M)
    assert match, sdp
    return match.group(1)


def stun_check(port: int, ours: str, theirs: str, pwd: str, timeout: float = 1.0) -> bool:
    """One STUN Binding request to the relay, as the viewer's ICE agent sends it; True if a
    response with valid MESSAGE-INTEGRITY (keyed with `pwd`) comes back."""
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    request.attributes["USERNAME"] = f"{ours}:{theirs}"
    request.attributes["PRIORITY"] = 1853824767
    request.attributes["ICE-CONTROLLING"] = secrets.randbits(63)
    request.add_message_integrity(pwd.encode())
    request.add_fingerprint()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(bytes(request), ("127.0.0.1", port))
        try:
            data = sock.recv(2048)
        except TimeoutError:
            return False
    response = stun.parse_message(data)
    assert response.transaction_id == request.transaction_id
    return bool(
        response.message_class == stun.Class.RESPONSE
        and response.check_message_integrity(pwd.encode())
    )


async def http_counters(http: aiohttp.ClientSession, relay: RelayProcess) -> dict[str, int]:
    async with http.get(relay.http + "/api/v1/http") as resp:
        return dict((await resp.json())["http"])


class LiveViewer:
    """A real aiortc viewer; `assert_playing` fails if its decoded frames stopped growing."""

    def __init__(self, relay: RelayProcess) -> None:
        self.viewer = WhepViewer(relay.http, "/whep/live/test")
        self._mark = (0, 0.0)

    async def start(self, http: aiohttp.ClientSession) -> None:
        await self.viewer.start(http)
        deadline = time.monotonic() + 10
        while len(self.viewer.result.video_pts) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(self.viewer.result.video_pts) >= 10, "the live viewer never played"
        self._mark = (len(self.viewer.result.video_pts), time.monotonic())

    async def assert_playing(self) -> None:
        await asyncio.sleep(1.0)
        before, at = self._mark
        after, elapsed = len(self.viewer.result.video_pts), time.monotonic() - at
        # 30 fps published; a stall of the relay would leave the count flat.
        assert after - before >= 0.7 * 30 * elapsed, (
            f"live viewer stalled: {before} -> {after} frames in {elapsed:.1f} s"
        )

    async def close(self) -> None:
        await self.viewer.close()


async def post(
    http: aiohttp.ClientSession, url: str, body: str, headers: dict[str, str] | None = None
) -> tuple[aiohttp.ClientResponse, str]:
    async with http.post(url, data=body, headers=headers or SDP) as resp:
        return resp, await resp.text()


async def patch(
    http: aiohttp.ClientSession,
    url: str,
    body: str | bytes,
    if_match_value: str | None,
    content_type: str = FRAG,
) -> tuple[aiohttp.ClientResponse, str]:
    headers = {"Content-Type": content_type}
    if if_match_value is not None:
        headers["If-Match"] = if_match_value
    async with http.patch(url, data=body, headers=headers) as resp:
        return resp, await resp.text()


def trickle(ufrag: str, pwd: str = "abcdefghijklmnopqrstuvwx") -> str:
    return (
        "a=group:BUNDLE 0 1\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 102\r\n"
        "a=mid:0\r\n"
        f"a=ice-ufrag:{ufrag}\r\n"
        f"a=ice-pwd:{pwd}\r\n"
        "a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0\r\n"
        "a=candidate:473322822 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active\r\n"
        "a=end-of-candidates\r\n"
    )


ICE_SERVERS = """
ice_servers = ["stun:stun.example.org:3478", "turn:turn.example.org:3478?transport=udp"]
ice_username = "viewer"
ice_credential = "s3cret pass"
dtls_timeout = 60.0
"""


@pytest.mark.integration
async def test_whep_resource_conformance(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish
) -> None:
    with relay_with(tmp_path, monkeypatch, rtc=ICE_SERVERS) as relay:
        publish(relay.rtmp_url("live/test"), size="320x240")
        await wait_live(relay, "live/test")
        endpoint = relay.http + "/whep/live/test"
        async with aiohttp.ClientSession() as http:
            live = LiveViewer(relay)
            await live.start(http)
            try:
                await _walk_resource(http, relay, endpoint)
                await live.assert_playing()
            finally:
                await live.close()


async def _walk_resource(http: aiohttp.ClientSession, relay: RelayProcess, endpoint: str) -> None:
    # POST: 201, answer, Location, strong unique ETag, one Link per ICE server.
    offer, remote_ufrag = make_offer()
    resp, answer = await post(http, endpoint, offer)
    assert resp.status == 201, answer
    assert resp.content_type == "application/sdp"
    assert answer.startswith("v=0")
    location = resp.headers["Location"]
    assert re.fullmatch(r"/whep/live/test/[0-9a-f]{16}", location), location
    etag = resp.headers["ETag"]
    assert STRONG_ETAG.match(etag), etag
    assert resp.headers.getall("Link") == [
        '<stun:stun.example.org:3478>; rel="ice-server"',
        '<turn:turn.example.org:3478?transport=udp>; rel="ice-server"; username="viewer"; '
        'credential="s3cret pass"; credential-type="password"',
    ]
    assert {"Location", "ETag", "Link"} <= set(
        h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")
    )
    resource = relay.http + location
    our_ufrag = re.search(r"^a=ice-ufrag:(\S+)", answer, re.M).group(1)  # type: ignore[union-attr]
    our_pwd = ice_pwd_of(answer)

    second, _ = make_offer()
    resp2, _ = await post(http, endpoint, second)
    assert resp2.status == 201
    assert resp2.headers["ETag"] != etag and resp2.headers["Location"] != location

    # HEAD and GET on the endpoint: 200, application/sdp, no content.
    async with http.head(endpoint) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/sdp"
        assert await resp.read() == b""
    async with http.get(endpoint) as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    async with http.get(resource) as resp:
        assert resp.status == 200
        assert resp.headers["ETag"] == etag

    # OPTIONS: CORS + Accept-Post; Link outside a CORS preflight; Accept-Patch on the session.
    preflight = {"Origin": "https://player.example", "Access-Control-Request-Method": "POST"}
    async with http.options(endpoint, headers=preflight) as resp:
        assert resp.status == 200
        assert resp.headers["Accept-Post"] == "application/sdp"
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        for header in ("Content-Type", "Authorization", "If-Match"):
            assert header in resp.headers["Access-Control-Allow-Headers"]
        assert "Link" not in resp.headers
    async with http.options(endpoint) as resp:
        assert resp.status == 200
        assert resp.headers["Accept-Post"] == "application/sdp"
        assert len(resp.headers.getall("Link")) == 2
    async with http.options(resource, headers=preflight) as resp:
        assert resp.status == 200
        assert resp.headers["Accept-Patch"] == FRAG
        for method in ("PATCH", "DELETE"):
            assert method in resp.headers["Access-Control-Allow-Methods"]

    # PATCH trickle: 204 with no body and no ETag; If-Match required and compared.
    frag = trickle(remote_ufrag)
    resp, text = await patch(http, resource, frag, etag)
    assert (resp.status, text) == (204, "")
    assert "ETag" not in resp.headers
    resp, text = await patch(http, resource, frag, "*")
    assert resp.status == 204, text
    resp, text = await patch(http, resource, frag, None)
    assert resp.status == 428
    assert (
        text == f"PATCH needs If-Match: the ETag of the session ({etag}), or * for an ICE restart\n"
    )
    resp, text = await patch(http, resource, frag, '"not-this-one"')
    assert resp.status == 412
    assert etag in text and "does not name the current ICE session" in text
    resp, text = await patch(http, resource, frag, etag, content_type="application/sdp")
    assert resp.status == 415
    assert text == ("Content-Type must be application/trickle-ice-sdpfrag, got application/sdp\n")
    resp, text = await patch(http, resource, "a=candidate:1 1 udp\r\n", etag)
    assert resp.status == 400
    assert text.startswith("sdpfrag line 1: bad a=candidate '1 1 udp'; expected <foundation>")
    resp, text = await patch(http, resource, b"a=ice-ufrag:\xff\xfe\r\n", etag)
    assert (resp.status, text) == (400, "body is not an ICE fragment: it is not UTF-8 text\n")
    resp, text = await patch(http, resource, "a=end-of-candidates\r\n" * 4000, etag)
    assert resp.status == 413
    assert "ICE fragment too large" in text and "http.max_body_size" in text

    # ICE restart: new ufrag and pwd. 428 without If-Match, 412 with a stale one.
    assert stun_check(relay.rtc_port, our_ufrag, remote_ufrag, our_pwd)
    new_remote = secrets.token_hex(4)
    restart = trickle(new_remote, pwd=secrets.token_hex(12))
    resp, text = await patch(http, resource, restart, None)
    assert resp.status == 428
    resp, text = await patch(http, resource, restart, '"stale"')
    assert resp.status == 412
    resp, text = await patch(http, resource, f"a=ice-ufrag:{new_remote}\r\n", etag)
    assert resp.status == 400
    assert text == (
        "an ICE restart (a new a=ice-ufrag) needs the new a=ice-pwd too "
        "(RFC 8839 section 4.4.1.1.1)\n"
    )
    resp, body = await patch(http, resource, restart, etag)
    assert resp.status == 200, body
    assert resp.content_type == FRAG
    new_etag = resp.headers["ETag"]
    assert STRONG_ETAG.match(new_etag) and new_etag != etag
    reply = parse_sdpfrag(body)
    assert reply.ignored == ("ice-lite",), "the reply repeats a=ice-lite of the answer"
    assert reply.ice_ufrag and reply.ice_pwd
    assert (reply.ice_ufrag, reply.ice_pwd) != (our_ufrag, our_pwd)
    assert [m.mid for m in reply.media] == ["0"]
    assert [(c.address, c.port, c.typ) for c in reply.candidates] == [
        ("127.0.0.1", relay.rtc_port, "host")
    ]
    assert reply.end_of_candidates
    # The new credentials are live at once; the old ones are gone.
    assert stun_check(relay.rtc_port, reply.ice_ufrag, new_remote, reply.ice_pwd)
    assert not stun_check(relay.rtc_port, our_ufrag, remote_ufrag, our_pwd, timeout=0.3)
    # The old ETag names a gone ICE session; the new one takes trickle for the new ufrag.
    resp, _ = await patch(http, resource, trickle(new_remote), etag)
    assert resp.status == 412
    resp, text = await patch(http, resource, trickle(new_remote), new_etag)
    assert resp.status == 204, text
    async with http.get(resource) as resp:
        assert resp.headers["ETag"] == new_etag
    # A restart with If-Match: * (RFC 9725 section 4.3.2) works too.
    resp, body = await patch(http, resource, trickle(secrets.token_hex(4), "x" * 24), "*")
    assert resp.status == 200, body
    assert resp.headers["ETag"] not in (etag, new_etag)

    # DELETE: 200 and gone at once (If-Match is ignored); then 404 for everything.
    async with http.delete(resource, headers={"If-Match": '"whatever"'}) as resp:
        assert resp.status == 200
    async with http.get(relay.http + "/api/v1/sessions") as resp:
        ids = [s["id"] for s in (await resp.json())["sessions"]]
    assert location.rsplit("/", 1)[1] not in ids
    gone = f"session {location.rsplit('/', 1)[1]} does not exist (already closed?)\n"
    async with http.delete(resource) as resp:
        assert (resp.status, await resp.text()) == (404, gone)
    resp, text = await patch(http, resource, frag, etag)
    assert (resp.status, text) == (404, gone)
    async with http.get(resource) as resp:
        assert resp.status == 404
    # The session URL is only valid under its own stream.
    other = relay.http + resp2.headers["Location"].replace("/live/test/", "/live/other/")
    async with http.delete(other) as resp:
        assert resp.status == 404
    async with http.delete(relay.http + resp2.headers["Location"]) as resp:
        assert resp.status == 200

    # The SRS-compatible route: the same resource behind /rtc/v1/whep/?...&session=.
    srs = relay.http + "/rtc/v1/whep/?app=live&stream=test"
    offer, remote_ufrag = make_offer()
    resp, answer = await post(http, srs, offer)
    assert resp.status == 201, answer
    srs_resource = relay.http + resp.headers["Location"]
    assert resp.headers["Location"].startswith("/rtc/v1/whep/?app=live&stream=test&session=")
    assert len(resp.headers.getall("Link")) == 2
    async with http.options(srs_resource) as resp_options:
        assert resp_options.headers["Accept-Patch"] == FRAG
    resp_patch, text = await patch(http, srs_resource, trickle(remote_ufrag), resp.headers["ETag"])
    assert resp_patch.status == 204, text
    async with http.delete(srs_resource) as resp:
        assert resp.status == 200
    async with http.delete(srs_resource) as resp:
        assert resp.status == 404

    # Methods the resources do not have: 405 with Allow.
    async with http.put(endpoint, data=b"x") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]


FIVE_VIDEO_ANSWER_PORTS = re.compile(r"^m=(video|audio) (\d+) ", re.M)


@pytest.mark.integration
async def test_bad_input_is_answered_and_viewer_keeps_playing(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish
) -> None:
    with relay_with(tmp_path, monkeypatch) as relay:
        publish(relay.rtmp_url("live/test"), size="320x240")
        await wait_live(relay, "live/test")
        endpoint = relay.http + "/whep/live/test"
        async with aiohttp.ClientSession() as http:
            live = LiveViewer(relay)
            await live.start(http)
            try:
                await _bad_input(http, relay, endpoint)
                await live.assert_playing()
            finally:
                await live.close()
        assert relay.proc.poll() is None


async def _bad_input(http: aiohttp.ClientSession, relay: RelayProcess, endpoint: str) -> None:
    # Stream not live: 409 with Retry-After (draft-ietf-wish-whep section 4.2).
    offer, _ = make_offer()
    resp, text = await post(http, relay.http + "/whep/live/nope", offer)
    assert resp.status == 409
    assert resp.headers["Retry-After"] == "2"
    assert text.startswith("stream live/nope is not live: publish to rtmp://")
    resp, text = await post(http, relay.http + "/rtc/v1/whep/?app=live&stream=nope", offer)
    assert resp.status == 409 and resp.headers["Retry-After"] == "2"

    # 415, 400, 413 on POST, each saying what to change.
    cases = [
        ({"Content-Type": "text/plain"}, "v=0\r\n", 415, "Content-Type must be application/sdp"),
        (SDP, "", 400, "body is not an SDP offer: the body is empty"),
        (SDP, "hello", 400, 'body is not an SDP offer: it must start with "v=0"'),
        (SDP, "v=0\r\n" + "a=x\r\n" * 40000, 413, "SDP offer too large: "),
    ]
    for headers, body, status, start in cases:
        resp, text = await post(http, endpoint, body, headers)
        assert resp.status == status, (status, text)
        assert text.startswith(start), text
    assert "http.max_body_size = 65536" in text

    # Only codecs we cannot send: 400 naming what we need.
    vp8, _ = make_offer(video_codec="VP8", audio=False)
    resp, text = await post(http, endpoint, vp8)
    assert (resp.status, text) == (
        400,
        "offer has no H.264 (packetization-mode=1) video and no Opus audio\n",
    )

    # Five video m-lines: the first is answered, the other four are rejected (port 0).
    five, _ = make_offer(videos=5)
    resp, answer = await post(http, endpoint, five)
    assert resp.status == 201, answer
    ports = FIVE_VIDEO_ANSWER_PORTS.findall(answer)
    assert [kind for kind, _ in ports] == ["video"] * 5 + ["audio"]
    assert [int(port) != 0 for _, port in ports] == [True, False, False, False, False, True]
    async with http.delete(relay.http + resp.headers["Location"]) as resp:
        assert resp.status == 200

    # PATCH and DELETE on a session that never existed.
    unknown = endpoint + "/0123456789abcdef"
    resp, text = await patch(http, unknown, "a=end-of-candidates\r\n", "*")
    assert (resp.status, text) == (
        404,
        "session 0123456789abcdef does not exist (already closed?)\n",
    )
    async with http.delete(unknown) as resp:
        assert resp.status == 404
    async with http.delete(relay.http + "/rtc/v1/whep/?app=live&stream=test") as resp:
        assert resp.status == 400
        assert await resp.text() == "query parameter session is required (use the Location URL)\n"

    # Malformed sdpfrag on a live session.
    offer, ufrag = make_offer()
    resp, _ = await post(http, endpoint, offer)
    resource, etag = relay.http + resp.headers["Location"], resp.headers["ETag"]
    for body, start in [
        ("", "the sdpfrag is empty"),
        ("v=0\r\ns=-\r\n", "sdpfrag line 1: a full SDP was sent"),
        ("a=ice-ufrag:x\r\n", "sdpfrag line 1: bad a=ice-ufrag 'x'"),
        ("garbage\r\n", "sdpfrag line 1: expected an a=, m= or c= line"),
    ]:
        resp, text = await patch(http, resource, body, etag)
        assert resp.status == 400, (body, text)
        assert text.startswith(start), text
    async with http.delete(resource) as resp:
        assert resp.status == 200

    # Huge or garbage headers: aiohttp answers 400 itself and the relay keeps serving.
    loop = asyncio.get_running_loop()
    probes = [
        b"POST /whep/live/test HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"POST /whep/live/test HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(300))
        + b"\r\n",
        b"POST /whep/live/test HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        bytes(range(256)) * 4,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200),
    ]
    for probe in probes:
        status = await loop.run_in_executor(None, raw_status, relay.http_port, probe)
        assert status == 400, (probe[:40], status)
    # The three header probes would each log a traceback from aiohttp: they are counted
    # instead. aiohttp answers the binary and TLS probes without logging.
    counters = await http_counters(http, relay)
    assert counters["malformed"] == 3
    assert not any("Traceback" in str(line) for line in relay.log_lines())
    async with http.head(endpoint) as resp:
        assert resp.status == 200


def raw_status(port: int, data: bytes) -> int:
    """Send raw bytes to the HTTP port; the status code of the answer (0 if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n" not in received:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", received)
    return int(match.group(1)) if match else 0


@pytest.mark.integration
async def test_viewer_limits_answer_503(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish
) -> None:
    rtc = "max_viewers = 2\nmax_viewers_per_stream = 1\ndtls_timeout = 60.0\n"
    with relay_with(tmp_path, monkeypatch, rtc=rtc) as relay:
        publish(relay.rtmp_url("live/a"), size="160x120")
        publish(relay.rtmp_url("live/b"), size="160x120")
        await wait_live(relay, "live/a")
        await wait_live(relay, "live/b")
        async with aiohttp.ClientSession() as http:
            url = relay.http + "/whep/live/{}"
            first, _ = await post(http, url.format("a"), make_offer()[0])
            assert first.status == 201
            resp, text = await post(http, url.format("a"), make_offer()[0])
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"
            assert text == (
                "stream live/a has its maximum of 1 viewers (rtc.max_viewers_per_stream); "
                "retry after 5 s\n"
            )
            resp, _ = await post(http, url.format("b"), make_offer()[0])
            assert resp.status == 201
            # Full: 503 even for a stream that is not live (the limit is checked first).
            for stream in ("b", "nope"):
                resp, text = await post(http, url.format(stream), make_offer()[0])
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "5"
                assert text == (
                    "the relay has its maximum of 2 viewers (rtc.max_viewers); retry after 5 s\n"
                )
            async with http.delete(relay.http + first.headers["Location"]) as resp:
                assert resp.status == 200
            resp, text = await post(http, url.format("a"), make_offer()[0])
            assert resp.status == 201, text
            assert (await http_counters(http, relay))["full"] == 3


@pytest.mark.integration
async def test_wait_for_publisher(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish
) -> None:
    wait = 6.0
    with relay_with(tmp_path, monkeypatch, whep_wait_for_publisher=str(wait)) as relay:
        async with aiohttp.ClientSession() as http:

            async def timed_post(stream: str) -> tuple[int, float, str]:
                started = time.monotonic()
                resp, text = await post(http, relay.http + f"/whep/live/{stream}", make_offer()[0])
                return resp.status, time.monotonic() - started, text

            late = asyncio.ensure_future(timed_post("late"))
            never = asyncio.ensure_future(timed_post("never"))
            await asyncio.sleep(0.3)
            publish(relay.rtmp_url("live/late"), size="160x120")
            status, elapsed, text = await late
            assert status == 201, text
            assert elapsed < wait
            status, elapsed, text = await never
            assert status == 409, text
            assert elapsed >= wait - 0.2


@pytest.mark.integration
async def test_bearer_token_auth(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish
) -> None:
    rtc = "dtls_timeout = 60.0\n"
    with relay_with(tmp_path, monkeypatch, rtc=rtc, whep_tokens="tok-1,right.token~2") as relay:
        publish(relay.rtmp_url("live/test"), size="160x120")
        await wait_live(relay, "live/test")
        endpoint = relay.http + "/whep/live/test"
        right = {"Authorization": "Bearer right.token~2"}
        async with aiohttp.ClientSession() as http:
            # Without a token, or with a wrong one: 401 with WWW-Authenticate: Bearer.
            for auth, challenge in [
                ({}, 'Bearer realm="srsrelay"'),
                ({"Authorization": "Basic dXNlcjpwYXNz"}, 'Bearer realm="srsrelay"'),
                ({"Authorization": "Bearer"}, 'Bearer realm="srsrelay"'),
                (
                    {"Authorization": "Bearer wrong"},
                    'Bearer realm="srsrelay", error="invalid_token"',
                ),
                (
                    {"Authorization": "Bearer right.token~"},
                    'Bearer realm="srsrelay", error="invalid_token"',
                ),
            ]:
                resp, text = await post(http, endpoint, make_offer()[0], {**SDP, **auth})
                assert resp.status == 401, text
                assert resp.headers["WWW-Authenticate"] == challenge
            async with http.head(endpoint) as resp:
                assert resp.status == 401
            # CORS preflight needs no token (the browser cannot send one).
            preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
            async with http.options(endpoint, headers=preflight) as resp:
                assert resp.status == 200
            # The right token (scheme case-insensitive, RFC 9110 section 11.1).
            resp, answer = await post(
                http, endpoint, make_offer()[0], {**SDP, "Authorization": "bearer tok-1"}
            )
            assert resp.status == 201, answer
            resource, etag = relay.http + resp.headers["Location"], resp.headers["ETag"]
            resp, text = await patch(http, resource, "a=end-of-candidates\r\n", etag)
            assert resp.status == 401
            async with http.patch(
                resource,
                data="a=end-of-candidates\r\n",
                headers={"Content-Type": FRAG, "If-Match": etag, **right},
            ) as resp:
                assert resp.status == 204
            async with http.delete(resource) as resp:
                assert resp.status == 401
            async with http.delete(resource, headers=right) as resp:
                assert resp.status == 200
            # An unknown session is 401 without a token: existence is not revealed.
            async with http.delete(endpoint + "/0123456789abcdef") as resp:
                assert resp.status == 401
            assert (await http_counters(http, relay))["unauthorized"] == 9
    # Auth off (the default): no token needed, and a sent one is ignored.
    monkeypatch.delenv("SRSRELAY_HTTP_WHEP_TOKENS")
    with relay_with(tmp_path, monkeypatch, rtc=rtc) as relay:
        publish(relay.rtmp_url("live/test"), size="160x120")
        await wait_live(relay, "live/test")
        async with aiohttp.ClientSession() as http:
            for headers in (SDP, {**SDP, "Authorization": "Bearer anything"}):
                resp, text = await post(
                    http, relay.http + "/whep/live/test", make_offer()[0], headers
                )
                assert resp.status == 201, text
                async with http.delete(relay.http + resp.headers["Location"]) as resp:
                    assert resp.status == 200


@pytest.mark.integration
async def test_post_flood_is_rate_limited_and_counted(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish
) -> None:
    with relay_with(tmp_path, monkeypatch) as relay:  # default: 20 per second, burst 40
        publish(relay.rtmp_url("live/test"), size="320x240")
        await wait_live(relay, "live/test")
        async with aiohttp.ClientSession() as http:
            live = LiveViewer(relay)
            await live.start(http)
            try:
                statuses, elapsed = await _flood(relay, 1000)
                limited = statuses.count(429)
                allowed = len(statuses) - limited
                # 39 tokens left after the viewer's POST, then 20 per second.
                assert allowed <= 40 + 20 * elapsed + 2, (allowed, elapsed)
                assert allowed >= 39
                assert set(statuses) == {409, 429}, set(statuses)
                counters = await http_counters(http, relay)
                assert counters["rate_limited"] == limited
                warnings = [
                    line
                    for line in relay.log_lines()
                    if line.get("event") == "whep requests rate limited"
                ]
                assert 1 <= len(warnings) <= elapsed + 2, (len(warnings), elapsed)
                assert sum(int(str(w["refused"])) for w in warnings) <= limited
                # Tokens come back: one POST after 0.1 s is served again.
                await asyncio.sleep(0.1)
                resp, text = await post(http, relay.http + "/whep/live/test", make_offer()[0])
                assert resp.status == 201, text
                await live.assert_playing()
            finally:
                await live.close()
        print(f"flood: {len(statuses)} POSTs in {elapsed:.2f} s, {limited} answered 429")


async def _flood(relay: RelayProcess, count: int) -> tuple[list[int], float]:
    offer = make_offer()[0]
    url = relay.http + "/whep/live/nope"
    statuses: list[int] = []
    retry_after: set[str] = set()
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> None:
            async with http.post(url, data=offer, headers=SDP) as resp:
                await resp.read()
                statuses.append(resp.status)
                if resp.status == 429:
                    retry_after.add(resp.headers["Retry-After"])

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        elapsed = time.monotonic() - started
    assert retry_after == {"1"}
    return statuses, elapsed
