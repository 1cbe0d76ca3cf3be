"""Artifact files under FGTRAC_HOME/artifacts, written atomically and identified by sha256."""

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import StorageError

INITIAL_WEIGHTS = "initial_weights"  # the artifact kind (and handle key) of a training run's starting weights


def checkpoint_dir(pipeline: str, training_run: str) -> str:
    """Return the folder of a training run's checkpoints (and initial weights), relative to FGTRAC_HOME."""
    return f"artifacts/{pipeline}/runs/{training_run}/checkpoints"


def initial_weights_path(pipeline: str, training_run: str) -> str:
    """Return where a training run's initial weights are written, relative to FGTRAC_HOME."""
    return f"{checkpoint_dir(pipeline, training_run)}/initial.pt"


@dataclass(frozen=True)
class ArtifactFile:
    """A written artifact: its path relative to FGTRAC_HOME, sha256 and size."""

    path: str
    sha256: str
    bytes: int
    kind: str

    def row(self, **extra) -> dict:
        """Return the artifact as a ledger `artifacts` row."""
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "kind": self.kind, **extra}


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_artifact(root: Path, relpath: str, kind: str, write: Callable[[Path], None]) -> ArtifactFile:
    """Write an artifact via `write(tmp_path)`, fsync it, move it into place, and return its record."""
    if os.path.isabs(relpath) or ".." in Path(relpath).parts:
        raise ValueError(f"artifact path {relpath!r} must stay inside FGTRAC_HOME")
    final = root / relpath
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as RuntimeError
        raise StorageError(f"writing artifact {relpath} failed (disk full or not writable?): {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ArtifactFile(path=relpath, sha256=sha256_file(final), bytes=final.stat().st_size, kind=kind)


def checked_path(root: Path, path: str, sha256: str) -> Path:
    """Return an artifact's full path after checking its sha256 against the ledger; raise LedgerDamaged if not."""
    from .store import LedgerDamaged

    problem = check_artifact(root, path, sha256)
    if problem:
        raise LedgerDamaged(f"artifact {path}: {problem}; refusing to use it (run `fgtrac verify`)")
    return root / path


def check_artifact(root: Path, path: str, sha256: str) -> str | None:
    """Return None if the file at path has this sha256, else the reason it does not."""
    full = root / path
    if not full.is_file():
        return "file is missing"
    actual = sha256_file(full)
    if actual != sha256:
        return f"sha256 is {actual[:12]}…, ledger says {sha256[:12]}…"
    return None
