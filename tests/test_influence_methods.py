"""The influence asset's method setting: TRAK and the replay methods committed from the ledger, shown by the audit.

Each replay method reads the training run's trace back from the ledger (initial weights, batches, lrs,
checkpoints, files checked) and must reproduce the recorded checkpoints before it scores; its committed
scores equal the library method's on the same trace, and a trace whose weights file was changed is refused.
"""

import json

import numpy as np
import pytest
import torch

from fgtrac_assets.attribution import Metagradient, StepExactTracIn
from fgtrac_assets.attribution.methods import METHODS, method
from fgtrac_assets.attribution.trace import ReplayMismatch
from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.errors import InputError
from fgtrac_assets.ledger.store import Ledger
from fgtrac_assets.ledger.verify import verify_ledger
from fgtrac_assets.pipelines import stages
from fgtrac_assets.pipelines.base import InfluenceSettings, IngestSettings, TrainSettings
from fgtrac_assets.pipelines.digits import DigitsPipeline
from fgtrac_assets.pipelines.movielens import MovieLensPipeline
from fgtrac_assets.session.recorded_trace import TraceNotRecorded, recorded_trace
from fgtrac_assets.ledger.artifacts import INITIAL_WEIGHTS
from fgtrac_assets.report.html import build_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _chain(ledger, pipeline, limit, settings):
    raw = stages.ingest(ledger, pipeline, "r", IngestSettings(limit=limit)).handle
    prep = stages.preprocess(ledger, pipeline, "r", raw).handle
    train = stages.train(ledger, pipeline, "r", prep, settings).handle
    sel = stages.select(ledger, pipeline, "r", train).handle
    return prep, train, stages.gradients(ledger, pipeline, "r", prep, train, sel).handle


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    ledger = Ledger(tmp_path_factory.mktemp("methods"))
    p = DigitsPipeline()
    prep, train, cache = _chain(ledger, p, 200, TrainSettings(epochs=2, lr=0.1, batch_size=32))
    return ledger, p, prep, train, cache


def _rows(ledger, result):
    return result.handle.artifacts["influence"].read_parquet(ledger.home.root).to_pylist()


def test_method_names_are_checked_where_they_are_set():
    assert set(METHODS) >= {"tracincp", "trak", "step_exact", "metagradient"}
    with pytest.raises(InputError, match="unknown influence method 'tracin'.*tracincp"):
        InfluenceSettings(method="tracin").validate()
    with pytest.raises(InputError, match="top_k must be a positive integer"):
        InfluenceSettings(top_k=0).validate()
    assert method("metagradient").source == "trace"


@pytest.mark.parametrize("name", ["trak", "step_exact", "metagradient"])
def test_the_influence_stage_commits_the_configured_method(digits, name):
    ledger, p, prep, train, cache = digits
    result = stages.influence(ledger, p, f"m-{name}", cache, InfluenceSettings(top_k=4, method=name))
    assert all(c.passed for c in result.checks), [c.name for c in result.checks if not c.passed]
    rows = _rows(ledger, result)
    assert {r["method"] for r in rows} == {name} and result.metadata["method_name"] == name
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("proponent", "opponent", "self")}
    n_train, n_test = len(p.tensors(prep.artifacts["prepared"].read_parquet(ledger.home.root), "train")[0]), \
        len({r["test_sample_id"] for r in kinds["proponent"]})
    assert len(kinds["self"]) == n_train and len(kinds["proponent"]) == 4 * n_test > 0
    assert all(np.isfinite(r["score"]) for r in rows)
    assert verify_ledger(ledger, update_witness=False).ok


def test_replay_scores_are_the_library_methods_on_the_trace_read_from_the_ledger(digits):
    ledger, p, prep, train, cache = digits
    table = prep.artifacts["prepared"].read_parquet(ledger.home.root)
    train_ids, xt, yt = p.tensors(table, "train")
    test_ids, xs, ys = p.tensors(table, "test")
    trace = recorded_trace(ledger, train.training_run, p.build_model(table), train_ids, p)
    assert trace.optimizer.kind == "sgd" and len(trace.checkpoints) == 2
    expected = {"step_exact": StepExactTracIn(p.build_model(table), trace, p.loss_fn(), layer=p.influence_layer),
                "metagradient": Metagradient(p.build_model(table), trace, p.loss_fn())}
    for name, scorer in expected.items():
        top = scorer.top_k(xt, yt, xs, ys, k=3)
        rows = _rows(ledger, stages.influence(ledger, p, f"x-{name}", cache, InfluenceSettings(top_k=3, method=name)))
        first = [r for r in rows if r["test_sample_id"] == test_ids[0] and r["kind"] == "proponent"]
        assert [r["train_sample_id"] for r in first] == [train_ids[i] for i in top.proponent_idx[0].tolist()]
        assert [r["score"] for r in first] == pytest.approx(top.proponent_score[0].tolist(), rel=1e-5)


