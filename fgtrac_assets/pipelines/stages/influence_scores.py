"""The influence stages: top-k and self-influence by the configured method, and TracInCP by shard with its merge.

TracInCP (the default) scores from the gradient cache; TRAK from the selected checkpoints' weights; the replay
methods (step-exact TracIn, metagradients) from the training run's recorded trace, which they verify first.
"""

import time

import numpy as np
import pyarrow as pa

from ...attribution.methods import DEFAULT_METHOD, METHODS
from ...errors import InputError
from ...ledger.checks import SqlCheck
from ...ledger.influence_rows import influence_rows
from ...ledger.store import Ledger
from ...report import plots
from ...report.influence_figures import influence_figures
from ..base import InfluenceSettings, Pipeline, resolve_device
from ..handles import ArtifactRef, GradientCacheHandle, Handle, StageResult
from .commit import Log, commit_stage, quiet, write_parquet

NONNEGATIVE_SELF = ", ".join(f"'{m.name}'" for m in METHODS.values() if m.self_influence_nonnegative)
INFLUENCE_CHECKS = (
    # a detail is JSON read as JSON, whatever its spacing; one that is not JSON is no test sample's (verify reports it)
    SqlCheck("lineage_complete", """SELECT count(*) FROM (SELECT DISTINCT sample_id FROM events
                                    WHERE kind = 'gradient' AND training_run = $tr
                                    AND CASE WHEN json_valid(detail) THEN json_extract_string(detail, '$.split') END
                                        = 'test') t
                                    WHERE t.sample_id NOT IN (SELECT test_sample_id FROM influence
                                                              WHERE run_id = $run AND kind = 'proponent')""",
             "test samples without influence scores"),
    # Proponents are a test sample's k largest scores and opponents its k smallest, whatever their sign (when
    # every score is negative, so are the proponents'): each rank's score is at most the one before it (at least,
    # for opponents) and no proponent scores below an opponent. Self-influence is never negative where it is a sum of
    # squared norms (TracInCP's sum of lr |g|^2, and the other methods marked so in attribution/methods.py).
    SqlCheck("numbers_sane", """WITH s AS (SELECT kind, test_sample_id, score, method,
                                       lag(score) OVER (PARTITION BY kind, test_sample_id ORDER BY rank) AS before
                                       FROM influence WHERE run_id = $run),
                                bounds AS (SELECT test_sample_id, min(score) FILTER (kind = 'proponent') AS lowest,
                                                  max(score) FILTER (kind = 'opponent') AS highest
                                           FROM s WHERE kind IN ('proponent', 'opponent') GROUP BY 1)
                                SELECT (SELECT count(*) FROM s WHERE score IS NULL OR isnan(score) OR isinf(score)
                                        OR (kind = 'self' AND score < 0 AND method IN (""" + NONNEGATIVE_SELF + """))
                                        OR (kind IN ('proponent', 'self') AND score > before)
                                        OR (kind = 'opponent' AND score < before))
                                     + (SELECT count(*) FROM bounds WHERE lowest < highest)""",
             "scores that are missing or not finite, out of rank order, negative self-influence, "
             "or test samples with a proponent scored below an opponent"),
)


def _score_cache(table: pa.Table, k: int, log: Log, device: str = "cpu") -> tuple[list, list, list, object, object, int]:
    """Return (checkpoint ids, train ids, test ids, top-k or None, self-influence, k) of one gradient cache.

    The scores are computed on ``device`` and handed back on the CPU.
    """
    from ...attribution.ghost import Factors, self_influence_from_factors, top_k_from_factors
    from ...attribution.topk import TopK

    ckpt_ids = list(dict.fromkeys(table.column("checkpoint_id").to_pylist()))
    train_by, test_by, lrs, train_ids, test_ids = [], [], [], None, None
    for cid in ckpt_ids:
        part = table.filter(pa.compute.equal(table.column("checkpoint_id"), cid))
        lrs.append(float(part.column("lr")[0].as_py()))
        for split, dest in (("train", train_by), ("test", test_by)):
            sp = part.filter(pa.compute.equal(part.column("split"), split))
            ids = sp.column("sample_id").to_pylist()
            if split == "train":
                train_ids = train_ids or ids
            else:
                test_ids = test_ids or ids
            dest.append([Factors(errors=_matrix(sp.column("errors")).to(device),
                                 activations=_matrix(sp.column("activations")).to(device))])
    k = min(k, len(train_ids))
    started = time.monotonic()
    top = top_k_from_factors(train_by, test_by, lrs, k) if test_ids else None
    selfinf = self_influence_from_factors(train_by, lrs).cpu()
    if top is not None:
        top = TopK(top.proponent_idx.cpu(), top.proponent_score.cpu(), top.opponent_idx.cpu(), top.opponent_score.cpu())
    log(f"TracInCP over {len(train_ids)} train x {len(test_ids or [])} test at {len(lrs)} checkpoints "
        f"on {device} in {time.monotonic() - started:.2f}s")
    return ckpt_ids, train_ids, test_ids or [], top, selfinf, k


