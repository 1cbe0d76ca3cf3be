"""Fast exact path for ``nn.Linear`` layers ("ghost" dot products of per-sample gradients).

For y = a W^T + b, sample i's gradient is g_i = e_i (outer) [a_i, 1] with
e_i = dl_i/dy_i, hence

    g_i . g_j = (e_i . e_j) * (a_i . a_j + 1)          (the +1 is the bias; 0 without one)

and summing that over several Linear layers gives the dot product of the gradients
over all of their parameters.  Only the factors ``e`` (n x out) and ``a`` (n x in) are
ever stored.  Each layer must be called once per forward on a 2-D input whose rows are
the samples, and sample i's loss must depend on row i only (true for ordinary batched
models; not for e.g. a Linear inside message passing); otherwise
:class:`GhostNotApplicable` is raised and callers use the general path.  Nor may a
layer's parameters be held by any other module (tied weights, e.g. a language model's
decoder sharing the embedding's weight): the factors see the layer's own use only, not
the other module's share of the gradient (:func:`shared_parameters`).

Learning rates (``lrs``) are one per checkpoint, or one per layer of a checkpoint (a
parameter group per layer).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

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
from .topk import RunningTopK, TopK

__all__ = [
    "Factors",
    "GhostNotApplicable",
    "factor_dot",
    "factor_self_dot",
    "influence_from_factors",
    "linear_factors",
    "linear_layer_names",
    "parameter_holders",
    "self_influence_from_factors",
    "shared_parameters",
    "top_k_from_factors",
    "unit_factors",
]

# Fused tiles: (TILE_ROWS train x TILE_COLS test).  Two tile-sized scratch buffers take
# the GEMM results and the Hadamard product is accumulated into the output tile while it
# is still in cache.  On a 2-core CPU 512 x 1024 tiles beat whole 512-row or 2048-row blocks
# and one plain GEMM over the full matrix.
TILE_ROWS = 512
TILE_COLS = 1024


class GhostNotApplicable(ValueError):
    """Raised when the linear-factor shortcut does not apply to a layer / model."""


@dataclass(eq=False)
class Factors:
    """Per-sample gradient factors of one Linear layer: errors (n, out), activations (n, in) without the bias 1."""

    errors: Tensor
    activations: Tensor
    bias: bool = True

    def __len__(self) -> int:
        return self.errors.shape[0]

    def rows(self, start: int, stop: int) -> "Factors":
        """Return the factors of samples ``start:stop`` (views, no copy)."""
        return Factors(self.errors[start:stop], self.activations[start:stop], self.bias)


# ------------------------------------------------------------------- eligibility


def linear_layer_names(model: nn.Module, layers: Sequence[str] | None) -> list[str] | None:
    """Return the Linear layer names the ghost path would use, or None if the selection is not Linear-only.

    Parameters shared with other modules are not checked here: see :func:`shared_parameters`.
    """
    if layers is not None:
        mods = [model.get_submodule(n) for n in layers]
        if not layers or not all(isinstance(m, nn.Linear) for m in mods):
            return None
        if len({id(m) for m in mods}) != len(mods):
            return None
        return list(layers)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable:
        return None
    names, covered, seen = [], set(), set()
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, nn.Linear):
            continue
        own = list(m.parameters())
        flags = [p.requires_grad for p in own]
        if not any(flags):
            continue
        if not all(flags) or id(m) in seen:
            return None  # a Linear partly frozen, or one Linear under two paths (most likely called twice)
        seen.add(id(m))
        names.append(name)
        covered.update(id(p) for p in own)
    if covered != trainable:
        return None  # trainable parameters outside the Linear layers
    return names


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """Return, per parameter id, every (module path, parameter name, module) holding it directly, aliases included."""
    holders: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((path, pname, mod))
    return holders


def shared_parameters(model: nn.Module, layers: Sequence[str | nn.Module]) -> list[tuple[str, str]]:
    """Return (parameter of a layer, the same Parameter under another module) name pairs, e.g. tied weights.

    A module registered under several paths is one module, not a sharer; two of the
    given layers holding one Parameter are.
    """
    holders = parameter_holders(model)
    paths: dict[int, str] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), path)
    pairs = []
    for layer in layers:
        mod = model.get_submodule(layer) if isinstance(layer, str) else layer
        label = layer if isinstance(layer, str) else paths.get(id(mod), type(mod).__name__)
        for pname, p in mod.named_parameters(recurse=False):
            seen = {id(mod)}
            for path, other_name, other in holders.get(id(p), []):
                if id(other) not in seen:
                    seen.add(id(other))
                    pairs.append((_join(label, pname), _join(path, other_name)))
    return pairs


def describe_shared(pairs: Sequence[tuple[str, str]]) -> str:
    """Return a sentence naming each shared parameter, its layer and the other module holding it."""
    return "; ".join(
        f"layer {_module(a)!r} shares {a} with module {_module(b)!r} (tied: the same Parameter as {b})"
        for a, b in pairs
    )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _module(param_name: str) -> str:
    return param_name.rpartition(".")[0] or "<the model itself>"


# --------------------------------------------------------------------- capturing


def linear_factors(
    model: nn.Module,
    layers: Sequence[str | nn.Module],
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    forward: ForwardFn | None = None,
    batch_size: int = 512,
) -> list[Factors]:
    """Return one :class:`Factors` per layer (same order as ``layers``) for all samples, via one forward+backward per batch.

    ``loss_fn(outputs, targets)`` must return per-sample losses.  A layer called more
    than once per forward, on inputs that are not (n, in_features), or whose parameters
    another module also holds raises :class:`GhostNotApplicable`.  The model runs in
    eval mode; its modes and requires_grad flags are restored afterwards and no
    ``.grad`` is touched.
    """
    modules = [model.get_submodule(m) if isinstance(m, str) else m for m in layers]
    for m in modules:
        if not isinstance(m, nn.Linear):
            raise GhostNotApplicable(f"{type(m).__name__} is not an nn.Linear")
    shared = shared_parameters(model, layers)
    if shared:
        raise GhostNotApplicable(f"{describe_shared(shared)}, whose use the layer's factors miss")
    device = model_device(model)
    acts: list[list[Tensor]] = [[] for _ in modules]
    errs: list[list[Tensor]] = [[] for _ in modules]
    with model_guard(model):
        model.eval()
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(True)
        sinks = [m.bias if m.bias is not None else m.weight for m in modules]
        for x, t in iter_batches(inputs, targets, batch_size):
            if forward is None:
                x = to_device(x, device)
            t = to_device(t, device)
            a_seen: list[list[Tensor]] = [[] for _ in modules]
            e_seen: list[list[Tensor]] = [[] for _ in modules]

            def make_hook(i: int) -> Callable:
                def hook(_mod: nn.Module, args: tuple, out: Tensor) -> None:
                    a_seen[i].append(args[0].detach())
                    if out.requires_grad:
                        out.register_hook(lambda g: e_seen[i].append(g.detach()))

                return hook

            handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
            try:
                with torch.enable_grad():
                    losses = per_sample_losses(loss_fn, call_model(model, forward, x), t)
                    n = losses.shape[0]
                    for i, a in enumerate(a_seen):
                        label = repr(layers[i]) if isinstance(layers[i], str) else i
                        if len(a) != 1:
                            raise GhostNotApplicable(f"layer {label} ran {len(a)} times in one forward")
                        if a[0].dim() != 2 or a[0].shape[0] != n:
                            raise GhostNotApplicable(
                                f"layer {label} input has shape {tuple(a[0].shape)}; need ({n}, in_features)"
                            )
                    # Backward through every hooked output without touching .grad: the sinks
                    # (bias, else weight) sit right behind each output, so the tensor hooks fire.
                    torch.autograd.grad(losses.sum(), sinks, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            for i, m in enumerate(modules):
                e = e_seen[i][0] if e_seen[i] else torch.zeros(n, m.out_features, dtype=losses.dtype, device=device)
                acts[i].append(a_seen[i][0])
                errs[i].append(e)
    return [
        Factors(torch.cat(errs[i]), torch.cat(acts[i]), m.bias is not None) for i, m in enumerate(modules)
    ]


# --------------------------------------------------------------------- dot products


LayerLrs = float | Sequence[float]


def _check(train: Sequence[Sequence[Factors]], test: Sequence[Sequence[Factors]] | None,
           lrs: Sequence[LayerLrs]) -> None:
    if len(train) != len(lrs) or (test is not None and len(test) != len(lrs)):
        raise ValueError("need one factor list and one learning rate per checkpoint")
    if not train or not train[0]:
        raise ValueError("no factors given")
    for i, ck in enumerate(train):
        if len(ck) != len(train[0]) or (test is not None and len(test[i]) != len(ck)):
            raise ValueError("every checkpoint needs the same layers")
        if isinstance(lrs[i], Sequence) and len(lrs[i]) != len(ck):
            raise ValueError(f"checkpoint {i}: {len(lrs[i])} learning rates for {len(ck)} layers")
        if test is not None:
            for f, g in zip(ck, test[i]):
                if f.bias != g.bias:
                    raise ValueError("train and test factors disagree on the bias")


def _layer_scales(lrs: Sequence[LayerLrs], n_layers: int) -> list[list[float]]:
    """Return one scale per (checkpoint, layer): a checkpoint's single lr repeated, or its per-layer lrs."""
    return [[float(v) for v in lr] if isinstance(lr, Sequence) else [float(lr)] * n_layers for lr in lrs]


