"""A recorded training run as data, and its optimiser steps as pure functions: what the replay methods replay.

A :class:`TrainingTrace` is the recorded run: the weights it started from, every optimiser step's batch (the
training rows, in order) and learning rate, the optimiser's rule (:class:`OptimizerSpec`) and the recorded
checkpoints. Step t minimises the weighted mean batch loss

    L_t(theta, w) = sum over the members i of B_t of w_i * l(theta, z_i) / |B_t|

with every weight w_i = 1 in the recorded run (a mean-reduced batch loss, as the pipelines' loop and most
training code use). A weight is per training sample, so a sample drawn twice in a step counts twice. Changing
the weights, with the batches and the learning rates as recorded, is the fixed-order counterfactual: the
metagradient is the derivative of a test output with respect to w, and a subset retrained this way is the
recorded run with w = 0 outside the subset.

:func:`optimizer_update` is torch.optim's SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW as
differentiable tensor arithmetic, so autograd can run through a step and ``vmap`` can run many models at once;
:func:`replay` runs a trace forward and :func:`check_reproduced` compares the replayed weights with the recorded
checkpoints.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import FgtracError
from .model_calls import LossFn

__all__ = ["OptimizerSpec", "ReplayMismatch", "TraceStep", "TrainingTrace", "check_reproduced", "optimizer_update",
           "replay", "step_loss", "trace_from_events"]

_KINDS = ("sgd", "adam", "adamw")


class ReplayMismatch(FgtracError, ValueError):
    """The replayed weights differ from a recorded checkpoint: the trace does not describe the run it claims to."""


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimiser's update rule and hyperparameters (the learning rate comes from each step)."""

    kind: str = "sgd"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"optimizer kind {self.kind!r}: expected one of {_KINDS}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening 0 (as torch.optim.SGD)")

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> "OptimizerSpec":
        """Return the spec of a torch SGD, Adam or AdamW optimiser with one set of hyperparameters."""
        known = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
        name = type(optimizer).__name__ if type(optimizer) in known else f"a subclass {type(optimizer).__name__}"
        return cls.from_groups(name, optimizer.param_groups)

    @classmethod
    def from_groups(cls, class_name: str, groups: Sequence[Mapping[str, Any]]) -> "OptimizerSpec":
        """Return the spec of an optimiser given by its class name ("SGD", "Adam", "AdamW") and parameter groups
        (torch's param_groups, or a session's recorded groups); raise ValueError for one that cannot be replayed."""
        kind = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}.get(class_name)
        if kind is None:
            raise ValueError(f"{class_name}: only SGD, Adam and AdamW steps can be replayed")
        keys = ("momentum", "dampening", "nesterov", "weight_decay") if kind == "sgd" else ("betas", "eps",
                                                                                              "weight_decay")
        lacking = [k for k in keys if any(k not in g for g in groups)]
        if lacking:
            raise ValueError(f"{class_name}: the recorded parameter groups lack {lacking[0]!r}")
        settings = [{k: g[k] for k in keys} for g in groups]
        if any(s != settings[0] for s in settings) or any(g.get("amsgrad") or g.get("maximize") for g in groups):
            raise ValueError("parameter groups with different hyperparameters, amsgrad or maximize cannot be replayed")
        values = dict(settings[0])
        if "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        return cls(kind=kind, **values)

    @property
    def state_size(self) -> int:
        """Return how many state tensors per parameter the rule keeps (momentum buffer; Adam's two moments)."""
        if self.kind == "sgd":
            return 1 if self.momentum else 0
        return 2


@dataclass(frozen=True)
class TraceStep:
    """One recorded optimiser step: the training rows of its batch, in order, and the learning rate applied."""

    rows: tuple[int, ...]
    lr: float


@dataclass(eq=False)
class TrainingTrace:
    """A recorded run: initial weights, the steps in order, the optimiser, and {steps done: recorded state_dict}."""

    initial_state: Mapping[str, Tensor]
    steps: Sequence[TraceStep]
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    checkpoints: Mapping[int, Mapping[str, Tensor]] = field(default_factory=dict)
    training_run: str | None = None

    def __post_init__(self):
        beyond = sorted(k for k in self.checkpoints if not 0 <= int(k) <= len(self.steps))
        if beyond:
            raise ValueError(f"checkpoints at steps {beyond[:3]} lie outside the {len(self.steps)} recorded steps")

    @property
    def n_rows(self) -> int:
        """Return one more than the largest training row any step uses (0 for an empty trace)."""
        return 1 + max((max(s.rows) for s in self.steps if s.rows), default=-1)

    def check_rows(self, n_train: int) -> None:
        """Raise IndexError if a step uses a training row outside 0..n_train-1."""
        if self.n_rows > n_train:
            step = next(t for t, s in enumerate(self.steps) if s.rows and max(s.rows) >= n_train)
            raise IndexError(f"step {step} uses training row {max(self.steps[step].rows)}, "
                             f"but only {n_train} training samples were given")