def influence(ledger: Ledger, pipeline: Pipeline, run_id: str, cache: GradientCacheHandle,
              settings: InfluenceSettings = InfluenceSettings(), log: Log = quiet) -> StageResult:
    """Score every test sample against every training sample with TracInCP; keep top-k and self-influence.

    The scores are computed on ``settings.device`` (resolved once, recorded in the metadata as ``device``).
    """
    import torch

    settings.validate()
    device = resolve_device(settings.device)
    if settings.method == DEFAULT_METHOD:
        table = cache.artifacts["gradient_cache"].read_parquet(ledger.home.root)
        ckpt_ids, train_ids, test_ids, top, selfinf, k = _score_cache(table, settings.top_k, log, device)
    else:
        device = "cpu"
        ckpt_ids, train_ids, test_ids, top, selfinf, k = _score_by_method(ledger, pipeline, cache, settings, log)
    rows = influence_rows(train_ids, test_ids, top, selfinf, k, settings.method)
    order = torch.argsort(selfinf, descending=True).tolist()
    art = write_parquet(ledger, f"{pipeline.name}/runs/{cache.training_run}/influence-{run_id}.parquet",
                         "influence_scores", rows)
    meta = {"method": METHODS[settings.method].description, "method_name": settings.method, "device": device,
            "checkpoints": ckpt_ids, "top_k": k,
            "self_influence_md": plots.markdown_image(
                plots.histogram(selfinf.tolist(), "self-influence of training samples", f"{settings.method}(z, z)"),
                "distribution of self-influence"),
            "test_samples": len(test_ids or []), "train_samples": len(train_ids), "influence_rows": rows.num_rows,
            "top_self_influence": [(train_ids[i], float(selfinf[i])) for i in order[:10]]}
    if top is not None and cache.prepared is not None:
        prepared_table = cache.prepared.read_parquet(ledger.home.root)
        meta.update(influence_figures(pipeline, prepared_table, train_ids, test_ids, top))
    return commit_stage(ledger, pipeline, "influence_scores", run_id, {"influence": rows}, [cache],
                        {"influence": art}, meta, INFLUENCE_CHECKS, training_run=cache.training_run)


def _score_by_method(ledger: Ledger, pipeline: Pipeline, cache: GradientCacheHandle, settings: InfluenceSettings,
                     log: Log) -> tuple[list, list, list, object, object, int]:
    """Return what _score_cache returns, scored on the CPU by a checkpoint or trace method of attribution/methods."""
    from ...attribution.methods import build_scorer
    from ...session.recorded_trace import recorded_trace

    root = ledger.home.root
    prepared = cache.prepared.read_parquet(root)
    train_ids, xt, yt = pipeline.tensors(prepared, "train")
    test_ids, xs, ys = pipeline.tensors(prepared, "test")
    cached = cache.artifacts["gradient_cache"].read_parquet(root, columns=["checkpoint_id"])
    ckpt_ids = list(dict.fromkeys(cached.column("checkpoint_id").to_pylist()))  # the selected checkpoints
    model = pipeline.build_model(prepared)
    states, trace = None, None
    if METHODS[settings.method].source == "checkpoints":
        with ledger.reader() as con:
            files = {c: ArtifactRef(path, sha) for c, path, sha in con.execute(
                "SELECT checkpoint_id, path, sha256 FROM checkpoints WHERE training_run = ?",
                [cache.training_run]).fetchall()}
        states = [files[c].load_torch(root) for c in ckpt_ids]
    else:
        trace = recorded_trace(ledger, cache.training_run, model, train_ids, pipeline)
    scorer = build_scorer(settings.method, model, pipeline.loss_fn(), yt, layer=pipeline.influence_layer,
                          checkpoints=states, trace=trace)
    k = min(settings.top_k, len(train_ids))
    started = time.monotonic()
    top = scorer.top_k(xt, yt, xs, ys, k=k) if test_ids else None
    selfinf = scorer.self_influence(xt, yt).detach().cpu()
    log(f"{settings.method} over {len(train_ids)} train x {len(test_ids)} test "
        f"{'at %d checkpoints' % len(ckpt_ids) if trace is None else 'through %d replayed steps' % len(trace.steps)} "
        f"in {time.monotonic() - started:.2f}s")
    return ckpt_ids, train_ids, test_ids, top, selfinf, k


