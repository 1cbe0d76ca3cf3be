"""Reading the stored Merkle tree: perfect-subtree hashes from log_nodes, and tree heads."""

import duckdb


class StoredNodes:
    """perfect(level, index) over the log_nodes table, with an overlay of nodes not yet written."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self.pending: dict[tuple[int, int], bytes] = {}

    def __call__(self, level: int, index: int) -> bytes:
        hit = self.pending.get((level, index))
        if hit is not None:
            return hit
        rows = self.con.execute("SELECT hash FROM log_nodes WHERE level = ? AND idx = ?", [level, index]).fetchall()
        if not rows:
            raise KeyError(f"log node (level {level}, index {index}) is missing")
        return bytes(rows[0][0])


def tree_head(con: duckdb.DuckDBPyConnection, size: int | None = None) -> tuple[int, str, str] | None:
    """Return (size, signed note, verifier key) of the tree head at size, or the latest; None if there is none."""
    if size is None:
        rows = con.execute("SELECT size, note, verifier_key FROM tree_heads ORDER BY size DESC LIMIT 1").fetchall()
    else:
        rows = con.execute("SELECT size, note, verifier_key FROM tree_heads WHERE size = ? LIMIT 1", [size]).fetchall()
    return (rows[0][0], rows[0][1], rows[0][2]) if rows else None
