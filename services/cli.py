"""``photoferry``: the command line for a site's operators.

    photoferry token DEVICE_ID    print a device's token (needs PHOTOFERRY_DEVICE_SECRET)
"""

from __future__ import annotations

import argparse
import os
import sys

from services.common.config import CliConfig
from services.common.photos import DEVICE_ID_PATTERN
from services.common.tokens import device_token


def _token(config: CliConfig, args: argparse.Namespace) -> int:
    if not config.device_secret:
        print("photoferry token: set PHOTOFERRY_DEVICE_SECRET to the site's device secret", file=sys.stderr)
        return 2
    if not DEVICE_ID_PATTERN.fullmatch(args.device_id):
        print("photoferry token: a device_id is 1 to 64 characters of A-Z a-z 0-9 . _ -", file=sys.stderr)
        return 2
    print(device_token(config.device_secret, args.device_id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="photoferry", description="Operate a photoferry site.")
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="print the bearer token of a device")
    token.add_argument("device_id")
    token.set_defaults(run=_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(CliConfig.from_env(os.environ), args))


if __name__ == "__main__":
    sys.exit(main())
