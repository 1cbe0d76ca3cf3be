"""TracInCP training-data attribution (torch + numpy only).

``TracInCP`` ties together the exact Linear-layer shortcut (:mod:`.ghost`), the general
per-sample-gradient path (:mod:`.per_sample`), chunked top-k (:mod:`.topk`) and
FG-Trac's checkpoint selection rule (:mod:`.selection`).
"""

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
from .per_sample import RandomProjection, iter_per_sample_grads, model_guard, per_sample_grads
from .selection import select_checkpoints
from .topk import RunningTopK, TopK, top_k_over_chunks
from .tracin import TracInCP

__all__ = [
    "Factors",
    "GhostNotApplicable",
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
    "top_k_from_factors",
    "top_k_over_chunks",
]
