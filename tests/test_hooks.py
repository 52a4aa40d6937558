"""HookClient and publish keys: judging answers, fail_open, timeouts, bounded notifications,
against a real aiohttp hook server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from srsrelay.config import AuthConfig, HooksConfig
from srsrelay.hooks import (
    MAX_RESPONSE_BYTES,
    HookClient,
    PublishAuth,
    decide,
    hook_param,
    judge,
    publish_key,
    request_body,
)
from tests.conftest import free_port

BODY = request_body(
    client_id="pub-0123abcd", ip="127.0.0.1", app="live", stream="test", param="key=k&x=y"
)


# -- pure parts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, b"", "allowed"),
        (204, b"", "allowed"),
        (200, b" 0\n", "allowed"),
        (200, b'{"code": 0}', "allowed"),
        (200, b'{"code": "0", "msg": "ok"}', "allowed"),
        (200, b'{"ok": true}', "allowed"),
        (200, b'"fine"', "allowed"),
        (200, b"null", "allowed"),
        (200, b'{"code": false}', "refused"),
        (200, b'{"code": null}', "refused"),
        (200, b"[]", "allowed"),
        (200, b'{"code": 403}', "refused"),
        (200, b"1", "refused"),
        (200, b"true", "allowed"),
        (200, b"-1.5", "refused"),
        (201, b"not json", "garbage"),
        (200, b"\xff\xfe", "garbage"),
        (200, b" " * (MAX_RESPONSE_BYTES + 1), "garbage"),
        (403, b"", "refused"),
        (404, b"nope", "refused"),
        (500, b"", "error"),
        (502, b'{"code": 0}', "error"),
        (302, b"", "error"),
    ],
)
def test_judge(status: int, body: bytes, outcome: str) -> None:
    assert judge(status, body) == outcome


def test_decide_follows_fail_open_only_for_broken_hooks() -> None:
    assert decide("allowed", False) and decide("allowed", True)
    assert not decide("refused", False) and not decide("refused", True)
    for outcome in ("timeout", "error", "garbage"):
        assert not decide(outcome, False)
        assert decide(outcome, True)


def test_request_body_and_param() -> None:
    assert BODY == {
        "client_id": "pub-0123abcd",
        "ip": "127.0.0.1",
        "app": "live",
        "stream": "test",
        "param": "?key=k&x=y",
        "token": "",
    }
    assert hook_param("") == ""
    assert hook_param("?a=1") == "?a=1"


def test_publish_key() -> None:
    assert publish_key("key=abc&x=y") == "abc"
    assert publish_key("x=y&key=abc") == "abc"
    assert publish_key("x=y") == ""
    assert publish_key("") == ""
    assert publish_key("key=") == ""
    assert publish_key("key=a%2Bb") == "a+b"


def test_publish_auth() -> None:
    auth = PublishAuth(AuthConfig())
    assert auth.check("") is None, "no keys configured: everyone may publish"
    auth.update(AuthConfig(publish_keys=("one", "two")))
    assert auth.check("key=two&x=1") is None
    assert auth.check("key=one") is None
    assert auth.check("key=three") == "wrong ?key= (not one of auth.publish_keys)"
    assert auth.check("x=1") == (
        "missing ?key= (auth.publish_keys): publish to <app>/<stream>?key=<key>"
    )
    assert auth.check("key=") == (
        "missing ?key= (auth.publish_keys): publish to <app>/<stream>?key=<key>"
    )
    auth.update(AuthConfig(publish_keys=("three",)))
    assert auth.check("key=one") is not None, "a reload replaces the keys"
    assert auth.check("key=three") is None


# -- against a hook server -----------------------------------------------------------

Behaviour = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]


@dataclass
class HookServer:
    url: str
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """(path, JSON body) of every request, in arrival order."""
    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    """path -> how to answer; the default answers 200 with an empty body."""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


async def _ok(body: dict[str, Any]) -> web.StreamResponse:
    return web.Response(status=200)


@contextlib.asynccontextmanager
async def running_hook_server(port: int | None = None) -> AsyncIterator[HookServer]:
    """A hook server on 127.0.0.1 that records every POST and answers per `behaviour`."""
    port = port or free_port()
    server = HookServer(f"http://127.0.0.1:{port}")

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        server.received.append((request.path, body))
        server.arrived.set()
        return await server.behaviour.get(request.path, _ok)(body)

    app = web.Application()
    app.router.add_post("/{name}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def hook_server() -> AsyncIterator[HookServer]:
    async with running_hook_server() as server:
        yield server


def answer(status: int, text: str = "") -> Behaviour:
    async def respond(body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=status, text=text)

    return respond


def slow(seconds: float) -> Behaviour:
    async def respond(body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=200)

    return respond


def config(url: str, **overrides: Any) -> HooksConfig:
    settings: dict[str, Any] = {
        "on_publish": f"{url}/publish",
        "on_unpublish": f"{url}/unpublish",
        "on_play": f"{url}/play",
        "on_stop": f"{url}/stop",
        "timeout": 0.5,
        **overrides,
    }
    return HooksConfig(**settings)


@pytest.fixture
async def client(hook_server: HookServer) -> AsyncIterator[HookClient]:
    hooks = HookClient(config(hook_server.url))
    await hooks.start()
    yield hooks
    await hooks.stop()


async def test_allowed_posts_the_body_with_its_action(
    client: HookClient, hook_server: HookServer
) -> None:
    assert await client.call("on_publish", BODY) is True
    assert hook_server.received == [("/publish", {"action": "on_publish", **BODY})]
    assert client.results == {("on_publish", "allowed"): 1}


@pytest.mark.parametrize(
    ("status", "text", "reason"),
    [
        (403, "go away", "refused by the on_play hook (HTTP 403)"),
        (
            200,
            '{"code": 1, "msg": "banned"}',
            """refused by the on_play hook (HTTP 200, '{"code": 1, "msg": "banned"}')""",
        ),
    ],
)
async def test_refused(
    client: HookClient, hook_server: HookServer, status: int, text: str, reason: str
) -> None:
    hook_server.behaviour["/play"] = answer(status, text)
    with capture_logs() as logs:
        assert await client.check("on_play", BODY) == (False, reason)
    assert client.results == {("on_play", "refused"): 1}
    assert [e["event"] for e in logs] == ["hook refused"]
    assert logs[0]["reason"] == reason and logs[0]["stream"] == "test"


async def test_refusal_log_is_throttled_per_hook(
    client: HookClient, hook_server: HookServer
) -> None:
    hook_server.behaviour["/play"] = answer(403)
    hook_server.behaviour["/publish"] = answer(403)
    with capture_logs() as logs:
        for _ in range(5):
            assert await client.call("on_play", BODY) is False
        assert await client.call("on_publish", BODY) is False
    assert [e["hook"] for e in logs] == ["on_play", "on_publish"]
    assert client.results[("on_play", "refused")] == 5


async def test_slow_hook_times_out(client: HookClient, hook_server: HookServer) -> None:
    hook_server.behaviour["/play"] = slow(2.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    allowed, reason = await client.check("on_play", BODY)
    assert loop.time() - started < 1.0
    assert not allowed
    assert reason == (
        "the on_play hook failed (no answer within hooks.timeout = 0.5 s); "
        "refused as hooks.fail_open = false"
    )
    assert client.results == {("on_play", "timeout"): 1}
    client.update(config(hook_server.url, fail_open=True))
    assert await client.check("on_play", BODY) == (True, "")
    assert client.results == {("on_play", "timeout"): 2}


async def test_garbage_answer(client: HookClient, hook_server: HookServer) -> None:
    hook_server.behaviour["/publish"] = answer(200, "<html>hello</html>")
    allowed, reason = await client.check("on_publish", BODY)
    assert not allowed
    assert reason == (
        "the on_publish hook failed (HTTP 200 with a body that is not JSON: "
        "'<html>hello</html>'); refused as hooks.fail_open = false"
    )
    client.update(config(hook_server.url, fail_open=True))
    assert await client.call("on_publish", BODY) is True
    assert client.results == {("on_publish", "garbage"): 2}


async def test_server_error_is_a_failure_not_a_refusal(
    client: HookClient, hook_server: HookServer
) -> None:
    hook_server.behaviour["/publish"] = answer(503)
    assert await client.call("on_publish", BODY) is False
    client.update(config(hook_server.url, fail_open=True))
    assert await client.call("on_publish", BODY) is True
    assert client.results == {("on_publish", "error"): 2}


async def test_hook_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    hooks = HookClient(config(url))
    await hooks.start()
    try:
        allowed, reason = await hooks.check("on_publish", BODY)
        assert not allowed
        assert reason.startswith("the on_publish hook failed (cannot reach it: ")
        assert reason.endswith("; refused as hooks.fail_open = false")
        hooks.update(config(url, fail_open=True))
        assert await hooks.call("on_publish", BODY) is True
        assert hooks.results == {("on_publish", "error"): 2}
    finally:
        await hooks.stop()


async def test_no_url_allows_without_calling(hook_server: HookServer) -> None:
    hooks = HookClient(HooksConfig())
    await hooks.start()
    try:
        assert await hooks.call("on_publish", BODY) is True
        assert await hooks.call("on_play", BODY) is True
        hooks.notify("on_stop", BODY)
        assert hooks.pending == 0
        assert not hooks.results
        # A reload that sets a URL takes effect for the next call.
        hooks.update(config(hook_server.url))
        assert await hooks.call("on_play", BODY) is True
        assert [path for path, _ in hook_server.received] == ["/play"]
    finally:
        await hooks.stop()


async def test_wrong_hook_kind_is_an_error(client: HookClient) -> None:
    with pytest.raises(ValueError, match="^on_stop is not one of on_publish, on_play$"):
        await client.call("on_stop", BODY)
    with pytest.raises(ValueError, match="^on_play is not one of on_unpublish, on_stop$"):
        client.notify("on_play", BODY)


async def test_not_started_counts_as_error(hook_server: HookServer) -> None:
    hooks = HookClient(config(hook_server.url))
    assert await hooks.check("on_play", BODY) == (
        False,
        "the on_play hook failed (the hook client is not running); "
        "refused as hooks.fail_open = false",
    )
    assert hook_server.received == []


async def test_notifications_are_sent_in_the_background(
    client: HookClient, hook_server: HookServer
) -> None:
    client.notify("on_stop", {**BODY, "reason": "viewer sent DELETE"})
    client.notify("on_unpublish", {**BODY, "reason": "FCUnpublish"})
    assert client.pending == 2
    async with asyncio.timeout(5):
        while client.pending:
            await asyncio.sleep(0.01)
    assert sorted(hook_server.received, key=lambda r: r[0]) == [
        ("/stop", {"action": "on_stop", **BODY, "reason": "viewer sent DELETE"}),
        ("/unpublish", {"action": "on_unpublish", **BODY, "reason": "FCUnpublish"}),
    ]
    assert client.results == {("on_stop", "allowed"): 1, ("on_unpublish", "allowed"): 1}


async def test_notifications_in_flight_are_bounded(hook_server: HookServer) -> None:
    hook_server.behaviour["/stop"] = slow(5.0)
    hooks = HookClient(config(hook_server.url, timeout=0.3), max_pending=2)
    await hooks.start()
    with capture_logs() as logs:
        for _ in range(5):
            hooks.notify("on_stop", BODY)
    assert hooks.pending == 2
    assert hooks.notify_dropped == {"on_stop": 3}
    assert [e["event"] for e in logs] == ["hook notification dropped"], "logged once"
    loop = asyncio.get_running_loop()
    started = loop.time()
    await hooks.stop()
    # stop() waits at most hooks.timeout; the calls themselves time out after it too.
    assert loop.time() - started < 1.0
    assert hooks.pending == 0
    assert hooks.results[("on_stop", "timeout")] + hooks.results[("on_stop", "allowed")] <= 2


async def test_stop_cancels_what_is_left(hook_server: HookServer) -> None:
    hook_server.behaviour["/unpublish"] = slow(5.0)
    hooks = HookClient(config(hook_server.url, timeout=2.0))
    await hooks.start()
    hooks.notify("on_unpublish", BODY)
    await hook_server.arrived.wait()
    # A reload shortening the timeout bounds the stop too.
    hooks.update(config(hook_server.url, timeout=0.2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await hooks.stop()
    assert loop.time() - started < 1.0
    assert hooks.pending == 0
    assert json.loads(json.dumps(hook_server.received[0][1]))["action"] == "on_unpublish"
