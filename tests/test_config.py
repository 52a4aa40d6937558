"""Configuration loading: defaults, TOML, environment overrides and exact error messages."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from srsrelay.config import (
    Config,
    ConfigError,
    HttpConfig,
    RtcConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "conf" / "relay.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_env() -> None:
    assert load_config(None, {}) == Config()


def test_shipped_file_equals_builtin_defaults() -> None:
    assert load_config(SHIPPED, {}) == Config()


def test_shipped_file_lists_every_key() -> None:
    data = tomllib.loads(SHIPPED.read_text())
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        expected = {f.name for f in dataclasses.fields(cls)}
        assert set(data.get(section.name, {})) == expected, section.name


def test_file_values_are_used(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[rtc]
port = 8001
candidates = ["192.0.2.10", "::1"]
ice_servers = ["stun:stun.example.org:3478"]

[daemon]
shutdown_timeout = 2

[hub]
takeover = true
""",
    )
    config = load_config(path, {})
    assert config.rtc.port == 8001
    assert config.rtc.candidates == ("192.0.2.10", "::1")
    assert config.rtc.ice_servers == ("stun:stun.example.org:3478",)
    assert config.daemon.shutdown_timeout == 2.0
    assert isinstance(config.daemon.shutdown_timeout, float)
    assert config.hub.takeover is True
    assert config.rtmp == Config().rtmp


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[rtc]\nport = 8001\n")
    env = {
        "SRSRELAY_RTC_PORT": "8002",
        "SRSRELAY_RTC_CANDIDATES": "127.0.0.1, 10.0.0.5",
        "SRSRELAY_HUB_TAKEOVER": "yes",
        "SRSRELAY_HTTP_MAX_BODY_SIZE": "1024",
        "SRSRELAY_DAEMON_SHUTDOWN_TIMEOUT": "1.5",
        "SRSRELAY_LOG_LEVEL": "debug",
        "PATH": "/usr/bin",
    }
    config = load_config(path, env)
    assert config.rtc == dataclasses.replace(
        RtcConfig(), port=8002, candidates=("127.0.0.1", "10.0.0.5")
    )
    assert config.hub.takeover is True
    assert config.http == dataclasses.replace(HttpConfig(), max_body_size=1024)
    assert config.daemon.shutdown_timeout == 1.5
    assert config.log.level == "debug"


@pytest.mark.parametrize(
    ("word", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)],
)
def test_env_booleans(word: str, expected: bool) -> None:
    assert load_config(None, {"SRSRELAY_HUB_TAKEOVER": word}).hub.takeover is expected


def test_whep_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[http]
whep_tokens = ["abc-DEF_123.~+/=", "second"]
whep_wait_for_publisher = 3
whep_rate_limit = 0
whep_rate_burst = 5

