"""The log as a C2SP tlog-tiles directory: paths, tiles, entry bundles, incremental export, serving,
tlog-proofs for a sample, and Go's x/mod reading all of it (tests/interop/read_tiles.go)."""

import argparse
import filecmp
import os
import random
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from fgtrac_assets.integrity import merkle, notes
from fgtrac_assets.integrity.tiles import (MAX_ENTRY_SIZE, EntryRun, EntryTooLarge, Tile, TileError, decode_bundle, decode_tile,
                                          encode_bundle, encode_bundles, entries_path, format_index, new_tiles,
                                          parse_tile_path, published_bundles, published_tiles, tile_path,
                                          tiles_between)
from fgtrac_assets.integrity.tlog_proof import verify_tlog_proof
from fgtrac_assets.ledger import export
from fgtrac_assets.ledger.export import ExportError, export_log
from fgtrac_assets.ledger.leaves import leaf_sql, table_leaves, to_arrow
from fgtrac_assets.ledger.log_command import add_log_export_commands
from fgtrac_assets.ledger.nodes import StoredNodes
from fgtrac_assets.ledger.store import Commit, Ledger
from fgtrac_assets.ledger.tlog_proofs import tlog_proofs_for_sample

# --- tile paths and encodings (pure) ------------------------------------------------------


def test_index_and_tile_paths_are_c2sp():
    assert [format_index(n) for n in (0, 7, 999, 1000, 1234067, 10**9)] == \
        ["000", "007", "999", "x001/000", "x001/x234/067", "x001/x000/x000/000"]
    assert tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert tile_path(3, 1234067, 8) == "tile/3/x001/x234/067.p/8"
    assert entries_path(5) == "tile/entries/005" and entries_path(5, 255) == "tile/entries/005.p/255"
    rng = random.Random(1)
    for _ in range(500):
        t = Tile(rng.choice([None, 0, 1, 2, 63]), rng.randrange(10 ** rng.randrange(1, 12)), rng.randrange(1, 257))
        assert parse_tile_path(t.path) == t
    for bad in ("tile/01/000", "tile/64/000", "tile/0/0001", "tile/0/x000/001", "tile/0/x1/000", "tile/0/001/x002",
                "tile/0/000.p/256", "tile/0/000.p/0", "tile/0/000.p/08", "tile/0/000.p", "tile/entry/000", "tiles/0/000",
                "tile/0/", "tile/-1/000"):
        with pytest.raises(TileError):
            parse_tile_path(bad)
    with pytest.raises(TileError):
        tile_path(0, 0, 0)


def test_published_tiles_are_the_specs_examples():
    # "a tree of size 70,000 will be represented by 273 full level 0 tiles, one partial level 0 tile of width 112,
    #  one full level 1 tile, one partial level 1 tile of width 17, and one partial level 2 tile of width 1"
    tiles = published_tiles(70_000)
    assert tiles == [Tile(0, k) for k in range(273)] + [Tile(0, 273, 112), Tile(1, 0), Tile(1, 1, 17), Tile(2, 0, 1)]
    assert published_bundles(70_000) == [Tile(None, k) for k in range(273)] + [Tile(None, 273, 112)]
    # "a tree of size 256 will be represented by a full level 0 tile and a partial level 1 tile of width 1"
    assert published_tiles(256) == [Tile(0, 0), Tile(1, 0, 1)]
    assert published_tiles(0) == [] and published_tiles(1) == [Tile(0, 0, 1)]
    assert published_tiles(256 ** 3) == [Tile(0, k) for k in range(256 ** 2)] + [Tile(1, k) for k in range(256)] + \
        [Tile(2, 0), Tile(3, 0, 1)]


