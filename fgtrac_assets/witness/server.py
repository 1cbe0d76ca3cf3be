"""C2SP tlog-witness over HTTP: POST /add-checkpoint and GET /<sha256(origin) hex>/checkpoint.

Run it as `fgtrac witness serve --state DIR [--listen 127.0.0.1:PORT] [--log VKEY ...] [--name NAME]` or
`python -m fgtrac_assets.witness.server` with the same flags. The first line on stdout is
`listening on http://HOST:PORT` (port 0 picks a free port), the second `witness <verifier key>`; requests are
logged to stderr. SIGTERM and SIGINT stop it cleanly. Status codes and bodies follow c2sp.org/tlog-witness.
"""

import argparse
import base64
import binascii
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import FgtracError, InputError
from ..integrity.merkle import EMPTY_ROOT, verify_consistency
from ..integrity.notes import NoteError, open_note, parse_checkpoint, split_note
from .state import Latest, WitnessState

MAX_BODY = 1 << 20  # bytes of an add-checkpoint request body
MAX_PROOF_LINES = 63  # tlog-witness: "The client MUST NOT send more than 63 consistency proof lines"
DEFAULT_LISTEN = "127.0.0.1:7380"
SIZE_CONTENT_TYPE = "text/x.tlog.size"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_CHECKPOINT_PATH = re.compile(r"/([0-9a-f]{64})/checkpoint")


class Reject(Exception):
    """A request the witness refuses: HTTP status, a one-line reason and the response body to send."""

    def __init__(self, status: int, reason: str, body: str | None = None, content_type: str = TEXT_CONTENT_TYPE):
        reason = reason.replace("\n", " ")
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.body = body if body is not None else reason + "\n"
        self.content_type = content_type


def _conflict(size: int) -> Reject:
    return Reject(409, f"old size does not match the latest cosigned size {size}", f"{size}\n", SIZE_CONTENT_TYPE)


@dataclass(frozen=True)
class AddCheckpointRequest:
    """A parsed add-checkpoint body: the old size, the consistency proof and the signed checkpoint note."""

    old_size: int
    proof: list[bytes]
    note: str


