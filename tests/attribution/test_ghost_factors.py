"""Standalone factor API: cached factors (numpy round trip) reproduce TracInCP's results."""

import copy

import numpy as np
import torch
from torch import nn

from fgtrac_assets.attribution import TracInCP
from fgtrac_assets.attribution.ghost import (
    Factors,
    factor_dot,
    factor_self_dot,
    influence_from_factors,
    linear_factors,
    linear_layer_names,
    self_influence_from_factors,
    top_k_from_factors,
)
from fgtrac_assets.attribution.topk import RunningTopK

LOSS = nn.CrossEntropyLoss(reduction="none")


def setup():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5)).double()
    x = torch.randn(90, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (90,))
    ckpts = []
    for lr in (0.5, 0.2, 0.1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        ckpts.append((copy.deepcopy(model.state_dict()), lr))
    return model, ckpts, x[:70], y[:70], x[70:], y[70:]


def roundtrip(factors):
    """Simulate a Parquet cache: to numpy columns and back."""
    cols = [(f.errors.numpy().copy(), f.activations.numpy().copy(), f.bias) for f in factors]
    return [Factors(torch.from_numpy(e), torch.from_numpy(a), b) for e, a, b in cols]


def test_cached_factors_reproduce_tracin():
    model, ckpts, xtr, ytr, xte, yte = setup()
    layers = linear_layer_names(model, None)
    assert layers == ["0", "2"]
    train_f, test_f, lrs = [], [], []
    for state, lr in ckpts:
        model.load_state_dict(state)
        train_f.append(roundtrip(linear_factors(model, layers, xtr, ytr, LOSS, batch_size=16)))
        test_f.append(roundtrip(linear_factors(model, layers, xte, yte, LOSS, batch_size=16)))
        lrs.append(lr)
    tracin = TracInCP(model, ckpts, LOSS)
    full = tracin.influence(xtr, ytr, xte, yte)
    assert torch.allclose(influence_from_factors(train_f, test_f, lrs), full, rtol=1e-12, atol=1e-12)
    assert torch.allclose(self_influence_from_factors(train_f, lrs), tracin.self_influence(xtr, ytr), rtol=1e-12)
    seen = []
    top = top_k_from_factors(train_f, test_f, lrs, k=4, chunk=9, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (70, 70) and len(seen) == 8
    assert torch.equal(top.proponent_idx, torch.topk(full, 4, dim=0).indices.T)
    assert torch.equal(top.opponent_idx, torch.topk(full, 4, dim=0, largest=False).indices.T)
    # factor_dot / factor_self_dot for one checkpoint, and accumulation into `out`
    one = factor_dot(train_f[0], test_f[0])
    acc = factor_dot(train_f[1], test_f[1], out=one.clone() * 0.5, scale=0.2)
    assert torch.allclose(acc, 0.5 * one + 0.2 * factor_dot(train_f[1], test_f[1]), rtol=1e-12)
    assert torch.allclose(factor_self_dot(train_f[0]), torch.diagonal(factor_dot(train_f[0], train_f[0])))


def top_k_over_chunks(chunks, k):
    """The top-k over (offset, scores) chunks, as the influence stages feed RunningTopK."""
    acc = RunningTopK(k)
    for offset, scores in chunks:
        acc.update(scores, offset)
    return acc.result()


def test_top_k_clamps_k_and_merges_chunks():
    scores = torch.randn(7, 3, dtype=torch.float64)
    top = top_k_over_chunks([(0, scores[:2]), (2, scores[2:3]), (3, scores[3:])], k=10)
    assert top.proponent_idx.shape == (3, 7)
    assert torch.equal(top.proponent_idx, torch.argsort(scores, dim=0, descending=True).T)
    assert torch.equal(top.opponent_idx, torch.argsort(scores, dim=0).T)


def test_top_k_is_the_same_for_row_major_and_transposed_chunks():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(300, 40, dtype=torch.float64, generator=gen)
    row_major = top_k_over_chunks([(0, scores[:128]), (128, scores[128:])], k=5)
    transposed = [(0, scores[:128].T.contiguous().T), (128, scores[128:].T.contiguous().T)]
    assert transposed[0][1].stride(0) == 1
    other = top_k_over_chunks(transposed, k=5)
    for field in ("proponent_idx", "proponent_score", "opponent_idx", "opponent_score"):
        assert torch.equal(getattr(row_major, field), getattr(other, field))
    assert torch.equal(row_major.proponent_idx, torch.argsort(scores, dim=0, descending=True)[:5].T)
