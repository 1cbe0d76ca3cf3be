"""The gradient stage: the influence layer's per-sample gradient factors at each selected checkpoint."""

import json

import numpy as np
import pyarrow as pa

from ...ledger.checks import SqlCheck
from ...ledger.store import Ledger
from ...tracing.groups import GroupLog
from ..base import GradientSettings, Pipeline, resolve_device
from ..handles import ArtifactRef, GradientCacheHandle, Handle, StageResult
from .commit import Log, commit_stage, quiet, write_parquet
from .selection import signed_selection

GRADIENT_CHECKS = (
    SqlCheck("lineage_complete", """SELECT count(*) FROM (SELECT sample_id, count(DISTINCT checkpoint_id) AS c FROM events
                                    WHERE run_id = $run AND kind = 'gradient' GROUP BY 1)
                                    WHERE c <> (SELECT count(DISTINCT checkpoint_id) FROM events
                                                WHERE run_id = $run AND kind = 'gradient')""",
             "samples missing a gradient at some selected checkpoint"),
    SqlCheck("numbers_sane", """SELECT count(*) FROM events WHERE run_id = $run AND kind = 'gradient'
                                AND (lr IS NULL OR lr <= 0)""", "gradient events without a positive lr"),
)


def gradients(ledger: Ledger, pipeline: Pipeline, run_id: str, prepared: Handle, training: Handle,
              selected: Handle, settings: GradientSettings = GradientSettings(),
              shard: tuple[int, int] | None = None, log: Log = quiet) -> StageResult:
    """Cache the influence layer's gradient factors (output error, input activation) per selected checkpoint.

    The model runs on ``settings.device`` (resolved once, recorded in the metadata as ``device``); the cache
    is written from CPU copies of the factors.

    With shard=(i, n) only the training samples of shard i (``shard_of``) are kept, with every
    test sample; the test samples' gradient events are recorded by shard 0 alone.
    """
    from ..splits import shard_of

    asset = "gradient_cache" if shard is None else "gradient_cache_shards"
    settings.validate()
    device = resolve_device(settings.device)

    table = prepared.artifacts["prepared"].read_parquet(ledger.home.root)
    model = pipeline.build_model(table).to(device)
    layer = pipeline.influence_layer
    parts, recorded, recorded_ids = [], GroupLog(), []
    chosen = signed_selection(ledger, training, selected)
    for c in chosen:
        model.load_state_dict(ArtifactRef(c["path"], c["sha256"]).load_torch(ledger.home.root))  # onto its device
        for split in ("train", "test"):
            ids, f = pipeline.gradient_factors(model, table, split)
            if not ids:
                continue
            e, a = f.errors.detach().float().cpu().numpy(), f.activations.detach().float().cpu().numpy()
            if shard is not None and split == "train":
                keep = [r for r, sid in enumerate(ids) if shard_of(sid, shard[1]) == shard[0]]
                ids, e, a = [ids[r] for r in keep], e[keep], a[keep]
            norms = np.sqrt((e * e).sum(1) * ((a * a).sum(1) + 1.0))
            parts.append(pa.table({
                "checkpoint_id": [c["checkpoint_id"]] * len(ids), "lr": [c["lr"]] * len(ids),
                "sample_id": ids, "split": [split] * len(ids),
                "errors": pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), e.shape[1]),
                "activations": pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])}))
            if shard is None or split == "train" or shard[0] == 0:  # one event group per checkpoint and split
                details = [json.dumps({"layer": layer, "split": split, "grad_norm": float(n)}, sort_keys=True)
                           for n in norms]
                recorded.add("gradient", np.arange(len(recorded_ids), len(recorded_ids) + len(ids)), lr=c["lr"],
                             checkpoint_id=c["checkpoint_id"], details=pa.array(details, pa.string()))
                recorded_ids.extend(ids)
        log(f"gradient factors at {c['checkpoint_id']} on {device}")
    cache = pa.concat_tables(parts)
    suffix = "" if shard is None else f"-shard{shard[0]}of{shard[1]}"
    art = write_parquet(ledger, f"{pipeline.name}/runs/{training.training_run}/gradient_cache{suffix}-{run_id}.parquet",
                         "gradient_cache", cache)
    groups = recorded.build(training.training_run, pa.array(recorded_ids, pa.string()))
    meta = {"layer": layer, "device": device, "checkpoints": len(chosen), "rows": cache.num_rows,
            "gradient_events": groups.num_members, **({} if shard is None else {"shard": f"{shard[0]} of {shard[1]}"})}
    return commit_stage(ledger, pipeline, asset, run_id, {}, [prepared, training, selected], {"gradient_cache": art},
                        meta, GRADIENT_CHECKS if shard is None else (), groups=groups,
                        training_run=training.training_run, handle_type=GradientCacheHandle,
                        prepared=prepared.artifacts["prepared"],
                        shard="" if shard is None else f"shard{shard[0]}of{shard[1]}")
