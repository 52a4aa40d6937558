"""The JSON API: access modes, shapes, kicks, bad input, the OpenAPI document, and
(integration) what it and /metrics report about real publishers and viewers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from openapi_spec_validator import validate

from srsrelay.app import Relay
from srsrelay.config import ApiConfig, AudioConfig, HttpConfig, HubConfig, RtcConfig
from srsrelay.http.api import AccessPolicy, Api, is_local
from srsrelay.hub.registry import Hub
from srsrelay.webrtc.server import RtcServer
from tests.chromium import Chromium, chromium_path
from tests.conftest import RelayProcess, inproc_config, start_relay
from tests.raw_publisher import RawPublisher
from tests.test_metrics import parse, value
from tests.whep_client import WhepViewer

TOKEN = "s3cret-t0ken"


def relay_with(**sections: Any) -> Relay:
    return Relay(dataclasses.replace(inproc_config(), **sections))


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    r = relay_with()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def base(relay: Relay) -> str:
    return f"http://127.0.0.1:{relay.http_port}"


async def call(
    method: str, url: str, headers: dict[str, str] | None = None, data: Any = None
) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, headers=headers, data=data) as resp:
            text = await resp.text()
            body = json.loads(text) if resp.content_type == "application/json" else text
            return resp.status, dict(resp.headers), body


# -- access ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "local"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.7", False),
        ("::ffff:192.0.2.7", False),
        ("fd00::2", False),
        ("", False),
        (None, False),
        ("not-an-address", False),
    ],
)
def test_loopback_clients_are_local(remote: str | None, local: bool) -> None:
    assert is_local(remote) is local


def test_access_policy_messages() -> None:
    local = AccessPolicy(ApiConfig(access="local"))
    assert local.check("127.0.0.1", None) is None
    refused = local.check("192.0.2.7", f"Bearer {TOKEN}")
    assert refused is not None and refused.status == 403
    assert refused.message == (
        'the API answers only clients on this machine (api.access = "local") and 192.0.2.7 '
        'is not one; set api.access = "token" with api.tokens, or "open"'
    )

    token = AccessPolicy(ApiConfig(access="token", tokens=("other", TOKEN)))
    assert token.check("192.0.2.7", f"Bearer {TOKEN}") is None
    assert token.check("192.0.2.7", f"bearer  {TOKEN} ") is None
    missing = token.check("127.0.0.1", None)
    assert missing is not None and missing.status == 401
    assert missing.message == (
        'the API needs a bearer token (api.access = "token"): send '
        "Authorization: Bearer <one of api.tokens>"
    )
    assert missing.headers == {"WWW-Authenticate": 'Bearer realm="srsrelay"'}
    for header in (f"Basic {TOKEN}", "Bearer wrong", f"Bearer {TOKEN}x"):
        wrong = token.check("127.0.0.1", header)
        assert wrong is not None and wrong.status == 401, header
    assert wrong.message == "the bearer token is not one of api.tokens"
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="srsrelay", error="invalid_token"'

    assert AccessPolicy(ApiConfig(access="open")).check("192.0.2.7", None) is None


async def answer(app: web.Application, method: str, path: str, peer: str) -> web.Response:
    """Route one request from `peer` through the app's router, as aiohttp would."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default
    )
    request = make_mocked_request(method, path, app=app, transport=transport)
    match = await app.router.resolve(request)
    response = await match.handler(request)
    assert isinstance(response, web.Response)
    return response


async def test_local_access_refuses_other_machines_but_not_health() -> None:
    app = web.Application()
    api = Api(
        ApiConfig(access="local"), Hub(HubConfig(), AudioConfig(), 1200), RtcServer(RtcConfig())
    )
    api.add_routes(app.router)
    for path in ("/api/v1/streams", "/api/v1/clients", "/metrics", "/api/v1/openapi.json"):
        remote = await answer(app, "GET", path, "192.0.2.7")
        assert remote.status == 403, path
        assert json.loads(remote.text or "")["code"] == 403
        local = await answer(app, "GET", path, "127.0.0.1")
        assert local.status in (200, 404), path  # /metrics: 404 without a collector
    health = await answer(app, "GET", "/api/v1/health", "192.0.2.7")
    assert health.status == 200
    assert json.loads(health.text or "")["status"] == "ok"
    assert api.refused[403] == 4

    api.update(ApiConfig(access="open"))  # a config reload
    assert (await answer(app, "GET", "/api/v1/streams", "192.0.2.7")).status == 200


