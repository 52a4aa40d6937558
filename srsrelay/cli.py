"""The `srsrelay` command: load the configuration, run the relay until SIGINT/SIGTERM;
SIGHUP reloads the configuration file (and the environment)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import structlog

from srsrelay import __version__
from srsrelay.config import Config, ConfigError, load_config
from srsrelay.log import configure_logging
from srsrelay.reload import plan_reload

if typing.TYPE_CHECKING:
    from srsrelay.app import Relay

log = structlog.get_logger(__name__)

DEFAULT_CONFIG = Path("conf/relay.toml")
"""Used when -c is not given and the file exists (relative to the working directory)."""
EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_CONFIG_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="srsrelay",
        description="RTMP in, WebRTC (WHEP) out: a media relay.",
        epilog="Settings can be overridden with SRSRELAY_<SECTION>_<KEY> environment variables.",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="PATH",
        help=f"TOML configuration file (default: {DEFAULT_CONFIG} if it exists, "
        "else built-in defaults)",
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration and exit (0 ok, 2 bad)"
    )
    parser.add_argument("--version", action="version", version=f"srsrelay {__version__}")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG_ERROR

    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    try:
        config = load_config(path, os.environ)
    except ConfigError as exc:
        print(f"srsrelay: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    source = str(path) if path is not None else "built-in defaults"
    if args.check:
        print(f"srsrelay: config ok: {source}")
        return EXIT_OK

    configure_logging(config.log)
    log.info("configuration loaded", source=source, version=__version__)
    return asyncio.run(serve(config, path))


async def serve(config: Config, path: Path | None = None) -> int:
    """Start the relay, wait for SIGINT or SIGTERM, stop it gracefully. SIGHUP reloads
    the configuration from `path` (built-in defaults if None) and the environment."""
    # Imported here so that `--check` and `--version` do not load the media stack.
    from srsrelay.app import Relay, StartError

    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        if len(received) > 1:
            log.warning("signal received again, still stopping", signal=sig.name)
        shutdown.set()

    relay: Relay | None = None

    def on_hangup() -> None:
        if relay is not None and not received:
            reload_config(relay, path)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        relay = Relay(config)
        try:
            await relay.start()
        except StartError as exc:
            log.error("relay failed to start", error=str(exc))
            print(f"srsrelay: {exc}", file=sys.stderr)
            return EXIT_RUNTIME_ERROR
        log.info(
            "relay started",
            rtmp=f"{config.rtmp.listen}:{relay.rtmp_port}",
            http=f"{config.http.listen}:{relay.http_port}",
            rtc=f"{config.rtc.listen}:{relay.rtc_port}",
            rtmp_port=relay.rtmp_port,
            http_port=relay.http_port,
            rtc_port=relay.rtc_port,
        )
        await shutdown.wait()
        log.info("relay stopping", signal=received[0], timeout=config.daemon.shutdown_timeout)
        await relay.stop()
        log.info("relay stopped")
        return EXIT_OK
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def reload_config(relay: Relay, path: Path | None) -> bool:
    """Load the configuration again and apply what can change while running. A file that
    does not load leaves the running configuration as it is; the error says why.
    Returns whether the new configuration was taken."""
    source = str(path) if path is not None else "built-in defaults"
    log.info("reloading configuration", source=source)
    try:
        new = load_config(path, os.environ)
        plan = plan_reload(relay.config, new)
    except ConfigError as exc:
        log.error("config reload failed; keeping the running configuration", error=str(exc))
        return False
    if "log.level" in plan.applied:
        # First, so that the reload's own log lines follow the new level.
        configure_logging(plan.config.log)
    relay.reload(new)
    return True


def run() -> None:
    """Entry point of the `srsrelay` console script."""
    sys.exit(main())
