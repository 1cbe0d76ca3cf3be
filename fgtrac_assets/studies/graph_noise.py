"""Noisy-rating detection by self-influence on the multimodal_graph pipeline (issue #6), as a pure function.

Setup (:func:`noisy_rating_evaluation`):

1. The bundled MovieLens ratings of the first users (``limit`` ratings, whole users),
   ingested and preprocessed by :class:`MovieLensPipeline` itself (time-aware split).
2. ``noise_fraction`` of the training ratings (a seeded random subset) are replaced by
   ``5.5 - rating`` (a 4.5 becomes a 1.0; a 3.0 becomes a 2.5): the noisy ratings.
3. The pipeline's GNN is trained with the pipeline's own loop on the noisy ratings
   (val/test untouched); a checkpoint after every epoch with its lr.
4. Training ratings are ranked by a score, highest first; a method "finds" the noisy
   ratings among the first 5/10/20/30% of the ranking; AUROC against the noisy
   indicator is reported too (random: 0.5).

Scores:

* ``tracincp_<rule>``: TracInCP self-influence sum_c lr_c |grad l(w_c, z)|^2 over the
  checkpoints a rule picks, gradients of the edge decoder's last layer ``decoder.out``
  taken through :class:`~fgtrac_assets.attribution.TracInCP` with a ``forward``
  callable (the model's forward over the training graph; the exact Linear-layer path,
  each rating's loss depends on its own row of ``decoder.out`` only).  Rules: ``all``
  checkpoints; ``fgtrac`` (``attribution.selection.DEFAULT_RULE``, what the pipeline's
  ``selected_checkpoints`` asset uses by default).
* ``grad_dot``: |grad l(w_T, z)|^2 at the final model.
* ``step_exact``: the replay method's self-influence on ``decoder.out``, sum over the steps that used the
  rating of lr_t/|B_t| |grad l(w_t, z)|^2 at each step's own parameters, from the run's recorded trace.
* ``loss``: the final model's squared error on the (noisy) rating.
* ``random``: a seeded random order.
"""

import time

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .mislabel import INSPECTED, against_loss, auroc, detection_curve, detection_plot, found_fraction


def _flip(prepared: pa.Table, noise_fraction: float, seed: int) -> tuple[pa.Table, set[str]]:
    """Return the prepared table with a seeded noise_fraction of training ratings set to 5.5 - rating, and their ids."""
    split = np.asarray(prepared.column("split").to_pylist())
    train_rows = np.flatnonzero(split == "train")
    n_flip = int(round(noise_fraction * len(train_rows)))
    rows = np.sort(np.random.default_rng(seed).choice(train_rows, n_flip, replace=False))
    ratings = prepared.column("rating").to_numpy().copy()
    ratings[rows] = 5.5 - ratings[rows]
    noisy = prepared.set_column(prepared.schema.get_field_index("rating"), "rating", pa.array(ratings, pa.float64()))
    return noisy, set(prepared.column("sample_id").take(pa.array(rows)).to_pylist())


