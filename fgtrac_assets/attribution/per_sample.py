"""General path: per-sample gradients over chosen parameters, optionally randomly projected.

Also holds parameter selection, which every path shares (batching, devices and the model
guard are in :mod:`.model_calls`).

Per-sample gradients are computed with ``torch.func`` (``functional_call`` +
``vmap`` + ``grad``): one vectorised forward/backward per batch, the chosen
parameters differentiated, every other parameter and buffer held fixed.  When a
sample cannot be vmapped on its own (a custom ``forward`` whose batch is one graph,
data-dependent Python control flow, ...) the code falls back to a loop of
``torch.autograd.grad`` calls, one per sample, sharing one forward pass per
batch.  That fallback is exact but costs one backward pass per sample (roughly
``batch_size`` times slower than the vmapped path).  Parameters that all belong to
``nn.Linear`` layers (no custom ``forward``, no weight tying) skip vmap: each gradient is
the outer product of the layer's output gradient and its input, both captured by hooks
in one ordinary forward and backward (:func:`.ghost.linear_factors`), a little faster
(writing the gradients out is most of the cost of both paths).

A parameter tied to another module (the same Parameter object, e.g. a decoder sharing an
embedding's weight) is selected under one name and differentiated as that one
Parameter, so its gradient sums every use, as ``torch.autograd.grad`` would give.

``column_scales`` (one factor per parameter) multiplies each parameter's gradient
columns before any projection: with per-parameter learning rates on one side of a dot
product, (R^T L g) . (R^T g') is still an unbiased estimate of g^T L g'.
"""

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .ghost import GhostNotApplicable, linear_factors, parameter_holders
from .model_calls import (
    ForwardFn,
    LossFn,
    call_model,
    iter_batches,
    model_device,
    model_guard,
    per_sample_losses,
    to_device,
)

__all__ = [
    "RandomProjection",
    "iter_per_sample_grads",
    "per_sample_grads",
    "scale_columns",
    "selected_parameter_names",
    "unit_rows",
]


# ------------------------------------------------------------------- parameters


