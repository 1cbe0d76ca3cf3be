"""The linear datamodeling score (LDS) of every attribution method on one digits run, in two retraining settings.

Setup (:func:`lds_evaluation`):

1. The digits split and CNN of the other studies, trained once with the pipeline's loop and recorded by the
   pipeline's :class:`..tracing.tracer.Tracer`: the reference run, whose trace (initial weights, every step's
   batch and lr, the per-epoch checkpoints) the replay methods use.
2. For each kept fraction in ``fractions`` (0.5, the field's usual choice, and 0.9: a 10% drop, where a
   first-order method can be expected to be accurate), ``subsets`` random training subsets of that fraction
   of the samples (:func:`..attribution.lds.random_subsets`), each retrained (:mod:`.retrain`, all subsets at
   once) in two settings:
   ``fixed_order``: the recorded run with the samples outside the subset weighted 0 (same initial weights, same
   batches and learning rates); ``fresh_seed``: the subset trained as the pipeline trains, from its own seed.
3. Two test outputs of every retrained model on ``n_test`` test samples: ``-loss`` (minus the cross-entropy)
   and ``margin`` (the correct logit minus the log-sum-exp of the others).
4. Every method scores the reference run (positive = proponent); the LDS of a test sample is the Spearman
   correlation over the subsets between the summed scores of the subset and the retrained output, averaged
   over the test samples (NaN-free samples only). For a softmax classifier the margin is a monotone function of
the loss (both depend on the correct logit minus the log-sum-exp of the others), so the two outputs rank the
subsets alike; the methods' scores for them differ where a method differentiates the output itself.
TRAK runs with a projection smaller than the training set (``trak_dim``) because dattri's TRAK solves its
kernel without a ridge and returns noise when the kernel is singular; both TRAKs see the final model only.

The methods see only the reference run; the retrained models are the ground truth. Gradient methods use the
loss gradient for both outputs; the replay methods (``step_exact``, ``metagradient``) are computed for each
output, since they are defined for any differentiable test output, and TRAK is margin-based by design.
"""

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import InputError
from .digits_data import digits_splits, train_cnn

SETTINGS = ("fixed_order", "fresh_seed")
OUTPUTS = ("-loss", "margin")

#: every method the study can run, in table order
METHODS = ("tracincp_all", "tracincp_fgtrac", "tracincp_final", "grad_dot", "grad_cos", "influence_cg", "trak",
           "trak_dattri", "step_exact", "metagradient")


