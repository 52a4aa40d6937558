"""RTP packetization shared by H.264 (RFC 6184) and HEVC (RFC 7798): both group NAL units
the same way and differ only in the aggregation and fragmentation packets they build."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def pack(
    nalus: Sequence[bytes],
    payload_size: int,
    *,
    header_size: int,
    length_size: int,
    aggregate: Callable[[Sequence[bytes]], bytes],
    fragment: Callable[[bytes, int], list[bytes]],
) -> list[bytes]:
    """RTP payloads for one access unit's NAL units (already filtered), in send order.

    Consecutive NAL units that fit together go into one aggregation packet (its header of
    `header_size` bytes, a `length_size`-byte length in front of each unit); a lone small
    one is sent as it is; one larger than `payload_size` is fragmented.
    """
    payloads: list[bytes] = []
    group: list[bytes] = []
    group_size = header_size

    def flush() -> None:
        nonlocal group_size
        if len(group) == 1:
            payloads.append(group[0])
        elif group:
            payloads.append(aggregate(group))
        group.clear()
        group_size = header_size

    for nal in nalus:
        if len(nal) > payload_size:
            flush()
            payloads.extend(fragment(nal, payload_size))
            continue
        entry = length_size + len(nal)
        if group and group_size + entry > payload_size:
            flush()
        group.append(nal)
        group_size += entry
    flush()
    return payloads
