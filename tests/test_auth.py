"""Publish and play authorization: auth.publish_keys and the on_publish / on_play hooks,
with their on_unpublish / on_stop notifications.

The RTMP side is checked in-process with a raw RTMP client (exact onStatus answers, media
held while a hook is asked); the whole relay with real ffmpeg publishers and aiortc viewers
against a hook server running in the test."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from srsrelay.config import AuthConfig, HooksConfig
from srsrelay.hooks import HookClient, PublishAuth
from srsrelay.rtmp.server import RtmpServer
from tests.conftest import (
    Publisher,
    RelayProcess,
    ffmpeg_publish_args,
    free_port,
    start_relay,
    wait_live,
)
from tests.test_hooks import HookServer, answer, running_hook_server, slow
from tests.test_rtmp_server import RawClient, RecordingHub, make_config, status_code, wait_for
from tests.test_whep import make_offer
from tests.whep_client import WhepViewer

AVC_HEADER = b"\x17\x00\x00\x00\x00\x01"
AVC_FRAME = b"\x27\x01\x00\x00\x00\x00\x00\x00\x01\x41"


def description(reply: list[Any]) -> str:
    info = reply[3]
    assert isinstance(info, dict)
    return str(info["description"])


@pytest.fixture
def hub() -> RecordingHub:
    return RecordingHub()


@pytest.fixture
async def hook_server() -> AsyncIterator[HookServer]:
    async with running_hook_server() as server:
        yield server


async def rtmp_server(
    hub: RecordingHub, *, keys: tuple[str, ...] = (), hooks: HookClient | None = None
) -> RtmpServer:
    auth = PublishAuth(AuthConfig(publish_keys=keys))
    server = RtmpServer(make_config(), hub, auth=auth, hooks=hooks)  # type: ignore[arg-type]
    await server.start()
    return server


def hooks_config(url: str, **overrides: Any) -> HooksConfig:
    settings: dict[str, Any] = {
        "on_publish": f"{url}/publish",
        "on_unpublish": f"{url}/unpublish",
        "timeout": 1.0,
        **overrides,
    }
    return HooksConfig(**settings)


# -- RTMP, in-process ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("test", "missing ?key= (auth.publish_keys): publish to <app>/<stream>?key=<key>"),
        ("test?key=", "missing ?key= (auth.publish_keys): publish to <app>/<stream>?key=<key>"),
        ("test?x=1&key=s3cre", "wrong ?key= (not one of auth.publish_keys)"),
    ],
)
async def test_publish_key_refused(hub: RecordingHub, name: str, reason: str) -> None:
    server = await rtmp_server(hub, keys=("s3cret", "other"))
    try:
        client = await RawClient.open(server.port)
        reply = await client.publish(name)
        assert status_code(reply) == "NetStream.Publish.Unauthorized"
        assert description(reply) == f"publish of live/test refused: {reason}"
        await client.wait_closed()
        assert hub.streams == []
    finally:
        await server.stop()


async def test_publish_key_accepted_and_stripped_from_the_name(hub: RecordingHub) -> None:
    server = await rtmp_server(hub, keys=("s3cret", "other"))
    try:
        client = await RawClient.open(server.port)
        assert status_code(await client.publish("cam?x=1&key=other")) == "NetStream.Publish.Start"
        await client.send_video(0, AVC_HEADER)
        await wait_for(lambda: bool(hub.streams and hub.streams[0].video), hub)
        assert hub.streams[0].key == "live/cam"
        # A reload takes the key away: the live publish goes on, a new one is refused.
        server.auth.update(AuthConfig(publish_keys=("s3cret",)))
        other = await RawClient.open(server.port)
        assert status_code(await other.publish("cam2?key=other")) == (
            "NetStream.Publish.Unauthorized"
        )
        await other.wait_closed()
        await client.send_video(33, AVC_FRAME)
        await wait_for(lambda: len(hub.streams[0].video) == 2, hub)
        client.w.close()
    finally:
        await server.stop()


async def test_on_publish_refused(hub: RecordingHub, hook_server: HookServer) -> None:
    hook_server.behaviour["/publish"] = answer(403, "no")
    hooks = HookClient(hooks_config(hook_server.url))
    await hooks.start()
    server = await rtmp_server(hub, hooks=hooks)
    try:
        client = await RawClient.open(server.port)
        reply = await client.publish("cam?token=abc")
        assert status_code(reply) == "NetStream.Publish.Unauthorized"
        assert description(reply) == (
            "publish of live/cam refused: refused by the on_publish hook (HTTP 403)"
        )
        await client.wait_closed()
        await server.stop()
        await hooks.stop()
        assert hub.streams == []
        ((path, body),) = hook_server.received  # no on_unpublish for a refused publish
        assert path == "/publish"
        assert body["action"] == "on_publish"
        assert body["app"] == "live" and body["stream"] == "cam"
        assert body["param"] == "?token=abc" and body["token"] == ""
        assert body["ip"] == "127.0.0.1" and body["client_id"].startswith("pub-")
    finally:
        await server.stop()
        await hooks.stop()


async def test_on_publish_checked_after_the_key(hub: RecordingHub, hook_server: HookServer) -> None:
    hooks = HookClient(hooks_config(hook_server.url))
    await hooks.start()
    server = await rtmp_server(hub, keys=("k1",), hooks=hooks)
    try:
        client = await RawClient.open(server.port)
        assert status_code(await client.publish("cam?key=k2")) == "NetStream.Publish.Unauthorized"
        await client.wait_closed()
        assert hook_server.received == [], "a wrong key is refused before the hook is asked"
    finally:
        await server.stop()
        await hooks.stop()


async def test_media_waits_for_the_hook_then_flows(
    hub: RecordingHub, hook_server: HookServer
) -> None:
    seen_while_asked: list[int] = []

    async def allow_late(body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(0.3)  # the media below has reached the relay by now
        seen_while_asked.append(len(hub.streams))
        return web.Response(status=200)

    hook_server.behaviour["/publish"] = allow_late
    hooks = HookClient(hooks_config(hook_server.url))
    await hooks.start()
    server = await rtmp_server(hub, hooks=hooks)
    try:
        client = await RawClient.open(server.port)
        await client.handshake()
        await client.command("connect", 1.0, {"app": "live", "tcUrl": "rtmp://x/live"})
        await client.command("createStream", 2.0, None)
        # publish and media at once, as OBS and ffmpeg do: before any answer.
        await client.command("publish", 3.0, None, "cam?key=abc", "live", stream_id=1)
        await client.send_video(0, AVC_HEADER)
        await client.send_video(33, AVC_FRAME)
        assert (await client.next_command())[0] == "_result"
        assert (await client.next_command())[:2] == ["_result", 2.0]
        assert seen_while_asked == [0], "nothing is published while the hook is asked"
        assert status_code(await client.next_command()) == "NetStream.Publish.Start"
        await wait_for(lambda: bool(hub.streams and len(hub.streams[0].video) == 2), hub)
        assert [ts for ts, _ in hub.streams[0].video] == [0, 33]
        ((_, body),) = hook_server.received
        assert body["token"] == "abc" and body["param"] == "?key=abc"
        assert body["client_id"] == hub.publisher_ids[0]

        # on_unpublish when the publish ends, once, with the same client_id.
        await client.command("FCUnpublish", 4.0, None, "cam")
        await client.command("deleteStream", 5.0, None, 1.0)
        client.w.close()
        async with asyncio.timeout(5):
            while len(hook_server.received) < 2:
                await asyncio.sleep(0.01)
        await server.stop()
        await hooks.stop()
        paths = [path for path, _ in hook_server.received]
        assert paths == ["/publish", "/unpublish"]
        unpublish = hook_server.received[1][1]
        assert unpublish == {**body, "action": "on_unpublish", "reason": unpublish["reason"]}
        assert unpublish["reason"] in ("FCUnpublish", "deleteStream")
    finally:
        await server.stop()
        await hooks.stop()


async def test_media_sent_while_refused_is_dropped(
    hub: RecordingHub, hook_server: HookServer
) -> None:
    async def refuse_late(body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.Response(status=401)

    hook_server.behaviour["/publish"] = refuse_late
    hooks = HookClient(hooks_config(hook_server.url))
    await hooks.start()
    server = await rtmp_server(hub, hooks=hooks)
    try:
        client = await RawClient.open(server.port)
        await client.handshake()
        await client.command("connect", 1.0, {"app": "live", "tcUrl": "rtmp://x/live"})
        await client.command("createStream", 2.0, None)
        await client.command("publish", 3.0, None, "cam", "live", stream_id=1)
        for ts in range(0, 300, 33):
            await client.send_video(ts, AVC_HEADER if ts == 0 else AVC_FRAME)
        await client.next_command()
        await client.next_command()
        assert status_code(await client.next_command()) == "NetStream.Publish.Unauthorized"
        await client.wait_closed()
        assert hub.streams == []
        assert server.connection_count == 0
    finally:
        await server.stop()
        await hooks.stop()


async def test_slow_on_publish_fail_closed_and_open(
    hub: RecordingHub, hook_server: HookServer
) -> None:
    hook_server.behaviour["/publish"] = slow(3.0)
    hooks = HookClient(hooks_config(hook_server.url, timeout=0.3))
    await hooks.start()
    server = await rtmp_server(hub, hooks=hooks)
    try:
        client = await RawClient.open(server.port)
        reply = await client.publish("cam")
        assert status_code(reply) == "NetStream.Publish.Unauthorized"
        assert description(reply) == (
            "publish of live/cam refused: the on_publish hook failed (no answer within "
            "hooks.timeout = 0.3 s); refused as hooks.fail_open = false"
        )
        await client.wait_closed()
        hooks.update(hooks_config(hook_server.url, timeout=0.3, fail_open=True))
        other = await RawClient.open(server.port)
        assert status_code(await other.publish("cam")) == "NetStream.Publish.Start"
        assert [s.key for s in hub.streams] == ["live/cam"]
        other.w.close()
    finally:
        await server.stop()
        await hooks.stop()


async def test_a_waiting_publisher_does_not_stall_others(
    hub: RecordingHub, hook_server: HookServer
) -> None:
    async def by_stream(body: dict[str, Any]) -> web.StreamResponse:
        if body["stream"] == "slow":
            await asyncio.sleep(2.0)
        return web.Response(status=200)

    hook_server.behaviour["/publish"] = by_stream
    hooks = HookClient(hooks_config(hook_server.url, timeout=5.0))
    await hooks.start()
    server = await rtmp_server(hub, hooks=hooks)
    try:
        waiting = await RawClient.open(server.port)
        waiting_reply = asyncio.create_task(waiting.publish("slow"))
        await hook_server.arrived.wait()
        started = time.monotonic()
        fast = await RawClient.open(server.port)
        assert status_code(await fast.publish("fast")) == "NetStream.Publish.Start"
        assert time.monotonic() - started < 1.0
        assert not waiting_reply.done()
        # Shutdown while a hook is asked: the session ends without waiting for it.
        await server.stop()
        waiting_reply.cancel()
        await asyncio.gather(waiting_reply, return_exceptions=True)
        assert [s.key for s in hub.streams] == ["live/fast"]
    finally:
        await server.stop()
        await hooks.stop()


# -- the whole relay -----------------------------------------------------------------

integration = pytest.mark.integration


def start_publisher(url: str, log_path: Path) -> Publisher:
    args = ffmpeg_publish_args(url, size="320x240")
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=log_path.open("wb"), stderr=subprocess.STDOUT
    )
    return Publisher(proc, log_path, args)


async def refused_publisher(url: str, log_path: Path) -> str:
    """Publish to `url`, expecting a refusal; returns ffmpeg's output. Waits without
    blocking the event loop: the hook server runs on it."""
    pub = start_publisher(url, log_path)
    deadline = time.monotonic() + 10
    while pub.proc.poll() is None:
        if time.monotonic() > deadline:
            pub.stop()
            raise AssertionError(f"publish to {url} was not refused: {read_text(log_path)}")
        await asyncio.sleep(0.05)
    assert pub.proc.returncode != 0
    return read_text(log_path)


def read_text(path: Path) -> str:
    return path.read_text(errors="replace")


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    started: list[Publisher] = []
    yield started
    for pub in started:
        pub.stop()


def relay_log(relay: RelayProcess, event: str) -> list[dict[str, object]]:
    return [line for line in relay.log_lines() if line.get("event") == event]


async def wait_log(
    relay: RelayProcess, event: str, count: int = 1, timeout: float = 5.0
) -> list[dict[str, object]]:
    """The relay's log lines of `event` once there are `count` (it writes them async)."""
    deadline = time.monotonic() + timeout
    while len(lines := relay_log(relay, event)) < count:
        assert time.monotonic() < deadline, f"no {count} {event!r} lines in the relay log"
        await asyncio.sleep(0.1)
    return lines


