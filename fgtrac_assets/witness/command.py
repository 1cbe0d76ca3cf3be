"""`fgtrac witness serve` and `fgtrac witness key`: add_witness_commands() plugs them into the fgtrac parser.

    fgtrac witness serve --state DIR [--listen 127.0.0.1:PORT] [--log VKEY ...] [--name NAME]
    fgtrac witness key --state DIR [--name NAME]     print the witness's verifier key (type 0x04)
"""

import argparse
import sys
from pathlib import Path

from ..errors import FgtracError
from . import server
from .state import load_cosigner


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the witness until SIGTERM; return the exit status."""
    return server.serve(args)


def cmd_key(args: argparse.Namespace) -> int:
    """Print the witness's verifier key, creating its key if needed."""
    print(load_cosigner(Path(args.state), args.name).verifier_key)
    return 0


def add_witness_commands(subparsers):
    """Add the `witness` command group (serve, key) to an argparse subparsers object; return its own subparsers."""
    p = subparsers.add_parser("witness", help="a C2SP tlog-witness: cosign checkpoints of the logs it follows")
    sub = p.add_subparsers(dest="witness_command", required=True)
    s = sub.add_parser("serve", help="serve add-checkpoint and the latest cosigned checkpoints over HTTP")
    server.add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)
    k = sub.add_parser("key", help="print the witness's verifier key (creating the key if needed)")
    k.add_argument("--state", required=True, help="the witness state directory")
    k.add_argument("--name", help="the witness's name when its key is created (default: a random one)")
    k.set_defaults(func=cmd_key)
    return sub


def main(argv: list[str] | None = None) -> int:
    """Run `witness ...` on its own (as `fgtrac witness ...` does); return the exit status."""
    parser = argparse.ArgumentParser(prog="fgtrac")
    add_witness_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FgtracError as e:  # anything else is a bug: its traceback is shown
        print(f"fgtrac: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