def test_new_tiles_are_what_the_larger_tree_adds():
    rng = random.Random(2)
    sizes = [0, 1, 255, 256, 257, 65_535, 65_536, 65_537, 70_000] + [rng.randrange(200_000) for _ in range(30)]
    for old in sizes:
        for new in sizes:
            if old <= new:
                want = set(published_tiles(new)) - set(published_tiles(old))
                assert set(new_tiles(old, new)) == want, (old, new)
    assert new_tiles(70_000, 70_001) == [Tile(0, 273, 113)]
    # partial tiles of earlier checkpoints still partial now: the spec says they must still be served
    assert set(tiles_between([300, 511, 600, 700], 700)) == {Tile(0, 2, 88), Tile(0, 2, 188), Tile(1, 0, 1),
                                                             Tile(1, 0, 2)}


def test_bundles_are_uint16_length_prefixed():
    entries = [b"", b"a", bytes(range(256)) * 3, b"x" * MAX_ENTRY_SIZE]
    bundle = encode_bundle(entries)
    assert bundle[:5] == b"\x00\x00\x00\x01a" and bundle[5:7] == (768).to_bytes(2, "big")
    assert decode_bundle(bundle, width=4) == entries
    many = [os.urandom(random.Random(i).randrange(300)) for i in range(700)]
    bundles = encode_bundles(many)
    assert [len(decode_bundle(b)) for b in bundles] == [256, 256, 188]
    assert sum((decode_bundle(b) for b in bundles), []) == many
    assert bundles[0] == encode_bundle(many[:256])
    big = [bytes(i % 700) for i in range(20_000)]  # enough entries for the prefix-table path
    assert b"".join(encode_bundles(big)) == b"".join(encode_bundle(big[i:i + 256]) for i in range(0, 20_000, 256))
    with pytest.raises(EntryTooLarge, match="entry 1001 is 65536 bytes"):
        encode_bundles([b"ok", b"y" * (MAX_ENTRY_SIZE + 1)], first_index=1000)
    for bad in (bundle[:-1], bundle + b"\x00", b"\x00\x05abc"):
        with pytest.raises(TileError):
            decode_bundle(bad, width=4)
    h = [bytes([i]) * 32 for i in range(3)]
    assert decode_tile(b"".join(h), width=3) == h
    with pytest.raises(TileError):
        decode_tile(b"".join(h)[:-1])



def test_an_entry_run_is_its_bundles_in_one_buffer():
    many = [os.urandom(random.Random(i).randrange(400)) for i in range(700)]
    run = EntryRun.encode(many, first_index=512)
    assert len(run) == 700 and run.entries() == many
    assert [bytes(run.bundle(s, n)) for s, n in ((0, 256), (256, 256), (512, 188))] == encode_bundles(many)
    assert bytes(run.bundle(256, 10)) == encode_bundle(many[256:266])  # a partial bundle of an earlier tree size
    assert run.leaf_hashes() == b"".join(merkle.leaf_hashes(many))
    assert EntryRun.encode([]).leaf_hashes() == b"" and len(EntryRun.encode([])) == 0
    # a buffer laid out by someone else (the export's SQL) is read through its offsets, sizes checked
    data = b"".join(encode_bundles(many))
    offsets = np.cumsum([0] + [len(e) + 2 for e in many])
    assert EntryRun(data, offsets, 0).leaf_hashes() == run.leaf_hashes()
    with pytest.raises(EntryTooLarge, match="entry 1001 is 65536 bytes"):
        EntryRun.encode([b"ok", b"y" * (MAX_ENTRY_SIZE + 1)], first_index=1000)
    long = b"\xff\xff" + b"z" * 70_000  # a length prefix that cannot say the size: the offsets tell
    with pytest.raises(EntryTooLarge, match="entry 7 is 70000 bytes"):
        EntryRun(long, np.array([0, len(long)]), 7)


def test_leaf_hashes_in_skips_each_records_header():
    leaves = [b"", b"a", bytes(range(256)) * 2]
    for header in (0, 2, 5):
        data = b"".join(bytes([9]) * header + x for x in leaves)
        offsets = np.cumsum([0] + [header + len(x) for x in leaves])
        assert merkle.leaf_hashes_in(data, offsets.tolist(), header) == b"".join(merkle.leaf_hashes(leaves))
    assert merkle.leaf_hashes_in(b"", [0]) == b"" == merkle.leaf_hashes_in(b"", [])

