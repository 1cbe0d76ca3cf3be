"""The digits studies' data and model: scikit-learn's bundled digits, a seeded split, the pipeline's CNN and loop.

Sample ids are the digits pipeline's own content ids (``tracing.ids.array_sample_id`` of the
image), so a study's samples are the ledger's samples.
"""

import numpy as np

from ..errors import InputError


def digits_splits(seed: int, n_train: int, n_val: int):
    """Return ((x, y, ids) train, (x, y) validation, (x, y) test): a seeded split of the bundled digits, standardised."""
    import torch
    from sklearn.datasets import load_digits

    from ..tracing.ids import array_sample_id

    d = load_digits()
    x = d.data.astype(np.float32) / np.float32(16.0)
    y = d.target.astype(np.int64)
    if n_train + n_val >= len(y):
        raise InputError(f"n_train + n_val must leave test samples (digits has {len(y)})")
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    mean, std = float(x[tr].mean()), float(x[tr].std())
    xs = torch.from_numpy(((x - mean) / std).astype(np.float32).reshape(-1, 1, 8, 8))
    ys = torch.from_numpy(y)
    ids = [array_sample_id(d.images[i].astype(np.uint8)) for i in tr]
    return (xs[tr], ys[tr], ids), (xs[va], ys[va]), (xs[te], ys[te])


def train_cnn(x, y, val, settings, seed: int, recorder=None):
    """Return (model, epoch results) of the digits pipeline's CNN trained with its own loop (unrecorded by default).

    Always on the CPU, whatever ``settings.device`` says: the studies score the model on the CPU tensors they
    hold, and their documented numbers are CPU numbers.
    """
    import dataclasses

    import torch

    from ..pipelines.digits import build_cnn
    from ..pipelines.training import train_supervised
    from ..tracing.recorder import NullRecorder

    torch.manual_seed(seed)
    model = build_cnn(10)
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    epochs = list(train_supervised(model, loss, (x, y), val, dataclasses.replace(settings, device="cpu"),
                                   recorder if recorder is not None else NullRecorder()))
    return model, epochs
