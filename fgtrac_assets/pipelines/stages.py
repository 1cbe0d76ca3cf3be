"""The chain's stages as plain functions: compute, write artifacts, commit rows to the ledger."""

import dataclasses
import json
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..attribution.selection import DEFAULT_RULE, SelectionRule
from ..ledger.artifacts import ArtifactFile, write_artifact
from ..ledger.checks import run_checks
from ..ledger.groups import GroupLog
from ..ledger.proofs import training_set_root
from ..report import plots, tables
from ..ledger.store import Commit, CommitResult, Ledger
from ..tracing.events import EventBuffer
from .base import Pipeline, TrainSettings
from .handles import ArtifactRef, Handle, StageResult

Log = Callable[[str], None]


class NothingToTrain(ValueError):
    """Every sample was rejected, or a split is empty: there is nothing to train on."""


def _noop(_: str) -> None:
    pass


def _write_parquet(ledger: Ledger, relpath: str, kind: str, table: pa.Table) -> ArtifactFile:
    """Write a Parquet artifact under $FGTRAC_HOME/artifacts/ (its recorded path is relative to FGTRAC_HOME)."""
    return write_artifact(ledger.ensure_home().root, f"artifacts/{relpath}", kind, lambda p: pq.write_table(table, p))


def _finish(ledger: Ledger, pipeline: Pipeline, asset: str, run_id: str, rows: dict, upstream: list[Handle],
            artifacts: dict[str, ArtifactFile], metadata: dict, training_run: str | None = None,
            extra: dict | None = None, code_version: str = "", groups=None) -> StageResult:
    """Commit a stage's rows (and event groups) and artifacts and return its handle and metadata."""
    common = {"pipeline": pipeline.name, "run_id": run_id, "asset": asset, "training_run": training_run}
    art_rows = [a.row(**common) for a in artifacts.values()]
    if art_rows:
        rows = {**rows, "artifacts": art_rows}
    for name, tbl in list(rows.items()):
        rows[name] = _with_constants(tbl, common, name)
    result: CommitResult = ledger.commit(Commit(
        pipeline=pipeline.name, asset=asset, run_id=run_id, training_run=training_run, code_version=code_version,
        upstream={h.asset: h.root_hex for h in upstream}, rows=rows, groups=groups))
    handle = Handle(pipeline=pipeline.name, asset=asset, root_hex=result.root_hex, tree_size=result.tree_size,
                    leaf_start=result.leaf_start, leaf_count=result.leaf_count, training_run=training_run,
                    artifacts={k: ArtifactRef.of(a) for k, a in artifacts.items()}, extra=extra or {})
    meta = {**metadata, "ledger_rows": sum(result.rows.values()) + 1, "log_leaves": result.leaf_count,
            "leaf_start": result.leaf_start,
            "leaf_end": result.leaf_start + result.leaf_count - 1, "tree_size": result.tree_size,
            "root": result.root_hex, "signed_tree_head": result.checkpoint,
            "upstream_roots": {h.asset: h.root_hex for h in upstream}}
    checks = run_checks(ledger, asset, run_id, training_run, result.checkpoint)
    return StageResult(handle=handle, metadata=meta, checkpoint=result.checkpoint, checks=checks)


def _with_constants(rows, common: dict, table: str):
    """Fill pipeline/run/asset/training_run into rows that do not set them."""
    from ..ledger.schema import LEAF_TABLES

    cols = {c for c, _ in LEAF_TABLES[table]}
    fill = {k: v for k, v in common.items() if k in cols}
    if isinstance(rows, pa.Table):
        for k, v in fill.items():
            if k not in rows.column_names:
                rows = rows.append_column(k, pa.array([v] * rows.num_rows, pa.string()))
        return rows
    return [{**{k: v for k, v in fill.items()}, **{k: v for k, v in r.items() if v is not None or k not in fill}}
            for r in rows]