async def wait_received(server: HookServer, count: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while len(server.received) < count:
            server.arrived.clear()
            await server.arrived.wait()


async def whep_post(
    http: aiohttp.ClientSession, relay: RelayProcess, path: str, token: str | None = None
) -> tuple[int, str, str | None]:
    offer, _ = make_offer()
    headers = {"Content-Type": "application/sdp"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with http.post(relay.http + path, data=offer, headers=headers) as resp:
        return resp.status, await resp.text(), resp.headers.get("Location")


async def frames_grow(viewer: WhepViewer, timeout: float = 5.0) -> None:
    before = len(viewer.result.video_pts)
    deadline = time.monotonic() + timeout
    while len(viewer.result.video_pts) < before + 10:
        assert time.monotonic() < deadline, "the playing viewer stopped receiving video"
        await asyncio.sleep(0.1)


@integration
async def test_publish_keys_end_to_end(tmp_path: Path, publishers: list[Publisher]) -> None:
    relay = start_relay(tmp_path, '[auth]\npublish_keys = ["s3cret"]\n')
    try:
        good = start_publisher(relay.rtmp_url("live/cam?key=s3cret"), tmp_path / "good.log")
        publishers.append(good)
        stream = await wait_live(relay, "live/cam")
        assert stream["name"] == "cam", "the key is not part of the stream name"
        async with aiohttp.ClientSession() as http:
            viewer = WhepViewer(relay.http, "/whep/live/cam")
            await viewer.start(http)
            try:
                await frames_grow(viewer, timeout=10)
                output = await refused_publisher(
                    relay.rtmp_url("live/other?key=guess"), tmp_path / "wrong.log"
                )
                assert (
                    "publish of live/other refused: wrong ?key= (not one of auth.publish_keys)"
                    in output
                )
                output = await refused_publisher(
                    relay.rtmp_url("live/other"), tmp_path / "none.log"
                )
                assert "publish of live/other refused: missing ?key= (auth.publish_keys)" in output
                await frames_grow(viewer)
            finally:
                await viewer.close()
        refusals = relay_log(relay, "rtmp publish refused")
        assert [r["stream"] for r in refusals] == ["live/other", "live/other"]
        assert good.proc.poll() is None
    finally:
        assert relay.stop() == 0


@integration
async def test_hooks_end_to_end(tmp_path: Path, publishers: list[Publisher]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async def on_publish(body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=403 if body["stream"] == "denied" else 200)

    async def on_play(body: dict[str, Any]) -> web.StreamResponse:
        token = body["token"]
        if token == "slow":
            await asyncio.sleep(3.0)
        if token == "junk":
            return web.Response(status=200, text="<html>")
        if token == "deny":
            return web.json_response({"code": 1})
        return web.json_response({"code": 0})

    extra = f"""
[hub]
reconnect_grace = 0.0

[hooks]
on_publish = "{url}/publish"
on_unpublish = "{url}/unpublish"
on_play = "{url}/play"
on_stop = "{url}/stop"
timeout = 0.5
"""
    relay = start_relay(tmp_path, extra)
    try:
        async with running_hook_server(port) as hooks, aiohttp.ClientSession() as http:
            hooks.behaviour.update({"/publish": on_publish, "/play": on_play})
            pub = start_publisher(relay.rtmp_url("live/cam?key=abc&x=1"), tmp_path / "pub.log")
            publishers.append(pub)
            stream = await wait_live(relay, "live/cam")
            publish_id = stream["publish"]["cid"]  # type: ignore[index]
            assert hooks.received == [
                (
                    "/publish",
                    {
                        "action": "on_publish",
                        "client_id": publish_id,
                        "ip": "127.0.0.1",
                        "app": "live",
                        "stream": "cam",
                        "param": "?key=abc&x=1",
                        "token": "abc",
                    },
                )
            ]
            output = await refused_publisher(relay.rtmp_url("live/denied"), tmp_path / "denied.log")
            assert "publish of live/denied refused: refused by the on_publish hook" in output

            viewer = WhepViewer(relay.http, "/whep/live/cam")
            await viewer.start(http)
            try:
                await frames_grow(viewer, timeout=10)
                assert viewer.result.location is not None
                viewer_id = viewer.result.location.rsplit("/", 1)[1]

                # Allowed, with a token and a query: both reach the hook.
                hooks.received.clear()
                status, _, location = await whep_post(http, relay, "/whep/live/cam?a=b", "tok")
                assert status == 201 and location is not None
                session_id = location.rsplit("/", 1)[1]
                assert hooks.received == [
                    (
                        "/play",
                        {
                            "action": "on_play",
                            "client_id": session_id,
                            "ip": "127.0.0.1",
                            "app": "live",
                            "stream": "cam",
                            "param": "?a=b",
                            "token": "tok",
                        },
                    )
                ]
                async with http.delete(relay.http + location) as resp:
                    assert resp.status == 200
                await wait_received(hooks, 2)
                assert hooks.received[1] == (
                    "/stop",
                    {**hooks.received[0][1], "action": "on_stop", "reason": "viewer sent DELETE"},
                )

                # Refused, failing and garbage answers: 403 naming why; no session is left.
                cases = {
                    "deny": "refused by the on_play hook (HTTP 200, '{\"code\": 1}')",
                    "slow": "the on_play hook failed (no answer within hooks.timeout = 0.5 s); "
                    "refused as hooks.fail_open = false",
                    "junk": "the on_play hook failed (HTTP 200 with a body that is not JSON: "
                    "'<html>'); refused as hooks.fail_open = false",
                }
                for token, reason in cases.items():
                    status, text, _ = await whep_post(http, relay, "/whep/live/cam", token)
                    assert (status, text) == (
                        403,
                        f"playing stream live/cam is not allowed: {reason}\n",
                    )
                async with http.get(relay.http + "/api/v1/sessions") as resp:
                    sessions = (await resp.json())["sessions"]
                assert [s["id"] for s in sessions] == [viewer_id]
                await frames_grow(viewer)

                # The publisher leaves: on_unpublish, and the stream's viewer ends: on_stop.
                hooks.received.clear()
                pub.stop()
                await wait_received(hooks, 2)
                by_path = dict(hooks.received)
                assert by_path["/unpublish"]["client_id"] == publish_id
                assert by_path["/unpublish"]["stream"] == "cam"
                assert by_path["/stop"]["client_id"] == viewer_id
                assert by_path["/stop"]["token"] == ""
            finally:
                await viewer.close()

        # The hook server is down now: fail closed refuses.
        output = await refused_publisher(relay.rtmp_url("live/cam"), tmp_path / "down.log")
        assert "refused: the on_publish hook failed (cannot reach it" in output
        failed = await wait_log(relay, "hook failed")
        assert [(r["hook"], r["outcome"]) for r in failed] == [("on_publish", "error")]
    finally:
        assert relay.stop() == 0


@integration
async def test_hooks_fail_open_end_to_end(tmp_path: Path, publishers: list[Publisher]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    extra = f"""
[hooks]
on_publish = "{dead}/publish"
on_play = "http://127.0.0.1:{port}/play"
timeout = 0.3
fail_open = true
"""
    relay = start_relay(tmp_path, extra)
    try:
        async with running_hook_server(port) as hooks, aiohttp.ClientSession() as http:
            hooks.behaviour["/play"] = slow(2.0)
            publishers.append(start_publisher(relay.rtmp_url("live/cam"), tmp_path / "pub.log"))
            await wait_live(relay, "live/cam")
            viewer = WhepViewer(relay.http, "/whep/live/cam")
            await viewer.start(http)
            try:
                await frames_grow(viewer, timeout=10)
            finally:
                await viewer.close()
            assert [path for path, _ in hooks.received] == ["/play"]
        failed = await wait_log(relay, "hook failed", count=2)
        assert {(r["hook"], r["outcome"]) for r in failed} == {
            ("on_publish", "error"),
            ("on_play", "timeout"),
        }
    finally:
        assert relay.stop() == 0
