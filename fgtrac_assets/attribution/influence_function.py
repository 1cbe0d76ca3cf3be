"""Influence functions at the final model (Koh & Liang 2017), with the damping explicit and reported.

Score convention (the same sign as TracInCP: positive = proponent, the sample helped):

    influence(z, z') = grad l(z)^T (H + damping I)^{-1} grad l(z')

with H the Hessian of the FULL mean training loss (1/n) sum_i l(z_i) over the chosen
parameters at the final parameters.  This is minus Koh & Liang's I_up,loss(z, z'):
removing z (upweighting by -1/n) changes the test loss by about influence(z, z') / n,
so a positive score means the test loss would rise without z -- the same direction as
Wei et al.'s further-training gold standard (loss without z minus loss with z).  With
damping = 0 and a positive definite H it is the classical influence function; damping
> 0 is the proximal / L2-regularised variant (Wei et al.'s Proposition 1 assumes one).

Three solvers (``method``): "explicit" (dense Hessian, for at most
``max_explicit_params`` parameters), "cg" and "lissa" (Hessian-vector products only,
see :mod:`.ihvp`).  The inverse is applied to the TEST gradients, all test samples of a
``test_batch_size`` block at once; train gradients then enter through one GEMM.
"""

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .hessian import MeanLossHessian, snapshot_state
from .ihvp import ExplicitInverse, solve_block_cg, solve_cg, solve_lissa
from .preconditioner import PRECONDITIONERS, KroneckerPreconditioner
from .model_calls import ForwardFn, LossFn, model_guard, reiterable
from .per_sample import iter_per_sample_grads, per_sample_grads, selected_parameter_names
from .topk import RunningTopK, TopK

__all__ = ["InfluenceFunction"]

_METHODS = ("explicit", "cg", "lissa")


