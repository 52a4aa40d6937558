"""The JSON API (/api/v1/...) and Prometheus /metrics, on the HTTP listener.

Who may call it is api.access: "local" (loopback clients only, else 403), "token" (a
bearer token from api.tokens, else 401 with WWW-Authenticate, RFC 6750) or "open".
/api/v1/health always answers. Shapes follow SRS's /api/v1/streams and /api/v1/clients
where they fit. Every answer, errors included, is a JSON object with a "code": 0 for
success, else the HTTP status, with "error" saying what to change.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import structlog
from aiohttp import web

from srsrelay import __version__
from srsrelay.config import ApiConfig
from srsrelay.hub.frames import VIDEO_CLOCK_RATE
from srsrelay.hub.registry import Hub
from srsrelay.hub.stream import Stream
from srsrelay.webrtc.server import RtcServer
from srsrelay.webrtc.viewer import SessionState, ViewerSession
from srsrelay.workers.pool import WorkerUnavailable

if TYPE_CHECKING:
    from srsrelay.metrics import Metrics, RateBook
    from srsrelay.rtmp.server import RtmpClient, RtmpServer
    from srsrelay.workers.pool import WorkerPool

log = structlog.get_logger(__name__)

PREFIX = "/api/v1"
AUTH_REALM = "srsrelay"
VHOST = "__defaultVhost__"
"""SRS's name for the only virtual host."""
SERVER = "srsrelay"
JSON_TYPE = "application/json"
KICK_WAIT = 1.0
"""Seconds DELETE /api/v1/clients/{id} waits for a kicked publisher's connection to end."""
KICK_POLL = 0.02
"""Seconds between two looks for that while waiting."""
MAX_REASON = 200
"""Longest kick reason accepted, characters."""
REFUSAL_LOG_INTERVAL = 1.0
"""Seconds between two log lines about refused API requests."""
BITRATE_WINDOW = 10.0
"""Seconds a stream's bitrate in and frame rate are measured over."""
CLIENT_RATE_WINDOW = 30.0
"""Seconds a client's kbps are measured over (SRS's recv_30s / send_30s)."""
LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An API error answer: HTTP status, a message naming what to change, extra headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(
        {"code": exc.status, "error": exc.message}, status=exc.status, headers=exc.headers
    )


