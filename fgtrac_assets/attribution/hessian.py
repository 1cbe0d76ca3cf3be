"""Hessian of the mean training loss over chosen parameters, applied to blocks of vectors (torch.func).

``MeanLossHessian`` is the linear operator H = (1/n) sum_i Hess_theta l(z_i) over the
parameters named ``names`` (every other parameter and buffer held fixed), at parameters
snapshotted when it is built: the model itself is never modified.  Vectors are the rows
of an (m, P) block whose columns follow ``names`` in the same order as
:func:`.per_sample.per_sample_grads`.

An ``nn.Sequential`` of Linear layers and element-wise activations (the whole model's
parameters or some of its Linear layers', no custom ``forward``) takes a hand-written
forward-over-reverse path instead (:class:`_StructuredMLP`): the same products to
rounding, the per-vector products batched into large GEMMs with the additions fused in,
which is faster.  Otherwise each product is a reverse-over-reverse pass: for every data batch the gradient of the
batch's loss share is taken once with ``torch.func.vjp(grad(f))`` and its vjp closure
is kept (``retain``), so an iteration of CG or LiSSA costs only the second backward
pass, vmapped over the rows of the block.  Data batches of ~100-200 samples keep the
batched tensors in cache, which is faster than one batch of 1,000.
"""

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from .model_calls import ForwardFn, LossFn, iter_batches, model_device, model_guard, per_sample_losses, to_device
from .per_sample import _ForwardWrapper

__all__ = ["MeanLossHessian", "snapshot_state"]

#: retain the first-order graphs of all batches up to this many training samples
RETAIN_SAMPLES = 20_000


