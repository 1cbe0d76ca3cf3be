"""Ghost (linear factors) path vs torch.func path vs brute force, top-k, self-influence, projection."""

import copy
import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fgtrac_assets.attribution import TracInCP
from fgtrac_assets.attribution.ghost import GhostNotApplicable, linear_factors

LOSS = nn.CrossEntropyLoss(reduction="none")


def digits(n_train=120, n_test=30, image=False, dtype=torch.float64):
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=dtype)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:n_train], y[:n_train], x[n_train : n_train + n_test], y[n_train : n_train + n_test]


def train_checkpoints(model, x, y, lrs=(0.3, 0.1), epochs=2):
    ckpts = []
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0])
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        for _ in range(epochs):
            for s in range(0, len(x), 32):
                opt.zero_grad()
                LOSS(model(x[s : s + 32]), y[s : s + 32]).mean().backward()
                opt.step()
        ckpts.append((copy.deepcopy(model.state_dict()), lr))
    model.zero_grad(set_to_none=True)
    return ckpts


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 24), nn.ReLU(inplace=True), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 10)).double()


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(self.flat(self.relu(self.conv(x))))


def cnn():
    torch.manual_seed(0)
    return CNN().double()


def brute_force_grads(model, names, x, y, forward=None):
    """(n, P) per-sample gradients, one autograd backward per sample, on a copy of the model."""
    model = copy.deepcopy(model).eval()
    params = [model.get_parameter(n) for n in names]
    for p in model.parameters():
        p.requires_grad_(True)
    out = model(x) if forward is None else forward(model, x)
    losses = LOSS(out, y)
    rows = []
    for i in range(len(losses)):
        gs = torch.autograd.grad(losses[i], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def brute_force_scores(model, ckpts, names, xtr, ytr, xte, yte, forward=None):
    total = 0
    for state, lr in ckpts:
        model.load_state_dict(state)
        total = total + lr * brute_force_grads(model, names, xtr, ytr, forward) @ brute_force_grads(
            model, names, xte, yte, forward
        ).T
    return total


def close(a, b, tol=1e-9):
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
    )


def assert_unchanged(model, snap):
    state, modes, flags, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None and g is None for p, g in zip(model.parameters(), grads))


@pytest.fixture(scope="module")
def mlp_setup():
    xtr, ytr, xte, yte = digits()
    model = mlp()
    return model, train_checkpoints(model, xtr, ytr), (xtr, ytr, xte, yte)


@pytest.fixture(scope="module")
def cnn_setup():
    xtr, ytr, xte, yte = digits(80, 20, image=True)
    model = cnn()
    return model, train_checkpoints(model, xtr, ytr), (xtr, ytr, xte, yte)


@pytest.mark.parametrize("layer", [None, "4", ["0", "4"]])
def test_ghost_equals_per_sample_mlp(mlp_setup, layer):
    model, ckpts, (xtr, ytr, xte, yte) = mlp_setup
    ghost = TracInCP(model, ckpts, LOSS, layer=layer, batch_size=50)
    general = TracInCP(model, ckpts, LOSS, layer=layer, batch_size=50, method="per_sample")
    assert ghost.path == "ghost" and general.path == "per_sample"
    a = ghost.influence(xtr, ytr, xte, yte)
    b = general.influence(xtr, ytr, xte, yte)
    assert close(a, b)
    assert close(ghost.self_influence(xtr, ytr), general.self_influence(xtr, ytr))
    names = general.param_names
    assert close(a, brute_force_scores(copy.deepcopy(model), ckpts, names, xtr, ytr, xte, yte))


