"""RTMP chunk-parser throughput: Mbit/s per core for typical publisher traffic.

Builds a stream of video-sized messages with ChunkWriter at several chunk sizes
(128 is the RTMP default, 4096 is what ffmpeg/OBS switch to), then times
ChunkReader.feed over it in 64 KiB reads, the size the server reads from TCP.

    python bench/rtmp_parse.py [--megabytes 64]
"""

from __future__ import annotations

import argparse
import os
import time

from srsrelay.rtmp.chunk import ChunkReader, ChunkWriter, MessageType

READ_SIZE = 64 * 1024


def build(chunk_size: int, total: int, message_size: int) -> bytes:
    writer = ChunkWriter(chunk_size)
    payload = os.urandom(message_size)
    out = bytearray()
    ts = 0
    while len(out) < total:
        out += writer.write(6, MessageType.VIDEO, 1, ts, payload)
        ts += 33
    return bytes(out)


def run(chunk_size: int, message_size: int, total: int) -> tuple[float, int]:
    data = build(chunk_size, total, message_size)
    reader = ChunkReader(max_message_size=16 * 1024 * 1024)
    reader.chunk_size = chunk_size
    messages = 0
    start = time.process_time()
    for off in range(0, len(data), READ_SIZE):
        messages += len(reader.feed(data[off : off + READ_SIZE]))
    elapsed = time.process_time() - start
    return len(data) * 8 / elapsed / 1e6, messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=64)
    args = parser.parse_args()
    total = args.megabytes * 1024 * 1024
    print(f"{'chunk size':>10} {'message':>8} {'messages':>9} {'Mbit/s/core':>12}")
    for chunk_size in (128, 1024, 4096, 65536):
        for message_size in (1_000, 20_000):
            mbps, messages = run(chunk_size, message_size, total)
            print(f"{chunk_size:>10} {message_size:>8} {messages:>9} {mbps:>12,.0f}")


if __name__ == "__main__":
    main()