def _accumulate(
    out: Tensor,
    train: Sequence[Sequence[Factors]],
    test: Sequence[Sequence[Factors]],
    scales: Sequence[Sequence[float]],
    row0: int = 0,
    tile: tuple[int, int] = (TILE_ROWS, TILE_COLS),
    overwrite: bool = False,
) -> Tensor:
    """Add sum_c sum_l scale_cl * (E E'^T) * (A A'^T + 1) for train rows ``row0:row0+len(out)`` into ``out``.

    With ``overwrite`` the first term is written instead of added, so ``out`` may be
    uninitialised (saves a zero-fill pass over the output).
    """
    rows_total, n_test = out.shape
    if rows_total == 0 or n_test == 0:
        return out
    if out.stride(0) == 1 and out.stride(1) != 1:
        # out is the transpose of a row-major (n_test, rows) buffer: fill that one, the roles of train and test
        # swapped (the sum is symmetric in them), so that every tile is written row by row
        chunk = [[f.rows(row0, row0 + rows_total) for f in ck] for ck in train]
        _accumulate(out.T, test, chunk, scales, 0, tile, overwrite)
        return out
    tr, tc = min(tile[0], rows_total), min(tile[1], n_test)
    buf_e = torch.empty(tr * tc, dtype=out.dtype, device=out.device)
    buf_a = torch.empty(tr * tc, dtype=out.dtype, device=out.device)
    # (K, n_test) row-major copies: column tiles are then plain strided GEMM operands
    test_t = [[(f.errors.T.contiguous(), f.activations.T.contiguous(), f.bias) for f in ck] for ck in test]
    for r in range(0, rows_total, tr):
        rows = min(tr, rows_total - r)
        lo, hi = row0 + r, row0 + r + rows
        for c in range(0, n_test, tc):
            cols = min(tc, n_test - c)
            o = out[r : r + rows, c : c + cols]
            be = buf_e[: rows * cols].view(rows, cols)
            ba = buf_a[: rows * cols].view(rows, cols)
            first = overwrite
            for ck_train, ck_test, ck_scales in zip(train, test_t, scales):
                for f, (et, at, bias), scale in zip(ck_train, ck_test, ck_scales):
                    torch.mm(f.errors[lo:hi], et[:, c : c + cols], out=be)
                    torch.mm(f.activations[lo:hi], at[:, c : c + cols], out=ba)
                    if bias:
                        ba.add_(1.0)
                    if first:
                        torch.mul(be.mul_(scale), ba, out=o)
                        first = False
                    else:
                        o.addcmul_(be, ba, value=scale)
    return out


