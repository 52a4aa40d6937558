"""Configuration: defaults, then the TOML file, then environment, then validation.

Every setting lives in a frozen dataclass below; the field's default is the
built-in default and `conf/relay.toml` must equal these (a test checks it).
Environment overrides are named ``SRSRELAY_<SECTION>_<KEY>``, for example
``SRSRELAY_RTC_PORT=8001``; list values are comma-separated.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "SRSRELAY_"
MAX_WORKERS = 64
"""Highest daemon.workers."""
INT_OR_WORD_KEYS = frozenset({"daemon.workers"})
"""String settings a TOML file may also give as an integer (workers = 2)."""


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message names the key."""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    """debug, info, warning or error."""
    format: str = "auto"
    """auto (console on a TTY, JSON otherwise), console or json."""


@dataclass(frozen=True)
class DaemonConfig:
    shutdown_timeout: float = 5.0
    """Seconds a graceful stop (SIGINT/SIGTERM) may take before sessions are dropped."""
    workers: str = "1"
    """Processes serving viewers: 1 serves them in the relay's own process; N (2-64)
    or "auto" (one per CPU core) runs that many worker processes, each with its own RTC
    port, fed each stream once by the ingest process."""


@dataclass(frozen=True)
class RtmpConfig:
    listen: str = "0.0.0.0"
    port: int = 1935
    chunk_size: int = 4096
    """Outgoing chunk size we announce with Set Chunk Size."""
    window_ack_size: int = 2_500_000
    """Window Acknowledgement Size we announce; we acknowledge the peer at its window."""
    max_message_size: int = 8 * 1024 * 1024
    """Largest RTMP message accepted; a bigger one closes the connection."""
    handshake_timeout: float = 10.0
    """Seconds allowed to complete the handshake and publish."""
    idle_timeout: float = 30.0
    """Seconds without any byte from a connected client before it is closed."""
    max_publishers: int = 100
    """Most streams being published at once; one more publish is refused."""
    max_connections_per_ip: int = 10
    """Most RTMP connections from one IP address at once; more are closed at accept."""
    max_tag_rate: int = 300
    """Audio and video messages per second a publisher may send on average; a burst of
    4 seconds' worth is allowed (a backlog after a stall). More closes the publish."""


@dataclass(frozen=True)
class HubConfig:
    takeover: bool = False
    """A second publisher on a live stream replaces the first instead of being refused."""
    gop_cache_frames: int = 600
    """Most video frames kept from the last keyframe, for new viewers."""
    gop_cache_bytes: int = 16 * 1024 * 1024
    """Most payload bytes kept in one stream's GOP cache."""
    reconnect_grace: float = 10.0
    """Seconds a stream and its viewers wait for a publisher that disconnected; a new
    publisher on the same name within that time continues the stream. 0 ends it at once."""


@dataclass(frozen=True)
class VideoConfig:
    bframes: str = "drop"
    """What to do with H.264 B-frames: drop (non-reference ones), transcode or passthrough."""
    transcode_keyframe_interval: float = 2.0
    """Seconds between keyframes of a re-encoded stream."""
    transcode_to_h264: bool = False
    """HEVC and AV1 streams are also re-encoded once to H.264 for viewers that cannot
    receive them; off: such viewers get 406 naming the codec."""


@dataclass(frozen=True)
class AudioConfig:
    opus_bitrate: int = 64_000
    """Opus encoder bitrate, bits per second."""
    pacing: float = 0.05
    """Seconds audio is held so it leaves evenly at its own timestamps (publishers send
    AAC in bursts around video frames); 0 sends it as it arrives."""


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "0.0.0.0"
    port: int = 1985
    max_body_size: int = 64 * 1024
    """Largest WHEP request body (the SDP offer), bytes."""
    cors_origins: tuple[str, ...] = ("*",)
    """Origins allowed to call WHEP from a browser; "*" allows all."""
    whep_tokens: tuple[str, ...] = ()
    """Bearer tokens accepted on WHEP requests (RFC 6750); empty turns authentication off."""
    whep_wait_for_publisher: float = 0.0
    """Seconds a WHEP POST for a stream that is not live waits for its publisher before the
    409 answer; 0 answers at once."""
    whep_rate_limit: float = 20.0
    """WHEP POSTs per second allowed from one IP address (token bucket); 0 turns it off."""
    whep_rate_burst: int = 40
    """WHEP POSTs one IP address may send at once before whep_rate_limit applies."""


