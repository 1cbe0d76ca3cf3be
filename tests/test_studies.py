"""Evaluation studies as Dagster assets: the mislabelled-data study commits its table and plot, signed."""

import io
import json

import pyarrow.parquet as pq
import pytest
from dagster import materialize

from fgtrac_assets.assets.resources import FgtracResource
from fgtrac_assets.definitions import all_assets
from fgtrac_assets.ledger.artifacts import check_artifact
from fgtrac_assets.ledger.store import Ledger
from fgtrac_assets.ledger.verify import verify_ledger
from fgtrac_assets.studies.catalog import STUDIES
from fgtrac_assets.studies.run import run_study


def study_asset(name: str, pipeline: str = "digits_cnn"):
    return next(a for a in all_assets if a.key.path == [pipeline, name])


def with_samples(name: str, pipeline: str = "digits_cnn") -> list:
    """A study asset with the chain's assets it depends on (raw and preprocessed samples)."""
    return [study_asset(n, pipeline) for n in ("raw_samples", "preprocessed_samples", name)]


def samples_config(pipeline: str = "digits_cnn", limit: int = 400, **ops) -> dict:
    return {"ops": {f"{pipeline}__raw_samples": {"config": {"limit": limit}}, **ops}}


@pytest.fixture(scope="module")
def mislabel_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("study-home")
    result = materialize(with_samples("mislabel_evaluation"), resources={"fgtrac": FgtracResource(home=str(home))},
                         run_config=samples_config(limit=0))
    assert result.success
    return home, result


def test_a_study_is_downstream_of_the_samples_it_stands_on_and_names_real_sample_ids(mislabel_run):
    """Its lineage is recorded (the preprocessed samples' root) and its flipped samples are the ledger's samples."""
    home, result = mislabel_run
    ledger = Ledger(home)
    mats = {r["asset"]: r for r in ledger.query("SELECT asset, upstream FROM materializations").to_pylist()}
    prep_root = ledger.query("SELECT root FROM tree_heads WHERE asset = 'preprocessed_samples'").to_pylist()[0]["root"]
    assert json.loads(mats["mislabel_evaluation"]["upstream"]) == {"preprocessed_samples": bytes(prep_root).hex()}
    assert study_asset("mislabel_evaluation").dependency_keys == {study_asset("preprocessed_samples").key}
    art = ledger.query("SELECT path FROM artifacts WHERE kind = 'study_table'").to_pylist()[0]["path"]
    assert pq.read_table(home / art).num_rows > 0
    from fgtrac_assets.studies.mislabel import mislabel_evaluation

    run = mislabel_evaluation(seed=0, epochs=2, n_train=300, n_val=100, guards=False, ceiling=False, plot=False)["run"]
    known = {r["sample_id"] for r in ledger.query("SELECT sample_id FROM samples").to_pylist()}
    assert run["flipped_sample_ids"] and set(run["flipped_sample_ids"]) <= known


def test_mislabel_study_materialises_with_table_plot_and_a_rule_meeting_the_target(mislabel_run):
    home, result = mislabel_run
    mat = result.asset_materializations_for_node("digits_cnn__mislabel_evaluation")[0]
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["table"].startswith("| method |") and "tracincp_fgtrac" in meta["table"]
    assert meta["plot"].startswith("![mislabel_evaluation](data:image/png;base64,")
    arts = Ledger(home).query("SELECT kind, path, sha256 FROM artifacts WHERE asset = 'mislabel_evaluation'").to_pylist()
    assert sorted(a["kind"] for a in arts) == ["study_plot", "study_table"]
    for a in arts:
        assert check_artifact(home, a["path"], a["sha256"]) is None
    table = pq.read_table(io.BytesIO((home / next(a["path"] for a in arts if a["kind"] == "study_table")).read_bytes()))
    rows = {r["method"]: r for r in table.to_pylist()}
    assert rows["random"]["found_10"] < 0.3
    # the target: >= 90% of flipped labels in the top 10% with at most 3 checkpoints (seed 0)
    few = {m: r["found_10"] for m, r in rows.items() if m.startswith(("tracincp", "guard")) and m != "tracincp_all"}
    assert max(few.values()) >= 0.9, few
    # the rule the selected_checkpoints asset uses (its second half of training, the final checkpoint kept)
    assert rows["tracincp_fgtrac"]["found_10"] >= 0.88
    assert verify_ledger(Ledger(home), update_witness=False).findings == []


def test_unknown_preset_is_a_one_line_error(tmp_path):
    from fgtrac_assets.pipelines.registry import PIPELINES

    with pytest.raises(ValueError, match="unknown preset 'huge' \\(choose from default, large\\)"):
        run_study(Ledger(tmp_path), PIPELINES[0][0], "r", STUDIES["digits_cnn"][0], preset="huge")


def test_final_model_study_materialises_with_every_method_and_a_winner(tmp_path):
    result = materialize(with_samples("final_model_attribution"), resources={"fgtrac": FgtracResource(home=str(tmp_path))},
                         run_config=samples_config(digits_cnn__final_model_attribution={"config": {"preset": "smoke"}}))
    assert result.success
    meta = {k: v.value for k, v in
            result.asset_materializations_for_node("digits_cnn__final_model_attribution")[0].metadata.items()}
    methods = {"grad_dot", "grad_cos", "if_explicit", "if_cg", "if_lissa", "tracincp", "tracincp_fgtrac"}
    assert all(m in meta["table"] for m in methods)
    assert meta["best"] in methods and meta["plot"].startswith("![final_model_attribution](data:image/png;base64,")
    assert verify_ledger(Ledger(tmp_path), update_witness=False).findings == []


def test_graph_noise_study_materialises_with_table_plot_and_winner(tmp_path):
    result = materialize(with_samples("noisy_rating_evaluation", "multimodal_graph"),
                         resources={"fgtrac": FgtracResource(home=str(tmp_path))},
                         run_config=samples_config("multimodal_graph", 2000))
    assert result.success
    meta = {k: v.value for k, v in
            result.asset_materializations_for_node("multimodal_graph__noisy_rating_evaluation")[0].metadata.items()}
    methods = {"tracincp_all", "tracincp_fgtrac", "grad_dot", "loss", "random"}
    assert all(f"| {m} |" in meta["table"] for m in methods)
    assert meta["best"] in methods - {"random"}
    assert meta["plot"].startswith("![noisy_rating_evaluation](data:image/png;base64,")
    arts = Ledger(tmp_path).query("SELECT kind FROM artifacts WHERE asset = 'noisy_rating_evaluation'").to_pylist()
    assert sorted(a["kind"] for a in arts) == ["study_plot", "study_table"]
    assert verify_ledger(Ledger(tmp_path), update_witness=False).findings == []
