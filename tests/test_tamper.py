"""`fgtrac verify` catches a changed row, a deleted row, a forged row and a changed artifact, naming them."""

import duckdb
import pytest

from fgtrac_assets.ledger.schema import physical
from fgtrac_assets.ledger.store import Ledger
from fgtrac_assets.ledger.verify import verify_ledger


def tamper(home, sql):
    con = duckdb.connect(str(home / "ledger.duckdb"))
    con.execute(sql)
    con.close()


def findings(home) -> list[str]:
    return [f.line() for f in verify_ledger(Ledger(home)).findings]


def first_leaf(home, table, where="true"):
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    row = con.execute(f"SELECT min(leaf_index) FROM {table} WHERE {where}").fetchall()[0][0]
    con.close()
    return row


@pytest.mark.parametrize("table,column,value", [
    ("event_groups", "lr", "lr * 2"),
    ("events", "sample_id", "'0' || substr(sample_id, 2)"),
    ("samples", "label", "(label + 1) % 10"),
    ("checkpoints", "val_loss", "val_loss / 2"),
    ("checkpoint_selections", "selected", "NOT selected"),
    ("influence", "score", "-score"),
    ("artifacts", "sha256", "'ab' || substr(sha256, 3)"),
    ("materializations", "asset", "'something_else'"),
])
def test_changed_column_is_named(digits_copy, table, column, value):
    i = first_leaf(digits_copy, table)
    tamper(digits_copy, f"UPDATE {physical(table)} SET {column} = {value} WHERE leaf_index = {i}")
    lines = findings(digits_copy)
    assert any(line.startswith(f"{table} row leaf_index={i}") and "differs" in line for line in lines), lines


def test_deleted_row_is_named(digits_copy):
    i = first_leaf(digits_copy, "events", "kind = 'ingested'")
    tamper(digits_copy, f"DELETE FROM event_rows WHERE leaf_index = {i}")
    assert f"log leaf {i}: logged, but no ledger row holds it (row deleted)" in findings(digits_copy)


def test_forged_row_is_caught(digits_copy):
    tamper(digits_copy, """INSERT INTO event_rows SELECT 99999999, sample_id, pipeline, run_id, asset, 'batched',
                           training_run, 0, 0, 0, 0.1, NULL, NULL FROM events LIMIT 1""")
    assert any("leaf_index=99999999" in line and "outside the log" in line for line in findings(digits_copy))


def group_of_step(home, step=3):
    """Return (leaf_index, size) of the event group of one training step."""
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    row = con.execute("SELECT leaf_index, size FROM event_groups WHERE kind = 'batched' AND step = ?", [step]).fetchall()[0]
    con.close()
    return row


@pytest.mark.parametrize("change,what", [
    ("UPDATE group_members SET sample_key = (sample_key + 1) % 50 WHERE leaf_index = {i} AND position = 2",
     "a member's sample or detail differs from the logged group (row changed)"),
    ("UPDATE group_members SET detail = 'forged' WHERE leaf_index = {i} AND position = 0",
     "a member's sample or detail differs from the logged group (row changed)"),
    ("UPDATE group_members SET position = position + 100 WHERE leaf_index = {i} AND position = 1",
     "member positions differ from the logged group (row changed)"),
    ("DELETE FROM group_members WHERE leaf_index = {i} AND position = 4",
     "the group logged {n} members but {m} rows hold it (member rows deleted)"),
    ("INSERT INTO group_members SELECT leaf_index, {n}, sample_key, NULL FROM group_members WHERE leaf_index = {i} LIMIT 1",
     "the group logged {n} members but {p} rows hold it (member rows added)"),
])
def test_changed_step_member_is_named(digits_copy, change, what):
    """A training step's members are not leaves: changing, deleting or adding one breaks its group's digest."""
    i, n = group_of_step(digits_copy)
    tamper(digits_copy, change.format(i=i, n=n))
    assert f"events row leaf_index={i} (asset training_checkpoints): {what.format(n=n, m=n - 1, p=n + 1)}" \
        in findings(digits_copy)