async def test_token_access_over_http() -> None:
    relay = relay_with(api=ApiConfig(access="token", tokens=(TOKEN,)))
    await relay.start()
    try:
        url = base(relay)
        status, headers, body = await call("GET", url + "/api/v1/streams")
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Bearer realm="srsrelay"'
        assert body["code"] == 401
        status, headers, _ = await call(
            "GET", url + "/api/v1/clients", {"Authorization": "Bearer nope"}
        )
        assert status == 401
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert await call("GET", url + "/api/v1/streams", auth) == (
            200,
            mock.ANY,
            {"code": 0, "streams": []},
        )
        status, _, body = await call("GET", url + "/api/v1/health")
        assert status == 200
        assert body["code"] == 0 and body["status"] == "ok" and body["server"] == "srsrelay"
        # CORS preflight carries no credentials: it is answered without them.
        status, headers, _ = await call("OPTIONS", url + "/api/v1/clients/abc")
        assert status == 204
        assert headers["Access-Control-Allow-Methods"] == "GET, DELETE, HEAD, OPTIONS"
    finally:
        await relay.stop()


# -- the OpenAPI document ------------------------------------------------------------


def concrete(path: str) -> str:
    return path.replace("{id}", "x%2Fy").replace("{app}", "x").replace("{name}", "y")


async def test_openapi_document_is_valid_and_lists_every_route(relay: Relay) -> None:
    status, _, doc = await call("GET", base(relay) + "/api/v1/openapi.json")
    assert status == 200
    validate(doc)
    assert doc["openapi"].startswith("3.")
    assert relay.http is not None
    registered = {
        r.canonical
        for r in relay.http.app.router.resources()
        if r.canonical.startswith("/api/v1") or r.canonical == "/metrics"
    }
    missing = registered - set(doc["paths"])
    assert not missing, f"routes not in the OpenAPI document (srsrelay/http/api.py): {missing}"
    assert set(doc["paths"]) <= registered
    # Every documented method is served (not 405) on every documented path.
    for path, item in doc["paths"].items():
        for method in item:
            status, _, _ = await call(method.upper(), base(relay) + concrete(path))
            assert status != 405, (method, path)


# -- bad input -----------------------------------------------------------------------


async def test_wrong_methods_and_bodies_get_json_errors(relay: Relay) -> None:
    url = base(relay)
    status, headers, body = await call("POST", url + "/api/v1/streams", data=b"{}")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD, OPTIONS"
    assert body == {
        "code": 405,
        "error": "POST is not allowed on /api/v1/streams; use GET, HEAD, OPTIONS",
    }
    status, _, body = await call("PUT", url + "/api/v1/clients/abc")
    assert (status, body["error"]) == (
        405,
        "PUT is not allowed on /api/v1/clients/abc; use GET, DELETE, HEAD, OPTIONS",
    )
    status, _, body = await call("GET", url + "/api/v1/clients", data=b"hello")
    assert (status, body["error"]) == (400, "GET /api/v1/clients takes no request body")

    kick = url + "/api/v1/clients/abc"
    status, _, body = await call("DELETE", kick, {"Content-Type": "text/plain"}, b"go away")
    assert (status, body["error"]) == (415, "the body must be application/json (got text/plain)")
    json_type = {"Content-Type": "application/json"}
    status, _, body = await call("DELETE", kick, json_type, b"{not json")
    assert status == 400 and body["error"].startswith("the body is not JSON: "), body
    status, _, body = await call("DELETE", kick, json_type, b'["a"]')
    assert (status, body["error"]) == (
        400,
        'the body must be a JSON object like {"reason": "spam"}',
    )
    status, _, body = await call("DELETE", kick, json_type, json.dumps({"reason": "x" * 201}))
    assert (status, body["error"]) == (400, '"reason" must be a string of 1-200 characters')
    status, _, body = await call("DELETE", kick, json_type, json.dumps({"reason": "spam"}))
    assert (status, body["error"]) == (
        404,
        "no client abc (already gone?); GET /api/v1/clients lists the connected ones",
    )
    big = json.dumps({"reason": "x" * (HttpConfig().max_body_size + 10)})
    status, _, body = await call("DELETE", kick, json_type, big)
    assert status == 413 and body["code"] == 413, body
    assert body["error"].endswith("(the limit is http.max_body_size)"), body