def is_local(remote: str | None) -> bool:
    """The client address is a loopback address (127.0.0.0/8, ::1, or v4-mapped)."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        return address in LOOPBACK_V4
    return address.is_loopback


class AccessPolicy:
    """api.access and api.tokens (sans-I/O): says whether a request may use the API."""

    def __init__(self, config: ApiConfig) -> None:
        self.access = config.access
        # Compared as SHA-256 digests: every comparison has the same length.
        self._digests = [hashlib.sha256(t.encode()).digest() for t in config.tokens]

    def check(self, remote: str | None, authorization: str | None) -> ApiError | None:
        """None if allowed, else the error to answer with."""
        if self.access == "open":
            return None
        if self.access == "local":
            if is_local(remote):
                return None
            return ApiError(
                403,
                f'the API answers only clients on this machine (api.access = "local") and '
                f'{remote or "this client"} is not one; set api.access = "token" with '
                f'api.tokens, or "open"',
            )
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return ApiError(
                401,
                'the API needs a bearer token (api.access = "token"): send '
                "Authorization: Bearer <one of api.tokens>",
                {"WWW-Authenticate": f'Bearer realm="{AUTH_REALM}"'},
            )
        digest = hashlib.sha256(token.encode()).digest()
        accepted = False
        for known in self._digests:  # no early exit: the time does not depend on which
            accepted |= hmac.compare_digest(digest, known)
        if accepted:
            return None
        return ApiError(
            401,
            "the bearer token is not one of api.tokens",
            {"WWW-Authenticate": f'Bearer realm="{AUTH_REALM}", error="invalid_token"'},
        )


class Api:
    """The /api/v1 routes and /metrics of one relay."""

    def __init__(
        self,
        config: ApiConfig,
        hub: Hub,
        rtc: RtcServer,
        *,
        rtmp: RtmpServer | None = None,
        rtmp_port: int = 1935,
        http_stats: Callable[[], dict[str, Any]] | None = None,
        metrics: Metrics | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        self._pool = pool
        """Worker processes hold the viewers: their answers are merged into this one's."""
        self._hub = hub
        self._rtc = rtc
        self._rtmp = rtmp
        self._rtmp_port = rtmp_port
        self._http_stats = http_stats
        self._metrics = metrics
        self._policy = AccessPolicy(config)
        self.started_at = time.time()
        self.refused: Counter[int] = Counter()
        """Requests refused by api.access, by HTTP status (401, 403)."""
        self._refused_logged = Counter[int]()
        self._last_refusal_log = -REFUSAL_LOG_INTERVAL

    def update(self, config: ApiConfig) -> None:
        """Apply reloaded api.access and api.tokens to the next requests."""
        self._policy = AccessPolicy(config)

    @property
    def rates(self) -> RateBook | None:
        return self._metrics.rates if self._metrics is not None else None

    # -- routes ------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register every API path; each answers every method itself (JSON 405s)."""
        get = self._get
        self._add(router, f"{PREFIX}/health", {"GET": get(self._health)}, public=True)
        self._add(router, f"{PREFIX}/info", {"GET": get(self._info)})
        for path in (f"{PREFIX}/streams", f"{PREFIX}/streams/"):
            self._add(router, path, {"GET": get(self._streams)})
        self._add(router, f"{PREFIX}/streams/{{id}}", {"GET": get(self._stream_by_id)})
        self._add(router, f"{PREFIX}/streams/{{app}}/{{name}}", {"GET": get(self._stream_by_name)})
        for path in (f"{PREFIX}/sessions", f"{PREFIX}/sessions/"):
            self._add(router, path, {"GET": get(self._sessions)})
        self._add(router, f"{PREFIX}/rtc", {"GET": get(self._rtc_stats)})
        self._add(router, f"{PREFIX}/http", {"GET": get(self._http)})
        self._add(router, f"{PREFIX}/workers", {"GET": get(self._workers)})
        for path in (f"{PREFIX}/clients", f"{PREFIX}/clients/"):
            self._add(router, path, {"GET": get(self._clients)})
        self._add(
            router,
            f"{PREFIX}/clients/{{id}}",
            {"GET": get(self._client), "DELETE": self._kick},
        )
        self._add(router, f"{PREFIX}/openapi.json", {"GET": get(self._openapi)})
        self._add(router, "/metrics", {"GET": get(self._metrics_text)})

    def _get(self, handler: Handler) -> Handler:
        """A GET handler that refuses a request body (none of them takes one)."""

        async def handle(request: web.Request) -> web.StreamResponse:
            if request.body_exists and await request.read():
                raise ApiError(400, f"{request.method} {request.path} takes no request body")
            return await handler(request)

        return handle

    def _add(
        self,
        router: web.UrlDispatcher,
        path: str,
        methods: Mapping[str, Handler],
        *,
        public: bool = False,
    ) -> None:
        names = list(methods)
        if "GET" in methods:
            names.append("HEAD")
        allow = ", ".join([*names, "OPTIONS"])

        async def dispatch(request: web.Request) -> web.StreamResponse:
            if request.method == "OPTIONS":
                # CORS preflight: it carries no credentials, so no access check.
                return web.Response(
                    status=204,
                    headers={
                        "Allow": allow,
                        "Access-Control-Allow-Methods": allow,
                        "Access-Control-Allow-Headers": "Authorization, Content-Type",
                        "Access-Control-Max-Age": "86400",
                    },
                )
            try:
                if not public:
                    self._check_access(request)
                handler = methods.get("GET" if request.method == "HEAD" else request.method)
                if handler is None:
                    raise ApiError(
                        405,
                        f"{request.method} is not allowed on {request.path}; use {allow}",
                        {"Allow": allow},
                    )
                return await handler(request)
            except ApiError as exc:
                return error_response(exc)
            except web.HTTPException as exc:
                message = exc.text or exc.reason
                if exc.status == 413:
                    message += " (the limit is http.max_body_size)"
                return error_response(ApiError(exc.status, message))

        router.add_route("*", path, dispatch)

    def _check_access(self, request: web.Request) -> None:
        error = self._policy.check(request.remote, request.headers.get("Authorization"))
        if error is None:
            return
        self.refused[error.status] += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            self._last_refusal_log = now
            since = {s: n - self._refused_logged[s] for s, n in self.refused.items()}
            self._refused_logged = self.refused.copy()
            log.warning(
                "api request refused",
                client=request.remote,
                path=request.path,
                status=error.status,
                access=self._policy.access,
                refused=sum(since.values()),
            )
        raise error

    # -- handlers ----------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "code": 0,
            "status": "ok",
            "server": SERVER,
            "version": __version__,
            "uptime": round(time.time() - self.started_at, 1),
        }
        if self._pool is not None:
            running = len(self._pool.ready())
            body["workers"] = {"configured": self._pool.count, "running": running}
            if running == 0:
                raise ApiError(503, "no worker process is running (they are restarting)")
        return web.json_response(body)

    async def _workers(self, request: web.Request) -> web.Response:
        if self._pool is None:
            data: dict[str, Any] = {"configured": 1, "running": 0, "workers": []}
        else:
            data = self._pool.stats()
        return web.json_response({"code": 0, "workers": data})

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"code": 0, "server": SERVER, "version": __version__, "rtmp_port": self._rtmp_port}
        )

    async def _streams(self, request: web.Request) -> web.Response:
        now = time.time()
        viewers = self._viewers_by_stream()
        streams = [
            stream_json(s, now, viewers=viewers[s.key], rates=self.rates, pooled=self._pooled)
            for s in self._hub.streams()
        ]
        return web.json_response({"code": 0, "streams": streams})

    async def _stream_by_id(self, request: web.Request) -> web.Response:
        # "live%2Ftest" arrives decoded as "live/test".
        app, sep, name = request.match_info["id"].partition("/")
        if not sep:
            raise ApiError(
                404,
                f"no stream {request.match_info['id']}: a stream id is app/name, e.g. "
                f"{PREFIX}/streams/live%2Ftest or {PREFIX}/streams/live/test",
            )
        return self._stream(app, name)

    async def _stream_by_name(self, request: web.Request) -> web.Response:
        return self._stream(request.match_info["app"], request.match_info["name"])

    def _stream(self, app: str, name: str) -> web.Response:
        key = f"{app}/{name}"
        stream = next((s for s in self._hub.streams() if s.key == key), None)
        if stream is None:
            raise ApiError(
                404, f"stream {key} is not live (GET {PREFIX}/streams lists the live ones)"
            )
        viewers = self._viewers_by_stream()[key]
        data = stream_json(
            stream, time.time(), viewers=viewers, rates=self.rates, pooled=self._pooled
        )
        return web.json_response({"code": 0, "stream": data})

    @property
    def _pooled(self) -> bool:
        return self._pool is not None

    async def _sessions(self, request: web.Request) -> web.Response:
        if self._pool is None:
            sessions = [s.stats() for s in list(self._rtc.sessions.values())]
        else:
            sessions = [
                item
                for _, data in await self._pool.fetch_json(f"{PREFIX}/sessions")
                for item in _list(data, "sessions")
            ]
        return web.json_response({"code": 0, "sessions": sessions})

    async def _rtc_stats(self, request: web.Request) -> web.Response:
        if self._pool is None:
            return web.json_response({"code": 0, "rtc": self._rtc.stats()})
        # One report per worker: each has its own socket, send path and latency.
        workers = [
            {"worker": worker.index, "rtc": data.get("rtc") if data is not None else None}
            for worker, data in await self._pool.fetch_json(f"{PREFIX}/rtc")
        ]
        sessions = sum(w["rtc"].get("sessions", 0) for w in workers if isinstance(w["rtc"], dict))
        return web.json_response({"code": 0, "rtc": {"sessions": sessions, "workers": workers}})

    async def _http(self, request: web.Request) -> web.Response:
        stats = self._http_stats() if self._http_stats is not None else {}
        return web.json_response({"code": 0, "http": stats})

    async def _clients(self, request: web.Request) -> web.Response:
        clients = await self._all_clients()
        return web.json_response({"code": 0, "server": SERVER, "clients": clients})

    async def _all_clients(self) -> list[dict[str, Any]]:
        """clients(), plus the viewers of every worker process."""
        out = self.clients()
        if self._pool is not None:
            for worker, data in await self._pool.fetch_json(f"{PREFIX}/clients"):
                for client in _list(data, "clients"):
                    out.append({**client, "worker": worker.index})
        return out

    async def _client(self, request: web.Request) -> web.Response:
        client_id = request.match_info["id"]
        for client in await self._all_clients():
            if client["id"] == client_id:
                return web.json_response({"code": 0, "server": SERVER, "client": client})
        raise _unknown_client(client_id)

    async def _kick(self, request: web.Request) -> web.Response:
        client_id = request.match_info["id"]
        reason = await _kick_reason(request)
        if self._pool is not None and (worker := self._pool.owner(client_id)) is not None:
            try:
                answer = await self._pool.forward(
                    worker,
                    "DELETE",
                    f"{PREFIX}/clients/{quote(client_id, safe='')}",
                    {"Content-Type": JSON_TYPE},
                    json.dumps({"reason": reason}).encode(),
                    client=request.remote or "",
                )
            except WorkerUnavailable as exc:
                raise ApiError(503, f"cannot kick {client_id}: {exc}") from None
            return web.Response(status=answer.status, body=answer.body, content_type=JSON_TYPE)
        session = self._rtc.sessions.get(client_id)
        if session is not None and session.state is not SessionState.CLOSED:
            await self._rtc.close_session(client_id, f"kicked: {reason}")
            log.info("viewer kicked", viewer=client_id, stream=session.stream.key, reason=reason)
            return web.json_response({"code": 0, "kicked": client_id, "type": "whep-play"})
        rtmp = self._rtmp
        if rtmp is not None and rtmp.kick(client_id, reason):
            deadline = time.monotonic() + KICK_WAIT
            while time.monotonic() < deadline:
                if all(c.id != client_id for c in rtmp.clients()):
                    break
                await asyncio.sleep(KICK_POLL)
            return web.json_response({"code": 0, "kicked": client_id, "type": "rtmp-publish"})
        raise _unknown_client(client_id)

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def _metrics_text(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            raise ApiError(404, "metrics are not collected by this server")
        from srsrelay.metrics import CONTENT_TYPE

        body = self._metrics.render()
        if self._pool is not None:
            from srsrelay.workers.merge import merge_expositions

            body = merge_expositions(body, await self._pool.fetch_text("/metrics"))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # -- views -------------------------------------------------------------------

    def _viewers_by_stream(self) -> Counter[str]:
        if self._pool is not None:
            return self._pool.viewers_by_stream()
        return Counter(
            s.stream.key
            for s in list(self._rtc.sessions.values())
            if s.state is not SessionState.CLOSED
        )

    def clients(self) -> list[dict[str, Any]]:
        """Publishers (RTMP connections) then viewers, in GET /api/v1/clients shape."""
        rates = self.rates
        out: list[dict[str, Any]] = []
        if self._rtmp is not None:
            out.extend(rtmp_client_json(c, rates) for c in self._rtmp.clients())
        now = time.monotonic()
        for session in list(self._rtc.sessions.values()):
            if session.state is not SessionState.CLOSED:
                out.append(viewer_json(session, now, rates))
        return out


def _list(data: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The list of objects under `key` of a worker's answer (empty if it failed)."""
    items = data.get(key) if data is not None else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _unknown_client(client_id: str) -> ApiError:
    return ApiError(
        404,
        f"no client {client_id} (already gone?); GET {PREFIX}/clients lists the connected ones",
    )


async def _kick_reason(request: web.Request) -> str:
    """The optional JSON body {"reason": "..."} of a kick."""
    default = "by the API"
    if not request.body_exists:
        return default
    raw = await request.read()  # at most http.max_body_size, else 413
    if not raw.strip():
        return default
    if request.content_type != JSON_TYPE:
        given = request.headers.get("Content-Type") or "none"
        raise ApiError(415, f"the body must be {JSON_TYPE} (got {given})")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"reason"}:
        raise ApiError(400, 'the body must be a JSON object like {"reason": "spam"}')
    reason = data.get("reason", default)
    if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON:
        raise ApiError(400, f'"reason" must be a string of 1-{MAX_REASON} characters')
    return reason


def _kbps(rate: float | None) -> float | None:
    return None if rate is None else round(rate * 8 / 1000, 1)


def _rate(rates: RateBook | None, key: tuple[str, str], window: float) -> float | None:
    return rates.rate(key, window) if rates is not None else None


def _average(total: int, seconds: float) -> float:
    return total / seconds if seconds > 0 else 0.0


def stream_json(
    stream: Stream,
    now: float,
    *,
    viewers: int = 0,
    rates: RateBook | None = None,
    pooled: bool = False,
) -> dict[str, Any]:
    """One stream in the SRS-like shape of GET /api/v1/streams; `now` is a Unix time.

    Rates come from the once-a-second samples (`rates`); before there are two, they are
    averages over the stream's life."""
    video: dict[str, Any] | None = None
    if stream.has_video:
        video = {"codec": stream.video_codec}
        if stream.video_codec == "H264":
            video["profile_level_id"] = stream.profile_level_id
        else:
            video["fmtp"] = stream.video_fmtp
            video["h264_rendition"] = stream.rendition is not None
    # With worker processes, the readers are in the workers: `viewers` counts them.
    clients = viewers if pooled else len(stream.readers)
    if stream.rendition is not None and not pooled:
        clients += len(stream.rendition.readers)
    uptime = max(0.0, now - stream.started_at)
    stats = stream.stats
    recv_10s = _rate(rates, ("stream_bytes_in", stream.key), BITRATE_WINDOW)
    recv_30s = _rate(rates, ("stream_bytes_in", stream.key), CLIENT_RATE_WINDOW)
    fps = _rate(rates, ("stream_video_frames", stream.key), BITRATE_WINDOW)
    average_in = _average(stats.bytes_in, uptime)
    return {
        "id": stream.key,
        "app": stream.app,
        "name": stream.name,
        "url": f"/whep/{quote(stream.app, safe='')}/{quote(stream.name, safe='')}",
        "video": video,
        "audio": {"codec": "opus"} if stream.has_audio else None,
        "clients": clients,
        "viewers": viewers,
        "publish": {"active": stream.publishing, "cid": stream.publisher_id},
        "state": stream.state.value,
        "bframes": {"present": stream.has_bframes, "policy": stream.bframes_policy.value},
        "live_ms": max(0, round(uptime * 1000)),
        "uptime": round(uptime, 1),
        "kbps": {
            "recv_10s": _kbps(recv_10s if recv_10s is not None else average_in),
            "recv_30s": _kbps(recv_30s if recv_30s is not None else average_in),
        },
        "fps": round(fps if fps is not None else _average(stats.video_frames, uptime), 1),
        "gop": round(stats.gop_ticks / VIDEO_CLOCK_RATE, 3) if stats.gop_ticks else None,
        "tracks": _tracks(stream),
        "frames_in": stats.frames_in,
        "bytes_in": stats.bytes_in,
        "errors": stats.errors,
    }


def _tracks(stream: Stream) -> dict[str, Any]:
    """Codec details: what the publisher sends and what viewers get."""
    stats = stream.stats
    video: dict[str, Any] | None = None
    if stream.has_video:
        video = {
            "codec": stream.video_codec,
            "profile_level_id": stream.profile_level_id,
            "fmtp": stream.video_fmtp or None,
            "width": _metadata_number(stream, "width"),
            "height": _metadata_number(stream, "height"),
            "framerate": _metadata_number(stream, "framerate"),
            "frames": stats.video_frames,
            "keyframes": stats.keyframes,
            "bframes_dropped": stats.bframes_dropped,
            "frames_transcoded": stats.frames_transcoded,
            "h264_rendition": stream.rendition is not None,
        }
    audio: dict[str, Any] | None = None
    if stream.has_audio:
        aac = stream.aac_config
        audio = {
            "codec": "opus",
            "source": "AAC" if aac is not None else "MP3",
            "sample_rate": aac.sample_rate if aac is not None else None,
            "channels": aac.channel_config if aac is not None else None,
            "frames": stats.audio_frames,
        }
    return {"video": video, "audio": audio}


def _metadata_number(stream: Stream, key: str) -> int | float | None:
    """A number from the publisher's onMetaData (AMF0 numbers are doubles: 320.0 -> 320)."""
    value = stream.metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if float(value).is_integer() else value


def rtmp_client_json(client: RtmpClient, rates: RateBook | None) -> dict[str, Any]:
    """One RTMP connection in SRS's client shape."""
    recv = _rate(rates, ("rtmp_in", client.id), CLIENT_RATE_WINDOW)
    send = _rate(rates, ("rtmp_out", client.id), CLIENT_RATE_WINDOW)
    return {
        "id": client.id,
        "vhost": VHOST,
        "stream": client.stream or None,
        "ip": client.ip,
        "peer": client.peer,
        "url": f"/{client.stream}" if client.stream else None,
        "type": "rtmp-publish",
        "publish": client.publishing,
        "alive": round(client.alive, 1),
        "send_bytes": client.bytes_out,
        "recv_bytes": client.bytes_in,
        "kbps": {
            "recv_30s": _kbps(
                recv if recv is not None else _average(client.bytes_in, client.alive)
            ),
            "send_30s": _kbps(
                send if send is not None else _average(client.bytes_out, client.alive)
            ),
        },
    }


def viewer_json(session: ViewerSession, now: float, rates: RateBook | None) -> dict[str, Any]:
    """One viewer in SRS's client shape, plus its send outcomes, feedback and congestion.
    `now` is time.monotonic()."""
    stats = session.stats()
    addr = session.ice.remote_addr
    alive = max(0.0, now - session.created_at)
    send_bytes = sum(c.bytes_sent for c in session.counters.kinds.values())
    send_30s = _rate(rates, ("viewer_out", session.id), CLIENT_RATE_WINDOW)
    send_10s = _rate(rates, ("viewer_out", session.id), BITRATE_WINDOW)
    fallback = _average(send_bytes, alive)
    reports = {
        kind.value: {
            "fraction_lost": round(r.fraction_lost / 256, 3),
            "packets_lost": r.packets_lost,
            "jitter": r.jitter,
        }
        for kind, r in session.receiver_reports.items()
    }
    return {
        "id": session.id,
        "vhost": VHOST,
        "stream": session.stream.key,
        "ip": addr[0] if addr is not None else None,
        "peer": stats["remote"],
        "url": f"/{session.stream.key}",
        "type": "whep-play",
        "publish": False,
        "alive": round(alive, 1),
        "send_bytes": send_bytes,
        "recv_bytes": session.bytes_received,
        "kbps": {
            # Only what the viewer sends back (STUN, DTLS, RTCP): an average since it came.
            "recv_30s": _kbps(_average(session.bytes_received, alive)),
            "send_30s": _kbps(send_30s if send_30s is not None else fallback),
        },
        "state": stats["state"],
        "bitrate_out_kbps": _kbps(send_10s if send_10s is not None else fallback),
        "loss": stats["congestion"]["loss"],
        "receiver_reports": reports,
        "rtt_ms": stats["nack"]["rtt_ms"] if stats["nack"]["rtt_measured"] else None,
        "nacks": stats["nack"],
        "plis": stats["rtcp"]["plis"],
        "firs": stats["rtcp"]["firs"],
        "keyframe_requests": stats["keyframe"],
        "congestion": stats["congestion"],
        "send": stats["send"],
    }


# -- OpenAPI -------------------------------------------------------------------------

_ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}


