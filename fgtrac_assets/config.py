"""Where fgtrac keeps its state: FGTRAC_HOME and the paths below it."""

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "data"
DEFAULT_ORIGIN = "fgtrac.local/ledger"


@dataclass(frozen=True)
class Home:
    """The folder layout under FGTRAC_HOME."""

    root: Path

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.duckdb"

    @property
    def lock(self) -> Path:
        return self.root / "ledger.lock"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def witness(self) -> Path:
        return self.root / "witness"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"


def resolve_home(home: str | os.PathLike | None = None) -> Home:
    """Return the Home for an explicit path, else $FGTRAC_HOME, else ./data."""
    raw = home if home not in (None, "") else os.environ.get("FGTRAC_HOME") or DEFAULT_HOME
    return Home(Path(raw).expanduser().resolve())


def log_origin() -> str:
    """Return the log's C2SP origin line ($FGTRAC_ORIGIN or the default)."""
    return os.environ.get("FGTRAC_ORIGIN") or DEFAULT_ORIGIN
