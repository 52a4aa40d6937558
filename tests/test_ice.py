from __future__ import annotations

from aioice import stun

from srsrelay.webrtc.ice import (
    PWD_LENGTH,
    UFRAG_LENGTH,
    IceLite,
    IceSession,
    StunDrop,
)

VIEWER = ("192.0.2.7", 50000)
OTHER = ("192.0.2.7", 50002)


def make_request(
    username: str | None,
    key: bytes,
    *,
    use_candidate: bool = False,
    method: stun.Method = stun.Method.BINDING,
    message_class: stun.Class = stun.Class.REQUEST,
) -> tuple[stun.Message, bytes]:
    attrs: dict[str, object] = {"PRIORITY": 1853817087, "ICE-CONTROLLING": 12345}
    if username is not None:
        attrs["USERNAME"] = username
    if use_candidate:
        attrs["USE-CANDIDATE"] = None
    msg = stun.Message(method, message_class, attributes=attrs)
    msg.add_message_integrity(key)
    return msg, bytes(msg)


def setup() -> tuple[IceLite, IceSession]:
    agent = IceLite()
    session = IceSession(remote_ufrag="them")
    agent.add(session)
    return agent, session


def test_credentials_are_long_enough_and_random() -> None:
    a, b = IceSession("x"), IceSession("x")
    assert len(a.ufrag) == UFRAG_LENGTH >= 4
    assert len(a.pwd) == PWD_LENGTH >= 22
    assert (a.ufrag, a.pwd) != (b.ufrag, b.pwd)


def test_valid_request_gets_verified_response() -> None:
    agent, session = setup()
    request, data = make_request(f"{session.ufrag}:them", session.pwd.encode())
    answered = agent.handle(data, VIEWER, now=5.0)
    assert answered is not None
    assert answered.session is session
    response = stun.parse_message(answered.response)  # also checks FINGERPRINT
    assert response.message_method == stun.Method.BINDING
    assert response.message_class == stun.Class.RESPONSE
    assert response.transaction_id == request.transaction_id
    assert response.attributes["XOR-MAPPED-ADDRESS"] == VIEWER
    assert "FINGERPRINT" in response.attributes
    assert response.check_message_integrity(session.pwd.encode())
    assert not response.check_message_integrity(b"another password")
    assert answered.address_changed and answered.previous_addr is None
    assert session.remote_addr == VIEWER
    assert session.last_consent == 5.0
    assert not session.nominated


def test_bad_integrity_gets_no_response() -> None:
    agent, session = setup()
    _, data = make_request(f"{session.ufrag}:them", b"wrong password")
    assert agent.handle(data, VIEWER, now=1.0) is None
    assert agent.drops[StunDrop.BAD_INTEGRITY] == 1
    assert session.remote_addr is None


def test_bad_fingerprint_gets_no_response() -> None:
    agent, session = setup()
    _, data = make_request(f"{session.ufrag}:them", session.pwd.encode())
    corrupted = data[:-1] + bytes([data[-1] ^ 0xFF])  # last byte of the CRC-32
    assert agent.handle(corrupted, VIEWER, now=1.0) is None
    assert agent.drops[StunDrop.BAD_FINGERPRINT] == 1
    assert agent.drops[StunDrop.MALFORMED] == 0
    assert session.remote_addr is None


def test_unknown_ufrag_gets_no_response() -> None:
    agent, session = setup()
    _, data = make_request("nobody:them", session.pwd.encode())
    assert agent.handle(data, VIEWER, now=1.0) is None
    assert agent.drops[StunDrop.UNKNOWN_UFRAG] == 1


def test_wrong_remote_ufrag_gets_no_response() -> None:
    agent, session = setup()
    _, data = make_request(f"{session.ufrag}:someone", session.pwd.encode())
    assert agent.handle(data, VIEWER, now=1.0) is None
    assert agent.drops[StunDrop.WRONG_REMOTE_UFRAG] == 1


def test_missing_username_gets_no_response() -> None:
    agent, session = setup()
    _, data = make_request(None, session.pwd.encode())
    assert agent.handle(data, VIEWER, now=1.0) is None
    assert agent.drops[StunDrop.NO_USERNAME] == 1


def test_non_binding_request_gets_no_response() -> None:
    agent, session = setup()
    key = session.pwd.encode()
    username = f"{session.ufrag}:them"
    _, indication = make_request(username, key, message_class=stun.Class.INDICATION)
    _, allocate = make_request(username, key, method=stun.Method.ALLOCATE)
    assert agent.handle(indication, VIEWER, now=1.0) is None
    assert agent.handle(allocate, VIEWER, now=1.0) is None
    assert agent.drops[StunDrop.NOT_BINDING_REQUEST] == 2


def test_malformed_gets_no_response() -> None:
    agent, session = setup()
    _, data = make_request(f"{session.ufrag}:them", session.pwd.encode())
    assert agent.handle(b"\x00\x01", VIEWER, now=1.0) is None
    assert agent.handle(data[:-4], VIEWER, now=1.0) is None  # length mismatch
    assert agent.drops[StunDrop.MALFORMED] == 2


def test_removed_session_is_unknown() -> None:
    agent, session = setup()
    agent.remove(session.ufrag)
    _, data = make_request(f"{session.ufrag}:them", session.pwd.encode())
    assert agent.handle(data, VIEWER, now=1.0) is None
    assert session.ufrag not in agent


def test_use_candidate_nominates_and_pins_address() -> None:
    agent, session = setup()
    key = session.pwd.encode()
    username = f"{session.ufrag}:them"
    first = agent.handle(make_request(username, key)[1], OTHER, now=1.0)
    assert first is not None and session.remote_addr == OTHER
    nominated = agent.handle(make_request(username, key, use_candidate=True)[1], VIEWER, 2.0)
    assert nominated is not None and nominated.address_changed
    assert nominated.previous_addr == OTHER
    assert session.remote_addr == VIEWER and session.nominated
    # A later check on another pair is answered but does not move the media.
    other = agent.handle(make_request(username, key)[1], OTHER, now=3.0)
    assert other is not None and not other.address_changed
    assert session.remote_addr == VIEWER
    assert session.last_consent == 2.0


def test_consent_expiry() -> None:
    session = IceSession("them")
    assert not session.consent_expired(now=1000.0, timeout=30.0)  # no request yet
    session.on_binding(VIEWER, use_candidate=True, now=10.0)
    assert not session.consent_expired(now=40.0, timeout=30.0)
    assert session.consent_expired(now=40.1, timeout=30.0)
    session.on_binding(VIEWER, use_candidate=False, now=40.0)
    assert not session.consent_expired(now=40.1, timeout=30.0)


def test_restart_replaces_credentials_and_allows_a_new_address() -> None:
    agent, session = setup()
    _, data = make_request(f"{session.ufrag}:them", session.pwd.encode(), use_candidate=True)
    assert agent.handle(data, VIEWER, now=1.0) is not None
    old = (session.ufrag, session.pwd)
    agent.restart(session, remote_ufrag="them2")
    assert (session.ufrag, session.pwd) != old
    assert session.generation == 1
    _, stale = make_request(f"{old[0]}:them", old[1].encode())
    assert agent.handle(stale, OTHER, now=2.0) is None
    assert agent.drops[StunDrop.UNKNOWN_UFRAG] == 1
    _, fresh = make_request(f"{session.ufrag}:them2", session.pwd.encode())
    answered = agent.handle(fresh, OTHER, now=3.0)
    assert answered is not None and answered.address_changed
    assert session.remote_addr == OTHER