def test_renamed_sample_key_and_orphan_member_are_caught(digits_copy):
    i, _ = group_of_step(digits_copy)
    tamper(digits_copy, "UPDATE sample_keys SET sample_id = 'someone-else' WHERE sample_key = "
                        f"(SELECT sample_key FROM group_members WHERE leaf_index = {i} AND position = 0)")
    tamper(digits_copy, "INSERT INTO group_members VALUES (99999999, 0, 0, NULL)")
    lines = findings(digits_copy)
    assert any(line.startswith(f"events row leaf_index={i} ") and "differs from the logged group" in line for line in lines)
    assert "events row leaf_index=99999999: 1 member row(s) of no logged group (rows added)" in lines


def test_swapped_rows_are_caught(digits_copy):
    a = first_leaf(digits_copy, "influence", "kind = 'self'")
    tamper(digits_copy, f"""UPDATE influence SET leaf_index = CASE WHEN leaf_index = {a} THEN {a + 1} ELSE {a} END
                            WHERE leaf_index IN ({a}, {a + 1})""")
    lines = findings(digits_copy)
    assert any(f"leaf_index={a}" in line for line in lines) and any(f"leaf_index={a + 1}" in line for line in lines)


def test_rewritten_log_without_the_key_is_caught(digits_copy):
    """Changing a row and its leaf hash (and every node above) still fails: the signed root differs."""
    from fgtrac_assets.integrity import merkle
    from fgtrac_assets.ledger.leaves import row_leaf
    from fgtrac_assets.ledger.nodes import rebuild_tiles

    i = first_leaf(digits_copy, "samples")
    con = duckdb.connect(str(digits_copy / "ledger.duckdb"))
    con.execute(f"UPDATE samples SET label = (label + 1) % 10 WHERE leaf_index = {i}")
    row = con.sql(f"SELECT * FROM samples WHERE leaf_index = {i}").to_arrow_table().to_pylist()[0]
    hashes = [bytes(h) for (h,) in con.execute("SELECT hash FROM log_tree WHERE level = 0 ORDER BY idx").fetchall()]
    hashes[i] = merkle.leaf_hash(row_leaf("samples", row))
    rebuild_tiles(con, hashes)
    con.close()
    lines = findings(digits_copy)
    assert lines and all(line.startswith(("tree_heads", "witness")) for line in lines), lines
    assert any("log rewritten" in line for line in lines)


def test_artifact_byte_flip_is_named(digits_copy):
    path = Ledger(digits_copy).query("SELECT path FROM artifacts WHERE kind = 'checkpoint' LIMIT 1").to_pylist()[0]["path"]
    f = digits_copy / path
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert any(line.startswith(f"artifacts {path}") and "sha256" in line for line in findings(digits_copy))


def test_deleted_artifact_is_named(digits_copy):
    path = Ledger(digits_copy).query("SELECT path FROM artifacts WHERE kind = 'gradient_cache' LIMIT 1").to_pylist()[0]["path"]
    (digits_copy / path).unlink()
    assert any(line.startswith(f"artifacts {path}") and "missing" in line for line in findings(digits_copy))


def test_forged_signature_is_caught(digits_copy):
    con = duckdb.connect(str(digits_copy / "ledger.duckdb"))
    note = con.execute("SELECT note FROM tree_heads ORDER BY size DESC LIMIT 1").fetchall()[0][0]
    body, sig = note.rsplit("— ", 1)
    name, b64 = sig.split(" ")
    forged = body + "— " + name + " " + b64[:10] + ("A" if b64[10] != "A" else "B") + b64[11:]
    con.execute("UPDATE tree_heads SET note = ? WHERE note = ?", [forged, note])
    con.close()
    assert any(line.startswith("tree_heads") and "signature" in line for line in findings(digits_copy))


def test_artifact_replaced_by_another_valid_file_is_named(digits_copy):
    rows = Ledger(digits_copy).query("SELECT path, kind FROM artifacts WHERE kind IN ('influence_scores', "
                                     "'gradient_cache')").to_pylist()
    paths = {r["kind"]: r["path"] for r in rows}
    import shutil

    shutil.copyfile(digits_copy / paths["gradient_cache"], digits_copy / paths["influence_scores"])  # valid Parquet
    lines = findings(digits_copy)
    assert any(line.startswith(f"artifacts {paths['influence_scores']}") and "sha256" in line for line in lines)
