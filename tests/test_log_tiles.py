"""The tiled tree store: every node, root and proof equals the in-memory RFC 6962 computation."""

import random

import duckdb
import pytest

from fgtrac_assets.integrity import merkle
from fgtrac_assets.ledger.nodes import (TILE_WIDTH, StoredNodes, TreeDamaged, all_tiles, append_hashes,
                                        rebuild_tiles)
from fgtrac_assets.ledger.schema import LOG_DDL
from fgtrac_assets.ledger.store import Commit, Ledger
from fgtrac_assets.ledger.verify import verify_ledger


def fresh_con():
    con = duckdb.connect()
    for ddl in LOG_DDL:
        con.execute(ddl)
    return con


def hashes(n: int, offset: int = 0) -> list[bytes]:
    return merkle.leaf_hashes([i.to_bytes(8, "big") for i in range(offset, offset + n)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_appends_in_random_chunks_match_the_in_memory_tree(seed):
    rnd = random.Random(seed)
    con = fresh_con()
    leaves: list[bytes] = []
    sizes = []
    while len(leaves) < 70_000:  # crosses tile boundaries at levels 0 and 8 (65,536 leaves)
        n = rnd.choice([1, 2, 255, 256, 257, 1000, rnd.randrange(1, 20_000)])
        new = hashes(n, len(leaves))
        size, root = append_hashes(con, len(leaves), new)
        leaves += new
        sizes.append(size)
        levels = merkle.build_levels(leaves)
        assert size == len(leaves) and root == merkle.root_from(lambda lv, i: levels[lv][i], size)
    stored = StoredNodes(con)
    memory = lambda lv, i: levels[lv][i]  # noqa: E731
    for _ in range(200):
        size = rnd.choice(sizes)
        i = rnd.randrange(size)
        assert stored.run(merkle.inclusion_proof_from, i, size) == merkle.inclusion_proof_from(memory, i, size)
        old = rnd.randrange(size + 1)
        assert stored.run(merkle.consistency_proof_from, old, size) == merkle.consistency_proof_from(memory, old, size)
    tiles = all_tiles(con)
    assert [len(h) for _, h in tiles[0][:-1]] == [TILE_WIDTH] * (len(tiles[0]) - 1)
    assert sum(len(h) for _, h in tiles[0]) == len(leaves)
    assert [h for _, t in tiles[1] for h in t] == levels[8]
    assert [h for _, t in tiles[2] for h in t] == levels[16]


def test_log_tree_view_lists_leaves_and_tile_level_nodes():
    con = fresh_con()
    from fgtrac_assets.ledger.schema import VIEW_DDL

    con.execute(next(ddl for ddl in VIEW_DDL if "VIEW log_tree AS" in ddl))
    leaves = hashes(600)
    append_hashes(con, 0, leaves)
    levels = merkle.build_levels(leaves)
    rows = con.execute("SELECT level, idx, hash FROM log_tree ORDER BY level, idx").fetchall()
    assert [(lv, i, bytes(h)) for lv, i, h in rows] == \
        [(0, i, h) for i, h in enumerate(leaves)] + [(8, i, h) for i, h in enumerate(levels[8])]


def test_append_refuses_a_frontier_tile_of_the_wrong_width():
    con = fresh_con()
    append_hashes(con, 0, hashes(300))
    with pytest.raises(TreeDamaged, match="holds 44 hashes where a log of 310 leaves has 54"):
        append_hashes(con, 310, hashes(5))


def test_a_ledger_with_per_node_rows_is_migrated_to_tiles(tmp_path):
    ledger = Ledger(tmp_path)
    for k in range(3):
        ledger.commit(Commit(pipeline="p", asset="a", run_id=f"r{k}",
                             rows={"events": [{"sample_id": f"s{i}", "kind": "ingested", "pipeline": "p",
                                               "run_id": f"r{k}", "asset": "a"} for i in range(200)]}))
    con = duckdb.connect(str(ledger.home.ledger))
    leaves = [bytes(h) for (h,) in con.execute("SELECT hash FROM log_tree WHERE level = 0 ORDER BY idx").fetchall()]
    con.execute("CREATE TABLE log_nodes (pos BIGINT PRIMARY KEY, hash BLOB NOT NULL)")  # the old layout
    con.executemany("INSERT INTO log_nodes VALUES (?, ?)", [[i, h] for i, h in enumerate(leaves)])
    rebuild_tiles(con, [])
    con.execute("DROP TABLE fgtrac_schema")  # a ledger from before the schema marker
    con.close()
    ledger.commit(Commit(pipeline="p", asset="a", run_id="r3", rows={}))
    assert verify_ledger(ledger, update_witness=False).findings == []
    with ledger.reader() as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "log_nodes" not in tables
