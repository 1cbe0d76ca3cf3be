"""Mislabelled-data detection (TracIn section 4.1) on digits, in a reduced setting."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fgtrac_assets.assets.configs import SelectionConfig
from fgtrac_assets.attribution import select_checkpoints
from fgtrac_assets.studies.mislabel import (
    auroc,
    detection_curve,
    found_fraction,
    mislabel_evaluation,
    table_markdown,
)

METHODS = {"tracincp_all", "tracincp_even3", "tracincp_fgtrac", "tracincp_valdrop3", "grad_dot", "step_exact", "trak",
           "loss", "random"}


@pytest.fixture(scope="module")
def reduced():
    return mislabel_evaluation(seed=0, epochs=10, batch_size=16, n_train=400, n_val=200, guards=False, ceiling=False)


def test_structure(reduced):
    r = reduced
    assert set(r) == {"table", "curves", "plot_png", "best", "against_loss", "run"}
    assert {row["method"] for row in r["table"]} == METHODS == set(r["curves"])
    assert r["best"] in METHODS - {"random"}
    assert r["plot_png"][:8] == b"\x89PNG\r\n\x1a\n" and len(r["plot_png"]) > 5_000
    run = r["run"]
    assert run["flipped"] == 40 and len(run["flipped_rows"]) == 40
    assert len(run["val_losses"]) == len(run["lrs"]) == 10
    rows = {row["method"]: row for row in r["table"]}
    assert rows["tracincp_all"]["checkpoints"] == list(range(10))
    assert len(rows["tracincp_fgtrac"]["checkpoints"]) <= 3 and 9 in rows["tracincp_fgtrac"]["checkpoints"]
    assert rows["tracincp_fgtrac"]["checkpoints"] == select_checkpoints(run["val_losses"], **SelectionConfig().model_dump())
    assert rows["grad_dot"]["checkpoints"] == [9]
    for row in r["table"]:
        for key in ("found_5", "found_10", "found_20", "found_30", "auroc"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key)
    assert table_markdown(r["table"]).count("\n") == len(r["table"]) + 1
    vs = r["against_loss"]
    assert vs["best_attribution"] in METHODS - {"loss", "random"} and vs["loss_found_10"] == rows["loss"]["found_10"]
    assert vs["meets_loss_plus_0_03"] == (vs["found_10"] >= rows["loss"]["found_10"] + 0.03)


def test_the_step_exact_self_influence_is_the_trace_replayed(reduced):
    """Summed over every recorded step, it ranks flipped labels about as well as TracInCP over every checkpoint."""
    rows = {row["method"]: row for row in reduced["table"]}
    assert rows["step_exact"]["auroc"] >= 0.9 and abs(rows["step_exact"]["found_20"] - rows["tracincp_all"]["found_20"]) <= 0.1


def test_fractions_are_monotone(reduced):
    for row in reduced["table"]:
        found = [row["found_5"], row["found_10"], row["found_20"], row["found_30"]]
        assert found == sorted(found), row["method"]
    for name, (xs, ys) in reduced["curves"].items():
        assert xs[0] == 0.0 and xs[-1] == 1.0 and ys[0] == 0.0 and ys[-1] == 1.0, name
        assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) >= 0), name


def test_tracincp_beats_random_by_a_wide_margin(reduced):
    rows = {row["method"]: row for row in reduced["table"]}
    tracin, rand = rows["tracincp_all"], rows["random"]
    assert tracin["found_10"] >= rand["found_10"] + 0.4
    assert tracin["found_20"] >= 0.8
    assert tracin["auroc"] >= 0.9 and abs(rand["auroc"] - 0.5) < 0.15


def test_metrics_against_definitions():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    flipped = rng.random(300) < 0.2
    assert auroc(scores, flipped) == pytest.approx(roc_auc_score(flipped, scores), abs=1e-12)
    perfect = flipped.astype(float)
    assert found_fraction(perfect, flipped, flipped.mean()) == 1.0
    xs, ys = detection_curve(perfect, flipped)
    k = int(flipped.sum())
    assert ys[k] == 1.0 and ys[k - 1] < 1.0 and xs[k] == pytest.approx(k / 300)