def test_cnn_fc_layer_and_all_layers(cnn_setup):
    model, ckpts, (xtr, ytr, xte, yte) = cnn_setup
    fc = TracInCP(model, ckpts, LOSS, layer="fc", batch_size=32)
    assert fc.path == "ghost"
    ref = brute_force_scores(copy.deepcopy(model), ckpts, ["fc.weight", "fc.bias"], xtr, ytr, xte, yte)
    assert close(fc.influence(xtr, ytr, xte, yte), ref)
    full = TracInCP(model, ckpts, LOSS, layer=None, batch_size=32)
    assert full.path == "per_sample"
    assert full.param_names == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    names = full.param_names
    ref = brute_force_scores(copy.deepcopy(model), ckpts, names, xtr, ytr, xte, yte)
    assert close(full.influence(xtr, ytr, xte, yte), ref)
    conv = TracInCP(model, ckpts, LOSS, layer="conv", batch_size=32)
    ref = brute_force_scores(copy.deepcopy(model), ckpts, ["conv.weight", "conv.bias"], xtr, ytr, xte, yte)
    assert close(conv.influence(xtr, ytr, xte, yte), ref)


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_top_k_and_self_influence(mlp_setup, cnn_setup, which):
    model, ckpts, (xtr, ytr, xte, yte) = mlp_setup if which == "mlp" else cnn_setup
    tracin = TracInCP(model, ckpts, LOSS, batch_size=16)
    full = tracin.influence(xtr, ytr, xte, yte)
    calls = []
    top = tracin.top_k(xtr, ytr, xte, yte, k=5, chunk=37, progress=lambda d, t: calls.append((d, t)))
    ref_p = torch.topk(full, 5, dim=0)
    ref_n = torch.topk(full, 5, dim=0, largest=False)
    assert torch.equal(top.proponent_idx, ref_p.indices.T)
    assert torch.equal(top.opponent_idx, ref_n.indices.T)
    assert torch.allclose(top.proponent_score, ref_p.values.T, rtol=1e-10, atol=1e-12)
    assert torch.allclose(top.opponent_score, ref_n.values.T, rtol=1e-10, atol=1e-12)
    assert top.proponent_idx.shape == (len(xte), 5)
    assert (top.proponent_score[:, :-1] >= top.proponent_score[:, 1:]).all()
    assert (top.opponent_score[:, :-1] <= top.opponent_score[:, 1:]).all()
    assert calls[-1][0] == len(xtr)
    selfinf = tracin.self_influence(xtr, ytr)
    assert close(selfinf, torch.diagonal(tracin.influence(xtr, ytr, xtr, ytr)))


def test_model_state_restored(cnn_setup):
    model, ckpts, (xtr, ytr, xte, yte) = cnn_setup
    model.train()
    model.relu.eval()
    model.conv.bias.requires_grad_(False)
    try:
        snap = snapshot(model)
        for kwargs in ({"layer": "fc"}, {"layer": "conv"}, {"layer": None, "projection_dim": 16}):
            tracin = TracInCP(model, ckpts, LOSS, batch_size=32, **kwargs)
            tracin.influence(xtr, ytr, xte, yte)
            assert_unchanged(model, snap)
            tracin.self_influence(xtr, ytr)
            assert_unchanged(model, snap)
            tracin.top_k(xtr, ytr, xte, yte, k=3)
            assert_unchanged(model, snap)
        # restored on exceptions too
        bad = TracInCP(model, ckpts, lambda out, t: out.sum(), layer="fc")
        with pytest.raises(ValueError):
            bad.influence(xtr, ytr, xte, yte)
        assert_unchanged(model, snap)
    finally:
        model.conv.bias.requires_grad_(True)
        model.eval()


def test_random_projection_converges(cnn_setup):
    model, ckpts, (xtr, ytr, xte, yte) = cnn_setup
    exact = TracInCP(model, ckpts, LOSS).influence(xtr, ytr, xte, yte).flatten()
    corr = {}
    for dim in (32, 256, 2048):
        proj = TracInCP(model, ckpts, LOSS, projection_dim=dim, seed=3)
        scores = proj.influence(xtr, ytr, xte, yte)
        again = TracInCP(model, ckpts, LOSS, projection_dim=dim, seed=3).influence(xtr, ytr, xte, yte)
        assert torch.equal(scores, again)  # seeded: deterministic
        corr[dim] = torch.corrcoef(torch.stack([scores.flatten(), exact]))[0, 1].item()
        assert close(proj.self_influence(xtr, ytr), torch.diagonal(proj.influence(xtr, ytr, xtr, ytr)))
    assert corr[32] < corr[256] < corr[2048]
    assert corr[2048] > 0.9, corr


