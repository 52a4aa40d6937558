"""ICE-lite (RFC 8445 section 2.5) for all viewers on one socket, sans-I/O.

We only answer STUN Binding requests (RFC 5389) with short-term credentials: the
USERNAME is "<our ufrag>:<their ufrag>" and MESSAGE-INTEGRITY is keyed with our
ice-pwd. The source address of a valid request becomes the viewer's remote address;
a request with USE-CANDIDATE (nomination) always moves it there. Requests also serve
as consent freshness (RFC 7675).
"""

from __future__ import annotations

import enum
import secrets
import string
import struct
from dataclasses import dataclass

from aioice import stun

UFRAG_LENGTH = 8
"""Characters in our ice-ufrag (RFC 8839: at least 4)."""
PWD_LENGTH = 24
"""Characters in our ice-pwd (RFC 8839: at least 22)."""
_ICE_CHARS = string.ascii_letters + string.digits  # a subset of RFC 8839 ice-char

STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"


def random_ice_string(length: int) -> str:
    return "".join(secrets.choice(_ICE_CHARS) for _ in range(length))


class StunDrop(enum.Enum):
    """Why a STUN datagram got no response."""

    MALFORMED = "malformed"
    NOT_BINDING_REQUEST = "not_binding_request"
    NO_USERNAME = "no_username"
    UNKNOWN_UFRAG = "unknown_ufrag"
    WRONG_REMOTE_UFRAG = "wrong_remote_ufrag"
    BAD_INTEGRITY = "bad_integrity"
    BAD_FINGERPRINT = "bad_fingerprint"


class IceSession:
    """ICE state of one viewer: credentials, selected remote address, consent."""

    __slots__ = (
        "ufrag",
        "pwd",
        "remote_ufrag",
        "remote_addr",
        "nominated",
        "last_consent",
        "requests",
        "generation",
        "__weakref__",  # weak references find closed viewers that are still held
    )

    def __init__(self, remote_ufrag: str, ufrag: str | None = None, pwd: str | None = None):
        self.ufrag = ufrag or random_ice_string(UFRAG_LENGTH)
        """Our ice-ufrag; identifies the viewer in USERNAME."""
        self.pwd = pwd or random_ice_string(PWD_LENGTH)
        """Our ice-pwd; the MESSAGE-INTEGRITY key."""
        self.remote_ufrag = remote_ufrag
        """The viewer's ice-ufrag from its offer."""
        self.remote_addr: tuple[str, int] | None = None
        """Where we send to: the nominated address, else the first checked one."""
        self.nominated = False
        """True once a request carried USE-CANDIDATE."""
        self.last_consent: float | None = None
        """`now` of the last valid request from `remote_addr`."""
        self.requests = 0
        """Valid Binding requests answered."""
        self.generation = 0
        """ICE restarts so far (RFC 8445 section 9); part of the WHEP resource's ETag."""

    def on_binding(self, addr: tuple[str, int], use_candidate: bool, now: float) -> bool:
        """Record a valid request; returns True if `remote_addr` changed."""
        self.requests += 1
        changed = False
        if addr != self.remote_addr and (use_candidate or not self.nominated):
            self.remote_addr = addr
            changed = True
        if use_candidate:
            self.nominated = True
        if addr == self.remote_addr:
            self.last_consent = now
        return changed

    def consent_expired(self, now: float, timeout: float) -> bool:
        return self.last_consent is not None and now - self.last_consent > timeout


@dataclass(frozen=True, slots=True)
class BindingAnswered:
    """A valid Binding request and the response to send back to its source."""

    session: IceSession
    """The viewer the request belongs to."""
    response: bytes
    """Binding success response (XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT)."""
    address_changed: bool
    """The session's remote address moved to the request's source."""
    previous_addr: tuple[str, int] | None
    """The session's remote address before this request."""


class IceLite:
    """Demultiplexes Binding requests of all viewers by our ufrag and answers them."""

    def __init__(self) -> None:
        self._sessions: dict[str, IceSession] = {}
        self.drops: dict[StunDrop, int] = {d: 0 for d in StunDrop}
        """Requests that got no response, by reason."""

    def add(self, session: IceSession) -> None:
        self._sessions[session.ufrag] = session

    def remove(self, ufrag: str) -> None:
        self._sessions.pop(ufrag, None)

    def restart(self, session: IceSession, remote_ufrag: str) -> None:
        """ICE restart (RFC 8445 section 9): new credentials on both sides.

        The current remote address keeps receiving media until a check with the new
        credentials arrives; the first such check may move it, nominated or not.
        """
        self._sessions.pop(session.ufrag, None)
        session.ufrag = random_ice_string(UFRAG_LENGTH)
        session.pwd = random_ice_string(PWD_LENGTH)
        session.remote_ufrag = remote_ufrag
        session.nominated = False
        session.generation += 1
        self._sessions[session.ufrag] = session

    def __contains__(self, ufrag: str) -> bool:
        return ufrag in self._sessions

    def _drop(self, reason: StunDrop) -> None:
        self.drops[reason] += 1

    def handle(self, data: bytes, addr: tuple[str, int], now: float) -> BindingAnswered | None:
        """Answer one STUN datagram from `addr`; None means no response (counted)."""
        if len(data) < 20 or data[4:8] != STUN_MAGIC_COOKIE:
            self._drop(StunDrop.MALFORMED)
            return None
        try:
            request = stun.parse_message(data)
        except ValueError as exc:
            # aioice checks FINGERPRINT (RFC 8489 section 14.7) while parsing.
            bad_crc = "fingerprint" in str(exc)
            self._drop(StunDrop.BAD_FINGERPRINT if bad_crc else StunDrop.MALFORMED)
            return None
        except (struct.error, IndexError):
            self._drop(StunDrop.MALFORMED)
            return None
        if (
            request.message_method != stun.Method.BINDING
            or request.message_class != stun.Class.REQUEST
        ):
            # Binding indications are keepalives (RFC 8445 section 11) and need no answer.
            self._drop(StunDrop.NOT_BINDING_REQUEST)
            return None
        username = request.attributes.get("USERNAME")
        if not isinstance(username, str) or ":" not in username:
            self._drop(StunDrop.NO_USERNAME)
            return None
        ours, theirs = username.split(":", 1)
        session = self._sessions.get(ours)
        if session is None:
            self._drop(StunDrop.UNKNOWN_UFRAG)
            return None
        if theirs != session.remote_ufrag:
            self._drop(StunDrop.WRONG_REMOTE_UFRAG)
            return None
        key = session.pwd.encode("utf8")
        if not request.check_message_integrity(key):
            self._drop(StunDrop.BAD_INTEGRITY)
            return None

        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
            attributes={"XOR-MAPPED-ADDRESS": addr},
        )
        # Adds MESSAGE-INTEGRITY then FINGERPRINT (RFC 8445 section 7.3.1.5).
        response.add_message_integrity(key)
        previous = session.remote_addr
        changed = session.on_binding(addr, "USE-CANDIDATE" in request.attributes, now)
        return BindingAnswered(
            session=session,
            response=bytes(response),
            address_changed=changed,
            previous_addr=previous,
        )
