"""`fgtrac log export DIR` and `fgtrac log serve DIR`: publish the log as a C2SP tlog-tiles directory."""

import argparse
import http.server
import sys
from functools import partial
from pathlib import Path

from ..config import resolve_home
from ..errors import InputError
from ..integrity.tiles import TileError, parse_tile_path
from .export import CHECKPOINT, export_log
from .store import Ledger

DEFAULT_LISTEN = "127.0.0.1:0"


def cmd_log_export(args: argparse.Namespace) -> int:
    """Export the log into args.dir and print one line saying what was written."""
    r = export_log(Ledger(resolve_home(args.home)), Path(args.dir), full=args.full)
    if not r.checkpoint_changed:
        print(f"{r.out_dir}: up to date at tree size {r.size}")
    else:
        since = f" (was {r.previous_size})" if r.previous_size else ""
        print(f"{r.out_dir}: tree size {r.size}{since}; wrote {r.tiles} tiles, {r.bundles} entry bundles, "
              f"{r.bytes:,} bytes in {r.seconds:.3f} s")
    return 0


class TileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves only the checkpoint and C2SP tile paths of one directory, with the spec's content types."""

    def send_head(self):
        """Answer 404 for anything but the checkpoint and C2SP tile paths, else serve the file."""
        rel = self.path.split("?", 1)[0].split("#", 1)[0].lstrip("/")
        if rel != CHECKPOINT:
            try:
                parse_tile_path(rel)
            except TileError:
                self.send_error(404, "not a checkpoint or tile path")
                return None
        return super().send_head()

    def guess_type(self, path):
        """Return the C2SP content type: text for the checkpoint, octet-stream for tiles and bundles."""
        return "text/plain; charset=utf-8" if Path(path).name == CHECKPOINT else "application/octet-stream"

    def end_headers(self):
        """Add the caching headers C2SP tlog-tiles asks for, then end the headers."""
        # C2SP tlog-tiles: the checkpoint is mutable (cache a few seconds at most), tiles are immutable.
        immutable = self.path.lstrip("/").startswith("tile/")
        self.send_header("Cache-Control", "public, max-age=31536000, immutable" if immutable else "no-cache, max-age=2")
        super().end_headers()

    def log_message(self, format, *args):
        """Log each request to stderr (stdout carries only the `listening on` line)."""
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def parse_listen(text: str) -> tuple[str, int]:
    """Return (host, port) of a HOST:PORT listen address; raise InputError (a ValueError) if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InputError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 (port 0: any free port)")
    return host, int(port)


def cmd_log_serve(args: argparse.Namespace) -> int:
    """Serve args.dir over HTTP until interrupted; the first stdout line is `listening on http://HOST:PORT`."""
    directory = Path(args.dir)
    if not (directory / CHECKPOINT).is_file():
        raise InputError(f"{directory} holds no checkpoint: run `fgtrac log export {directory}` first")
    host, port = parse_listen(args.listen)
    handler = partial(TileHandler, directory=str(directory.resolve()))
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise InputError(f"--listen {args.listen}: cannot listen there ({exc.strerror or exc})") from None
    with server:
        print(f"listening on http://{server.server_address[0]}:{server.server_address[1]}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def add_log_export_commands(log_subparsers) -> None:
    """Add `export DIR [--full]` and `serve DIR [--listen HOST:PORT]` to the `fgtrac log` subcommands."""
    p = log_subparsers.add_parser("export", help="write the log as a C2SP tlog-tiles directory (incremental)")
    p.add_argument("dir", help="the output directory (checkpoint, tile/...)")
    p.add_argument("--full", action="store_true", help="rewrite the directory from scratch")
    p.set_defaults(func=cmd_log_export)
    p = log_subparsers.add_parser("serve", help="serve an exported tile directory over HTTP (for tests and mirrors)")
    p.add_argument("dir", help="a directory written by `fgtrac log export`")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN}: any free port)")
    p.set_defaults(func=cmd_log_serve)