def ingest(ledger: Ledger, pipeline: Pipeline, run_id: str, source: str = "", limit: int = 0,
           strict: bool = False, inbox: bool = False, image_size: str = "", log: Log = _noop) -> StageResult:
    """Read the source (and the pipeline's inbox), record `ingested` events for new content and `rejected` ones.

    The raw artifact is this run's whole snapshot; a sample whose content the pipeline ingested before gets no
    second `ingested` event (ids are content hashes), so its history shows where it first came from.
    """
    if image_size:
        pipeline = pipeline.with_image_size(image_size)
    got = pipeline.ingest(source, limit)
    inbox_dir = ledger.home.inbox / pipeline.name
    if inbox and inbox_dir.is_dir() and any(inbox_dir.iterdir()):
        more = pipeline.ingest(str(inbox_dir), 0)
        got = type(got)(pa.concat_tables([got.table, more.table]), got.rejected + more.rejected)
    for r in got.rejected[:20]:
        log(r.message())
    if len(got.rejected) > 20:
        log(f"... and {len(got.rejected) - 20} more rejected items (see events with kind='rejected')")
    table = got.table
    ids = table.column("sample_id").to_pylist()
    known = _known_samples(ledger, pipeline.name, ids)
    new = pa.array([sid not in known for sid in ids], type=pa.bool_())
    fresh = table.filter(new)
    events = EventBuffer()
    events.add(fresh.column("sample_id").to_pylist(), "ingested",
               detail=[{"source": s, "label": y} for s, y in zip(fresh.column("source").to_pylist(),
                                                                 fresh.column("label").to_pylist())])
    events.add([r.sample_id for r in got.rejected], "rejected",
               detail=[{"source": r.source, "reason": r.reason} for r in got.rejected])
    rows = {"samples": fresh.select(["sample_id", "source", "label"]), "events": events.to_arrow()}
    if strict and got.rejected:
        # Record what was rejected, then stop: nothing is trained on a partially bad source.
        _finish(ledger, pipeline, "raw_samples", run_id, {"events": events.to_arrow()}, [], {}, {})
        raise ValueError(f"strict ingestion: {len(got.rejected)} item(s) rejected; first: {got.rejected[0].message()}")
    if table.num_rows == 0:
        _finish(ledger, pipeline, "raw_samples", run_id, rows, [], {}, {})
        raise NothingToTrain(f"source {source or '(bundled default)'}: every item was rejected "
                             f"({len(got.rejected)} rejected, 0 accepted); nothing to train on")
    art = _write_parquet(ledger, f"{pipeline.name}/raw/{run_id}.parquet", "raw_samples", table)
    meta = {"samples": table.num_rows, "unique_samples": len(set(ids)), "new_samples": fresh.num_rows,
            "already_ingested": table.num_rows - fresh.num_rows, "rejected": len(got.rejected),
            "source": (source or "(bundled default)") + (" + inbox" if inbox else ""),
            "rejections": [r.message() for r in got.rejected[:50]]}
    log(f"{table.num_rows} samples ({fresh.num_rows} new, {table.num_rows - fresh.num_rows} already ingested), "
        f"{len(got.rejected)} rejected")
    return _finish(ledger, pipeline, "raw_samples", run_id, rows, [], {"raw": art}, meta)


def _known_samples(ledger: Ledger, pipeline: str, ids: list[str]) -> set[str]:
    """Return which of these sample ids the pipeline has ingested before."""
    if not ledger.exists() or not ids:
        return set()
    with ledger.reader() as con:
        if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'samples'").fetchall()[0][0]:
            return set()
        con.register("_ids", pa.table({"sample_id": ids}))
        rows = con.execute("SELECT DISTINCT s.sample_id FROM samples s JOIN _ids USING (sample_id) "
                           "WHERE s.pipeline = ?", [pipeline]).fetchall()
    return {r[0] for r in rows}


