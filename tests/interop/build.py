"""Build and run the Go verifier (tests/interop/verify_receipt.go) against Debian's golang.org/x/mod.

The Go program checks fgtrac receipts and consistency proofs with
golang.org/x/mod/sumdb/note and golang.org/x/mod/sumdb/tlog, an implementation
independent of ours. It is built offline in GOPATH mode (no module download):

    GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0 GOCACHE=<tmp> \\
        go build -o <tmp>/verify_receipt tests/interop/verify_receipt.go

Other tests use it through ``go_verify``::

    from tests.interop.build import go_verify, go_unavailable_reason
    if go_unavailable_reason():
        pytest.skip(go_unavailable_reason())
    proc = go_verify("receipt", receipt_json_obj, key=verifier_key)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr

A second program, ``read_tiles.go``, reads a C2SP tlog-tiles directory (or URL) and
tlog-proof files; run it with ``go_read_tiles("tiles", DIR, key=vkey)`` or
``go_read_tiles("proof", PROOF, LEAF, key=vkey)``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "verify_receipt.go"
TILES_SOURCE = Path(__file__).resolve().parent / "read_tiles.go"
XMOD_FILES = ("src/golang.org/x/mod/sumdb/note/note.go", "src/golang.org/x/mod/sumdb/tlog/tlog.go")
DEFAULT_GOPATH = "/usr/share/gocode"  # where golang-golang-x-mod-dev installs the source
APT_PACKAGES = ("golang-go", "golang-golang-x-mod-dev")

# Exit codes of the Go program.
EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_NOTHING = 0, 1, 2, 3

_binaries: dict[Path, Path] = {}


def find_gopath() -> str | None:
    """Return a GOPATH entry that holds golang.org/x/mod's sumdb source, or None."""
    candidates = [p for p in os.environ.get("GOPATH", "").split(os.pathsep) if p]
    candidates.append(DEFAULT_GOPATH)
    for entry in candidates:
        if all((Path(entry) / f).is_file() for f in XMOD_FILES):
            return entry
    return None


def go_unavailable_reason() -> str | None:
    """Return why the Go verifier cannot be built here (go or x/mod missing), or None if it can."""
    hint = f"(`make test` installs {' '.join(APT_PACKAGES)} when run as root on Debian)"
    if shutil.which("go") is None:
        return f"`go` is not on PATH {hint}"
    if find_gopath() is None:
        return f"golang.org/x/mod source not found under $GOPATH or {DEFAULT_GOPATH} {hint}"
    return None


def build_verifier(out_dir: Path) -> Path:
    """Build the Go verifier into out_dir and return the binary's path; raises RuntimeError on failure."""
    return build_go_program(SOURCE, out_dir)


def build_go_program(source: Path, out_dir: Path) -> Path:
    """Build one Go source file into out_dir (offline, GOPATH mode) and return the binary's path; raises RuntimeError on failure."""
    reason = go_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / Path(source).stem
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",  # GOPATH mode: x/mod comes from the Debian package, no network
        GOPATH=find_gopath(),
        GOCACHE=str(out_dir / "gocache"),
        CGO_ENABLED="0",
        GOFLAGS="",
        GOPROXY="off",
        GOTOOLCHAIN="local",
        GOWORK="off",
    )
    proc = subprocess.run(
        ["go", "build", "-o", str(binary), str(source)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"go build failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return binary


def go_binary(source: Path, out_dir: Path | None = None) -> Path:
    """Return the binary of a Go source file, building it on first use (once per process) into out_dir or a temp dir."""
    binary = _binaries.get(source)
    if binary is None or not binary.exists():
        if out_dir is None:
            out_dir = Path(tempfile.mkdtemp(prefix="fgtrac-gover-"))
            atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
        binary = _binaries[source] = build_go_program(source, out_dir)
    return binary


def verifier_binary(out_dir: Path | None = None) -> Path:
    """Return the Go verifier, building it on first use (once per process) into out_dir or a temp dir."""
    return go_binary(SOURCE, out_dir)


def tiles_reader_binary(out_dir: Path | None = None) -> Path:
    """Return the Go tile reader (read_tiles.go), building it on first use into out_dir or a temp dir."""
    return go_binary(TILES_SOURCE, out_dir)


def go_read_tiles(mode: str, *paths: str | os.PathLike, key: str, xmod_only: bool = False,
                  witnesses: tuple[str, ...] = (), quorum: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the Go tile reader: mode "tiles" with DIR or URL, or "proof" with PROOF_FILE LEAF_FILE.

    Returns the CompletedProcess (text mode): returncode 0 and stdout "OK ..." mean verified,
    1 and stdout "FAIL <reason>" rejected, 2 usage error. xmod_only: trust x/mod's TileHashReader alone.
    """
    if mode not in ("tiles", "proof"):
        raise ValueError(f"unknown mode {mode!r}")
    args = [str(tiles_reader_binary()), "-key", key] + (["-xmod-only"] if xmod_only else [])
    for w in witnesses:
        args += ["-witness", w]
    args += ["-quorum", str(quorum)] if witnesses else []
    return subprocess.run(args + [mode, *map(str, paths)], capture_output=True, text=True, timeout=timeout)


def go_verify(mode: str, payload: dict | list | str | bytes, key: str | None = None,
              *, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the Go verifier on payload; mode is "receipt" or "consistency".

    payload is a receipt / consistency object, a list of them, or raw JSON text.
    key, if given, is the only trusted verifier key (the payload's own verifier_key is ignored).
    Returns the CompletedProcess (text mode): returncode 0 and stdout "OK" mean verified,
    1 rejected (stdout holds the one-line reason), 2 usage error, 3 nothing verified.
    """
    if mode not in ("receipt", "consistency"):
        raise ValueError(f"unknown mode {mode!r}")
    if isinstance(payload, bytes):
        data = payload.decode("utf-8")
    elif isinstance(payload, str):
        data = payload
    else:
        data = json.dumps(payload)
    args = [str(verifier_binary())]
    if key is not None:
        args += ["-key", key]
    args.append(mode)
    return subprocess.run(args, input=data, capture_output=True, text=True, timeout=timeout)