async def test_unknown_streams_and_clients_are_404_with_a_message(relay: Relay) -> None:
    url = base(relay)
    for path in ("/api/v1/streams/live%2Fnope", "/api/v1/streams/live/nope"):
        status, _, body = await call("GET", url + path)
        assert (status, body["error"]) == (
            404,
            "stream live/nope is not live (GET /api/v1/streams lists the live ones)",
        )
    status, _, body = await call("GET", url + "/api/v1/streams/justaname")
    assert (status, body["error"]) == (
        404,
        "no stream justaname: a stream id is app/name, e.g. /api/v1/streams/live%2Ftest or "
        "/api/v1/streams/live/test",
    )
    status, _, body = await call("GET", url + "/api/v1/clients/pub-00000000")
    assert status == 404 and body["code"] == 404


async def raw_http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_huge_headers_are_refused_not_crashed(relay: Relay) -> None:
    request = (
        b"GET /api/v1/streams HTTP/1.1\r\nHost: x\r\nX-Big: "
        + b"a" * 20_000
        + b"\r\nConnection: close\r\n\r\n"
    )
    answer = await raw_http(relay.http_port, request)
    assert answer.split(b" ", 2)[1].startswith(b"4"), answer[:100]
    # The server still answers.
    status, _, body = await call("GET", base(relay) + "/api/v1/health")
    assert status == 200


@pytest.mark.parametrize(
    "path",
    [
        "/static/../server.py",
        "/static/../../config.py",
        "/static/%2e%2e/server.py",
        "/static/%2E%2E/%2E%2E/config.py",
        "/static/..%2fserver.py",
        "/static/..%2F..%2Fconfig.py",
        "/static/%2e%2e%2fserver.py",
        "/static/..%5cserver.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/player.js/../../server.py",
    ],
)
async def test_static_files_do_not_escape_their_directory(relay: Relay, path: str) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    answer = await raw_http(relay.http_port, request)
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 403, 404), answer[:200]
    assert b"class HttpServer" not in answer and b"root:" not in answer
    assert b"def load_config" not in answer


async def test_static_player_is_served(relay: Relay) -> None:
    answer = await raw_http(
        relay.http_port, b"GET /static/player.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200")


# -- RTMP clients: list and kick -----------------------------------------------------


async def test_publisher_is_listed_and_kicked(relay: Relay) -> None:
    pub = await asyncio.to_thread(RawPublisher, relay.rtmp_port, "live", "raw")
    try:
        url = base(relay)
        status, _, body = await call("GET", url + "/api/v1/clients")
        assert status == 200
        assert body["server"] == "srsrelay"
        [client] = body["clients"]
        assert client["type"] == "rtmp-publish"
        assert client["publish"] is True
        assert client["stream"] == "live/raw"
        assert client["url"] == "/live/raw"
        assert client["ip"] == "127.0.0.1"
        assert client["peer"] == pub.peer
        assert client["vhost"] == "__defaultVhost__"
        assert client["id"].startswith("pub-")
        assert client["recv_bytes"] > 1536 * 2  # handshake and commands
        assert client["send_bytes"] > 1536 * 2
        assert client["alive"] >= 0
        assert client["kbps"]["recv_30s"] is not None

        status, _, one = await call("GET", url + f"/api/v1/clients/{client['id']}")
        assert status == 200 and one["client"]["id"] == client["id"]

        started = time.monotonic()
        status, _, kicked = await call("DELETE", url + f"/api/v1/clients/{client['id']}")
        assert status == 200
        assert kicked == {"code": 0, "kicked": client["id"], "type": "rtmp-publish"}
        # DELETE answers once the connection is gone (at most KICK_WAIT).
        assert time.monotonic() - started < 1.0
        status, _, body = await call("GET", url + "/api/v1/clients")
        assert body["clients"] == []
        assert await asyncio.to_thread(pub.closed_by_relay, 2.0)
        status, _, _ = await call("DELETE", url + f"/api/v1/clients/{client['id']}")
        assert status == 404
    finally:
        pub.close()


# -- integration: two streams, five viewers, kicks -------------------------------------


async def get_json(http: aiohttp.ClientSession, relay: RelayProcess, path: str) -> Any:
    async with http.get(relay.http + path) as resp:
        assert resp.status == 200, (path, await resp.text())
        return await resp.json()


