"""The stored Merkle tree as tiles (as Go's tlog does): 256 hashes per row at levels 0, 8, 16, ...

Tile (t, k) holds the hashes of the perfect subtrees of height 8t with indexes
k*256 .. k*256+width-1, concatenated. A node at a level between two tile levels is
recomputed from at most 128 hashes of the tile below it. Storing one row per 256
hashes, instead of one row per node, is what makes appends cheap: a million leaves
write about 4,000 rows, and the interior hashes below level 8 are never stored.
The last tile of each level is partial and is replaced as the log grows.
"""

from collections.abc import Callable, Iterable, Sequence

import duckdb
import pyarrow as pa

from ..errors import FgtracError
from ..integrity import merkle

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
KEY_SHIFT = 48
HASH = merkle.HASH_SIZE


class TreeDamaged(FgtracError, ValueError):
    """The stored tiles do not form the tree the log's size says they should."""


def tile_key(tlevel: int, index: int) -> int:
    """Return the log_tiles key of tile (tlevel, index)."""
    return (tlevel << KEY_SHIFT) | index


def tile_of(level: int, index: int) -> tuple[int, int, int, int]:
    """Return (tile level, tile index, height inside the tile, first tile entry) of the node (level, index)."""
    t, h = divmod(level, TILE_HEIGHT)
    first = index << h
    return t, first >> TILE_HEIGHT, h, first & (TILE_WIDTH - 1)


def split_hashes(blob: bytes) -> list[bytes]:
    """Return the 32-byte hashes concatenated in a tile's blob."""
    return [blob[i:i + HASH] for i in range(0, len(blob), HASH)]


def subtree_roots(hashes: Sequence[bytes], height: int = TILE_HEIGHT) -> list[bytes]:
    """Return the roots of consecutive perfect subtrees of the given height over hashes (len a multiple of 2**height)."""
    cur = list(hashes)
    sha = merkle._sha256
    for _ in range(height):
        cur = [sha(b"\x01" + a + b).digest() for a, b in zip(cur[0::2], cur[1::2])]
    return cur


