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
``metagradient_centered`` is the metagradient taken at every weight equal to the kept fraction (the mean of
the random subsets' weight vectors) instead of at the recorded run's weights 1: one set of scores per fraction.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .digits_data import digits_splits, train_cnn

SETTINGS = ("fixed_order", "fresh_seed")
OUTPUTS = ("-loss", "margin")

#: every method the digits study can run, in table order
METHODS = ("tracincp_all", "tracincp_fgtrac", "tracincp_final", "grad_dot", "grad_cos", "influence_cg", "trak",
           "trak_dattri", "step_exact", "metagradient", "metagradient_centered")

#: the graph study's methods (a regression: no margin, so no TRAK; the decoder's last layer for TracInCP)
GRAPH_METHODS = ("tracincp_all", "tracincp_fgtrac", "grad_dot", "step_exact", "metagradient", "metagradient_centered")


@dataclass(frozen=True)
class PerFraction:
    """A method whose scores depend on the fraction of the training set kept: ``scores(fraction)``."""

    scores: Callable[[float], object]


@dataclass
class ReferenceRun:
    """A recorded run to measure methods on: the model, its epochs, its trace, its data and how to retrain it fresh.

    ``fresh(subsets (M, size) rows, seeds) -> stacked parameters`` retrains each subset the pipeline's way from its
    own seed; ``outputs`` are the test outputs to predict ({name: f(model outputs, targets) per sample}).
    """

    model: object
    history: list
    trace: object
    loss_fn: Callable
    train: tuple
    test: tuple
    train_seconds: float
    fresh: Callable
    outputs: dict


def measure_lds(run: ReferenceRun, scorers: dict[str, Callable[[], object] | PerFraction], methods: Sequence[str],
                settings: Sequence[str], subsets: int, fractions: Sequence[float], seed: int) -> dict:
    """Return the table (method x setting x fraction x output), the winners, retraining seconds and replay gap."""
    import torch

    from ..attribution.lds import linear_datamodeling_score, random_subsets
    from . import retrain

    unknown = sorted(set(methods) - set(scorers)) + sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise InputError(f"LDS study: unknown method or setting {unknown[0]!r} (methods: {', '.join(scorers)})")
    if subsets < 2 or not fractions or not all(0 < f < 1 for f in fractions):
        raise InputError("LDS study: need subsets >= 2 and every fraction in (0, 1)")
    model, (x_tr, y_tr), (x_te, y_te) = run.model, run.train, run.test
    n_train = len(y_tr)
    masks = {f: random_subsets(n_train, subsets, f, seed) for f in fractions}
    truth, retrain_seconds = {}, {}
    for fraction, setting in ((f, s) for f in fractions for s in settings):
        started = time.perf_counter()
        if setting == "fixed_order":
            stacked = retrain.retrain_fixed_order(model, run.trace, run.loss_fn, x_tr, y_tr, masks[fraction])
        else:
            rows = torch.stack([torch.nonzero(m)[:, 0] for m in masks[fraction]])
            stacked = run.fresh(rows, [seed + 1000 + m for m in range(subsets)])
        truth[fraction, setting] = retrain.model_outputs(model, stacked, x_te, y_te, run.outputs)
        retrain_seconds[f"{setting} {fraction}"] = round(time.perf_counter() - started, 3)
    replayed = retrain.retrain_fixed_order(model, run.trace, run.loss_fn, x_tr, y_tr, torch.ones(1, n_train))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    replay_gap = max(float((p[0] - model.get_parameter(n).detach()).abs().max()) for n, p in zip(names, replayed))

    table = []
    for name in methods:
        scorer = scorers[name]
        per_fraction = isinstance(scorer, PerFraction)
        scored = {}  # fraction (None: the same scores for every fraction) -> (scores, seconds)
        for fraction in (fractions if per_fraction else [None]):
            started = time.perf_counter()
            scores = scorer.scores(fraction) if per_fraction else scorer()
            scored[fraction] = scores, time.perf_counter() - started
        for (fraction, setting), outs in truth.items():
            scores, seconds = scored[fraction if per_fraction else None]
            for output in run.outputs:
                s = scores[output] if isinstance(scores, dict) else scores
                per_test = linear_datamodeling_score(s, masks[fraction], outs[output]).numpy()
                valid = per_test[~np.isnan(per_test)]
                table.append({"method": name, "setting": setting, "fraction": fraction, "output": output,
                              "lds": float(valid.mean()) if len(valid) else float("nan"),
                              "lds_sem": float(valid.std(ddof=1) / np.sqrt(len(valid))) if len(valid) > 1 else None,
                              "seconds": round(seconds, 3), "cost_vs_training": round(seconds / run.train_seconds, 3)})
    winners = {f"{setting} {fraction}": {
        output: max((r for r in table if (r["setting"], r["fraction"], r["output"]) == (setting, fraction, output)),
                    key=lambda r: -np.inf if np.isnan(r["lds"]) else r["lds"])["method"] for output in run.outputs}
        for fraction, setting in truth}
    return {"table": table, "winners": winners, "retraining_seconds": retrain_seconds,
            "fixed_order_replay_max_abs_diff": replay_gap}


def lds_evaluation(seed: int = 0, n_train: int = 300, n_val: int = 150, n_test: int = 40, epochs: int = 8,
                   lr: float = 0.1, batch_size: int = 16, schedule: str = "cosine", subsets: int = 50,
                   fractions: Sequence[float] = (0.5, 0.9), methods: Sequence[str] = METHODS,
                   settings: Sequence[str] = SETTINGS, trak_dim: int = 64, plot: bool = True) -> dict:
    """Measure every method's LDS on one digits run; return the table, the plot and the winner per setting.

    Returns a dict with ``table`` (one row per method, setting, fraction and output: ``method``, ``setting``,
    ``fraction`` (of the training set kept), ``output``, ``lds``, ``lds_sem`` (standard error over the test
    samples), ``seconds`` (the method's scoring time), ``cost_vs_training`` (seconds / the reference run's
    training seconds)), ``best`` (the winner per setting on the ``-loss`` output), ``winners``
    ({"setting fraction": {output: method}}), ``plot_png`` and ``run`` (settings, accuracy, timings, and how
    closely the fixed-order retraining with every weight 1 reproduces the run).
    """
    import torch

    from ..attribution.trace import OptimizerSpec, trace_from_events
    from ..attribution.trak import margin
    from ..pipelines.base import TrainSettings
    from ..pipelines.digits import build_cnn
    from ..pipelines.training import lr_at
    from ..tracing.tracer import Tracer
    from . import retrain

    t0 = time.perf_counter()
    (x_tr, y_tr, ids), (x_va, y_va), (x_te, y_te) = digits_splits(seed, n_train, n_val)
    x_te, y_te = x_te[:n_test], y_te[:n_test]
    train_settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, schedule=schedule)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")

    def initial_state(s: int) -> dict:
        torch.manual_seed(s)
        return {k: v.clone() for k, v in build_cnn(10).state_dict().items()}

    tracer = Tracer(ids, "lds-reference")
    started = time.perf_counter()
    model, history = train_cnn(x_tr, y_tr, (x_va, y_va), train_settings, seed, recorder=tracer)
    train_seconds = time.perf_counter() - started
    trace = trace_from_events(tracer.events(), ids, initial_state(seed), OptimizerSpec(),
                              {h.step: h.state_dict for h in history}, "lds-reference")
    model.eval()

    def fresh(rows, seeds):
        steps, lrs = retrain.even_batch_steps(rows, seeds, epochs, batch_size, lambda e: lr_at(train_settings, e))
        return retrain.retrain_fresh(model, [initial_state(s) for s in seeds], loss_fn, x_tr, y_tr, steps, lrs,
                                     OptimizerSpec())

    run = ReferenceRun(model, history, trace, loss_fn, (x_tr, y_tr), (x_te, y_te), train_seconds, fresh,
                       {"-loss": lambda out, t: -loss_fn(out, t), "margin": margin})
    measured = measure_lds(run, _digits_scorers(run, trak_dim, seed), methods, settings, subsets, fractions, seed)
    with torch.no_grad():
        test_acc = float((model(x_te).argmax(1) == y_te).float().mean())
    return _result(measured, plot, {
        "settings": {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": int(len(y_te)), "epochs": epochs,
                     "lr": lr, "batch_size": batch_size, "schedule": schedule, "subsets": subsets,
                     "fractions": list(fractions), "trak_dim": trak_dim},
        "steps": len(trace.steps), "test_accuracy": test_acc, "training_seconds": round(train_seconds, 3),
        "seconds": round(time.perf_counter() - t0, 2)})


