"""Final-model-only first-order scores: Grad-Dot and Grad-Cos (Wei et al. 2024, section 3).

* ``GradDot``: grad l(theta_f, z) . grad l(theta_f, z') -- TracInCP with the final
  parameters as its one checkpoint and step size 1, so it reuses TracInCP's paths
  (exact Linear-layer factors, else per-sample gradients) unchanged.  To first order it
  is the test-loss change of one SGD step over the data with sample z left out, divided
  by the step size and times n: positive = proponent.
* ``GradCos``: the cosine of the two gradients, in [-1, 1] (0 when either gradient is
  zero): the same TracInCP with ``normalize=True``.  On the Linear-factor path the errors
  are divided by the gradient norms, which normalises the rank-one gradients exactly.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .hessian import snapshot_state
from .model_calls import ForwardFn, LossFn
from .topk import TopK
from .tracin import TracInCP

__all__ = ["GradCos", "GradDot"]


class GradDot:
    """Grad-Dot scores at the final parameters, without modifying the model.

    Arguments as :class:`.TracInCP` minus the checkpoints: ``state_dict`` gives the final
    parameters (default: the model's state when this object is built).
    """

    _normalize = False  # GradCos: unit gradients

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
                               batch_size=batch_size, projection_dim=projection_dim, seed=seed, method=method,
                               normalize=self._normalize)

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


class GradCos(GradDot):
    """Grad-Cos scores: cosine similarity of the loss gradients at the final parameters, in [-1, 1]."""

    _normalize = True

    def influence(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any) -> Tensor:
        """Return gradient cosines (n_train, n_test)."""
        return super().influence(train_inputs, train_targets, test_inputs, test_targets)

    def self_influence(self, train_inputs: Any, train_targets: Any) -> Tensor:
        """Return cos(g, g) per train sample (n_train,): 1, or 0 where the gradient is zero."""
        return (super().self_influence(train_inputs, train_targets) > 0).to(self._dtype())

    def _dtype(self) -> torch.dtype:
        return next(iter(self.state.values())).dtype if self.state else torch.get_default_dtype()

    def top_k(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any, k: int = 10,
              chunk: int = 4096, progress: Callable[[int, int], None] | None = None) -> TopK:
        """Return the k most / least similar train samples per test sample as :class:`.TopK`, each field (n_test, k)."""
        return super().top_k(train_inputs, train_targets, test_inputs, test_targets, k, chunk, progress)