[rtc]
ice_servers = ["stun:stun.example.org:3478", "turn:turn.example.org:3478?transport=udp"]
ice_username = "user"
ice_credential = "pass word!"
max_viewers = 2
max_viewers_per_stream = 1
""",
    )
    config = load_config(path, {"SRSRELAY_HTTP_WHEP_TOKENS": "t1, t2"})
    assert config.http.whep_tokens == ("t1", "t2")
    assert config.http.whep_wait_for_publisher == 3.0
    assert (config.http.whep_rate_limit, config.http.whep_rate_burst) == (0.0, 5)
    assert (config.rtc.ice_username, config.rtc.ice_credential) == ("user", "pass word!")
    assert (config.rtc.max_viewers, config.rtc.max_viewers_per_stream) == (2, 1)


def test_env_empty_list() -> None:
    env = {"SRSRELAY_RTC_ICE_SERVERS": ""}
    assert load_config(None, env).rtc.ice_servers == ()


def test_port_zero_means_any_free_port() -> None:
    env = {"SRSRELAY_RTMP_PORT": "0", "SRSRELAY_HTTP_PORT": "0", "SRSRELAY_RTC_PORT": "0"}
    config = load_config(None, env)
    assert (config.rtmp.port, config.http.port, config.rtc.port) == (0, 0, 0)


BAD_TOML = [
    ("[rtc]\nport = 70000\n", "rtc.port: must be 0-65535, got 70000"),
    ("[rtc]\nport = -1\n", "rtc.port: must be 0-65535, got -1"),
    ("[rtc]\nprot = 8000\n", "rtc.prot: unknown key"),
    ("[rtcc]\nport = 8000\n", 'unknown section "rtcc"'),
    ("port = 8000\n", 'unknown section "port"'),
    ("rtc = 5\n", "rtc: must be a [rtc] table, got 5"),
    ('[rtmp]\nport = "abc"\n', 'rtmp.port: must be an integer, got "abc"'),
    ("[rtmp]\nport = 1935.0\n", "rtmp.port: must be an integer, got 1935.0"),
    ("[rtmp]\nport = true\n", "rtmp.port: must be an integer, got true"),
    ('[rtmp]\nidle_timeout = "30"\n', 'rtmp.idle_timeout: must be a number, got "30"'),
    ("[rtmp]\nidle_timeout = 0\n", "rtmp.idle_timeout: must be greater than 0, got 0"),
    ("[rtmp]\nidle_timeout = nan\n", "rtmp.idle_timeout: must be greater than 0, got nan"),
    ("[rtmp]\nidle_timeout = inf\n", "rtmp.idle_timeout: must be greater than 0, got inf"),
    ("[rtmp]\nlisten = 0\n", "rtmp.listen: must be a string, got 0"),
    ('[rtmp]\nlisten = "localhost"\n', 'rtmp.listen: not an IP address: "localhost"'),
    ("[rtmp]\nchunk_size = 64\n", "rtmp.chunk_size: must be 128-16777215, got 64"),
    (
        "[rtmp]\nmax_message_size = 16777216\n",
        "rtmp.max_message_size: must be 4096-16777215, got 16777216",
    ),
    ('[hub]\ntakeover = "yes"\n', 'hub.takeover: must be true or false, got "yes"'),
    ("[hub]\ngop_cache_frames = 0\n", "hub.gop_cache_frames: must be greater than 0, got 0"),
    ("[hub]\ngop_cache_bytes = -5\n", "hub.gop_cache_bytes: must be greater than 0, got -5"),
    ("[audio]\nopus_bitrate = 1000\n", "audio.opus_bitrate: must be 6000-510000, got 1000"),
    ("[hub]\nreconnect_grace = -1\n", "hub.reconnect_grace: must be 0-300, got -1"),
    ("[hub]\nreconnect_grace = 301.5\n", "hub.reconnect_grace: must be 0-300, got 301.5"),
    (
        '[video]\nbframes = "reorder"\n',
        'video.bframes: must be one of drop, transcode, passthrough, got "reorder"',
    ),
    ("[video]\nbframes = 0\n", "video.bframes: must be a string, got 0"),
    (
        "[video]\ntranscode_keyframe_interval = 0.1\n",
        "video.transcode_keyframe_interval: must be 0.5-10, got 0.1",
    ),
    (
        "[video]\ntranscode_keyframe_interval = 60\n",
        "video.transcode_keyframe_interval: must be 0.5-10, got 60",
    ),
    (
        '[log]\nlevel = "loud"\n',
        'log.level: must be one of debug, info, warning, error, got "loud"',
    ),
    ('[log]\nformat = "xml"\n', 'log.format: must be one of auto, console, json, got "xml"'),
    (
        "[daemon]\nshutdown_timeout = -1\n",
        "daemon.shutdown_timeout: must be greater than 0, got -1",
    ),
    ("[http]\nmax_body_size = 0\n", "http.max_body_size: must be greater than 0, got 0"),
    ("[http]\ncors_origins = []\n", "http.cors_origins: must not be empty"),
    (
        '[http]\ncors_origins = ["*", "example.com"]\n',
        'http.cors_origins[1]: must be "*" or an origin like "https://example.com", '
        'got "example.com"',
    ),
    (
        '[http]\ncors_origins = ["https://example.com/app"]\n',
        'http.cors_origins[0]: must be "*" or an origin like "https://example.com", '
        'got "https://example.com/app"',
    ),
    ('[http]\ncors_origins = "*"\n', 'http.cors_origins: must be a list of strings, got "*"'),
    ("[rtc]\ncandidates = []\n", "rtc.candidates: must not be empty"),
    ('[rtc]\ncandidates = ["127.0.0.1", "foo"]\n', 'rtc.candidates[1]: not an IP address: "foo"'),
    ('[rtc]\ncandidates = ["127.0.0.1", 5]\n', "rtc.candidates[1]: must be a string, got 5"),
    (
        '[rtc]\ncandidates = ["0.0.0.0"]\n',
        'rtc.candidates[0]: must be an address viewers can reach, not "0.0.0.0"',
    ),
    (
        '[rtc]\nice_servers = ["http://example.org"]\n',
        "rtc.ice_servers[0]: must be a stun:, turn: or turns: URL with a host, "
        'got "http://example.org"',
    ),
    (
        '[rtc]\nice_servers = ["stun:"]\n',
        'rtc.ice_servers[0]: must be a stun:, turn: or turns: URL with a host, got "stun:"',
    ),
    ("[rtc]\npayload_size = 200\n", "rtc.payload_size: must be 300-1400, got 200"),
    ("[rtc]\npayload_size = 1500\n", "rtc.payload_size: must be 300-1400, got 1500"),
    (
        "[rtc]\nnack_history = 500\n",
        "rtc.nack_history: must be a power of two from 16 to 32768, got 500",
    ),
    (
        "[rtc]\nnack_history = 8\n",
        "rtc.nack_history: must be a power of two from 16 to 32768, got 8",
    ),
    ("[rtc]\nretransmit_budget = 1.5\n", "rtc.retransmit_budget: must be 0-1, got 1.5"),
    ("[rtc]\ncatchup_speed = 1.0\n", "rtc.catchup_speed: must be 1.5-20, got 1"),
    ("[rtc]\ncongestion_loss = -0.1\n", "rtc.congestion_loss: must be 0-1, got -0.1"),
    ("[rtc]\ncontrol_queue = 0\n", "rtc.control_queue: must be greater than 0, got 0"),
    ("[rtc]\noverload_timeout = 0\n", "rtc.overload_timeout: must be greater than 0, got 0"),
    ("[rtc]\nsndbuf = 0\n", "rtc.sndbuf: must be greater than 0, got 0"),
    ("[rtc]\ndtls_timeout = 0.0\n", "rtc.dtls_timeout: must be greater than 0, got 0"),
    (
        '[rtc]\nice_servers = ["stun:stun.example.org> rel=x"]\n',
        "rtc.ice_servers[0]: must not contain spaces, commas, quotes, < or >, "
        'got "stun:stun.example.org> rel=x"',
    ),
    (
        '[rtc]\nice_servers = ["turn:t.example.org"]\nice_username = "u"\n',
        "rtc.ice_username and rtc.ice_credential must be set together",
    ),
    (
        '[rtc]\nice_servers = ["turn:t.example.org"]\nice_credential = "p"\n',
        "rtc.ice_username and rtc.ice_credential must be set together",
    ),
    (
        '[rtc]\nice_servers = ["stun:s.example.org"]\nice_username = "u"\nice_credential = "p"\n',
        "rtc.ice_username: set, but rtc.ice_servers has no turn: or turns: URL to use it",
    ),
    (
        '[rtc]\nice_servers = ["turn:t.example.org"]\nice_username = "u"\n'
        'ice_credential = "p\\"w"\n',
        'rtc.ice_credential: must not contain ", \\ or control characters',
    ),
    (
        '[rtc]\nice_servers = ["turn:t.example.org"]\nice_username = "a\\nb"\n'
        'ice_credential = "p"\n',
        'rtc.ice_username: must not contain ", \\ or control characters',
    ),
    ("[rtc]\nice_username = 5\n", "rtc.ice_username: must be a string, got 5"),
    ("[rtc]\nmax_viewers = 0\n", "rtc.max_viewers: must be greater than 0, got 0"),
    (
        "[rtc]\nmax_viewers_per_stream = -1\n",
        "rtc.max_viewers_per_stream: must be 0-1000, got -1",
    ),
    (
        "[rtc]\nmax_viewers = 10\nmax_viewers_per_stream = 11\n",
        "rtc.max_viewers_per_stream: must be 0-10, got 11",
    ),
    (
        '[http]\nwhep_tokens = ["good", "has space"]\n',
        "http.whep_tokens[1]: must be letters, digits and - . _ ~ + / "
        "(optionally ending in =), as a bearer token (RFC 6750)",
    ),
    (
        '[http]\nwhep_tokens = [""]\n',
        "http.whep_tokens[0]: must be letters, digits and - . _ ~ + / "
        "(optionally ending in =), as a bearer token (RFC 6750)",
    ),
    (
        '[http]\nwhep_tokens = "secret"\n',
        'http.whep_tokens: must be a list of strings, got "secret"',
    ),
    (
        "[http]\nwhep_wait_for_publisher = -1\n",
        "http.whep_wait_for_publisher: must be 0-60, got -1",
    ),
    (
        "[http]\nwhep_wait_for_publisher = 61.5\n",
        "http.whep_wait_for_publisher: must be 0-60, got 61.5",
    ),
    (
        "[http]\nwhep_wait_for_publisher = nan\n",
        "http.whep_wait_for_publisher: must be 0-60, got nan",
    ),
    ("[http]\nwhep_rate_limit = -0.5\n", "http.whep_rate_limit: must be 0-100000, got -0.5"),
    ("[http]\nwhep_rate_burst = 0\n", "http.whep_rate_burst: must be 1-100000, got 0"),
    ("[rtmp]\nmax_tag_rate = 10\n", "rtmp.max_tag_rate: must be 50-100000, got 10"),
    ("[rtmp]\nmax_publishers = 0\n", "rtmp.max_publishers: must be greater than 0, got 0"),
    (
        "[rtmp]\nmax_connections_per_ip = -1\n",
        "rtmp.max_connections_per_ip: must be greater than 0, got -1",
    ),
    (
        '[video]\ntranscode_to_h264 = "on"\n',
        'video.transcode_to_h264: must be true or false, got "on"',
    ),
    ('[api]\naccess = "public"\n', 'api.access: must be one of local, token, open, got "public"'),
    (
        '[api]\naccess = "token"\n',
        'api.tokens: must list at least one token when api.access = "token"',
    ),
    (
        '[api]\ntokens = ["a b"]\n',
        "api.tokens[0]: must be letters, digits and - . _ ~ + / (optionally ending in =), "
        "as a bearer token (RFC 6750)",
    ),
    (
        '[auth]\npublish_keys = ["ok", "a&b"]\n',
        "auth.publish_keys[1]: must be 1-256 letters, digits and - . _ ~ (a URL query value)",
    ),
    (
        '[hooks]\non_publish = "ftp://x/"\n',
        'hooks.on_publish: must be an http:// or https:// URL, got "ftp://x/"',
    ),
    (
        '[hooks]\non_stop = "http://"\n',
        'hooks.on_stop: must be an http:// or https:// URL, got "http://"',
    ),
    ("[hooks]\ntimeout = 0\n", "hooks.timeout: must be 0.1-30, got 0"),
    ('[hooks]\nfail_open = "no"\n', 'hooks.fail_open: must be true or false, got "no"'),
]


@pytest.mark.parametrize(("text", "message"), BAD_TOML)
def test_bad_toml(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {})
    assert str(info.value) == message


BAD_ENV = [
    ({"SRSRELAY_RTC_PORT": "70000"}, "rtc.port: must be 0-65535, got 70000"),
    ({"SRSRELAY_RTMP_PORT": "abc"}, 'rtmp.port: must be an integer, got "abc"'),
    ({"SRSRELAY_RTMP_IDLE_TIMEOUT": "soon"}, 'rtmp.idle_timeout: must be a number, got "soon"'),
    ({"SRSRELAY_HUB_TAKEOVER": "maybe"}, 'hub.takeover: must be true or false, got "maybe"'),
    (
        {"SRSRELAY_VIDEO_BFRAMES": "keep"},
        'video.bframes: must be one of drop, transcode, passthrough, got "keep"',
    ),
    ({"SRSRELAY_HUB_RECONNECT_GRACE": "soon"}, 'hub.reconnect_grace: must be a number, got "soon"'),
    ({"SRSRELAY_RTC_PROT": "8000"}, "SRSRELAY_RTC_PROT: unknown key rtc.prot"),
    ({"SRSRELAY_RTC": "8000"}, "SRSRELAY_RTC: unknown key rtc.?"),
    ({"SRSRELAY_RTCC_PORT": "8000"}, 'SRSRELAY_RTCC_PORT: unknown section "rtcc"'),
    ({"SRSRELAY_RTC_CANDIDATES": ""}, "rtc.candidates: must not be empty"),
    (
        {"SRSRELAY_RTC_CANDIDATES": "127.0.0.1,foo"},
        'rtc.candidates[1]: not an IP address: "foo"',
    ),
    (
        {"SRSRELAY_LOG_LEVEL": "loud"},
        'log.level: must be one of debug, info, warning, error, got "loud"',
    ),
]


@pytest.mark.parametrize(("env", "message"), BAD_ENV)
def test_bad_env(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env)
    assert str(info.value) == message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})
    assert str(info.value) == f"{tmp_path}: is a directory, not a TOML file"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[rtc]\nport = 8000\ncandidates 127.0.0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == (
        f"{path}: TOML syntax error: "
        "Expected '=' after a key in a key/value pair (at line 3, column 12)"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b"[rtc]\n# \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value).startswith(f"{path}: not UTF-8 text: ")


def test_video_and_reconnect_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[hub]\nreconnect_grace = 0\n[video]\nbframes = "transcode"\n'
        "transcode_keyframe_interval = 1.5\n",
    )
    config = load_config(path, {"SRSRELAY_VIDEO_BFRAMES": "passthrough"})
    assert config.hub.reconnect_grace == 0.0
    assert config.video.bframes == "passthrough"
    assert config.video.transcode_keyframe_interval == 1.5
    assert load_config(None, {}).video.bframes == "drop"
    assert load_config(None, {}).hub.reconnect_grace == 10.0
