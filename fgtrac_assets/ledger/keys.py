"""The log's key history: which signing key was current at each tree size, from the ledger's own records.

The first key is the one that signed the first tree head. A rotation is a `log_keys` leaf,
committed under a tree head signed by the key it retires, whose `endorsement` is a signed
note by that key naming its successor; every head after that commit's head must be signed
by the successor. So a `.vkey` file planted in keys/ is never trusted: only keys in this
chain are, and only for the sizes they were current for.
"""

from dataclasses import dataclass

import duckdb

from ..errors import FgtracError
from ..integrity import notes

ROTATION_MAGIC = "fgtrac/key-rotation/v1"


class KeyHistoryError(FgtracError, ValueError):
    """The ledger's key history does not hold (a rotation not endorsed by the key it retires)."""


def rotation_text(origin: str, new_key: str) -> str:
    """Return the note text the retiring key signs to endorse its successor."""
    return f"{ROTATION_MAGIC}\n{origin}\n{new_key}\n"


def endorse(old: notes.Signer, origin: str, new_key: str) -> str:
    """Return the endorsement: a signed note by the retiring key naming the new verifier key."""
    return old.sign(rotation_text(origin, new_key))


@dataclass(frozen=True)
class Rotation:
    """One recorded rotation: at leaf `leaf_index`, `new_key` replaced `previous_key`."""

    leaf_index: int
    previous_key: str
    new_key: str
    endorsement: str


@dataclass(frozen=True)
class KeyHistory:
    """The chain of signing keys of one log: the first key and its endorsed successors, with where each starts."""

    first_key: str | None
    rotations: tuple[Rotation, ...]
    starts: tuple[int, ...]  # rotations[i].new_key signs the heads of size > starts[i]

    @property
    def keys(self) -> list[str]:
        """Return every key of the chain, oldest first."""
        return ([self.first_key] if self.first_key else []) + [r.new_key for r in self.rotations]

    @property
    def current_key(self) -> str | None:
        """Return the key that signs new tree heads."""
        return self.keys[-1] if self.keys else None

    def key_for(self, size: int) -> str | None:
        """Return the key that must have signed the tree head of this size."""
        key = self.first_key
        for rotation, start in zip(self.rotations, self.starts):
            if size > start:
                key = rotation.new_key
        return key


def load_history(con: duckdb.DuckDBPyConnection, origin: str) -> tuple[KeyHistory, list[str]]:
    """Return the key history recorded in the ledger and the problems found in it (broken endorsements)."""
    first = con.execute("SELECT verifier_key FROM tree_heads ORDER BY size, created_at LIMIT 1").fetchall()
    first_key = first[0][0] if first else None
    has_table = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
                            "AND table_name = 'log_keys'").fetchall()[0][0]
    rows = con.execute("SELECT leaf_index, previous_key, verifier_key, endorsement FROM log_keys "
                       "WHERE origin = ? ORDER BY leaf_index", [origin]).fetchall() if has_table else []
    sizes = [s for (s,) in con.execute("SELECT DISTINCT size FROM tree_heads ORDER BY size").fetchall()]
    rotations, starts, problems = [], [], []
    current = first_key
    for leaf_index, previous, new, endorsement in rows:
        problem = _rotation_problem(origin, current, previous, new, endorsement)
        if problem:
            problems.append(f"log_keys row leaf_index={leaf_index}: {problem}")
            continue
        rotations.append(Rotation(leaf_index, previous, new, endorsement))
        starts.append(next((s for s in sizes if s > leaf_index), leaf_index + 1))  # its own commit's head: old key
        current = new
    return KeyHistory(first_key, tuple(rotations), tuple(starts)), problems


def _rotation_problem(origin: str, current: str | None, previous: str, new: str, endorsement: str) -> str | None:
    """Return why a rotation record does not extend the chain, or None if it does."""
    if current is None:
        return "a key rotation before any signed tree head"
    if previous != current:
        return f"rotates away from {previous[:40]}…, which was not the current key ({current[:40]}…)"
    try:
        text = notes.open_note(endorsement, [notes.parse_verifier_key(previous)])
    except ValueError as exc:
        return f"the endorsement does not verify with the retiring key ({exc})"
    if text != rotation_text(origin, new):
        return "the endorsement names another key or log than the record"
    return None
