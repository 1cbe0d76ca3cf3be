"""`fgtrac audit`: named audits, read-only SQL, and the audit views over a real run."""

import json

import duckdb

from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.ledger.store import Ledger


def first(home, sql):
    return Ledger(home).query(sql).to_pylist()[0]


def run_json(capsys, *argv):
    capsys.readouterr()
    code = fgtrac(list(argv) + ["--format", "json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_was_sample_used_and_with_what_influence(digits_home, capsys):
    top = first(digits_home, "SELECT test_sample_id, train_sample_id, score, training_run FROM influence_top "
                             "WHERE kind = 'proponent' AND rank = 1 LIMIT 1")
    rows = run_json(capsys, "--home", str(digits_home), "audit", "used", top["train_sample_id"][:12],
                    "--run", top["training_run"][:8], "--test", top["test_sample_id"][:12])
    assert rows[0]["used"] is True and rows[0]["epochs"] >= 1
    assert rows[0]["influence"].startswith("proponent #1: +")
    # a held-out test sample was not used
    rows = run_json(capsys, "--home", str(digits_home), "audit", "used", top["test_sample_id"], "--run", "latest")
    assert rows[0]["used"] is False and rows[0]["steps"] == 0


def test_sample_history_is_in_log_order(digits_home, capsys):
    s = first(digits_home, "SELECT sample_id FROM events WHERE kind = 'batched' LIMIT 1")["sample_id"]
    rows = run_json(capsys, "--home", str(digits_home), "audit", "sample", s)
    kinds = [r["kind"] for r in rows]
    assert kinds[:3] == ["ingested", "preprocessed", "split"] and "batched" in kinds and kinds[-1] == "gradient"
    assert [r["leaf_index"] for r in rows] == sorted(r["leaf_index"] for r in rows)


def test_influence_run_and_lineage_audits(digits_home, capsys):
    t = first(digits_home, "SELECT test_sample_id FROM influence_top LIMIT 1")["test_sample_id"]
    rows = run_json(capsys, "--home", str(digits_home), "audit", "influence", t)
    assert {r["kind"] for r in rows} == {"proponent", "opponent"} and all(r["source"] for r in rows)
    rows = run_json(capsys, "--home", str(digits_home), "audit", "run", "latest")
    assert rows and rows[-1]["selected"] is True and rows[0]["training_set_root"]
    rows = run_json(capsys, "--home", str(digits_home), "audit", "lineage")
    assert {"upstream_asset": "raw_samples", "asset": "preprocessed_samples", "pipeline": "digits_cnn"} in rows


def test_audit_sql_cannot_write(digits_copy, capsys):
    before = first(digits_copy, "SELECT count(*) AS n FROM events")["n"]
    capsys.readouterr()
    assert fgtrac(["--home", str(digits_copy), "audit", "sql", "DELETE FROM event_rows"]) == 2
    assert "read-only" in capsys.readouterr().err
    assert first(digits_copy, "SELECT count(*) AS n FROM events")["n"] == before


def test_unknown_and_ambiguous_ids_are_clear(digits_home, capsys):
    capsys.readouterr()
    assert fgtrac(["--home", str(digits_home), "audit", "sample", "ffffffffffff"]) == 2
    assert "no sample id starts with" in capsys.readouterr().err


def test_integrity_status_after_verify(digits_copy, capsys):
    fgtrac(["--home", str(digits_copy), "verify"])
    rows = run_json(capsys, "--home", str(digits_copy), "audit", "sql", "SELECT asset, status FROM integrity_status")
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    con = duckdb.connect(str(digits_copy / "ledger.duckdb"))
    con.execute("UPDATE event_groups SET lr = 9 WHERE leaf_index = (SELECT max(leaf_index) FROM event_groups)")
    con.close()
    fgtrac(["--home", str(digits_copy), "verify"])
    rows = run_json(capsys, "--home", str(digits_copy), "audit", "sql", "SELECT DISTINCT status FROM integrity_status")
    assert rows == [{"status": "FAILED"}]


def test_static_report(digits_home, tmp_path, capsys):
    assert fgtrac(["--home", str(digits_home), "report", "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Integrity: OK" in page and page.count("data:image/png;base64,") >= 2
    assert "Highest self-influence" in page
