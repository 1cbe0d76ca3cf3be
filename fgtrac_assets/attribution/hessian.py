"""Hessian of the mean training loss over chosen parameters, applied to blocks of vectors (torch.func).

``MeanLossHessian`` is the linear operator H = (1/n) sum_i Hess_theta l(z_i) over the
parameters named ``names`` (every other parameter and buffer held fixed), at parameters
snapshotted when it is built: the model itself is never modified.  Vectors are the rows
of an (m, P) block whose columns follow ``names`` in the same order as
:func:`.per_sample.per_sample_grads`.

Each product is a reverse-over-reverse pass: for every data batch the gradient of the
batch's loss share is taken once with ``torch.func.vjp(grad(f))`` and its vjp closure
is kept (``retain``), so an iteration of CG or LiSSA costs only the second backward
pass, vmapped over the rows of the block.  Data batches of ~100-200 samples kept the
batched tensors in cache and were 2-3x faster here than one batch of 1,000.
"""

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from .per_sample import (
    ForwardFn,
    LossFn,
    _ForwardWrapper,
    _model_device,
    _per_sample_losses,
    _to_device,
    iter_batches,
    model_guard,
)

__all__ = ["MeanLossHessian", "snapshot_state"]

#: retain the first-order graphs of all batches up to this many training samples
RETAIN_SAMPLES = 20_000


