"""The training stage: a new model version, a checkpoint per epoch, a `batched` event group per step."""

import dataclasses
import time

from ...ledger.artifacts import INITIAL_WEIGHTS, checkpoint_dir, initial_weights_path, write_artifact
from ...ledger.checks import SqlCheck
from ...ledger.proofs import training_set_root
from ...ledger.store import Ledger
from ...report import plots
from ..base import Pipeline, TrainSettings, resolve_device
from ..handles import Handle, StageResult
from .commit import Log, NothingToTrain, commit_stage, quiet

TRAIN_CHECKS = (
    SqlCheck("lineage_complete", """SELECT count(*) FROM (SELECT sample_id, count(DISTINCT epoch) AS e FROM events
                                    WHERE training_run = $tr AND kind = 'batched' GROUP BY 1)
                                    WHERE e <> (SELECT count(*) FROM checkpoints WHERE training_run = $tr)""",
             "training samples missing a `batched` event in some epoch"),
    SqlCheck("numbers_sane", """SELECT count(*) FROM checkpoints WHERE training_run = $tr
                                AND (val_loss IS NULL OR isnan(val_loss) OR isinf(val_loss)
                                     OR train_loss IS NULL OR isnan(train_loss) OR lr IS NULL OR lr <= 0)""",
             "checkpoints without a finite validation/training loss or a positive lr"),
)


def train(ledger: Ledger, pipeline: Pipeline, run_id: str, prepared: Handle, settings: TrainSettings,
          log: Log = quiet) -> StageResult:
    """Train a new model version; record a `batched` event per sample per step (a leaf per step) and a checkpoint per epoch.

    Training and the final evaluation run on ``settings.device``, resolved once here and recorded in the metadata
    (``device``); the checkpoints are saved from CPU copies, so they load on any machine.
    """
    import torch

    from ..training import cpu_state_dict

    settings.validate()
    device = resolve_device(settings.device)
    table = prepared.artifacts["prepared"].read_parquet(ledger.home.root)
    train_ids, _, _ = pipeline.tensors(table, "train")
    val_ids, _, _ = pipeline.tensors(table, "val")
    if not train_ids:
        raise NothingToTrain("the training split is empty: nothing to train on")
    if not val_ids:
        raise NothingToTrain("the validation split is empty: need validation samples to select checkpoints")
    training_run = run_id
    from ...tracing.tracer import Tracer

    tracer = Tracer(train_ids, training_run)
    checkpoints, history = [], []
    # where the run starts: with every step's batch and lr and the checkpoints, the trace a replay re-runs
    initial = cpu_state_dict(pipeline.initial_model(table, settings.seed))
    arts = {INITIAL_WEIGHTS: write_artifact(ledger.ensure_home().root, initial_weights_path(pipeline.name, training_run),
                                            INITIAL_WEIGHTS, lambda path: torch.save(initial, path))}
    started = time.monotonic()
    log(f"training on {device}")
    for ep in pipeline.train(table, dataclasses.replace(settings, device=device), tracer):
        rel = f"{checkpoint_dir(pipeline.name, training_run)}/epoch-{ep.epoch:03d}.pt"

        def save(path, state=ep.state_dict):
            torch.save(state, path)

        art = write_artifact(ledger.ensure_home().root, rel, "checkpoint", save)
        ckpt_id = f"{training_run}/epoch-{ep.epoch:03d}"
        arts[ckpt_id] = art
        checkpoints.append({"checkpoint_id": ckpt_id, "epoch": ep.epoch, "step": ep.step, "lr": ep.lr,
                            "train_loss": ep.train_loss, "val_loss": ep.val_loss, "path": art.path, "sha256": art.sha256})
        history.append((ep.epoch, ep.train_loss, ep.val_loss))
        elapsed = time.monotonic() - started
        rate = tracer.step * settings.batch_size / max(elapsed, 1e-9)
        eta = elapsed / (ep.epoch + 1) * (settings.epochs - ep.epoch - 1)
        log(f"{ckpt_id} ({ep.epoch + 1}/{settings.epochs}): train loss {ep.train_loss:.4f}, val loss {ep.val_loss:.4f}, "
            f"lr {ep.lr:.4g}, {rate:,.0f} samples/s, ETA {eta:.0f}s")
    final = pipeline.build_model(table)
    final.load_state_dict(ep.state_dict)
    final.to(device)
    metrics = pipeline.evaluate(final, table)
    if metrics:
        log("test metrics of the final model: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    groups = tracer.groups()
    used = tracer.used_sample_ids()
    training_set = [{"size": len(used), "root": training_set_root(used).hex()}]
    meta = {"epochs": settings.epochs, "steps": tracer.step, "training_set_root": training_set[0]["root"],
            "traced_events": groups.num_members, "event_groups": groups.groups.num_rows,
            "train_samples": len(train_ids), "final_val_loss": checkpoints[-1]["val_loss"],
            "settings": settings.__dict__, "device": device, "loss_history": history, **metrics}
    meta["loss_curve_md"] = plots.markdown_image(plots.loss_curve(history), "training and validation loss")
    return commit_stage(ledger, pipeline, "training_checkpoints", run_id,
                        {"checkpoints": checkpoints, "training_sets": training_set}, [prepared], arts, meta,
                        TRAIN_CHECKS, training_run=training_run, groups=groups)