@dataclass(frozen=True)
class RtcConfig:
    listen: str = "0.0.0.0"
    port: int = 8000
    candidates: tuple[str, ...] = ("127.0.0.1",)
    """Addresses announced as ICE host candidates (all on `port`)."""
    ice_servers: tuple[str, ...] = ()
    """STUN/TURN URLs offered to clients. Empty: the relay contacts no outside host."""
    ice_username: str = ""
    """Username for the turn:/turns: URLs in ice_servers (long-term credentials)."""
    ice_credential: str = ""
    """Password for the turn:/turns: URLs in ice_servers."""
    max_viewers: int = 1000
    """Most viewer sessions at once; a WHEP POST beyond it is answered 503."""
    max_viewers_per_stream: int = 0
    """Most viewer sessions of one stream; 0 means only max_viewers applies."""
    payload_size: int = 1200
    """Largest RTP payload, bytes (RFC 6184 FU-A fragments up to this)."""
    sndbuf: int = 32 * 1024
    """SO_SNDBUF of the RTC socket, bytes (Linux doubles it). Small on purpose: the kernel
    queue behind it delays every STUN reply, and 64 KiB drain in 0.5 s at 1 Mbit/s."""
    rcvbuf: int = 1024 * 1024
    """SO_RCVBUF of the RTC socket, bytes."""
    catchup_speed: float = 4.0
    """How much faster than real time a new viewer is sent the cached GOP before going
    live (1.5-20); 4 catches up a 10 s old keyframe in 3.3 s."""
    dtls_timeout: float = 10.0
    """Seconds a viewer has to complete ICE and DTLS after the answer."""
    consent_timeout: float = 30.0
    """Seconds without a STUN request from a viewer before its session is closed."""
    control_queue: int = 256
    """Most STUN, DTLS and RTCP datagrams held while the socket is blocked; media is dropped."""
    nack_history: int = 512
    """RTP packets remembered per viewer and track for retransmission (a power of two)."""
    retransmit_budget: float = 0.15
    """Retransmitted bytes allowed per viewer, as a fraction of its media bytes."""
    keyframe_request_interval: float = 1.0
    """Seconds between two PLI/FIR of one viewer that are acted on; others are counted."""
    keyframe_cache_age: float = 1.0
    """A PLI/FIR is answered from the cached keyframe when it is at most this old, seconds;
    otherwise the viewer waits for the publisher's next keyframe."""
    congestion_loss: float = 0.1
    """Loss fraction (from RR or NACKs) above which a viewer counts as congested."""
    overload_timeout: float = 10.0
    """Seconds a viewer may stay congested before it is disconnected."""


@dataclass(frozen=True)
class ApiConfig:
    access: str = "local"
    """Who may use /api/v1/... and /metrics: "local" (loopback clients only), "token"
    (any client with a bearer token from `tokens`) or "open". /api/v1/health is open."""
    tokens: tuple[str, ...] = ()
    """Bearer tokens for access = "token" (RFC 6750)."""


@dataclass(frozen=True)
class AuthConfig:
    publish_keys: tuple[str, ...] = ()
    """Keys a publisher must give as ?key=<key> after the stream name; empty: none needed."""


@dataclass(frozen=True)
class HooksConfig:
    on_publish: str = ""
    """URL POSTed (JSON) before a publish starts; a 2xx answer allows it. Empty: no hook."""
    on_unpublish: str = ""
    """URL POSTed when a publish ends (its answer is not waited on for anything)."""
    on_play: str = ""
    """URL POSTed before a WHEP viewer is accepted; a 2xx answer allows it."""
    on_stop: str = ""
    """URL POSTed when a viewer session ends."""
    timeout: float = 2.0
    """Seconds a hook may take to answer."""
    fail_open: bool = False
    """A hook that is down, slow or answers garbage allows the action (true) or refuses
    it (false)."""