def snapshot_state(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Return detached copies of ``state_dict`` (default: the model's current state), never views of live tensors."""
    state = model.state_dict() if state_dict is None else state_dict
    return {k: v.detach().clone() for k, v in state.items()}


def jvp(func: Callable, primals: tuple, tangents: tuple):
    """Return torch.func.jvp(func, primals, tangents), without a DeprecationWarning that is torch's, not ours.

    torch's first forward-mode product loads its own jvp decompositions, which call the deprecated
    torch.jit.script (torch 2.13): the warning names no code of ours and nothing here can avoid it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        return torch.func.jvp(func, primals, tangents)


class MeanLossHessian:
    """The operator V -> V H for rows V (m, P), H the Hessian of the mean per-sample loss over ``names``.

    ``state`` (a state_dict) gives the point at which H is taken; ``inputs`` /
    ``targets`` are the full training set as tensors or an iterable of batches (see
    :func:`.per_sample.iter_batches`), buffered on the model's device.  Forward passes
    run in eval mode (no dropout, batch-norm running statistics); the model's modes are
    restored afterwards.  ``structured``: True forces the hand-written MLP path (ValueError
    where it does not apply), False the torch.func path, None (default) picks the MLP path
    where it applies.
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
        structured: bool | None = None,
        product_dtype: torch.dtype | None = None,
    ):
        self.names = list(names)
        self.loss_fn = loss_fn
        self.tangent_chunk = int(tangent_chunk)
        device = model_device(model)
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
        # a tied tensor is passed under its one canonical name; functional_call ties it to the others
        aliases = _alias_names(model)
        self.fixed = {prefix + k: v.to(device) for k, v in state.items() if k not in chosen and k not in aliases}
        self.shapes = [tuple(self.params[prefix + n].shape) for n in self.names]
        self.sizes = [self.params[prefix + n].numel() for n in self.names]
        self.keys = [prefix + n for n in self.names]
        self.dim = sum(self.sizes)
        self.dtype = self.params[self.keys[0]].dtype
        self.device = device
        self.batches = []
        for x, t in iter_batches(inputs, targets, batch_size):
            if forward is None:
                x = to_device(x, device)
            self.batches.append((x, to_device(t, device)))
        self.n = sum(len(t) for _, t in self.batches)
        if self.n == 0:
            raise ValueError("the Hessian needs at least one training sample")
        self.retain = self.n <= RETAIN_SAMPLES if retain is None else bool(retain)
        self._closures: list[Callable] | None = None
        self._mlp = self._structured(structured)
        if product_dtype is not None and product_dtype != self.dtype:
            if self._mlp is None:
                raise ValueError(f"product_dtype={product_dtype} needs the structured MLP path (an nn.Sequential of "
                                 "Linear layers and element-wise activations)")
            self._mlp.product_dtype = product_dtype
        self.product_dtype = product_dtype or self.dtype
        self._loop = False  # vmap over rows failed once: loop over rows from then on
        self.products = 0  # number of Hessian-vector products (rows) computed so far

    # ------------------------------------------------------------------ pieces

    def _structured(self, want: bool | None) -> "_StructuredMLP | None":
        """Return the hand-written MLP path when asked for (True) or possible (None), else None."""
        if want is False:
            return None
        layers = _mlp_layers(self.model) if self.forward is None else None
        ok = layers is not None and self.retain and all(isinstance(x, Tensor) and x.dim() == 2 for x, _ in self.batches)
        if ok:
            linear = {f"{name}.{p}" for name, lin, _ in layers for p in ("weight", "bias")}
            ok = set(self.keys) <= linear
        if not ok:
            if want:
                raise ValueError("structured Hessian-vector products need an nn.Sequential of Linear layers and "
                                 "element-wise activations, 2-D inputs and no custom forward")
            return None
        return _StructuredMLP(self, layers)

    def _batch_loss(self, x: Any, t: Any) -> Callable[[dict[str, Tensor]], Tensor]:
        n = float(self.n)

        def f(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(self.module, {**self.fixed, **p}, (x,))
            return per_sample_losses(self.loss_fn, out, t).sum() / n

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
        if self._mlp is not None:
            chunks = [self._mlp.matmul(rows[s : s + self.tangent_chunk], list(idx))
                      for s in range(0, rows.shape[0], self.tangent_chunk)]
            out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            self.products += rows.shape[0]
            return out.mul_(weight) if weight != 1.0 else out
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


# --------------------------------------------------------------------------- structured path

#: element-wise modules the structured path differentiates through (their first and second derivatives)
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Identity,
               nn.Dropout)


def _alias_names(model: nn.Module) -> set[str]:
    """Return the names under which a tied parameter or buffer appears besides its canonical (first) name."""
    every = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    every += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    canonical = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return set(every) - canonical


def _mlp_layers(model: nn.Module) -> list[tuple[str, nn.Linear, list[nn.Module]]] | None:
    """Return [(name, Linear, element-wise modules after it)] when ``model`` is an nn.Sequential of Linear layers
    and element-wise activations ending in a Linear layer, with no module used twice and no tied parameter, else None."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return None
    if len({id(m) for m in model}) != len(model) or _alias_names(model):
        return None  # the hand-written products would treat each use as its own parameter
    layers: list[tuple[str, nn.Linear, list[nn.Module]]] = []
    for name, mod in model.named_children():
        if isinstance(mod, nn.Linear):
            layers.append((name, mod, []))
        elif isinstance(mod, ELEMENTWISE) and layers:
            layers[-1][2].append(mod)
        else:
            return None
    if layers[-1][2]:
        return None
    return layers


class _MLPBatch:
    """What one data batch contributes to Hessian-vector products of an MLP, precomputed once.

    Per Linear layer l: its input a_{l-1} (n, in), the gradient of the batch's loss share
    with respect to its output delta_l (n, out), and for the activation after it its
    first derivative (n, out) and, if not identically zero, the second derivative times
    the back-propagated gradient (n, out); for the output, the per-sample output Hessian
    of the loss share Lambda_i (n, C, C).
    """

    def __init__(self, weights: list[Tensor], biases: list[Tensor | None], acts: list[nn.Module], x: Tensor,
                 out_hessian: Callable[[Tensor], tuple[Tensor, Tensor]]):
        self.inputs, self.d1, self.c2, self.delta = [], [], [], []
        a = x
        zs = []
        for k, (w, b) in enumerate(zip(weights, biases)):
            self.inputs.append(a)
            z = a @ w.T if b is None else torch.addmm(b, a, w.T)
            zs.append(z)
            if k < len(weights) - 1:
                zz = z.detach().requires_grad_()
                with torch.enable_grad():
                    y = acts[k](zz)
                    (d1,) = torch.autograd.grad(y.sum(), zz, create_graph=True)
                    d2 = torch.autograd.grad(d1.sum(), zz, allow_unused=True)[0] if d1.requires_grad else None
                a = y.detach()
                self.d1.append(d1.detach())
                self.c2.append(None if d2 is None or not bool(d2.any()) else d2)
        g, self.lam = out_hessian(zs[-1])  # (n, C), (n, C, C): the loss share's gradient and per-sample Hessian
        self.delta = [None] * len(weights)
        self.delta[-1] = g
        for k in range(len(weights) - 1, 0, -1):
            back = g @ weights[k]  # gradient w.r.t. the activation a_{k-1}
            if self.c2[k - 1] is not None:
                self.c2[k - 1] = self.c2[k - 1] * back
            g = back * self.d1[k - 1]
            self.delta[k - 1] = g
        # [a, 1]: the forward tangent GEMM then carries the bias tangent, with no broadcast copy into its output
        self.inputs1 = [torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1) for a in self.inputs]

    def rows(self, start: int, stop: int) -> "_MLPBatch":
        """Return the share of samples ``start:stop`` (views of this batch's tensors)."""
        part = object.__new__(_MLPBatch)
        for key in ("inputs", "inputs1", "d1", "c2", "delta"):
            setattr(part, key, [None if t is None else t[start:stop] for t in getattr(self, key)])
        part.lam = self.lam[start:stop]
        return part

    def cast(self, dtype: torch.dtype) -> None:
        """Hold every precomputed tensor in dtype (for products in reduced precision)."""
        def to(t):
            return None if t is None else t.to(dtype)

        self.inputs, self.inputs1, self.d1, self.c2, self.delta = (
            [to(t) for t in ts] for ts in (self.inputs, self.inputs1, self.d1, self.c2, self.delta))
        self.lam = to(self.lam)


def _stack_rows(dw: Tensor, db: Tensor | None) -> Tensor:
    """Return dW (m, out, in) as (in, m * out), with db (m, out) appended as row ``in`` when given."""
    m, out, inp = dw.shape
    rows = dw.new_empty(inp + (db is not None), m * out)
    rows[:inp].view(inp, m, out).copy_(dw.permute(2, 0, 1))
    if db is not None:
        rows[inp].view(m, out).copy_(db)
    return rows


def _accumulate(sums: list[Tensor | None], k: int, a: Tensor, b: Tensor) -> None:
    """sums[k] += a @ b, the first time as a plain GEMM (no zero-filled buffer)."""
    sums[k] = a @ b if sums[k] is None else sums[k].addmm_(a, b)


class _StructuredMLP:
    """Exact Hessian-vector products of the mean loss of an nn.Sequential MLP, by hand-written forward-over-reverse.

    The same products as the torch.func path (to rounding), with the per-vector
    products batched into a few large GEMMs (additions fused into them), the
    activations' derivatives and the output Hessian precomputed once per data batch.
    """

    def __init__(self, hess: "MeanLossHessian", layers: list[tuple[str, nn.Linear, list[nn.Module]]]):
        self.hess = hess
        prefix = lambda n: n  # noqa: E731 - no forward wrapper on this path
        params = {**hess.fixed, **hess.params}
        index = {k: i for i, k in enumerate(hess.keys)}
        self.w, self.b, self.acts, self.wi, self.bi = [], [], [], [], []
        for name, lin, acts in layers:
            wk, bk = prefix(f"{name}.weight"), prefix(f"{name}.bias")
            self.w.append(params[wk])
            self.b.append(params[bk] if lin.bias is not None else None)
            self.acts.append(nn.Sequential(*acts))
            self.wi.append(index.get(wk))
            self.bi.append(index.get(bk) if lin.bias is not None else None)
        self.batches: list[_MLPBatch] | None = None
        # bfloat16: the GEMMs of the products in bf16 (fp32 accumulation inside each GEMM), results back in the
        # Hessian's dtype: faster GEMMs on a CPU with native bf16 (AVX-512 BF16); on the digits MLP the scores are
        # unchanged to 1e-5
        self.product_dtype: torch.dtype | None = None

    def _out_hessian(self, t: Any) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        loss_fn, n = self.hess.loss_fn, float(self.hess.n)

        def fn(out: Tensor) -> tuple[Tensor, Tensor]:
            def total(o):
                return per_sample_losses(loss_fn, o, t).sum() / n

            c = out.shape[1]
            eye = torch.eye(c, dtype=out.dtype, device=out.device)
            g = grad(total)(out)
            cols = vmap(lambda v: jvp(grad(total), (out,), (v,))[1])(eye[:, None, :].expand(c, *out.shape))
            lam = cols.permute(1, 2, 0)  # (n, C, C): column j = d grad / d out_j
            return g, (lam + lam.transpose(1, 2)) / 2

        return fn

    def _prepare(self) -> list[_MLPBatch]:
        if self.batches is None:
            hess = self.hess
            with model_guard(hess.model), torch.no_grad():
                hess.model.eval()
                if all(isinstance(t, Tensor) for _, t in hess.batches):
                    # one pass over all samples (per-call overheads dominate small batches), split into views
                    whole = _MLPBatch(self.w, self.b, self.acts, torch.cat([x for x, _ in hess.batches]),
                                      self._out_hessian(torch.cat([t for _, t in hess.batches])))
                    ends = torch.tensor(hess.batch_sizes()).cumsum(0).tolist()
                    self.batches = [whole.rows(e - len(t), e) for e, (_, t) in zip(ends, hess.batches)]
                else:
                    self.batches = [_MLPBatch(self.w, self.b, self.acts, x, self._out_hessian(t))
                                    for x, t in hess.batches]
            if self.product_dtype is not None:
                self.w = [w.to(self.product_dtype) for w in self.w]
                for bt in self.batches:
                    bt.cast(self.product_dtype)
        return self.batches

    def matmul(self, rows: Tensor, idx: Sequence[int]) -> Tensor:
        """Return rows @ (sum of the chosen batches' Hessian shares), rows (m, P).

        Tangents are laid out (samples, vectors, width), so that every product over the
        vectors is one 2-D GEMM (no batched or broadcast matmuls).
        """
        batches = self._prepare()
        if self.product_dtype is not None:
            return self._matmul(rows.to(self.product_dtype), idx, batches).to(rows.dtype)
        return self._matmul(rows, idx, batches)

    def _matmul(self, rows: Tensor, idx: Sequence[int], batches: list[_MLPBatch]) -> Tensor:
        hess = self.hess
        m = rows.shape[0]
        parts = rows.split(hess.sizes, dim=1)
        dw = [None if i is None else parts[i].view(m, *hess.shapes[i]) for i in self.wi]  # strided views, no copy
        db = [None if i is None else parts[i] for i in self.bi]
        # right operands of the tangent GEMMs: dW_l as (in, m * out), with db_l appended as row ``in`` when the bias
        # is chosen too (the inputs then carry a ones column), and as (out, m * in)
        dw_in = [None if d is None else _stack_rows(d, db[k]) for k, d in enumerate(dw)]
        dw_out = [None if d is None else d.transpose(0, 1).reshape(d.shape[1], -1) for d in dw]
        # sums over the data batches, created by the first batch's GEMM: gw_l (out, m * in), gwt_l (m * out, in)
        gw: list[Tensor | None] = [None] * len(dw)
        gwt: list[Tensor | None] = [None] * len(dw)
        gb: list[Tensor | None] = [None] * len(dw)
        nl = len(self.w)
        for bi in idx:
            bt = batches[bi]
            n = bt.inputs[0].shape[0]
            # forward tangents: dz_l = a_{l-1} dW_l^T + db_l + da_{l-1} W_l^T, da_l = act'(z_l) dz_l
            dzs, das = [], [None]
            da = None
            for k in range(nl):
                a, w = bt.inputs[k], self.w[k]
                out_k = w.shape[0]
                dz = None
                if dw[k] is not None:
                    dz = ((a if db[k] is None else bt.inputs1[k]) @ dw_in[k]).view(n, m, out_k)
                elif db[k] is not None:
                    dz = db[k][None].expand(n, m, out_k).clone()
                if da is not None:
                    if dz is None:
                        dz = (da.view(n * m, -1) @ w.T).view(n, m, out_k)
                    else:
                        dz.view(n * m, out_k).addmm_(da.view(n * m, -1), w.T)
                dzs.append(dz)
                if k < nl - 1:  # dz itself is needed later only for the second-derivative term
                    d1 = bt.d1[k][:, None, :]
                    da = None if dz is None else (dz * d1 if bt.c2[k] is not None else dz.mul_(d1))
                    das.append(da)
            # backward tangents: ddelta_L = Lambda dz_L; ddelta_{l-1} = (ddelta_l W_l + delta_l dW_l) act' + c2 dz
            dd = None if dzs[-1] is None else torch.bmm(dzs[-1], bt.lam)  # Lambda symmetric
            for k in range(nl - 1, -1, -1):
                a, delta, w = bt.inputs[k], bt.delta[k], self.w[k]
                out_k, in_k = w.shape
                if dw[k] is not None:
                    if dd is not None:
                        _accumulate(gwt, k, dd.view(n, m * out_k).T, a)
                    if das[k] is not None:
                        _accumulate(gw, k, delta.T, das[k].view(n, m * in_k))
                if db[k] is not None and dd is not None:
                    gb[k] = dd.sum(0) if gb[k] is None else gb[k].add_(dd.sum(0))
                if k == 0:
                    break
                back = None
                if dw[k] is not None:
                    back = (delta @ dw_out[k]).view(n, m, in_k)
                if dd is not None:  # accumulated into the first term by the GEMM itself
                    if back is None:
                        back = (dd.view(n * m, out_k) @ w).view(n, m, in_k)
                    else:
                        back.view(n * m, in_k).addmm_(dd.view(n * m, out_k), w)
                nxt = None if back is None else back.mul_(bt.d1[k - 1][:, None, :])
                if bt.c2[k - 1] is not None and dzs[k - 1] is not None:
                    extra = dzs[k - 1] * bt.c2[k - 1][:, None, :]
                    nxt = extra if nxt is None else nxt.add_(extra)
                dd = nxt
        out = rows.new_zeros(m, hess.dim) if not idx else rows.new_empty(m, hess.dim)
        blocks = out.split(hess.sizes, dim=1)
        for k in range(nl):
            if self.wi[k] is not None:
                target = blocks[self.wi[k]].view(m, *self.w[k].shape)  # written in place: no concatenation
                direct = None if gwt[k] is None else gwt[k].view_as(target)
                crossed = None if gw[k] is None else gw[k].view(target.shape[1], m, -1).transpose(0, 1)
                if direct is not None and crossed is not None:
                    torch.add(direct, crossed, out=target)
                elif direct is not None or crossed is not None:
                    target.copy_(direct if direct is not None else crossed)
                else:
                    target.zero_()
            if self.bi[k] is not None:
                if gb[k] is None:
                    blocks[self.bi[k]].zero_()
                else:
                    blocks[self.bi[k]].copy_(gb[k])
        return out