# --- a real ledger exported --------------------------------------------------------------


def artifacts(n: int, start: int = 0) -> pa.Table:
    return pa.table({"path": [f"artifacts/a{i}.bin" for i in range(start, start + n)], "sha256": ["ab" * 32] * n,
                     "bytes": list(range(start, start + n)), "kind": ["blob"] * n, "pipeline": ["p"] * n,
                     "run_id": ["r"] * n, "asset": ["a"] * n, "training_run": [None] * n})


def commit(ledger: Ledger, rows: int, run: str, start: int = 0):
    return ledger.commit(Commit(pipeline="p", asset="a", run_id=run, rows={"artifacts": artifacts(rows, start)}))


@pytest.fixture(scope="module")
def log70k(tmp_path_factory):
    """A ledger of exactly 70,000 leaves (69,999 artifacts + the materialisation row), exported once."""
    home = tmp_path_factory.mktemp("log70k")
    ledger = Ledger(home)
    assert commit(ledger, 69_999, "big").tree_size == 70_000
    out = home / "tiles"
    export_log(ledger, out)
    return ledger, out


@pytest.fixture(scope="module")
def go_tiles(tmp_path_factory):
    from tests.interop.build import go_unavailable_reason, tiles_reader_binary

    if go_unavailable_reason():
        pytest.skip(f"Go tile reader unavailable: {go_unavailable_reason()}")
    return tiles_reader_binary(tmp_path_factory.mktemp("go-tiles"))


def go(mode, *paths, key, xmod_only=False):
    from tests.interop.build import go_read_tiles

    return go_read_tiles(mode, *paths, key=key, xmod_only=xmod_only)


def vkey(ledger: Ledger) -> str:
    return ledger.latest_tree_head()["verifier_key"]


def assert_ok(proc):
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), f"rc={proc.returncode} {proc.stdout} {proc.stderr}"


def assert_fail(proc, fragment=""):
    assert proc.returncode == 1 and proc.stdout.startswith("FAIL"), f"rc={proc.returncode} {proc.stdout} {proc.stderr}"
    assert fragment in proc.stdout and proc.stdout.count("\n") == 1, proc.stdout


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_export_is_the_spec_layout_and_the_stored_tiles(log70k):
    ledger, out = log70k
    head = ledger.latest_tree_head()
    assert (out / "checkpoint").read_text(encoding="utf-8") == head["note"]
    assert files(out) == {"checkpoint"} | {t.path for t in published_tiles(70_000) + published_bundles(70_000)}
    assert "tile/0/273.p/112" in files(out) and "tile/1/001.p/17" in files(out) and "tile/2/000.p/1" in files(out)
    with ledger.reader() as con:
        nodes = StoredNodes(con)
        for t in published_tiles(70_000):
            hashes = decode_tile((out / t.path).read_bytes(), t.width)
            assert hashes == [nodes(8 * t.level, t.index * 256 + i) for i in range(t.width)]
        for t in (Tile(None, 0), Tile(None, 137), Tile(None, 273, 112)):
            entries = decode_bundle((out / t.path).read_bytes(), t.width)
            assert [merkle.leaf_hash(e) for e in entries] == [nodes(0, t.index * 256 + i) for i in range(t.width)]
    assert b'"table":"materializations"' in decode_bundle((out / "tile/entries/273.p/112").read_bytes())[-1]


def test_go_reads_the_export_at_70000(go_tiles, log70k):
    ledger, out = log70k
    proc = go("tiles", out, key=vkey(ledger))
    assert_ok(proc)
    assert "tree size 70000: 277 tiles and 274 entry bundles authenticated" in proc.stdout


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


