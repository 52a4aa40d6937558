from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from srsrelay.webrtc.sdp import (
    AnswerParams,
    CodecNotOffered,
    H264Profile,
    OfferError,
    build_answer,
    candidate_priority,
    h264_profile,
    parse_offer,
)

FIXTURES = Path(__file__).parent / "fixtures"
CHROME = (FIXTURES / "chrome_recvonly_offer.sdp").read_text()
CHROME_FP = (
    "3C:4A:AA:A9:A3:D6:3B:EE:E8:6E:5E:31:15:6A:1D:91:"
    "E2:38:3C:DC:4D:57:92:57:1B:42:3B:1C:0A:CA:B4:09"
)

PARAMS = AnswerParams(
    ice_ufrag="ourufrag",
    ice_pwd="ourpassword0123456789abcd",
    fingerprint="AA:BB:CC",
    candidates=("127.0.0.1", "192.0.2.2"),
    port=8000,
    video_ssrc=1111,
    audio_ssrc=2222,
    cname="cname0",
    stream_id="stream0",
)


def _only_video(sdp: str) -> str:
    return sdp[: sdp.index("m=audio")]


def _only_audio(sdp: str) -> str:
    return sdp[: sdp.index("m=video")] + sdp[sdp.index("m=audio") :]


def test_chrome_offer_picks_h264_42e01f_for_high_profile_stream() -> None:
    offer = parse_offer(CHROME, profile_level_id="640028")
    assert offer.ice_ufrag == "Wb7q"
    assert offer.ice_pwd == "0vQ4v3yvVdQ6S+5iX9vZgC3y"
    assert offer.fingerprints == (("sha-256", CHROME_FP),)
    assert offer.setup == "actpass"
    assert offer.video is not None and offer.audio is not None
    assert (offer.video.payload_type, offer.video.profile_level_id) == (106, "42e01f")
    assert offer.video.rtx_payload_type == 107
    assert offer.video.mid == "0"
    assert offer.audio.payload_type == 111 and offer.audio.mid == "1"
    assert (offer.video_index, offer.audio_index) == (0, 1)


def test_stream_profile_is_preferred_when_offered() -> None:
    offer = parse_offer(CHROME, profile_level_id="4D001F")
    assert offer.video is not None
    assert (offer.video.payload_type, offer.video.profile_level_id) == (127, "4d001f")
    assert offer.video.rtx_payload_type == 125


def test_42001f_when_42e01f_is_not_offered() -> None:
    sdp = CHROME.replace("packetization-mode=1;profile-level-id=42e01f", "packetization-mode=0")
    offer = parse_offer(sdp, profile_level_id=None)
    assert offer.video is not None and offer.video.payload_type == 102


def test_constrained_baseline_at_any_level_before_other_profiles() -> None:
    sdp = CHROME.replace("profile-level-id=42e01f", "profile-level-id=42e00b").replace(
        "profile-level-id=42001f", "profile-level-id=42000b"
    )
    offer = parse_offer(sdp, profile_level_id="640028")
    assert offer.video is not None and offer.video.payload_type == 106
    assert offer.video.profile_level_id == "42e00b"


def test_any_packetization_mode_1_as_last_resort() -> None:
    sdp = (
        CHROME.replace("profile-level-id=42e01f", "profile-level-id=f4001f")
        .replace("profile-level-id=42001f", "profile-level-id=f4001f")
        .replace("profile-level-id=4d001f", "profile-level-id=f4001f")
    )
    offer = parse_offer(sdp, profile_level_id="640028")
    assert offer.video is not None and offer.video.payload_type == 102
    assert offer.video.profile_level_id == "f4001f"


def _video_fmtps(*fmtps: str) -> str:
    """CHROME with its H.264 formats replaced by `fmtps` (payload types 96, 97, ...)."""
    head, _, _ = CHROME.partition("m=video")
    pts = [str(96 + i) for i in range(len(fmtps))]
    lines = [f"m=video 9 UDP/TLS/RTP/SAVPF {' '.join(pts)}", "c=IN IP4 0.0.0.0",
             "a=mid:0", "a=recvonly", "a=rtcp-mux"]  # fmt: skip
    for pt, fmtp in zip(pts, fmtps, strict=True):
        lines += [f"a=rtpmap:{pt} H264/90000", f"a=fmtp:{pt} packetization-mode=1;{fmtp}"]
    ice = "\n".join(ln for ln in CHROME.splitlines() if ln.startswith(("a=ice-", "a=finger")))
    return head + "\n".join(lines) + "\n" + ice + "\n"