async def metrics(http: aiohttp.ClientSession, relay: RelayProcess) -> Any:
    async with http.get(relay.http + "/metrics") as resp:
        assert resp.status == 200
        return parse(await resp.text())[1]


async def until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll the coroutine function `check` until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


@pytest.mark.integration
async def test_api_and_metrics_agree_with_what_runs(
    tmp_path: Path,
    publish: Callable[..., Any],
    http_session: aiohttp.ClientSession,
) -> None:
    # reconnect_grace = 0: a kicked publisher's stream ends at once, with its viewers.
    relay = start_relay(tmp_path, "[hub]\nreconnect_grace = 0.0\n")
    http = http_session
    viewers: list[WhepViewer] = []
    try:
        publish(relay.rtmp_url("live/a"), size="320x240")
        publish(relay.rtmp_url("live/b"), size="320x240")

        async def both_live() -> Any:
            streams = (await get_json(http, relay, "/api/v1/streams"))["streams"]
            return len([s for s in streams if s["video"] and s["audio"]]) == 2

        await until(both_live, "two live streams")
        for path in ["/whep/live/a"] * 3 + ["/whep/live/b"] * 2:
            viewer = WhepViewer(relay.http, path)
            viewers.append(viewer)
            await viewer.start(http)

        async def all_playing() -> bool:
            return all(len(v.result.video_pts) >= 10 for v in viewers)

        await until(all_playing, "five viewers decoding video")

        async def settled() -> Any:
            # Two keyframes (GOP 2 s) and a couple of rate samples.
            data = await get_json(http, relay, "/api/v1/streams")
            ready = all(s["gop"] is not None for s in data["streams"])
            return data if ready else None

        streams = {s["id"]: s for s in (await until(settled, "a GOP length"))["streams"]}
        assert set(streams) == {"live/a", "live/b"}
        a, b = streams["live/a"], streams["live/b"]
        assert (a["viewers"], b["viewers"]) == (3, 2)
        assert (a["clients"], b["clients"]) == (3, 2)
        for s in (a, b):
            assert s["state"] == "live" and s["publish"]["active"] is True
            assert s["gop"] == pytest.approx(2.0, abs=0.1), s
            assert 20 <= s["fps"] <= 40, s
            assert s["kbps"]["recv_10s"] > 10, s
            assert s["uptime"] > 0
            assert s["bframes"] == {"present": False, "policy": "drop"}
            video, audio = s["tracks"]["video"], s["tracks"]["audio"]
            assert (video["codec"], video["width"], video["height"]) == ("H264", 320, 240)
            assert video["keyframes"] >= 2
            assert (audio["codec"], audio["source"], audio["sample_rate"]) == ("opus", "AAC", 44100)
        by_id = await get_json(http, relay, "/api/v1/streams/live%2Fa")
        by_name = await get_json(http, relay, "/api/v1/streams/live/a")
        assert by_id["stream"]["id"] == by_name["stream"]["id"] == "live/a"

        clients = (await get_json(http, relay, "/api/v1/clients"))["clients"]
        publishers = [c for c in clients if c["type"] == "rtmp-publish"]
        players = [c for c in clients if c["type"] == "whep-play"]
        assert sorted(c["stream"] for c in publishers) == ["live/a", "live/b"]
        assert all(c["publish"] and c["recv_bytes"] > 10_000 for c in publishers)
        assert Counter(c["stream"] for c in players) == {"live/a": 3, "live/b": 2}
        for c in players:
            assert c["publish"] is False and c["state"] == "connected"
            assert c["ip"] == "127.0.0.1"
            assert c["send_bytes"] > 10_000 and c["kbps"]["send_30s"] > 0
            # What the viewer sent back: ICE checks, the DTLS handshake, receiver reports.
            assert c["recv_bytes"] > 1000 and c["kbps"]["recv_30s"] > 0
            media = c["send"]["kinds"]["media"]
            assert media["sent"] > 0 and media["attempted"] == media["sent"] + media["queued"] + (
                media["dropped_would_block"]
                + media["dropped_no_buffer"]
                + media["dropped_queue_full"]
                + media["dropped_closed"]
                + media["errors"]
            )
            assert c["congestion"]["state"] in ("ok", "congested", "recovering"), c
            assert "frames_dropped" in c["congestion"] and "plis" in c and "nacks" in c
        before = await metrics(http, relay)
        assert value(before, "srsrelay_viewers") == 5
        assert value(before, "srsrelay_streams") == 2
        assert value(before, "srsrelay_publishers") == 2
        assert value(before, "srsrelay_rtmp_connections") == 2
        assert value(before, "srsrelay_rtmp_received_bytes_total") > 20_000

        # Kick one viewer of live/a.
        victim = next(c for c in players if c["stream"] == "live/a")
        async with http.delete(relay.http + f"/api/v1/clients/{victim['id']}") as resp:
            assert resp.status == 200
            assert await resp.json() == {"code": 0, "kicked": victim["id"], "type": "whep-play"}
        async with http.get(relay.http + f"/api/v1/clients/{victim['id']}") as resp:
            assert resp.status == 404
        after_viewer = await metrics(http, relay)
        assert value(after_viewer, "srsrelay_viewers") == 4
        assert value(after_viewer, "srsrelay_viewer_sessions_closed_total", reason="kicked") == 1
        streams = {s["id"]: s for s in (await get_json(http, relay, "/api/v1/streams"))["streams"]}
        assert (streams["live/a"]["viewers"], streams["live/b"]["viewers"]) == (2, 2)
        sent = "srsrelay_send_datagrams_total"
        for kind in ("media", "rtcp"):
            # Counters include the closed viewer: they never go backwards.
            assert value(after_viewer, sent, kind=kind, outcome="sent") >= value(
                before, sent, kind=kind, outcome="sent"
            )
        assert value(after_viewer, "srsrelay_send_bytes_total", kind="media") > 0

        # Kick the publisher of live/b: its stream and both its viewers end.
        publisher = next(c for c in publishers if c["stream"] == "live/b")
        async with http.delete(relay.http + f"/api/v1/clients/{publisher['id']}") as resp:
            assert resp.status == 200
            assert (await resp.json())["type"] == "rtmp-publish"
        clients = (await get_json(http, relay, "/api/v1/clients"))["clients"]
        assert publisher["id"] not in {c["id"] for c in clients}

        async def b_gone() -> Any:
            data = await metrics(http, relay)
            return data if value(data, "srsrelay_viewers") == 2 else None

        final = await until(b_gone, "the viewers of live/b to close", timeout=3)
        assert value(final, "srsrelay_streams") == 1
        assert value(final, "srsrelay_publishers") == 1
        assert value(final, "srsrelay_viewer_sessions_closed_total", reason="kicked") == 1
        assert value(final, "srsrelay_viewer_sessions_closed_total", reason="stream_ended") == 2
        streams = (await get_json(http, relay, "/api/v1/streams"))["streams"]
        assert [(s["id"], s["viewers"]) for s in streams] == [("live/a", 2)]
    finally:
        for viewer in viewers:
            await viewer.close()
        code = relay.stop()
    assert code == 0, relay.log_path.read_text()[-3000:]


