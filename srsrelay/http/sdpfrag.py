"""SDP fragments of type application/trickle-ice-sdpfrag (RFC 8840 section 9), sans-I/O.

A WHEP player PATCHes one to its session URL to trickle candidates or to restart ICE
(draft-ietf-wish-whep section 4.3; RFC 9725 section 4.3). `parse_sdpfrag` checks the
syntax of what we read (ice-ufrag, ice-pwd, ice-options, m=, mid, candidates,
end-of-candidates) and ignores other attributes; `build_sdpfrag` writes our reply to an
ICE restart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

SDPFRAG_TYPE = "application/trickle-ice-sdpfrag"

MAX_SDPFRAG_LINES = 1000
"""Lines accepted in one fragment (a browser sends a few dozen at most)."""

_ICE_CHARS = re.compile(r"^[A-Za-z0-9+/]+$")
"""ice-char of RFC 8839 section 5.4."""
UFRAG_LENGTH = (4, 256)
"""ice-ufrag length bounds, RFC 8839 section 5.4."""
PWD_LENGTH = (22, 256)
"""ice-pwd length bounds, RFC 8839 section 5.4."""
_M_LINE = re.compile(r"^(\S+) (\d+)(?:/\d+)? (\S+)(?: (.*))?$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
"""RFC 8866 token."""
_FOUNDATION = re.compile(r"^[A-Za-z0-9+/]{1,32}$")
"""RFC 8839 section 5.1 foundation: 1 to 32 ice-chars."""
_ADDRESS = re.compile(r"^[A-Za-z0-9.:%_-]{1,255}$")
"""An IPv4/IPv6 address (with zone) or an FQDN such as an mDNS name."""
_LINE_TYPES = frozenset("amc")
"""RFC 8840 section 9: a fragment has attribute lines and media descriptions (m=, c=)."""


class SdpFragError(ValueError):
    """The fragment is malformed; the message names the line and what is wrong."""


@dataclass(frozen=True, slots=True)
class FragMedia:
    """One m= section of a fragment."""

    kind: str
    """Media type of the m= line, e.g. "video"."""
    mid: str | None
    """a=mid of the section, if given."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """The fields of an a=candidate line we check (RFC 8839 section 5.1)."""

    foundation: str
    component: int
    transport: str
    """Transport as written, e.g. "udp" or "tcp"."""
    priority: int
    address: str
    """Connection address: an IP address or an FQDN (mDNS names end in .local)."""
    port: int
    typ: str
    """host, srflx, prflx or relay."""
    mid: str | None
    """a=mid of the m= section the candidate is in (None before any m= line)."""


@dataclass(frozen=True, slots=True)
class SdpFrag:
    """A parsed application/trickle-ice-sdpfrag body."""

    ice_ufrag: str | None
    """a=ice-ufrag (session or media level; all occurrences agree)."""
    ice_pwd: str | None
    """a=ice-pwd (session or media level; all occurrences agree)."""
    ice_options: tuple[str, ...] = ()
    """a=ice-options tokens."""
    media: tuple[FragMedia, ...] = ()
    """m= sections in order."""
    candidates: tuple[Candidate, ...] = ()
    """a=candidate lines in order."""
    end_of_candidates: bool = False
    """a=end-of-candidates was present."""
    ignored: tuple[str, ...] = field(default=())
    """Names of other attributes, which we do not act on."""


def parse_sdpfrag(text: str) -> SdpFrag:
    """Parse a fragment; raises SdpFragError with a message a person can act on."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise SdpFragError(
            "the sdpfrag is empty: send a=ice-ufrag, a=ice-pwd and a=candidate lines"
        )
    if len(lines) > MAX_SDPFRAG_LINES:
        raise SdpFragError(f"the sdpfrag has more than {MAX_SDPFRAG_LINES} lines")

    ufrag: str | None = None
    pwd: str | None = None
    options: list[str] = []
    media: list[FragMedia] = []
    candidates: list[Candidate] = []
    end = False
    ignored: list[str] = []
    mid: str | None = None
    kind: str | None = None

    def close_media() -> None:
        if kind is not None:
            media.append(FragMedia(kind, mid))

    for number, line in enumerate(lines, start=1):
        where = f"sdpfrag line {number}"
        if len(line) < 2 or line[1] != "=" or line[0] not in _LINE_TYPES:
            if line.startswith("v=0"):
                raise SdpFragError(
                    f"{where}: a full SDP was sent; PATCH takes only the ICE lines "
                    f"(RFC 8840 section 9), e.g. a=ice-ufrag, a=ice-pwd, a=candidate"
                )
            raise SdpFragError(
                f"{where}: expected an a=, m= or c= line, got {_clip(line)!r} (RFC 8840 section 9)"
            )
        value = line[2:]
        if line[0] == "c":
            continue
        if line[0] == "m":
            m = _M_LINE.match(value)
            if m is None or int(m.group(2)) > 65535:
                raise SdpFragError(
                    f"{where}: bad m= line {_clip(line)!r}; expected m=<media> <port> <proto> <fmt>"
                )
            close_media()
            kind, mid = m.group(1), None
            continue
        name, _, attr = value.partition(":")
        if name == "ice-ufrag":
            ufrag = _same(
                where, "ice-ufrag", ufrag, _ice_string(where, "ice-ufrag", attr, UFRAG_LENGTH)
            )
        elif name == "ice-pwd":
            pwd = _same(where, "ice-pwd", pwd, _ice_string(where, "ice-pwd", attr, PWD_LENGTH))
        elif name == "ice-options":
            tokens = attr.split()
            if not tokens or not all(_TOKEN.match(t) for t in tokens):
                raise SdpFragError(f"{where}: bad a=ice-options {_clip(attr)!r}")
            options.extend(t for t in tokens if t not in options)
        elif name == "mid":
            if kind is None:
                raise SdpFragError(f"{where}: a=mid must follow an m= line")
            if not _TOKEN.match(attr):
                raise SdpFragError(f"{where}: bad a=mid {_clip(attr)!r}")
            mid = attr
        elif name == "candidate":
            candidates.append(_candidate(where, attr, mid))
        elif name == "end-of-candidates":
            end = True
        elif name not in ignored:
            ignored.append(name)
    close_media()
    return SdpFrag(
        ice_ufrag=ufrag,
        ice_pwd=pwd,
        ice_options=tuple(options),
        media=tuple(media),
        candidates=tuple(candidates),
        end_of_candidates=end,
        ignored=tuple(ignored),
    )


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _ice_string(where: str, name: str, value: str, bounds: tuple[int, int]) -> str:
    low, high = bounds
    if not _ICE_CHARS.match(value) or not low <= len(value) <= high:
        raise SdpFragError(
            f"{where}: bad a={name} {_clip(value)!r}; it must be {low}-{high} characters "
            f"of letters, digits, + and / (RFC 8839 section 5.4)"
        )
    return value


