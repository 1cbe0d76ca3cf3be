"""The selection stage decides from the signed checkpoint rows, and signs the numbers its rule computed."""

import re

from fgtrac_assets.attribution.selection import SelectionRule
from fgtrac_assets.ledger import Commit, Ledger
from fgtrac_assets.pipelines import stages
from fgtrac_assets.pipelines.digits import DigitsPipeline
from fgtrac_assets.pipelines.handles import Handle

LOSSES = [5.6, 5.5, 2.0, 1.0, 0.9, 0.5, 0.49, 0.48]  # the window (consider_from 0.5) starts at checkpoint 4


def signed_training(ledger: Ledger, losses: list[float]) -> Handle:
    """Commit checkpoint rows as a training stage would and return a handle naming that commit only."""
    rows = [{"checkpoint_id": f"tr/epoch-{i:03d}", "epoch": i, "step": 10 * (i + 1), "lr": 0.1, "train_loss": v,
             "val_loss": v, "path": f"artifacts/x/{i}.pt", "sha256": "0" * 64} for i, v in enumerate(losses)]
    r = ledger.commit(Commit("digits_cnn", "training_checkpoints", "tr", training_run="tr", rows={"checkpoints": rows}))
    return Handle("digits_cnn", "training_checkpoints", r.root_hex, r.tree_size, r.leaf_start, r.leaf_count, "tr")


def test_selection_reason_states_the_improvement_the_rule_computed_within_its_window(tmp_path):
    ledger = Ledger(tmp_path / "h")
    result = stages.select(ledger, DigitsPipeline(), "sel", signed_training(ledger, LOSSES))
    rows = ledger.query("SELECT checkpoint_id, selected, rank, reason FROM checkpoint_selections "
                        "ORDER BY checkpoint_id").to_pylist()
    rule = SelectionRule()
    assert [r["selected"] for r in rows] == [i in rule.select(LOSSES) for i in range(len(LOSSES))]
    assert all("before the rule's window" in r["reason"] for r in rows[:4])
    # checkpoint 5 improves on the window's best before it (0.9, checkpoint 4) by 0.444..., not on the run's
    improvement = float(re.search(r"relative improvement (-?[\d.]+)", rows[5]["reason"]).group(1))
    assert abs(improvement - (0.9 - 0.5) / 0.9) < 1e-3
    assert "relative improvement" not in rows[4]["reason"]  # the window's first has nothing to improve on
    assert rows[-1]["reason"].endswith("final checkpoint") and result.metadata["selected"][-1] == "tr/epoch-007"


def test_selection_reads_the_signed_rows_of_the_training_commit_alone(tmp_path):
    ledger = Ledger(tmp_path / "h")
    signed_training(ledger, [9.0] * 8)  # another training run's rows in the same ledger
    training = signed_training(ledger, LOSSES)
    result = stages.select(ledger, DigitsPipeline(), "sel", training, SelectionRule(consider_from=0.0))
    assert result.metadata["selected"] == [f"tr/epoch-{i:03d}" for i in SelectionRule(consider_from=0.0).select(LOSSES)]