class StoredNodes:
    """perfect(level, index) over the log_tiles table, with a cache of tiles and their inner levels."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self.tiles: dict[tuple[int, int], list[bytes]] = {}
        self._levels: dict[tuple[int, int], list[list[bytes]]] = {}

    def __call__(self, level: int, index: int) -> bytes:
        t, k, h, off = tile_of(level, index)
        hashes = self.tile(t, k)
        if off + (1 << h) > len(hashes):
            raise TreeDamaged(f"log node (level {level}, index {index}) is missing: tile ({t}, {k}) holds "
                           f"{len(hashes)} of the {off + (1 << h)} hashes it needs")
        if h == 0:
            return hashes[off]
        levels = self._levels.get((t, k))
        if levels is None or len(levels[0]) != len(hashes):
            levels = self._levels[(t, k)] = merkle.build_levels(hashes)
        return levels[h][off >> h]

    def tile(self, t: int, k: int) -> list[bytes]:
        """Return the hashes of tile (t, k), fetching it if needed."""
        hit = self.tiles.get((t, k))
        if hit is None:
            self.prefetch_tiles([(t, k)])
            hit = self.tiles.get((t, k))
            if hit is None:
                raise TreeDamaged(f"log tile (level {t * TILE_HEIGHT}, index {k}) is missing: the stored tree is "
                                  "damaged (`fgtrac verify` names what)")
        return hit

    def prefetch_tiles(self, keys: Iterable[tuple[int, int]]) -> None:
        """Load the given tiles with one indexed query."""
        wanted = sorted({tile_key(t, k) for t, k in keys if (t, k) not in self.tiles})
        if not wanted:
            return
        rows = self.con.execute(f"SELECT tile, hashes FROM log_tiles WHERE tile IN ({','.join(map(str, wanted))})").fetchall()
        mask = (1 << KEY_SHIFT) - 1
        for key, blob in rows:
            self.tiles[(key >> KEY_SHIFT, key & mask)] = split_hashes(bytes(blob))

    def prefetch(self, coords: Iterable[tuple[int, int]]) -> None:
        """Load the tiles holding the given nodes with one indexed query."""
        self.prefetch_tiles(tile_of(lv, ix)[:2] for lv, ix in coords)

    def run(self, algorithm: Callable, *args):
        """Return algorithm(self, *args) after fetching every tile it reads in one query.

        The RFC 6962 algorithms choose which nodes to read from the sizes and indexes alone,
        so a dry run with placeholder hashes finds them all.
        """
        wanted: list[tuple[int, int]] = []

        def record(level: int, index: int) -> bytes:
            wanted.append((level, index))
            return bytes(HASH)

        algorithm(record, *args)
        self.prefetch(wanted)
        return algorithm(self, *args)


def new_tiles(start: int, leaf_hashes: Sequence[bytes], nodes: StoredNodes) -> list[tuple[int, int, list[bytes]]]:
    """Return (tile level, tile index, hashes) of every tile that appending leaf_hashes at start creates or grows."""
    size = start + len(leaf_hashes)
    frontier = []
    t = 0
    while start >> (TILE_HEIGHT * t):
        old = start >> (TILE_HEIGHT * t)
        if old & (TILE_WIDTH - 1):
            frontier.append((t, old >> TILE_HEIGHT))
        t += 1
    nodes.prefetch_tiles(frontier)
    out = []
    new = list(leaf_hashes)
    t = 0
    while new:
        old = start >> (TILE_HEIGHT * t)
        k0, have = old >> TILE_HEIGHT, old & (TILE_WIDTH - 1)
        prior = nodes.tile(t, k0) if have else []
        if len(prior) != have:
            raise TreeDamaged(f"log tile (level {t * TILE_HEIGHT}, index {k0}) holds {len(prior)} hashes where a log "
                              f"of {start} leaves has {have}")
        cur = prior + new
        out.extend((t, k0 + j // TILE_WIDTH, cur[j:j + TILE_WIDTH]) for j in range(0, len(cur), TILE_WIDTH))
        new = subtree_roots(cur[:len(cur) // TILE_WIDTH * TILE_WIDTH])
        t += 1
    return out


def write_tiles(con: duckdb.DuckDBPyConnection, tiles: list[tuple[int, int, list[bytes]]]) -> None:
    """Store tiles, replacing the partial tiles they grow (inside the caller's transaction)."""
    if not tiles:
        return
    keys = [tile_key(t, k) for t, k, _ in tiles]
    con.execute(f"DELETE FROM log_tiles WHERE tile IN ({','.join(map(str, keys))})")
    tbl = pa.table({"tile": pa.array(keys, pa.int64()),
                    "width": pa.array([len(h) for _, _, h in tiles], pa.int32()),
                    "hashes": pa.array([b"".join(h) for _, _, h in tiles], pa.binary())})
    con.register("_fgtrac_tiles", tbl)
    try:
        con.execute("INSERT INTO log_tiles SELECT * FROM _fgtrac_tiles")
    finally:
        con.unregister("_fgtrac_tiles")


def append_hashes(con: duckdb.DuckDBPyConnection, start: int, leaf_hashes: Sequence[bytes],
                  nodes: "StoredNodes | None" = None) -> tuple[int, bytes]:
    """Store leaf hashes appended at start and the tiles they complete; return (new size, root).

    nodes: a StoredNodes to use (it then caches the tiles written, for proofs read right after).
    """
    nodes = nodes if nodes is not None else StoredNodes(con)
    tiles = new_tiles(start, leaf_hashes, nodes)
    write_tiles(con, tiles)
    nodes.tiles.update({(t, k): h for t, k, h in tiles})
    size = start + len(leaf_hashes)
    return size, nodes.run(merkle.root_from, size)


def rebuild_tiles(con: duckdb.DuckDBPyConnection, leaf_hashes: Sequence[bytes]) -> None:
    """Replace the whole stored tree by the one over leaf_hashes (used to migrate old ledgers)."""
    con.execute("DELETE FROM log_tiles")
    write_tiles(con, new_tiles(0, leaf_hashes, StoredNodes(con)))


def all_tiles(con: duckdb.DuckDBPyConnection) -> dict[int, list[tuple[int, list[bytes]]]]:
    """Return every stored tile as {tile level: [(index, hashes), ...] in index order}."""
    out: dict[int, list[tuple[int, list[bytes]]]] = {}
    mask = (1 << KEY_SHIFT) - 1
    for key, blob in con.execute("SELECT tile, hashes FROM log_tiles ORDER BY tile").fetchall():
        out.setdefault(key >> KEY_SHIFT, []).append((key & mask, split_hashes(bytes(blob))))
    return out


def tree_head(con: duckdb.DuckDBPyConnection, size: int | None = None) -> tuple[int, str, str] | None:
    """Return (size, signed note, verifier key) of the tree head at size, or the latest; None if there is none."""
    if size is None:
        rows = con.execute("SELECT size, note, verifier_key FROM tree_heads ORDER BY size DESC LIMIT 1").fetchall()
    else:
        rows = con.execute("SELECT size, note, verifier_key FROM tree_heads WHERE size = ? LIMIT 1", [size]).fetchall()
    return (rows[0][0], rows[0][1], rows[0][2]) if rows else None


def migrate_log_nodes(con: duckdb.DuckDBPyConnection) -> None:
    """Move a ledger written before tiles (one log_nodes row per node) to log_tiles, in the caller's transaction."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "log_nodes" not in tables:
        return
    leaves = [bytes(h) for (h,) in con.execute(f"SELECT hash FROM log_nodes WHERE pos < (1::BIGINT << {KEY_SHIFT}) "
                                               "ORDER BY pos").fetchall()]
    rebuild_tiles(con, leaves)
    con.execute("DROP TABLE log_nodes")