FLIPS = {
    # tile/0/000 is one of the tiles x/mod 0.7.0's TileHashReader reads without authenticating at 70,000
    "leaf hash in tile/0/000": ("tile/0/000", 5, "level-0 tiles do not hash to the checkpoint's root"),
    "leaf hash in the partial level-0 tile": ("tile/0/273.p/112", 32 * 111, "level-0 tiles"),
    "hash in the full level-1 tile": ("tile/1/000", 32 * 200 + 3, "is not the hash of its 256 children"),
    "hash in the partial level-1 tile": ("tile/1/001.p/17", 32 * 16, "is not the hash of its 256 children"),
    "level-2 tile": ("tile/2/000.p/1", 0, "is not the hash of its 256 children"),
    "entry in a full bundle": ("tile/entries/100", 40, "tile/entries/100"),
    "entry in the partial bundle": ("tile/entries/273.p/112", -3, "tile/entries/273.p/112"),
    "bundle length prefix": ("tile/entries/000", 1, "tile/entries/000"),
    "checkpoint root": ("checkpoint", "root", "checkpoint signature"),
    "checkpoint signature": ("checkpoint", -5, "checkpoint signature"),
}


@pytest.mark.parametrize("case", sorted(FLIPS))
def test_go_rejects_a_flipped_byte(go_tiles, log70k, tmp_path, case):
    ledger, out = log70k
    copy = tmp_path / "tiles"
    shutil.copytree(out, copy)
    rel, pos, reason = FLIPS[case]
    if pos == "root":  # a byte of the root line's base64
        origin, size, _ = (copy / rel).read_text().split("\n", 2)
        pos = len(origin) + len(size) + 2 + 3
    _flip(copy / rel, pos)
    assert_fail(go("tiles", copy, key=vkey(ledger)), reason)


@pytest.mark.parametrize("case", ["missing partial tile", "missing bundle", "truncated tile", "extra bundle entry"])
def test_go_rejects_missing_or_resized_files(go_tiles, log70k, tmp_path, case):
    ledger, out = log70k
    copy = tmp_path / "tiles"
    shutil.copytree(out, copy)
    if case == "missing partial tile":
        (copy / "tile/1/001.p/17").unlink()
    elif case == "missing bundle":
        (copy / "tile/entries/272").unlink()
    elif case == "truncated tile":
        (copy / "tile/0/005").write_bytes((copy / "tile/0/005").read_bytes()[:-32])
    else:
        p = copy / "tile/entries/273.p/112"
        p.write_bytes(p.read_bytes() + b"\x00\x00")
    assert_fail(go("tiles", copy, key=vkey(ledger)))


def test_xmod_alone_misses_a_corrupted_tile_at_70000(go_tiles, log70k, tmp_path):
    """Documents why read_tiles.go authenticates every hash itself (NOTES.md: x/mod 0.7.0's TileHashReader gap)."""
    ledger, out = log70k
    copy = tmp_path / "tiles"
    shutil.copytree(out, copy)
    _flip(copy / "tile/0/000", 5)
    assert_fail(go("tiles", copy, key=vkey(ledger)), "level-0 tiles")
    xmod = go("tiles", copy, key=vkey(ledger), xmod_only=True)
    if xmod.returncode != 0:
        pytest.skip(f"this x/mod authenticates every tile it returns ({xmod.stdout.strip()}): the gap is fixed")
    assert "returned every leaf hash" in xmod.stdout


def test_go_rejects_another_logs_key(go_tiles, log70k):
    ledger, out = log70k
    other = notes.generate_signer(ledger.origin)
    assert_fail(go("tiles", out, key=other.verifier_key), "checkpoint signature")


def _signed_sizes(ledger: Ledger) -> dict[int, str]:
    with ledger.reader() as con:
        return dict(con.execute("SELECT size, note FROM tree_heads").fetchall())


