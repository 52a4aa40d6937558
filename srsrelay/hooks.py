"""Publish and play authorization: static publish keys and SRS-style HTTP hooks.

Hooks ([hooks] in the config) are URLs POSTed a JSON body
``{"action", "client_id", "ip", "app", "stream", "param", "token"}``; notifications add
``"reason"``. ``param`` is the query string with its leading "?" (as SRS sends it), or "".

How an answer of on_publish / on_play is judged (`judge`), named by its outcome:

- "allowed": 2xx with an empty body, the body ``0``, a JSON object without "code" or with
  ``"code": 0``, or another JSON value that is not a number (SRS hook servers answer ``0``
  or ``{"code": 0}``).
- "refused": 4xx, or 2xx with a non-zero JSON number or ``{"code": <anything but 0>}``.
- "garbage": 2xx whose body is not JSON (or larger than MAX_RESPONSE_BYTES).
- "error": 5xx, 1xx/3xx (redirects are not followed) or no connection.
- "timeout": no full answer within hooks.timeout.

"error", "timeout" and "garbage" mean the hook is broken: hooks.fail_open decides.
Notifications (on_unpublish, on_stop) are judged the same way only for counting.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import structlog

from srsrelay.config import AuthConfig, HooksConfig

log = structlog.get_logger(__name__)

DECISION_HOOKS = ("on_publish", "on_play")
"""Hooks whose answer allows or refuses an action."""
NOTIFICATION_HOOKS = ("on_unpublish", "on_stop")
"""Hooks that are told about an event; their answer changes nothing."""
OUTCOMES = ("allowed", "refused", "timeout", "error", "garbage")
"""Every outcome a hook call is counted under (the label set of `HookClient.results`)."""
MAX_PENDING_NOTIFICATIONS = 256
"""Notifications in flight at once; more are dropped and counted (a slow hook server must
not make the relay hold tasks without bound)."""
MAX_CONNECTIONS = 64
"""Open HTTP connections to hook servers; more requests wait (within hooks.timeout)."""
MAX_RESPONSE_BYTES = 64 * 1024
"""Largest hook answer body read; a bigger one counts as garbage."""
LOG_INTERVAL = 1.0
"""Seconds between two log lines about refusals or failures of the same hook."""
PUBLISH_KEY_PARAM = "key"
"""Query parameter of the RTMP stream name carrying the publish key (auth.publish_keys)."""


def judge(status: int, body: bytes) -> str:
    """The outcome ("allowed", "refused", "error" or "garbage") of a hook's answer."""
    if 400 <= status < 500:
        return "refused"
    if not 200 <= status < 300:
        return "error"
    if len(body) > MAX_RESPONSE_BYTES:
        return "garbage"
    text = body.strip()
    if not text:
        return "allowed"
    try:
        value = json.loads(text)
    except ValueError:  # also UnicodeDecodeError
        return "garbage"
    if isinstance(value, dict):
        if "code" not in value:
            return "allowed"
        return "allowed" if value["code"] in (0, "0") and value["code"] is not False else "refused"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "allowed" if value == 0 else "refused"
    return "allowed"


def decide(outcome: str, fail_open: bool) -> bool:
    """Whether an outcome allows the action."""
    if outcome == "allowed":
        return True
    if outcome == "refused":
        return False
    return fail_open


def hook_param(query: str) -> str:
    """The "param" field: the query string with a leading "?" (SRS style), or ""."""
    query = query.lstrip("?")
    return f"?{query}" if query else ""


def request_body(
    *, client_id: str, ip: str, app: str, stream: str, param: str = "", token: str = ""
) -> dict[str, str]:
    """The JSON body of a hook call, without "action" (HookClient adds it)."""
    return {
        "client_id": client_id,
        "ip": ip,
        "app": app,
        "stream": stream,
        "param": hook_param(param),
        "token": token,
    }


def publish_key(query: str) -> str:
    """The ?key= value of an RTMP stream name's query string ("" when there is none)."""
    values = parse_qs(query.lstrip("?"), keep_blank_values=True).get(PUBLISH_KEY_PARAM, [])
    return values[-1] if values else ""


class PublishAuth:
    """auth.publish_keys, replaceable at run time (reload) with `update`."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._digests: list[bytes] = []
        self.update(config)

    def update(self, config: AuthConfig) -> None:
        """Use `config` for publishes from now on; live publishes are not re-checked."""
        self.config = config
        # Compared as SHA-256 digests so every comparison has the same length.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in config.publish_keys]

    def check(self, query: str) -> str | None:
        """None if the stream name's query string carries an accepted key, else why not."""
        if not self._digests:
            return None
        key = publish_key(query)
        if not key:
            return "missing ?key= (auth.publish_keys): publish to <app>/<stream>?key=<key>"
        digest = hashlib.sha256(key.encode()).digest()
        accepted = False
        for known in self._digests:  # no early exit: the time does not depend on which
            accepted |= hmac.compare_digest(digest, known)
        if not accepted:
            return "wrong ?key= (not one of auth.publish_keys)"
        return None


class _Throttle:
    """Says when a log line about one hook is due (at most one per LOG_INTERVAL)."""

    def __init__(self) -> None:
        self._logged_at: dict[str, float] = {}
        """Hook name -> `now` of its last line; at most one entry per hook name."""

    def due(self, hook: str, now: float) -> bool:
        last = self._logged_at.get(hook)
        if last is not None and now - last < LOG_INTERVAL:
            return False
        self._logged_at[hook] = now
        return True


