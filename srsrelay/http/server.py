"""HTTP: WHEP signalling (draft-ietf-wish-whep; RFC 9725 for the shared resource model),
SRS-compatible routes, a JSON API and the player page.

The WHEP resource:

- POST <endpoint> (application/sdp): 201 with the answer, Location, a strong ETag naming
  the ICE session and one Link rel="ice-server" per rtc.ice_servers entry. 409 with
  Retry-After when the stream is not live (after http.whep_wait_for_publisher), 503 with
  Retry-After at rtc.max_viewers / rtc.max_viewers_per_stream, 429 with Retry-After over
  http.whep_rate_limit, 401 without an accepted bearer token when http.whep_tokens is set.
- PATCH <session> (application/trickle-ice-sdpfrag, RFC 8840): If-Match is required (428
  without it, 412 when it names another ICE session). The same remote ufrag is trickle ICE:
  204. We are ICE-lite and learn the viewer's address from its STUN checks, so trickled
  candidates are accepted and not used. A new ufrag and pwd is an ICE restart: 200 with our
  new credentials and candidates as an sdpfrag and a new ETag.
- DELETE <session>: 200, the session is closed before the answer. If-Match is ignored.
- GET and HEAD: 200 with no content (the resources have no representation).
- OPTIONS: CORS, Accept-Post, and Accept-Patch on session URLs.

Typed errors from the hub and the WebRTC side become HTTP statuses here and only here.
Every error body is plain text that says what to change.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from srsrelay.config import ApiConfig, HttpConfig, RtcConfig
from srsrelay.hooks import HookClient, request_body
from srsrelay.http.api import Api
from srsrelay.http.sdpfrag import (
    SDPFRAG_TYPE,
    FragMedia,
    LocalCandidate,
    SdpFragError,
    build_sdpfrag,
    parse_sdpfrag,
)
from srsrelay.hub.registry import Hub, StreamNotFound
from srsrelay.hub.stream import Stream
from srsrelay.limits import LimitHits
from srsrelay.webrtc.sdp import CodecNotOffered, OfferError, candidate_priority
from srsrelay.webrtc.server import RtcServer
from srsrelay.webrtc.viewer import SessionState, ViewerSession
from srsrelay.workers.pool import SESSION_HEADER, Forwarded, Worker, WorkerUnavailable

if TYPE_CHECKING:
    from srsrelay.metrics import Metrics
    from srsrelay.rtmp.server import RtmpServer
    from srsrelay.workers.pool import WorkerPool

log = structlog.get_logger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SDP_TYPE = "application/sdp"
READ_CHUNK = 16 * 1024
"""Bytes read from a request body at a time (the total is capped by http.max_body_size)."""
RUNNER_SHUTDOWN_TIMEOUT = 1.0
"""Seconds in-flight HTTP requests get to finish on stop (WHEP requests are short)."""
ALLOW_HEADERS = "Content-Type, Authorization, If-Match"
EXPOSE_HEADERS = "Location, ETag, Link, Accept-Post, Accept-Patch, Retry-After, WWW-Authenticate"
CORS_MAX_AGE = "86400"
ENDPOINT_METHODS = "POST, GET, HEAD, OPTIONS"
RESOURCE_METHODS = "PATCH, DELETE, GET, HEAD, OPTIONS"
SRS_METHODS = "POST, PATCH, DELETE, GET, HEAD, OPTIONS"
NOT_LIVE_RETRY_AFTER = 2
"""Seconds a player is told to wait (Retry-After) after a 409 for a stream that is not live."""
FULL_RETRY_AFTER = 5
"""Seconds a player is told to wait (Retry-After) after a 503 at the viewer limit."""
PUBLISHER_POLL_INTERVAL = 0.1
"""Seconds between two looks for the publisher while http.whep_wait_for_publisher runs."""
RATE_LIMIT_TABLE_SIZE = 4096
"""Client addresses whose request rate is remembered; the least recently seen is dropped."""
REFUSAL_LOG_INTERVAL = 1.0
"""Seconds between two log lines about rate-limited or unauthorized requests."""
AUTH_REALM = "srsrelay"


class HttpError(Exception):
    """An HTTP error response with a plain-text body and optional extra headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RateLimiter:
    """Token buckets per client address (sans-I/O: `now` is passed in).

    Each address may send `burst` requests at once and `rate` per second after that. At
    most `max_clients` addresses are remembered; the least recently seen one is forgotten
    first (it starts again with a full bucket).
    """

    def __init__(self, rate: float, burst: int, max_clients: int = RATE_LIMIT_TABLE_SIZE):
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """address -> (tokens left, `now` of the last update)."""

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, now: float) -> float:
        """Spend one token of `client`: 0.0 if allowed, else seconds until one is back."""
        if self.rate <= 0:
            return 0.0
        tokens, last = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - last) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