def test_incremental_export_writes_only_what_grew(tmp_path, go_tiles):
    ledger = Ledger(tmp_path / "home")
    out = tmp_path / "tiles"
    commit(ledger, 600, "c0")
    first = export_log(ledger, out)
    assert (first.previous_size, first.size) == (0, 601)
    untouched = (out / "tile/0/000").stat().st_mtime_ns, (out / "tile/entries/001").stat().st_ino
    commit(ledger, 99, "c1", 600)    # 701: level-0 tile 2 grows, bundles too
    commit(ledger, 200, "c2", 700)   # 902: tile 2 becomes full, tile 3 starts
    commit(ledger, 999, "c3", 900)   # 1902: the 1,000-leaf commit
    again = export_log(ledger, out)
    assert (again.previous_size, again.size) == (601, 1902)
    # level 0: tiles 2..6 and tile 7 partial (width 110); level 1: the partial tile of 1,902 (width 7) and of the
    # checkpoint at 902 (width 3; 701's width 2 is 601's, already there); 701's level-0 tile 2 is full by now
    assert again.bundles == 6 and again.tiles == 6 + len({Tile(1, 0, 3), Tile(1, 0, 7)})
    assert ((out / "tile/0/000").stat().st_mtime_ns, (out / "tile/entries/001").stat().st_ino) == untouched
    assert {"tile/0/002.p/89", "tile/0/002", "tile/0/007.p/110", "tile/1/000.p/2", "tile/1/000.p/3",
            "tile/1/000.p/7"} <= files(out)
    assert_ok(go("tiles", out, key=vkey(ledger)))
    # byte for byte what a fresh export writes; the older partial tiles stay (the spec allows dropping them)
    fresh = tmp_path / "fresh"
    export_log(ledger, fresh)
    assert files(fresh) <= files(out)
    assert files(out) - files(fresh) == {"tile/0/002.p/89", "tile/entries/002.p/89"}
    assert not filecmp.cmpfiles(out, fresh, sorted(files(fresh)), shallow=False)[1]
    noop = export_log(ledger, out)
    assert not noop.checkpoint_changed and noop.tiles == noop.bundles == 0


def test_every_signed_tree_head_finds_its_partial_tiles(tmp_path, go_tiles):
    """C2SP: a log MUST serve the partial tiles of every tree size it signed, until the full tile exists."""
    ledger = Ledger(tmp_path / "home")
    start = 0
    for i, n in enumerate([299, 10, 200, 1, 50, 400]):  # tree sizes 300, 311, 512, 514, 565, 966
        commit(ledger, n, f"c{i}", start)
        start += n
    out = tmp_path / "tiles"
    export_log(ledger, out)
    key = vkey(ledger)
    sizes = _signed_sizes(ledger)
    assert sorted(sizes) == [300, 311, 512, 514, 565, 966]
    # level 1 stays partial throughout: each size's own level-1 tile is there; level 0 keeps only the last one
    assert {"tile/1/000.p/1", "tile/1/000.p/2", "tile/1/000.p/3", "tile/0/003.p/198"} <= files(out)
    assert not {"tile/0/001.p/44", "tile/0/002.p/53"} & files(out)
    for size, note in sorted(sizes.items()):
        view = tmp_path / f"at-{size}"
        shutil.copytree(out, view)
        (view / "checkpoint").write_text(note, encoding="utf-8")
        assert_ok(go("tiles", view, key=key))  # earlier level-0 partials are read from their full tiles
    (tmp_path / "at-514" / "tile/1/000.p/2").unlink()
    assert_fail(go("tiles", tmp_path / "at-514", key=key), "tile/1/000.p/2")


def test_export_refuses_a_directory_of_another_log(tmp_path):
    a, b = Ledger(tmp_path / "a"), Ledger(tmp_path / "b")
    commit(a, 300, "a")
    commit(b, 10, "b")
    out = tmp_path / "tiles"
    export_log(b, out)
    with pytest.raises(ExportError, match="not consistent with this log") as exc:
        export_log(a, out)
    assert "--full" in str(exc.value) and "\n" not in str(exc.value)
    (out / "tile/0/999").write_bytes(b"stale")
    rewritten = export_log(a, out, full=True)
    assert rewritten.previous_size == 0 and "tile/0/999" not in files(out)
    assert files(out) == {"checkpoint"} | {t.path for t in published_tiles(301) + published_bundles(301)}
    (out / "checkpoint").write_text("not a checkpoint\n")
    with pytest.raises(ExportError, match="is not a checkpoint"):
        export_log(a, out)
    export_log(a, out, full=True)
    with pytest.raises(ExportError, match="tree size 301, larger than this log's 11"):
        export_log(b, out)


