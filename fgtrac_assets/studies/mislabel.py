"""Mislabelled-data detection by self-influence on digits (the TracIn paper, section 4.1), as a pure function.

Setup (:func:`mislabel_evaluation`):

1. scikit-learn's bundled digits (1,797 8x8 images), a seeded split into ``n_train``
   training, ``n_val`` validation and the rest test samples, pixels scaled to [0, 1]
   and standardised with the training mean/std (as the digits pipeline does).
2. The digits pipeline's CNN (``build_cnn(10)``) trained with the pipeline's own loop
   (``train_supervised``, plain SGD, per-epoch lr from ``lr_at``, run without records
   through a :class:`NullRecorder`) on the clean labels.
3. ``flip_fraction`` of the training samples (a seeded random subset) get the label the
   clean model scores highest among the incorrect classes.
4. The same CNN is retrained from scratch (same seed) on the noisy labels; a checkpoint
   is kept after every epoch with its validation loss (clean validation labels) and the
   lr applied during that epoch (TracIn's step size between checkpoints).
5. Training samples are ranked by a score, highest first; a method "finds" the flipped
   samples among the first 5, 10, 20, 30% of the ranking; AUROC of the score against
   the flipped indicator is reported too.

Scores:

* ``tracincp_<rule>``: TracInCP self-influence sum_c lr_c |grad l(w_c, z)|^2 over the
  checkpoints a rule picks, using gradients of the last layer ``fc`` (weight and bias)
  via the exact Linear-layer path (``TracInCP`` -> ``linear_factors``).  Last layer
  because it is what FG-Trac scores in production (``influence_layer``), it costs one
  forward and backward pass per checkpoint, and on this model adding the hidden Linear
  layer did not find more flipped labels (set ``layers=None`` for all parameters through
  per-sample gradients, conv included).
  Rules: ``all`` checkpoints; ``even3`` (the end of each third of training, like the
  paper's "every 30th checkpoint starting from the 30th"); ``fgtrac``
  (``attribution.selection.DEFAULT_RULE``, what the ``selected_checkpoints`` asset uses:
  val-loss improvement over the second half of training, 3 slots, final kept);
  ``valdrop3`` (the same rule over all of training and without the final-checkpoint
  guard, i.e. the 3 largest validation-loss improvements only).  With ``guards=True``
  candidate guards are added (see ``GUARD_RULES``), each using at most 3 checkpoints.
* ``grad_dot``: |grad l(w_T, z)|^2 at the final model (Grad-Dot self-influence).
* ``step_exact``: the replay method's self-influence, sum over the steps that used z of lr_t/|B_t| |grad
  l(w_t, z)|^2 at each step's own parameters (all parameters), from the run's recorded trace.
* ``trak``: TRAK's self-influence on the final model (all parameters, ``trak_dim`` projection).
* ``loss``: the final model's training loss on the (noisy) label.
* ``random``: a seeded random order (expected found fraction = inspected fraction).

Also returned: ``ceiling``, the best 3-checkpoint subset chosen *with* the flip labels
(an oracle, not a method) under lr and equal weights: an upper bound for any
3-checkpoint selection rule on this run.
"""

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import InputError
from .digits_data import digits_splits, train_cnn

INSPECTED = (0.05, 0.10, 0.20, 0.30)


# ----------------------------------------------------------------- checkpoint rules


