"""Running a model over attribution data, shared by every path: the forward and loss signatures, batches of
tensors or loaders, devices, per-sample losses, and a guard that restores the model afterwards."""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

ForwardFn = Callable[[nn.Module, Any], Tensor]
LossFn = Callable[[Tensor, Any], Tensor]

__all__ = ["ForwardFn", "LossFn", "call_model", "iter_batches", "model_device", "model_guard", "per_sample_losses",
           "reiterable", "to_device"]


def reiterable(data: Any) -> Any:
    """Return ``data`` unchanged if it can be iterated more than once, else a list of its items."""
    if isinstance(data, Tensor) or data is None:
        return data
    if iter(data) is data:  # a generator / one-shot iterator
        return list(data)
    return data


def iter_batches(inputs: Any, targets: Any, batch_size: int) -> Iterator[tuple[Any, Any]]:
    """Yield ``(inputs, targets)`` batches from tensors (sliced by ``batch_size``) or from an iterable of batches."""
    if targets is not None:
        if isinstance(inputs, (tuple, list)):
            n = len(targets)
            for s in range(0, n, batch_size):
                yield tuple(x[s : s + batch_size] for x in inputs), targets[s : s + batch_size]
            return
        n = len(inputs)
        if len(targets) != n:
            raise ValueError(f"inputs ({n}) and targets ({len(targets)}) differ in length")
        for s in range(0, n, batch_size):
            yield inputs[s : s + batch_size], targets[s : s + batch_size]
        return
    if isinstance(inputs, Tensor):
        raise ValueError("targets are required when inputs is a tensor")
    for batch in inputs:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("an iterable of batches must yield (inputs, targets) pairs")
        yield batch[0], batch[1]


def to_device(x: Any, device: torch.device) -> Any:
    """Return x (a tensor, or a tuple/list of them) on the device; anything else unchanged."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def call_model(model: nn.Module, forward: ForwardFn | None, x: Any) -> Tensor:
    """Return the model's outputs on x: model(x), or forward(model, x) when a forward is given."""
    return model(x) if forward is None else forward(model, x)


def per_sample_losses(loss_fn: LossFn, out: Tensor, t: Any) -> Tensor:
    """Return loss_fn(out, t), checked to be one loss per sample (a 1-D tensor)."""
    losses = loss_fn(out, t)
    if losses.dim() != 1:
        raise ValueError(
            "loss_fn must return one loss per sample (a 1-D tensor, e.g. reduction='none'); "
            f"got shape {tuple(losses.shape)}"
        )
    return losses


@contextlib.contextmanager
def model_guard(model: nn.Module, restore_state: bool = False) -> Iterator[nn.Module]:
    """Yield ``model``; afterwards restore its train/eval modes, requires_grad flags, Parameter objects and
    (optionally) its state_dict.

    The Parameter objects: ``torch.func.functional_call`` (tie_weights=True, torch 2.13) leaves plain
    tensors in place of the Parameters of a module that appears twice in the model.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    owned = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()]
    state = None
    if restore_state:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield model
    finally:
        for m, name, p in owned:
            if m._parameters.get(name) is not p:
                m.__dict__.pop(name, None)
                m._parameters[name] = p
        if state is not None:
            model.load_state_dict(state)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
