"""An inter-process reader/writer lock on FGTRAC_HOME, with a bounded wait."""

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_TIMEOUT_S = float(os.environ.get("FGTRAC_LOCK_TIMEOUT", "600"))


class LedgerBusy(RuntimeError):
    """The ledger lock could not be had within the allowed wait."""


@contextmanager
def ledger_lock(path: Path, exclusive: bool, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the lock file shared (readers) or exclusive (one writer) until the block ends."""
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    try:
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    kind = "write" if exclusive else "read"
                    raise LedgerBusy(f"{path}: could not get the {kind} lock within {timeout_s:g} s "
                                     f"(another fgtrac process holds it; set FGTRAC_LOCK_TIMEOUT to wait longer)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
        yield
    finally:
        os.close(fd)