def parse_add_checkpoint(body: bytes) -> AddCheckpointRequest:
    """Return the parts of an add-checkpoint body "old N\\n" + proof lines + "\\n" + note; raise Reject(400)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Reject(400, "request body is not UTF-8") from None
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise Reject(400, "request body has no empty line before the checkpoint")
    lines = head.split("\n")
    size_s = lines[0].removeprefix("old ")
    if size_s == lines[0] or not _DECIMAL.fullmatch(size_s):
        raise Reject(400, "first line must be 'old <size>' in decimal without leading zeroes")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise Reject(400, f"more than {MAX_PROOF_LINES} consistency proof lines")
    proof = []
    for line in lines[1:]:
        try:
            h = base64.b64decode(line.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            h = b""
        if len(h) != 32:
            raise Reject(400, "a consistency proof line is not the base64 of a 32-byte hash")
        proof.append(h)
    return AddCheckpointRequest(int(size_s), proof, note)


def add_checkpoint(state: WitnessState, body: bytes, clock: Callable[[], float] = time.time) -> str:
    """Check an add-checkpoint body against the state, store and return the cosignature line; raise Reject."""
    req = parse_add_checkpoint(body)
    try:
        text, signatures = split_note(req.note)
        cp = parse_checkpoint(text)
    except ValueError as e:
        raise Reject(400, f"malformed checkpoint: {e}") from None
    verifiers = state.logs.get(cp.origin)
    if not verifiers:
        raise Reject(404, f"unknown log origin {cp.origin!r}")
    try:
        open_note(req.note, verifiers)
    except NoteError as e:
        raise Reject(403, f"checkpoint not signed by the log: {e}") from None
    if req.old_size > cp.size:
        raise Reject(400, f"old size {req.old_size} is larger than the checkpoint size {cp.size}")

    trusted = {(v.name, v.key_id) for v in verifiers}
    log_lines = "".join(s.line for s in signatures if (s.name, s.key_id) in trusted)
    cosignature = ""

    def step(current: Latest | None) -> str:
        nonlocal cosignature
        size, root = (current.size, current.root) if current else (0, EMPTY_ROOT)
        if req.old_size != size:
            raise _conflict(size)
        if cp.size == 0 and cp.root != EMPTY_ROOT:
            raise _misbehaviour("a checkpoint of size 0 must have the root of the empty tree")
        if req.old_size == 0:
            if req.proof:
                raise _misbehaviour("the consistency proof must be empty when the old size is 0")
        elif req.old_size == cp.size:
            if cp.root != root:
                raise _misbehaviour(f"same size {size} as the latest cosigned checkpoint but a different root")
            if req.proof:
                raise _misbehaviour("the consistency proof must be empty when the sizes are equal")
        elif not (verdict := verify_consistency(size, cp.size, root, cp.root, req.proof)):
            raise _misbehaviour(f"the consistency proof from size {size} to {cp.size} does not verify: "
                                f"{verdict.reason}")
        cosignature = state.cosigner.cosign(text, max(1, int(clock())))
        return f"{text}\n{log_lines}{cosignature}"

    def _misbehaviour(reason: str) -> Reject:
        # tlog-witness: the witness MAY log such a request (the log signed it), as proof of misbehaviour.
        print(f"witness: rejected a log-signed checkpoint of {cp.origin} (size {cp.size}): {reason}\n"
              f"{req.note}", file=sys.stderr, flush=True)
        return Reject(422, reason)

    state.update(cp.origin, step)
    return cosignature


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as tlog-witness recommends
    server_version = "fgtrac-witness"
    timeout = 30  # seconds a client may stall mid-request before its connection is dropped
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: "WitnessServer"

    def do_POST(self) -> None:
        self._handle(self._post)

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_PUT(self) -> None:
        self._handle(self._not_allowed)

    do_DELETE = do_PATCH = do_PUT

    def _handle(self, route: Callable[[], tuple[int, str, str]]) -> None:
        try:
            status, body, content_type = route()
        except Reject as r:
            status, body, content_type = r.status, r.body, r.content_type
        except TimeoutError:  # the client stalled mid-body: drop the connection
            self.close_connection = True
            return
        except Exception as e:  # never crash: answer 500 and keep serving
            traceback.print_exc(file=sys.stderr)
            r = Reject(500, f"internal error: {type(e).__name__}: {e}")
            status, body, content_type = r.status, r.body, r.content_type
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", "POST" if self.path == "/add-checkpoint" else "GET")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _post(self) -> tuple[int, str, str]:
        if self.path != "/add-checkpoint":
            self.close_connection = True  # the body is left unread
            raise Reject(404 if not _CHECKPOINT_PATH.fullmatch(self.path) else 405, f"no such endpoint {self.path}")
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            self.close_connection = True
            raise Reject(411, "Content-Length is required")
        if not length.isdigit():
            self.close_connection = True
            raise Reject(400, "malformed Content-Length")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise Reject(413, f"request body over {MAX_BODY} bytes")
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            self.close_connection = True
            raise Reject(400, "request body shorter than its Content-Length")
        return 200, add_checkpoint(self.server.state, body), TEXT_CONTENT_TYPE

    def _get(self) -> tuple[int, str, str]:
        match = _CHECKPOINT_PATH.fullmatch(self.path)
        if not match:
            if self.path == "/add-checkpoint":
                raise Reject(405, "add-checkpoint takes POST")
            raise Reject(404, f"no such endpoint {self.path}")
        latest = self.server.state.latest_by_hash(match[1])
        if latest is None:
            raise Reject(404, "this witness never cosigned a checkpoint of that log")
        return 200, latest.note, TEXT_CONTENT_TYPE

    def _not_allowed(self) -> tuple[int, str, str]:
        self.close_connection = True
        raise Reject(405, f"method {self.command} not allowed")

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"witness: {self.address_string()} {format % args}\n")


class WitnessServer(ThreadingHTTPServer):
    """A threading HTTP server holding the WitnessState its handlers serve."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: WitnessState):
        self.state = state
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


def parse_listen(listen: str) -> tuple[str, int]:
    """Return (host, port) of "HOST:PORT" or "[IPV6]:PORT"; raise InputError (a ValueError) if malformed."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InputError(f"--listen must be HOST:PORT, got {listen!r}")
    return host, int(port)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `witness serve` to parser."""
    parser.add_argument("--state", required=True, help="the witness state directory (key, logs, cosigned checkpoints)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to listen on, port 0 = any free port "
                        f"(default {DEFAULT_LISTEN})")
    parser.add_argument("--log", action="append", default=[], metavar="VKEY",
                        help="a log verifier key to witness; its name is the log's origin (repeatable; adds to "
                             "the state directory's logs file)")
    parser.add_argument("--name", help="the witness's name when its key is created (default: a random one)")


def serve(args: argparse.Namespace) -> int:
    """Serve the witness until SIGTERM or SIGINT; return the exit status."""
    host, port = parse_listen(args.listen)
    state = WitnessState(Path(args.state), args.name, args.log)
    if not state.logs:
        raise InputError(f"no logs to witness: pass --log VKEY or list log keys in {Path(args.state) / 'logs'}")
    try:
        httpd = WitnessServer((host, port), state)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise InputError(f"--listen {args.listen}: cannot listen there ({exc.strerror or exc})") from None
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=httpd.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        bound_host, bound_port = httpd.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"listening on http://{shown}:{bound_port}", flush=True)
        print(f"witness {state.cosigner.verifier_key}", flush=True)
        print(f"witness: cosigning {', '.join(sorted(state.logs))}", file=sys.stderr, flush=True)
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("witness: stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `witness serve` from the command line; return its exit status."""
    parser = argparse.ArgumentParser(prog="fgtrac witness serve", description="A C2SP tlog-witness.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except FgtracError as e:  # anything else is a bug: its traceback is shown
        print(f"fgtrac witness: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