@pytest.mark.integration
@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed")
async def test_player_plays_when_the_api_is_locked(
    tmp_path: Path, publish: Callable[..., Any]
) -> None:
    relay = start_relay(tmp_path, f'[api]\naccess = "token"\ntokens = ["{TOKEN}"]\n')
    browser = Chromium()
    try:
        publish(relay.rtmp_url("live/test"), size="320x240")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=auth) as http:

            async def live() -> bool:
                data = await get_json(http, relay, "/api/v1/streams")
                return any(s["video"] for s in data["streams"])

            await until(live, "live/test to go live")
        await browser.start()
        await browser.navigate(f"{relay.http}/?stream=live/test")

        async def playing() -> bool:
            player = "window.srsrelayPlayer"
            status = await browser.evaluate(f"{player} && {player}.state.status")
            return bool(status == "playing")

        await until(playing, "the player to play")
        await browser.evaluate("window.firstPc = window.srsrelayPlayer.pc; true")
        # Several refreshes of the (refused) stream list later it still plays, on the same
        # peer connection (a retry would have made a new one).
        await asyncio.sleep(5)
        state = await browser.evaluate(
            "({status: window.srsrelayPlayer.state.status,"
            " samePc: window.srsrelayPlayer.pc === window.firstPc,"
            " text: document.getElementById('streams').innerText})"
        )
    finally:
        await browser.close()
        code = relay.stop()
    assert state["status"] == "playing", (state, browser.console)
    assert state["samePc"] is True, state
    assert "not public on this relay (API answered 401)" in state["text"], state
    assert code == 0
