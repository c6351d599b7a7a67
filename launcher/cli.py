"""The `shardserve` command line. Each area registers its subcommands with `add_commands`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from launcher import analyze_cmd, bench_cmd, generate_cmd, launch
from launcher.errors import CommandError
from serving import cli as serving_cli
from sharding import cli as sharding_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardserve", description="Distributed inference for models too big for one device."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (generate_cmd, launch, sharding_cli, serving_cli, bench_cmd, analyze_cmd):
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except CommandError as e:
        print(f"shardserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
