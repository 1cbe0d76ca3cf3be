"""The auditor's trust store: log keys pinned on first use, outside any FGTRAC_HOME (like ssh's known_hosts).

One line per log and home: `<origin> <home> <verifier key>`, in `$FGTRAC_TRUST_STORE`, else
`$XDG_CONFIG_HOME/fgtrac/known_logs`, else `~/.config/fgtrac/known_logs`. The first verify of a
home pins the key that signed its first tree head; a later verify trusts only the pinned keys
(and the rotations they endorse, which are pinned as they are seen). Entries are keyed by home
as well as origin because every home's default origin is the same `fgtrac.local/ledger`.
"""

import os
from pathlib import Path

from ..errors import StorageError


def default_path() -> Path:
    """Return where the trust store lives."""
    explicit = os.environ.get("FGTRAC_TRUST_STORE")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "fgtrac" / "known_logs"


class TrustStore:
    """Pinned log keys per (origin, home)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else default_path()

    def _entries(self) -> list[tuple[str, str, str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"{self.path}: cannot read the trust store ({_why(exc)}; $FGTRAC_TRUST_STORE "
                               "sets where it is)") from None
        out = []
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) == 3 and not line.startswith("#"):
                out.append((parts[0], parts[1], parts[2]))
        return out

    def pinned(self, origin: str, home: str) -> list[str]:
        """Return the keys pinned for a log at a home, oldest first (empty if never seen)."""
        return [k for o, h, k in self._entries() if o == origin and h == _home_field(home)]

    def pin(self, origin: str, home: str, keys: list[str]) -> list[str]:
        """Pin the keys not yet pinned for this log and home; return the ones added."""
        have = set(self.pinned(origin, home))
        new = [k for k in keys if k not in have]
        if not new:
            return []
        lines = "".join(f"{origin} {_home_field(home)} {k}\n" for k in new)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:  # appends are atomic enough for one line each
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot write the trust store ({_why(exc)}; $FGTRAC_TRUST_STORE "
                               "sets where it is)") from None
        return new


    def forget(self, origin: str, home: str) -> int:
        """Remove the keys pinned for this log and home (a ledger replaced on purpose); return how many."""
        entries = self._entries()
        keep = [e for e in entries if not (e[0] == origin and e[1] == _home_field(home))]
        if len(keep) == len(entries):
            return 0
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(f"{o} {h} {k}\n" for o, h, k in keep), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{self.path}: cannot write the trust store ({_why(exc)})") from None
        return len(entries) - len(keep)


def _why(exc: Exception) -> str:
    """Return the operating system's reason for a failed read or write (or the exception's text)."""
    return getattr(exc, "strerror", None) or str(exc)


def _home_field(home: str) -> str:
    """Return a home path as one space-free field."""
    return str(home).replace("%", "%25").replace(" ", "%20")
