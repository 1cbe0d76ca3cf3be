"""fgtrac TracInCP equals Captum's TracInCP / TracInCPFast on a digits MLP."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

captum_influence = pytest.importorskip("captum.influence")
from sklearn.datasets import load_digits  # noqa: E402

from fgtrac_assets.attribution import TracInCP  # noqa: E402
from fgtrac_assets.attribution.ghost import influence_from_factors, linear_factors  # noqa: E402

N_TRAIN, N_TEST = 300, 50
LRS = [0.2, 0.1, 0.05]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.act(self.fc1(x)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    xtr, ytr = x[:N_TRAIN], y[:N_TRAIN]
    xte, yte = x[N_TRAIN : N_TRAIN + N_TEST], y[N_TRAIN : N_TRAIN + N_TEST]
    model = MLP().double()
    loss = nn.CrossEntropyLoss()
    tmp = tmp_path_factory.mktemp("ckpt")
    checkpoints, paths = [], []
    for lr in LRS:  # a few epochs of real training, one checkpoint per stage
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(3):
            for s in range(0, len(x), 64):
                opt.zero_grad()
                loss(model(x[s : s + 64]), y[s : s + 64]).backward()
                opt.step()
        state = copy.deepcopy(model.state_dict())
        checkpoints.append((state, lr))
        path = tmp / f"ckpt{len(paths)}.pt"
        torch.save({"state": state, "lr": lr}, path)
        paths.append(str(path))
    return model, checkpoints, paths, (xtr, ytr, xte, yte)


def load_ckpt(model, path):
    blob = torch.load(path, weights_only=True)
    model.load_state_dict(blob["state"])
    return blob["lr"]


def assert_rel_close(ours, ref, tol=1e-5):
    scale = ref.abs().max()
    assert scale > 0
    err = (ours - ref).abs().max() / scale
    assert err <= tol, f"relative error {err:.3g}"


@pytest.mark.parametrize("layers", [["fc"], ["fc1", "fc"], None])
def test_matches_captum_tracincp(setup, layers):
    model, checkpoints, paths, (xtr, ytr, xte, yte) = setup
    ref_model = copy.deepcopy(model)
    captum = captum_influence.TracInCP(
        ref_model,
        TensorDataset(xtr, ytr),
        paths,
        checkpoints_load_func=load_ckpt,
        layers=layers,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=100,
    )
    ref = captum.influence((xte, yte)).T  # captum: (n_test, n_train)
    ours = TracInCP(model, checkpoints, nn.CrossEntropyLoss(reduction="none"), layer=layers)
    assert ours.path == "ghost"
    scores = ours.influence(xtr, ytr, xte, yte)
    assert scores.shape == (N_TRAIN, N_TEST)
    assert_rel_close(scores, ref)
    general = TracInCP(
        model, checkpoints, nn.CrossEntropyLoss(reduction="none"), layer=layers, method="per_sample"
    )
    assert_rel_close(general.influence(xtr, ytr, xte, yte), ref)


def test_matches_captum_self_influence(setup):
    model, checkpoints, paths, (xtr, ytr, _, _) = setup
    captum = captum_influence.TracInCP(
        copy.deepcopy(model),
        TensorDataset(xtr, ytr),
        paths,
        checkpoints_load_func=load_ckpt,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=100,
    )
    ref = captum.self_influence()
    ours = TracInCP(model, checkpoints, nn.CrossEntropyLoss(reduction="none")).self_influence(xtr, ytr)
    assert_rel_close(ours, ref)


def test_tracincpfast_is_weight_only_last_layer(setup):
    """TracInCPFast scores the final layer's WEIGHT only: (e.e')(a.a'), without the bias's +1."""
    model, checkpoints, paths, (xtr, ytr, xte, yte) = setup
    ref_model = copy.deepcopy(model)
    captum = captum_influence.TracInCPFast(
        ref_model,
        "fc",
        TensorDataset(xtr, ytr),
        paths,
        checkpoints_load_func=load_ckpt,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=100,
    )
    ref = captum.influence((xte, yte)).T
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    train_f, test_f = [], []
    for state, _ in checkpoints:
        model.load_state_dict(state)
        train_f.append(linear_factors(model, ["fc"], xtr, ytr, loss_fn))
        test_f.append(linear_factors(model, ["fc"], xte, yte, loss_fn))
    for f in train_f + test_f:
        f[0].bias = False  # weight-only variant
    weight_only = influence_from_factors(train_f, test_f, LRS)
    assert_rel_close(weight_only, ref)
    # and the full layer score (weight + bias) = weight-only + sum_i lr_i (e . e')
    full = TracInCP(model, checkpoints, loss_fn, layer="fc").influence(xtr, ytr, xte, yte)
    bias_part = sum(lr * tr[0].errors @ te[0].errors.T for tr, te, lr in zip(train_f, test_f, LRS))
    assert_rel_close(full, ref + bias_part)