def lds_evaluation(seed: int = 0, n_train: int = 300, n_val: int = 150, n_test: int = 40, epochs: int = 8,
                   lr: float = 0.1, batch_size: int = 16, schedule: str = "cosine", subsets: int = 50,
                   fractions: Sequence[float] = (0.5, 0.9), methods: Sequence[str] = METHODS, settings: Sequence[str] = SETTINGS,
                   trak_dim: int = 64, plot: bool = True) -> dict:
    """Measure every method's LDS on one digits run; return the table, the plot and the winner per setting.

    Returns a dict with ``table`` (one row per method, setting and output: ``method``, ``setting``, ``output``,
    ``fraction`` (of the training set kept), ``lds``, ``lds_sem`` (standard error over the test samples), ``seconds`` (the method's scoring time),
    ``cost_vs_training`` (seconds / the reference run's training seconds)), ``best`` (the winner per setting on
    the ``-loss`` output), ``winners`` ({"setting fraction": {output: method}}), ``plot_png`` and ``run`` (settings,
    accuracies, timings, and how closely the fixed-order retraining with every weight 1 reproduces the run).
    """
    import torch

    from ..attribution.lds import linear_datamodeling_score, random_subsets
    from ..attribution.trace import OptimizerSpec, trace_from_events
    from ..attribution.trak import margin
    from ..pipelines.base import TrainSettings
    from ..pipelines.digits import build_cnn
    from ..pipelines.training import lr_at
    from ..tracing.tracer import Tracer
    from . import retrain

    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise InputError(f"lds_evaluation: unknown method or setting {unknown[0]!r}")
    if subsets < 2 or not fractions or not all(0 < f < 1 for f in fractions):
        raise InputError("lds_evaluation: need subsets >= 2 and every fraction in (0, 1)")
    t0 = time.perf_counter()
    (x_tr, y_tr, ids), (x_va, y_va), (x_te, y_te) = digits_splits(seed, n_train, n_val)
    x_te, y_te = x_te[:n_test], y_te[:n_test]
    train_settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, schedule=schedule)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")

    torch.manual_seed(seed)
    initial = {k: v.clone() for k, v in build_cnn(10).state_dict().items()}
    tracer = Tracer(ids, "lds-reference")
    started = time.perf_counter()
    model, history = train_cnn(x_tr, y_tr, (x_va, y_va), train_settings, seed, recorder=tracer)
    train_seconds = time.perf_counter() - started
    trace = trace_from_events(tracer.events(), ids, initial, OptimizerSpec(),
                              {h.step: h.state_dict for h in history}, "lds-reference")
    model.eval()

    # ground truth: per fraction, the subsets retrained in each setting, and their test outputs
    outputs = {"-loss": lambda out, t: -loss_fn(out, t), "margin": margin}
    masks = {f: random_subsets(n_train, subsets, f, seed) for f in fractions}
    truth, retrain_seconds = {}, {}
    for fraction, setting in ((f, s) for f in fractions for s in settings):
        started = time.perf_counter()
        if setting == "fixed_order":
            stacked = retrain.retrain_fixed_order(model, trace, loss_fn, x_tr, y_tr, masks[fraction])
        else:
            seeds = [seed + 1000 + m for m in range(subsets)]
            inits = []
            for s in seeds:
                torch.manual_seed(s)
                inits.append(build_cnn(10).state_dict())
            rows = torch.stack([torch.nonzero(m)[:, 0] for m in masks[fraction]])
            stacked = retrain.retrain_fresh(model, inits, loss_fn, x_tr, y_tr, rows, seeds, epochs, batch_size,
                                            lambda e: lr_at(train_settings, e))
        truth[fraction, setting] = retrain.model_outputs(model, stacked, x_te, y_te, outputs)
        retrain_seconds[f"{setting} {fraction}"] = time.perf_counter() - started
    replayed = retrain.retrain_fixed_order(model, trace, loss_fn, x_tr, y_tr, torch.ones(1, n_train))
    replay_gap = max(float((p[0] - model.get_parameter(n).detach()).abs().max())
                     for n, p in zip([n for n, _ in model.named_parameters()], replayed))

    # every method's scores of the reference run, per output
    scorers = _scorers(model, history, trace, loss_fn, x_tr, y_tr, x_te, y_te, trak_dim, seed)
    table = []
    for name in methods:
        started = time.perf_counter()
        scores = scorers[name]()
        seconds = time.perf_counter() - started
        for (fraction, setting), outs in truth.items():
            for output in OUTPUTS:
                s = scores[output] if isinstance(scores, dict) else scores
                per_test = linear_datamodeling_score(s, masks[fraction], outs[output]).numpy()
                valid = per_test[~np.isnan(per_test)]
                table.append({"method": name, "setting": setting, "fraction": fraction, "output": output,
                              "lds": float(valid.mean()) if len(valid) else float("nan"),
                              "lds_sem": float(valid.std(ddof=1) / np.sqrt(len(valid))) if len(valid) > 1 else None,
                              "seconds": round(seconds, 3), "cost_vs_training": round(seconds / train_seconds, 3)})
    winners = {f"{setting} {fraction}": {
        output: max((r for r in table if (r["setting"], r["fraction"], r["output"]) == (setting, fraction, output)),
                    key=lambda r: -np.inf if np.isnan(r["lds"]) else r["lds"])["method"] for output in OUTPUTS}
        for fraction, setting in truth}
    with torch.no_grad():
        test_acc = float((model(x_te).argmax(1) == y_te).float().mean())
    return {
        "table": table,
        "best": "; ".join(f"{s}: {w['-loss']}" for s, w in winners.items()),
        "winners": winners,
        "plot_png": lds_plot(table) if plot else None,
        "run": {"settings": {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": int(len(y_te)),
                             "epochs": epochs, "lr": lr, "batch_size": batch_size, "schedule": schedule,
                             "subsets": subsets, "fractions": list(fractions), "trak_dim": trak_dim},
                "steps": len(trace.steps), "test_accuracy": test_acc,
                "training_seconds": round(train_seconds, 3),
                "retraining_seconds": {k: round(v, 3) for k, v in retrain_seconds.items()},
                "fixed_order_replay_max_abs_diff": replay_gap,
                "seconds": round(time.perf_counter() - t0, 2)},
    }


