"""RTMP ingest throughput on a recorded publish: Gbit/s per core.

Records every byte ffmpeg sends when it publishes (720p30 x264 at --bitrate, AAC) to a
small recording server that answers with the relay's own RtmpConnection, then replays
the recording from memory, in 64 KiB reads (the server's read size), through:

- `rtmp`:   handshake, chunk stream, AMF0 commands and message reassembly
            (RtmpConnection.receive_data), what the issue calls ingest parsing;
- `+flv`:   the same, plus FLV tag parsing and NAL unit splitting of every video and
            audio message (rtmp.flv), without packetizing or transcoding;
- `+hub`:   the whole per-stream pipeline (hub Stream: RTP packetization, GOP cache,
            AAC to Opus), with no viewers.

Throughput is recorded bytes / CPU seconds (time.process_time) of this process.

    python bench/ingest.py [--seconds 20] [--bitrate 2M] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from srsrelay.config import (  # noqa: E402
    AudioConfig,
    HubConfig,
    LogConfig,
    RtmpConfig,
    VideoConfig,
)
from srsrelay.hub.stream import Stream  # noqa: E402
from srsrelay.log import configure_logging  # noqa: E402
from srsrelay.rtmp import flv  # noqa: E402
from srsrelay.rtmp.connection import (  # noqa: E402
    MediaReceived,
    PublishRequested,
    RtmpConnection,
)

READ_SIZE = 64 * 1024
FFMPEG = "ffmpeg"


async def record(seconds: float, bitrate: str) -> bytes:
    """Every byte ffmpeg sends for a `seconds` publish, answered by RtmpConnection."""
    received = bytearray()
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RtmpConnection(RtmpConfig())
        while data := await reader.read(READ_SIZE):
            received.extend(data)
            for event in conn.receive_data(data, time.monotonic()):
                if isinstance(event, PublishRequested):
                    conn.accept_publish()
            out = conn.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    size = "1280x720"
    proc = await asyncio.create_subprocess_exec(
        FFMPEG,
        *("-hide_banner", "-loglevel", "error", "-re"),
        *("-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30"),
        *("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"),
        *("-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency"),
        *("-b:v", bitrate, "-maxrate", bitrate, "-bufsize", bitrate, "-g", "60"),
        *("-c:a", "aac", "-b:a", "128k", "-f", "flv", f"rtmp://127.0.0.1:{port}/live/bench"),
        stdin=subprocess.DEVNULL,
    )
    await proc.wait()
    await asyncio.wait_for(done.wait(), 10)
    server.close()
    await server.wait_closed()
    return bytes(received)


def replay(data: bytes, mode: str) -> tuple[float, int]:
    """CPU seconds to ingest `data` once in `mode`, and the media messages seen."""
    start = time.process_time()
    conn = RtmpConnection(RtmpConfig())
    stream = None
    if mode == "+hub":
        stream = Stream("live", "bench", "pub", HubConfig(), AudioConfig(), 1200, VideoConfig())
    messages = 0
    length_size = 4
    for off in range(0, len(data), READ_SIZE):
        for event in conn.receive_data(data[off : off + READ_SIZE], 0.0):
            if isinstance(event, PublishRequested):
                conn.accept_publish()
            elif isinstance(event, MediaReceived):
                messages += 1
                if mode == "+flv":
                    if event.kind == "video":
                        tag = flv.parse_video_tag(event.body)
                        if tag.packet_type is flv.AvcPacketType.NALU:
                            flv.split_nalus(tag.data, length_size)
                    else:
                        flv.parse_audio_tag(event.body)
                elif stream is not None:
                    if event.kind == "video":
                        stream.on_video_tag(event.timestamp_ms, event.body, 0.0)
                    else:
                        stream.on_audio_tag(event.timestamp_ms, event.body, 0.0)
        conn.data_to_send()
    if stream is not None:
        stream.end()
    return time.process_time() - start, messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--bitrate", default="2M")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    configure_logging(LogConfig(level="warning", format="console"))
    data = asyncio.run(record(args.seconds, args.bitrate))
    print(f"recorded {len(data) / 1e6:.1f} MB ({len(data) * 8 / args.seconds / 1e6:.2f} Mbit/s)")
    print()
    print(
        "| Stage | Messages | CPU ms per pass (median) | Gbit/s per core "
        "| Streams of this bitrate per core |"
    )
    print("|---|---|---|---|---|")
    for mode in ("rtmp", "+flv", "+hub"):
        times = []
        messages = 0
        for _ in range(args.repeat if mode != "+hub" else max(1, args.repeat // 2)):
            cpu, messages = replay(data, mode)
            times.append(cpu)
        cpu = statistics.median(times)
        gbps = len(data) * 8 / cpu / 1e9
        streams = args.seconds / cpu
        print(f"| {mode} | {messages} | {cpu * 1000:.0f} | {gbps:.2f} | {streams:.0f} |")


if __name__ == "__main__":
    main()