def test_export_of_an_empty_log_or_a_changed_row_fails_clearly(tmp_path):
    ledger = Ledger(tmp_path / "home")
    commit(ledger, 5, "c")
    with pytest.raises(ExportError, match="the log is empty"):
        empty = Ledger(tmp_path / "empty")
        empty.ensure_home()
        with duckdb.connect(str(empty.home.ledger)) as con:
            con.execute("CREATE TABLE tree_heads (size BIGINT, root BLOB, note VARCHAR, verifier_key VARCHAR)")
        export_log(empty, tmp_path / "e")
    with duckdb.connect(str(ledger.home.ledger)) as con:
        con.execute("UPDATE artifacts SET bytes = 4242 WHERE leaf_index = 3")
    with pytest.raises(ExportError, match="leaf 3: its ledger row does not hash to the logged leaf hash"):
        export_log(ledger, tmp_path / "tiles")
    assert not (tmp_path / "tiles" / "checkpoint").exists()



def test_export_of_a_log_missing_or_doubling_a_row_fails_clearly(tmp_path):
    ledger = Ledger(tmp_path / "home")
    commit(ledger, 5, "c")
    with duckdb.connect(str(ledger.home.ledger)) as con:
        con.execute("DELETE FROM artifacts WHERE leaf_index = 3")
    with pytest.raises(ExportError, match=r"hold 5 rows for log entries 0..5, not 6 \(no row for leaf 3\)"):
        export_log(ledger, tmp_path / "tiles")
    with duckdb.connect(str(ledger.home.ledger)) as con:
        con.execute("INSERT INTO artifacts SELECT * REPLACE (3 AS leaf_index) FROM artifacts WHERE leaf_index = 2")
        con.execute("INSERT INTO artifacts SELECT * FROM artifacts WHERE leaf_index = 2")
    with pytest.raises(ExportError, match=r"hold 7 rows for log entries 0..5, not 6: run `fgtrac verify`"):
        export_log(ledger, tmp_path / "tiles")
    assert not (tmp_path / "tiles" / "checkpoint").exists()


def test_a_readers_threads_are_as_asked(tmp_path):
    ledger = Ledger(tmp_path / "home")
    commit(ledger, 2, "c")
    with ledger.reader(code_views=False, threads=1) as con:
        assert con.execute("SELECT current_setting('threads')").fetchall() == [(1,)]
    with ledger.reader(code_views=False) as con:
        assert con.execute("SELECT current_setting('threads')").fetchall() == [(os.cpu_count(),)]


def test_worker_processes_write_the_same_directory(log70k, tmp_path, monkeypatch):
    ledger, out = log70k
    monkeypatch.setattr(export, "CHUNK_BUNDLES", 64)  # 274 bundles: 5 chunks over 2 processes
    r = export_log(ledger, tmp_path / "parallel", workers=2)
    assert (r.tiles, r.bundles, r.size) == (277, 274, 70_000)
    assert files(tmp_path / "parallel") == files(out)
    assert not filecmp.cmpfiles(out, tmp_path / "parallel", sorted(files(out)), shallow=False)[1]
    copy = tmp_path / "home"
    shutil.copytree(ledger.home.root, copy, ignore=shutil.ignore_patterns("tiles"))
    with duckdb.connect(str(copy / "ledger.duckdb")) as con:
        con.execute("UPDATE artifacts SET kind = 'changed' WHERE leaf_index = 65_000")
    with pytest.raises(ExportError, match="export worker: leaf 65000: its ledger row does not hash"):
        export_log(Ledger(copy), tmp_path / "bad", workers=2)
    assert not (tmp_path / "bad" / "checkpoint").exists()