def test_a_changed_weights_file_or_a_trace_that_does_not_reproduce_is_refused(digits, tmp_path):
    ledger, p, prep, train, cache = digits
    table = prep.artifacts["prepared"].read_parquet(ledger.home.root)
    train_ids = p.tensors(table, "train")[0]
    with ledger.reader() as con:
        path = con.execute("SELECT path FROM artifacts WHERE training_run = ? AND kind = ?",
                           [train.training_run, INITIAL_WEIGHTS]).fetchone()[0]
    full = ledger.home.root / path
    original = full.read_bytes()
    try:
        state = torch.load(full, weights_only=True)
        torch.save({k: v + 0.01 for k, v in state.items()}, full)
        with pytest.raises(Exception, match="sha256|changed|digest"):
            recorded_trace(ledger, train.training_run, p.build_model(table), train_ids, p)
    finally:
        full.write_bytes(original)
    trace = recorded_trace(ledger, train.training_run, p.build_model(table), train_ids, p)
    trace.steps[3], trace.steps[4] = trace.steps[4], trace.steps[3]  # an edited order
    with pytest.raises(ReplayMismatch, match="does not reproduce"):
        Metagradient(p.build_model(table), trace, p.loss_fn()).self_influence(*p.tensors(table, "train")[1:])
    with pytest.raises(TraceNotRecorded, match="no initial weights recorded"):
        recorded_trace(ledger, "no-such-run", p.build_model(table), train_ids, p)


def test_the_graph_pipeline_replays_its_adam_run(tmp_path):
    ledger = Ledger(tmp_path / "graph")
    p = MovieLensPipeline()
    prep, train, cache = _chain(ledger, p, 1500, TrainSettings(epochs=2, lr=0.01, batch_size=256))
    table = prep.artifacts["prepared"].read_parquet(ledger.home.root)
    trace = recorded_trace(ledger, train.training_run, p.build_model(table), p.tensors(table, "train")[0], p)
    assert trace.optimizer.kind == "adam"
    result = stages.influence(ledger, p, "se", cache, InfluenceSettings(top_k=3, method="step_exact"))
    assert all(c.passed for c in result.checks) and {r["method"] for r in _rows(ledger, result)} == {"step_exact"}


def test_audit_and_report_show_each_methods_latest_scoring(digits, capsys):
    ledger, p, prep, train, cache = digits
    stages.influence(ledger, p, "a-tracincp", cache, InfluenceSettings(top_k=4))
    stages.influence(ledger, p, "a-trak", cache, InfluenceSettings(top_k=4, method="trak"))
    test = ledger.query("SELECT test_sample_id FROM influence WHERE kind = 'proponent' LIMIT 1").column(0)[0].as_py()
    home = str(ledger.home.root)
    capsys.readouterr()
    for name, latest_first in (("trak", True), ("tracincp", False)):
        assert fgtrac(["--home", home, "audit", "influence", test, "--method", name, "--format", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert {r["method"] for r in rows} == {name} and len(rows) == 8  # one scoring: 4 proponents, 4 opponents
    assert fgtrac(["--home", home, "audit", "influence", test, "--format", "json"]) == 0
    assert {r["method"] for r in json.loads(capsys.readouterr().out)} == {"trak"}  # the latest scoring
    html = build_report(ledger)
    for name in ("tracincp", "trak", "step_exact", "metagradient"):
        assert f"Influence by {name}" in html


def test_the_dagster_launchpad_config_picks_the_method(tmp_path):
    from dagster import materialize

    from fgtrac_assets.assets.configs import InfluenceConfig
    from fgtrac_assets.assets.resources import FgtracResource
    from fgtrac_assets.definitions import all_assets
    from fgtrac_assets.pipelines.chain import CHAIN_NAMES
    from tests.conftest import small_run_config

    config = small_run_config(limit=200, epochs=2)
    config.ops["digits_cnn__influence_scores"] = InfluenceConfig(method="step_exact", top_k=3)
    assets = [a for a in all_assets if a.key.path[0] == "digits_cnn" and a.key.path[-1] in CHAIN_NAMES]
    result = materialize(assets, resources={"fgtrac": FgtracResource(home=str(tmp_path))}, run_config=config)
    assert result.success
    methods = Ledger(tmp_path).query("SELECT DISTINCT method FROM influence").column(0).to_pylist()
    assert methods == ["step_exact"]
    meta = result.asset_materializations_for_node("digits_cnn__influence_scores")[0].metadata
    assert meta["method_name"].value == "step_exact"
