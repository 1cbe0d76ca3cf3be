"""Training-data attribution (torch + numpy only): TracInCP, TRAK, final-model-only and replay methods.

The public API is the methods, which share one interface (``influence`` / ``self_influence`` /
``top_k``) and one sign (positive = proponent), and FG-Trac's checkpoint selection rule:

* ``TracInCP``: checkpoint-grounded TracIn; the exact Linear-layer shortcut is in :mod:`.ghost`, the
  general per-sample-gradient path in :mod:`.per_sample`, chunked top-k in :mod:`.topk`.
* ``GradDot`` / ``GradCos`` (:mod:`.final_model`), ``InfluenceFunction`` (explicit, CG or LiSSA over the
  Hessian of :mod:`.hessian`, solvers in :mod:`.ihvp`, an optional (E)K-FAC preconditioner in
  :mod:`.preconditioner`) with the final model only, and the ``FurtherTraining`` gold standard
  (:mod:`.further_training`).
* ``TRAK`` (:mod:`.trak`): Park et al.'s kernel over randomly projected output gradients, averaged
  over an ensemble of checkpoints.
* the replay methods, which need the recorded run as a ``TrainingTrace`` (:mod:`.trace`: initial weights,
  every step's batch and lr, the optimiser as an ``OptimizerSpec``, the checkpoints it must reproduce):
  ``StepExactTracIn`` (:mod:`.step_exact`, first-order TracIn at every step's own parameters) and
  ``Metagradient`` (:mod:`.metagradient`, exact reverse-mode derivatives through every optimiser step).
* ``select_checkpoints`` and its settings ``SelectionRule`` (:mod:`.selection`).

Everything else (factors, solvers, guards) is imported from its own module. The names load on first
use, so ``attribution.selection`` imports without torch.

Every method runs on the model's device (its first parameter's): data is moved there batch by batch
(:func:`.model_calls.to_device`) and scores come back on that device (see :class:`.TracInCP`).
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .final_model import GradCos, GradDot
    from .further_training import FurtherTraining
    from .influence_function import InfluenceFunction
    from .selection import SelectionRule, select_checkpoints
    from .metagradient import Metagradient
    from .step_exact import StepExactTracIn
    from .trace import OptimizerSpec, TrainingTrace
    from .tracin import TracInCP
    from .trak import TRAK

_HOMES = {"FurtherTraining": ".further_training", "GradCos": ".final_model", "GradDot": ".final_model",
          "InfluenceFunction": ".influence_function", "SelectionRule": ".selection",
          "Metagradient": ".metagradient", "OptimizerSpec": ".trace", "StepExactTracIn": ".step_exact",
          "TRAK": ".trak", "TracInCP": ".tracin", "TrainingTrace": ".trace", "select_checkpoints": ".selection"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """Return a public name from its module, imported on first use."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
