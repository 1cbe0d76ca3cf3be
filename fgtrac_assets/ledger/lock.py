"""An inter-process reader/writer lock on FGTRAC_HOME, with a bounded wait and writer preference."""

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import FgtracError, InputError, StorageError

DEFAULT_TIMEOUT_S = 600.0


class LedgerBusy(FgtracError, RuntimeError):
    """The ledger lock could not be had within the allowed wait."""


def default_timeout_s() -> float:
    """Return the wait allowed for the lock: $FGTRAC_LOCK_TIMEOUT seconds (read now, not at import), else 600."""
    raw = os.environ.get("FGTRAC_LOCK_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise InputError(f"FGTRAC_LOCK_TIMEOUT={raw!r} is not a number of seconds >= 0")
    return value


def intent_path(path: Path) -> Path:
    """Return the turnstile file beside the lock file (held by a writer from the moment it starts waiting)."""
    return path.with_name(path.name + ".intent")


def _acquire(file: Path, mode: int, deadline: float) -> int | None:
    """Return a descriptor of file holding flock mode, or None if the deadline passed first."""
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a home the user may read but not write: even readers take the lock file
        raise StorageError(f"{file}: cannot open the ledger's lock file ({exc.strerror or exc})") from None
    delay = 0.005
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    os.close(fd)
                    return None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.1)
    except BaseException:
        os.close(fd)
        raise


def _release(fd: int) -> None:
    # Unlock explicitly: a child forked meanwhile shares this open file description, and closing our
    # descriptor alone would leave the lock held until that child exits.
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def ledger_lock(path: Path, exclusive: bool, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the lock file shared (readers) or exclusive (one writer) until the block ends.

    Writers are preferred: a writer takes the turnstile (`<lock>.intent`) exclusively before the lock and keeps it;
    a reader passes the turnstile (shared, let go as soon as it holds the lock). So readers arriving while a writer
    waits queue behind it, and a loop of audits cannot starve a commit.
    """
    timeout_s = default_timeout_s() if timeout_s is None else timeout_s
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{path.parent}: cannot make the folder of the lock file ({exc.strerror or exc})") from None
    deadline = time.monotonic() + timeout_s
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    turnstile = _acquire(intent_path(path), mode, deadline)
    held = None
    try:
        if turnstile is not None:
            held = _acquire(path, mode, deadline)
    finally:
        if turnstile is not None and (held is None or not exclusive):
            _release(turnstile)
            turnstile = None
    if held is None:
        kind = "write" if exclusive else "read"
        raise LedgerBusy(f"{path}: could not get the {kind} lock within {timeout_s:g} s "
                         f"(another fgtrac process holds it; set FGTRAC_LOCK_TIMEOUT to wait longer)")
    try:
        yield
    finally:
        _release(held)
        if turnstile is not None:
            _release(turnstile)