@dataclass(frozen=True)
class Config:
    log: LogConfig = field(default_factory=LogConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    rtmp: RtmpConfig = field(default_factory=RtmpConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    rtc: RtcConfig = field(default_factory=RtcConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
API_ACCESS = ("local", "token", "open")
HOOK_TIMEOUT_RANGE = (0.1, 30.0)
ICE_URL_SCHEMES = ("stun:", "turn:", "turns:")
PAYLOAD_SIZE_RANGE = (300, 1400)
"""RTP payload bounds: below 300 bytes fragmentation overhead dominates; above 1400 the
packet plus RTP/SRTP/UDP/IP headers may not fit a 1500-byte Ethernet MTU."""
RTMP_CHUNK_SIZE_RANGE = (128, 0xFFFFFF)
"""RTMP chunk sizes: 128 is the protocol default; a message length is a 24-bit field."""
RTMP_MESSAGE_SIZE_RANGE = (4096, 0xFFFFFF)
TAG_RATE_RANGE = (50, 100_000)
WAIT_FOR_PUBLISHER_RANGE = (0.0, 60.0)
"""Seconds a WHEP POST may wait for a publisher; longer holds connections for nothing."""
RATE_LIMIT_RANGE = (0.0, 100_000.0)
RATE_BURST_RANGE = (1, 100_000)
BFRAMES_POLICIES = ("drop", "transcode", "passthrough")
RECONNECT_GRACE_RANGE = (0.0, 300.0)
"""Seconds; longer keeps viewers of a dead stream connected for nothing."""
KEYFRAME_INTERVAL_RANGE = (0.5, 10.0)
"""Seconds between transcoded keyframes: shorter wastes bits, longer delays joins."""
OPUS_BITRATE_RANGE = (6_000, 510_000)
"""RFC 6716 section 2.1.1: Opus covers 6 kb/s to 510 kb/s."""
_BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_STREAM_KEY = re.compile(r"^[A-Za-z0-9\-._~]{1,256}$")
_HOOK_URL = re.compile(r"^https?://[^\s/?#]+(?:[/?#]\S*)?$")
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def load_config(path: Path | None, environ: Mapping[str, str]) -> Config:
    """Build the configuration: defaults, then the TOML file at `path` (if any), then
    ``SRSRELAY_<SECTION>_<KEY>`` variables from `environ`, then validation.

    Raises ConfigError with a message that names the file, key or variable.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    if path is not None:
        _merge_toml(values, _read_toml(path))
    _merge_env(values, environ)
    sections = {name: _section_type(name)(**kwargs) for name, kwargs in values.items()}
    config = Config(**sections)
    validate(config)
    return config


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A configuration from sections as TOML or dataclasses.asdict() give them
    (how the relay hands its configuration to its worker processes). Raises ConfigError."""
    values: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    _merge_toml(values, dict(data))
    config = Config(**{name: _section_type(name)(**kwargs) for name, kwargs in values.items()})
    validate(config)
    return config


def _sections() -> dict[str, type[Any]]:
    """Section name -> its dataclass, in declaration order."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _section_type(section: str) -> type[Any]:
    return _sections()[section]


def _keys(section: str) -> dict[str, Any]:
    """Key name -> its type hint, for one section."""
    cls = _section_type(section)
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        # The message ends with "(at line L, column C)".
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None


def _merge_toml(values: dict[str, dict[str, Any]], data: dict[str, Any]) -> None:
    for section, table in data.items():
        if section not in values:
            raise ConfigError(f"unknown section {_show(section)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: must be a [{section}] table, got {_show(table)}")
        keys = _keys(section)
        for key, raw in table.items():
            if key not in keys:
                raise ConfigError(f"{section}.{key}: unknown key")
            values[section][key] = _from_toml(f"{section}.{key}", keys[key], raw)


def _merge_env(values: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> None:
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
        if section not in values:
            raise ConfigError(f"{var}: unknown section {_show(section)}")
        keys = _keys(section)
        if key not in keys:
            raise ConfigError(f"{var}: unknown key {section}.{key or '?'}")
        values[section][key] = _from_env(f"{section}.{key}", keys[key], environ[var])


def _from_toml(name: str, hint: Any, raw: Any) -> Any:
    if hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{name}: must be true or false, got {_show(raw)}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{name}: must be an integer, got {_show(raw)}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{name}: must be a number, got {_show(raw)}")
        return float(raw)
    if hint is str:
        if name in INT_OR_WORD_KEYS and isinstance(raw, int) and not isinstance(raw, bool):
            return str(raw)
        if not isinstance(raw, str):
            raise ConfigError(f"{name}: must be a string, got {_show(raw)}")
        return raw
    if _is_str_tuple(hint):
        if not isinstance(raw, list):
            raise ConfigError(f"{name}: must be a list of strings, got {_show(raw)}")
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                raise ConfigError(f"{name}[{i}]: must be a string, got {_show(item)}")
        return tuple(raw)
    raise TypeError(f"{name}: no conversion for {hint!r}")


def _from_env(name: str, hint: Any, raw: str) -> Any:
    text = raw.strip()
    if hint is bool:
        if text.lower() not in _BOOL_WORDS:
            raise ConfigError(f"{name}: must be true or false, got {_show(raw)}")
        return _BOOL_WORDS[text.lower()]
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}: must be an integer, got {_show(raw)}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name}: must be a number, got {_show(raw)}") from None
    if hint is str:
        return text
    if _is_str_tuple(hint):
        return tuple(item.strip() for item in text.split(",") if item.strip())
    raise TypeError(f"{name}: no conversion for {hint!r}")


def _is_str_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, Ellipsis)


def _show(value: Any) -> str:
    """A value as the user wrote it: strings quoted, booleans in TOML spelling."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def validate(config: Config) -> None:
    """Check value ranges; raise ConfigError naming the first bad key."""
    _one_of("log.level", config.log.level, LOG_LEVELS)
    _one_of("log.format", config.log.format, LOG_FORMATS)
    _positive("daemon.shutdown_timeout", config.daemon.shutdown_timeout)
    worker_count(config.daemon)

    rtmp = config.rtmp
    _ip("rtmp.listen", rtmp.listen)
    _port("rtmp.port", rtmp.port)
    _between("rtmp.chunk_size", rtmp.chunk_size, *RTMP_CHUNK_SIZE_RANGE)
    _between("rtmp.window_ack_size", rtmp.window_ack_size, 1, 0xFFFFFFFF)
    _between("rtmp.max_message_size", rtmp.max_message_size, *RTMP_MESSAGE_SIZE_RANGE)
    _positive("rtmp.handshake_timeout", rtmp.handshake_timeout)
    _positive("rtmp.idle_timeout", rtmp.idle_timeout)
    _between("rtmp.max_tag_rate", rtmp.max_tag_rate, *TAG_RATE_RANGE)
    _positive("rtmp.max_publishers", rtmp.max_publishers)
    _positive("rtmp.max_connections_per_ip", rtmp.max_connections_per_ip)

    _positive("hub.gop_cache_frames", config.hub.gop_cache_frames)
    _positive("hub.gop_cache_bytes", config.hub.gop_cache_bytes)
    _range("hub.reconnect_grace", config.hub.reconnect_grace, *RECONNECT_GRACE_RANGE)
    _one_of("video.bframes", config.video.bframes, BFRAMES_POLICIES)
    _range(
        "video.transcode_keyframe_interval",
        config.video.transcode_keyframe_interval,
        *KEYFRAME_INTERVAL_RANGE,
    )
    _between("audio.opus_bitrate", config.audio.opus_bitrate, *OPUS_BITRATE_RANGE)
    _range("audio.pacing", config.audio.pacing, 0.0, 0.5)

    http = config.http
    _ip("http.listen", http.listen)
    _port("http.port", http.port)
    _positive("http.max_body_size", http.max_body_size)
    _non_empty("http.cors_origins", http.cors_origins)
    for i, origin in enumerate(http.cors_origins):
        _origin(f"http.cors_origins[{i}]", origin)
    for i, token in enumerate(http.whep_tokens):
        _bearer_token(f"http.whep_tokens[{i}]", token)
    _range("http.whep_wait_for_publisher", http.whep_wait_for_publisher, *WAIT_FOR_PUBLISHER_RANGE)
    _range("http.whep_rate_limit", http.whep_rate_limit, *RATE_LIMIT_RANGE)
    _between("http.whep_rate_burst", http.whep_rate_burst, *RATE_BURST_RANGE)

    rtc = config.rtc
    _ip("rtc.listen", rtc.listen)
    _port("rtc.port", rtc.port)
    workers = worker_count(config.daemon)
    if workers > 1 and rtc.port and rtc.port + workers - 1 > 65535:
        raise ConfigError(
            f"rtc.port: {workers} worker processes (daemon.workers) take ports "
            f"{rtc.port}-{rtc.port + workers - 1}, beyond 65535; lower rtc.port"
        )
    _non_empty("rtc.candidates", rtc.candidates)
    for i, candidate in enumerate(rtc.candidates):
        _candidate(f"rtc.candidates[{i}]", candidate)
    for i, url in enumerate(rtc.ice_servers):
        _ice_url(f"rtc.ice_servers[{i}]", url)
    _ice_credentials(rtc)
    _positive("rtc.max_viewers", rtc.max_viewers)
    _between("rtc.max_viewers_per_stream", rtc.max_viewers_per_stream, 0, rtc.max_viewers)
    _between("rtc.payload_size", rtc.payload_size, *PAYLOAD_SIZE_RANGE)
    _positive("rtc.sndbuf", rtc.sndbuf)
    _positive("rtc.rcvbuf", rtc.rcvbuf)
    if not 1.5 <= rtc.catchup_speed <= 20:
        raise ConfigError(f"rtc.catchup_speed: must be 1.5-20, got {rtc.catchup_speed:g}")
    _positive("rtc.dtls_timeout", rtc.dtls_timeout)
    _positive("rtc.consent_timeout", rtc.consent_timeout)
    _positive("rtc.control_queue", rtc.control_queue)
    _power_of_two("rtc.nack_history", rtc.nack_history, 16, 32768)
    _fraction("rtc.retransmit_budget", rtc.retransmit_budget)
    _positive("rtc.keyframe_request_interval", rtc.keyframe_request_interval)
    _positive("rtc.keyframe_cache_age", rtc.keyframe_cache_age)
    _fraction("rtc.congestion_loss", rtc.congestion_loss)
    _positive("rtc.overload_timeout", rtc.overload_timeout)

    api = config.api
    _one_of("api.access", api.access, API_ACCESS)
    for i, token in enumerate(api.tokens):
        _bearer_token(f"api.tokens[{i}]", token)
    if api.access == "token" and not api.tokens:
        raise ConfigError('api.tokens: must list at least one token when api.access = "token"')
    for i, key in enumerate(config.auth.publish_keys):
        _stream_key(f"auth.publish_keys[{i}]", key)
    hooks = config.hooks
    for name in ("on_publish", "on_unpublish", "on_play", "on_stop"):
        _hook_url(f"hooks.{name}", getattr(hooks, name))
    _range("hooks.timeout", hooks.timeout, *HOOK_TIMEOUT_RANGE)


def worker_count(daemon: DaemonConfig) -> int:
    """daemon.workers as a number of processes ("auto": the CPU cores this process may
    use); 1 means no worker processes. Raises ConfigError."""
    value = daemon.workers.strip().lower()
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if value.isdigit() and 1 <= int(value) <= MAX_WORKERS:
        return int(value)
    raise ConfigError(
        f"daemon.workers: must be auto or an integer 1-{MAX_WORKERS}, got {_show(daemon.workers)}"
    )


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: must be one of {', '.join(allowed)}, got {_show(value)}")


def _positive(name: str, value: float) -> None:
    # `not value > 0` also rejects NaN.
    if not value > 0 or value == float("inf"):
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        raise ConfigError(f"{name}: must be greater than 0, got {shown}")


def _between(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name}: must be {low}-{high}, got {value}")


def _power_of_two(name: str, value: int, low: int, high: int) -> None:
    # Ring buffers index with `seq & (size - 1)`.
    if not low <= value <= high or value & (value - 1):
        raise ConfigError(f"{name}: must be a power of two from {low} to {high}, got {value}")


def _fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigError(f"{name}: must be 0-1, got {value:g}")


def _range(name: str, value: float, low: float, high: float) -> None:
    # `not low <= value` also rejects NaN.
    if not low <= value <= high:
        raise ConfigError(f"{name}: must be {low:g}-{high:g}, got {value:g}")


def _port(name: str, value: int) -> None:
    # 0 asks the OS for any free port (used by tests; the bound port is logged at start).
    _between(name, value, 0, 65535)


def _non_empty(name: str, value: tuple[str, ...]) -> None:
    if not value:
        raise ConfigError(f"{name}: must not be empty")


def _ip(name: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{name}: not an IP address: {_show(value)}") from None


def _candidate(name: str, value: str) -> None:
    _ip(name, value)
    if ipaddress.ip_address(value).is_unspecified:
        raise ConfigError(f"{name}: must be an address viewers can reach, not {_show(value)}")


def _ice_url(name: str, value: str) -> None:
    scheme = next((s for s in ICE_URL_SCHEMES if value.startswith(s)), None)
    if scheme is None or len(value) == len(scheme):
        raise ConfigError(
            f"{name}: must be a stun:, turn: or turns: URL with a host, got {_show(value)}"
        )
    # The URL is sent inside <...> of a Link header (RFC 8288).
    if any(c in '<>" ,' or ord(c) < 0x21 or ord(c) > 0x7E for c in value):
        raise ConfigError(
            f"{name}: must not contain spaces, commas, quotes, < or >, got {_show(value)}"
        )


def _stream_key(name: str, value: str) -> None:
    # Carried in the RTMP stream name's query string: no separators, no spaces.
    if not _STREAM_KEY.match(value):
        raise ConfigError(f"{name}: must be 1-256 letters, digits and - . _ ~ (a URL query value)")


def _hook_url(name: str, value: str) -> None:
    if value and not _HOOK_URL.match(value):
        raise ConfigError(f"{name}: must be an http:// or https:// URL, got {_show(value)}")


def _bearer_token(name: str, value: str) -> None:
    # RFC 6750 section 2.1 b64token. The value is a secret: it is not repeated here.
    if not _BEARER_TOKEN.match(value):
        raise ConfigError(
            f"{name}: must be letters, digits and - . _ ~ + / (optionally ending in =), "
            f"as a bearer token (RFC 6750)"
        )


def _ice_credentials(rtc: RtcConfig) -> None:
    # Both go into quoted strings of the Link header (RFC 8288): no quotes, backslashes
    # or control characters. The values are secrets: they are not repeated here.
    for name, value in (
        ("rtc.ice_username", rtc.ice_username),
        ("rtc.ice_credential", rtc.ice_credential),
    ):
        if any(c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ConfigError(f'{name}: must not contain ", \\ or control characters')
    if bool(rtc.ice_username) != bool(rtc.ice_credential):
        raise ConfigError("rtc.ice_username and rtc.ice_credential must be set together")
    if rtc.ice_username and not any(u.startswith(("turn:", "turns:")) for u in rtc.ice_servers):
        raise ConfigError(
            "rtc.ice_username: set, but rtc.ice_servers has no turn: or turns: URL to use it"
        )


def _origin(name: str, value: str) -> None:
    if value == "*":
        return
    scheme, sep, rest = value.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
        raise ConfigError(
            f'{name}: must be "*" or an origin like "https://example.com", got {_show(value)}'
        )
