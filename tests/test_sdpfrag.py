"""application/trickle-ice-sdpfrag (RFC 8840): parsing what players PATCH, building our reply."""

from __future__ import annotations

import pytest

from srsrelay.http.sdpfrag import (
    Candidate,
    FragMedia,
    LocalCandidate,
    SdpFragError,
    build_sdpfrag,
    parse_sdpfrag,
)

# The trickle example of draft-ietf-wish-whep section 4.3.2, as a browser sends it.
TRICKLE = "\r\n".join(
    [
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=mid:0",
        "a=ice-ufrag:EsAw",
        "a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1",
        "a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0"
        " ufrag EsAw network-id 1",
        "a=candidate:473322822 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active",
        "a=candidate:2 1 udp 1686052607 2001:db8::1 3478 typ srflx raddr 0.0.0.0 rport 0",
        "a=candidate:3 1 udp 2122262783 9b36eaac-bb2e-49bb-bb78-21c41c499900.local 61765 typ host",
        "a=end-of-candidates",
        "",
    ]
)


def test_trickle_example() -> None:
    frag = parse_sdpfrag(TRICKLE)
    assert frag.ice_ufrag == "EsAw"
    assert frag.ice_pwd == "P2uYro0UCOQ4zxjKXaWCBui1"
    assert frag.media == (FragMedia("audio", "0"),)
    assert frag.end_of_candidates is True
    assert frag.ignored == ("group",)
    assert [c.transport for c in frag.candidates] == ["udp", "tcp", "udp", "udp"]
    assert frag.candidates[0] == Candidate(
        foundation="1387637174",
        component=1,
        transport="udp",
        priority=2122260223,
        address="192.0.2.1",
        port=61764,
        typ="host",
        mid="0",
    )
    assert frag.candidates[2].address == "2001:db8::1"
    assert frag.candidates[2].typ == "srflx"


def test_restart_example_with_lf_and_session_level_credentials() -> None:
    text = "a=ice-options:trickle ice2\na=ice-ufrag:ysXw\na=ice-pwd:vw5LmwG4y/e6dPP/zAP9Gp5k\n"
    frag = parse_sdpfrag(text)
    assert (frag.ice_ufrag, frag.ice_pwd) == ("ysXw", "vw5LmwG4y/e6dPP/zAP9Gp5k")
    assert frag.ice_options == ("trickle", "ice2")
    assert frag.media == () and frag.candidates == () and not frag.end_of_candidates


def test_end_of_candidates_alone() -> None:
    frag = parse_sdpfrag("a=end-of-candidates\r\n")
    assert frag.ice_ufrag is None and frag.end_of_candidates


def test_same_credentials_repeated_per_section() -> None:
    text = "a=ice-ufrag:abcd\nm=video 9 UDP/TLS/RTP/SAVPF 96\na=mid:0\na=ice-ufrag:abcd\n"
    assert parse_sdpfrag(text).ice_ufrag == "abcd"