def preprocess(ledger: Ledger, pipeline: Pipeline, run_id: str, raw: Handle, log: Log = _noop) -> StageResult:
    """Normalise and split the raw samples; record `preprocessed` (input -> output hash) and `split` events."""
    table = raw.artifacts["raw"].read_parquet(ledger.home.root)
    prep = pipeline.preprocess(table)
    ids = prep.table.column("sample_id").to_pylist()
    events = EventBuffer()
    events.add(ids, "preprocessed", detail=[{"input": d["input"], "output": d["output"], "params": prep.params}
                                            for d in prep.details])
    events.add(ids, "split", detail=[{"split": d["split"], **d.get("about", {})} for d in prep.details])
    art = _write_parquet(ledger, f"{pipeline.name}/preprocessed/{run_id}.parquet", "preprocessed_samples", prep.table)
    counts = {s: 0 for s in ("train", "val", "test")}
    for s in prep.table.column("split").to_pylist():
        counts[s] = counts.get(s, 0) + 1
    log(f"preprocessed {len(ids)} samples: {counts}")
    meta = {"samples": len(ids), **{f"{k}_samples": v for k, v in counts.items()}, "params": prep.params}
    return _finish(ledger, pipeline, "preprocessed_samples", run_id, {"events": events.to_arrow()}, [raw],
                   {"prepared": art}, meta)