def _new_out(train: Sequence[Sequence[Factors]], n_rows: int, n_test: int) -> Tensor:
    f = train[0][0]
    return torch.empty(n_rows, n_test, dtype=f.errors.dtype, device=f.errors.device)


def factor_dot(train: Sequence[Factors], test: Sequence[Factors], out: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """Return (n_train, n_test) gradient dot products sum_l (E E'^T) * (A A'^T + 1) (added into ``out`` if given)."""
    return influence_from_factors([train], [test], [scale], out=out)


def unit_factors(factors: Sequence[Factors]) -> list[Factors]:
    """Return the factors with errors divided by the gradient norm, so each sample's gradient has norm 1 (or 0)."""
    norm = factor_self_dot(factors).sqrt()
    inv = torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))
    return [Factors(f.errors * inv[:, None], f.activations, f.bias) for f in factors]


def factor_self_dot(factors: Sequence[Factors]) -> Tensor:
    """Return (n,) squared gradient norms sum_l |e|^2 (|a|^2 + 1)."""
    total = None
    for f in factors:
        term = _layer_self_dot(f)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no factors given")
    return total


def _layer_self_dot(f: Factors) -> Tensor:
    a2 = f.activations.pow(2).sum(1)
    if f.bias:
        a2 = a2 + 1.0
    return f.errors.pow(2).sum(1) * a2