def test_loaders_and_custom_forward(mlp_setup):
    model, ckpts, (xtr, ytr, xte, yte) = mlp_setup
    ref = TracInCP(model, ckpts, LOSS).influence(xtr, ytr, xte, yte)
    # DataLoader + generator of dict batches with a custom forward (not vmappable -> loop)
    fwd = lambda m, batch: m(batch["x"])  # noqa: E731
    train_dl = [({"x": xb}, yb) for xb, yb in DataLoader(TensorDataset(xtr, ytr), batch_size=40)]
    test_gen = (({"x": xte[s : s + 7]}, yte[s : s + 7]) for s in range(0, len(xte), 7))
    tracin = TracInCP(model, ckpts, LOSS, forward=fwd)
    assert tracin.path == "per_sample"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert close(tracin.influence(train_dl, None, test_gen, None), ref)
    # custom forward on plain tensors -> vmapped
    dl = DataLoader(TensorDataset(xtr, ytr), batch_size=33)
    tracin = TracInCP(model, ckpts, LOSS, forward=lambda m, x: m(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert close(tracin.influence(dl, None, xte, yte), ref)
    # forcing the linear shortcut with a custom forward
    ghost = TracInCP(model, ckpts, LOSS, forward=fwd, method="ghost")
    assert close(ghost.influence(train_dl, None, [({"x": xte}, yte)], None), ref)


def test_coupled_samples_fall_back_to_loop(mlp_setup):
    """A forward where samples interact (batch centring): vmap is detected as wrong, the loop is exact."""
    model, ckpts, (xtr, ytr, xte, yte) = mlp_setup
    fwd = lambda m, x: m(x - x.mean(0, keepdim=True))  # noqa: E731
    tracin = TracInCP(model, ckpts, LOSS, forward=fwd, batch_size=1000)
    with pytest.warns(RuntimeWarning, match="falling back"):
        scores = tracin.influence(xtr, ytr, xte, yte)
    names = tracin.param_names
    ref = brute_force_scores(copy.deepcopy(model), ckpts, names, xtr, ytr, xte, yte, forward=fwd)
    assert close(scores, ref)


def test_ghost_not_applicable_falls_back():
    """A Linear on 3-D input (sequence-like) is not handled by the 2-D shortcut."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (8, 8)), nn.Linear(8, 4), nn.Flatten(), nn.Linear(32, 10)).double()
    xtr, ytr, xte, yte = digits(40, 10)
    ckpts = [(copy.deepcopy(model.state_dict()), 1.0)]
    with pytest.raises(GhostNotApplicable):
        linear_factors(model, ["1"], xtr, ytr, LOSS)
    auto = TracInCP(model, ckpts, LOSS)
    assert auto.path == "ghost"
    with pytest.warns(RuntimeWarning, match="not applicable"):
        a = auto.influence(xtr, ytr, xte, yte)
    assert auto.path == "per_sample"
    b = TracInCP(model, ckpts, LOSS, method="per_sample").influence(xtr, ytr, xte, yte)
    assert close(a, b)


def test_linear_without_bias_and_frozen_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 10)).double()
    xtr, ytr, xte, yte = digits(60, 15)
    ckpts = [(copy.deepcopy(model.state_dict()), 0.5)]
    ghost = TracInCP(model, ckpts, LOSS)
    assert ghost.path == "ghost"
    general = TracInCP(model, ckpts, LOSS, method="per_sample")
    assert close(ghost.influence(xtr, ytr, xte, yte), general.influence(xtr, ytr, xte, yte))
    model[2].bias.requires_grad_(False)  # a Linear partly frozen: not Linear-only -> general path
    assert TracInCP(model, ckpts, LOSS).path == "per_sample"
    model[2].bias.requires_grad_(True)