@pytest.mark.parametrize(
    ("stream", "fmtps", "payload_type", "answer"),
    [
        # The stream's own profile at a higher offered level: the real id is answered.
        ("64001f", ["profile-level-id=42e01f", "profile-level-id=640032"], 97, "64001f"),
        # Same profile, lower offered level: only with level-asymmetry-allowed.
        ("640028", ["profile-level-id=42e01f", "profile-level-id=64001f"], 96, "42e01f"),
        (
            "640028",
            ["profile-level-id=42e01f", "level-asymmetry-allowed=1;profile-level-id=64001f"],
            97,
            "640028",
        ),
        # Constrained high (Safari's 640c1f) is not high: a high stream gets the fallback.
        ("64001f", ["profile-level-id=640c1f", "profile-level-id=42e01f"], 97, "42e01f"),
        # Constrained baseline spelled 4d with constraint_set0 matches 42e0.
        ("42e01f", ["profile-level-id=4d801f"], 96, "42e01f"),
        # No exact match: the lowest offered profile that decodes the stream.
        ("42e01f", ["profile-level-id=640c1f", "profile-level-id=4d001f"], 97, "4d001f"),
        ("4d001f", ["profile-level-id=42e01f", "profile-level-id=64001f"], 97, "64001f"),
        ("640c1f", ["profile-level-id=42e01f", "profile-level-id=640034"], 97, "640034"),
        # Plain baseline (FMO/ASO allowed) is decoded only by baseline decoders.
        ("42001f", ["profile-level-id=4d001f", "profile-level-id=42e01f"], 97, "42e01f"),
    ],
)
def test_profile_selection(stream: str, fmtps: list[str], payload_type: int, answer: str) -> None:
    offer = parse_offer(_video_fmtps(*fmtps), profile_level_id=stream)
    assert offer.video is not None
    assert (offer.video.payload_type, offer.video.profile_level_id) == (payload_type, answer)


@pytest.mark.parametrize(
    ("pli", "profile", "level"),
    [
        ("42e01f", H264Profile.CONSTRAINED_BASELINE, 31),
        ("42001f", H264Profile.BASELINE, 31),
        ("4d0028", H264Profile.MAIN, 40),
        ("640c34", H264Profile.CONSTRAINED_HIGH, 52),
        ("640032", H264Profile.HIGH, 50),
        ("42f00b", H264Profile.CONSTRAINED_BASELINE, 9),
        ("f4001f", H264Profile.OTHER, 31),
    ],
)
def test_h264_profile(pli: str, profile: H264Profile, level: int) -> None:
    assert h264_profile(pli) == (profile, level)


def test_packetization_mode_0_only_is_not_usable() -> None:
    sdp = re.sub(r"packetization-mode=1", "packetization-mode=0", _only_video(CHROME))
    with pytest.raises(
        OfferError, match=r"^offer has no H\.264 \(packetization-mode=1\) video and no Opus audio$"
    ):
        parse_offer(sdp)


def test_not_sdp() -> None:
    with pytest.raises(OfferError, match="^offer is not SDP: it must start with v=0$"):
        parse_offer("hello")
    with pytest.raises(OfferError, match="^offer is not SDP: it must start with v=0$"):
        parse_offer("")
    with pytest.raises(OfferError, match="^offer is not SDP: bad m-line 'm=video'$"):
        parse_offer("v=0\r\nm=video\r\n")
    with pytest.raises(OfferError, match="^offer is not SDP: bad payload type 'x'$"):
        parse_offer(CHROME.replace("a=rtpmap:111 opus", "a=rtpmap:x opus"))
    with pytest.raises(OfferError, match="^offer is not SDP: bad line 'garbage'$"):
        parse_offer("v=0\r\ngarbage\r\n")


def test_missing_ice_credentials() -> None:
    sdp = "\n".join(ln for ln in CHROME.splitlines() if not ln.startswith("a=ice-pwd"))
    with pytest.raises(OfferError, match="^offer has no ice-ufrag/ice-pwd$"):
        parse_offer(sdp)


