"""Parse a viewer's SDP offer (RFC 8866, JSEP RFC 8829) and build our answer.

We are an ICE-lite, DTLS-server, send-only endpoint with one 5-tuple for all
m-lines (BUNDLE, RFC 8843) and RTP/RTCP multiplexing (RFC 5761).
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_OFFER_LINES = 2000
"""Lines accepted in one offer."""
FALLBACK_PROFILES = ("42e01f", "42001f")
"""H.264 profile-level-ids accepted when the stream's own profile is not offered.

Browsers decode any profile whatever the SDP says, and Chromium offers no High
profile, so constrained baseline stands in for it."""

_M_LINE = re.compile(r"^m=(\S+) (\d+)(?:/\d+)? (\S+)(?: (.*))?$")
_FINGERPRINT = re.compile(r"^(\S+) ([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})+)$")
_PROFILE = re.compile(r"^[0-9A-Fa-f]{6}$")


class OfferError(ValueError):
    """The offer cannot be answered; the message says why."""


class CodecNotOffered(OfferError):
    """The offer wants video but not in the stream's codec (HTTP 406 for WHEP)."""

    def __init__(self, codec: str, message: str) -> None:
        super().__init__(message)
        self.codec = codec
        """The stream's video codec as SDP names it ("H265", "AV1")."""


CODEC_NAMES = {"H264": "H.264", "H265": "HEVC (H.265)", "AV1": "AV1"}
"""Human-readable names of the SDP video encoding names we send."""


@dataclass(frozen=True, slots=True)
class Codec:
    """One payload type from an m-line."""

    payload_type: int
    """The offer's payload type number."""
    name: str
    """Encoding name as written in rtpmap, e.g. "H264" or "opus"."""
    clock_rate: int
    """RTP clock rate, Hz."""
    channels: int
    """Audio channels (1 when not given)."""
    fmtp: dict[str, str]
    """Format parameters, keys lower-cased."""


@dataclass(slots=True)
class MediaSection:
    """One m-line of the offer."""

    kind: str
    """"video", "audio", "application", ..."""
    port: int
    """Port of the m-line; 0 means the offerer rejected it."""
    protocol: str
    """Transport protocol, e.g. "UDP/TLS/RTP/SAVPF"."""
    formats: list[str]
    """The m-line's format list, as written."""
    mid: str | None = None
    """a=mid."""
    direction: str = "sendrecv"
    """sendrecv, recvonly, sendonly or inactive, from the viewer's side."""
    codecs: list[Codec] = field(default_factory=list)
    """Codecs with an rtpmap line, in format-list order."""


@dataclass(frozen=True, slots=True)
class VideoChoice:
    """The video codec we answer with."""

    mid: str | None
    """The video m-line's mid."""
    payload_type: int
    """Payload type of the chosen codec."""
    profile_level_id: str
    """H.264: profile-level-id of the chosen codec, lower-case hex; else empty."""
    rtx_payload_type: int | None
    """The viewer's RTX payload type for it (apt=), if offered."""
    codec: str = "H264"
    """SDP encoding name: H264, H265 or AV1."""
    fmtp: str = ""
    """H265 and AV1: the answer's format parameters (the stream's own)."""


@dataclass(frozen=True, slots=True)
class AudioChoice:
    """The Opus codec we answer with."""

    mid: str | None
    """The audio m-line's mid."""
    payload_type: int
    """Payload type of opus/48000/2."""


@dataclass(frozen=True, slots=True)
class Offer:
    """What we need from a parsed offer."""

    ice_ufrag: str
    """The viewer's ice-ufrag."""
    ice_pwd: str
    """The viewer's ice-pwd."""
    fingerprints: tuple[tuple[str, str], ...]
    """(hash algorithm lower-case, fingerprint upper-case) of the viewer's certificate."""
    setup: str
    """The viewer's a=setup value."""
    media: tuple[MediaSection, ...]
    """All m-lines in offer order."""
    video_index: int | None
    """Index in `media` of the video m-line we answer, if any."""
    audio_index: int | None
    """Index in `media` of the audio m-line we answer, if any."""
    video: VideoChoice | None
    """The chosen H.264 codec."""
    audio: AudioChoice | None
    """The chosen Opus codec."""