def _ok(description: str, schema: str, media: str = JSON_TYPE) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "content": {media: {"schema": ref}}}


def _operation(
    op_id: str,
    summary: str,
    schema: str,
    *,
    params: list[dict[str, Any]] | None = None,
    errors: tuple[int, ...] = (),
    public: bool = False,
    body: bool = False,
    media: str = JSON_TYPE,
) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": _ok("Success", schema, media)}
    codes = list(errors) if public else [401, 403, *errors]
    for code in sorted(set(codes)):
        responses[str(code)] = {
            "description": _ERROR_TEXT[code],
            "content": {JSON_TYPE: {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if public:
        op["security"] = []
    if body:
        op["requestBody"] = {
            "required": False,
            "content": {
                JSON_TYPE: {
                    "schema": {
                        "type": "object",
                        "properties": {"reason": {"type": "string", "maxLength": MAX_REASON}},
                        "additionalProperties": False,
                    }
                }
            },
        }
    return op


_ERROR_TEXT = {
    400: "Bad request (a body where none is taken, or a kick body that is not valid JSON)",
    401: 'api.access = "token" and no accepted bearer token was sent',
    403: 'api.access = "local" and the client is not on this machine',
    404: "No such stream or client",
    413: "The body is larger than http.max_body_size",
    415: "The body is not application/json",
    503: "Worker processes (daemon.workers) are not running or did not answer",
}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 description of every API path and /metrics."""
    op = _operation
    stream_id = _path_param("id", 'The stream key "app/name", URL-encoded (live%2Ftest)')
    app = _path_param("app", "The stream's app (the first part of its key)")
    name = _path_param("name", "The stream's name (the second part of its key)")
    client_id = _path_param("id", "A client id from GET /api/v1/clients")
    paths: dict[str, Any] = {
        f"{PREFIX}/health": {
            "get": op(
                "health",
                "Liveness; always allowed (503 when no worker process runs)",
                "Health",
                public=True,
                errors=(503,),
            )
        },
        f"{PREFIX}/info": {"get": op("info", "Server version and RTMP port", "Info")},
        f"{PREFIX}/streams": {"get": op("listStreams", "Live streams", "StreamList")},
        f"{PREFIX}/streams/{{id}}": {
            "get": op(
                "getStream", "One stream by id", "StreamOne", params=[stream_id], errors=(404,)
            )
        },
        f"{PREFIX}/streams/{{app}}/{{name}}": {
            "get": op(
                "getStreamByName",
                "One stream by app and name",
                "StreamOne",
                params=[app, name],
                errors=(404,),
            )
        },
        f"{PREFIX}/sessions": {
            "get": op("listSessions", "Every viewer session's own report", "SessionList")
        },
        f"{PREFIX}/rtc": {"get": op("rtcStats", "WebRTC socket and send path counters", "Rtc")},
        f"{PREFIX}/http": {"get": op("httpStats", "HTTP refusal counters", "Http")},
        f"{PREFIX}/workers": {
            "get": op("listWorkers", "Worker processes (daemon.workers)", "Workers")
        },
        f"{PREFIX}/clients": {
            "get": op("listClients", "Publishers and viewers (SRS shape)", "ClientList")
        },
        f"{PREFIX}/clients/{{id}}": {
            "get": op("getClient", "One client", "ClientOne", params=[client_id], errors=(404,)),
            "delete": op(
                "kickClient",
                "Disconnect a viewer or a publisher",
                "Kicked",
                params=[client_id],
                errors=(400, 404, 413, 415, 503),
                body=True,
            ),
        },
        f"{PREFIX}/openapi.json": {"get": op("openapi", "This document", "Object")},
        "/metrics": {"get": op("metrics", "Prometheus metrics", "Metrics", media="text/plain")},
    }
    # The list endpoints also answer with a trailing slash.
    for base, op_id in (("streams", "listStreams"), ("sessions", "listSessions")):
        alias = json.loads(json.dumps(paths[f"{PREFIX}/{base}"]))
        alias["get"]["operationId"] = op_id + "Slash"
        paths[f"{PREFIX}/{base}/"] = alias
    alias = json.loads(json.dumps(paths[f"{PREFIX}/clients"]))
    alias["get"]["operationId"] = "listClientsSlash"
    paths[f"{PREFIX}/clients/"] = alias
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "srsrelay API",
            "version": __version__,
            "description": "Streams, clients and counters of an RTMP-to-WHEP relay. "
            "Access is set by api.access (local, token or open).",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
        },
        "security": [{"bearer": []}],
    }


def _envelope(key: str, item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["code", key],
        "properties": {"code": {"type": "integer", "const": 0}, key: item},
    }


def _schemas() -> dict[str, Any]:
    number = {"type": ["number", "null"]}
    stream = {
        "type": "object",
        "required": ["id", "app", "name", "state", "viewers", "uptime", "kbps"],
        "properties": {
            "id": {"type": "string", "description": "app/name"},
            "app": {"type": "string"},
            "name": {"type": "string"},
            "url": {"type": "string", "description": "The WHEP endpoint"},
            "video": {"type": ["object", "null"]},
            "audio": {"type": ["object", "null"]},
            "clients": {"type": "integer"},
            "viewers": {"type": "integer"},
            "publish": {"type": "object"},
            "state": {"type": "string", "enum": ["live", "waiting", "ended"]},
            "bframes": {"type": "object"},
            "live_ms": {"type": "integer"},
            "uptime": {"type": "number", "description": "Seconds"},
            "kbps": {
                "type": "object",
                "properties": {"recv_10s": number, "recv_30s": number},
            },
            "fps": {"type": "number"},
            "gop": {**number, "description": "Seconds between the last two keyframes"},
            "tracks": {"type": "object"},
            "frames_in": {"type": "integer"},
            "bytes_in": {"type": "integer"},
            "errors": {"type": "integer"},
        },
    }
    client = {
        "type": "object",
        "required": ["id", "type", "publish", "alive", "send_bytes", "recv_bytes", "kbps"],
        "properties": {
            "id": {"type": "string"},
            "vhost": {"type": "string"},
            "stream": {"type": ["string", "null"]},
            "ip": {"type": ["string", "null"]},
            "url": {"type": ["string", "null"]},
            "type": {"type": "string", "enum": ["rtmp-publish", "whep-play"]},
            "publish": {"type": "boolean"},
            "alive": {"type": "number", "description": "Seconds"},
            "send_bytes": {"type": "integer"},
            "recv_bytes": {"type": "integer"},
            "kbps": {
                "type": "object",
                "properties": {"recv_30s": number, "send_30s": number},
            },
        },
        "additionalProperties": True,
    }
    return {
        "Error": {
            "type": "object",
            "required": ["code", "error"],
            "properties": {"code": {"type": "integer"}, "error": {"type": "string"}},
        },
        "Object": _ANY_OBJECT,
        "Health": {
            "type": "object",
            "required": ["code", "status"],
            "properties": {
                "code": {"type": "integer", "const": 0},
                "status": {"type": "string", "const": "ok"},
                "server": {"type": "string"},
                "version": {"type": "string"},
                "uptime": {"type": "number"},
                "workers": {
                    "type": "object",
                    "properties": {
                        "configured": {"type": "integer"},
                        "running": {"type": "integer"},
                    },
                },
            },
        },
        "Info": {
            "type": "object",
            "properties": {
                "code": {"type": "integer"},
                "server": {"type": "string"},
                "version": {"type": "string"},
                "rtmp_port": {"type": "integer"},
            },
        },
        "Stream": stream,
        "StreamList": _envelope(
            "streams", {"type": "array", "items": {"$ref": "#/components/schemas/Stream"}}
        ),
        "StreamOne": _envelope("stream", {"$ref": "#/components/schemas/Stream"}),
        "SessionList": _envelope("sessions", {"type": "array", "items": _ANY_OBJECT}),
        "Rtc": _envelope("rtc", _ANY_OBJECT),
        "Http": _envelope("http", _ANY_OBJECT),
        "Workers": _envelope("workers", _ANY_OBJECT),
        "Client": client,
        "ClientList": _envelope(
            "clients", {"type": "array", "items": {"$ref": "#/components/schemas/Client"}}
        ),
        "ClientOne": _envelope("client", {"$ref": "#/components/schemas/Client"}),
        "Kicked": {
            "type": "object",
            "properties": {
                "code": {"type": "integer", "const": 0},
                "kicked": {"type": "string"},
                "type": {"type": "string"},
            },
        },
        "Metrics": {"type": "string", "description": "Prometheus text exposition format"},
    }
