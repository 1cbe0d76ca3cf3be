"""Final-model-only attribution vs the further-training gold standard on digits (Wei et al. 2024, Fig. 2).

Setup (:func:`final_model_evaluation`):

1. scikit-learn's bundled digits split and standardised as in :mod:`.digits_data`; the
   digits pipeline's CNN (``build_cnn(10)``) trained by the pipeline's traced SGD loop,
   one checkpoint per epoch (kept for TracInCP).
2. ``n_probes`` training samples (seeded) are scored against the first ``n_test`` test
   samples by each method, all from the final model except TracInCP:
   ``grad_dot``, ``grad_cos``, ``if_explicit``, ``if_cg``, ``if_lissa`` (Hessian of the full
   mean training loss, ``damping`` added) over the parameters of ``layer``, and
   ``tracincp`` (every epoch checkpoint, lr-weighted) / ``tracincp_fgtrac`` (FG-Trac's
   checkpoint selection, ``attribution.selection.DEFAULT_RULE`` as the ``selected_checkpoints``
   asset applies it) over the same layer.
3. The gold standard: :class:`.FurtherTraining` of ALL parameters from the final model
   with SGD (``further_lr``, ``further_batch_size``), with and without each probe, the
   test-loss difference averaged over ``further_seeds`` seeds and recorded after each
   count in ``further_steps``.
4. Per test sample, the cosine similarity and the Spearman rank correlation between a
   method's scores over the probes and the gold standard's; averaged over test samples.
   The winner is the method with the highest Spearman correlation averaged over the
   amounts of further training (then cosine).  The gold standard's own split-half
   agreement (half the seeds against the other half) is reported as a noise ceiling.

All scores share one sign: positive = the training sample lowers the test loss.
"""

import time
from collections.abc import Sequence

import numpy as np

METHODS = ("grad_dot", "grad_cos", "if_explicit", "if_cg", "if_lissa", "tracincp", "tracincp_fgtrac")


# ---------------------------------------------------------------------- metrics


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    return _cosine_rows(ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True))


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def agreement(scores: np.ndarray, gold: np.ndarray) -> dict:
    """Return mean cosine and Spearman over test samples between two (n_probes, n_test) score matrices."""
    cos = _cosine_rows(scores.T, gold.T)
    rho = _spearman_rows(scores.T, gold.T)
    return {"cosine": float(np.nanmean(cos)), "spearman": float(np.nanmean(rho))}


# ------------------------------------------------------------------------ main


def final_model_evaluation(
    seed: int = 0,
    n_train: int = 500,
    n_val: int = 200,
    n_test: int = 32,
    n_probes: int = 32,
    epochs: int = 12,
    lr: float = 0.1,
    batch_size: int = 32,
    schedule: str = "cosine",
    layer: str | None = "fc",
    damping: float = 0.01,
    cg_max_iter: int = 200,
    lissa_depth: int = 3000,
    further_lr: float = 0.01,
    further_batch_size: int | None = 32,
    further_steps: Sequence[int] = (10, 50, 200),
    further_seeds: int = 4,
    plot: bool = True,
    threads: int | None = 1,
) -> dict:
    """Compare final-model-only methods and TracInCP with further training on digits; return table, plot and winner.

    Returns a dict with ``table`` (one row per method and step count: ``method``,
    ``steps``, ``cosine``, ``spearman``), ``markdown``, ``plot_png`` (PNG bytes or None),
    ``best`` (the winner), ``seconds`` (per stage and method), ``settings``, ``cost`` (the gold
    standard's :meth:`.FurtherTraining.cost`) and ``solvers`` (the influence-function
    reports: damping, iterations, residuals).  ``threads`` sets torch's intra-op threads
    for the run (restored afterwards; None leaves them): these models are small, so on a
    busy 2-core machine one thread is faster than two.
    """
    import torch

    settings = dict(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, n_probes=n_probes, epochs=epochs, lr=lr,
                    batch_size=batch_size, schedule=schedule, layer=layer, damping=damping, cg_max_iter=cg_max_iter,
                    lissa_depth=lissa_depth, further_lr=further_lr, further_batch_size=further_batch_size,
                    further_steps=list(further_steps), further_seeds=further_seeds)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        result = _evaluate(plot=plot, **settings)
    finally:
        torch.set_num_threads(previous)
    result["settings"] = dict(settings, threads=threads)
    return result