def test_missing_fingerprint() -> None:
    sdp = "\n".join(ln for ln in CHROME.splitlines() if not ln.startswith("a=fingerprint"))
    with pytest.raises(OfferError, match="^offer has no DTLS fingerprint$"):
        parse_offer(sdp)


def test_passive_setup_is_refused() -> None:
    sdp = CHROME.replace("a=setup:actpass", "a=setup:passive")
    with pytest.raises(
        OfferError, match="^offer has a=setup:passive but we only act as DTLS server$"
    ):
        parse_offer(sdp)


def test_stream_without_the_offered_track() -> None:
    with pytest.raises(OfferError, match="^offer accepts Opus audio but the stream has video$"):
        parse_offer(_only_audio(CHROME), want_audio=False)


def test_session_level_credentials_and_fingerprint() -> None:
    sdp = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "a=ice-ufrag:sess\r\na=ice-pwd:sessionpassword1234567\r\n"
        "a=fingerprint:SHA-256 ab:cd\r\na=setup:active\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 109\r\na=mid:a\r\na=recvonly\r\n"
        "a=rtpmap:109 opus/48000/2\r\n"
    )
    offer = parse_offer(sdp)
    assert (offer.ice_ufrag, offer.ice_pwd) == ("sess", "sessionpassword1234567")
    assert offer.fingerprints == (("sha-256", "AB:CD"),)
    assert offer.video is None and offer.audio is not None
    answer = build_answer(offer, PARAMS)
    assert "a=group:BUNDLE a\r\n" in answer
    assert "m=audio 8000 UDP/TLS/RTP/SAVPF 109\r\n" in answer


def test_answer_for_chrome_offer() -> None:
    offer = parse_offer(CHROME, profile_level_id="640028")
    answer = build_answer(offer, PARAMS)
    assert answer.endswith("\r\n")
    lines = answer.split("\r\n")
    assert lines[:4] == ["v=0", lines[1], "s=-", "t=0 0"]
    assert lines[1].startswith("o=- ") and lines[1].endswith(" 2 IN IP4 127.0.0.1")
    assert "a=ice-lite" in lines and "a=group:BUNDLE 0 1" in lines
    m_lines = [ln for ln in lines if ln.startswith("m=")]
    assert m_lines == ["m=video 8000 UDP/TLS/RTP/SAVPF 106", "m=audio 8000 UDP/TLS/RTP/SAVPF 111"]
    video = answer[answer.index("m=video") : answer.index("m=audio")].split("\r\n")
    for expected in (
        "c=IN IP4 127.0.0.1",
        "a=mid:0",
        "a=sendonly",
        "a=rtcp-mux",
        "a=ice-ufrag:ourufrag",
        "a=ice-pwd:ourpassword0123456789abcd",
        "a=fingerprint:sha-256 AA:BB:CC",
        "a=setup:passive",
        "a=rtpmap:106 H264/90000",
        "a=fmtp:106 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        "a=rtcp-fb:106 nack",
        "a=rtcp-fb:106 nack pli",
        "a=rtcp-fb:106 ccm fir",
        "a=rtcp-fb:106 goog-remb",
        "a=ssrc:1111 cname:cname0",
        "a=ssrc:1111 msid:stream0 stream0-video",
        "a=msid:stream0 stream0-video",
        f"a=candidate:1 1 udp {candidate_priority(0)} 127.0.0.1 8000 typ host",
        f"a=candidate:2 1 udp {candidate_priority(1)} 192.0.2.2 8000 typ host",
        "a=end-of-candidates",
    ):
        assert expected in video, expected
    assert "rtx" not in answer  # no RTX SSRC given: retransmissions go out plainly
    audio = answer[answer.index("m=audio") :].split("\r\n")
    assert "a=rtpmap:111 opus/48000/2" in audio
    assert "a=ssrc:2222 cname:cname0" in audio
    assert "a=sendonly" in audio and "a=mid:1" in audio
    assert candidate_priority(0) != candidate_priority(1)