class InfluenceFunction:
    """Influence-function scores g(z)^T (H + damping I)^{-1} g(z') at the final parameters, without modifying the model.

    ``train_inputs`` / ``train_targets`` are the full training set that defines H
    (tensors, or an iterable of ``(inputs, targets)`` batches such as a DataLoader with
    ``train_targets=None``).  ``layer`` names the submodule(s) whose parameters are used
    (None: all trainable parameters); ``state_dict`` gives the final parameters (default:
    the model's state when this object is built).  ``loss_fn`` returns per-sample losses;
    ``forward(model, inputs)`` is optional as in :class:`.TracInCP`.

    Solver settings: ``damping`` (added to H, reported); CG: ``max_iter``, ``tol``
    (relative residual), ``cg_block`` (True: block CG over a test block, the default;
    False: independent CG per test sample), ``preconditioner`` (None, the default: plain block
    CG; "kfac" / "ekfac": block CG preconditioned by (E)K-FAC factors of the Linear layers, the
    same solution -- on the digits MLP with an indefinite Hessian it did not save iterations,
    see :mod:`.preconditioner`); LiSSA: ``scale`` (None: 0.6 x the estimated top eigenvalue of
    H + damping I, the recursion needs all eigenvalues below 2 x scale), ``depth``
    (steps), ``tol``, ``lissa_batch_size`` (None: exact full-data products, deterministic,
    stopping at ``tol``; k: each step uses one sampled batch of k training samples, all
    ``depth`` steps run), ``repeat`` and ``seed`` (sampled mode).  ``hvp_batch_size``:
    samples per batch of the exact products; ``product_dtype`` (None: the model's dtype;
    ``torch.bfloat16``: the products' GEMMs in bf16, MLPs only -- faster on a CPU with native
    bf16, with the same Pearson to the exact scores on the digits MLP).  :meth:`report` returns what the last solves did.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_inputs: Any,
        train_targets: Any = None,
        layer: str | list[str] | None = None,
        forward: ForwardFn | None = None,
        state_dict: dict[str, Tensor] | None = None,
        method: str = "cg",
        damping: float = 1e-3,
        max_iter: int = 100,
        tol: float = 1e-4,
        cg_block: bool = True,
        preconditioner: str | None = None,
        scale: float | None = None,
        depth: int = 1000,
        lissa_batch_size: int | None = None,
        repeat: int = 1,
        seed: int = 0,
        batch_size: int = 512,
        hvp_batch_size: int = 256,
        test_batch_size: int = 256,
        max_explicit_params: int = 8192,
        product_dtype: torch.dtype | None = None,
    ):
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}")
        if damping < 0:
            raise ValueError("damping must be >= 0")
        if preconditioner is not None and preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS} or None")
        self.model = model
        self.loss_fn = loss_fn
        self.layers = None if layer is None else ([layer] if isinstance(layer, str) else list(layer))
        self.forward = forward
        self.state = snapshot_state(model, state_dict)
        self.method = method
        self.damping = float(damping)
        self.max_iter, self.tol, self.cg_block = int(max_iter), float(tol), bool(cg_block)
        self.preconditioner = preconditioner
        self._precond: KroneckerPreconditioner | None = None
        self.scale, self.depth = scale, int(depth)
        self.stochastic = lissa_batch_size is not None
        self.repeat, self.seed = int(repeat), int(seed)
        self.batch_size, self.test_batch_size = int(batch_size), int(test_batch_size)
        self.max_explicit_params = int(max_explicit_params)
        self.product_dtype = product_dtype
        self.param_names = selected_parameter_names(model, self.layers)
        self._train_data = (reiterable(train_inputs), train_targets)
        self._hvp_batch = int(lissa_batch_size) if self.stochastic else int(hvp_batch_size)
        self._hessian: MeanLossHessian | None = None
        self._explicit: ExplicitInverse | None = None
        self._solves: list[dict] = []
        self._seconds = {"hessian": 0.0, "solve": 0.0, "gradients": 0.0}

    # ------------------------------------------------------------------ pieces

    @property
    def n_params(self) -> int:
        """Number of parameters the Hessian is taken over."""
        return sum(self.model.get_parameter(n).numel() for n in self.param_names)

    def hessian(self) -> MeanLossHessian:
        """Return the Hessian operator of the full mean training loss (built once)."""
        if self._hessian is None:
            t0 = time.perf_counter()
            self._hessian = MeanLossHessian(
                self.model, self.param_names, self.state, *self._train_data, self.loss_fn, self.forward,
                batch_size=self._hvp_batch, product_dtype=self.product_dtype,
            )
            self._seconds["hessian"] += time.perf_counter() - t0
        return self._hessian

    def _explicit_inverse(self) -> ExplicitInverse:
        if self._explicit is None:
            if self.n_params > self.max_explicit_params:
                self.hessian().matrix(self.max_explicit_params)  # raises the explanatory ValueError
            t0 = time.perf_counter()
            self._explicit = ExplicitInverse(self.hessian().matrix(self.max_explicit_params), self.damping)
            self._seconds["hessian"] += time.perf_counter() - t0
        return self._explicit

    def _lissa_apply(self) -> Callable[[Tensor], Tensor]:
        hess = self.hessian()
        if not self.stochastic:
            return hess.matmul
        sizes = torch.tensor(hess.batch_sizes(), dtype=torch.float64)
        gen = torch.Generator().manual_seed(self.seed)

        def sampled(rows: Tensor) -> Tensor:  # unbiased: batch b w.p. n_b / n, weighted n / n_b
            b = int(torch.multinomial(sizes, 1, generator=gen))
            return hess.matmul(rows, [b], weight=float(hess.n / sizes[b]))

        return sampled

    def solve(self, rows: Tensor) -> Tensor:
        """Return (H + damping I)^{-1} applied to each row of ``rows`` (m, P), ``test_batch_size`` rows at a time."""
        out = []
        for s in range(0, rows.shape[0], self.test_batch_size):
            block = rows[s : s + self.test_batch_size]
            t0 = time.perf_counter()
            if self.method == "explicit":
                x = self._explicit_inverse().solve(block)
                rep = dict(self._explicit.report, solver="explicit")
            elif self.method == "cg" and self.cg_block:
                x, rep = solve_block_cg(self.hessian().matmul, block, self.damping, self.max_iter, self.tol,
                                        self._preconditioner())
            elif self.method == "cg":
                x, rep = solve_cg(self.hessian().matmul, block, self.damping, self.max_iter, self.tol)
            else:
                x, rep = solve_lissa(self._lissa_apply(), block, self.damping, self._lissa_scale(), self.depth,
                                     self.tol, self.stochastic, self.repeat)
                self.scale = rep["scale"]  # a restart doubled it: keep the scale that converged
            rep["rows"] = int(block.shape[0])
            rep["seconds"] = time.perf_counter() - t0
            self._solves.append(rep)
            out.append(x)
        return torch.cat(out) if out else rows.new_zeros(rows.shape)

    def _preconditioner(self) -> KroneckerPreconditioner | None:
        """Return the (E)K-FAC preconditioner of block CG (built once), or None without one."""
        if self.preconditioner is None:
            return None
        if self._precond is None:
            t0 = time.perf_counter()
            self._precond = KroneckerPreconditioner(self.hessian(), self.damping, self.preconditioner)
            self._seconds["preconditioner"] = time.perf_counter() - t0
        return self._precond

    def _lissa_scale(self) -> float:
        if self.scale is None:
            self.scale = 0.6 * self.hessian().top_eigenvalue(self.damping, seed=self.seed)
            if self.scale <= 0:
                raise ValueError("H + damping I has no positive eigenvalue: LiSSA cannot converge; raise damping")
        return float(self.scale)

    def _grads(self, inputs: Any, targets: Any, batch_size: int | None = None):
        return iter_per_sample_grads(self.model, self.param_names, inputs, targets, self.loss_fn, self.forward,
                                     batch_size or self.batch_size)

    def _test_solution(self, test_inputs: Any, test_targets: Any) -> Tensor:
        t0 = time.perf_counter()
        g = per_sample_grads(self.model, self.param_names, test_inputs, test_targets, self.loss_fn, self.forward,
                             self.batch_size)
        self._seconds["gradients"] += time.perf_counter() - t0
        return self.solve(g)

    @contextlib.contextmanager
    def _at_final(self):
        with model_guard(self.model, restore_state=True):
            self.model.load_state_dict(self.state)
            yield

    # ------------------------------------------------------------------ public

    def influence(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any) -> Tensor:
        """Return influence scores (n_train, n_test); positive = removing the train sample raises the test loss."""
        train_inputs, test_inputs = reiterable(train_inputs), reiterable(test_inputs)
        with self._at_final():
            x_t = self._test_solution(test_inputs, test_targets).T
            t0 = time.perf_counter()
            out = torch.cat([g @ x_t for g in self._grads(train_inputs, train_targets)])
            self._seconds["gradients"] += time.perf_counter() - t0
            return out

    def self_influence(self, train_inputs: Any, train_targets: Any) -> Tensor:
        """Return g(z)^T (H + damping I)^{-1} g(z) per train sample (n_train,): the diagonal of :meth:`influence`."""
        train_inputs = reiterable(train_inputs)
        with self._at_final():
            return torch.cat([(g * self.solve(g)).sum(1) for g in self._grads(train_inputs, train_targets)])

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
        """Return the k proponents / opponents in train per test sample as :class:`.TopK`, each field (n_test, k)."""
        train_inputs, test_inputs = reiterable(train_inputs), reiterable(test_inputs)
        with self._at_final():
            solution = self._test_solution(test_inputs, test_targets)
            total = len(train_targets) if train_targets is not None else -1
            acc, offset = RunningTopK(k), 0
            for g in self._grads(train_inputs, train_targets, min(self.batch_size, int(chunk))):
                acc.update((solution @ g.T).T, offset)  # (n_test, chunk) in memory: top-k along contiguous rows
                offset += g.shape[0]
                if progress is not None:
                    progress(offset, total)
            return acc.result()

    def report(self) -> dict:
        """Return the settings and what the solves did: damping, iterations, residuals, products, timings."""
        solves = self._solves
        out = {
            "method": self.method, "damping": self.damping, "params": self.n_params,
            "layers": self.layers or "all trainable parameters", "solves": len(solves),
            "rows_solved": sum(s["rows"] for s in solves),
            "seconds": dict(self._seconds, solve=sum(s["seconds"] for s in solves)),
        }
        if self._hessian is not None:
            out["hessian_samples"] = self._hessian.n
            out["product_dtype"] = str(self._hessian.product_dtype).removeprefix("torch.")
            out["hessian_vector_products"] = self._hessian.products
        if self.method == "cg":
            out.update(max_iter=self.max_iter, tol=self.tol, block=self.cg_block,
                       preconditioner=self.preconditioner if self.cg_block else None)
            if self._precond is not None:
                out["preconditioner_report"] = dict(self._precond.report)
        if self.method == "lissa":
            out.update(scale=self.scale, depth=self.depth, tol=self.tol, sampled=self.stochastic,
                       repeat=self.repeat if self.stochastic else 1, seed=self.seed)
        if self._explicit is not None:
            out["explicit"] = dict(self._explicit.report)
        if solves:
            for key in ("iterations_max", "steps", "relative_residual_max", "not_converged", "negative_curvature",
                        "restarts"):
                vals = [s[key] for s in solves if s.get(key) is not None]
                if vals:
                    out[key] = max(vals) if key != "not_converged" else sum(vals)
        return out