def _parse_attr(line: str) -> tuple[str, str]:
    body = line[2:]
    if ":" in body:
        name, value = body.split(":", 1)
        return name.strip(), value.strip()
    return body.strip(), ""


def _parse_fmtp(value: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in value.split(";"):
        if "=" in item:
            k, v = item.split("=", 1)
            params[k.strip().lower()] = v.strip()
    return params


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise OfferError(f"offer is not SDP: bad {what} {value!r}") from None


class H264Profile(enum.Enum):
    """H.264 profiles as WebRTC tells them apart (RFC 6184 section 8.1, profile_idc
    plus the constraint_set flags of profile-iop)."""

    CONSTRAINED_BASELINE = "constrained baseline"
    BASELINE = "baseline"
    MAIN = "main"
    CONSTRAINED_HIGH = "constrained high"
    HIGH = "high"
    OTHER = "other"


_DECODED_BY: dict[H264Profile, tuple[H264Profile, ...]] = {
    # A decoder for each listed profile decodes the key profile's streams (H.264 A.2).
    H264Profile.CONSTRAINED_BASELINE: (
        H264Profile.CONSTRAINED_BASELINE,
        H264Profile.BASELINE,
        H264Profile.MAIN,
        H264Profile.CONSTRAINED_HIGH,
        H264Profile.HIGH,
    ),
    H264Profile.BASELINE: (H264Profile.BASELINE,),
    H264Profile.MAIN: (H264Profile.MAIN, H264Profile.HIGH),
    H264Profile.CONSTRAINED_HIGH: (H264Profile.CONSTRAINED_HIGH, H264Profile.HIGH),
    H264Profile.HIGH: (H264Profile.HIGH,),
    H264Profile.OTHER: (),
}


def h264_profile(profile_level_id: str) -> tuple[H264Profile, int]:
    """The profile and level_idc of a profile-level-id (6 hex digits)."""
    value = int(profile_level_id, 16)
    idc, iop, level = value >> 16, (value >> 8) & 0xFF, value & 0xFF
    set0, set1, set3 = bool(iop & 0x80), bool(iop & 0x40), bool(iop & 0x10)
    if idc == 0x42:
        profile = H264Profile.CONSTRAINED_BASELINE if set1 else H264Profile.BASELINE
    elif idc == 0x4D:
        profile = H264Profile.CONSTRAINED_BASELINE if set0 else H264Profile.MAIN
    elif idc == 0x58:
        profile = H264Profile.CONSTRAINED_BASELINE if set0 and set1 else H264Profile.OTHER
    elif idc == 0x64:
        # constraint_set4 and constraint_set5: no B slices, progressive only.
        profile = H264Profile.CONSTRAINED_HIGH if iop & 0x0C == 0x0C else H264Profile.HIGH
    else:
        profile = H264Profile.OTHER
    if idc in (0x42, 0x4D, 0x58) and level == 11 and set3:
        level = 9  # level 1b (H.264 A.3.1)
    return profile, level


def _choose_h264(section: MediaSection, stream_profile: str | None) -> VideoChoice | None:
    """Pick the offered H.264 format for a stream with `stream_profile`.

    1. The stream's own profile, at a level the viewer accepts (offered level at least
       the stream's, or level-asymmetry-allowed=1): the answer carries the stream's
       real profile-level-id.
    2. Otherwise the closest offered profile that can decode the stream (the lowest
       superset, e.g. main for a constrained-baseline stream), nearest level first.
    3. Otherwise constrained baseline, then baseline (browsers decode higher profiles
       whatever the SDP says; constrained baseline is what every browser accepts),
       then the first usable format.
    """
    candidates = [
        c
        for c in section.codecs
        if c.name.upper() == "H264"
        and c.clock_rate == 90000
        and c.fmtp.get("packetization-mode") == "1"
        and _PROFILE.match(c.fmtp.get("profile-level-id", "42000a"))
    ]
    if not candidates:
        return None

    def profile(c: Codec) -> str:
        # RFC 6184 section 8.1: profile-level-id defaults to 42000a; browsers always send it.
        return c.fmtp.get("profile-level-id", "42000a").lower()

    chosen: Codec | None = None
    answer_profile: str | None = None
    if stream_profile and _PROFILE.match(stream_profile):
        wanted, level = h264_profile(stream_profile)

        def level_distance(c: Codec) -> tuple[int, int]:
            offered = h264_profile(profile(c))[1]
            return (0, offered - level) if offered >= level else (1, level - offered)

        def accepts_level(c: Codec) -> bool:
            asymmetric = c.fmtp.get("level-asymmetry-allowed") == "1"
            return asymmetric or h264_profile(profile(c))[1] >= level

        same = [
            c
            for c in candidates
            if wanted is not H264Profile.OTHER
            and h264_profile(profile(c))[0] is wanted
            and accepts_level(c)
        ]
        if same:
            chosen = min(same, key=level_distance)
            answer_profile = stream_profile.lower()
        else:
            supersets = _DECODED_BY[wanted][1:]
            able = [c for c in candidates if h264_profile(profile(c))[0] in supersets]
            if able:
                chosen = min(
                    able,
                    key=lambda c: (supersets.index(h264_profile(profile(c))[0]), level_distance(c)),
                )
    if chosen is None:
        for fallback in FALLBACK_PROFILES:
            chosen = next((c for c in candidates if profile(c) == fallback), None)
            if chosen is not None:
                break
    if chosen is None:
        for kind in (H264Profile.CONSTRAINED_BASELINE, H264Profile.BASELINE):
            chosen = next((c for c in candidates if h264_profile(profile(c))[0] is kind), None)
            if chosen is not None:
                break
    if chosen is None:
        chosen = candidates[0]
    rtx = _rtx_for(section, chosen.payload_type)
    return VideoChoice(section.mid, chosen.payload_type, answer_profile or profile(chosen), rtx)


def _rtx_for(section: MediaSection, payload_type: int) -> int | None:
    return next(
        (
            c.payload_type
            for c in section.codecs
            if c.name.lower() == "rtx" and c.fmtp.get("apt") == str(payload_type)
        ),
        None,
    )


def _choose_passthrough(section: MediaSection, codec: str, fmtp: str) -> VideoChoice | None:
    """Pick the offered H265 or AV1 format for a stream whose parameters are `fmtp`.

    A format whose profile (H265 profile-id and tier, AV1 profile) differs from the
    stream's cannot decode it; one that leaves them out takes the defaults (RFC 7798
    section 7.1: profile 1, Main, tier 0; AV1 RTP section 7.2.1: profile 0, Main).
    """
    ours = _parse_fmtp(fmtp)
    # Parameters that must match, with their defaults. H265: libwebrtc also matches the
    # tier (RFC 7798 section 7.1: tier-flag defaults to 0, Main).
    keys = {"profile-id": "1", "tier-flag": "0"} if codec == "H265" else {"profile": "0"}
    for c in section.codecs:
        if c.name.upper() != codec or c.clock_rate != 90000:
            continue
        if any(c.fmtp.get(k, d) != ours.get(k, d) for k, d in keys.items()):
            continue
        rtx = _rtx_for(section, c.payload_type)
        return VideoChoice(section.mid, c.payload_type, "", rtx, codec, fmtp)
    return None


def _choose_opus(section: MediaSection) -> AudioChoice | None:
    for c in section.codecs:
        if c.name.lower() == "opus" and c.clock_rate == 48000 and c.channels == 2:
            return AudioChoice(section.mid, c.payload_type)
    return None


def parse_offer(
    sdp: str,
    *,
    profile_level_id: str | None = None,
    want_video: bool = True,
    want_audio: bool = True,
    video_codec: str = "H264",
    video_fmtp: str = "",
) -> Offer:
    """Parse `sdp` and choose the codecs to answer with.

    `video_codec` is the stream's video codec (H264, H265 or AV1); `profile_level_id`
    is an H.264 stream's profile, `video_fmtp` the format parameters of the others.
    `want_video`/`want_audio` say which tracks the stream has. Raises OfferError, and
    CodecNotOffered when an H265/AV1 stream meets an offer that wants video in
    another codec.
    """
    lines = [ln.strip() for ln in sdp.strip().splitlines() if ln.strip()]
    if not lines or lines[0] != "v=0":
        raise OfferError("offer is not SDP: it must start with v=0")
    if len(lines) > MAX_OFFER_LINES:
        raise OfferError(f"offer is not SDP: more than {MAX_OFFER_LINES} lines")

    session_ice: dict[str, str] = {}
    media_ice: list[dict[str, str]] = []
    fingerprints: list[tuple[str, str]] = []
    setup = ""
    media: list[MediaSection] = []
    rtpmaps: list[dict[int, tuple[str, int, int]]] = []
    fmtps: list[dict[int, dict[str, str]]] = []

    for line in lines[1:]:
        if len(line) < 2 or line[1] != "=":
            raise OfferError(f"offer is not SDP: bad line {line[:40]!r}")
        if line.startswith("m="):
            m = _M_LINE.match(line)
            if m is None:
                raise OfferError(f"offer is not SDP: bad m-line {line[:60]!r}")
            media.append(
                MediaSection(
                    kind=m.group(1),
                    port=_int(m.group(2), "m-line port"),
                    protocol=m.group(3),
                    formats=(m.group(4) or "").split(),
                )
            )
            media_ice.append({})
            rtpmaps.append({})
            fmtps.append({})
            continue
        if not line.startswith("a="):
            continue
        name, value = _parse_attr(line)
        ice = media_ice[-1] if media else session_ice
        if name in ("ice-ufrag", "ice-pwd"):
            ice[name] = value
        elif name == "fingerprint":
            fm = _FINGERPRINT.match(value)
            if fm is None:
                raise OfferError(f"offer is not SDP: bad fingerprint {value[:40]!r}")
            fp = (fm.group(1).lower(), fm.group(2).upper())
            if fp not in fingerprints:
                fingerprints.append(fp)
        elif name == "setup":
            setup = value
        elif not media:
            continue
        elif name == "mid":
            media[-1].mid = value
        elif name in ("sendrecv", "recvonly", "sendonly", "inactive"):
            media[-1].direction = name
        elif name == "rtpmap":
            pt_text, _, desc = value.partition(" ")
            bits = desc.split("/")
            if len(bits) < 2:
                raise OfferError(f"offer is not SDP: bad rtpmap {value[:40]!r}")
            channels = _int(bits[2], "rtpmap channels") if len(bits) > 2 else 1
            rtpmaps[-1][_int(pt_text, "payload type")] = (
                bits[0],
                _int(bits[1], "clock rate"),
                channels,
            )
        elif name == "fmtp":
            pt_text, _, params = value.partition(" ")
            fmtps[-1][_int(pt_text, "payload type")] = _parse_fmtp(params)

    for section, maps, fmtp_of in zip(media, rtpmaps, fmtps, strict=True):
        for fmt in section.formats:
            if fmt.isdigit() and int(fmt) in maps:
                name, rate, channels = maps[int(fmt)]
                section.codecs.append(
                    Codec(int(fmt), name, rate, channels, fmtp_of.get(int(fmt), {}))
                )

    video_index = audio_index = None
    video = audio = None
    offered_video = offered_audio = False
    video_wanted = False
    for i, section in enumerate(media):
        if section.port == 0 or section.direction not in ("recvonly", "sendrecv"):
            continue
        if section.kind == "video" and video is None:
            video_wanted = True
            if video_codec == "H264":
                video = _choose_h264(section, profile_level_id)
            else:
                video = _choose_passthrough(section, video_codec, video_fmtp)
            if video is not None:
                offered_video = True
                video_index = i if want_video else None
        elif section.kind == "audio" and audio is None:
            audio = _choose_opus(section)
            if audio is not None:
                offered_audio = True
                audio_index = i if want_audio else None
    if video_codec != "H264" and want_video and video_wanted and not offered_video:
        name = CODEC_NAMES.get(video_codec, video_codec)
        params = f" ({video_fmtp})" if video_fmtp else ""
        raise CodecNotOffered(
            video_codec,
            f"the stream's video is {name}{params} and the offer does not accept it "
            f"(no {video_codec} format with that profile); the relay can transcode it to "
            "H.264 when video.transcode_to_h264 is on",
        )
    if not offered_video and not offered_audio:
        name = (
            "H.264 (packetization-mode=1)"
            if video_codec == "H264"
            else CODEC_NAMES.get(video_codec, video_codec)
        )
        raise OfferError(f"offer has no {name} video and no Opus audio")
    if video_index is None and audio_index is None:
        has = "video" if want_video else "audio" if want_audio else "no tracks"
        offered = " and ".join(
            name
            for name, ok in (
                (f"{CODEC_NAMES.get(video_codec, video_codec)} video", offered_video),
                ("Opus audio", offered_audio),
            )
            if ok
        )
        raise OfferError(f"offer accepts {offered} but the stream has {has}")

    ice_values = [media_ice[i] for i in (video_index, audio_index) if i is not None]
    ufrag = next((d["ice-ufrag"] for d in ice_values if "ice-ufrag" in d), None)
    pwd = next((d["ice-pwd"] for d in ice_values if "ice-pwd" in d), None)
    ufrag = ufrag or session_ice.get("ice-ufrag")
    pwd = pwd or session_ice.get("ice-pwd")
    if not ufrag or not pwd:
        raise OfferError("offer has no ice-ufrag/ice-pwd")
    if not fingerprints:
        raise OfferError("offer has no DTLS fingerprint")
    if setup == "passive":
        raise OfferError("offer has a=setup:passive but we only act as DTLS server")

    return Offer(
        ice_ufrag=ufrag,
        ice_pwd=pwd,
        fingerprints=tuple(fingerprints),
        setup=setup or "actpass",
        media=tuple(media),
        video_index=video_index,
        audio_index=audio_index,
        video=video if video_index is not None else None,
        audio=audio if audio_index is not None else None,
    )


@dataclass(frozen=True, slots=True)
class AnswerParams:
    """Our side of the answer."""

    ice_ufrag: str
    """Our ice-ufrag."""
    ice_pwd: str
    """Our ice-pwd."""
    fingerprint: str
    """SHA-256 fingerprint of our certificate, "AB:CD:..."."""
    candidates: Sequence[str]
    """Addresses announced as host candidates."""
    port: int
    """UDP port of every candidate."""
    video_ssrc: int
    """SSRC of our video RTP stream."""
    audio_ssrc: int
    """SSRC of our audio RTP stream."""
    cname: str
    """RTCP CNAME of both streams."""
    stream_id: str
    """msid stream id (one media stream holds both tracks)."""
    video_rtx_ssrc: int | None = None
    """SSRC of our RTX stream; None leaves RTX out of the answer."""


def candidate_priority(index: int) -> int:
    """Host candidate priority (RFC 8445 section 5.1.2.1), distinct per candidate."""
    local_preference = 65535 - index
    return (126 << 24) | (local_preference << 8) | (256 - 1)


def build_answer(offer: Offer, params: AnswerParams) -> str:
    """The answer SDP text, m-lines in offer order."""
    if not params.candidates:
        raise OfferError("no ICE candidates configured: set rtc.candidates")
    accepted = [i for i in (offer.video_index, offer.audio_index) if i is not None]
    mids = (offer.media[i].mid for i in sorted(accepted))
    bundle = [mid for mid in mids if mid is not None]
    first = params.candidates[0]
    ip_kind = "IP6" if ":" in first else "IP4"
    out = [
        "v=0",
        f"o=- {secrets.randbits(62)} 2 IN {ip_kind} {first}",
        "s=-",
        "t=0 0",
        "a=ice-lite",
    ]
    if bundle:
        out.append("a=group:BUNDLE " + " ".join(bundle))
    out.append(f"a=msid-semantic: WMS {params.stream_id}")

    for i, section in enumerate(offer.media):
        if i not in accepted:
            fmt = " ".join(section.formats) or "0"
            out.append(f"m={section.kind} 0 {section.protocol} {fmt}")
            out.append(f"c=IN {ip_kind} {first}")
            if section.mid is not None:
                out.append(f"a=mid:{section.mid}")
            # Credentials on rejected m-lines too: some stacks (aiortc) refuse an answer
            # whose sections lack them, even at port 0.
            out.append(f"a=ice-ufrag:{params.ice_ufrag}")
            out.append(f"a=ice-pwd:{params.ice_pwd}")
            out.append("a=inactive")
            continue
        if i == offer.video_index:
            assert offer.video is not None
            v = offer.video
            rtx = v.rtx_payload_type if params.video_rtx_ssrc is not None else None
            pts = f"{v.payload_type}" + (f" {rtx}" if rtx is not None else "")
        else:
            assert offer.audio is not None
            pts = str(offer.audio.payload_type)
        out.append(f"m={section.kind} {params.port} {section.protocol} {pts}")
        out.append(f"c=IN {ip_kind} {first}")
        if section.mid is not None:
            out.append(f"a=mid:{section.mid}")
        out.append("a=sendonly")
        track_id = f"{params.stream_id}-{section.kind}"
        out.append(f"a=msid:{params.stream_id} {track_id}")
        out.append("a=rtcp-mux")
        out.append(f"a=ice-ufrag:{params.ice_ufrag}")
        out.append(f"a=ice-pwd:{params.ice_pwd}")
        out.append(f"a=fingerprint:sha-256 {params.fingerprint}")
        out.append("a=setup:passive")
        if i == offer.video_index:
            assert offer.video is not None
            v = offer.video
            pt = v.payload_type
            out.append(f"a=rtpmap:{pt} {v.codec}/90000")
            if v.codec == "H264":
                out.append(
                    f"a=fmtp:{pt} level-asymmetry-allowed=1;packetization-mode=1;"
                    f"profile-level-id={v.profile_level_id}"
                )
            elif v.fmtp:
                out.append(f"a=fmtp:{pt} {v.fmtp}")
            for fb in ("nack", "nack pli", "ccm fir", "goog-remb"):
                out.append(f"a=rtcp-fb:{pt} {fb}")
            ssrcs = [params.video_ssrc]
            if v.rtx_payload_type is not None and params.video_rtx_ssrc is not None:
                out.append(f"a=rtpmap:{v.rtx_payload_type} rtx/90000")
                out.append(f"a=fmtp:{v.rtx_payload_type} apt={pt}")
                out.append(f"a=ssrc-group:FID {params.video_ssrc} {params.video_rtx_ssrc}")
                ssrcs.append(params.video_rtx_ssrc)
        else:
            assert offer.audio is not None
            pt = offer.audio.payload_type
            out.append(f"a=rtpmap:{pt} opus/48000/2")
            out.append(f"a=fmtp:{pt} minptime=10;useinbandfec=1")
            ssrcs = [params.audio_ssrc]
        for ssrc in ssrcs:
            out.append(f"a=ssrc:{ssrc} cname:{params.cname}")
            out.append(f"a=ssrc:{ssrc} msid:{params.stream_id} {track_id}")
        for n, address in enumerate(params.candidates):
            out.append(
                f"a=candidate:{n + 1} 1 udp {candidate_priority(n)} {address} {params.port}"
                " typ host"
            )
        out.append("a=end-of-candidates")
    return "\r\n".join(out) + "\r\n"
