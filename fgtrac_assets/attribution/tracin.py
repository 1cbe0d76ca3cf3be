"""TracInCP: sum over checkpoints of lr_i * grad l(w_i, z) . grad l(w_i, z')."""

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .ghost import (
    Factors,
    GhostNotApplicable,
    describe_shared,
    influence_from_factors,
    linear_factors,
    linear_layer_names,
    self_influence_from_factors,
    shared_parameters,
    top_k_from_factors,
    unit_factors,
)
from .model_calls import ForwardFn, LossFn, iter_batches, model_guard, reiterable
from .per_sample import (
    RandomProjection,
    iter_per_sample_grads,
    per_sample_grads,
    scale_columns,
    selected_parameter_names,
    unit_rows,
)
from .topk import RunningTopK, TopK

__all__ = ["TracInCP"]

_METHODS = ("auto", "ghost", "per_sample")

#: a checkpoint's step size: one for every parameter, or one per parameter name (parameter groups)
LearningRate = float | Mapping[str, float]


class TracInCP:
    """TracInCP influence scores over saved checkpoints, without modifying the model.

    ``checkpoints`` is a sequence of ``(state_dict, lr)``.  The gradient is taken over
    the parameters (weight and bias) of the submodule(s) named by ``layer``, or over all
    trainable parameters when ``layer`` is None; a parameter tied to another module (the
    same Parameter, e.g. a decoder sharing the embedding's weight) counts once, with the
    gradient of all its uses.  ``loss_fn(outputs, targets)`` must return per-sample
    losses; ``forward(model, inputs)`` (optional) produces outputs for models whose input
    is not one tensor.

    ``lr`` is a float, or a mapping from parameter name (as in ``model.named_parameters()``)
    to that parameter's step size (optimizer parameter groups): the checkpoint then adds
    sum_p lr_p * g_p(z) . g_p(z') over the selected parameters p.  The mapping needs an
    entry >= 0 for every selected parameter (ValueError naming the first missing one);
    where those entries are all equal it acts as that float.

    Two computation paths (``path`` attribute):

    * ``"ghost"`` — every selected parameter belongs to an ``nn.Linear`` that holds it
      alone (no tied weights), each layer's weight and bias share one lr, and no custom
      ``forward`` is given: exact dot products from per-layer factors, each layer's
      times its lr, see :mod:`.ghost`.  ``projection_dim`` is ignored there (exact is
      cheaper).
    * ``"per_sample"`` — anything else: per-sample gradients via ``torch.func``
      (looping per sample when vmap is impossible), optionally projected to
      ``projection_dim`` with a Gaussian projection seeded by ``seed``.  Per-parameter
      lrs scale the train gradient's columns before the projection, so the projected
      scores stay unbiased.

    Under "auto" a Linear-only selection that the ghost path cannot take exactly (tied
    weights, one layer's weight and bias at different lrs) takes the per-sample path
    with a RuntimeWarning saying why; ``method="ghost"`` refuses it with a ValueError.

    Data arguments are either tensors ``(inputs, targets)`` (``inputs`` may be a tuple of
    tensors), batched internally by ``batch_size``, or an iterable of ``(inputs, targets)``
    batches (e.g. a DataLoader) with ``targets=None``; one-shot iterables are buffered.

    ``method`` ("auto", "ghost", "per_sample") forces a path; "ghost" with a custom
    ``forward`` asserts that sample i's loss depends only on row i of each layer.
    ``normalize`` divides every per-sample gradient by its norm first, so each checkpoint
    contributes lr_i times the gradients' cosine (Grad-Cos at one checkpoint of lr 1);
    with per-parameter lrs the unit gradients are scaled, and a projection is refused.
    Gradients are taken in eval mode; afterwards the model's parameters/buffers,
    train/eval modes and requires_grad flags are restored (also on exceptions).

    Devices: everything runs where the model lives (the device of its first parameter).
    Tensor inputs and targets (and tuples/lists of tensors) are moved there batch by batch
    from wherever they are (with a custom ``forward`` the inputs reach it as given; targets
    are moved); checkpoint state_dicts may be on any device (``load_state_dict`` copies
    them into the model's parameters).  Scores, self-influence and every :class:`.TopK`
    field are returned on the model's device, never copied back behind the caller's back:
    call ``.cpu()`` before ``.numpy()`` or writing them out.  GradDot, GradCos and
    InfluenceFunction follow the same rule.
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Iterable[tuple[dict[str, Tensor], LearningRate]],
        loss_fn: LossFn,
        layer: str | Sequence[str] | None = None,
        forward: ForwardFn | None = None,
        batch_size: int = 512,
        projection_dim: int | None = None,
        seed: int = 0,
        method: str = "auto",
        normalize: bool = False,
    ):
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}")
        self.model = model
        self.loss_fn = loss_fn
        self.layers = None if layer is None else ([layer] if isinstance(layer, str) else list(layer))
        self.forward = forward
        self.batch_size = int(batch_size)
        self.method = method
        self.normalize = normalize
        self.param_names = selected_parameter_names(model, self.layers)
        self._sizes = [model.get_parameter(n).numel() for n in self.param_names]
        self.checkpoints = [(sd, _parameter_lrs(model, self.param_names, lr)) for sd, lr in checkpoints]
        if not self.checkpoints:
            raise ValueError("at least one checkpoint is required")
        self.projection = RandomProjection(projection_dim, seed) if projection_dim else None
        if normalize and self.projection is not None and any(isinstance(lr, list) for _, lr in self.checkpoints):
            raise ValueError("normalize=True with a projection needs one lr per checkpoint, not per parameter")
        self.linear_layers = linear_layer_names(model, self.layers)
        self._ghost_lrs: list[float | list[float]] = []
        self.path = self._pick_path()

    # ------------------------------------------------------------------ helpers

    def _pick_path(self) -> str:
        """Return "ghost" or "per_sample"; warn ("auto") or raise ("ghost") where the shortcut would not be exact."""
        if self.linear_layers is None:
            if self.method == "ghost":
                raise ValueError("method='ghost' needs layers that are all nn.Linear")
            return "per_sample"
        obstacle = self._ghost_obstacle()
        if obstacle is None:
            wanted = self.method == "ghost" or (self.method == "auto" and self.forward is None)
            return "ghost" if wanted else "per_sample"
        if self.method == "ghost":
            raise ValueError(f"method='ghost' would not be exact: {obstacle}")
        if self.method == "auto" and self.forward is None:
            warnings.warn(f"TracInCP: linear shortcut not applicable ({obstacle}); using per-sample gradients",
                          RuntimeWarning, stacklevel=3)
        return "per_sample"

    def _ghost_obstacle(self) -> str | None:
        """Return why the Linear-factor path cannot be exact here (tied weights, a layer at two lrs), else None;
        sets the per-(checkpoint, layer) lrs it uses."""
        shared = shared_parameters(self.model, self.linear_layers)
        if shared:
            return f"{describe_shared(shared)}, whose use the layer's factors would miss"
        index = {id(self.model.get_parameter(n)): i for i, n in enumerate(self.param_names)}
        self._ghost_lrs = []
        for _, lr in self.checkpoints:
            if not isinstance(lr, list):
                self._ghost_lrs.append(lr)
                continue
            per_layer = []
            for layer in self.linear_layers:
                own = {lr[index[id(p)]] for p in self.model.get_submodule(layer).parameters()}
                if len(own) != 1:
                    return f"layer {layer!r} has its weight and bias at different learning rates"
                per_layer.append(own.pop())
            self._ghost_lrs.append(per_layer)
        return None

    def _load(self, i: int) -> float | list[float]:
        state, lr = self.checkpoints[i]
        self.model.load_state_dict(state)
        return lr

    def _factors(self, inputs: Any, targets: Any) -> list[Factors]:
        factors = linear_factors(
            self.model, self.linear_layers, inputs, targets, self.loss_fn, self.forward, self.batch_size
        )
        return unit_factors(factors) if self.normalize else factors

    def _grads(self, inputs: Any, targets: Any, scales: list[float] | None = None):
        if self.normalize and scales is not None:  # no projection (refused): scale the unit gradients
            return (scale_columns(g, self._sizes, scales) for g in self._grads(inputs, targets))
        grads = iter_per_sample_grads(
            self.model, self.param_names, inputs, targets, self.loss_fn, self.forward,
            self.batch_size, self.projection, scales,
        )
        return map(unit_rows, grads) if self.normalize else grads

    def _grads_all(self, inputs: Any, targets: Any) -> Tensor:
        grads = per_sample_grads(
            self.model, self.param_names, inputs, targets, self.loss_fn, self.forward,
            self.batch_size, self.projection,
        )
        return unit_rows(grads) if self.normalize else grads

    def _run(self, ghost: Callable[[], Any], general: Callable[[], Any]) -> Any:
        with model_guard(self.model, restore_state=True):
            if self.path == "ghost":
                try:
                    return ghost()
                except GhostNotApplicable as exc:
                    if self.method == "ghost":
                        raise
                    warnings.warn(f"TracInCP: linear shortcut not applicable ({exc}); using per-sample gradients",
                                  RuntimeWarning, stacklevel=3)
                    self.path = "per_sample"
            return general()

    @staticmethod
    def _split(lr: float | list[float], power: float = 1.0) -> tuple[list[float] | None, float]:
        """Return (train column scales, score factor): per-parameter lrs (to ``power``) scale the train gradient's
        columns, one lr the scores."""
        if isinstance(lr, list):
            return [v**power for v in lr], 1.0
        return None, lr

    # ------------------------------------------------------------------ public

    def influence(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any) -> Tensor:
        """Return TracInCP scores, a (n_train, n_test) tensor."""
        train_inputs, test_inputs = reiterable(train_inputs), reiterable(test_inputs)

        def ghost() -> Tensor:
            train_f, test_f = [], []
            for i in range(len(self.checkpoints)):
                self._load(i)
                test_f.append(self._factors(test_inputs, test_targets))
                train_f.append(self._factors(train_inputs, train_targets))
            return influence_from_factors(train_f, test_f, self._ghost_lrs)

        def general() -> Tensor:
            out: Tensor | None = None
            for i in range(len(self.checkpoints)):
                scales, lr = self._split(self._load(i))
                test_t = self._grads_all(test_inputs, test_targets).T
                if out is None:  # first pass: the row count is known only from the gradients
                    out = torch.cat([g @ test_t * lr for g in self._grads(train_inputs, train_targets, scales)])
                    continue
                row = 0
                for g in self._grads(train_inputs, train_targets, scales):
                    out[row : row + g.shape[0]].addmm_(g, test_t, alpha=lr)
                    row += g.shape[0]
            return out

        return self._run(ghost, general)

    def self_influence(self, train_inputs: Any, train_targets: Any) -> Tensor:
        """Return TracInCP self-influence sum_i lr_i |grad l(w_i, z)|^2 (per parameter with lr mappings), (n_train,)."""
        train_inputs = reiterable(train_inputs)

        def ghost() -> Tensor:
            train_f = []
            for i in range(len(self.checkpoints)):
                self._load(i)
                train_f.append(self._factors(train_inputs, train_targets))
            return self_influence_from_factors(train_f, self._ghost_lrs)

        def general() -> Tensor:
            total: Tensor | None = None
            for i in range(len(self.checkpoints)):
                scales, lr = self._split(self._load(i), power=0.5)  # |sqrt(lr) g|^2 = sum_p lr_p |g_p|^2
                term = torch.cat([g.pow(2).sum(1) for g in self._grads(train_inputs, train_targets, scales)]) * lr
                total = term if total is None else total + term
            return total

        return self._run(ghost, general)

    def top_k(
        self,
        train_inputs: Any,
        train_targets: Any,
        test_inputs: Any,
        test_targets: Any,
        k: int = 10,
        chunk: int = 4096,
        progress: Callable[[int, int], None] | None = None,
    ) -> TopK:
        """Return the k proponents / opponents in train of each test sample as :class:`TopK`, each field (n_test, k).

        Scores are computed ``chunk`` train rows at a time; the full (n_train, n_test)
        matrix is never built.  ``progress(done_rows, total_rows)`` is called per chunk
        (total is -1 when the train set is an iterable of unknown length).
        """
        train_inputs, test_inputs = reiterable(train_inputs), reiterable(test_inputs)

        def ghost() -> TopK:
            train_f, test_f = [], []
            for i in range(len(self.checkpoints)):
                self._load(i)
                test_f.append(self._factors(test_inputs, test_targets))
                train_f.append(self._factors(train_inputs, train_targets))
            return top_k_from_factors(train_f, test_f, self._ghost_lrs, k, chunk=chunk, progress=progress)

        def general() -> TopK:
            lrs = [lr for _, lr in self.checkpoints]
            test_g = []
            for i in range(len(self.checkpoints)):
                self._load(i)
                test_g.append(self._grads_all(test_inputs, test_targets))
            total = len(train_targets) if train_targets is not None else -1
            acc = RunningTopK(k)
            offset = 0
            for group in _groups(iter_batches(train_inputs, train_targets, self.batch_size), chunk):
                scores = None
                for i, (scales, lr) in enumerate(map(self._split, lrs)):
                    self._load(i)
                    # (n_test, chunk) in memory, handed over transposed: top-k then runs along contiguous rows
                    part = (test_g[i] @ torch.cat(list(self._grads(group, None, scales))).T).T
                    scores = part.mul_(lr) if scores is None else scores.add_(part, alpha=lr)
                acc.update(scores, offset)
                offset += scores.shape[0]
                if progress is not None:
                    progress(offset, total)
            return acc.result()

        return self._run(ghost, general)


def _parameter_lrs(model: nn.Module, names: Sequence[str], lr: LearningRate) -> float | list[float]:
    """Return a checkpoint's lr as a float, or one lr per parameter of ``names`` where a mapping gives them different
    values (a tied parameter may be named by any of its names)."""
    if not isinstance(lr, Mapping):
        return float(lr)
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    lrs = []
    for name in names:
        keys = [a for a in aliases[id(model.get_parameter(name))] if a in lr]
        if not keys:
            raise ValueError(f"the learning-rate mapping has no entry for selected parameter {name!r}")
        given = {float(lr[k]) for k in keys}
        if len(given) > 1:
            raise ValueError(f"the learning-rate mapping gives the tied parameter {name!r} different values {keys}")
        lrs.append(given.pop())
    if min(lrs) < 0:
        raise ValueError(f"learning rates must be >= 0, got {min(lrs)}")
    return lrs[0] if len(set(lrs)) == 1 else lrs


def _groups(batches: Iterable[tuple[Any, Any]], min_rows: int):
    """Yield lists of consecutive batches holding at least ``min_rows`` samples (the last may hold fewer)."""
    group, rows = [], 0
    for x, t in batches:
        group.append((x, t))
        rows += len(t)
        if rows >= min_rows:
            yield group
            group, rows = [], 0
    if group:
        yield group
