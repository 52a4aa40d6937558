"""Weak viewers for a long run: relay memory, send outcomes, NACKs and frames.

A 2 Mbit/s RTMP stream (ffmpeg) is played by `--weak` aiortc viewers whose downlink is
shaped to `--kbit` and by `--strong` unshaped viewers, in a private network namespace
(needs root, iproute2 with ifb and htb). Prints Markdown tables:

- relay RSS after the warm-up: start, end, least-squares slope in KB/min;
- send outcomes per traffic kind, summed over all viewers;
- per viewer: frames delivered, NACKs (sent by the viewer; received, retransmitted and
  over budget at the relay) and frames the relay dropped for congestion.

    sudo python bench/lowbw.py --duration 600
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns import unavailable_reason  # noqa: E402
from tests.scenario import close_reasons, report, run_in_netns, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS counts")
    parser.add_argument("--weak", type=int, default=10, help="viewers with a shaped downlink")
    parser.add_argument("--strong", type=int, default=2, help="unshaped viewers")
    parser.add_argument("--kbit", type=int, default=500, help="weak downlink, kbit/s")
    parser.add_argument(
        "--reconnect",
        type=float,
        default=2.0,
        help="a disconnected weak viewer connects again after S seconds (0: never)",
    )
    parser.add_argument("--json", type=Path, help="also write the full result here")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"lowbw: {reason}", file=sys.stderr)
        return 2
    print(
        f"weak viewers: 2 Mbit/s stream, {args.weak} viewers at {args.kbit} kbit/s, "
        f"{args.strong} unshaped, {args.duration:.0f} s (warm-up {args.warmup:.0f} s)",
        flush=True,
    )
    result = run_in_netns(
        "weak",
        args.duration,
        weak=args.weak,
        strong=args.strong,
        weak_kbit=args.kbit,
        warmup=args.warmup,
        reconnect=args.reconnect,
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    print()
    print(report(result))
    print()
    reasons = close_reasons(result)
    warnings = result["log"]["warnings_by_event"]
    print(
        table(
            ["relay log", "count"],
            [
                ["warning/error lines", sum(warnings.values())],
                *([f"sessions closed: {r}", n] for r, n in sorted(reasons.items())),
            ],
        )
    )
    d = result["deletes"]
    print(
        f"\nDELETE: {len(d)} in max {max((x['seconds'] for x in d), default=0):.3f} s; "
        f"shutdown {result['shutdown']['seconds']:.3f} s (exit {result['shutdown']['exit_code']})"
    )
    print(f"files: {result['workdir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
