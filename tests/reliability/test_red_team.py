"""Holes found by attacking a completed home from outside (issue 15), each closed and pinned here.

An attacker holds a copy of FGTRAC_HOME: they can run `fgtrac audit sql`, write the DuckDB file
with plain DuckDB, and put files under keys/. None of that may make an audit lie, make SQL touch
a file, or slip past `fgtrac verify`. What only a witness outside the home can catch (a rollback
with the home's witness deleted, a history re-signed with the home's own key) is in
test_proofs.py and the witness tests; here the part that needs no outside witness.
"""

import json
import shutil

import duckdb
import pytest

from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.integrity import notes
from fgtrac_assets.ledger.store import Commit, Ledger
from fgtrac_assets.ledger.verify import verify_ledger
from tests.test_chain import scalar as one


def run(home, *argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = fgtrac(["--home", str(home), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_sql(home, *statements) -> None:
    con = duckdb.connect(str(home / "ledger.duckdb"))
    for sql in statements:
        con.execute(sql)
    con.close()


def fail_lines(home, **kw) -> list[str]:
    return [f.line() for f in verify_ledger(Ledger(home), update_witness=False, **kw).findings]


def private_key(home) -> str:
    return next((home / "keys").glob("*.key")).read_text().strip()


# --- 1. `fgtrac audit sql` cannot touch the file system -------------------------------------------------

@pytest.mark.parametrize("statement", [
    "SELECT content FROM read_text('{home}/keys/*.key')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "COPY (SELECT note FROM tree_heads ORDER BY size LIMIT 1) TO '{home}/witness/fgtrac.local_ledger.checkpoint'",
    "COPY (SELECT 'x') TO '{home}/keys/planted.vkey'",
    "EXPORT DATABASE '{home}/exported'",
    "PRAGMA profiling_output = '{home}/profile.txt'",
    "ATTACH '{home}/other.duckdb' AS other",
    "SET enable_external_access = true",
])
def test_audit_sql_cannot_read_or_write_files(digits_copy, capsys, statement):
    assert run(digits_copy, "verify", capsys=capsys)[0] == 0  # writes the home's witness
    before = {p: p.read_bytes() for p in digits_copy.rglob("*") if p.is_file() and "ledger.duckdb" not in p.name}
    code, out, err = run(digits_copy, "audit", "sql", statement.format(home=digits_copy), capsys=capsys)
    assert code == 2 and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1
    assert private_key(digits_copy) not in out + err and "PRIVATE+KEY" not in out + err
    after = {p: p.read_bytes() for p in digits_copy.rglob("*") if p.is_file() and "ledger.duckdb" not in p.name}
    assert after == before  # nothing written, nothing planted
    assert run(digits_copy, "verify", capsys=capsys)[0] == 0


def test_audit_sql_still_reads_the_ledger_and_its_views(digits_copy, capsys):
    code, out, _ = run(digits_copy, "audit", "sql", "SELECT count(*) AS n FROM influence_top", "--format", "json",
                       capsys=capsys)
    assert code == 0 and json.loads(out)[0]["n"] > 0


# --- 2. audits cannot lie -------------------------------------------------------------------------------

def audit_outputs(home, capsys, test: str, train: str) -> dict[str, str]:
    out = {}
    for name, argv in {"influence": ["audit", "influence", test], "sample": ["audit", "sample", train],
                       "run": ["audit", "run", "latest"], "used": ["audit", "used", train, "--run", "latest"],
                       "sql": ["audit", "sql", "SELECT kind, count(*) FROM events GROUP BY ALL ORDER BY ALL"]}.items():
        code, text, err = run(home, *argv, capsys=capsys)
        assert code == 0, err
        out[name] = text
    return out


REDEFINITIONS = {
    "view influence_top": """CREATE OR REPLACE VIEW influence_top AS
        SELECT pipeline, training_run, method, test_sample_id,
               CASE kind WHEN 'opponent' THEN 'proponent' ELSE 'opponent' END AS kind, rank, train_sample_id,
               -score AS score, leaf_index FROM influence WHERE kind IN ('proponent', 'opponent')""",
    "macro sample_history_of": """CREATE OR REPLACE MACRO sample_history_of(sid) AS TABLE
        SELECT sample_id, leaf_index, 'forged' AS kind, pipeline, asset, run_id, training_run, epoch, step, position,
               lr, checkpoint_id, detail FROM events WHERE sample_id = sid LIMIT 1""",
    "view checkpoint_summary": """CREATE OR REPLACE VIEW checkpoint_summary AS
        SELECT checkpoint_id, pipeline, training_run, epoch, step, lr * 2 AS lr, train_loss, val_loss,
               true AS selected, 1 AS selection_rank, 'forged' AS reason, path, sha256 FROM checkpoints""",
    "macro sample_usage_of": """CREATE OR REPLACE MACRO sample_usage_of(sid, run) AS TABLE
        SELECT sid AS sample_id, run AS training_run, false AS used, 0 AS epochs, 0 AS steps, NULL AS first_step,
               NULL AS last_step, NULL AS min_lr, NULL AS max_lr""",
    "view events": """CREATE OR REPLACE VIEW events AS SELECT * FROM event_rows WHERE kind <> 'batched'""",
}


def test_redefined_views_and_macros_do_not_change_any_audit_and_verify_names_them(digits_copy, capsys):
    test = one(digits_copy, "SELECT test_sample_id FROM influence WHERE kind = 'proponent' LIMIT 1")
    train = one(digits_copy, "SELECT sample_id FROM events WHERE kind = 'batched' LIMIT 1")
    honest = audit_outputs(digits_copy, capsys, test, train)
    write_sql(digits_copy, *REDEFINITIONS.values())
    assert audit_outputs(digits_copy, capsys, test, train) == honest
    lines = fail_lines(digits_copy)
    for name in REDEFINITIONS:
        assert any(line.startswith(f"schema {name}:") and "differs" in line for line in lines), (name, lines)


def test_redefinitions_stay_visible_after_later_writes(digits_copy):
    write_sql(digits_copy, REDEFINITIONS["view influence_top"])
    Ledger(digits_copy).commit(Commit("p", "a", "r", rows={"events": [{"sample_id": "s", "kind": "ingested"}]}))
    assert any(line.startswith("schema view influence_top") for line in fail_lines(digits_copy))


@pytest.mark.parametrize("statement,named", [
    ("CREATE TABLE evil (x INTEGER)", "table evil: not defined by fgtrac"),
    ("CREATE VIEW evil_view AS SELECT 1", "view evil_view: not defined by fgtrac"),
    ("CREATE MACRO evil_macro(x) AS x + 1", "macro evil_macro: not defined by fgtrac"),
    ("DROP INDEX event_rows_sample_idx", "index event_rows_sample_idx: missing"),
    ("DROP VIEW asset_lineage", "view asset_lineage: missing"),
    ("CREATE SCHEMA shadow", "schema shadow: not defined by fgtrac"),
    ("CREATE SEQUENCE evil_seq", "sequence evil_seq: not defined by fgtrac"),
])
def test_every_schema_object_is_compared_with_the_code(digits_copy, statement, named):
    write_sql(digits_copy, statement)
    assert any(line.startswith(f"schema {named}") for line in fail_lines(digits_copy)), fail_lines(digits_copy)


# --- 3. verify without blind spots ----------------------------------------------------------------------

@pytest.mark.parametrize("content", ["empty", "foreign"])
def test_an_empty_or_foreign_file_in_place_of_the_ledger_fails(digits_copy, capsys, content):
    (digits_copy / "ledger.duckdb").unlink()
    con = duckdb.connect(str(digits_copy / "ledger.duckdb"))
    if content == "foreign":
        con.execute("CREATE TABLE customers (id INTEGER, name VARCHAR)")
    con.close()
    code, out, _ = run(digits_copy, "verify", capsys=capsys)
    assert code == 1 and out.startswith("FAIL ledger"), out
    assert "not this home's ledger" in out


def test_a_deleted_interior_tile_fails_verify_and_prove_says_why(digits_copy, capsys):
    sample = one(digits_copy, "SELECT sample_id FROM samples LIMIT 1")
    write_sql(digits_copy, "DELETE FROM log_tiles WHERE tile = (1::BIGINT << 48)")  # the level-8 tile 0
    assert any(line.startswith("log_tiles level 8 tile 0") and "missing" in line for line in fail_lines(digits_copy))
    code, out, err = run(digits_copy, "prove", sample, capsys=capsys)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "tile" in err, err


def heads(home) -> list[int]:
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    try:
        return [s for (s,) in con.execute("SELECT size FROM tree_heads ORDER BY size").fetchall()]
    finally:
        con.close()


def test_a_deleted_middle_head_fails(digits_copy):
    middle = heads(digits_copy)[2]
    write_sql(digits_copy, f"DELETE FROM tree_heads WHERE size = {middle}")
    assert any(line.startswith(f"tree_heads size={middle}") and "deleted" in line for line in fail_lines(digits_copy))


def test_a_duplicated_head_fails(digits_copy):
    middle = heads(digits_copy)[2]
    write_sql(digits_copy, f"INSERT INTO tree_heads SELECT * FROM tree_heads WHERE size = {middle}")
    assert any(line.startswith(f"tree_heads size={middle}") and "duplicated" in line for line in fail_lines(digits_copy))


@pytest.mark.parametrize("column,value", [
    ("asset", "'influence_scores'"), ("run_id", "'another-run'"), ("created_at", "'2020-01-01T00:00:00.000+00:00'"),
    ("verifier_key", "'fgtrac.local/ledger+00000000+AQ' || repeat('A', 42) || '='"),
])
def test_an_edit_to_an_unsigned_head_column_fails(digits_copy, column, value):
    middle = heads(digits_copy)[1]
    write_sql(digits_copy, f"UPDATE tree_heads SET {column} = {value} WHERE size = {middle}")
    lines = fail_lines(digits_copy)
    assert any(line.startswith(f"tree_heads size={middle}") for line in lines), lines


def test_a_forged_future_verification_does_not_hide_a_failed_verify(digits_copy, capsys):
    write_sql(digits_copy, "INSERT INTO verifications VALUES ('9999-01-01T00:00:00.000+00:00', 1000000, true, 0, 'OK')")
    write_sql(digits_copy, "UPDATE samples SET label = 9 - label WHERE leaf_index = 0")
    assert run(digits_copy, "verify", capsys=capsys)[0] == 1
    status = Ledger(digits_copy).query("SELECT DISTINCT status, advisory FROM integrity_status").to_pylist()
    assert {r["status"] for r in status} == {"FAILED"}
    assert all("advisory" in r["advisory"] for r in status)


def flip_bytes(path, where: float) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "byte-flipped", "dropped column"])
def test_a_damaged_file_is_one_fail_line(digits_copy, capsys, damage):
    path = digits_copy / "ledger.duckdb"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif damage == "byte-flipped":
        for where in (0.3, 0.5, 0.7, 0.9):
            flip_bytes(path, where)
    else:
        write_sql(digits_copy, "ALTER TABLE checkpoints DROP COLUMN val_loss")
    code, out, err = run(digits_copy, "verify", capsys=capsys)
    assert code == 1, (out, err)
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails and "Traceback" not in out + err, (out, err)
    if damage == "dropped column":
        assert any("table checkpoints" in line for line in fails)
    code, out, err = run(digits_copy, "verify", "--json", capsys=capsys)
    assert code == 1 and json.loads(out)["ok"] is False


def test_a_planted_key_that_signs_new_heads_is_not_trusted(digits_copy, capsys):
    ledger = Ledger(digits_copy)
    evil = notes.generate_signer(ledger.origin)
    (digits_copy / "keys" / "planted.vkey").write_text(evil.verifier_key + "\n")
    last = heads(digits_copy)[-1]
    con = duckdb.connect(str(digits_copy / "ledger.duckdb"))
    root = con.execute(f"SELECT root FROM tree_heads WHERE size = {last}").fetchall()[0][0]
    con.execute("UPDATE tree_heads SET note = ?, verifier_key = ? WHERE size = ?",
                [evil.sign(notes.format_checkpoint(ledger.origin, last, bytes(root))), evil.verifier_key, last])
    con.close()
    lines = fail_lines(digits_copy)
    assert any(line.startswith(f"tree_heads size={last}") and "key history" in line for line in lines), lines
    code, out, _ = run(digits_copy, "key", "list", capsys=capsys)
    assert code == 0 and evil.verifier_key not in out


def test_a_rotation_is_endorsed_by_the_old_key_and_a_forged_one_fails(digits_copy, capsys):
    code, new_key, _ = run(digits_copy, "key", "rotate", capsys=capsys)
    assert code == 0
    Ledger(digits_copy).commit(Commit("p", "a", "r", rows={"events": [{"sample_id": "s", "kind": "ingested"}]}))
    assert fail_lines(digits_copy) == []
    code, out, _ = run(digits_copy, "key", "list", capsys=capsys)
    assert [line.split()[-1] for line in out.splitlines()] == ["retired", "current"]
    assert out.splitlines()[-1].startswith(new_key.strip())
    write_sql(digits_copy, "UPDATE log_keys SET endorsement = replace(endorsement, 'rotation', 'rotatiom')")
    assert any(line.startswith("log_keys") for line in fail_lines(digits_copy))


# --- 5 (terminal) and 6. the commands as documented -----------------------------------------------------

def test_control_characters_never_reach_the_terminal_raw(tmp_path, capsys):
    home = tmp_path / "home"
    nasty = "img\n\x1b[31mred\x1b[0m\r.png"
    Ledger(home).commit(Commit("p", "raw", "r", rows={"samples": [{"sample_id": "a" * 64, "source": nasty}],
                                                      "events": [{"sample_id": "a" * 64, "kind": "ingested"}]}))
    code, out, _ = run(home, "audit", "sql", "SELECT source FROM samples", capsys=capsys)
    assert code == 0 and "\x1b" not in out and "\r" not in out
    assert len(out.splitlines()) == 4 and "\\x1b[31mred" in out and "\\n" in out  # header, rule, row, count


def test_home_is_accepted_after_the_subcommand(digits_copy, capsys):
    capsys.readouterr()
    assert fgtrac(["verify", "--home", str(digits_copy)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK")
    assert fgtrac(["audit", "run", "latest", "--home", str(digits_copy)]) == 0


def test_prove_takes_id_prefixes_and_latest(digits_copy, capsys):
    sample = one(digits_copy, "SELECT sample_id FROM events WHERE kind = 'batched' LIMIT 1")
    code, out, err = run(digits_copy, "prove", sample[:10], capsys=capsys)
    assert code == 0, err
    assert json.loads(out)
    absent = "f" * 64
    code, out, err = run(digits_copy, "prove", "--absent", absent, "--run", "latest", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["kind"] == "absent" and json.loads(out)["sample_id"] == absent
    run_id = one(digits_copy, "SELECT training_run FROM training_sets LIMIT 1")
    code, out, err = run(digits_copy, "prove", "--absent", absent, "--run", run_id[:8], capsys=capsys)
    assert code == 0, err


def test_a_missing_key_directory_does_not_change_what_verifies(digits_copy):
    shutil.rmtree(digits_copy / "keys")
    assert fail_lines(digits_copy) == []