def _scorers(model, history, trace, loss_fn, x_tr, y_tr, x_te, y_te, trak_dim: int, seed: int
             ) -> dict[str, Callable[[], object]]:
    """Return {method: () -> scores (n_train, n_test), or {output: scores} for output-specific methods}."""
    from ..attribution import GradCos, GradDot, InfluenceFunction, TracInCP
    from ..attribution.metagradient import Metagradient
    from ..attribution.selection import DEFAULT_RULE
    from ..attribution.step_exact import StepExactTracIn
    from ..attribution.trak import margin

    final = history[-1].state_dict
    checkpoints = [(h.state_dict, h.lr) for h in history]
    chosen = DEFAULT_RULE.select([h.val_loss for h in history])

    def tracin(cks):
        return lambda: TracInCP(model, cks, loss_fn).influence(x_tr, y_tr, x_te, y_te)

    def trak():
        from ..attribution.trak import TRAK

        return TRAK(model, [final], projection_dim=trak_dim, seed=seed).influence(x_tr, y_tr, x_te, y_te)

    def trak_dattri():
        from .peers import dattri_trak_scores

        return dattri_trak_scores(model, [final], x_tr, y_tr, x_te, y_te, projection_dim=trak_dim, seed=seed)

    def replayed(cls):
        def run():
            return {"-loss": cls(model, trace, loss_fn).influence(x_tr, y_tr, x_te, y_te),
                    "margin": cls(model, trace, loss_fn, output=margin).influence(x_tr, y_tr, x_te, y_te)}
        return run

    return {
        "tracincp_all": tracin(checkpoints),
        "tracincp_fgtrac": tracin([checkpoints[i] for i in chosen]),
        "tracincp_final": tracin(checkpoints[-1:]),
        "grad_dot": lambda: GradDot(model, loss_fn, state_dict=final).influence(x_tr, y_tr, x_te, y_te),
        "grad_cos": lambda: GradCos(model, loss_fn, state_dict=final).influence(x_tr, y_tr, x_te, y_te),
        "influence_cg": lambda: InfluenceFunction(model, loss_fn, x_tr, y_tr, state_dict=final, method="cg",
                                                  damping=1e-2).influence(x_tr, y_tr, x_te, y_te),
        "trak": trak,
        "trak_dattri": trak_dattri,
        "step_exact": replayed(StepExactTracIn),
        "metagradient": replayed(Metagradient),
    }


def lds_plot(table: Sequence[dict]) -> bytes:
    """Return a PNG: LDS per method, one bar group per setting and output."""
    from ..report.plots import _figure, _png

    groups = sorted({(r["setting"], r["fraction"], r["output"]) for r in table})
    methods = list(dict.fromkeys(r["method"] for r in table))
    fig, ax = _figure(8.0, 4.2)
    width = 0.8 / max(len(groups), 1)
    for g, (setting, fraction, output) in enumerate(groups):
        values = {r["method"]: r["lds"] for r in table
                  if (r["setting"], r["fraction"], r["output"]) == (setting, fraction, output)}
        xs = np.arange(len(methods)) + g * width
        ax.bar(xs, [values.get(m, np.nan) for m in methods], width, label=f"{setting}, {fraction:g} kept, {output}")
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
    ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=7)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("linear datamodeling score (Spearman)")
    ax.set_title("LDS per method: retraining on random halves of the training set")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def table_markdown(table: Sequence[dict]) -> str:
    """Return the table as markdown: one row per method, one column per setting and output."""
    groups = list(dict.fromkeys((r["setting"], r["fraction"], r["output"]) for r in table))
    head = "| method | " + " | ".join(f"{s} {f:g} {o}" for s, f, o in groups) + " | seconds | cost / training |\n"
    head += "|---" * (len(groups) + 3) + "|\n"
    lines = []
    for method in dict.fromkeys(r["method"] for r in table):
        rows = {(r["setting"], r["fraction"], r["output"]): r for r in table if r["method"] == method}
        first = next(iter(rows.values()))
        cells = [f"{rows[g]['lds']:.3f}" if g in rows else "-" for g in groups]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {first['seconds']:.2f} | "
                     f"{first['cost_vs_training']:.2f}x |")
    return head + "\n".join(lines)
