"""Reading the stored Merkle tree: perfect-subtree hashes from log_nodes, and tree heads."""

from collections.abc import Callable, Iterable

import duckdb

LEVEL_SHIFT = 48


def node_pos(level: int, index: int) -> int:
    """Return the log_nodes key of the perfect subtree (level, index)."""
    return (level << LEVEL_SHIFT) | index


class StoredNodes:
    """perfect(level, index) over the log_nodes table, with a cache and an overlay of nodes not yet written."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self.cache: dict[tuple[int, int], bytes] = {}

    def __call__(self, level: int, index: int) -> bytes:
        hit = self.cache.get((level, index))
        if hit is None:
            self.prefetch([(level, index)])
            hit = self.cache.get((level, index))
            if hit is None:
                raise KeyError(f"log node (level {level}, index {index}) is missing")
        return hit

    def prefetch(self, coords: Iterable[tuple[int, int]]) -> None:
        """Load the given nodes with one indexed query."""
        keys = sorted({node_pos(lv, ix) for lv, ix in coords if (lv, ix) not in self.cache})
        if not keys:
            return
        rows = self.con.execute(f"SELECT pos, hash FROM log_nodes WHERE pos IN ({','.join(map(str, keys))})").fetchall()
        mask = (1 << LEVEL_SHIFT) - 1
        for pos, h in rows:
            self.cache[(pos >> LEVEL_SHIFT, pos & mask)] = bytes(h)

    def run(self, algorithm: Callable, *args):
        """Return algorithm(self, *args) after fetching every node it reads in one query.

        The RFC 6962 algorithms choose which nodes to read from the sizes and indexes alone,
        so a dry run with placeholder hashes finds them all.
        """
        wanted: list[tuple[int, int]] = []

        def record(level: int, index: int) -> bytes:
            wanted.append((level, index))
            return bytes(32)

        algorithm(record, *args)
        self.prefetch(wanted)
        return algorithm(self, *args)


def tree_head(con: duckdb.DuckDBPyConnection, size: int | None = None) -> tuple[int, str, str] | None:
    """Return (size, signed note, verifier key) of the tree head at size, or the latest; None if there is none."""
    if size is None:
        rows = con.execute("SELECT size, note, verifier_key FROM tree_heads ORDER BY size DESC LIMIT 1").fetchall()
    else:
        rows = con.execute("SELECT size, note, verifier_key FROM tree_heads WHERE size = ? LIMIT 1", [size]).fetchall()
    return (rows[0][0], rows[0][1], rows[0][2]) if rows else None
