"""Peer implementations a study scores next to fgtrac's: dattri's TRAK, in fgtrac's orientation.

dattri (a dev extra) is imported inside the function, so this module imports without it.
"""

import contextlib
import copy
import io
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fgtrac_assets.attribution.trak import margin

__all__ = ["dattri_trak_scores"]


def dattri_trak_scores(
    model: nn.Module,
    state_dicts: Sequence[dict[str, Tensor]],
    train_inputs: Tensor,
    train_targets: Tensor,
    test_inputs: Tensor,
    test_targets: Tensor,
    projection_dim: int | None = 2048,
    seed: int = 0,
    regularization: float = 0.0,
    batch_size: int = 256,
) -> Tensor:
    """Return dattri 0.3's TRAK scores (n_train, n_test) for a classifier, positive = proponent (fgtrac's sign).

    The same setup as :class:`fgtrac_assets.attribution.TRAK` with ``output="margin"``: the margin
    log(p_y / (1 - p_y)) on both sides, Q = 1 - p_y, one projection per checkpoint, kernel parts and
    Q averaged separately over ``state_dicts``.  ``projection_dim=None`` disables dattri's projection
    (its "identity" projector); otherwise its own seeded Gaussian (different numbers from fgtrac's).
    ``regularization`` is dattri's ridge, added to the kernel of gradients that dattri divides by
    sqrt(number of trainable parameters): it equals fgtrac's ``damping = regularization * P``
    (0, dattri's default, is the same in both).  All trainable parameters are used; ``model`` is
    not modified (dattri loads the checkpoints into a copy).
    """
    try:
        from dattri.algorithm import trak as dattri_trak
        from dattri.task import AttributionTask
    except ImportError as exc:  # pragma: no cover - dattri is a dev extra
        raise ImportError("dattri_trak_scores needs dattri (the 'dev' extra: pip install 'dattri>=0.3')") from exc

    peer = copy.deepcopy(model)
    device = next(peer.parameters()).device

    def output(params, data):
        x, y = data
        return margin(torch.func.functional_call(peer, params, (x.unsqueeze(0),)), y.unsqueeze(0)).squeeze(0)

    def correct_probability(params, data):
        x, y = data
        logits = torch.func.functional_call(peer, params, (x.unsqueeze(0),))
        return torch.softmax(logits, dim=-1)[0, y]

    task = AttributionTask(loss_func=output, model=peer, checkpoints=[dict(s) for s in state_dicts],
                           target_func=output)
    kwargs = {"proj_dim": projection_dim or 1, "proj_seed": seed, "proj_max_batch_size": 32, "device": device.type,
              "proj_type": "identity" if projection_dim is None else "normal"}
    defaults = dict(dattri_trak.DEFAULT_PROJECTOR_KWARGS)  # dattri updates this module-level dict in place
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # dattri's progress bars: a study logs one line per stage
            attributor = dattri_trak.TRAKAttributor(task=task, correct_probability_func=correct_probability,
                                                    projector_kwargs=kwargs, device=device.type,
                                                    regularization=regularization)
            attributor.cache(DataLoader(TensorDataset(train_inputs, train_targets), batch_size=batch_size))
            scores = attributor.attribute(DataLoader(TensorDataset(test_inputs, test_targets),
                                                     batch_size=batch_size))
    finally:
        dattri_trak.DEFAULT_PROJECTOR_KWARGS.clear()
        dattri_trak.DEFAULT_PROJECTOR_KWARGS.update(defaults)
    return scores.detach()
