"""The witness's state directory: its cosigning key, the logs it witnesses, and per log the latest cosigned checkpoint.

Layout of the directory (created mode 0700 on first use):

    witness.key     the PRIVATE cosigning key "PRIVATE+KEY+name+keyid+base64(0x04||seed)", mode 0600, created
                    on first use and never printed
    witness.vkey    its public verifier key "name+keyid+base64(0x04||pubkey)"
    logs            optional: the logs this witness cosigns, one log verifier key (type 0x01) per line; blank
                    lines and lines starting with '#' are ignored. `--log VKEY` flags at serve time add to it.
                    A log's origin is its key's name (as in litewitness); several keys with one name are all
                    trusted (key rotation).
    lock            flock()ed around every read-modify-write of the state
    checkpoints/<sha256(origin) hex>
                    the latest cosigned checkpoint of that origin: the log's checkpoint with the log's verified
                    signature lines and this witness's cosignature, i.e. what GET <hash>/checkpoint serves

Every write is atomic (temp file, fsync, os.replace, fsync of the directory), so a SIGKILL at any point
leaves the old or the new state. Updates hold a thread lock and the flock, so concurrent submissions from
any number of threads and processes are linearised and the compare-and-swap on the old size is atomic.
"""

import fcntl
import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import FgtracError
from ..integrity.cosignature import CosignatureSigner, cosigner_from_key, generate_cosigner
from ..integrity.notes import Verifier, parse_checkpoint, parse_verifier_key, split_note, valid_key_name

KEY_FILE = "witness.key"
VKEY_FILE = "witness.vkey"
LOGS_FILE = "logs"
LOCK_FILE = "lock"
CHECKPOINTS_DIR = "checkpoints"


class StateError(FgtracError, ValueError):
    """A witness state directory, key or logs file that cannot be used as it is."""


@dataclass(frozen=True)
class Latest:
    """The latest checkpoint this witness cosigned for one log: size, root and the cosigned note."""

    origin: str
    size: int
    root: bytes
    note: str


def origin_hash(origin: str) -> str:
    """Return the lowercase hex SHA-256 of a log origin (the tlog-witness monitoring path segment)."""
    return hashlib.sha256(origin.encode()).hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fdatasync(f.fileno())  # the data and its size; the rename is made durable by the directory's fsync
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a state directory made read-only: the user's to fix
        tmp.unlink(missing_ok=True)
        raise StateError(f"cannot write the witness state {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def _flocked(directory: Path) -> Iterator[None]:
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StateError(f"cannot open the witness state lock {directory / LOCK_FILE}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _ensure_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (directory / CHECKPOINTS_DIR).mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise StateError(f"cannot create the witness state directory {directory}: {e.strerror}") from None


def load_cosigner(directory: Path, name: str | None = None) -> CosignatureSigner:
    """Return the witness's cosigner from directory, creating its key (named name, or a random name) if none exists.

    Raises StateError if the stored key is malformed or has a name other than name.
    """
    directory = Path(directory)
    if name is not None and not valid_key_name(name):
        raise StateError(f"invalid witness name {name!r}: it must be non-empty, without spaces or '+'")
    _ensure_dir(directory)
    key_path = directory / KEY_FILE
    with _flocked(directory):
        if not key_path.exists():
            signer = generate_cosigner(name or f"fgtrac-witness/{secrets.token_hex(4)}")
            _write_atomic(key_path, signer.signer_key + "\n", mode=0o600)
        try:
            signer = cosigner_from_key(key_path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read the witness key {key_path}: {e}") from None
        except ValueError as e:
            raise StateError(f"malformed witness key {key_path}: {e}") from None
        if name is not None and signer.name != name:
            raise StateError(f"the witness key in {directory} is named {signer.name!r}, not {name!r}")
        vkey_path = directory / VKEY_FILE
        if not vkey_path.exists() or vkey_path.read_text(encoding="utf-8").strip() != signer.verifier_key:
            _write_atomic(vkey_path, signer.verifier_key + "\n")
    return signer


def load_logs(directory: Path, extra_keys: Iterable[str] = ()) -> dict[str, list[Verifier]]:
    """Return {origin: [log verifiers]} from the directory's logs file (if any) and extra_keys."""
    entries: list[tuple[str, str]] = []
    logs_path = Path(directory) / LOGS_FILE
    if logs_path.exists():
        try:
            lines = logs_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read {logs_path}: {e}") from None
        entries += [(f"{logs_path}:{i}", line.strip()) for i, line in enumerate(lines, 1)
                    if line.strip() and not line.lstrip().startswith("#")]
    entries += [("--log", k.strip()) for k in extra_keys]
    logs: dict[str, list[Verifier]] = {}
    for where, vkey in entries:
        try:
            verifier = parse_verifier_key(vkey)
        except ValueError as e:
            raise StateError(f"{where}: not a log verifier key ({e}): {vkey[:80]!r}") from None
        known = logs.setdefault(verifier.name, [])
        if all(v.verifier_key != verifier.verifier_key for v in known):
            known.append(verifier)
    return logs


def _parse_latest(note: str, where: Path) -> Latest:
    try:
        text, _ = split_note(note)
        cp = parse_checkpoint(text)
    except ValueError as e:
        raise StateError(f"damaged witness state {where}: {e}") from None
    return Latest(cp.origin, cp.size, cp.root, note)


class WitnessState:
    """A witness state directory opened for serving: the cosigner, the witnessed logs and their latest checkpoints."""

    def __init__(self, directory: Path, name: str | None = None, log_keys: Iterable[str] = ()):
        self.directory = Path(directory)
        self.cosigner = load_cosigner(self.directory, name)
        self.logs = load_logs(self.directory, log_keys)
        self._thread_lock = threading.Lock()

    def _path(self, origin_hex: str) -> Path:
        return self.directory / CHECKPOINTS_DIR / origin_hex

    def _read(self, origin_hex: str) -> Latest | None:
        path = self._path(origin_hex)
        try:
            note = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read witness state {path}: {e}") from None
        return _parse_latest(note, path)

    def latest(self, origin: str) -> Latest | None:
        """Return the latest checkpoint cosigned for origin, or None if there is none."""
        return self.latest_by_hash(origin_hash(origin))

    def latest_by_hash(self, origin_hex: str) -> Latest | None:
        """Return the latest checkpoint cosigned for the origin with this lowercase hex SHA-256, or None."""
        if len(origin_hex) != 64 or any(c not in "0123456789abcdef" for c in origin_hex):
            return None
        return self._read(origin_hex)

    def update(self, origin: str, step: Callable[[Latest | None], str]) -> str:
        """Atomically replace origin's latest cosigned note by step(current latest or None); return the new note.

        step runs under the state lock and rejects by raising, in which case nothing is written. As a last
        guard the new note must be a checkpoint of origin that does not go below, or fork at, the current size.
        """
        origin_hex = origin_hash(origin)
        path = self._path(origin_hex)
        with self._thread_lock, _flocked(self.directory):
            current = self._read(origin_hex)
            note = step(current)
            new = _parse_latest(note, path)
            if new.origin != origin:
                raise StateError(f"refusing to store a checkpoint of {new.origin!r} as the state of {origin!r}")
            if current is not None and (new.size < current.size or
                                        (new.size == current.size and new.root != current.root)):
                raise StateError(f"refusing to roll {origin} back from size {current.size} to {new.size}")
            _write_atomic(path, note)
            return note
