"""What a configuration reload (SIGHUP) may change while sessions keep running.

Pure: compares the running configuration with a newly loaded one and builds the
configuration to run with next: the new values of the keys in RELOADABLE, the old
values of every other key. Keys that differ but cannot change without dropping sessions
or sockets (ports, codecs, buffers) are reported, not applied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from srsrelay.config import Config, validate

RELOADABLE: frozenset[str] = frozenset(
    {
        "log.level",
        "auth.publish_keys",
        "hooks.on_publish",
        "hooks.on_unpublish",
        "hooks.on_play",
        "hooks.on_stop",
        "hooks.timeout",
        "hooks.fail_open",
        "api.access",
        "api.tokens",
        "http.whep_tokens",
        "http.whep_rate_limit",
        "http.whep_rate_burst",
        "http.max_body_size",
        "http.cors_origins",
        "rtc.max_viewers",
        "rtc.max_viewers_per_stream",
        "rtmp.max_publishers",
        "rtmp.max_connections_per_ip",
        "rtmp.max_tag_rate",
        "rtmp.handshake_timeout",
        "rtmp.idle_timeout",
    }
)
"""Keys ("section.key") applied on reload. Limits and timeouts apply to what comes next
(new connections, publishes, requests); running sessions keep what they started with."""


@dataclass(frozen=True)
class ReloadPlan:
    """The outcome of comparing the running configuration with a reloaded one."""

    config: Config
    """The configuration to run with: new values of the applied keys, old ones elsewhere."""
    applied: tuple[str, ...]
    """Changed keys that take effect now, sorted."""
    needs_restart: tuple[str, ...]
    """Changed keys that are not applied (they need a restart), sorted."""


def changed_keys(old: Config, new: Config) -> list[str]:
    """Every "section.key" whose value differs between `old` and `new`, sorted."""
    keys = []
    for section in dataclasses.fields(Config):
        old_section = getattr(old, section.name)
        new_section = getattr(new, section.name)
        for key in dataclasses.fields(old_section):
            if getattr(old_section, key.name) != getattr(new_section, key.name):
                keys.append(f"{section.name}.{key.name}")
    return sorted(keys)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """The configuration to switch to when `new` was loaded while `old` runs.

    Raises ConfigError if the mix of new and kept values is not valid (a kept key
    depends on an applied one), naming the keys; nothing is applied then.
    """
    changed = changed_keys(old, new)
    applied = tuple(k for k in changed if k in RELOADABLE)
    needs_restart = tuple(k for k in changed if k not in RELOADABLE)
    updates: dict[str, dict[str, Any]] = {}
    for name in applied:
        section, key = name.split(".", 1)
        updates.setdefault(section, {})[key] = getattr(getattr(new, section), key)
    sections = {
        section: dataclasses.replace(getattr(old, section), **values)
        for section, values in updates.items()
    }
    config = dataclasses.replace(old, **sections)
    validate(config)
    return ReloadPlan(config, applied, needs_restart)
