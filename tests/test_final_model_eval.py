"""Final-model-only attribution vs further training (Wei et al. Figure 2) on digits, in a small setting."""

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from fgtrac_assets.assets.configs import SelectionConfig
from fgtrac_assets.attribution import select_checkpoints
from fgtrac_assets.studies.final_model import METHODS, agreement, final_model_evaluation, table_markdown

STEPS = (5, 20)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small():
    return final_model_evaluation(seed=0, n_train=200, n_val=100, n_test=10, n_probes=12, epochs=4, batch_size=32,
                                  further_steps=STEPS, further_seeds=2, lissa_depth=800)


def test_structure(small):
    r = small
    assert {row["method"] for row in r["table"]} == set(METHODS)
    assert len(r["table"]) == len(METHODS) * len(STEPS)
    assert {(row["method"], row["steps"]) for row in r["table"]} == {(m, s) for m in METHODS for s in STEPS}
    assert r["best"] in METHODS
    assert r["plot_png"][:8] == b"\x89PNG\r\n\x1a\n" and len(r["plot_png"]) > 5_000
    assert r["markdown"] == table_markdown(r["table"], r["gold_reliability"])
    assert r["markdown"].count("\n") == len(METHODS) + 2  # header, rule, methods, the split-half row
    assert r["cost"] == {"probes": 12, "seeds": 2, "steps": list(STEPS), "max_steps": 20, "probe_chunks": 1,
                         "runs": 26, "training_steps": 520, "batch_size": 32}
    assert r["settings"]["further_steps"] == list(STEPS) and r["settings"]["n_probes"] == 12
    assert len(r["run"]["probes"]) == 12 and len(set(r["run"]["probes"])) == 12
    # `tracincp_fgtrac` sums over the checkpoints the selected_checkpoints asset would select by default
    assert r["run"]["tracincp_fgtrac_checkpoints"] == select_checkpoints(r["run"]["val_losses"],
                                                                         **SelectionConfig().model_dump())
    for key in ("training", "further_training", "total", *METHODS):
        assert r["seconds"][key] >= 0, key
    assert [g["steps"] for g in r["gold_reliability"]] == list(STEPS)


def test_correlations_are_finite_and_in_range(small):
    for row in small["table"]:
        for key in ("cosine", "spearman"):
            assert math.isfinite(row[key]) and -1.0 <= row[key] <= 1.0, (row["method"], key)


def test_solvers_agree_and_report_damping(small):
    rows = {(r["method"], r["steps"]): r for r in small["table"]}
    for s in STEPS:
        for solver in ("if_cg", "if_lissa"):
            assert abs(rows[solver, s]["spearman"] - rows["if_explicit", s]["spearman"]) < 0.02, (solver, s)
    solvers = small["solvers"]
    assert all(rep["damping"] == small["settings"]["damping"] for rep in solvers.values())
    assert solvers["if_cg"]["not_converged"] == 0
    assert solvers["if_explicit"]["explicit"]["positive_definite"]


def test_first_order_methods_track_short_further_training(small):
    """After a few steps, further training is close to one gradient step: Grad-Dot agrees with it clearly."""
    rows = {(r["method"], r["steps"]): r for r in small["table"]}
    assert rows["grad_dot", STEPS[0]]["cosine"] > 0.6
    assert rows["grad_dot", STEPS[0]]["spearman"] > 0.1


def test_agreement_definitions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(15, 4)), rng.normal(size=(15, 4))
    got = agreement(a, b)
    cos = np.mean([a[:, j] @ b[:, j] / np.linalg.norm(a[:, j]) / np.linalg.norm(b[:, j]) for j in range(4)])
    rho = np.mean([spearmanr(a[:, j], b[:, j]).statistic for j in range(4)])
    assert got["cosine"] == pytest.approx(cos) and got["spearman"] == pytest.approx(rho)
    assert agreement(a, a) == pytest.approx({"cosine": 1.0, "spearman": 1.0})