def test_answer_with_rtx() -> None:
    offer = parse_offer(CHROME, profile_level_id="42e01f")
    answer = build_answer(offer, dataclasses.replace(PARAMS, video_rtx_ssrc=3333))
    assert "m=video 8000 UDP/TLS/RTP/SAVPF 106 107\r\n" in answer
    assert "a=rtpmap:107 rtx/90000\r\n" in answer
    assert "a=fmtp:107 apt=106\r\n" in answer
    assert "a=ssrc-group:FID 1111 3333\r\n" in answer
    video = answer[answer.index("m=video") : answer.index("m=audio")].split("\r\n")
    # Both SSRCs belong to the one video track (RFC 4588 section 8.3, RFC 5576).
    for ssrc in (1111, 3333):
        assert f"a=ssrc:{ssrc} cname:cname0" in video
        assert f"a=ssrc:{ssrc} msid:stream0 stream0-video" in video
    assert video.index("a=ssrc-group:FID 1111 3333") < video.index("a=ssrc:1111 cname:cname0")
    assert "a=rtcp-fb:107 nack" not in video  # feedback is about the media payload type
    audio = answer[answer.index("m=audio") :]
    assert "3333" not in audio and "rtx" not in audio


def test_offer_without_rtx_gets_no_rtx_even_with_an_rtx_ssrc() -> None:
    sdp = re.sub(r"a=rtpmap:107 rtx/90000\r?\na=fmtp:107 apt=106\r?\n", "", CHROME)
    offer = parse_offer(sdp, profile_level_id="42e01f")
    assert offer.video is not None and offer.video.rtx_payload_type is None
    answer = build_answer(offer, dataclasses.replace(PARAMS, video_rtx_ssrc=3333))
    assert "m=video 8000 UDP/TLS/RTP/SAVPF 106\r\n" in answer
    assert "rtx" not in answer and "FID" not in answer and "3333" not in answer


def test_unusable_m_lines_are_rejected_in_order() -> None:
    # Video only offers VP8; a data channel follows the audio.
    sdp = CHROME.replace(
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97 98", "m=video 9 UDP/TLS/RTP/SAVPF 96 97"
    )
    sdp = re.sub(r"a=rtpmap:(\d+) H264/90000", r"a=rtpmap:\1 VP8/90000", sdp)
    sdp += (
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n"
        "a=mid:2\r\na=sctp-port:5000\r\n"
    )
    offer = parse_offer(sdp)
    assert offer.video is None and offer.audio is not None
    answer = build_answer(offer, PARAMS)
    m_lines = [ln for ln in answer.split("\r\n") if ln.startswith("m=")]
    assert m_lines[0].startswith("m=video 0 UDP/TLS/RTP/SAVPF 96 97")
    assert m_lines[1] == "m=audio 8000 UDP/TLS/RTP/SAVPF 111"
    assert m_lines[2] == "m=application 0 UDP/DTLS/SCTP webrtc-datachannel"
    assert "a=group:BUNDLE 1\r\n" in answer
    assert answer.count("a=inactive") == 2


def test_sendonly_offer_m_line_is_not_answered() -> None:
    sdp = CHROME.replace("a=recvonly", "a=sendonly", 1)
    offer = parse_offer(sdp)
    assert offer.video is None and offer.audio is not None


def test_answer_needs_candidates() -> None:
    offer = parse_offer(CHROME)
    with pytest.raises(OfferError, match="^no ICE candidates configured: set rtc.candidates$"):
        build_answer(offer, dataclasses.replace(PARAMS, candidates=()))


def test_captured_chromium_offer() -> None:
    path = FIXTURES / "chromium_offer.sdp"
    if not path.exists():
        pytest.skip("no captured Chromium offer")
    offer = parse_offer(path.read_text(), profile_level_id="640028")
    assert offer.video is not None and offer.video.profile_level_id == "42e01f"
    assert offer.audio is not None
    build_answer(offer, PARAMS)


CHROMIUM = (FIXTURES / "chromium_offer.sdp").read_text()
AV1_MAIN = "profile=0;level-idx=8;tier=0"


