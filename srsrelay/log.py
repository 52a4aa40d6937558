"""Logging setup: structlog for our own events, with the stdlib loggers of the
libraries we use (aiortc, aioice, aiohttp, asyncio) rendered through the same output.

Nothing here runs on import; `configure_logging` is called once by the daemon.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog
from structlog.typing import Processor

from srsrelay.config import LogConfig

LIBRARY_LOGGERS = ("aiortc", "aioice", "aiohttp", "asyncio", "av", "py.warnings")
"""Stdlib loggers of third-party code; they are only shown at WARNING and above."""

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_handler: logging.Handler | None = None
"""The handler installed on the root logger, replaced on reconfiguration."""


def configure_logging(config: LogConfig, stream: IO[str] | None = None) -> None:
    """Send every log event to `stream` (standard error by default), as JSON lines
    or human-readable console lines depending on `config.format`."""
    global _handler
    out = stream if stream is not None else sys.stderr
    level = _LEVELS[config.level]
    library_level = max(level, logging.WARNING)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Not cached, so that a later configure_logging call applies to existing loggers.
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *_render(config.format, out),
            ],
        )
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(library_level)
    logging.getLogger("srsrelay").setLevel(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    logging.captureWarnings(True)


def _render(fmt: str, out: IO[str]) -> list[Processor]:
    tty = _isatty(out)
    if fmt == "console" or (fmt == "auto" and tty):
        return [structlog.dev.ConsoleRenderer(colors=tty)]
    return [
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ]


def _isatty(out: Any) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):
        return False