def influence_shard(ledger: Ledger, pipeline: Pipeline, run_id: str, cache: GradientCacheHandle,
                    settings: InfluenceSettings = InfluenceSettings(), log: Log = quiet) -> StageResult:
    """Score one shard's training samples against every test sample; keep its top-k as an artifact to combine."""
    settings.validate()
    if settings.method != DEFAULT_METHOD:
        raise InputError(f"influence method {settings.method!r}: the sharded influence stages score with "
                         f"{DEFAULT_METHOD} only; use the unsharded influence_scores asset for other methods")
    device = resolve_device(settings.device)
    table = cache.artifacts["gradient_cache"].read_parquet(ledger.home.root)
    _, train_ids, test_ids, top, selfinf, k_used = _score_cache(table, settings.top_k, log, device)
    rows = influence_rows(train_ids, test_ids, top, selfinf, k_used)
    shard = cache.shard
    art = write_parquet(ledger, f"{pipeline.name}/runs/{cache.training_run}/influence-{shard}-{run_id}.parquet",
                         "influence_shard", rows)
    meta = {"shard": shard, "device": device, "train_samples": len(train_ids), "test_samples": len(test_ids),
            "rows": rows.num_rows}
    return commit_stage(ledger, pipeline, "influence_shards", run_id, {}, [cache], {"influence": art}, meta,
                        training_run=cache.training_run)


def combine_influence(ledger: Ledger, pipeline: Pipeline, run_id: str, shards: list[Handle],
                      settings: InfluenceSettings = InfluenceSettings(), log: Log = quiet) -> StageResult:
    """Merge the shards' top-k into exactly the unsharded top-k and self-influence ranking, and commit it."""
    import pyarrow.compute as pc

    k = settings.top_k
    runs = {h.training_run for h in shards}
    if len(runs) != 1:
        raise InputError(f"influence shards come from {len(runs)} training runs ({sorted(map(str, runs))}): "
                         "materialise every shard from the same selected checkpoints")
    parts = [h.artifacts["influence"].read_parquet(ledger.home.root) for h in shards]
    rows = pa.concat_tables(parts)
    merged = []
    for kind, descending in (("proponent", True), ("opponent", False)):
        sub = rows.filter(pc.equal(rows.column("kind"), kind))
        sub = sub.sort_by([("test_sample_id", "ascending"), ("score", "descending" if descending else "ascending"),
                           ("train_sample_id", "ascending")])
        merged.append(_first_per_group(sub, "test_sample_id", k))
    selfs = rows.filter(pc.equal(rows.column("kind"), "self")).sort_by([("score", "descending"),
                                                                         ("train_sample_id", "ascending")])
    merged.append(selfs.set_column(selfs.schema.get_field_index("rank"), "rank",
                                   pa.array(range(1, selfs.num_rows + 1), pa.int64())))
    out = pa.concat_tables([m.cast(merged[0].schema) for m in merged])
    training_run = next(iter(runs))
    art = write_parquet(ledger, f"{pipeline.name}/runs/{training_run}/influence-combined-{run_id}.parquet",
                         "influence_scores", out)
    meta = {"method": "TracInCP (last layer, selected checkpoints), combined from shards", "shards": len(shards),
            "top_k": k, "train_samples": selfs.num_rows, "influence_rows": out.num_rows}
    log(f"combined {len(shards)} shards: {selfs.num_rows} training samples, {out.num_rows} rows")
    return commit_stage(ledger, pipeline, "influence_combined", run_id, {"influence": out}, shards,
                        {"influence": art}, meta, training_run=training_run)


def _first_per_group(sorted_rows: pa.Table, key: str, k: int) -> pa.Table:
    """Return the first k rows of each run of equal keys in sorted rows, ranked 1..k."""
    keys = sorted_rows.column(key).to_numpy(zero_copy_only=False)
    starts = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1]
    rank = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    keep = rank < k
    out = sorted_rows.filter(pa.array(keep))
    return out.set_column(out.schema.get_field_index("rank"), "rank", pa.array(rank[keep] + 1, pa.int64()))


def _matrix(col: pa.ChunkedArray):
    import torch

    arr = col.combine_chunks()
    width = arr.type.list_size
    return torch.from_numpy(arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).copy())