def test_av1_stream_picks_the_offered_av1_format_of_its_profile() -> None:
    offer = parse_offer(CHROMIUM, video_codec="AV1", video_fmtp=AV1_MAIN)
    assert offer.video is not None
    assert (offer.video.codec, offer.video.payload_type) == ("AV1", 45)
    assert offer.video.rtx_payload_type == 46
    answer = build_answer(offer, dataclasses.replace(PARAMS, video_rtx_ssrc=3333))
    assert "m=video 8000 UDP/TLS/RTP/SAVPF 45 46\r\n" in answer
    assert "a=rtpmap:45 AV1/90000\r\na=fmtp:45 profile=0;level-idx=8;tier=0\r\n" in answer
    assert "a=rtcp-fb:45 nack pli\r\n" in answer
    assert "a=fmtp:46 apt=45\r\n" in answer
    assert "H264" not in answer
    # Profile 1 (High) picks the other format.
    high = parse_offer(CHROMIUM, video_codec="AV1", video_fmtp="profile=1;level-idx=8;tier=0")
    assert high.video is not None and high.video.payload_type == 47


def test_av1_stream_and_an_offer_without_its_profile_is_a_codec_mismatch() -> None:
    # Profile 2 (Professional) is not offered by Chromium at all.
    with pytest.raises(CodecNotOffered) as info:
        parse_offer(CHROMIUM, video_codec="AV1", video_fmtp="profile=2;level-idx=8;tier=0")
    assert info.value.codec == "AV1"
    assert str(info.value) == (
        "the stream's video is AV1 (profile=2;level-idx=8;tier=0) and the offer does not "
        "accept it (no AV1 format with that profile); the relay can transcode it to H.264 "
        "when video.transcode_to_h264 is on"
    )


def test_codec_mismatch_only_when_the_offer_wants_video() -> None:
    # An audio-only offer plays the audio of an HEVC stream.
    offer = parse_offer(_only_audio(CHROME), video_codec="H265", video_fmtp="profile-id=1")
    assert offer.video is None and offer.audio is not None
    # A video-only offer without H265 has nothing to play.
    with pytest.raises(CodecNotOffered, match="HEVC"):
        parse_offer(_only_video(CHROME), video_codec="H265", video_fmtp="profile-id=1")


def test_h265_stream_matches_profile_id_and_its_default() -> None:
    h265 = (
        "a=rtpmap:49 H265/90000\na=fmtp:49 level-id=93;profile-id=1;tier-flag=0\n"
        "a=rtpmap:50 rtx/90000\na=fmtp:50 apt=49\n"
        "a=rtpmap:51 H265/90000\na=fmtp:51 level-id=93;profile-id=2;tier-flag=0\n"
        "a=rtpmap:52 H265/90000\n"
    )
    sdp = CHROME.replace("a=rtpmap:96 VP8/90000\n", h265 + "a=rtpmap:96 VP8/90000\n")
    sdp = sdp.replace(
        "m=video 9 UDP/TLS/RTP/SAVPF 96", "m=video 9 UDP/TLS/RTP/SAVPF 49 50 51 52 96"
    )
    main = "profile-space=0;tier-flag=0;profile-id=1;level-id=93"
    offer = parse_offer(sdp, video_codec="H265", video_fmtp=main)
    assert offer.video is not None
    assert (offer.video.payload_type, offer.video.rtx_payload_type) == (49, 50)
    answer = build_answer(offer, PARAMS)
    assert f"a=rtpmap:49 H265/90000\r\na=fmtp:49 {main}\r\n" in answer
    main10 = parse_offer(sdp, video_codec="H265", video_fmtp="profile-id=2")
    assert main10.video is not None and main10.video.payload_type == 51
    # Format 52 gives no profile-id: Main (1) by default, so a Main stream could use it.
    only_default = sdp.replace(
        "m=video 9 UDP/TLS/RTP/SAVPF 49 50 51 52 96", "m=video 9 UDP/TLS/RTP/SAVPF 52 96"
    )
    offer = parse_offer(only_default, video_codec="H265", video_fmtp=main)
    assert offer.video is not None and offer.video.payload_type == 52
    with pytest.raises(CodecNotOffered):
        parse_offer(only_default, video_codec="H265", video_fmtp="profile-id=2")
    # A High-tier stream does not match Main-tier formats.
    with pytest.raises(CodecNotOffered):
        parse_offer(sdp, video_codec="H265", video_fmtp="tier-flag=1;profile-id=1;level-id=123")
