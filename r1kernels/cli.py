"""The ``r1k`` command line. ``r1k info`` reports versions, devices and the runnable backends per op."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1k", description="r1kernels command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="versions, devices and per-op backends")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        from ._info import format_info, info

        report = info()
        print(json.dumps(report, indent=1) if args.json else format_info(report))
        return 0
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