def snapshot_state(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Return detached copies of ``state_dict`` (default: the model's current state), never views of live tensors."""
    state = model.state_dict() if state_dict is None else state_dict
    return {k: v.detach().clone() for k, v in state.items()}


class MeanLossHessian:
    """The operator V -> V H for rows V (m, P), H the Hessian of the mean per-sample loss over ``names``.

    ``state`` (a state_dict) gives the point at which H is taken; ``inputs`` /
    ``targets`` are the full training set as tensors or an iterable of batches (see
    :func:`.per_sample.iter_batches`), buffered on the model's device.  Forward passes
    run in eval mode (no dropout, batch-norm running statistics); the model's modes are
    restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        state: dict[str, Tensor],
        inputs: Any,
        targets: Any,
        loss_fn: LossFn,
        forward: ForwardFn | None = None,
        batch_size: int = 128,
        tangent_chunk: int = 256,
        retain: bool | None = None,
    ):
        self.names = list(names)
        self.loss_fn = loss_fn
        self.tangent_chunk = int(tangent_chunk)
        device = _model_device(model)
        if forward is None:
            self.module, prefix = model, ""
        else:
            self.module, prefix = _ForwardWrapper(model, forward), "model."
        self.forward = forward
        self.model = model
        chosen = set(self.names)
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"unknown parameters {missing}")
        self.params = {prefix + n: state[n].to(device) for n in self.names}
        self.fixed = {prefix + k: v.to(device) for k, v in state.items() if k not in chosen}
        self.shapes = [tuple(self.params[prefix + n].shape) for n in self.names]
        self.sizes = [self.params[prefix + n].numel() for n in self.names]
        self.keys = [prefix + n for n in self.names]
        self.dim = sum(self.sizes)
        self.dtype = self.params[self.keys[0]].dtype
        self.device = device
        self.batches = []
        for x, t in iter_batches(inputs, targets, batch_size):
            if forward is None:
                x = _to_device(x, device)
            self.batches.append((x, _to_device(t, device)))
        self.n = sum(len(t) for _, t in self.batches)
        if self.n == 0:
            raise ValueError("the Hessian needs at least one training sample")
        self.retain = self.n <= RETAIN_SAMPLES if retain is None else bool(retain)
        self._closures: list[Callable] | None = None
        self._loop = False  # vmap over rows failed once: loop over rows from then on
        self.products = 0  # number of Hessian-vector products (rows) computed so far

    # ------------------------------------------------------------------ pieces

    def _batch_loss(self, x: Any, t: Any) -> Callable[[dict[str, Tensor]], Tensor]:
        n = float(self.n)

        def f(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(self.module, {**self.fixed, **p}, (x,))
            return _per_sample_losses(self.loss_fn, out, t).sum() / n

        return f

    def _closure(self, i: int) -> Callable:
        x, t = self.batches[i]
        with model_guard(self.model):
            self.model.eval()  # the forward pass runs here; the closure only replays backward passes
            return vjp(grad(self._batch_loss(x, t)), self.params)[1]

    def _closures_for(self, idx: Sequence[int]):
        if self.retain:
            if self._closures is None:
                self._closures = [self._closure(i) for i in range(len(self.batches))]
            for i in idx:
                yield self._closures[i]
        else:
            for i in idx:
                yield self._closure(i)

    def unflatten(self, rows: Tensor) -> dict[str, Tensor]:
        """Return the (m, P) block as {parameter key: (m, *shape)} views."""
        m = rows.shape[0]
        return {k: c.reshape(m, *s) for k, c, s in zip(self.keys, rows.split(self.sizes, dim=1), self.shapes)}

    def _flatten(self, d: dict[str, Tensor], m: int) -> Tensor:
        return torch.cat([d[k].reshape(m, -1) for k in self.keys], dim=1)

    def _apply_closure(self, fn: Callable, rows: Tensor) -> Tensor:
        m = rows.shape[0]
        if not self._loop:
            try:
                return self._flatten(vmap(lambda v: fn(v)[0])(self.unflatten(rows)), m)
            except Exception as exc:  # noqa: BLE001 - an op without a batching rule: loop over the rows
                warnings.warn(f"Hessian-vector products: vmap not usable ({type(exc).__name__}: {exc}); "
                              "looping over vectors", RuntimeWarning, stacklevel=3)
                self._loop = True
        outs = []
        for r in rows:
            d = fn({k: v[0] for k, v in self.unflatten(r[None]).items()})[0]
            outs.append(self._flatten({k: v[None] for k, v in d.items()}, 1))
        return torch.cat(outs)

    # ------------------------------------------------------------------ public

    def matmul(self, rows: Tensor, batches: Sequence[int] | None = None, weight: float = 1.0) -> Tensor:
        """Return rows @ H (m, P); with ``batches`` only those data batches' share, times ``weight``."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (m, {self.dim}), got {tuple(rows.shape)}")
        rows = rows.to(device=self.device, dtype=self.dtype)
        idx = range(len(self.batches)) if batches is None else batches
        out = torch.zeros_like(rows)
        with torch.enable_grad():
            for s in range(0, rows.shape[0], self.tangent_chunk):
                block = rows[s : s + self.tangent_chunk]
                acc = out[s : s + self.tangent_chunk]
                for fn in self._closures_for(idx):
                    acc.add_(self._apply_closure(fn, block))
        self.products += rows.shape[0]
        return out.mul_(weight) if weight != 1.0 else out

    def matrix(self, max_params: int) -> Tensor:
        """Return H as a dense symmetric (P, P) tensor; ValueError when P exceeds ``max_params``."""
        if self.dim > max_params:
            raise ValueError(
                f"explicit Hessian of {self.dim:,} parameters exceeds max_explicit_params={max_params:,} "
                f"({self.dim ** 2 * 8 / 2 ** 30:.1f} GiB in float64): use method='cg' or 'lissa', or a smaller `layer`"
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        h = torch.cat([self.matmul(eye[s : s + self.tangent_chunk]) for s in range(0, self.dim, self.tangent_chunk)])
        return (h + h.T).mul_(0.5)

    def batch_sizes(self) -> list[int]:
        """Return the number of samples in each buffered data batch."""
        return [len(t) for _, t in self.batches]

    def top_eigenvalue(self, damping: float = 0.0, iters: int = 20, block: int = 4, seed: int = 0) -> float:
        """Return an estimate of the largest-magnitude eigenvalue of H + damping I (block power iteration)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(min(block, self.dim), self.dim, generator=gen, dtype=torch.float64)
        q = torch.linalg.qr(q.T).Q.T.to(device=self.device, dtype=self.dtype)
        for _ in range(iters):
            z = self.matmul(q) + damping * q
            q = torch.linalg.qr(z.double().T).Q.T.to(self.dtype)
        z = self.matmul(q) + damping * q
        ritz = torch.linalg.eigvalsh(((q @ z.T) + (z @ q.T)).double() / 2)
        return float(ritz.abs().max())