class HookClient:
    """Calls the [hooks] URLs over one aiohttp session (opened by `start`, closed by `stop`).

    `call` asks on_publish / on_play and returns whether the action is allowed; `notify`
    tells on_unpublish / on_stop in a background task (at most MAX_PENDING_NOTIFICATIONS
    in flight). A hook whose URL is empty allows everything and is never called.
    """

    def __init__(
        self, config: HooksConfig, *, max_pending: int = MAX_PENDING_NOTIFICATIONS
    ) -> None:
        self.config = config
        self.max_pending = max_pending
        self.results: Counter[tuple[str, str]] = Counter()
        """(hook name, outcome) -> calls; outcomes are those of OUTCOMES."""
        self.notify_dropped: Counter[str] = Counter()
        """Hook name -> notifications dropped because MAX_PENDING_NOTIFICATIONS were in flight."""
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._throttle = _Throttle()

    def update(self, config: HooksConfig) -> None:
        """Use `config` (URLs, timeout, fail_open) for calls from now on."""
        self.config = config

    def enabled(self, hook: str) -> bool:
        """Whether `hook` has a URL."""
        return bool(self._url(hook))

    @property
    def pending(self) -> int:
        """Notifications in flight."""
        return len(self._pending)

    async def start(self) -> None:
        if self._session is not None:
            raise RuntimeError("HookClient already started")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            # Hook servers are local services: no proxy settings from the environment.
            trust_env=False,
        )

    async def stop(self) -> None:
        """Give notifications in flight up to hooks.timeout, cancel the rest, close."""
        pending = list(self._pending)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.config.timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def call(self, hook: str, body: dict[str, Any]) -> bool:
        """Ask on_publish or on_play about `body` (see `request_body`); True = allowed."""
        allowed, _ = await self.check(hook, body)
        return allowed

    async def check(self, hook: str, body: dict[str, Any]) -> tuple[bool, str]:
        """Like `call`, also returning why: a reason a user can act on ("" if allowed)."""
        if hook not in DECISION_HOOKS:
            raise ValueError(f"{hook} is not one of {', '.join(DECISION_HOOKS)}")
        if not self.enabled(hook):
            return True, ""
        fail_open = self.config.fail_open
        outcome, detail = await self._post(hook, body)
        allowed = decide(outcome, fail_open)
        if outcome == "allowed":
            return True, ""
        if outcome == "refused":
            reason = f"refused by the {hook} hook ({detail})"
        else:
            setting = "allowed anyway" if fail_open else "refused"
            reason = f"the {hook} hook failed ({detail}); {setting} as hooks.fail_open = " + (
                "true" if fail_open else "false"
            )
        self._log(hook, outcome, reason, body)
        return allowed, "" if allowed else reason

    def notify(self, hook: str, body: dict[str, Any]) -> None:
        """Tell on_unpublish or on_stop about `body` without waiting for the answer."""
        if hook not in NOTIFICATION_HOOKS:
            raise ValueError(f"{hook} is not one of {', '.join(NOTIFICATION_HOOKS)}")
        if not self.enabled(hook):
            return
        if len(self._pending) >= self.max_pending:
            self.notify_dropped[hook] += 1
            if self._throttle.due(f"{hook} dropped", time.monotonic()):
                log.warning(
                    "hook notification dropped",
                    hook=hook,
                    reason=f"{self.max_pending} notifications already in flight",
                    dropped=self.notify_dropped[hook],
                )
            return
        task = asyncio.get_running_loop().create_task(self._notify(hook, body), name=hook)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _notify(self, hook: str, body: dict[str, Any]) -> None:
        outcome, detail = await self._post(hook, body)
        if outcome != "allowed":
            self._log(hook, outcome, f"the {hook} hook failed ({detail})", body)

    def _url(self, hook: str) -> str:
        url = getattr(self.config, hook, "")
        return url if isinstance(url, str) else ""

    async def _post(self, hook: str, body: dict[str, Any]) -> tuple[str, str]:
        """POST to the hook; returns (outcome, detail for the log) and counts the outcome."""
        outcome, detail = await self._request(hook, {"action": hook, **body})
        self.results[(hook, outcome)] += 1
        return outcome, detail

    async def _request(self, hook: str, body: dict[str, Any]) -> tuple[str, str]:
        session = self._session
        if session is None:
            return "error", "the hook client is not running"
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout):
                async with session.post(self._url(hook), json=body, allow_redirects=False) as resp:
                    data = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                    status = resp.status
        except TimeoutError:
            return "timeout", f"no answer within hooks.timeout = {timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return "error", f"cannot reach it: {exc or type(exc).__name__}"
        outcome = judge(status, data)
        if outcome == "garbage":
            return outcome, f"HTTP {status} with a body that is not JSON: {_excerpt(data)}"
        if outcome == "refused" and 200 <= status < 300:
            return outcome, f"HTTP {status}, {_excerpt(data)}"
        return outcome, f"HTTP {status}"

    def _log(self, hook: str, outcome: str, reason: str, body: dict[str, Any]) -> None:
        if not self._throttle.due(hook, time.monotonic()):
            return
        log.warning(
            "hook refused" if outcome == "refused" else "hook failed",
            hook=hook,
            outcome=outcome,
            reason=reason,
            app=body.get("app"),
            stream=body.get("stream"),
            client_id=body.get("client_id"),
            count=self.results[(hook, outcome)],
        )


def _excerpt(data: bytes, limit: int = 60) -> str:
    text = data[:limit].decode("utf-8", "replace").strip()
    return repr(text + ("..." if len(data) > limit else ""))