def graph_lds_evaluation(seed: int = 0, limit: int = 2000, n_test: int = 40, epochs: int = 6, lr: float = 0.01,
                         batch_size: int = 128, hidden: int = 32, subsets: int = 20,
                         fractions: Sequence[float] = (0.5, 0.9), methods: Sequence[str] = GRAPH_METHODS,
                         settings: Sequence[str] = SETTINGS, plot: bool = True) -> dict:
    """Measure the LDS of the methods on the multimodal graph pipeline's GNN (its own loop, Adam); as lds_evaluation.

    The bundled MovieLens ratings of the first users (``limit``), preprocessed by the pipeline, trained with the
    pipeline's loop and recorded by its Tracer; the test output is minus the squared error on ``n_test`` test
    ratings. Fresh-seed retraining follows the pipeline's order (a new permutation per epoch, from the seed).
    """
    import torch

    from ..attribution.trace import OptimizerSpec, trace_from_events
    from ..pipelines.base import TrainSettings
    from ..pipelines.movielens import MovieLensPipeline
    from ..pipelines.training import lr_at
    from ..tracing.tracer import Tracer
    from . import retrain

    t0 = time.perf_counter()
    pipeline = MovieLensPipeline(hidden=hidden)
    prepared = pipeline.preprocess(pipeline.ingest("", limit).table).table
    train_settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, schedule="cosine",
                                   device="cpu")
    ids, pairs, ratings = pipeline.tensors(prepared, "train")
    _, test_pairs, test_ratings = pipeline.tensors(prepared, "test")
    test = (test_pairs[:n_test], test_ratings[:n_test])
    loss_fn = pipeline.loss_fn()

    def initial_state(s: int) -> dict:
        torch.manual_seed(s)
        return {k: v.clone() for k, v in pipeline.build_model(prepared).state_dict().items()}

    tracer = Tracer(ids, "graph-lds-reference")
    started = time.perf_counter()
    history = list(pipeline.train(prepared, train_settings, tracer))
    train_seconds = time.perf_counter() - started
    model = pipeline.build_model(prepared)
    model.load_state_dict(history[-1].state_dict)
    model.eval()
    adam = OptimizerSpec(kind="adam")  # the pipeline's torch.optim.Adam(lr) with its default betas and eps
    trace = trace_from_events(tracer.events(), ids, initial_state(seed), adam,
                              {h.step: h.state_dict for h in history}, "graph-lds-reference")

    def fresh(rows, seeds):
        steps, lrs = retrain.split_batch_steps(rows, seeds, epochs, batch_size, lambda e: lr_at(train_settings, e))
        return retrain.retrain_fresh(model, [initial_state(s) for s in seeds], loss_fn, pairs, ratings, steps, lrs,
                                     adam)

    run = ReferenceRun(model, history, trace, loss_fn, (pairs, ratings), test, train_seconds, fresh,
                       {"-loss": lambda out, t: -loss_fn(out, t)})
    measured = measure_lds(run, _graph_scorers(run, pipeline.influence_layer), methods, settings, subsets,
                           fractions, seed)
    return _result(measured, plot, {
        "settings": {"seed": seed, "limit": limit, "n_test": int(len(test[1])), "epochs": epochs, "lr": lr,
                     "batch_size": batch_size, "hidden": hidden, "subsets": subsets, "fractions": list(fractions)},
        "train_ratings": len(ids), "steps": len(trace.steps), "optimizer": "adam",
        "training_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - t0, 2)})


def _result(measured: dict, plot: bool, run: dict) -> dict:
    """Return a study's result from the measured table and the run's figures."""
    winners = measured["winners"]
    run = {**run, "retraining_seconds": measured["retraining_seconds"],
           "fixed_order_replay_max_abs_diff": measured["fixed_order_replay_max_abs_diff"]}
    return {"table": measured["table"], "best": "; ".join(f"{s}: {w['-loss']}" for s, w in winners.items()),
            "winners": winners, "plot_png": lds_plot(measured["table"]) if plot else None, "run": run}


def _replayed(run: ReferenceRun, cls, outputs: dict, **options) -> Callable[[], dict]:
    """Return () -> {output: scores} of a replay method, computed for each test output."""
    x_tr, y_tr = run.train

    def scores() -> dict:
        return {name: cls(run.model, run.trace, run.loss_fn, output=None if name == "-loss" else fn, **options)
                .influence(x_tr, y_tr, *run.test) for name, fn in outputs.items()}

    return scores


def _centered(run: ReferenceRun) -> PerFraction:
    """Return the metagradient taken where each fraction's random subsets are centred (every weight = fraction)."""
    from ..attribution.metagradient import Metagradient

    return PerFraction(lambda fraction: _replayed(run, Metagradient, run.outputs, at=fraction)())


def _digits_scorers(run: ReferenceRun, trak_dim: int, seed: int) -> dict[str, Callable[[], object] | PerFraction]:
    """Return {method: () -> scores (n_train, n_test), or {output: scores} for output-specific methods}."""
    from ..attribution import GradCos, GradDot, InfluenceFunction, TracInCP
    from ..attribution.metagradient import Metagradient
    from ..attribution.selection import DEFAULT_RULE
    from ..attribution.step_exact import StepExactTracIn

    model, loss_fn, history = run.model, run.loss_fn, run.history
    (x_tr, y_tr), (x_te, y_te) = run.train, run.test
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
        "step_exact": _replayed(run, StepExactTracIn, run.outputs),
        "metagradient": _replayed(run, Metagradient, run.outputs),
        "metagradient_centered": _centered(run),
    }


def _graph_scorers(run: ReferenceRun, layer: str) -> dict[str, Callable[[], object] | PerFraction]:
    """Return the graph study's scorers: TracInCP on the decoder's last layer, Grad-Dot, the replay methods."""
    from ..attribution import GradDot, TracInCP
    from ..attribution.metagradient import Metagradient
    from ..attribution.selection import DEFAULT_RULE
    from ..attribution.step_exact import StepExactTracIn

    model, loss_fn, history = run.model, run.loss_fn, run.history
    (x_tr, y_tr), (x_te, y_te) = run.train, run.test
    checkpoints = [(h.state_dict, h.lr) for h in history]
    chosen = DEFAULT_RULE.select([h.val_loss for h in history])

    def tracin(cks):
        return lambda: TracInCP(model, cks, loss_fn, layer=layer, forward=lambda m, x: m(x),
                                batch_size=len(y_tr)).influence(x_tr, y_tr, x_te, y_te)

    return {
        "tracincp_all": tracin(checkpoints),
        "tracincp_fgtrac": tracin([checkpoints[i] for i in chosen]),
        "grad_dot": lambda: GradDot(model, loss_fn, layer=layer, forward=lambda m, x: m(x),
                                    state_dict=history[-1].state_dict,
                                    batch_size=len(y_tr)).influence(x_tr, y_tr, x_te, y_te),
        "step_exact": _replayed(run, StepExactTracIn, run.outputs),
        "metagradient": _replayed(run, Metagradient, run.outputs),
        "metagradient_centered": _centered(run),
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
