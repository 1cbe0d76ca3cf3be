"""Sharded influence: per-shard gradient caches and top-k combine into exactly the unsharded scores."""

import numpy as np
import pytest

from fgtrac_assets.ledger.store import Ledger
from fgtrac_assets.ledger.verify import verify_ledger
from fgtrac_assets.pipelines import stages
from fgtrac_assets.pipelines.base import InfluenceSettings, IngestSettings, TrainSettings
from fgtrac_assets.pipelines.digits import DigitsPipeline
from fgtrac_assets.pipelines.splits import shard_of
from tests.conftest import chain_selection


def by_key(table):
    return {(r["test_sample_id"], r["kind"], r["rank"]): (r["train_sample_id"], r["score"]) for r in table.to_pylist()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    ledger = Ledger(tmp_path_factory.mktemp("shards"))
    p = DigitsPipeline()
    raw = stages.ingest(ledger, p, "r", IngestSettings(limit=500)).handle
    prep = stages.preprocess(ledger, p, "r", raw).handle
    train = stages.train(ledger, p, "r", prep, TrainSettings(epochs=4, lr=0.1, batch_size=32)).handle
    sel = stages.select(ledger, p, "r", train).handle
    return ledger, p, prep, train, sel


@pytest.mark.parametrize("n", [1, 3])
def test_shards_combine_into_the_unsharded_scores(chain, n):
    ledger, p, prep, train, sel = chain
    whole = stages.influence(ledger, p, "whole", stages.gradients(ledger, p, "whole", prep, train, sel).handle, InfluenceSettings(top_k=5))
    expected = by_key(whole.handle.artifacts["influence"].read_parquet(ledger.home.root))
    shard_handles = []
    for i in range(n):
        cache = stages.gradients(ledger, p, f"s{i}", prep, train, sel, shard=(i, n)).handle
        shard_handles.append(stages.influence_shard(ledger, p, f"s{i}", cache, InfluenceSettings(top_k=5)).handle)
    combined = stages.combine_influence(ledger, p, "c", shard_handles, InfluenceSettings(top_k=5))
    got = by_key(combined.handle.artifacts["influence"].read_parquet(ledger.home.root))
    assert got.keys() == expected.keys()
    for key, (train_id, score) in expected.items():
        assert got[key][1] == pytest.approx(score, rel=1e-5, abs=1e-7), key
    same_id = np.mean([got[k][0] == v[0] for k, v in expected.items()])
    assert same_id > 0.99  # only exact ties may order differently
    assert verify_ledger(ledger, update_witness=False).findings == []


def test_each_shard_holds_its_own_training_samples_and_every_test_sample(chain):
    ledger, p, prep, train, sel = chain
    seen = []
    for i in range(3):
        cache = stages.gradients(ledger, p, f"t{i}", prep, train, sel, shard=(i, 3)).handle
        t = cache.artifacts["gradient_cache"].read_parquet(ledger.home.root).to_pydict()
        train_ids = {s for s, sp in zip(t["sample_id"], t["split"]) if sp == "train"}
        assert train_ids and all(shard_of(s, 3) == i for s in train_ids)
        seen.append(train_ids)
        assert {s for s, sp in zip(t["sample_id"], t["split"]) if sp == "test"}
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])


def test_shards_of_different_training_runs_are_refused(chain, tmp_path):
    import dataclasses

    ledger, p, prep, train, sel = chain
    cache = stages.gradients(ledger, p, "x", prep, train, sel, shard=(0, 2)).handle
    a = stages.influence_shard(ledger, p, "x", cache).handle
    b = dataclasses.replace(a, training_run="another-run")
    with pytest.raises(ValueError, match="influence shards come from 2 training runs"):
        stages.combine_influence(ledger, p, "y", [a, b])


def test_shards_run_in_parallel_through_the_dagster_cli_and_combine(tmp_path):
    """Two partitions at once (multiprocess executor each) beside each other, then the combined asset."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import duckdb

    repo = Path(__file__).resolve().parents[1]
    dagster = str(Path(sys.executable).parent / "dagster")
    env = {**os.environ, "FGTRAC_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster"),
           "FGTRAC_SHARDS": "2"}
    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text((repo / "dagster.yaml").read_text())
    base = ["asset", "materialize", "-m", "fgtrac_assets.definitions"]
    chain = chain_selection("digits_cnn")
    config = {"ops": {"digits_cnn__raw_samples": {"config": {"limit": 400}},
                      "digits_cnn__training_checkpoints": {"config": {"epochs": 3}}}}

    def run(*args):
        return subprocess.Popen([dagster, *base, *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def done(proc):
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-4000:]
        assert "Could not set lock" not in out and "LedgerBusy" not in out
        return out

    done(run("--select", chain, "--config-json", json.dumps(config)))
    shards = [run("--select", "digits_cnn/gradient_cache_shards,digits_cnn/influence_shards", "--partition", key)
              for key in ("0-of-2", "1-of-2")]
    logs = [done(p) for p in shards]
    assert all("multiprocess" in log.lower() or "Launching subprocess" in log for log in logs)
    done(run("--select", "digits_cnn/influence_combined"))

    con = duckdb.connect(str(tmp_path / "home" / "ledger.duckdb"), read_only=True)
    rows = {asset: {(t, k, r): (tr, s) for t, tr, k, r, s in con.execute(
        """SELECT test_sample_id, train_sample_id, kind, rank, score FROM influence
           WHERE run_id IN (SELECT run_id FROM materializations WHERE asset = ?)""", [asset]).fetchall()}
        for asset in ("influence_scores", "influence_combined")}
    con.close()
    assert rows["influence_scores"] and rows["influence_scores"].keys() == rows["influence_combined"].keys()
    for key, (_, score) in rows["influence_scores"].items():
        assert rows["influence_combined"][key][1] == pytest.approx(score, rel=1e-5, abs=1e-7)
    verify = subprocess.run([str(Path(sys.executable).parent / "fgtrac"), "verify"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