def influence_from_factors(
    train_by_ckpt: Sequence[Sequence[Factors]],
    test_by_ckpt: Sequence[Sequence[Factors]],
    lrs: Sequence[LayerLrs],
    out: Tensor | None = None,
) -> Tensor:
    """Return TracInCP scores (n_train, n_test) = sum_c sum_l lr_cl * factor_dot(train_cl, test_cl), in row blocks."""
    _check(train_by_ckpt, test_by_ckpt, lrs)
    n_train, n_test = len(train_by_ckpt[0][0]), len(test_by_ckpt[0][0])
    scales = _layer_scales(lrs, len(train_by_ckpt[0]))
    if out is None:
        return _accumulate(_new_out(train_by_ckpt, n_train, n_test), train_by_ckpt, test_by_ckpt, scales, overwrite=True)
    if out.shape != (n_train, n_test):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n_train, n_test)}")
    return _accumulate(out, train_by_ckpt, test_by_ckpt, scales)


def self_influence_from_factors(train_by_ckpt: Sequence[Sequence[Factors]], lrs: Sequence[LayerLrs]) -> Tensor:
    """Return TracInCP self-influence (n_train,) = sum_c sum_l lr_cl * |g_cl|^2."""
    _check(train_by_ckpt, None, lrs)
    total = None
    for ck, lr in zip(train_by_ckpt, lrs):
        if isinstance(lr, Sequence):
            term = sum(_layer_self_dot(f) * float(v) for f, v in zip(ck, lr))
        else:
            term = factor_self_dot(ck) * float(lr)
        total = term if total is None else total + term
    return total


def top_k_from_factors(
    train_by_ckpt: Sequence[Sequence[Factors]],
    test_by_ckpt: Sequence[Sequence[Factors]],
    lrs: Sequence[LayerLrs],
    k: int,
    chunk: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> TopK:
    """Return the :class:`TopK` proponents/opponents per test sample, scoring ``chunk`` train rows at a time."""
    _check(train_by_ckpt, test_by_ckpt, lrs)
    n_train, n_test = len(train_by_ckpt[0][0]), len(test_by_ckpt[0][0])
    scales = _layer_scales(lrs, len(train_by_ckpt[0]))
    acc = RunningTopK(k)
    chunk = max(1, min(int(chunk), n_train))
    buf = _new_out(train_by_ckpt, n_test, chunk).T  # (n_test, chunk) in memory: top-k along contiguous rows
    for r in range(0, n_train, chunk):
        rows = min(chunk, n_train - r)
        scores = _accumulate(buf[:rows], train_by_ckpt, test_by_ckpt, scales, row0=r, overwrite=True)
        acc.update(scores, r)
        if progress is not None:
            progress(r + rows, n_train)
    return acc.result()