def _sql_leaves(table: str, rows: pa.Table) -> list[bytes]:
    """The SQL fast path's leaves of these rows (leaves.leaf_sql), as the export reads them."""
    with duckdb.connect() as con:
        con.register("rows_", rows)
        return [r[0] for r in con.execute(f"SELECT {leaf_sql(table)} FROM rows_").fetchall()]


def test_sql_leaves_equal_the_exact_encoder_on_ordinary_values():
    rng = random.Random(5)
    n = 4000
    scores = [rng.choice([1, -1]) * 10 ** rng.uniform(-12, 15) for _ in range(n)]
    scores[:6] = [3.0, -0.0, 1e-5, 1.234e-6, 9.99e-5, 0.0001]
    rows = to_arrow("checkpoint_selections", [
        {"checkpoint_id": f"ck-{i}", "pipeline": "p/\u00e9\u4e2d\U0001f600", "run_id": 'q"uote\\d', "training_run": None,
         "selected": [True, False, None][i % 3], "rank": rng.randrange(-2**53 + 1, 2**53), "reason": f"{scores[i]}"}
        for i in range(n)])
    assert _sql_leaves("checkpoint_selections", rows) == table_leaves("checkpoint_selections", rows)
    lrs = to_arrow("checkpoints", [{"checkpoint_id": "c", "epoch": i, "lr": x, "train_loss": -x, "val_loss": None}
                                    for i, x in enumerate(scores)])
    assert _sql_leaves("checkpoints", lrs) == table_leaves("checkpoints", lrs)


def test_export_encodes_exactly_what_the_sql_path_gets_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "EXACT_LEAVES", 0)  # three leaves: the SQL encoder, not the small-range exact one
    ledger = Ledger(tmp_path / "home")
    rare = [{"checkpoint_id": "c1", "lr": 2.0 ** 60, "train_loss": 0.5},  # ECMAScript: 1152921504606847000
            {"checkpoint_id": "c2\x01\x1f", "lr": 0.1},  # control characters: lowercase \u001f
            {"checkpoint_id": "c3", "lr": 0.25}]
    rare = [{**row, "pipeline": "p", "run_id": "r"} for row in rare]  # as the commit writes them
    ledger.commit(Commit(pipeline="p", asset="a", run_id="r", rows={"checkpoints": rare}))
    rows = to_arrow("checkpoints", rare)
    exact, fast = table_leaves("checkpoints", rows), _sql_leaves("checkpoints", rows)
    assert [a == b for a, b in zip(exact, fast)] == [False, False, True]  # the fallback has work to do
    r = export_log(ledger, tmp_path / "tiles")
    published = decode_bundle((tmp_path / "tiles" / Tile(None, 0, r.size).path).read_bytes())
    assert published[:3] == exact


def test_an_entry_too_large_for_a_bundle_is_refused(tmp_path):
    ledger = Ledger(tmp_path / "home")
    ledger.commit(Commit(pipeline="p", asset="a", run_id="r", rows={"artifacts": [{"path": "x" * 70_000}]}))
    with pytest.raises(ExportError, match="entry 0 is 70[0-9]{3} bytes: a C2SP entry bundle stores at most 65535"):
        export_log(ledger, tmp_path / "tiles")


# --- the digits chain: export, tlog-proofs for a sample ----------------------------------