def _same(where: str, name: str, old: str | None, new: str) -> str:
    if old is not None and old != new:
        raise SdpFragError(f"{where}: a={name} {new!r} differs from the earlier {old!r}")
    return new


def _candidate(where: str, value: str, mid: str | None) -> Candidate:
    # foundation component transport priority address port "typ" type *(extension)
    fields = value.split()
    if len(fields) < 8 or fields[6] != "typ":
        raise SdpFragError(
            f"{where}: bad a=candidate {_clip(value)!r}; expected "
            f"<foundation> <component> <transport> <priority> <address> <port> typ <type> "
            f"(RFC 8839 section 5.1)"
        )
    foundation, component, transport, priority, address, port, _, typ = fields[:8]
    if not _FOUNDATION.match(foundation):
        raise SdpFragError(f"{where}: bad candidate foundation {_clip(foundation)!r}")
    numbers = {"component": (component, 1, 256), "priority": (priority, 1, 2**31 - 1)}
    numbers["port"] = (port, 0, 65535)
    for what, (text, low, high) in numbers.items():
        if not text.isdigit() or not low <= int(text) <= high:
            raise SdpFragError(f"{where}: bad candidate {what} {_clip(text)!r} ({low}-{high})")
    if not _TOKEN.match(transport) or not _TOKEN.match(typ) or not _ADDRESS.match(address):
        raise SdpFragError(f"{where}: bad a=candidate {_clip(value)!r}")
    return Candidate(
        foundation=foundation,
        component=int(component),
        transport=transport,
        priority=int(priority),
        address=address,
        port=int(port),
        typ=typ,
        mid=mid,
    )


@dataclass(frozen=True, slots=True)
class LocalCandidate:
    """One of our host candidates for the reply."""

    priority: int
    address: str
    port: int


def build_sdpfrag(
    *,
    ice_ufrag: str,
    ice_pwd: str,
    media: FragMedia,
    candidates: Sequence[LocalCandidate],
    m_line_rest: str = "9 UDP/TLS/RTP/SAVPF 0",
    ice_lite: bool = True,
) -> str:
    """Our reply to an ICE restart (draft-ietf-wish-whep section 4.3.3): the new
    credentials and our full candidate list, for the offerer-tagged m= section only
    (max-bundle). It repeats a=ice-lite as the answer had it."""
    out: list[str] = []
    if ice_lite:
        out.append("a=ice-lite")
    out.append(f"m={media.kind} {m_line_rest}")
    if media.mid is not None:
        out.append(f"a=mid:{media.mid}")
    out.append(f"a=ice-ufrag:{ice_ufrag}")
    out.append(f"a=ice-pwd:{ice_pwd}")
    for n, c in enumerate(candidates):
        out.append(f"a=candidate:{n + 1} 1 udp {c.priority} {c.address} {c.port} typ host")
    out.append("a=end-of-candidates")
    return "\r\n".join(out) + "\r\n"
