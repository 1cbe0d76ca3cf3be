"""The post-commit checks read the committed ledger: JSON details as JSON, influence scores by rank, not by sign."""

import json

import pytest

from fgtrac_assets.ledger import Commit, Ledger
from fgtrac_assets.ledger.checks import run_checks
from fgtrac_assets.pipelines.chain import stage

TR = "tr-1"


def outcomes(ledger: Ledger, asset: str, run_id: str, note: str) -> dict:
    return {c.name: c for c in run_checks(ledger, stage(asset).checks, run_id, TR, note)}


def gradient_events(splits: dict[str, str], separators=(", ", ": ")) -> list[dict]:
    """`gradient` events of one checkpoint, their details written with the given JSON separators."""
    return [{"sample_id": sid, "kind": "gradient", "training_run": TR, "checkpoint_id": "ck-0", "lr": 0.1,
             "detail": json.dumps({"grad_norm": 1.0, "layer": "fc", "split": split}, separators=separators)}
            for sid, split in splits.items()]


def influence_rows(per_test: dict[str, tuple[list[float], list[float]]], self_scores=(0.5, 0.25)) -> list[dict]:
    """Influence rows: per test sample its proponents' and opponents' scores by rank, then self-influence."""
    rows = []
    for test, (proponents, opponents) in per_test.items():
        for kind, scores in (("proponent", proponents), ("opponent", opponents)):
            rows += [{"training_run": TR, "method": "tracincp", "test_sample_id": test, "train_sample_id": f"t{r}",
                      "kind": kind, "rank": r, "score": s} for r, s in enumerate(scores, 1)]
    rows += [{"training_run": TR, "method": "tracincp", "train_sample_id": f"t{r}", "kind": "self", "rank": r,
              "score": s} for r, s in enumerate(self_scores, 1)]
    return rows


def commit(ledger: Ledger, asset: str, run_id: str, **rows) -> str:
    """Commit rows as one materialisation of asset (pipeline, run and asset filled in as the stages do)."""
    filled = {t: [{"pipeline": "p", "run_id": run_id, "asset": asset, **r} for r in rs] for t, rs in rows.items()}
    return ledger.commit(Commit(pipeline="p", asset=asset, run_id=run_id, training_run=TR, rows=filled)).checkpoint


@pytest.mark.parametrize("separators", [(", ", ": "), (",", ":")], ids=["json.dumps-default", "compact"])
def test_lineage_finds_test_samples_by_their_json_split_whatever_the_spacing(tmp_path, separators):
    ledger = Ledger(tmp_path)
    commit(ledger, "gradient_cache", "g", events=gradient_events({"a": "test", "b": "test", "c": "train"}, separators))
    note = commit(ledger, "influence_scores", "i", influence=influence_rows({"a": ([0.3], [-0.2])}))
    lineage = outcomes(ledger, "influence_scores", "i", note)["lineage_complete"]
    # "b" is a test sample (its gradient event says so) without scores; "c" is a training sample
    assert not lineage.passed and lineage.metadata["violations"] == 1, lineage.description
    assert lineage.description == "1 test samples without influence scores"


def test_numbers_sane_accepts_negative_proponents_when_every_score_is_negative(tmp_path):
    ledger = Ledger(tmp_path)
    # test sample "a": every training sample hurt it, so even its top proponents score below zero
    rows = influence_rows({"a": ([-0.01, -0.02], [-0.9, -0.5]), "b": ([0.4, 0.1], [-0.3, 0.05])})
    note = commit(ledger, "influence_scores", "i", influence=rows)
    sane = outcomes(ledger, "influence_scores", "i", note)["numbers_sane"]
    assert sane.passed and sane.metadata["violations"] == 0, sane.description


@pytest.mark.parametrize("per_test, self_scores, bad", [
    ({"a": ([0.1, 0.3], [-0.5, -0.4])}, (0.5, 0.25), 1),     # proponent rank 2 above rank 1
    ({"a": ([0.3, 0.1], [-0.4, -0.5])}, (0.5, 0.25), 1),     # opponent rank 2 below rank 1
    ({"a": ([0.3, -0.6], [-0.5, -0.4])}, (0.5, 0.25), 1),    # a proponent scored below an opponent
    ({"a": ([0.3, 0.1], [-0.5, -0.4])}, (0.25, 0.5), 1),     # self-influence not ranked largest first
    ({"a": ([0.3, 0.1], [-0.5, -0.4])}, (0.5, -0.25), 1),    # negative self-influence
], ids=["proponent-rank", "opponent-rank", "proponent-below-opponent", "self-rank", "self-negative"])
def test_numbers_sane_flags_scores_out_of_rank_order(tmp_path, per_test, self_scores, bad):
    ledger = Ledger(tmp_path)
    note = commit(ledger, "influence_scores", "i", influence=influence_rows(per_test, self_scores))
    sane = outcomes(ledger, "influence_scores", "i", note)["numbers_sane"]
    assert not sane.passed and sane.metadata["violations"] == bad, sane.description