def selected_parameter_names(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Return the names of the parameters of the named submodules (all trainable parameters when ``layers`` is None)."""
    if layers is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError("model has no trainable parameters")
        return names
    names: list[str] = []
    for layer in layers:
        module = model.get_submodule(layer)
        own = [f"{layer}.{n}" if layer else n for n, _ in module.named_parameters()]
        if not own:
            raise ValueError(f"layer {layer!r} has no parameters")
        names.extend(n for n in own if n not in names)
    # parameters shared between modules appear under one canonical name only
    canonical = dict(model.named_parameters())
    missing = [n for n in names if n not in canonical]
    if missing:
        by_id = {id(p): n for n, p in model.named_parameters()}
        for n in missing:
            p = model.get_parameter(n)
            names[names.index(n)] = by_id[id(p)]
        names = list(dict.fromkeys(names))
    return names


# ------------------------------------------------------------------- projection


class RandomProjection:
    """Seeded Gaussian projection R (P x dim, N(0,1)/sqrt(dim)) applied block-wise, so E[(gR).(g'R)] = g.g'.

    The matrix is generated in row chunks of at most ``chunk_rows`` rows, each from its
    own seed (``seed`` and the chunk's index), so no P x dim matrix larger than one
    chunk is ever needed.  Chunks are cached while their total size stays below
    ``cache_elements``; beyond that they are regenerated on each call.
    """

    def __init__(self, dim: int, seed: int = 0, chunk_rows: int = 4096, cache_elements: int = 1 << 24):
        if dim <= 0:
            raise ValueError("projection dim must be positive")
        self.dim = int(dim)
        self.seed = int(seed)
        self.chunk_rows = int(chunk_rows)
        self.cache_elements = int(cache_elements)
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}
        self._cached = 0

    def _chunk(self, index: int, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (index, rows, device, dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (1 << 63))
        r = torch.randn(rows, self.dim, generator=gen, dtype=torch.float32)
        r = r.to(device=device, dtype=dtype).mul_(1.0 / math.sqrt(self.dim))
        if self._cached + r.numel() <= self.cache_elements:
            self._cache[key] = r
            self._cached += r.numel()
        return r

    def __call__(self, blocks: Sequence[Tensor]) -> Tensor:
        """Return the projection (n, dim) of the column-concatenation of ``blocks`` (each (n, P_j))."""
        n = blocks[0].shape[0]
        out = torch.zeros(n, self.dim, dtype=blocks[0].dtype, device=blocks[0].device)
        index = 0
        for block in blocks:
            for s in range(0, block.shape[1], self.chunk_rows):
                cols = block[:, s : s + self.chunk_rows]
                out.addmm_(cols, self._chunk(index, cols.shape[1], cols.device, cols.dtype))
                index += 1
        return out


# ------------------------------------------------------------ per-sample gradients


class _ForwardWrapper(nn.Module):
    """Module whose forward is ``forward(model, x)``, so functional_call can drive custom forwards."""

    def __init__(self, model: nn.Module, forward: ForwardFn):
        super().__init__()
        self.model = model
        self._fn = forward

    def forward(self, x: Any) -> Tensor:
        """Return ``forward(model, x)``."""
        return self._fn(self.model, x)


def _vmappable(x: Any, t: Any) -> bool:
    if not isinstance(t, Tensor) or t.dim() == 0:
        return False
    n = t.shape[0]
    leaves = list(x) if isinstance(x, (tuple, list)) else [x]
    return all(isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n for v in leaves)


def _vmap_grads(model, forward, names, loss_fn, x, t, check_losses: bool) -> list[Tensor]:
    if forward is None:
        module, prefix = model, ""
    else:
        module, prefix = _ForwardWrapper(model, forward), "model."
    chosen = set(names)
    params = {prefix + n: model.get_parameter(n).detach() for n in names}
    fixed = {prefix + n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    fixed.update({prefix + n: b for n, b in model.named_buffers()})

    def unsqueeze(v):
        return tuple(u.unsqueeze(0) for u in v) if isinstance(v, tuple) else v.unsqueeze(0)

    def one_loss(p, xi, ti):
        out = functional_call(module, {**fixed, **p}, (unsqueeze(xi),))
        loss = loss_fn(out, ti.unsqueeze(0)).sum()
        return loss, loss.detach()

    xs = tuple(x) if isinstance(x, list) else x
    g, losses = vmap(grad(one_loss, has_aux=True), in_dims=(None, 0, 0))(params, xs, t)
    if check_losses:
        with torch.no_grad():
            batch_losses = per_sample_losses(loss_fn, call_model(model, forward, x), t)
        if batch_losses.shape != losses.shape or not torch.allclose(
            batch_losses, losses, rtol=1e-4, atol=1e-6
        ):
            raise _NotPerSample("single-sample losses differ from the batch's losses")
    n = t.shape[0]
    return [g[prefix + name].reshape(n, -1) for name in names]


class _NotPerSample(RuntimeError):
    pass


def _loop_grads(model, forward, names, loss_fn, x, t) -> list[Tensor]:
    params = [model.get_parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    with torch.enable_grad():
        losses = per_sample_losses(loss_fn, call_model(model, forward, x), t)
        rows: list[list[Tensor]] = [[] for _ in params]
        for i in range(losses.shape[0]):
            gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            for j, (gj, p) in enumerate(zip(gs, params)):
                rows[j].append((torch.zeros_like(p) if gj is None else gj).reshape(-1))
    return [torch.stack(r) for r in rows]


def _linear_parameters(model: nn.Module, names: Sequence[str]) -> list[tuple[nn.Linear, str]] | None:
    """Return (its nn.Linear, "weight" | "bias") per name when every named parameter belongs to exactly one
    module, an nn.Linear (no weight tying), else None."""
    owners = parameter_holders(model)
    out = []
    for name in names:
        found = owners.get(id(model.get_parameter(name)), [])
        if len({id(m) for _, _, m in found}) != 1 or not isinstance(found[0][2], nn.Linear):
            return None
        out.append((found[0][2], found[0][1]))
    return out


def _factor_grads(model: nn.Module, linear: list[tuple[nn.Linear, str]], loss_fn: LossFn, x: Any, t: Any
                  ) -> tuple[Tensor, list[Tensor]]:
    """Return per-sample gradients (n, P) of Linear-layer parameters and its per-parameter column blocks (views),
    built from each layer's input and output gradient (one forward and backward, no vmap)."""
    modules = list({id(m): m for m, _ in linear}.values())
    factors = dict(zip((id(m) for m in modules), linear_factors(model, modules, x, t, loss_fn, None, len(t))))
    n = len(t)
    sizes = [getattr(m, p).numel() for m, p in linear]
    first = factors[id(modules[0])].errors
    flat = torch.empty(n, sum(sizes), dtype=first.dtype, device=first.device)
    blocks = list(flat.split(sizes, dim=1))
    for (mod, pname), block in zip(linear, blocks):
        f = factors[id(mod)]
        if pname == "bias":
            block.copy_(f.errors)
        else:
            torch.mul(f.errors[:, :, None], f.activations[:, None, :], out=block.view(n, *mod.weight.shape))
    return flat, blocks


def scale_columns(g: Tensor, sizes: Sequence[int], scales: Sequence[float]) -> Tensor:
    """Return g (n, sum(sizes)) with each parameter's block of ``sizes`` columns times its scale."""
    factors = torch.cat([g.new_full((size,), float(s)) for size, s in zip(sizes, scales)])
    return g * factors


def unit_rows(g: Tensor) -> Tensor:
    """Return the rows of g divided by their norms (zero rows stay zero)."""
    norm = g.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))


def iter_per_sample_grads(
    model: nn.Module,
    names: Sequence[str],
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    forward: ForwardFn | None = None,
    batch_size: int = 512,
    projection: RandomProjection | None = None,
    column_scales: Sequence[float] | None = None,
) -> Iterator[Tensor]:
    """Yield, per batch, the flattened per-sample gradients (b, P) or their projections (b, dim).

    ``column_scales`` (one per name): each parameter's gradient times its scale, before the projection.
    """
    if column_scales is not None and len(column_scales) != len(names):
        raise ValueError(f"{len(column_scales)} column scales for {len(names)} parameters")
    device = model_device(model)
    linear = _linear_parameters(model, names) if forward is None else None
    mode = "linear" if linear is not None else "vmap"
    with model_guard(model):
        model.eval()
        for x, t in iter_batches(inputs, targets, batch_size):
            if forward is None:
                x = to_device(x, device)
            t = to_device(t, device)
            blocks = None
            if mode == "linear" and _vmappable(x, t):
                try:
                    flat, blocks = _factor_grads(model, linear, loss_fn, x, t)
                except GhostNotApplicable:  # e.g. a layer called twice or on 3-D inputs: the general path
                    mode = "vmap"
                else:
                    if projection is None:
                        yield flat if column_scales is None else scale_columns(
                            flat, [b.shape[1] for b in blocks], column_scales)
                        continue
            if mode != "loop" and blocks is None and _vmappable(x, t):
                try:
                    blocks = _vmap_grads(model, forward, names, loss_fn, x, t, forward is not None)
                except Exception as exc:  # noqa: BLE001 - any vmap failure means "use the loop"
                    warnings.warn(
                        f"per-sample gradients: vmap not usable ({type(exc).__name__}: {exc}); "
                        "falling back to one backward pass per sample",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    mode = "loop"
            if blocks is None:
                blocks = _loop_grads(model, forward, names, loss_fn, x, t)
            if column_scales is not None:  # out of place: vmap may return a parameter's zero gradient expanded
                blocks = [b * float(s) for b, s in zip(blocks, column_scales)]
            yield projection(blocks) if projection is not None else torch.cat(blocks, dim=1)


def per_sample_grads(
    model: nn.Module,
    names: Sequence[str],
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    forward: ForwardFn | None = None,
    batch_size: int = 512,
    projection: RandomProjection | None = None,
    column_scales: Sequence[float] | None = None,
) -> Tensor:
    """Return the per-sample gradients over parameters ``names`` as one (n, P) tensor ((n, dim) if projected)."""
    blocks = list(iter_per_sample_grads(model, names, inputs, targets, loss_fn, forward, batch_size, projection,
                                        column_scales))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)
