"""The linear datamodeling score (LDS): how well summed attribution scores predict what retraining on subsets does.

For M training subsets (models retrained on each), the prediction for a test sample under subset s is the sum
of the method's scores over the subset's training samples; the LDS of the test sample is the Spearman rank
correlation, over the M subsets, between those predictions and the retrained models' actual outputs (e.g.
the test loss or margin). Ties get average ranks, as scipy.stats.spearmanr gives them; a test sample whose
predictions or outputs are all equal has no correlation (NaN).
"""

import numpy as np
import torch
from torch import Tensor

__all__ = ["linear_datamodeling_score", "random_subsets"]


def random_subsets(n_train: int, count: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """Return a (count, n_train) boolean mask: each row a random subset of round(fraction * n_train) samples."""
    if not 0 < fraction <= 1 or count < 1 or n_train < 1:
        raise ValueError(f"need n_train >= 1, count >= 1 and 0 < fraction <= 1 (got {n_train}, {count}, {fraction})")
    size = max(1, round(fraction * n_train))
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, n_train, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(n_train, generator=g)[:size]] = True
    return masks


def linear_datamodeling_score(scores: Tensor, subsets: Tensor, outputs: Tensor) -> Tensor:
    """Return the LDS of every test sample, a (n_test,) tensor.

    scores: (n_train, n_test) attribution scores; subsets: (M, n_train) boolean masks, or (M, size) integer
    indices of the training samples each retrained model saw; outputs: (M, n_test) those models' test outputs.
    """
    scores = torch.as_tensor(scores).detach().double().cpu()
    outputs = torch.as_tensor(outputs).detach().double().cpu()
    subsets = torch.as_tensor(subsets).cpu()
    if subsets.dtype != torch.bool:
        masks = torch.zeros(subsets.shape[0], scores.shape[0], dtype=torch.double)
        masks.scatter_(1, subsets.long(), 1.0)
    else:
        masks = subsets.double()
    if masks.shape[1] != scores.shape[0] or outputs.shape != (masks.shape[0], scores.shape[1]):
        raise ValueError(f"shapes do not match: scores {tuple(scores.shape)}, subsets {tuple(subsets.shape)}, "
                         f"outputs {tuple(outputs.shape)}")
    predicted = masks @ scores
    return torch.from_numpy(_columnwise_spearman(predicted.numpy(), outputs.numpy()))


def _columnwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the Spearman correlation of each column of a with the same column of b (NaN where one is constant)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    denominator = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(axis=0) / denominator, np.nan)