# ------------------------------------------------------------------------------------------- the update rules


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with a zero derivative at 0 (where torch's is infinite): Adam's second moment is 0 where no gradient came."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def optimizer_update(params: Sequence[Tensor], grads: Sequence[Tensor], state: Sequence[Tensor], lr: float,
                     step: int, spec: OptimizerSpec) -> tuple[list[Tensor], list[Tensor]]:
    """Return (new parameters, new state) after one optimiser step, as torch.optim computes them, differentiably.

    ``state`` is the flat list of the rule's state tensors (``spec.state_size`` per parameter, parameter-major);
    ``step`` counts from 0 (torch's first step, where SGD's momentum buffer starts as the gradient and Adam's bias
    correction uses t = 1).
    """
    k = spec.state_size
    new_p, new_s = [], []
    # the same operations in the same order as torch.optim's single-tensor CPU paths, so a float32 replay
    # reproduces the recorded weights bit for bit
    for i, (p, g) in enumerate(zip(params, grads)):
        s = state[i * k:(i + 1) * k]
        if spec.kind == "sgd":
            if spec.weight_decay:
                g = g.add(p, alpha=spec.weight_decay)
            if spec.momentum:
                buf = g if step == 0 else (s[0] * spec.momentum).add(g, alpha=1 - spec.dampening)
                new_s.append(buf)
                g = g.add(buf, alpha=spec.momentum) if spec.nesterov else buf
            new_p.append(p.add(g, alpha=-lr))
            continue
        b1, b2 = spec.betas
        if spec.kind == "adamw":
            p = p * (1 - lr * spec.weight_decay)
        elif spec.weight_decay:
            g = g.add(p, alpha=spec.weight_decay)
        m = torch.lerp(s[0], g, 1 - b1)
        v = torch.addcmul(s[1] * b2, g, g, value=1 - b2)
        t = step + 1
        denom = (_safe_sqrt(v) / math.sqrt(1 - b2 ** t)).add(spec.eps)
        new_p.append(torch.addcdiv(p, m, denom, value=-(lr / (1 - b1 ** t))))
        new_s += [m, v]
    return new_p, new_s


def initial_optimizer_state(params: Sequence[Tensor], spec: OptimizerSpec) -> list[Tensor]:
    """Return the rule's state before the first step: zeros, ``spec.state_size`` per parameter."""
    return [torch.zeros_like(p) for p in params for _ in range(spec.state_size)]


# ---------------------------------------------------------------------------------------------- the replay


def trainable_names(model: nn.Module) -> list[str]:
    """Return the names of the parameters the optimiser moved (those that require grad)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the model has no trainable parameters")
    return names


def step_loss(model: nn.Module, names: Sequence[str], fixed: Mapping[str, Tensor], loss_fn: LossFn,
              params: Sequence[Tensor], inputs: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Return the step's loss sum_i w_i l(theta, z_i) / |B| at ``params`` (the plain mean when ``weights`` is None)."""
    out = functional_call(model, {**fixed, **dict(zip(names, params))}, (inputs,))
    losses = loss_fn(out, targets)
    if weights is None:
        return losses.mean()  # what the recorded loop computed
    return (losses * weights).sum() / len(targets)


@dataclass
class ReplayState:
    """The replay after ``done`` steps: the trainable parameters and the optimiser's state tensors."""

    done: int
    params: list[Tensor]
    opt_state: list[Tensor]


def replay(model: nn.Module, trace: TrainingTrace, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
           dtype: torch.dtype | None = None, weights: Tensor | None = None) -> Iterator[ReplayState]:
    """Yield the replayed state before every step and after the last (``done`` = 0..T), under per-sample ``weights``.

    The model is not modified: its parameters are read as names, and its buffers are used as they are. Inputs
    and targets are the training rows the trace indexes; a row's ``weights`` entry multiplies its loss.
    """
    trace.check_rows(len(targets))
    names, fixed, params = _start(model, trace, dtype)
    x, w = _cast(inputs, params[0].dtype), None if weights is None else weights.to(params[0])
    state = initial_optimizer_state(params, trace.optimizer)
    for t, s in enumerate(trace.steps):
        yield ReplayState(t, params, state)
        params, state = _forward_step(model, names, fixed, loss_fn, params, state, trace, t, s, x, targets, w)
    yield ReplayState(len(trace.steps), params, state)