def noisy_rating_evaluation(
    seed: int = 0,
    noise_fraction: float = 0.05,
    limit: int = 6000,
    epochs: int = 8,
    lr: float = 0.01,
    batch_size: int = 256,
    hidden: int = 32,
    plot: bool = True,
) -> dict:
    """Run the noisy-rating detection study on MovieLens; return the table (one row per method) and the run's figures.

    ``table`` rows: ``method``, ``checkpoints`` (epoch indices or None), ``weights``,
    ``found_5`` .. ``found_30`` (fraction of noisy ratings among the first 5..30% of the
    ranking), ``auroc``.  ``plot_png``: noisy ratings found vs fraction inspected (None if
    ``plot`` is False); ``best``: the method with the highest found_10 (then AUROC), random
    excluded.  ``run``: sizes, settings, val losses, lrs, RMSEs, timings.
    """
    import torch

    from ..attribution.selection import DEFAULT_RULE
    from ..attribution.tracin import TracInCP
    from ..pipelines.base import TrainSettings
    from ..pipelines.movielens import MovieLensPipeline
    from ..attribution.step_exact import StepExactTracIn
    from ..attribution.trace import OptimizerSpec, trace_from_events
    from ..tracing.tracer import Tracer

    if not 0 < noise_fraction < 1:
        raise InputError("noise_fraction must lie in (0, 1)")
    t0 = time.perf_counter()
    pipeline = MovieLensPipeline(hidden=hidden)
    prepared = pipeline.preprocess(pipeline.ingest("", limit).table).table
    noisy, noisy_ids = _flip(prepared, noise_fraction, seed)
    # on the CPU wherever it runs: the study's scoring is CPU-only, and its documented numbers are CPU numbers
    settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, schedule="cosine", device="cpu")
    torch.manual_seed(seed)
    initial = {k: v.clone() for k, v in pipeline.build_model(noisy).state_dict().items()}
    ids, pairs, ratings = pipeline.tensors(noisy, "train")
    tracer = Tracer(ids, "noisy-ratings")
    history = list(pipeline.train(noisy, settings, tracer))
    t_train = time.perf_counter()

    flipped = np.array([s in noisy_ids for s in ids])
    model = pipeline.build_model(noisy)
    loss_fn = pipeline.loss_fn()
    per_ckpt = np.stack([
        TracInCP(model, [(h.state_dict, 1.0)], loss_fn, layer=pipeline.influence_layer,
                 forward=lambda m, x: m(x), method="ghost", batch_size=len(ids))
        .self_influence(pairs, ratings).double().numpy()
        for h in history], axis=1)  # (n_train, epochs): |g_c(z)|^2, lr applied below
    t_scores = time.perf_counter()
    # the replay method: self-influence at every recorded step's own parameters, on the influence layer as
    # TracInCP here (the run used Adam; the replay is verified against every epoch's checkpoint)
    trace = trace_from_events(tracer.events(), ids, initial, OptimizerSpec(kind="adam"),
                              {h.step: h.state_dict for h in history})
    step_exact = StepExactTracIn(model, trace, loss_fn, layer=pipeline.influence_layer).self_influence(pairs, ratings).double().numpy()
    t_replay = time.perf_counter()
    model.load_state_dict(history[-1].state_dict)
    with torch.no_grad():
        model.eval()
        final_loss = loss_fn(model(pairs), ratings).double().numpy()
    test_rmse = pipeline.evaluate(model, noisy).get("test_rmse")

    lrs = np.array([h.lr for h in history])
    val_losses = [h.val_loss for h in history]
    fgtrac = DEFAULT_RULE.select(val_losses)
    methods = [("tracincp_all", per_ckpt @ lrs, list(range(len(history))), "lr"),
               ("tracincp_fgtrac", per_ckpt[:, fgtrac] @ lrs[fgtrac], fgtrac, "lr"),
               ("grad_dot", per_ckpt[:, -1].copy(), [len(history) - 1], None),
               ("step_exact", step_exact, None, None),
               ("loss", final_loss, None, None),
               ("random", np.random.default_rng(seed + 1).random(len(ids)), None, None)]
    table, curves = [], {}
    for name, score, idx, weights in methods:
        row = {"method": name, "checkpoints": idx, "weights": weights}
        for p in INSPECTED:
            row[f"found_{int(round(p * 100))}"] = found_fraction(score, flipped, p)
        row["auroc"] = auroc(score, flipped)
        table.append(row)
        curves[name] = detection_curve(score, flipped)
    best = max((r for r in table if r["method"] != "random"), key=lambda r: (r["found_10"], r["auroc"]))["method"]
    change = np.abs(5.5 - 2 * ratings.double().numpy()[flipped])  # |noisy - clean| of each noisy rating
    title = f"Noisy MovieLens ratings ({noise_fraction:.0%} set to 5.5 - rating): self-influence ranking"
    return {
        "table": table,
        "plot_png": detection_plot(curves, noise_fraction, title=title, found="noisy ratings") if plot else None,
        "best": best,
        "against_loss": against_loss(table),
        "run": {"model": f"MovieLensPipeline GNN (hidden {hidden}), influence layer {pipeline.influence_layer}",
                "settings": {"seed": seed, "noise_fraction": noise_fraction, "limit": limit, "epochs": epochs,
                             "lr": lr, "batch_size": batch_size},
                "train_ratings": len(ids), "noisy_ratings": int(flipped.sum()),
                "noisy_change_at_least_2": int((change >= 2).sum()),
                "val_losses": [float(v) for v in val_losses], "lrs": lrs.tolist(), "fgtrac_checkpoints": fgtrac,
                "test_rmse": test_rmse,
                "seconds": {"prepare_and_train": t_train - t0, "self_influence": t_scores - t_train,
                            "step_exact": t_replay - t_scores,
                            "total": time.perf_counter() - t0}},
    }