def _even3(val_losses: Sequence[float]) -> list[int]:
    n = len(val_losses)
    return sorted({max(0, (k + 1) * n // 3 - 1) for k in range(3)})


def _fgtrac(val_losses: Sequence[float]) -> list[int]:
    """FG-Trac's rule with the defaults the ``selected_checkpoints`` asset uses."""
    from ..attribution.selection import DEFAULT_RULE

    return DEFAULT_RULE.select(list(val_losses))


def _valdrop3(val_losses: Sequence[float]) -> list[int]:
    """The 3 largest validation-loss improvements over all of training (the rule without its guards)."""
    from ..attribution.selection import DEFAULT_RULE

    return dataclasses.replace(DEFAULT_RULE, always_keep_last=False, consider_from=0.0).select(list(val_losses))


def _last3(val_losses: Sequence[float]) -> list[int]:
    n = len(val_losses)
    return list(range(max(0, n - 3), n))


def _fgtrac_whole(val_losses: Sequence[float]) -> list[int]:
    """FG-Trac's rule applied to all of training (``consider_from=0``, the final checkpoint kept)."""
    from ..attribution.selection import DEFAULT_RULE

    return dataclasses.replace(DEFAULT_RULE, consider_from=0.0).select(list(val_losses))


def _final(val_losses: Sequence[float]) -> list[int]:
    return [len(val_losses) - 1]


Rule = Callable[[Sequence[float]], list[int]]

#: (name, rule, weighting) of the checkpoint rules always evaluated.
BASE_RULES: list[tuple[str, Rule | None, str]] = [
    ("tracincp_all", None, "lr"),
    ("tracincp_even3", _even3, "lr"),
    ("tracincp_fgtrac", _fgtrac, "lr"),
    ("tracincp_valdrop3", _valdrop3, "lr"),
]

#: candidate guards for FG-Trac's rule (guards=True), each with at most 3 checkpoints.
GUARD_RULES: list[tuple[str, Rule, str]] = [
    ("guard_fgtrac_equal_weights", _fgtrac, "equal"),  # FG-Trac's selection, checkpoints weighted equally
    ("guard_fgtrac_whole_training", _fgtrac_whole, "lr"),  # FG-Trac's rule over all of training, not the second half
    ("guard_last3", _last3, "lr"),  # the final three checkpoints
    ("guard_final_only", _final, "lr"),  # the final checkpoint alone (TracInCP with one checkpoint)
]


# ---------------------------------------------------------------------- metrics


def found_fraction(scores: np.ndarray, flipped: np.ndarray, inspected: float) -> float:
    """Fraction of flipped samples among the first round(inspected * n) samples by decreasing score (stable ties)."""
    n = len(scores)
    k = int(round(inspected * n))
    top = np.argsort(-scores, kind="stable")[:k]
    total = int(flipped.sum())
    return float(flipped[top].sum()) / total if total else float("nan")


def detection_curve(scores: np.ndarray, flipped: np.ndarray) -> tuple[list[float], list[float]]:
    """Return (fraction inspected, fraction of flipped found) after each sample of the ranking, starting at (0, 0)."""
    order = np.argsort(-scores, kind="stable")
    hits = np.concatenate([[0], np.cumsum(flipped[order])])
    n, total = len(scores), max(int(flipped.sum()), 1)
    return (np.arange(n + 1) / n).tolist(), (hits / total).tolist()


def auroc(scores: np.ndarray, flipped: np.ndarray) -> float:
    """Area under the ROC curve of scores for the flipped indicator (ties count half)."""
    pos, neg = int(flipped.sum()), int((~flipped).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[flipped].sum() - pos * (pos + 1) / 2) / (pos * neg))


# ------------------------------------------------------------------------ main


def mislabel_evaluation(
    seed: int = 0,
    flip_fraction: float = 0.10,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 16,
    schedule: str = "cosine",
    n_train: int = 1000,
    n_val: int = 300,
    layers: Sequence[str] | None = ("fc",),
    guards: bool = True,
    ceiling: bool = True,
    plot: bool = True,
    trak_dim: int = 256,
) -> dict:
    """Run the TracIn paper's mislabelled-data evaluation on digits; return table, curves, plot and the best method.

    Returns a dict with

    * ``table``: one row per method: ``method``, ``checkpoints`` (epoch indices used, or
      None), ``weights`` ("lr", "equal" or None), ``found_5``, ``found_10``, ``found_20``,
      ``found_30`` (fraction of flipped labels in the first 5/10/20/30% of the ranking),
      ``auroc`` and ``meets_target`` (at most 3 checkpoints and found_10 >= 0.9; None for
      non-TracInCP methods);
    * ``curves``: {method: (fractions inspected, fractions found)};
    * ``plot_png``: PNG bytes (found vs inspected, one line per method; None if ``plot`` is False);
    * ``best``: the method with the highest found_10 (then AUROC), random excluded;
    * ``against_loss``: the strongest attribution method (neither loss nor random) against the training-loss
      baseline at 10% inspected, and whether it finds at least 0.03 more of the flipped labels;
    * ``run``: the run's figures (accuracies, val losses and lrs per epoch, flipped count,
      how many flipped samples the noisy model fits, timings, settings);
    * ``ceiling`` (if asked): best 3-checkpoint subsets chosen with the flip labels.
    """
    import torch

    from ..attribution.step_exact import StepExactTracIn
    from ..attribution.trace import OptimizerSpec, trace_from_events
    from ..attribution.tracin import TracInCP
    from ..attribution.trak import TRAK
    from ..pipelines.base import TrainSettings
    from ..pipelines.digits import build_cnn
    from ..tracing.tracer import Tracer

    if not 0 < flip_fraction < 1:
        raise InputError("flip_fraction must lie in (0, 1)")
    t0 = time.perf_counter()
    (x_tr, y_tr, ids), (x_va, y_va), (x_te, y_te) = digits_splits(seed, n_train, n_val)
    settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, schedule=schedule)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")

    # 1. clean model -> 2. flip to the highest-scoring incorrect class
    clean, _ = train_cnn(x_tr, y_tr, (x_va, y_va), settings, seed)
    with torch.no_grad():
        clean.eval()
        logits = clean(x_tr)
        clean_test_acc = float((clean(x_te).argmax(1) == y_te).float().mean())
    n_flip = int(round(flip_fraction * n_train))
    rng = np.random.default_rng(seed + 1)
    flip_rows = np.sort(rng.choice(n_train, n_flip, replace=False))
    wrong = logits.clone()
    wrong[torch.arange(n_train), y_tr] = -math.inf
    noisy = y_tr.clone()
    noisy[flip_rows] = wrong.argmax(1)[flip_rows]
    flipped = np.zeros(n_train, dtype=bool)
    flipped[flip_rows] = True
    t_clean = time.perf_counter()

    # 3. retrain from scratch on the noisy labels, one checkpoint per epoch, recorded as the pipeline records
    torch.manual_seed(seed)
    initial = {k: v.clone() for k, v in build_cnn(10).state_dict().items()}
    tracer = Tracer(ids, "mislabel-noisy")
    model, history = train_cnn(x_tr, noisy, (x_va, y_va), settings, seed, recorder=tracer)
    val_losses = [h.val_loss for h in history]
    lrs = np.array([h.lr for h in history], dtype=np.float64)
    with torch.no_grad():
        model.eval()
        out = model(x_tr)
        final_loss = loss_fn(out, noisy).numpy().astype(np.float64)
        fitted = (out.argmax(1) == noisy).numpy()
        noisy_test_acc = float((model(x_te).argmax(1) == y_te).float().mean())
    t_noisy = time.perf_counter()

    # 4. per-checkpoint self-influence |g_c(z)|^2 (lr applied per rule below)
    layer = None if layers is None else list(layers)
    per_ckpt = np.stack(
        [
            TracInCP(model, [(h.state_dict, 1.0)], loss_fn, layer=layer).self_influence(x_tr, noisy).double().numpy()
            for h in history
        ],
        axis=1,
    )  # (n_train, epochs)
    t_scores = time.perf_counter()

    methods: list[tuple[str, np.ndarray, list[int] | None, str | None]] = []
    all_idx = list(range(len(history)))
    for name, rule, weighting in BASE_RULES + (GUARD_RULES if guards else []):
        idx = all_idx if rule is None else list(rule(val_losses))
        w = lrs[idx] if weighting == "lr" else np.ones(len(idx))
        methods.append((name, per_ckpt[:, idx] @ w, idx, weighting))
    methods.append(("grad_dot", per_ckpt[:, -1].copy(), [all_idx[-1]], None))
    # the replay method and TRAK: self-influence at every step's own parameters, and TRAK's on the final model
    trace = trace_from_events(tracer.events(), ids, initial, OptimizerSpec(), {h.step: h.state_dict for h in history})
    t_replay = time.perf_counter()
    methods.append(("step_exact", StepExactTracIn(model, trace, loss_fn).self_influence(x_tr, noisy).double().numpy(),
                    None, None))
    t_trak = time.perf_counter()
    methods.append(("trak", TRAK(model, [history[-1].state_dict], projection_dim=trak_dim, seed=seed)
                    .self_influence(x_tr, noisy).double().numpy(), [all_idx[-1]], None))
    t_done = time.perf_counter()
    methods.append(("loss", final_loss, None, None))
    methods.append(("random", np.random.default_rng(seed + 2).random(n_train), None, None))

    table, curves = [], {}
    for name, score, idx, weighting in methods:
        row = {"method": name, "checkpoints": idx, "weights": weighting}
        for p in INSPECTED:
            row[f"found_{int(round(p * 100))}"] = found_fraction(score, flipped, p)
        row["auroc"] = auroc(score, flipped)
        tracin_rule = name.startswith(("tracincp", "guard"))
        row["meets_target"] = (len(idx) <= 3 and row["found_10"] >= 0.9) if tracin_rule else None
        table.append(row)
        curves[name] = detection_curve(score, flipped)
    ranked = [r for r in table if r["method"] != "random"]
    best = max(ranked, key=lambda r: (r["found_10"], r["auroc"]))["method"]

    result = {
        "table": table,
        "curves": curves,
        "plot_png": detection_plot(curves, flip_fraction) if plot else None,
        "best": best,
        "against_loss": against_loss(table),
        "run": {
            "model": "digits CNN (build_cnn(10))",
            "layers": "all parameters" if layer is None else layer,
            "settings": {"seed": seed, "flip_fraction": flip_fraction, "epochs": epochs, "lr": lr,
                         "batch_size": batch_size, "schedule": schedule, "n_train": n_train, "n_val": n_val,
                         "n_test": int(len(y_te))},
            "flipped": n_flip,
            "flipped_rows": flip_rows.tolist(), "flipped_sample_ids": [ids[i] for i in flip_rows],
            "flipped_fitted_by_noisy_model": float(fitted[flipped].mean()),
            "clean_train_samples_misfit": float((~fitted[~flipped]).mean()),
            "clean_model_test_accuracy": clean_test_acc,
            "noisy_model_test_accuracy": noisy_test_acc,
            "val_losses": [float(v) for v in val_losses],
            "lrs": lrs.tolist(),
            "seconds": {"clean_training": t_clean - t0, "noisy_training": t_noisy - t_clean,
                        "self_influence": t_scores - t_noisy, "step_exact": t_trak - t_replay,
                        "trak": t_done - t_trak, "total": time.perf_counter() - t0},
        },
    }
    if ceiling:
        result["ceiling"] = _ceiling(per_ckpt, lrs, flipped)
    return result


def against_loss(table: Sequence[dict], margin: float = 0.03) -> dict:
    """Return the strongest attribution method (not loss, not random) at 10% inspected against the loss baseline."""
    strongest = max((r for r in table if r["method"] not in ("loss", "random")),
                    key=lambda r: (r["found_10"], r["auroc"]))
    loss = next(r for r in table if r["method"] == "loss")["found_10"]
    return {"best_attribution": strongest["method"], "found_10": strongest["found_10"], "loss_found_10": loss,
            "ahead_of_loss": round(strongest["found_10"] - loss, 4),
            "meets_loss_plus_0_03": strongest["found_10"] >= loss + margin}


def _ceiling(per_ckpt: np.ndarray, lrs: np.ndarray, flipped: np.ndarray, size: int = 3) -> dict:
    """Best ``size``-checkpoint subsets by found_10, chosen with the flip labels (an oracle bound, not a method)."""
    n_ck = per_ckpt.shape[1]
    out = {}
    for weighting in ("lr", "equal"):
        best = (-1.0, [])
        for sub in itertools.combinations(range(n_ck), min(size, n_ck)):
            idx = list(sub)
            w = lrs[idx] if weighting == "lr" else np.ones(len(idx))
            f = found_fraction(per_ckpt[:, idx] @ w, flipped, 0.10)
            if f > best[0]:
                best = (f, idx)
        out[weighting] = {"checkpoints": best[1], "found_10": best[0]}
    return out


def detection_plot(curves: dict, flip_fraction: float = 0.10, max_inspected: float = 0.4,
                   title: str | None = None, found: str = "flipped labels") -> bytes:
    """Return a PNG in the style of the TracIn paper's Figure 1: flipped labels (or ``found``) found vs fraction inspected."""
    from ..report.plots import _figure, _png

    fig, ax = _figure(7.0, 4.2)
    styles = {"random": dict(color="grey", ls=":"), "loss": dict(ls="--"), "grad_dot": dict(ls="-.")}
    for name, (xs, ys) in curves.items():
        xs, ys = np.asarray(xs), np.asarray(ys)
        keep = xs <= max_inspected + 1e-9
        kw = styles.get(name, {"ls": "-" if name.startswith("tracincp") else (0, (5, 1))})
        ax.plot(xs[keep], ys[keep], lw=1.4, label=name, **kw)
    grid = np.linspace(0, max_inspected, 200)
    ax.plot(grid, np.minimum(1.0, grid / flip_fraction), color="black", lw=0.8, alpha=0.4, label="perfect")
    for p in INSPECTED:
        ax.axvline(p, color="black", lw=0.4, alpha=0.2)
    ax.set_xlim(0, max_inspected)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of training data inspected (by decreasing score)")
    ax.set_ylabel(f"fraction of {found} found")
    ax.set_title(title or f"Mislabelled digits ({flip_fraction:.0%} flipped): self-influence ranking")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    return _png(fig)


def table_markdown(table: Sequence[dict]) -> str:
    """Return the table as markdown (for asset metadata or reports)."""
    head = "| method | checkpoints | weights | 5% | 10% | 20% | 30% | AUROC |\n|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in table:
        ck = "-" if r["checkpoints"] is None else (
            f"all {len(r['checkpoints'])}" if len(r["checkpoints"]) > 3 else ",".join(map(str, r["checkpoints"])))
        lines.append(f"| {r['method']} | {ck} | {r['weights'] or '-'} | {r['found_5']:.2f} | {r['found_10']:.2f} | "
                     f"{r['found_20']:.2f} | {r['found_30']:.2f} | {r['auroc']:.3f} |")
    return head + "\n".join(lines)