def _evaluate(seed, n_train, n_val, n_test, n_probes, epochs, lr, batch_size, schedule, layer, damping, cg_max_iter,
              lissa_depth, further_lr, further_batch_size, further_steps, further_seeds, plot) -> dict:
    """Run the comparison with the given settings (see :func:`final_model_evaluation`)."""
    import torch

    from ..attribution import FurtherTraining, GradCos, GradDot, InfluenceFunction, TracInCP
    from ..attribution.selection import DEFAULT_RULE
    from ..pipelines.base import TrainSettings
    from .digits_data import digits_splits, train_cnn

    t0 = time.perf_counter()
    (x_tr, y_tr, _ids), (x_va, y_va), (x_te, y_te) = digits_splits(seed, n_train, n_val)
    x_te, y_te = x_te[:n_test], y_te[:n_test]
    train_settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, schedule=schedule)
    model, history = train_cnn(x_tr, y_tr, (x_va, y_va), train_settings, seed)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    with torch.no_grad():
        model.eval()
        test_acc = float((model(x_te).argmax(1) == y_te).float().mean())
    probes = np.sort(np.random.default_rng(seed + 3).choice(n_train, n_probes, replace=False)).tolist()
    xp, yp = x_tr[probes], y_tr[probes]
    seconds = {"training": time.perf_counter() - t0}

    common = dict(layer=layer, damping=damping, hvp_batch_size=n_train)
    ckpts = [(h.state_dict, h.lr) for h in history]
    chosen = DEFAULT_RULE.select([h.val_loss for h in history])
    attributors = {
        "grad_dot": GradDot(model, loss_fn, layer=layer),
        "grad_cos": GradCos(model, loss_fn, layer=layer),
        "if_explicit": InfluenceFunction(model, loss_fn, x_tr, y_tr, method="explicit", **common),
        "if_cg": InfluenceFunction(model, loss_fn, x_tr, y_tr, method="cg", max_iter=cg_max_iter, **common),
        "if_lissa": InfluenceFunction(model, loss_fn, x_tr, y_tr, method="lissa", depth=lissa_depth, tol=1e-2,
                                      **common),
        "tracincp": TracInCP(model, ckpts, loss_fn, layer=layer),
        "tracincp_fgtrac": TracInCP(model, [ckpts[i] for i in chosen], loss_fn, layer=layer),
    }
    scores = {}
    for name, method in attributors.items():
        t = time.perf_counter()
        scores[name] = method.influence(xp, yp, x_te, y_te).double().numpy()
        seconds[name] = time.perf_counter() - t

    gold_method = FurtherTraining(model, loss_fn, layer=None, probes=probes, lr=further_lr,
                                  batch_size=further_batch_size, steps=further_steps, seeds=range(further_seeds))
    cost = gold_method.cost()
    t = time.perf_counter()
    gold = gold_method.run(x_tr, y_tr, x_te, y_te)
    seconds["further_training"] = time.perf_counter() - t

    table = []
    for name in attributors:
        for s, steps in enumerate(gold["steps"]):
            table.append({"method": name, "steps": steps, **agreement(scores[name], gold["loss"][s].numpy())})
    reliability = None
    if further_seeds >= 2:  # split-half agreement of the gold standard with itself: a noise ceiling
        per_seed = gold["loss_per_seed"].numpy()
        half = further_seeds // 2
        reliability = [{"steps": steps, **agreement(per_seed[:half, s].mean(0), per_seed[half:, s].mean(0))}
                       for s, steps in enumerate(gold["steps"])]
    mean = {name: (np.mean([r["spearman"] for r in table if r["method"] == name]),
                   np.mean([r["cosine"] for r in table if r["method"] == name])) for name in attributors}
    winner = max(mean, key=lambda n: (np.nan_to_num(mean[n][0], nan=-2), np.nan_to_num(mean[n][1], nan=-2)))
    seconds["total"] = time.perf_counter() - t0
    solvers = {name: attributors[name].report() for name in ("if_explicit", "if_cg", "if_lissa")}
    return {
        "table": table,
        "markdown": table_markdown(table, reliability),
        "plot_png": agreement_plot(table, reliability) if plot else None,
        "gold_reliability": reliability,
        "best": winner,
        "seconds": seconds,
        "cost": cost,
        "solvers": solvers,
        "run": {"model": "digits CNN (build_cnn(10))", "test_accuracy": test_acc, "probes": probes,
                "tracincp_checkpoints": list(range(len(history))), "tracincp_fgtrac_checkpoints": list(chosen),
                "val_losses": [float(h.val_loss) for h in history], "lrs": [float(h.lr) for h in history]},
    }


def table_markdown(table: Sequence[dict], reliability: Sequence[dict] | None = None) -> str:
    """Return the table as markdown: one row per method, cosine and Spearman per amount of further training."""
    steps = sorted({r["steps"] for r in table})
    methods = list(dict.fromkeys(r["method"] for r in table))
    cell = {(r["method"], r["steps"]): r for r in table}
    head = ("| method | " + " | ".join(f"cos @{s}" for s in steps) + " | " + " | ".join(f"rho @{s}" for s in steps)
            + " |\n|---|" + "---|" * (2 * len(steps)) + "\n")
    lines = []
    for m in methods:
        cos = " | ".join(f"{cell[m, s]['cosine']:.3f}" for s in steps)
        rho = " | ".join(f"{cell[m, s]['spearman']:.3f}" for s in steps)
        lines.append(f"| {m} | {cos} | {rho} |")
    if reliability:
        rel = {r["steps"]: r for r in reliability}
        cos = " | ".join(f"{rel[s]['cosine']:.3f}" for s in steps)
        rho = " | ".join(f"{rel[s]['spearman']:.3f}" for s in steps)
        lines.append(f"| *gold standard, split-half seeds* | {cos} | {rho} |")
    return head + "\n".join(lines)


def agreement_plot(table: Sequence[dict], reliability: Sequence[dict] | None = None) -> bytes:
    """Return a PNG in the style of Wei et al.'s Figure 2: agreement with further training vs its amount."""
    from ..report.plots import _figure, _png

    fig, axes = _figure(9.0, 3.6)
    fig.clf()
    axes = fig.subplots(1, 2)
    methods = list(dict.fromkeys(r["method"] for r in table))
    panels = ((axes[0], "cosine", "cosine similarity"), (axes[1], "spearman", "Spearman rank correlation"))
    for ax, key, label in panels:
        for m in methods:
            rows = sorted((r for r in table if r["method"] == m), key=lambda r: r["steps"])
            ls = "--" if m.startswith("tracincp") else ("-." if m.startswith("if_") else "-")
            ax.plot([r["steps"] for r in rows], [r[key] for r in rows], marker="o", ms=3, lw=1.3, ls=ls, label=m)
        if reliability:
            ax.plot([r["steps"] for r in reliability], [r[key] for r in reliability], color="grey", ls=":", lw=1.2,
                    label="gold split-half")
        ax.set_xscale("log")
        ax.set_xlabel("further-training steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("Agreement with further training (mean over test samples)", fontsize=9)
    axes[1].legend(fontsize=7, loc="best")
    return _png(fig)
