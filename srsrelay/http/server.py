"""HTTP: WHEP signalling (RFC 9725), SRS-compatible routes, a JSON API and the player page.

Typed errors from the hub and the WebRTC side become HTTP statuses here and only here.
Every error body is plain text that says what to change.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import structlog
from aiohttp import web

from srsrelay import __version__
from srsrelay.config import HttpConfig
from srsrelay.hub.registry import Hub, StreamNotFound
from srsrelay.hub.stream import Stream
from srsrelay.webrtc.sdp import OfferError
from srsrelay.webrtc.server import RtcServer
from srsrelay.webrtc.viewer import ViewerSession

log = structlog.get_logger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SDP_TYPE = "application/sdp"
READ_CHUNK = 16 * 1024
"""Bytes read from a request body at a time (the total is capped by http.max_body_size)."""
RUNNER_SHUTDOWN_TIMEOUT = 1.0
"""Seconds in-flight HTTP requests get to finish on stop (WHEP requests are short)."""
ALLOW_HEADERS = "Content-Type, Authorization, If-Match"
EXPOSE_HEADERS = "Location, ETag, Link, Accept-Post"
CORS_MAX_AGE = "86400"


class HttpError(Exception):
    """An HTTP error response with a plain-text body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServer:
    """The aiohttp application on http.listen:http.port."""

    def __init__(
        self, config: HttpConfig, hub: Hub, rtc: RtcServer, *, rtmp_port: int = 1935
    ) -> None:
        self._config = config
        self._hub = hub
        self._rtc = rtc
        self._rtmp_port = rtmp_port
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.app = self._build_app()

    @property
    def port(self) -> int:
        """The bound TCP port (differs from http.port when that is 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the HTTP server is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Bind and start serving; raises OSError if the port cannot be bound."""
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=RUNNER_SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self._config.listen, self._config.port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            self._runner = None
            raise
        self._site = site

    async def stop(self) -> None:
        """Stop accepting connections and close the open ones. Idempotent."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    # -- application ---------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors_and_cors],
            client_max_size=self._config.max_body_size,
        )
        r = app.router
        r.add_get("/", self._index)
        r.add_static("/static/", STATIC_DIR, append_version=False)
        r.add_get("/api/v1/info", self._api_info)
        r.add_get("/api/v1/streams", self._api_streams)
        r.add_get("/api/v1/streams/", self._api_streams)
        r.add_get("/api/v1/sessions", self._api_sessions)
        r.add_get("/api/v1/sessions/", self._api_sessions)
        r.add_get("/api/v1/rtc", self._api_rtc)
        r.add_post("/whep/{app}/{stream}", self._whep_post)
        r.add_route("OPTIONS", "/whep/{app}/{stream}", self._options_post)
        r.add_delete("/whep/{app}/{stream}/{session}", self._whep_delete)
        r.add_route("OPTIONS", "/whep/{app}/{stream}/{session}", self._options_resource)
        for path in ("/rtc/v1/whep/", "/rtc/v1/whep"):
            r.add_post(path, self._srs_post)
            r.add_delete(path, self._srs_delete)
            r.add_route("OPTIONS", path, self._options_post)
        return app

    @web.middleware
    async def _errors_and_cors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except HttpError as exc:
            response = web.Response(status=exc.status, text=exc.message + "\n")
        except web.HTTPException as exc:
            # Routing errors (404 no route, 405 method): keep their headers (e.g. Allow).
            response = web.Response(
                status=exc.status, text=(exc.text or exc.reason) + "\n", headers=exc.headers
            )
        self._add_cors(request, response)
        return response

    def _add_cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origins = self._config.cors_origins
        if "*" in origins:
            response.headers["Access-Control-Allow-Origin"] = "*"
        else:
            origin = request.headers.get("Origin")
            if origin is not None and origin in origins:
                response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

    # -- pages and API -------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _api_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"code": 0, "server": "srsrelay", "version": __version__, "rtmp_port": self._rtmp_port}
        )

    async def _api_streams(self, request: web.Request) -> web.Response:
        now = time.time()
        streams = [stream_json(s, now) for s in self._hub.streams()]
        return web.json_response({"code": 0, "streams": streams})

    async def _api_sessions(self, request: web.Request) -> web.Response:
        sessions = [session_json(s) for s in list(self._rtc.sessions.values())]
        return web.json_response({"code": 0, "sessions": sessions})

    async def _api_rtc(self, request: web.Request) -> web.Response:
        return web.json_response({"code": 0, "rtc": self._rtc.stats()})

    # -- WHEP ----------------------------------------------------------------------

    async def _options_post(self, request: web.Request) -> web.Response:
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE,
                "Accept-Post": SDP_TYPE,
            },
        )

    async def _options_resource(self, request: web.Request) -> web.Response:
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "DELETE, OPTIONS",
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE,
            },
        )

    async def _whep_post(self, request: web.Request) -> web.Response:
        app, name = request.match_info["app"], request.match_info["stream"]
        session = await self._play(request, app, name)
        location = f"/whep/{quote(app, safe='')}/{quote(name, safe='')}/{session.id}"
        return self._answer(session, location)

    async def _srs_post(self, request: web.Request) -> web.Response:
        app, name = _srs_stream(request)
        session = await self._play(request, app, name)
        query = urlencode({"app": app, "stream": name, "session": session.id})
        return self._answer(session, f"/rtc/v1/whep/?{query}")

    async def _whep_delete(self, request: web.Request) -> web.Response:
        return await self._stop(request.match_info["session"])

    async def _srs_delete(self, request: web.Request) -> web.Response:
        session_id = request.query.get("session", "")
        if not session_id:
            raise HttpError(400, "query parameter session is required (use the Location URL)")
        return await self._stop(session_id)

    async def _play(self, request: web.Request, app: str, name: str) -> ViewerSession:
        offer = await self._read_offer(request)
        try:
            stream = self._hub.find(app, name)
        except StreamNotFound:
            raise HttpError(404, f"stream {app}/{name} is not live") from None
        try:
            session = self._rtc.create_session(offer, stream)
        except OfferError as exc:
            log.info("offer rejected", stream=stream.key, error=str(exc))
            raise HttpError(400, str(exc)) from None
        log.info("whep session created", stream=stream.key, session=session.id)
        return session

    def _answer(self, session: ViewerSession, location: str) -> web.Response:
        return web.Response(
            status=201,
            body=session.answer_sdp.encode(),
            content_type=SDP_TYPE,
            headers={"Location": location, "ETag": f'"{session.id}"'},
        )

    async def _stop(self, session_id: str) -> web.Response:
        if not await self._rtc.close_session(session_id, "viewer sent DELETE"):
            raise HttpError(404, f"session {session_id} does not exist (already closed?)")
        return web.Response(status=200, text="session closed\n")

    async def _read_offer(self, request: web.Request) -> str:
        """The SDP offer: checked for type and size before and while reading."""
        if request.content_type != SDP_TYPE:
            given = request.headers.get("Content-Type")
            raise HttpError(
                415,
                f"Content-Type must be {SDP_TYPE}, got {given if given else 'none'}",
            )
        limit = self._config.max_body_size
        length = request.content_length
        if length is not None and length > limit:
            raise HttpError(413, _too_large(f"{length} bytes", limit))
        body = bytearray()
        while chunk := await request.content.read(READ_CHUNK):
            body += chunk
            if len(body) > limit:
                raise HttpError(413, _too_large(f"more than {limit} bytes", limit))
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "body is not an SDP offer: it is not UTF-8 text") from None
        if not text.strip():
            raise HttpError(400, "body is not an SDP offer: the body is empty")
        if not text.lstrip().startswith("v=0"):
            raise HttpError(400, 'body is not an SDP offer: it must start with "v=0"')
        return text


def _too_large(size: str, limit: int) -> str:
    return f"SDP offer too large: {size}; the limit is http.max_body_size = {limit} bytes"


def _srs_stream(request: web.Request) -> tuple[str, str]:
    app, name = request.query.get("app", ""), request.query.get("stream", "")
    if not app or not name:
        raise HttpError(
            400,
            "query parameters app and stream are required, e.g. /rtc/v1/whep/?app=live&stream=test",
        )
    return app, name


def stream_json(stream: Stream, now: float) -> dict[str, Any]:
    """One stream in the SRS-like shape of GET /api/v1/streams."""
    video = (
        {"codec": "H264", "profile_level_id": stream.profile_level_id} if stream.has_video else None
    )
    return {
        "id": stream.key,
        "app": stream.app,
        "name": stream.name,
        "url": f"/whep/{quote(stream.app, safe='')}/{quote(stream.name, safe='')}",
        "video": video,
        "audio": {"codec": "opus"} if stream.has_audio else None,
        "clients": len(stream.readers),
        "publish": {"active": True, "cid": stream.publisher_id},
        "live_ms": max(0, round((now - stream.started_at) * 1000)),
        "frames_in": stream.stats.frames_in,
        "bytes_in": stream.stats.bytes_in,
        "errors": stream.stats.errors,
    }


def session_json(session: ViewerSession) -> dict[str, Any]:
    """One viewer session for GET /api/v1/sessions: everything the session reports."""
    return session.stats()