BAD = [
    ("", "the sdpfrag is empty: send a=ice-ufrag, a=ice-pwd and a=candidate lines"),
    ("\r\n \r\n", "the sdpfrag is empty: send a=ice-ufrag, a=ice-pwd and a=candidate lines"),
    (
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n",
        "sdpfrag line 1: a full SDP was sent; PATCH takes only the ICE lines "
        "(RFC 8840 section 9), e.g. a=ice-ufrag, a=ice-pwd, a=candidate",
    ),
    (
        "hello world",
        "sdpfrag line 1: expected an a=, m= or c= line, got 'hello world' (RFC 8840 section 9)",
    ),
    (
        "a=ice-ufrag:abcd\ns=-\n",
        "sdpfrag line 2: expected an a=, m= or c= line, got 's=-' (RFC 8840 section 9)",
    ),
    (
        "m=video\n",
        "sdpfrag line 1: bad m= line 'm=video'; expected m=<media> <port> <proto> <fmt>",
    ),
    (
        "m=video 70000 UDP/TLS/RTP/SAVPF 96\n",
        "sdpfrag line 1: bad m= line 'm=video 70000 UDP/TLS/RTP/SAVPF 96'; "
        "expected m=<media> <port> <proto> <fmt>",
    ),
    (
        "a=ice-ufrag:ab\n",
        "sdpfrag line 1: bad a=ice-ufrag 'ab'; it must be 4-256 characters "
        "of letters, digits, + and / (RFC 8839 section 5.4)",
    ),
    (
        "a=ice-ufrag:ab cd\n",
        "sdpfrag line 1: bad a=ice-ufrag 'ab cd'; it must be 4-256 characters "
        "of letters, digits, + and / (RFC 8839 section 5.4)",
    ),
    (
        "a=ice-pwd:short\n",
        "sdpfrag line 1: bad a=ice-pwd 'short'; it must be 22-256 characters "
        "of letters, digits, + and / (RFC 8839 section 5.4)",
    ),
    (
        "a=ice-ufrag:abcd\na=ice-ufrag:efgh\n",
        "sdpfrag line 2: a=ice-ufrag 'efgh' differs from the earlier 'abcd'",
    ),
    ("a=mid:0\n", "sdpfrag line 1: a=mid must follow an m= line"),
    ("a=ice-options:\n", "sdpfrag line 1: bad a=ice-options ''"),
    (
        "a=candidate:1 1 udp 2122260223 192.0.2.1 61764\n",
        "sdpfrag line 1: bad a=candidate '1 1 udp 2122260223 192.0.2.1 61764'; expected "
        "<foundation> <component> <transport> <priority> <address> <port> typ <type> "
        "(RFC 8839 section 5.1)",
    ),
    (
        "a=candidate:1 1 udp 2122260223 192.0.2.1 61764 type host\n",
        "sdpfrag line 1: bad a=candidate '1 1 udp 2122260223 192.0.2.1 61764 type host'; "
        "expected <foundation> <component> <transport> <priority> <address> <port> typ <type> "
        "(RFC 8839 section 5.1)",
    ),
    (
        "a=candidate:1 1 udp 2122260223 192.0.2.1 99999 typ host\n",
        "sdpfrag line 1: bad candidate port '99999' (0-65535)",
    ),
    (
        "a=candidate:1 x udp 2122260223 192.0.2.1 5000 typ host\n",
        "sdpfrag line 1: bad candidate component 'x' (1-256)",
    ),
    (
        "a=candidate:1 1 udp -5 192.0.2.1 5000 typ host\n",
        "sdpfrag line 1: bad candidate priority '-5' (1-2147483647)",
    ),
    (
        "a=candidate:f@o 1 udp 1 192.0.2.1 5000 typ host\n",
        "sdpfrag line 1: bad candidate foundation 'f@o'",
    ),
    (
        "a=candidate:1 1 udp 1 <script> 5000 typ host\n",
        "sdpfrag line 1: bad a=candidate '1 1 udp 1 <script> 5000 typ host'",
    ),
    (
        "a=" + "x" * 200 + "\nx\n",
        "sdpfrag line 2: expected an a=, m= or c= line, got 'x' (RFC 8840 section 9)",
    ),
    (
        "a=end-of-candidates\n" * 1001,
        "the sdpfrag has more than 1000 lines",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_malformed(text: str, message: str) -> None:
    with pytest.raises(SdpFragError) as info:
        parse_sdpfrag(text)
    assert str(info.value) == message


def test_long_values_are_clipped_in_messages() -> None:
    with pytest.raises(SdpFragError) as info:
        parse_sdpfrag("a=ice-ufrag:" + "%" * 500)
    assert str(info.value) == (
        "sdpfrag line 1: bad a=ice-ufrag '" + "%" * 60 + "...'; it must be 4-256 characters "
        "of letters, digits, + and / (RFC 8839 section 5.4)"
    )


def test_build_restart_reply_round_trips() -> None:
    text = build_sdpfrag(
        ice_ufrag="newUfrag",
        ice_pwd="newPasswordOf24Chars0123",
        media=FragMedia("video", "0"),
        m_line_rest="9 UDP/TLS/RTP/SAVPF 102",
        candidates=[
            LocalCandidate(2130706431, "127.0.0.1", 8000),
            LocalCandidate(2130706175, "::1", 8000),
        ],
    )
    assert text == (
        "a=ice-lite\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 102\r\n"
        "a=mid:0\r\n"
        "a=ice-ufrag:newUfrag\r\n"
        "a=ice-pwd:newPasswordOf24Chars0123\r\n"
        "a=candidate:1 1 udp 2130706431 127.0.0.1 8000 typ host\r\n"
        "a=candidate:2 1 udp 2130706175 ::1 8000 typ host\r\n"
        "a=end-of-candidates\r\n"
    )
    frag = parse_sdpfrag(text)
    assert frag.ice_ufrag == "newUfrag" and frag.ignored == ("ice-lite",)
    assert [(c.address, c.port, c.mid) for c in frag.candidates] == [
        ("127.0.0.1", 8000, "0"),
        ("::1", 8000, "0"),
    ]


def test_build_without_mid_or_ice_lite() -> None:
    text = build_sdpfrag(
        ice_ufrag="abcd",
        ice_pwd="abcdefghijklmnopqrstuv",
        media=FragMedia("audio", None),
        candidates=[],
        ice_lite=False,
    )
    assert text == (
        "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n"
        "a=ice-ufrag:abcd\r\n"
        "a=ice-pwd:abcdefghijklmnopqrstuv\r\n"
        "a=end-of-candidates\r\n"
    )
