"""Final-model-only first-order scores: Grad-Dot and Grad-Cos (Wei et al. 2024, section 3).

* ``GradDot``: grad l(theta_f, z) . grad l(theta_f, z') -- TracInCP with the final
  parameters as its one checkpoint and step size 1, so it reuses TracInCP's paths
  (exact Linear-layer factors, else per-sample gradients) unchanged.  To first order it
  is the test-loss change of one SGD step over the data with sample z left out, divided
  by the step size and times n: positive = proponent.
* ``GradCos``: the cosine of the two gradients, in [-1, 1] (0 when either gradient is
  zero).  On the Linear-factor path the errors are divided by the gradient norms, which
  normalises the rank-one gradients exactly.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .ghost import Factors, factor_dot, factor_self_dot, top_k_from_factors
from .hessian import snapshot_state
from .per_sample import ForwardFn, LossFn, reiterable
from .topk import RunningTopK, TopK
from .tracin import TracInCP

__all__ = ["GradCos", "GradDot"]


class GradDot:
    """Grad-Dot scores at the final parameters, without modifying the model.

    Arguments as :class:`.TracInCP` minus the checkpoints: ``state_dict`` gives the final
    parameters (default: the model's state when this object is built).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        layer: str | list[str] | None = None,
        forward: ForwardFn | None = None,
        state_dict: dict[str, Tensor] | None = None,
        batch_size: int = 512,
        projection_dim: int | None = None,
        seed: int = 0,
        method: str = "auto",
    ):
        self.model = model
        self.state = snapshot_state(model, state_dict)
        self.tracin = TracInCP(model, [(self.state, 1.0)], loss_fn, layer=layer, forward=forward,
                               batch_size=batch_size, projection_dim=projection_dim, seed=seed, method=method)

    @property
    def path(self) -> str:
        """The computation path in use: "ghost" (Linear-layer factors) or "per_sample"."""
        return self.tracin.path

    def influence(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any) -> Tensor:
        """Return gradient dot products (n_train, n_test) at the final parameters."""
        return self.tracin.influence(train_inputs, train_targets, test_inputs, test_targets)

    def self_influence(self, train_inputs: Any, train_targets: Any) -> Tensor:
        """Return squared gradient norms |grad l(theta_f, z)|^2 (n_train,)."""
        return self.tracin.self_influence(train_inputs, train_targets)

    def top_k(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any, k: int = 10,
              chunk: int = 4096, progress: Callable[[int, int], None] | None = None) -> TopK:
        """Return the k proponents / opponents per test sample as :class:`.TopK`, each field (n_test, k)."""
        return self.tracin.top_k(train_inputs, train_targets, test_inputs, test_targets, k, chunk, progress)


def _unit_factors(factors: list[Factors]) -> list[Factors]:
    """Return the factors with errors divided by the gradient norm, so the gradients have norm 1 (or 0)."""
    norm = factor_self_dot(factors).sqrt()
    inv = torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))
    return [Factors(f.errors * inv[:, None], f.activations, f.bias) for f in factors]


def _unit_rows(g: Tensor) -> Tensor:
    norm = g.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))


class GradCos(GradDot):
    """Grad-Cos scores: cosine similarity of the loss gradients at the final parameters, in [-1, 1]."""

    def influence(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any) -> Tensor:
        """Return gradient cosines (n_train, n_test)."""
        tr = self.tracin
        train_inputs, test_inputs = reiterable(train_inputs), reiterable(test_inputs)

        def ghost() -> Tensor:
            tr._load(0)
            test_f = _unit_factors(tr._factors(test_inputs, test_targets))
            return factor_dot(_unit_factors(tr._factors(train_inputs, train_targets)), test_f)

        def general() -> Tensor:
            tr._load(0)
            test_t = _unit_rows(tr._grads_all(test_inputs, test_targets)).T
            return torch.cat([_unit_rows(g) @ test_t for g in tr._grads(train_inputs, train_targets)])

        return tr._run(ghost, general)

    def self_influence(self, train_inputs: Any, train_targets: Any) -> Tensor:
        """Return cos(g, g) per train sample (n_train,): 1, or 0 where the gradient is zero."""
        return (super().self_influence(train_inputs, train_targets) > 0).to(self._dtype())

    def _dtype(self) -> torch.dtype:
        return next(iter(self.state.values())).dtype if self.state else torch.get_default_dtype()

    def top_k(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any, k: int = 10,
              chunk: int = 4096, progress: Callable[[int, int], None] | None = None) -> TopK:
        """Return the k most / least similar train samples per test sample as :class:`.TopK`, each field (n_test, k)."""
        tr = self.tracin
        train_inputs, test_inputs = reiterable(train_inputs), reiterable(test_inputs)

        def ghost() -> TopK:
            tr._load(0)
            test_f = _unit_factors(tr._factors(test_inputs, test_targets))
            train_f = _unit_factors(tr._factors(train_inputs, train_targets))
            return top_k_from_factors([train_f], [test_f], [1.0], k, chunk=chunk, progress=progress)

        def general() -> TopK:
            tr._load(0)
            test_t = _unit_rows(tr._grads_all(test_inputs, test_targets)).T
            total = len(train_targets) if train_targets is not None else -1
            acc, offset = RunningTopK(k), 0
            for g in tr._grads(train_inputs, train_targets):
                acc.update(_unit_rows(g) @ test_t, offset)
                offset += g.shape[0]
                if progress is not None:
                    progress(offset, total)
            return acc.result()

        return tr._run(ghost, general)
