"""The selection stage: FG-Trac's rule applied to the signed checkpoint rows, each decision recorded with its reason."""

import dataclasses

from ...attribution.selection import DEFAULT_RULE, SelectionRule
from ...ledger.checks import SqlCheck
from ...ledger.store import Ledger
from ...report import plots
from ..base import Pipeline
from ..handles import Handle, StageResult
from .commit import Log, commit_stage, quiet

SELECT_CHECKS = (SqlCheck("lineage_complete", """SELECT CASE WHEN count(*) FILTER (selected) = 0 THEN 1 ELSE 0 END
                                                 FROM checkpoint_selections WHERE run_id = $run""",
                          "no checkpoint selected"),)


def signed_checkpoints(ledger: Ledger, training: Handle) -> list[dict]:
    """Return the `checkpoints` rows the training commit signed, in epoch order."""
    return sorted(ledger.committed_rows("checkpoints", training.leaf_start, training.leaf_count),
                  key=lambda c: c["epoch"])


def select(ledger: Ledger, pipeline: Pipeline, run_id: str, training: Handle, rule: SelectionRule = DEFAULT_RULE,
           log: Log = quiet) -> StageResult:
    """Choose the checkpoints influence is taken at (FG-Trac's validation-loss rule) from the signed checkpoint rows."""
    ckpts = signed_checkpoints(ledger, training)
    decisions = rule.decide([c["val_loss"] for c in ckpts])
    rows = [{"checkpoint_id": c["checkpoint_id"], "selected": d.selected, "rank": d.rank, "reason": d.reason(rule)}
            for c, d in zip(ckpts, decisions)]
    selected = [c for c, d in zip(ckpts, decisions) if d.selected]
    log("selected checkpoints: " + ", ".join(f"{c['checkpoint_id']} (val loss {c['val_loss']:.4f}, lr {c['lr']:.4g})"
                                         for c in selected))
    history = [(c["epoch"], c["train_loss"], c["val_loss"]) for c in ckpts]
    curve = plots.loss_curve(history, [c["epoch"] for c in selected])
    meta = {"selected": [c["checkpoint_id"] for c in selected], "selected_epochs": [c["epoch"] for c in selected],
            "loss_curve_md": plots.markdown_image(curve, "loss per epoch, selected checkpoints circled"),
            "rule": dataclasses.asdict(rule)}
    return commit_stage(ledger, pipeline, "selected_checkpoints", run_id, {"checkpoint_selections": rows}, [training],
                        {}, meta, SELECT_CHECKS, training_run=training.training_run)


def signed_selection(ledger: Ledger, training: Handle, selected: Handle) -> list[dict]:
    """Return the checkpoints rows the selection commit signed as selected, in epoch order."""
    chosen = {r["checkpoint_id"] for r in ledger.committed_rows("checkpoint_selections", selected.leaf_start,
                                                                 selected.leaf_count) if r["selected"]}
    return [c for c in signed_checkpoints(ledger, training) if c["checkpoint_id"] in chosen]