def train(ledger: Ledger, pipeline: Pipeline, run_id: str, prepared: Handle, settings: TrainSettings,
          log: Log = _noop) -> StageResult:
    """Train a new model version; record a `batched` event per sample per step (a leaf per step) and a checkpoint per epoch."""
    import torch

    settings.validate()
    table = prepared.artifacts["prepared"].read_parquet(ledger.home.root)
    train_ids, _, _ = pipeline.tensors(table, "train")
    val_ids, _, _ = pipeline.tensors(table, "val")
    if not train_ids:
        raise NothingToTrain("the training split is empty: nothing to train on")
    if not val_ids:
        raise NothingToTrain("the validation split is empty: need validation samples to select checkpoints")
    training_run = run_id
    from ..tracing.tracer import Tracer

    tracer = Tracer(train_ids, training_run)
    checkpoints, arts, history = [], {}, []
    started = time.monotonic()
    for ep in pipeline.train(table, settings, tracer):
        rel = f"artifacts/{pipeline.name}/runs/{training_run}/checkpoints/epoch-{ep.epoch:03d}.pt"

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
    metrics = pipeline.evaluate(final, table)
    if metrics:
        log("test metrics of the final model: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    groups = tracer.groups()
    used = tracer.used_sample_ids()
    training_set = [{"size": len(used), "root": training_set_root(used).hex()}]
    meta = {"epochs": settings.epochs, "steps": tracer.step, "training_set_root": training_set[0]["root"],
            "traced_events": groups.num_members, "event_groups": groups.groups.num_rows,
            "train_samples": len(train_ids), "final_val_loss": checkpoints[-1]["val_loss"],
            "settings": settings.__dict__, "loss_history": history, **metrics}
    meta["loss_curve_md"] = plots.markdown_image(plots.loss_curve(history), "training and validation loss")
    extra = {"checkpoints": checkpoints, "settings": settings.__dict__, "history": history}
    return _finish(ledger, pipeline, "training_checkpoints", run_id, {"checkpoints": checkpoints,
                                                                  "training_sets": training_set},
                   [prepared], arts, meta, training_run=training_run, extra=extra, groups=groups)


def select(ledger: Ledger, pipeline: Pipeline, run_id: str, training: Handle, rule: SelectionRule = DEFAULT_RULE,
           log: Log = _noop) -> StageResult:
    """Choose the checkpoints influence is taken at (FG-Trac's validation-loss rule, final checkpoint kept)."""
    ckpts = training.extra["checkpoints"]
    chosen = rule.select([c["val_loss"] for c in ckpts])
    rank = {i: r + 1 for r, i in enumerate(chosen)}
    rows, best = [], float("inf")
    for i, c in enumerate(ckpts):
        improvement = (best - c["val_loss"]) / best if np.isfinite(best) and best > 0 else 1.0
        best = min(best, c["val_loss"])
        reason = (f"val loss {c['val_loss']:.4f}, relative improvement {improvement:.3f}"
                  + ("; final checkpoint" if i == len(ckpts) - 1 else ""))
        rows.append({"checkpoint_id": c["checkpoint_id"], "selected": i in rank, "rank": rank.get(i), "reason": reason})
    selected = [ckpts[i] for i in chosen]
    log("selected checkpoints: " + ", ".join(f"{c['checkpoint_id']} (val loss {c['val_loss']:.4f}, lr {c['lr']:.4g})"
                                         for c in selected))
    curve = plots.loss_curve(training.extra["history"], [c["epoch"] for c in selected])
    meta = {"selected": [c["checkpoint_id"] for c in selected], "selected_epochs": [c["epoch"] for c in selected],
            "loss_curve_md": plots.markdown_image(curve, "loss per epoch, selected checkpoints circled"),
            "rule": dataclasses.asdict(rule)}
    return _finish(ledger, pipeline, "selected_checkpoints", run_id, {"checkpoint_selections": rows}, [training], {},
                   meta, training_run=training.training_run, extra={"selected": selected})


def gradients(ledger: Ledger, pipeline: Pipeline, run_id: str, prepared: Handle, training: Handle,
              selected: Handle, shard: tuple[int, int] | None = None, log: Log = _noop) -> StageResult:
    """Cache the influence layer's gradient factors (output error, input activation) per selected checkpoint.

    With shard=(i, n) only the training samples of shard i (``shard_of``) are kept, with every
    test sample; the test samples' gradient events are recorded by shard 0 alone.
    """
    import torch

    from .splits import shard_of

    asset = "gradient_cache" if shard is None else "gradient_cache_shards"

    table = prepared.artifacts["prepared"].read_parquet(ledger.home.root)
    model = pipeline.build_model(table)
    layer = pipeline.influence_layer
    parts, recorded, recorded_ids = [], GroupLog(), []
    for c in selected.extra["selected"]:
        path = ArtifactRef(c["path"], c["sha256"]).open_checked(ledger.home.root)
        model.load_state_dict(torch.load(path, weights_only=True))
        for split in ("train", "test"):
            ids, f = pipeline.gradient_factors(model, table, split)
            if not ids:
                continue
            e, a = f.errors.detach().float().numpy(), f.activations.detach().float().numpy()
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
        log(f"gradient factors at {c['checkpoint_id']}")
    cache = pa.concat_tables(parts)
    suffix = "" if shard is None else f"-shard{shard[0]}of{shard[1]}"
    art = _write_parquet(ledger, f"{pipeline.name}/runs/{training.training_run}/gradient_cache{suffix}-{run_id}.parquet",
                         "gradient_cache", cache)
    groups = recorded.build(training.training_run, pa.array(recorded_ids, pa.string()))
    meta = {"layer": layer, "checkpoints": len(selected.extra["selected"]), "rows": cache.num_rows,
            "gradient_events": groups.num_members, **({} if shard is None else {"shard": f"{shard[0]} of {shard[1]}"})}
    return _finish(ledger, pipeline, asset, run_id, {}, [prepared, training, selected], {"gradient_cache": art}, meta,
                   groups=groups, training_run=training.training_run,
                   extra={"prepared": prepared.artifacts["prepared"],
                          **({} if shard is None else {"shard": f"shard{shard[0]}of{shard[1]}"})})


def _score_cache(table: pa.Table, k: int, log: Log) -> tuple[list, list, list, object, object, int]:
    """Return (checkpoint ids, train ids, test ids, top-k or None, self-influence, k) of one gradient cache."""
    from ..attribution.ghost import Factors, self_influence_from_factors, top_k_from_factors

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
            dest.append([Factors(errors=_matrix(sp.column("errors")), activations=_matrix(sp.column("activations")))])
    k = min(k, len(train_ids))
    started = time.monotonic()
    top = top_k_from_factors(train_by, test_by, lrs, k) if test_ids else None
    selfinf = self_influence_from_factors(train_by, lrs)
    log(f"TracInCP over {len(train_ids)} train x {len(test_ids or [])} test at {len(lrs)} checkpoints "
        f"in {time.monotonic() - started:.2f}s")
    return ckpt_ids, train_ids, test_ids or [], top, selfinf, k


def _influence_rows(train_ids: list, test_ids: list, top, selfinf, k: int) -> pa.Table:
    """Return the influence rows: k proponents and opponents per test sample, then every self-influence, ranked."""
    import torch

    ids = np.asarray(train_ids, dtype=object)
    parts = []
    if top is not None:
        n_test = len(test_ids)
        # per test sample, ranks 1..k, each rank's proponent then its opponent (columns built whole, no row loop)
        idx = torch.stack([top.proponent_idx[:, :k], top.opponent_idx[:, :k]], dim=2).reshape(-1).numpy()
        score = torch.stack([top.proponent_score[:, :k], top.opponent_score[:, :k]], dim=2).reshape(-1)
        parts.append({"test_sample_id": np.repeat(np.asarray(test_ids, dtype=object), 2 * k),
                      "train_sample_id": ids[idx], "kind": np.tile(np.array(["proponent", "opponent"]), n_test * k),
                      "rank": np.tile(np.repeat(np.arange(1, k + 1), 2), n_test),
                      "score": score.double().numpy()})
    order = torch.argsort(selfinf, descending=True).numpy()
    parts.append({"test_sample_id": np.full(len(order), None, dtype=object), "train_sample_id": ids[order],
                  "kind": np.full(len(order), "self"), "rank": np.arange(1, len(order) + 1),
                  "score": selfinf[torch.from_numpy(order)].double().numpy()})
    cols = {key: pa.array(np.concatenate([p[key] for p in parts]).tolist(),
                          type={"rank": pa.int64(), "score": pa.float64()}.get(key, pa.string()))
            for key in ("test_sample_id", "train_sample_id", "kind", "rank", "score")}
    return pa.table({**cols, "method": pa.array(["tracincp"] * len(cols["kind"]), pa.string())})


def influence(ledger: Ledger, pipeline: Pipeline, run_id: str, cache: Handle, k: int = 10,
              log: Log = _noop) -> StageResult:
    """Score every test sample against every training sample with TracInCP; keep top-k and self-influence."""
    import torch

    table = cache.artifacts["gradient_cache"].read_parquet(ledger.home.root)
    ckpt_ids, train_ids, test_ids, top, selfinf, k = _score_cache(table, k, log)
    rows = _influence_rows(train_ids, test_ids, top, selfinf, k)
    order = torch.argsort(selfinf, descending=True).tolist()
    art = _write_parquet(ledger, f"{pipeline.name}/runs/{cache.training_run}/influence-{run_id}.parquet",
                         "influence_scores", rows)
    meta = {"method": "TracInCP (last layer, selected checkpoints)", "checkpoints": ckpt_ids, "top_k": k,
            "self_influence_md": plots.markdown_image(
                plots.histogram(selfinf.tolist(), "self-influence of training samples", "TracInCP(z, z)"),
                "distribution of self-influence"),
            "test_samples": len(test_ids or []), "train_samples": len(train_ids), "influence_rows": rows.num_rows,
            "top_self_influence": [(train_ids[i], float(selfinf[i])) for i in order[:10]]}
    if top is not None and "prepared" in cache.extra:
        prepared_table = cache.extra["prepared"].read_parquet(ledger.home.root)
        shown = list(range(min(4, len(test_ids))))
        wanted = {test_ids[j] for j in shown}
        for j in shown:
            wanted |= {train_ids[int(i)] for i in top.proponent_idx[j, :4]} | {train_ids[int(i)] for i in top.opponent_idx[j, :4]}
        pics = pipeline.pictures(prepared_table, sorted(wanted))
        grid = [{"test": pics[test_ids[j]][0], "test_label": pics[test_ids[j]][1],
                 "proponents": [(pics[train_ids[int(i)]][0], f"{pics[train_ids[int(i)]][1]} {float(v):+.3g}")
                                for i, v in zip(top.proponent_idx[j, :4], top.proponent_score[j, :4])],
                 "opponents": [(pics[train_ids[int(i)]][0], f"{pics[train_ids[int(i)]][1]} {float(v):+.3g}")
                               for i, v in zip(top.opponent_idx[j, :4], top.opponent_score[j, :4])]} for j in shown]
        meta["proponents_opponents_md"] = plots.markdown_image(plots.proponents_opponents(grid),
                                                               "test samples with their top proponents and opponents")
        def scored(idx, score, j):
            return [(train_ids[int(i)], float(v)) for i, v in zip(idx[j, :4], score[j, :4])]

        meta["proponents_opponents_table_md"] = tables.proponents_opponents_md(  # who, what and how rated, per pipeline
            pipeline.describe_samples(prepared_table, sorted(wanted)),
            [(test_ids[j], scored(top.proponent_idx, top.proponent_score, j),
              scored(top.opponent_idx, top.opponent_score, j)) for j in shown])
    return _finish(ledger, pipeline, "influence_scores", run_id, {"influence": rows}, [cache],
                   {"influence": art}, meta, training_run=cache.training_run)


def influence_shard(ledger: Ledger, pipeline: Pipeline, run_id: str, cache: Handle, k: int = 10,
                    log: Log = _noop) -> StageResult:
    """Score one shard's training samples against every test sample; keep its top-k as an artifact to combine."""
    table = cache.artifacts["gradient_cache"].read_parquet(ledger.home.root)
    _, train_ids, test_ids, top, selfinf, k_used = _score_cache(table, k, log)
    rows = _influence_rows(train_ids, test_ids, top, selfinf, k_used)
    shard = cache.extra.get("shard", "")
    art = _write_parquet(ledger, f"{pipeline.name}/runs/{cache.training_run}/influence-{shard}-{run_id}.parquet",
                         "influence_shard", rows)
    meta = {"shard": shard, "train_samples": len(train_ids), "test_samples": len(test_ids), "rows": rows.num_rows}
    return _finish(ledger, pipeline, "influence_shards", run_id, {}, [cache], {"influence": art}, meta,
                   training_run=cache.training_run, extra={"shard": shard, "k": k})


def combine_influence(ledger: Ledger, pipeline: Pipeline, run_id: str, shards: list[Handle], k: int = 10,
                      log: Log = _noop) -> StageResult:
    """Merge the shards' top-k into exactly the unsharded top-k and self-influence ranking, and commit it."""
    import pyarrow.compute as pc

    runs = {h.training_run for h in shards}
    if len(runs) != 1:
        raise ValueError(f"influence shards come from {len(runs)} training runs ({sorted(map(str, runs))}): "
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
    art = _write_parquet(ledger, f"{pipeline.name}/runs/{training_run}/influence-combined-{run_id}.parquet",
                         "influence_scores", out)
    meta = {"method": "TracInCP (last layer, selected checkpoints), combined from shards", "shards": len(shards),
            "top_k": k, "train_samples": selfs.num_rows, "influence_rows": out.num_rows}
    log(f"combined {len(shards)} shards: {selfs.num_rows} training samples, {out.num_rows} rows")
    return _finish(ledger, pipeline, "influence_combined", run_id, {"influence": out}, shards, {"influence": art},
                   meta, training_run=training_run)


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