class RefusalCounter:
    """Counts refused requests of one kind; says when a log line is due (once a second)."""

    def __init__(self) -> None:
        self.count = 0
        self._logged_at = -REFUSAL_LOG_INTERVAL
        self._logged_count = 0

    def add(self, now: float) -> int | None:
        """Count one; returns how many since the last log line when one is due, else None."""
        self.count += 1
        if now - self._logged_at < REFUSAL_LOG_INTERVAL:
            return None
        self._logged_at = now
        since, self._logged_count = self.count - self._logged_count, self.count
        return since


class MalformedRequestFilter(logging.Filter):
    """aiohttp answers a request it cannot parse itself (400: request line or a header over
    8190 bytes, more than 128 headers, bad tokens, TLS on the plain port) and logs a
    traceback for each. On the "aiohttp.server" logger, this counts them instead and logs
    one line a second at most."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = RefusalCounter()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        since = self.refused.add(time.monotonic())
        if since is not None:
            log.warning(
                "malformed http requests refused",
                refused=since,
                total=self.refused.count,
                error=str(exc.message).splitlines()[0][:80] if exc.message else type(exc).__name__,
            )
        return False


def ice_server_links(rtc: RtcConfig) -> list[str]:
    """One Link header value per rtc.ice_servers entry (RFC 9725 section 4.6); TURN URLs
    carry rtc.ice_username / rtc.ice_credential when they are set."""
    links = []
    for url in rtc.ice_servers:
        link = f'<{url}>; rel="ice-server"'
        if rtc.ice_username and url.startswith(("turn:", "turns:")):
            link += (
                f'; username="{rtc.ice_username}"; credential="{rtc.ice_credential}"'
                '; credential-type="password"'
            )
        links.append(link)
    return links


def entity_tag(session: ViewerSession) -> str:
    """The strong ETag of the session's current ICE session; an ICE restart changes it."""
    return f'"{session.id}-{session.ice.generation}"'


def if_match(header: str, current: str) -> bool:
    """RFC 9110 section 13.1.1: "*" or a list of entity tags compared strongly."""
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or current in tags


