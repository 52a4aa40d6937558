"""Importing the relay must not reconfigure logging (pyrtmp set root to DEBUG on import)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import logging
import srsrelay.app, srsrelay.cli, srsrelay.rtmp.server, srsrelay.webrtc.server
root = logging.getLogger()
print(logging.getLevelName(root.level), len(root.handlers))
"""


def test_import_leaves_root_logger_alone() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["WARNING", "0"], out.stdout + out.stderr