def _start(model: nn.Module, trace: TrainingTrace, dtype: torch.dtype | None):
    """Return (trainable names, fixed tensors, initial trainable parameters) for a replay in ``dtype``."""
    names = trainable_names(model)
    device = next(model.parameters()).device
    missing = [n for n in names if n not in trace.initial_state]
    if missing:
        raise ValueError(f"the trace's initial state lacks parameter {missing[0]!r}")
    state = {k: v.to(device) for k, v in trace.initial_state.items()}
    params = [_cast(state[n], dtype).detach() for n in names]
    fixed = {n: _cast(p.detach(), dtype) for n, p in model.named_parameters() if n not in names}
    fixed.update({n: _cast(state.get(n, b), dtype) for n, b in model.named_buffers()})
    return names, fixed, params


def _cast(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x


def _forward_step(model, names, fixed, loss_fn, params, state, trace, t, s, x, targets, w):
    """Return (parameters, optimiser state) after recorded step t, computed without building a graph to keep."""
    rows = torch.tensor(s.rows, dtype=torch.long, device=x.device)
    with torch.enable_grad():
        live = [p.detach().requires_grad_(True) for p in params]
        loss = step_loss(model, names, fixed, loss_fn, live, x[rows], targets[rows.to(targets.device)],
                         None if w is None else w[rows])
        grads = torch.autograd.grad(loss, live, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    with torch.no_grad():
        new_p, new_s = optimizer_update(params, grads, state, s.lr, t, trace.optimizer)
    return [p.detach() for p in new_p], [v.detach() for v in new_s]


def check_reproduced(names: Sequence[str], replayed: ReplayState, trace: TrainingTrace, rtol: float = 1e-4,
                     atol: float = 1e-5) -> float | None:
    """Return max |replayed - recorded| over the trainable parameters at a checkpoint (None where none was recorded).

    Raises :class:`ReplayMismatch` when they are not allclose: a trace that does not reproduce its own checkpoints
    (another optimiser, lost steps, an edited order, different initial weights) must not be attributed.
    """
    recorded = trace.checkpoints.get(replayed.done)
    if recorded is None:
        return None
    worst = 0.0
    for n, p in zip(names, replayed.params):
        if n not in recorded:
            raise ReplayMismatch(f"the checkpoint after step {replayed.done} has no parameter {n!r}")
        r, c = p.detach().double().cpu(), recorded[n].double().cpu()
        diff = float((r - c).abs().max()) if r.numel() else 0.0
        worst = max(worst, diff)
        if not torch.allclose(r, c, rtol=rtol, atol=atol):
            raise ReplayMismatch(f"replaying the trace does not reproduce the checkpoint after step {replayed.done}: "
                                 f"parameter {n!r} differs by up to {diff:.3g}")
    return worst


def as_trace_steps(steps: Any) -> list[TraceStep]:
    """Return TraceSteps from ``replay.ReplayStep``s, (rows, lr) pairs or TraceSteps."""
    out = []
    for s in steps:
        if isinstance(s, TraceStep):
            out.append(s)
        elif hasattr(s, "rows") and hasattr(s, "lr"):
            out.append(TraceStep(tuple(int(r) for r in s.rows), float(s.lr)))
        else:
            rows, lr = s
            out.append(TraceStep(tuple(int(r) for r in rows), float(lr)))
    return out


def trace_from_events(events: Any, sample_ids: Sequence[Any], initial_state: Mapping[str, Tensor],
                      optimizer: OptimizerSpec | None = None,
                      checkpoints: Mapping[int, Mapping[str, Tensor]] | None = None,
                      training_run: str | None = None) -> TrainingTrace:
    """Return the trace of recorded ``batched`` events (``Tracer.events()`` or the ledger's rows of one run).

    ``sample_ids[i]`` is training row i's id; each step's lr must be one number (one parameter group).
    """
    from .replay import replay_steps

    steps = as_trace_steps(replay_steps(events, sample_ids, training_run))
    return TrainingTrace({k: v.detach().clone() for k, v in initial_state.items()}, steps,
                         optimizer or OptimizerSpec(), dict(checkpoints or {}), training_run)