class HttpServer:
    """The aiohttp application on http.listen:http.port."""

    def __init__(
        self,
        config: HttpConfig,
        hub: Hub,
        rtc: RtcServer,
        *,
        rtmp_port: int = 1935,
        hooks: HookClient | None = None,
        api: ApiConfig | None = None,
        rtmp: RtmpServer | None = None,
        metrics: Metrics | None = None,
        pool: WorkerPool | None = None,
        unix_path: str | None = None,
    ) -> None:
        self._config = config
        self._pool = pool
        """Worker processes serve the viewers: WHEP requests are forwarded to them."""
        self._unix_path = unix_path
        """Serve on this unix socket instead of http.listen:http.port (a worker process,
        reached only through the relay process, which names the client in X-Forwarded-For)."""
        self.opened_listeners: list[Callable[[ViewerSession, dict[str, str]], None]] = []
        """Called with every viewer session a WHEP POST created, and its hook body."""
        self._hub = hub
        self._rtc = rtc
        self._hooks = hooks
        self._plays: dict[str, dict[str, str]] = {}
        """Viewer session id -> its hook body, for on_stop. Entries leave when the session
        closes, so there are at most rtc.max_viewers."""
        rtc.closed_listeners.append(self._viewer_closed)
        self._rtmp_port = rtmp_port
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        # Tokens are compared as SHA-256 digests so every comparison has the same length.
        self._token_digests = [hashlib.sha256(t.encode()).digest() for t in config.whep_tokens]
        self._rate = RateLimiter(config.whep_rate_limit, config.whep_rate_burst)
        self.limit_hits = LimitHits()
        """Requests refused by a limit (429, 413, 503), by its config key."""
        self.unauthorized = RefusalCounter()
        """WHEP requests answered 401."""
        self.not_live = 0
        """WHEP POSTs answered 409."""
        self.malformed = MalformedRequestFilter()
        """Requests aiohttp could not parse (answered 400 by aiohttp)."""
        self.api = Api(
            api or ApiConfig(),
            hub,
            rtc,
            rtmp=rtmp,
            rtmp_port=rtmp_port,
            http_stats=self.stats,
            metrics=metrics,
            pool=pool,
        )
        """The JSON API and /metrics (api.access applies to both)."""
        self.app = self._build_app()

    def reconfigure(self, config: HttpConfig) -> None:
        """Config reload: tokens, rate limit, body size and CORS origins apply to the next
        request. listen and port are not changed (the relay reports them as needing a
        restart)."""
        self._config = config
        self._token_digests = [hashlib.sha256(t.encode()).digest() for t in config.whep_tokens]
        # Buckets keep their tokens; they refill at the new rate up to the new burst.
        self._rate.rate = config.whep_rate_limit
        self._rate.burst = config.whep_rate_burst

    @property
    def port(self) -> int:
        """The bound TCP port (differs from http.port when that is 0)."""
        if self._unix_path is not None:
            return 0
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
        logging.getLogger("aiohttp.server").addFilter(self.malformed)
        site: web.BaseSite
        if self._unix_path is not None:
            site = web.UnixSite(runner, self._unix_path)
        else:
            site = web.TCPSite(runner, self._config.listen, self._config.port)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise
        self._site = site

    async def stop(self) -> None:
        """Stop accepting connections and close the open ones. Idempotent."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()
        logging.getLogger("aiohttp.server").removeFilter(self.malformed)

    def stats(self) -> dict[str, Any]:
        return {
            "rate_limited": self.limit_hits["http.whep_rate_limit"],
            "unauthorized": self.unauthorized.count,
            "not_live": self.not_live,
            "full": self.limit_hits["rtc.max_viewers"]
            + self.limit_hits["rtc.max_viewers_per_stream"],
            "limit_hits": dict(self.limit_hits),
            "malformed": self.malformed.refused.count,
            "rate_limit_clients": len(self._rate),
        }

    # -- application ---------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors_and_cors],
            client_max_size=self._config.max_body_size,
        )
        r = app.router
        r.add_get("/", self._index)
        r.add_static("/static/", STATIC_DIR, append_version=False)
        self.api.add_routes(r)
        endpoint = "/whep/{app}/{stream}"
        r.add_post(endpoint, self._whep_post)
        r.add_get(endpoint, self._endpoint_get, allow_head=False)
        r.add_head(endpoint, self._endpoint_get)
        r.add_route("OPTIONS", endpoint, self._options_endpoint)
        resource = "/whep/{app}/{stream}/{session}"
        r.add_patch(resource, self._whep_patch)
        r.add_delete(resource, self._whep_delete)
        r.add_get(resource, self._whep_resource_get, allow_head=False)
        r.add_head(resource, self._whep_resource_get)
        r.add_route("OPTIONS", resource, self._options_resource)
        for path in ("/rtc/v1/whep/", "/rtc/v1/whep"):
            r.add_post(path, self._srs_post)
            r.add_patch(path, self._srs_patch)
            r.add_delete(path, self._srs_delete)
            r.add_get(path, self._srs_get, allow_head=False)
            r.add_head(path, self._srs_get)
            r.add_route("OPTIONS", path, self._options_srs)
        return app

    @web.middleware
    async def _errors_and_cors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except HttpError as exc:
            response = web.Response(status=exc.status, text=exc.message + "\n", headers=exc.headers)
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

    # -- WHEP: OPTIONS, GET, HEAD --------------------------------------------------

    def _options(self, request: web.Request, methods: str, *, resource: bool) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["Allow"] = methods
        headers["Access-Control-Allow-Methods"] = methods
        headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        headers["Access-Control-Max-Age"] = CORS_MAX_AGE
        # "The 200 OK response to any OPTIONS request SHOULD include Accept-Post".
        headers["Accept-Post"] = SDP_TYPE
        if resource:
            headers["Accept-Patch"] = SDPFRAG_TYPE  # RFC 5789 section 3.1
        elif "Access-Control-Request-Method" not in request.headers:
            # ICE servers may be given on OPTIONS too, but not on a CORS preflight
            # (RFC 9725 section 4.6).
            for link in ice_server_links(self._rtc.config):
                headers.add("Link", link)
        return web.Response(status=200, headers=headers)

    async def _options_endpoint(self, request: web.Request) -> web.Response:
        return self._options(request, ENDPOINT_METHODS, resource=False)

    async def _options_resource(self, request: web.Request) -> web.Response:
        return self._options(request, RESOURCE_METHODS, resource=True)

    async def _options_srs(self, request: web.Request) -> web.Response:
        return self._options(request, SRS_METHODS, resource="session" in request.query)

    async def _endpoint_get(self, request: web.Request) -> web.Response:
        # The WHEP resources have no representation: 2xx with no content (draft-ietf-wish-
        # whep section 4.1); HEAD tells a player the endpoint takes application/sdp.
        self._authorize(request)
        return web.Response(status=200, content_type=SDP_TYPE)

    async def _whep_resource_get(self, request: web.Request) -> web.Response:
        self._authorize(request)
        if self._pool is not None:
            return await self._forward_session(request, request.match_info["session"])
        session = self._session(request.match_info["session"], _key(request.match_info))
        return web.Response(status=200, headers={"ETag": entity_tag(session)})

    async def _srs_get(self, request: web.Request) -> web.Response:
        if "session" not in request.query:
            return await self._endpoint_get(request)
        self._authorize(request)
        if self._pool is not None:
            return await self._forward_session(request, request.query["session"])
        session = self._session(request.query["session"], _srs_key(request))
        return web.Response(status=200, headers={"ETag": entity_tag(session)})

    # -- WHEP: POST ----------------------------------------------------------------

    async def _whep_post(self, request: web.Request) -> web.Response:
        app, name = request.match_info["app"], request.match_info["stream"]
        if self._pool is not None:
            return await self._forward_play(request, app, name)
        session = await self._play(request, app, name)
        location = f"/whep/{quote(app, safe='')}/{quote(name, safe='')}/{session.id}"
        return self._answer(session, location)

    async def _srs_post(self, request: web.Request) -> web.Response:
        app, name = _srs_stream(request)
        if self._pool is not None:
            return await self._forward_play(request, app, name)
        session = await self._play(request, app, name)
        query = urlencode({"app": app, "stream": name, "session": session.id})
        return self._answer(session, f"/rtc/v1/whep/?{query}")

    async def _play(self, request: web.Request, app: str, name: str) -> ViewerSession:
        self._check_rate(request)
        self._authorize(request)
        offer = await self._read_body(request, SDP_TYPE, "SDP offer")
        _check_offer_text(offer)
        self._check_capacity(None)
        stream = await self._find_stream(app, name)
        self._check_capacity(stream.key)
        try:
            session = self._rtc.create_session(offer, stream)
        except CodecNotOffered as exc:
            # 406: the stream exists but not in a form this viewer accepts.
            log.info("offer rejected", stream=stream.key, codec=exc.codec, error=str(exc))
            raise HttpError(406, f"stream {stream.key}: {exc}") from None
        except OfferError as exc:
            log.info("offer rejected", stream=stream.key, error=str(exc))
            raise HttpError(400, str(exc)) from None
        body = request_body(
            client_id=session.id,
            ip=self._remote(request),
            app=app,
            stream=name,
            param=request.query_string,
            token=_bearer_token(request),
        )
        await self._ask_on_play(session, body)
        self._plays[session.id] = body
        for listener in self.opened_listeners:
            listener(session, body)
        log.info("whep session created", stream=stream.key, session=session.id)
        return session

    async def _forward_play(self, request: web.Request, app: str, name: str) -> web.Response:
        """A WHEP POST with worker processes: checked here (rate, token, body, global
        viewer limits), answered by the worker with the fewest viewers."""
        pool = self._pool
        assert pool is not None
        self._check_rate(request)
        self._authorize(request)
        offer = await self._read_body(request, SDP_TYPE, "SDP offer")
        _check_offer_text(offer)
        key = f"{app}/{name}"
        self._check_capacity(key)
        try:
            worker = pool.pick()
        except WorkerUnavailable as exc:
            raise _unavailable(exc) from None
        answer = await self._forward(request, worker, offer.encode(), key)
        # 409, 406 and hook refusals are counted by the worker that answered.
        if answer.session is not None:
            log.info(
                "whep session created", stream=key, session=answer.session, worker=worker.index
            )
        return answer_response(answer)

    async def _forward_session(self, request: web.Request, session_id: str) -> web.Response:
        """PATCH, DELETE or GET of a session resource: to the worker serving it."""
        pool = self._pool
        assert pool is not None
        worker = pool.owner(session_id)
        if worker is None:
            raise HttpError(404, f"session {session_id} does not exist (already closed?)")
        body = await request.read()  # at most http.max_body_size (client_max_size)
        return answer_response(await self._forward(request, worker, body, None))

    async def _forward(
        self, request: web.Request, worker: Worker, body: bytes, stream: str | None
    ) -> Forwarded:
        assert self._pool is not None
        try:
            return await self._pool.forward(
                worker,
                request.method,
                request.path_qs,
                request.headers,
                body,
                client=self._remote(request),
                stream=stream,
            )
        except WorkerUnavailable as exc:
            raise _unavailable(exc) from None

    async def _ask_on_play(self, session: ViewerSession, body: dict[str, str]) -> None:
        """The on_play hook decides about a created session: 403 closes it (no on_stop).

        It is asked after the session exists so that its client_id is the viewer id that
        on_stop and the API report; the session counts towards rtc.max_viewers meanwhile."""
        hooks = self._hooks
        if hooks is None or not hooks.enabled("on_play"):
            return
        key = f"{body['app']}/{body['stream']}"
        try:
            allowed, reason = await hooks.check("on_play", body)
        except BaseException:
            session.close_soon("request cancelled while asking the on_play hook")
            raise
        if not allowed:
            await self._rtc.close_session(session.id, "refused by the on_play hook")
            raise HttpError(403, f"playing stream {key} is not allowed: {reason}")
        if session.state is SessionState.CLOSED:
            raise HttpError(
                409,
                f"stream {key} ended while the on_play hook was asked; "
                f"retry after {NOT_LIVE_RETRY_AFTER} s",
                {"Retry-After": str(NOT_LIVE_RETRY_AFTER)},
            )

    def _viewer_closed(self, session: ViewerSession) -> None:
        body = self._plays.pop(session.id, None)
        if body is not None and self._hooks is not None:
            self._hooks.notify("on_stop", {**body, "reason": session.close_reason or "closed"})

    def _remote(self, request: web.Request) -> str:
        """The client's address: from X-Forwarded-For on a worker's unix socket (only
        the relay process can reach it), else the peer address."""
        if self._unix_path is not None:
            return request.headers.get("X-Forwarded-For", "")
        return request.remote or ""

    def _check_rate(self, request: web.Request) -> None:
        client = self._remote(request)
        now = time.monotonic()
        wait = self._rate.take(client, now)
        if wait <= 0:
            return
        since = self.limit_hits.hit("http.whep_rate_limit", now)
        if since is not None:
            log.warning(
                "whep requests rate limited",
                setting="http.whep_rate_limit",
                client=client,
                refused=since,
                total=self.limit_hits["http.whep_rate_limit"],
                limit=self._config.whep_rate_limit,
            )
        retry = max(1, math.ceil(wait))
        raise HttpError(
            429,
            f"too many WHEP requests from {client}: the limit is http.whep_rate_limit = "
            f"{self._config.whep_rate_limit:g} per second (burst {self._config.whep_rate_burst}); "
            f"retry after {retry} s",
            {"Retry-After": str(retry)},
        )

    def _authorize(self, request: web.Request) -> None:
        if not self._token_digests:
            return
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self._refuse_auth(request, "no bearer token")
            raise HttpError(
                401,
                "this WHEP server needs a bearer token: send Authorization: Bearer <token>",
                {"WWW-Authenticate": f'Bearer realm="{AUTH_REALM}"'},
            )
        digest = hashlib.sha256(token.encode()).digest()
        accepted = False
        for known in self._token_digests:  # no early exit: the time does not depend on which
            accepted |= hmac.compare_digest(digest, known)
        if not accepted:
            self._refuse_auth(request, "token not accepted")
            raise HttpError(
                401,
                "the bearer token is not accepted by this WHEP server",
                {"WWW-Authenticate": f'Bearer realm="{AUTH_REALM}", error="invalid_token"'},
            )

    def _refuse_auth(self, request: web.Request, why: str) -> None:
        since = self.unauthorized.add(time.monotonic())
        if since is not None:
            log.warning(
                "whep request unauthorized",
                client=self._remote(request),
                reason=why,
                refused=since,
                total=self.unauthorized.count,
            )

    def _check_capacity(self, key: str | None) -> None:
        rtc = self._rtc.config
        headers = {"Retry-After": str(FULL_RETRY_AFTER)}
        if self._pool is not None:
            total = self._pool.viewer_count()
        else:
            total = len(self._rtc.sessions)
        if total >= rtc.max_viewers:
            self._limit_hit("rtc.max_viewers", limit=rtc.max_viewers)
            raise HttpError(
                503,
                f"the relay has its maximum of {rtc.max_viewers} viewers (rtc.max_viewers); "
                f"retry after {FULL_RETRY_AFTER} s",
                headers,
            )
        limit = rtc.max_viewers_per_stream
        if key is None or limit <= 0:
            return
        if self._pool is not None:
            viewers = self._pool.viewers_by_stream()[key]
        else:
            viewers = sum(1 for s in list(self._rtc.sessions.values()) if s.stream.key == key)
        if viewers >= limit:
            self._limit_hit("rtc.max_viewers_per_stream", limit=limit, stream=key)
            raise HttpError(
                503,
                f"stream {key} has its maximum of {limit} viewers "
                f"(rtc.max_viewers_per_stream); retry after {FULL_RETRY_AFTER} s",
                headers,
            )

    def _limit_hit(self, setting: str, **context: object) -> None:
        """Count a request refused by `setting`; log at most once a second per setting."""
        since = self.limit_hits.hit(setting, time.monotonic())
        if since is not None:
            log.warning(
                "limit reached",
                setting=setting,
                hits=since,
                total=self.limit_hits[setting],
                **context,
            )

    async def _find_stream(self, app: str, name: str) -> Stream:
        """The live stream, waiting up to http.whep_wait_for_publisher for it; else 409.

        A stream counts as live once its first audio or video configuration arrived: a
        publisher that has only connected has no tracks to answer an offer with yet."""
        deadline = time.monotonic() + self._config.whep_wait_for_publisher
        while True:
            try:
                stream = self._hub.find(app, name)
                if stream.has_video or stream.has_audio:
                    return stream
            except StreamNotFound:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(PUBLISHER_POLL_INTERVAL, left))
        self.not_live += 1
        raise HttpError(
            409,
            f"stream {app}/{name} is not live: publish to rtmp://<relay>:{self._rtmp_port}/"
            f"{app}/{name} first; retry after {NOT_LIVE_RETRY_AFTER} s",
            {"Retry-After": str(NOT_LIVE_RETRY_AFTER)},
        )

    def _answer(self, session: ViewerSession, location: str) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["Location"] = location
        headers["ETag"] = entity_tag(session)
        for link in ice_server_links(self._rtc.config):
            headers.add("Link", link)
        if self._unix_path is not None:
            headers[SESSION_HEADER] = session.id
        return web.Response(
            status=201,
            body=session.answer_sdp.encode(),
            content_type=SDP_TYPE,
            headers=headers,
        )

    # -- WHEP: PATCH and DELETE ----------------------------------------------------

    async def _whep_patch(self, request: web.Request) -> web.Response:
        return await self._patch(request, request.match_info["session"], _key(request.match_info))

    async def _srs_patch(self, request: web.Request) -> web.Response:
        return await self._patch(request, _srs_session(request), _srs_key(request))

    async def _whep_delete(self, request: web.Request) -> web.Response:
        return await self._stop(request, request.match_info["session"], _key(request.match_info))

    async def _srs_delete(self, request: web.Request) -> web.Response:
        return await self._stop(request, _srs_session(request), _srs_key(request))

    def _session(self, session_id: str, stream_key: str | None) -> ViewerSession:
        """The open session `session_id` of `stream_key` (any stream if None); else 404."""
        session = self._rtc.sessions.get(session_id)
        if (
            session is None
            or session.state is SessionState.CLOSED
            or (stream_key is not None and session.stream.key != stream_key)
        ):
            raise HttpError(404, f"session {session_id} does not exist (already closed?)")
        return session

    async def _patch(
        self, request: web.Request, session_id: str, stream_key: str | None
    ) -> web.Response:
        self._authorize(request)
        if self._pool is not None:
            return await self._forward_session(request, session_id)
        session = self._session(session_id, stream_key)
        text = await self._read_body(request, SDPFRAG_TYPE, "ICE fragment")
        try:
            frag = parse_sdpfrag(text)
        except SdpFragError as exc:
            raise HttpError(400, str(exc)) from None
        current = entity_tag(session)
        condition = request.headers.get("If-Match")
        if condition is None:
            # draft-ietf-wish-whep section 4.3.1: 428 for a missing entity tag.
            raise HttpError(
                428,
                f"PATCH needs If-Match: the ETag of the session ({current}), or * for an ICE "
                f"restart",
            )
        if not if_match(condition, current):
            raise HttpError(
                412,
                f"If-Match {condition} does not name the current ICE session of {session.id}; "
                f"its ETag is {current}",
            )
        if frag.ice_ufrag is None or frag.ice_ufrag == session.ice.remote_ufrag:
            # ICE-lite (RFC 8445 section 2.5): the viewer's address is learned from its
            # STUN checks, so trickled candidates need no action.
            log.debug(
                "trickle ice", session=session.id, candidates=len(frag.candidates), used=False
            )
            return web.Response(status=204)
        return self._restart_ice(session, frag.ice_ufrag, frag.ice_pwd)

    def _restart_ice(
        self, session: ViewerSession, remote_ufrag: str, remote_pwd: str | None
    ) -> web.Response:
        if remote_pwd is None:
            raise HttpError(
                400,
                "an ICE restart (a new a=ice-ufrag) needs the new a=ice-pwd too "
                "(RFC 8839 section 4.4.1.1.1)",
            )
        try:
            ufrag, pwd = self._rtc.restart_ice(session.id, remote_ufrag, remote_pwd)
        except KeyError:
            raise HttpError(404, f"session {session.id} does not exist (already closed?)") from None
        except ValueError as exc:
            # The session keeps its current ICE session (draft-ietf-wish-whep 4.3.3).
            raise HttpError(400, f"ICE restart refused: {exc}") from None
        log.info("ice restarted", session=session.id, stream=session.stream.key)
        rtc = self._rtc.config
        body = build_sdpfrag(
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            media=_tagged_media(session),
            m_line_rest=_tagged_m_line_rest(session),
            candidates=[
                LocalCandidate(candidate_priority(n), address, self._rtc.port)
                for n, address in enumerate(rtc.candidates)
            ],
        )
        return web.Response(
            status=200,
            body=body.encode(),
            content_type=SDPFRAG_TYPE,
            headers={"ETag": entity_tag(session)},
        )

    async def _stop(
        self, request: web.Request, session_id: str, stream_key: str | None
    ) -> web.Response:
        # If-Match is ignored on DELETE (draft-ietf-wish-whep section 4.3.1).
        self._authorize(request)
        if self._pool is not None:
            return await self._forward_session(request, session_id)
        self._session(session_id, stream_key)
        if not await self._rtc.close_session(session_id, "viewer sent DELETE"):
            raise HttpError(404, f"session {session_id} does not exist (already closed?)")
        return web.Response(status=200, text="session closed\n")

    # -- bodies --------------------------------------------------------------------

    async def _read_body(self, request: web.Request, content_type: str, what: str) -> str:
        """The request body as text: checked for type and size before and while reading."""
        if request.content_type != content_type:
            given = request.headers.get("Content-Type")
            raise HttpError(
                415,
                f"Content-Type must be {content_type}, got {given if given else 'none'}",
            )
        limit = self._config.max_body_size
        length = request.content_length
        if length is not None and length > limit:
            self._limit_hit("http.max_body_size", limit=limit, client=self._remote(request))
            raise HttpError(413, _too_large(what, f"{length} bytes", limit))
        body = bytearray()
        while chunk := await request.content.read(READ_CHUNK):
            body += chunk
            if len(body) > limit:
                self._limit_hit("http.max_body_size", limit=limit, client=self._remote(request))
                raise HttpError(413, _too_large(what, f"more than {limit} bytes", limit))
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, f"body is not an {what}: it is not UTF-8 text") from None


def _unavailable(exc: WorkerUnavailable) -> HttpError:
    """503 for a request no worker process could take (they restart within seconds)."""
    return HttpError(503, f"{exc}; retry after 1 s", {"Retry-After": "1"})


def answer_response(answer: Forwarded) -> web.Response:
    """A worker's answer, passed on (CORS headers are this server's own)."""
    headers: CIMultiDict[str] = CIMultiDict(answer.headers)
    return web.Response(status=answer.status, body=answer.body, headers=headers)


def _bearer_token(request: web.Request) -> str:
    """The bearer token of the Authorization header (RFC 6750 section 2.1), or ""."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _check_offer_text(text: str) -> None:
    if not text.strip():
        raise HttpError(400, "body is not an SDP offer: the body is empty")
    if not text.lstrip().startswith("v=0"):
        raise HttpError(400, 'body is not an SDP offer: it must start with "v=0"')


