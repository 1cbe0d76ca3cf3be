"""The digits chain end to end through Dagster's materialize(), checked in the real ledger."""

import duckdb

from fgtrac_assets.pipelines.chain import CHAIN_NAMES
from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.ledger.store import Ledger

from .conftest import SMALL_EPOCHS, SMALL_LIMIT, materialize_digits


def scalar(home, sql):
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()[0][0]
    finally:
        con.close()


def test_every_asset_commits_rows_and_a_signed_root(digits_home):
    con = duckdb.connect(str(digits_home / "ledger.duckdb"), read_only=True)
    mats = con.execute("SELECT asset, leaf_start, leaf_count FROM materializations ORDER BY leaf_start").fetchall()
    heads = con.execute("SELECT size FROM tree_heads ORDER BY size").fetchall()
    con.close()
    assert [m[0] for m in mats] == list(CHAIN_NAMES)
    # each materialisation's range starts where the previous ended, and each has its own tree head
    ends = [m[1] + m[2] for m in mats]
    assert [m[1] for m in mats[1:]] == ends[:-1]
    assert [h[0] for h in heads] == ends


def test_lifecycle_counts_match_the_data(digits_home):
    n_train = scalar(digits_home, "SELECT count(*) FROM events WHERE kind='split' AND detail LIKE '%\"train\"%'")
    n_test = scalar(digits_home, "SELECT count(*) FROM events WHERE kind='split' AND detail LIKE '%\"test\"%'")
    assert scalar(digits_home, "SELECT count(DISTINCT sample_id) FROM samples") == SMALL_LIMIT
    assert scalar(digits_home, "SELECT count(*) FROM events WHERE kind='ingested'") == SMALL_LIMIT
    assert scalar(digits_home, "SELECT count(*) FROM events WHERE kind='preprocessed'") == SMALL_LIMIT
    # every training sample is batched exactly once per epoch, at the lr the optimizer applied
    assert scalar(digits_home, "SELECT count(*) FROM events WHERE kind='batched'") == n_train * SMALL_EPOCHS
    assert scalar(digits_home, """SELECT count(*) FROM (SELECT sample_id, epoch, count(*) c FROM events
                                  WHERE kind='batched' GROUP BY ALL) WHERE c <> 1""") == 0
    assert scalar(digits_home, "SELECT count(DISTINCT epoch) FROM events WHERE kind='batched'") == SMALL_EPOCHS
    assert scalar(digits_home, "SELECT count(*) FROM checkpoints") == SMALL_EPOCHS
    # batched lr equals the checkpoint's recorded lr of the same epoch
    assert scalar(digits_home, """SELECT count(*) FROM events e JOIN checkpoints c
                                  ON e.training_run = c.training_run AND e.epoch = c.epoch
                                  WHERE e.kind='batched' AND e.lr <> c.lr""") == 0
    n_sel = scalar(digits_home, "SELECT count(*) FROM checkpoint_selections WHERE selected")
    assert 1 <= n_sel <= 3
    # the final checkpoint is always among the selected ones
    assert scalar(digits_home, """SELECT selected FROM checkpoint_summary ORDER BY epoch DESC LIMIT 1""") is True
    assert scalar(digits_home, "SELECT count(*) FROM events WHERE kind='gradient'") == n_sel * (n_train + n_test)
    k = 10
    assert scalar(digits_home, "SELECT count(*) FROM influence WHERE kind='proponent'") == n_test * k
    assert scalar(digits_home, "SELECT count(*) FROM influence WHERE kind='opponent'") == n_test * k
    assert scalar(digits_home, "SELECT count(*) FROM influence WHERE kind='self'") == n_train
    assert scalar(digits_home, "SELECT min(score) FROM influence WHERE kind='proponent'") > 0
    assert scalar(digits_home, "SELECT max(score) FROM influence WHERE kind='opponent'") < 0


def test_data_version_is_the_committed_root_and_upstream_roots_are_recorded(tmp_path):
    result = materialize_digits(tmp_path / "h", limit=200, epochs=2)
    ledger = Ledger(tmp_path / "h")
    roots = {}
    for ev in result.get_asset_materialization_events():
        mat = ev.event_specific_data.materialization
        name = mat.asset_key.path[-1]
        roots[name] = mat.metadata["root"].value
        assert mat.tags["dagster/data_version"] == roots[name]
    rows = ledger.query("SELECT asset, upstream FROM materializations").to_pylist()
    import json

    for r in rows:
        for up, root in json.loads(r["upstream"]).items():
            assert roots[up] == root, f"{r['asset']} recorded a different root for {up}"


def test_verify_ok_on_a_fresh_chain(digits_home, capsys):
    assert fgtrac(["--home", str(digits_home), "verify"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK")


def test_a_second_run_extends_the_log(digits_copy):
    before = scalar(digits_copy, "SELECT max(size) FROM tree_heads")
    assert materialize_digits(digits_copy, limit=150, epochs=1).success
    after = scalar(digits_copy, "SELECT max(size) FROM tree_heads")
    assert after > before
    assert scalar(digits_copy, "SELECT count(DISTINCT training_run) FROM checkpoints") == 2
    assert fgtrac(["--home", str(digits_copy), "verify"]) == 0


def test_every_check_of_every_asset_passed(tmp_path):
    result = materialize_digits(tmp_path / "h", limit=200, epochs=2)
    evaluations = result.get_asset_check_evaluations()
    names = {(e.asset_key.path[-1], e.check_name) for e in evaluations}
    assert {(a, "tree_head_verifies") for a in CHAIN_NAMES} <= names
    assert {(a, "lineage_complete") for a in CHAIN_NAMES} <= names
    assert ("influence_scores", "numbers_sane") in names and ("training_checkpoints", "numbers_sane") in names
    failed = [(e.asset_key.path[-1], e.check_name, e.description) for e in evaluations if not e.passed]
    assert failed == []


def test_lineage_check_fails_when_a_batched_event_is_missing(digits_copy):
    """The lineage check reads the committed ledger, so a lost event is seen (not just trusted from memory)."""
    from fgtrac_assets.ledger.checks import run_checks
    from fgtrac_assets.pipelines.chain import stage

    ledger = Ledger(digits_copy)
    tr = ledger.query("SELECT training_run, run_id FROM checkpoints LIMIT 1").to_pylist()[0]
    note = ledger.latest_tree_head()["note"]
    con = duckdb.connect(str(digits_copy / "ledger.duckdb"))
    con.execute("DELETE FROM group_members WHERE rowid = (SELECT m.rowid FROM group_members m JOIN event_groups g "
                "USING (leaf_index) WHERE g.kind = 'batched' ORDER BY m.leaf_index DESC, m.position DESC LIMIT 1)")
    con.close()
    outcome = {c.name: c for c in run_checks(ledger, stage("training_checkpoints").checks, tr["run_id"], tr["training_run"], note)}
    assert not outcome["lineage_complete"].passed and "1 training samples missing" in outcome["lineage_complete"].description
