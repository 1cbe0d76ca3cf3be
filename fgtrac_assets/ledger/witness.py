"""The witness: the last verified tree head, kept outside the database to catch rollback and rewrite."""

import os
from pathlib import Path

from ..errors import StorageError
from ..integrity import merkle, notes

PerfectHash = merkle.PerfectHash


def default_witness(witness_dir: Path, origin: str) -> Path:
    """Return the default witness file for a log origin."""
    return witness_dir / (origin.replace("/", "_") + ".checkpoint")


def check_witness(path: Path, verifiers: list[notes.Verifier], perfect: PerfectHash, log_size: int) -> str | None:
    """Return None if the log extends the witnessed tree head, else what is wrong."""
    try:
        note = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"cannot read the witness ({exc.strerror or exc})"
    try:
        cp = notes.parse_checkpoint(notes.open_note(note, verifiers))
    except ValueError as exc:
        return f"the witness's signature does not verify with the log's keys ({exc}): it was edited, or the keys were replaced"
    if cp.size > log_size:
        return f"the log has {log_size} leaves but the witness saw {cp.size}: the log was truncated (rolled back)"
    if cp.size and merkle.root_from(perfect, cp.size) != cp.root:
        return f"the log's first {cp.size} leaves no longer hash to the witnessed root: the log was rewritten"
    return None


def write_witness(path: Path, note: str) -> None:
    """Atomically replace the witness with a signed tree head; raise StorageError if it cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")  # two verifies may finish together
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(note, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{path}: cannot write the witness ({exc.strerror or exc})") from None