def _tagged_media(session: ViewerSession) -> FragMedia:
    """The offerer-tagged m= section: the first one we answered (BUNDLE, RFC 9143)."""
    offer = session.offer
    index = min(i for i in (offer.video_index, offer.audio_index) if i is not None)
    section = offer.media[index]
    return FragMedia(section.kind, section.mid)


def _tagged_m_line_rest(session: ViewerSession) -> str:
    offer = session.offer
    index = min(i for i in (offer.video_index, offer.audio_index) if i is not None)
    choice = offer.video if index == offer.video_index else offer.audio
    assert choice is not None
    return f"9 {offer.media[index].protocol} {choice.payload_type}"


def _key(match_info: Mapping[str, str]) -> str:
    return f"{match_info['app']}/{match_info['stream']}"


def _srs_key(request: web.Request) -> str | None:
    app, name = request.query.get("app"), request.query.get("stream")
    return f"{app}/{name}" if app and name else None


def _srs_session(request: web.Request) -> str:
    session_id = request.query.get("session", "")
    if not session_id:
        raise HttpError(400, "query parameter session is required (use the Location URL)")
    return session_id


def _too_large(what: str, size: str, limit: int) -> str:
    return f"{what} too large: {size}; the limit is http.max_body_size = {limit} bytes"


def _srs_stream(request: web.Request) -> tuple[str, str]:
    app, name = request.query.get("app", ""), request.query.get("stream", "")
    if not app or not name:
        raise HttpError(
            400,
            "query parameters app and stream are required, e.g. /rtc/v1/whep/?app=live&stream=test",
        )
    return app, name
