"""Retraining many models at once on training subsets: the ground truth a linear datamodeling score is measured on.

Every model of a batch trains at the same time through ``torch.func.vmap`` over stacked parameters, with the
optimiser step of :func:`..attribution.trace.optimizer_update` (torch.optim's arithmetic), so M subsets cost
about one training run on an M-times larger batch rather than M runs. Two settings:

* :func:`retrain_fixed_order`: the recorded run with every sample outside the subset weighted 0, i.e. the
  recorded batches, learning rates and initial weights (the fixed-order setting, where exact metagradients are
  first-order exact);
* :func:`retrain_fresh`: each subset trained the way the pipeline trains, with a seed of its own (fresh initial
  weights and a fresh order, built by :func:`even_batch_steps` for the digits loop and :func:`split_batch_steps`
  for the graph loop, the epoch's scheduled lr).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..attribution.model_calls import LossFn
from ..attribution.trace import (
    OptimizerSpec,
    TrainingTrace,
    initial_optimizer_state,
    optimizer_update,
    trainable_names,
)


def _stacked(states: Sequence[dict], names: Sequence[str]) -> list[Tensor]:
    return [torch.stack([s[n].detach() for s in states]) for n in names]


def _batched_grads(model: nn.Module, names: Sequence[str], loss_fn: LossFn, same_batch: bool):
    """Return f(stacked params, x, y, w) -> per-model gradients of sum_i w_i l_i / |B| (x, y shared or per model)."""
    fixed = {n: b for n, b in model.named_buffers()}

    def loss(params, x, y, w):
        out = functional_call(model, {**fixed, **dict(zip(names, params))}, (x,))
        return (w * loss_fn(out, y)).sum() / y.shape[0]

    return vmap(grad(loss), in_dims=(0, None, None, 0) if same_batch else (0, 0, 0, 0))


def retrain_fixed_order(model: nn.Module, trace: TrainingTrace, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                        masks: Tensor) -> list[Tensor]:
    """Return the stacked final parameters (one leading row per mask) of the recorded run with weights ``masks``."""
    names = trainable_names(model)
    trace.check_rows(len(targets))
    count = masks.shape[0]
    params = [trace.initial_state[n].detach().expand(count, *trace.initial_state[n].shape).clone() for n in names]
    state = initial_optimizer_state(params, trace.optimizer)
    weights = masks.to(params[0].dtype)
    step_grads = _batched_grads(model, names, loss_fn, same_batch=True)
    with torch.no_grad():
        for t, s in enumerate(trace.steps):
            rows = torch.tensor(s.rows, dtype=torch.long)
            g = step_grads(params, inputs[rows], targets[rows], weights[:, rows])
            params, state = optimizer_update(params, g, state, s.lr, t, trace.optimizer)
    return params


def retrain_fresh(model: nn.Module, initial_states: Sequence[dict], loss_fn: LossFn, inputs: Tensor,
                  targets: Tensor, step_rows: Sequence[Tensor], lrs: Sequence[float], optimizer: OptimizerSpec
                  ) -> list[Tensor]:
    """Return the stacked final parameters of models each trained from its own initial state on its own batches.

    ``step_rows[t]`` is an (M, b) tensor: step t's training rows for each of the M models (one batch size per
    step); ``lrs[t]`` its learning rate. Each step minimises the mean loss of the model's batch.
    """
    names = trainable_names(model)
    params = _stacked(initial_states, names)
    state = initial_optimizer_state(params, optimizer)
    step_grads = _batched_grads(model, names, loss_fn, same_batch=False)
    with torch.no_grad():
        for t, (rows, lr) in enumerate(zip(step_rows, lrs)):
            ones = torch.ones(rows.shape, dtype=params[0].dtype)
            g = step_grads(params, inputs[rows], targets[rows], ones)
            params, state = optimizer_update(params, g, state, lr, t, optimizer)
    return params


def even_batch_steps(subsets: Tensor, seeds: Sequence[int], epochs: int, batch_size: int,
                     lr_of_epoch: Callable[[int], float]) -> tuple[list[Tensor], list[float]]:
    """Return (per step the (M, b) rows, per step the lr) of the digits loop over each subset from its own seed.

    ``subsets`` is (M, size) training rows; model m's order is :class:`..pipelines.training.EvenBatches` over its
    subset with ``torch.Generator().manual_seed(seeds[m])``, a new permutation per epoch.
    """
    from ..pipelines.training import EvenBatches

    size = subsets.shape[1]
    samplers = [EvenBatches(size, batch_size, torch.Generator().manual_seed(int(s))) for s in seeds]
    rows, lrs = [], []
    for epoch in range(epochs):
        for batches in zip(*samplers):
            rows.append(torch.stack([subsets[m, torch.tensor(b)] for m, b in enumerate(batches)]))
            lrs.append(lr_of_epoch(epoch))
    return rows, lrs


def split_batch_steps(subsets: Tensor, seeds: Sequence[int], epochs: int, batch_size: int,
                      lr_of_epoch: Callable[[int], float]) -> tuple[list[Tensor], list[float]]:
    """Return the same for the graph loop's order: ``torch.randperm(size, generator).split(batch_size)`` per epoch."""
    size = subsets.shape[1]
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    rows, lrs = [], []
    for epoch in range(epochs):
        orders = [torch.randperm(size, generator=g).split(batch_size) for g in generators]
        for batches in zip(*orders):
            rows.append(torch.stack([subsets[m, b] for m, b in enumerate(batches)]))
            lrs.append(lr_of_epoch(epoch))
    return rows, lrs


def model_outputs(model: nn.Module, stacked: Sequence[Tensor], inputs: Tensor, targets: Tensor,
                  outputs: dict[str, Callable[[Tensor, Tensor], Tensor]]) -> dict[str, Tensor]:
    """Return {name: (M, n_test) values} of each output for each stacked model."""
    names = trainable_names(model)
    fixed = {n: b for n, b in model.named_buffers()}

    def run(params):
        return functional_call(model, {**fixed, **dict(zip(names, params))}, (inputs,))

    with torch.no_grad():
        logits = vmap(run)(list(stacked))
    return {name: torch.stack([fn(out, targets) for out in logits]) for name, fn in outputs.items()}
