"""TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale"), without modifying the model.

Per checkpoint m (the paper's ensemble of independently trained models; checkpoints of one run
are the cheap variant):

* phi(z) = P_m^T grad_theta f(z; theta_m), the gradient of the model output function over the
  selected parameters, randomly projected (seeded Gaussian P_m, a fresh one per checkpoint as in
  the paper; :class:`.per_sample.RandomProjection`).  For classification f is the margin
  f(z) = log(p_y / (1 - p_y)) = logit_y - logsumexp(other logits).
* Phi_m stacks phi over the train set; Q_m = diag(1 - p_i), p_i the train sample's probability of
  its label.

The score is the paper's Algorithm 1 (also dattri's ``TRAKAttributor``):

    tau(z'_j, z_i) = [mean_m phi_m(z'_j)^T (Phi_m^T Phi_m + lambda I)^{-1} phi_m(z_i)] * [mean_m Q_m]_ii

the kernel part and Q averaged separately (the "unprojection" step of the paper averages the
features-times-kernel products over the ensemble, then multiplies by the averaged Q).

Phi^T Phi is singular more often than not: the margin does not change when every logit moves by the
same amount, so its gradient w.r.t. the last layer's weight and bias always lies in a subspace of
dimension (hidden + 1) less than the layer's (on top of rank <= n_train).  The kernel is therefore
solved in float64 through an eigendecomposition of Phi^T Phi; with no ridge, as a pseudo-inverse over
the eigenvalues at zero (numerically: Phi's singular values below dim * eps * the largest, eps of the
gradients' dtype, as numpy's ``matrix_rank``).  Train and test gradients both lie in that subspace, so
this is the lambda -> 0 limit of the scores.

Sign: TRAK estimates how much including z_i raises the test sample's margin, so positive = the
training sample is a proponent (it raises the correct-class margin), as for every other method of
this package.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .model_calls import ForwardFn, LossFn, call_model, iter_batches, model_device, model_guard, reiterable, to_device
from .per_sample import RandomProjection, iter_per_sample_grads, selected_parameter_names
from .topk import RunningTopK, TopK
from .tracin import _groups

__all__ = ["TRAK", "margin"]

#: default relative ridge: lambda = RELATIVE_DAMPING * trace(Phi^T Phi) / projection_dim
RELATIVE_DAMPING = 1e-6

OutputFn = Callable[[Tensor, Any], Tensor]


def margin(outputs: Tensor, targets: Tensor) -> Tensor:
    """Return the per-sample margin log(p_y / (1 - p_y)) = logit_y - logsumexp(other logits), shape (n,)."""
    if outputs.dim() != 2 or outputs.shape[1] < 2:
        raise ValueError(f"the margin needs logits of shape (n, classes >= 2), got {tuple(outputs.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError("the margin needs integer class labels as targets")
    label = torch.arange(outputs.shape[1], device=outputs.device) == targets[:, None]
    correct = torch.where(label, outputs, torch.zeros_like(outputs)).sum(1)
    others = torch.where(label, torch.full_like(outputs, float("-inf")), outputs).logsumexp(1)
    return correct - others


class TRAK:
    """TRAK scores over an ensemble of checkpoints (see the module docstring), positive = proponent.

    ``checkpoints``: state_dicts, or ``(state_dict, weight)`` pairs as TracInCP takes them (the weight is
    ignored: the ensemble is a plain mean, as in the paper), or one state_dict.  ``loss_fn`` is not used
    (TRAK differentiates the output function, not the loss); it is accepted so every method can be built
    with the same arguments.  ``output="margin"`` needs logits (n, classes) and integer labels; a callable
    ``output(outputs, targets) -> (n,)`` replaces the margin, with Q = 1 (no train reweighting).

    ``projection_dim``: the Gaussian projection's dimension (seeded by ``seed`` and the checkpoint's
    index); None = no projection (the exact gradients).  Any positive dimension projects, even one at or
    above the parameter count: the scores are invariant to an invertible map of the features, so a square
    projection reproduces the unprojected scores (with no ridge).

    ``damping``: the ridge lambda added to Phi^T Phi.  None (default) = a relative ridge,
    1e-6 * trace(Phi^T Phi) / dim (the mean eigenvalue): it keeps the solve well posed when Phi^T Phi is
    singular or ill conditioned (always so when n_train < projection_dim, the usual case in small studies),
    does not depend on the scale of the gradients or of the projection, keeps float32 rounding in
    the near-null directions from being amplified, and moves well-conditioned scores by about 1e-6
    relative.  A float >= 0 is an absolute ridge; 0 is the paper's (and dattri's default)
    unregularised kernel, a pseudo-inverse where Phi^T Phi is singular (see the module docstring).

    ``layer``, ``forward``, ``batch_size``, data arguments and devices as :class:`.TracInCP`: gradients
    are taken in eval mode where the model lives, checkpoints are loaded into the model and its state,
    modes and flags restored afterwards, and scores come back on the model's device in the dtype of its
    selected parameters (the kernel itself is solved in float64).
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Iterable[Mapping[str, Tensor] | tuple[Mapping[str, Tensor], Any]] | Mapping[str, Tensor],
        loss_fn: LossFn | None = None,
        *,
        projection_dim: int | None = 2048,
        damping: float | None = None,
        seed: int = 0,
        batch_size: int = 512,
        forward: ForwardFn | None = None,
        layer: str | Sequence[str] | None = None,
        output: str | OutputFn = "margin",
    ):
        if projection_dim is not None and (isinstance(projection_dim, bool) or int(projection_dim) <= 0):
            raise ValueError(f"projection_dim must be a positive integer or None, got {projection_dim!r}")
        if damping is not None and not float(damping) >= 0:
            raise ValueError(f"damping must be >= 0 or None (relative ridge), got {damping!r}")
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        if output != "margin" and not callable(output):
            raise ValueError(f"output must be 'margin' or a callable (outputs, targets) -> (n,), got {output!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.layers = None if layer is None else ([layer] if isinstance(layer, str) else list(layer))
        self.forward = forward
        self.batch_size = int(batch_size)
        self.damping = None if damping is None else float(damping)
        self.output: OutputFn = margin if output == "margin" else output
        self.param_names = selected_parameter_names(model, self.layers)
        self.states = _states(checkpoints)
        self.projections = [None if projection_dim is None else RandomProjection(int(projection_dim), seed + 7919 * m)
                            for m in range(len(self.states))]

    # ------------------------------------------------------------------ helpers

    def _dtype(self) -> torch.dtype:
        return self.model.get_parameter(self.param_names[0]).dtype

    def _features(self, m: int, inputs: Any, targets: Any):
        """Yield per batch the projected output gradients (b, k) at the loaded checkpoint m, in float64."""
        for g in iter_per_sample_grads(self.model, self.param_names, inputs, targets, self.output, self.forward,
                                       self.batch_size, self.projections[m]):
            yield g.to(torch.float64)

    def _q(self, inputs: Any, targets: Any) -> Tensor:
        """Return Q's diagonal 1 - p_i = sigmoid(-margin_i) (ones for a custom output), float64 (n,)."""
        device, rows = model_device(self.model), []
        with torch.no_grad(), model_guard(self.model):
            self.model.eval()
            for x, t in iter_batches(inputs, targets, self.batch_size):
                if self.forward is None:
                    x = to_device(x, device)
                t = to_device(t, device)
                if self.output is margin:
                    rows.append(torch.sigmoid(-margin(call_model(self.model, self.forward, x), t).double()))
                else:
                    rows.append(torch.ones(len(t), dtype=torch.float64, device=device))
        return torch.cat(rows)

    def _fit(self, m: int, inputs: Any, targets: Any, keep: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """Load checkpoint m and return (whitening W with W W^T = (Phi^T Phi + lambda I)^+, Phi or None, Q)."""
        self.model.load_state_dict(self.states[m])
        gram, kept = None, []
        for g in self._features(m, inputs, targets):
            gram = g.T @ g if gram is None else gram.addmm_(g.T, g)
            if keep:
                kept.append(g)
        if gram is None:
            raise ValueError("the train set is empty")
        return self._whitener(gram), (torch.cat(kept) if keep else None), self._q(inputs, targets)

    def _whitener(self, gram: Tensor) -> Tensor:
        """Return W (k, k) with W W^T = (gram + lambda I)^{-1}; without a ridge, the pseudo-inverse."""
        k = gram.shape[0]
        lam = RELATIVE_DAMPING * gram.diagonal().sum() / k if self.damping is None else gram.new_tensor(self.damping)
        values, vectors = torch.linalg.eigh(gram)
        values = values.clamp_min(0)
        if lam > 0:
            return vectors * (values + lam).rsqrt()
        # numerical rank: numpy's matrix_rank on Phi (singular values) in the gradients' precision, and no finer
        # than eigh's own float64 precision on Phi^T Phi
        eps = torch.finfo(self._dtype()).eps
        cutoff = values.max() * max(k * torch.finfo(torch.float64).eps, (k * eps) ** 2)
        return vectors * torch.where(values > cutoff, values.clamp_min(cutoff).rsqrt(), torch.zeros_like(values))

    def _test_features(self, m: int, w: Tensor, inputs: Any, targets: Any) -> Tensor:
        """Return the whitened test features phi' W (n_test, k) at the loaded checkpoint m."""
        return torch.cat([g @ w for g in self._features(m, inputs, targets)])

    # ------------------------------------------------------------------ public

    def influence(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any) -> Tensor:
        """Return TRAK scores, a (n_train, n_test) tensor (positive = proponent)."""
        train_inputs, test_inputs = reiterable(train_inputs), reiterable(test_inputs)
        kernel, q = None, None
        with model_guard(self.model, restore_state=True):
            for m in range(len(self.states)):
                w, phi, q_m = self._fit(m, train_inputs, train_targets, keep=True)
                part = (phi @ w) @ self._test_features(m, w, test_inputs, test_targets).T
                kernel = part if kernel is None else kernel.add_(part)
                q = q_m if q is None else q.add_(q_m)
        n = len(self.states)
        return (kernel * (q / n**2)[:, None]).to(self._dtype())

    def self_influence(self, train_inputs: Any, train_targets: Any) -> Tensor:
        """Return TRAK self-influence tau(z_i, z_i), a (n_train,) tensor."""
        train_inputs = reiterable(train_inputs)
        kernel, q = None, None
        with model_guard(self.model, restore_state=True):
            for m in range(len(self.states)):
                w, phi, q_m = self._fit(m, train_inputs, train_targets, keep=True)
                part = (phi @ w).pow(2).sum(1)
                kernel = part if kernel is None else kernel.add_(part)
                q = q_m if q is None else q.add_(q_m)
        n = len(self.states)
        return (kernel * q / n**2).to(self._dtype())

    def top_k(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any, k: int = 10,
              chunk: int = 4096, progress: Callable[[int, int], None] | None = None) -> TopK:
        """Return the k proponents / opponents in train of each test sample as :class:`.TopK`, each field (n_test, k).

        One pass over the train set per checkpoint builds the kernels and Q; a second scores ``chunk``
        train rows at a time (the full matrix is never built).  ``progress(done_rows, total_rows)`` is
        called per chunk (total -1 when the train set is an iterable of unknown length).
        """
        train_inputs, test_inputs = reiterable(train_inputs), reiterable(test_inputs)
        n = len(self.states)
        acc = RunningTopK(k)
        with model_guard(self.model, restore_state=True):
            whiteners, tests, q = [], [], None
            for m in range(n):
                w, _, q_m = self._fit(m, train_inputs, train_targets, keep=False)
                whiteners.append(w)
                tests.append(self._test_features(m, w, test_inputs, test_targets))
                q = q_m if q is None else q.add_(q_m)
            q = q / n**2
            total = len(train_targets) if train_targets is not None else -1
            offset = 0
            for group in _groups(iter_batches(train_inputs, train_targets, self.batch_size), chunk):
                scores = None
                for m in range(n):
                    self.model.load_state_dict(self.states[m])
                    # (n_test, chunk), handed over transposed: top-k then runs along contiguous rows
                    part = tests[m] @ (torch.cat(list(self._features(m, group, None))) @ whiteners[m]).T
                    scores = part if scores is None else scores.add_(part)
                scores = scores.mul_(q[offset : offset + scores.shape[1]]).to(self._dtype())
                acc.update(scores.T, offset)
                offset += scores.shape[1]
                if progress is not None:
                    progress(offset, total)
        return acc.result()


def _states(checkpoints: Any) -> list[Mapping[str, Tensor]]:
    """Return the state_dicts of ``checkpoints`` (state_dicts, (state_dict, weight) pairs or one state_dict)."""
    if isinstance(checkpoints, Mapping):
        checkpoints = [checkpoints]
    states = []
    for c in checkpoints:
        if isinstance(c, (tuple, list)) and len(c) == 2 and isinstance(c[0], Mapping):
            c = c[0]
        if not isinstance(c, Mapping):
            raise ValueError(f"a checkpoint must be a state_dict or a (state_dict, weight) pair, got {type(c).__name__}")
        states.append(c)
    if not states:
        raise ValueError("TRAK needs at least one checkpoint")
    return states