def test_digits_export_and_a_samples_tlog_proofs(digits_copy, tmp_path, go_tiles):
    ledger = Ledger(digits_copy)
    out = tmp_path / "tiles"
    result = export_log(ledger, out)
    assert result.size % 256, "wants a tree size that is not a multiple of 256"
    key = vkey(ledger)
    assert_ok(go("tiles", out, key=key))
    with ledger.reader() as con:
        sample = con.execute("SELECT e.sample_id FROM events e JOIN event_groups g USING (leaf_index) "
                             "LIMIT 1").fetchall()[0][0]
    proofs = tlog_proofs_for_sample(ledger, sample, tmp_path / "proofs")
    assert len(proofs) >= 3 and any(p.members is not None for p in proofs)
    assert [p.index for p in proofs] == sorted({p.index for p in proofs})
    verifier = notes.parse_verifier_key(key)
    for p in proofs:
        leaf = p.leaf.read_bytes()
        index, cp = verify_tlog_proof(p.proof.read_text(), leaf, [verifier])
        assert index == p.index and cp.size == result.size
        assert_ok(go("proof", p.proof, p.leaf, key=key))
        if p.members is not None:  # the group's entry commits to these members bytes
            import hashlib
            import json

            assert json.loads(leaf)["members"] == hashlib.sha256(p.members.read_bytes()).hexdigest()
        # the entry is the one the published tiles hold at that index
        bundle = decode_bundle((out / Tile(None, p.index // 256, min(256, result.size - p.index // 256 * 256)).path)
                               .read_bytes())
        assert bundle[p.index % 256] == leaf
    bad = proofs[0]
    bad.leaf.write_bytes(bad.leaf.read_bytes().replace(b'"table"', b'"tablE"'))
    assert_fail(go("proof", bad.proof, bad.leaf, key=key), "inclusion")


# --- the commands -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    """The `fgtrac` parser's shape for these commands (cli.py adds them to its own `log` group)."""
    parser = argparse.ArgumentParser(prog="fgtrac")
    parser.add_argument("--home")
    log = parser.add_subparsers(dest="command").add_parser("log").add_subparsers(dest="log_command")
    add_log_export_commands(log)
    return parser


def _cli_has_hook() -> bool:
    from fgtrac_assets import cli

    try:
        return cli.build_parser().parse_args(["log", "export", "x"]).func.__name__ == "cmd_log_export"
    except SystemExit:
        return False


SERVE = ("import sys; from tests.test_log_export import _parser; "
         "a = _parser().parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def test_export_command(tmp_path, capsys):
    ledger = Ledger(tmp_path / "home")
    commit(ledger, 300, "c")
    args = _parser().parse_args(["--home", str(tmp_path / "home"), "log", "export", str(tmp_path / "tiles")])
    assert args.func(args) == 0
    assert "tree size 301; wrote 3 tiles, 2 entry bundles" in capsys.readouterr().out
    assert args.func(args) == 0 and "up to date at tree size 301" in capsys.readouterr().out
    if _cli_has_hook():
        from fgtrac_assets import cli

        assert cli.main(["--home", str(tmp_path / "home"), "log", "export", str(tmp_path / "tiles"), "--full"]) == 0


def test_serve_publishes_the_directory(log70k, go_tiles):
    ledger, out = log70k
    cmd = [sys.executable, "-m", "fgtrac_assets.cli"] if _cli_has_hook() else [sys.executable, "-c", SERVE]
    proc = subprocess.Popen(cmd + ["log", "serve", str(out), "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.removeprefix("listening on ")
        with urllib.request.urlopen(url + "/checkpoint") as r:
            assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert r.read().decode() == ledger.latest_tree_head()["note"]
        with urllib.request.urlopen(url + "/tile/1/001.p/17") as r:
            assert r.headers["Content-Type"] == "application/octet-stream" and "immutable" in r.headers["Cache-Control"]
            assert r.read() == (out / "tile/1/001.p/17").read_bytes()
        for missing in ("/tile/0/999", "/.fgtrac-export.lock", "/tile/0/", "/../ledger.duckdb"):
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(url + missing)
            assert exc.value.code == 404
        assert_ok(go("tiles", url, key=vkey(ledger)))
    finally:  # SIGTERM, then SIGKILL if it has not gone in 10 s (as tests/witness_process.py stops a witness)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


def test_serve_refuses_a_directory_without_checkpoint(tmp_path):
    args = _parser().parse_args(["log", "serve", str(tmp_path), "--listen", "127.0.0.1:0"])
    with pytest.raises(ValueError, match="holds no checkpoint"):
        args.func(args)
    (tmp_path / "checkpoint").write_text("x")
    args = _parser().parse_args(["log", "serve", str(tmp_path), "--listen", "localhost"])
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        args.func(args)
