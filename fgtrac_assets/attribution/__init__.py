"""Training-data attribution (torch + numpy only): TracInCP and final-model-only methods.

``TracInCP`` ties together the exact Linear-layer shortcut (:mod:`.ghost`), the general
per-sample-gradient path (:mod:`.per_sample`), chunked top-k (:mod:`.topk`) and
FG-Trac's checkpoint selection rule (:mod:`.selection`).  With the final model only:
``GradDot`` / ``GradCos`` (:mod:`.final_model`), ``InfluenceFunction`` (explicit, CG or
LiSSA over the Hessian of :mod:`.hessian`, solvers in :mod:`.ihvp`, an optional
(E)K-FAC preconditioner in :mod:`.preconditioner`) and the
``FurtherTraining`` gold standard (:mod:`.further_training`); all share TracInCP's
``influence`` / ``self_influence`` / ``top_k`` interface and sign (positive = proponent).
"""

from .final_model import GradCos, GradDot
from .further_training import FurtherTraining
from .ghost import (
    Factors,
    GhostNotApplicable,
    factor_dot,
    factor_self_dot,
    influence_from_factors,
    linear_factors,
    linear_layer_names,
    self_influence_from_factors,
    top_k_from_factors,
)
from .hessian import MeanLossHessian
from .ihvp import ExplicitInverse, solve_block_cg, solve_cg, solve_lissa
from .influence_function import InfluenceFunction
from .per_sample import RandomProjection, iter_per_sample_grads, model_guard, per_sample_grads
from .preconditioner import KroneckerPreconditioner
from .selection import select_checkpoints
from .topk import RunningTopK, TopK, top_k_over_chunks
from .tracin import TracInCP

__all__ = [
    "ExplicitInverse",
    "Factors",
    "FurtherTraining",
    "GhostNotApplicable",
    "GradCos",
    "GradDot",
    "InfluenceFunction",
    "KroneckerPreconditioner",
    "MeanLossHessian",
    "RandomProjection",
    "RunningTopK",
    "TopK",
    "TracInCP",
    "factor_dot",
    "factor_self_dot",
    "influence_from_factors",
    "iter_per_sample_grads",
    "linear_factors",
    "linear_layer_names",
    "model_guard",
    "per_sample_grads",
    "select_checkpoints",
    "self_influence_from_factors",
    "solve_block_cg",
    "solve_cg",
    "solve_lissa",
    "top_k_from_factors",
    "top_k_over_chunks",
]
