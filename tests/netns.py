"""Network namespaces with traffic shaping for the low-bandwidth scenarios.

Everything runs on the namespace's own loopback, so the relay can use its default
ports and no shaping touches the host. Two shapes (this kernel has no netem/prio):

- `shape_downlinks`: lo's ingress is redirected to an ifb device whose htb has one
  class per viewer address. A packet dropped there is already sent as far as the
  relay knows: this models a weak viewer's downlink.
- `shape_egress`: an htb root qdisc on lo limits what leaves one UDP source port.
  Until a packet leaves the qdisc it is charged to the sending socket's SO_SNDBUF,
  so a long queue here models the relay host's own saturated uplink.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
ALIASES = ("127.0.0.2/8", "127.0.0.3/8")
"""Loopback aliases added in every namespace (127.0.0.0/8 is local anyway)."""
IFB = "ifb0"
_counter = itertools.count()


class NetnsError(RuntimeError):
    """An ip/tc command failed; the message has the command and its stderr."""


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network shaping tests need root (ip netns, tc)"
    for tool in (IP, TC):
        if not os.path.exists(tool):
            return f"{tool} is not installed (iproute2)"
    probe = f"srsprobe{os.getpid()}"
    proc = _run([IP, "netns", "add", probe], check=False)
    if proc.returncode != 0:
        return f"ip netns is unavailable: {proc.stderr.strip()}"
    _run([IP, "netns", "delete", probe], check=False)
    return None


@dataclass
class Netns:
    """One network namespace; `delete()` kills what runs inside and removes it."""

    name: str

    @classmethod
    def create(cls, prefix: str = "srs") -> Netns:
        name = f"{prefix}{os.getpid()}x{next(_counter)}"
        _run([IP, "netns", "add", name])
        ns = cls(name)
        try:
            ns.ip("link", "set", "lo", "up")
            for alias in ALIASES:
                ns.ip("addr", "add", alias, "dev", "lo")
        except Exception:
            ns.delete()
            raise
        return ns

    def ip(self, *args: str) -> str:
        return _run([IP, "-n", self.name, *args]).stdout

    def tc(self, *args: str) -> str:
        return _run([TC, "-n", self.name, *args]).stdout

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` prefixed so that they run inside the namespace."""
        return [IP, "netns", "exec", self.name, *args]

    def pids(self) -> list[int]:
        proc = _run([IP, "netns", "pids", self.name], check=False)
        return [int(p) for p in proc.stdout.split() if p.strip().isdigit()]

    def kill_all(self, grace: float = 3.0) -> None:
        """SIGTERM every process in the namespace, then SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                pids = self.pids()
                time.sleep(0.1)
            if not pids:
                return

    def delete(self) -> None:
        self.kill_all()
        _run([IP, "netns", "delete", self.name], check=False)

    def qdisc_stats(self) -> str:
        """`tc -s qdisc` of every device, for the report (drops, backlog)."""
        out = _run([TC, "-n", self.name, "-s", "qdisc", "show"], check=False).stdout
        return out.strip()

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def shape_downlinks(ns: Netns, addrs: Sequence[str], rate_kbit: int, queue: int = 40) -> None:
    """Limit what arrives for each of `addrs` (a viewer's downlink) to `rate_kbit`.

    Packets to these addresses are redirected from lo's ingress to an ifb device; its
    htb root has one class per address with a `queue`-packet FIFO (at 500 kbit/s, 40
    packets of 1.2 kB are about 0.8 s, a home router's buffer). Other traffic is
    untouched (htb default 0 sends unclassified packets directly).
    """
    ns.ip("link", "add", IFB, "type", "ifb")
    ns.ip("link", "set", IFB, "up")
    ns.tc("qdisc", "add", "dev", IFB, "root", "handle", "1:", "htb")
    ns.tc("qdisc", "add", "dev", "lo", "handle", "ffff:", "ingress")
    for i, addr in enumerate(addrs):
        minor = f"{0x10 + i:x}"
        ns.tc(
            "class", "add", "dev", IFB, "parent", "1:", "classid", f"1:{minor}",
            "htb", "rate", f"{rate_kbit}kbit", "ceil", f"{rate_kbit}kbit", "burst", "15k",
        )  # fmt: skip
        ns.tc(
            "qdisc", "add", "dev", IFB, "parent", f"1:{minor}", "handle", f"{minor}:",
            "pfifo", "limit", str(queue),
        )  # fmt: skip
        ns.tc(
            "filter", "add", "dev", IFB, "parent", "1:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "dst", f"{addr}/32", "flowid", f"1:{minor}",
        )  # fmt: skip
        ns.tc(
            "filter", "add", "dev", "lo", "parent", "ffff:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "dst", f"{addr}/32",
            "action", "mirred", "egress", "redirect", "dev", IFB,
        )  # fmt: skip


def shape_egress(ns: Netns, sport: int, rate_kbit: int, queue_bytes: int = 8 << 20) -> None:
    """Limit UDP leaving source port `sport` to `rate_kbit`, behind a long FIFO.

    The FIFO (`queue_bytes`) is far larger than any SO_SNDBUF, so the sending socket's
    buffer, not the qdisc, is what fills up. TCP (RTMP ingest, HTTP API) is untouched.
    """
    ns.tc("qdisc", "replace", "dev", "lo", "root", "handle", "1:", "htb")
    ns.tc(
        "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10",
        "htb", "rate", f"{rate_kbit}kbit", "ceil", f"{rate_kbit}kbit", "burst", "15k",
    )  # fmt: skip
    ns.tc(
        "qdisc", "add", "dev", "lo", "parent", "1:10", "handle", "10:",
        "bfifo", "limit", str(queue_bytes),
    )  # fmt: skip
    ns.tc(
        "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
        "u32", "match", "ip", "protocol", "17", "0xff",
        "match", "ip", "sport", str(sport), "0xffff", "flowid", "1:10",
    )  # fmt: skip
