"""TRAK equals its formula computed by brute force, is invariant to a square projection, agrees with dattri 0.3's
TRAKAttributor, and shares the interface (top-k, self-influence, an untouched model) of the other methods."""

import copy

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from fgtrac_assets.attribution import TRAK
from fgtrac_assets.attribution.trak import margin

N_TRAIN, N_TEST = 60, 7


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def setup():
    """A tiny float64 MLP trained a little on random 3-class data, with three checkpoints along the way."""
    torch.manual_seed(0)
    x = torch.randn(N_TRAIN + N_TEST, 4, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    states = []
    for _ in range(3):
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[:N_TRAIN]), y[:N_TRAIN]).backward()
            opt.step()
        states.append(copy.deepcopy(model.state_dict()))
    with torch.no_grad():  # the model itself is left somewhere else than every checkpoint
        for p in model.parameters():
            p.add_(0.1)
    return model, states, (x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])


def brute_force(model, states, xtr, ytr, xte, yte, params=None):
    """The paper's formula, one autograd call per sample, no projection, no ridge (a pseudo-inverse)."""
    ref = copy.deepcopy(model)
    kernel, q = 0, 0
    for state in states:
        ref.load_state_dict(state)
        chosen = [p for n, p in ref.named_parameters() if params is None or n in params]

        def grads(xs, ys):
            rows = []
            for xi, yi in zip(xs, ys):
                g = torch.autograd.grad(margin(ref(xi[None]), yi[None])[0], chosen)
                rows.append(torch.cat([v.reshape(-1) for v in g]))
            return torch.stack(rows)

        phi, phi_test = grads(xtr, ytr), grads(xte, yte)
        # phi (phi^T phi)^+ = (phi^+)^T, by SVD; phi^T phi is singular (the margin ignores a shift of all logits)
        kernel = kernel + torch.linalg.pinv(phi).T @ phi_test.T
        with torch.no_grad():
            q = q + 1 - torch.softmax(ref(xtr), dim=1).gather(1, ytr[:, None])[:, 0]
    return kernel / len(states) * (q / len(states))[:, None]


def rel_err(ours, ref):
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("path", ["linear", "vmap"])
def test_equals_the_formula_by_brute_force(setup, path):
    model, states, data = setup
    forward = (lambda m, x: m(x)) if path == "vmap" else None  # a custom forward takes the torch.func path
    trak = TRAK(model, states, projection_dim=None, damping=0.0, forward=forward)
    assert rel_err(trak.influence(*data), brute_force(model, states, *data)) < 1e-8


def test_layer_selection_equals_the_formula_on_that_layer(setup):
    model, states, data = setup
    trak = TRAK(model, [(s, 0.5) for s in states], projection_dim=None, damping=0.0, layer="fc2")  # weights ignored
    assert rel_err(trak.influence(*data), brute_force(model, states, *data, params={"fc2.weight", "fc2.bias"})) < 1e-8


def test_a_square_projection_leaves_the_scores_unchanged(setup):
    model, states, data = setup
    exact = TRAK(model, states, projection_dim=None, damping=0.0).influence(*data)
    square = TRAK(model, states, projection_dim=n_params(model), damping=0.0, seed=3).influence(*data)
    small = TRAK(model, states, projection_dim=n_params(model) // 2, damping=0.0, seed=3).influence(*data)
    assert rel_err(square, exact) < 1e-8
    assert rel_err(small, exact) > 1e-3  # a real (lossy) projection does change them


def test_default_relative_ridge_is_close_to_no_ridge(setup):
    model, states, data = setup
    exact = TRAK(model, states, projection_dim=None, damping=0.0).influence(*data)
    default = TRAK(model, states, projection_dim=None).influence(*data)
    assert 0 < rel_err(default, exact) < 1e-3


def test_custom_output_has_no_train_weights(setup):
    model, states, (xtr, ytr, xte, yte) = setup
    scores = TRAK(model, states, projection_dim=None, damping=0.0).influence(xtr, ytr, xte, yte)
    unweighted = TRAK(model, states, projection_dim=None, damping=0.0,
                      output=lambda out, t: margin(out, t)).influence(xtr, ytr, xte, yte)
    q = 0
    for s in states:
        m = copy.deepcopy(model)
        m.load_state_dict(s)
        with torch.no_grad():
            q = q + 1 - torch.softmax(m(xtr), 1).gather(1, ytr[:, None])[:, 0]
    assert rel_err(unweighted * (q / len(states))[:, None], scores) < 1e-10


def test_top_k_self_influence_and_an_untouched_model(setup):
    model, states, (xtr, ytr, xte, yte) = setup
    before = copy.deepcopy(model.state_dict())
    model.train()
    trak = TRAK(model, states, projection_dim=16, batch_size=8, seed=1)
    scores = trak.influence(xtr, ytr, xte, yte)
    assert scores.shape == (N_TRAIN, N_TEST) and scores.dtype == torch.float64
    top = trak.top_k(xtr, ytr, xte, yte, k=5, chunk=17)
    ref_s, ref_i = torch.topk(scores.T, 5, dim=1)
    assert torch.equal(top.proponent_idx, ref_i) and torch.allclose(top.proponent_score, ref_s, atol=1e-12)
    ref_s, ref_i = torch.topk(scores.T, 5, dim=1, largest=False)
    assert torch.equal(top.opponent_idx, ref_i) and torch.allclose(top.opponent_score, ref_s, atol=1e-12)
    diag = trak.influence(xtr, ytr, xtr, ytr).diagonal()
    assert torch.allclose(trak.self_influence(xtr, ytr), diag, rtol=1e-10, atol=0)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_arguments_raise(setup):
    model, states, (xtr, ytr, xte, yte) = setup
    for kwargs, message in [({"projection_dim": 0}, "projection_dim"), ({"projection_dim": -3}, "projection_dim"),
                            ({"damping": -1.0}, "damping"), ({"output": "loss"}, "output"),
                            ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(ValueError, match=message):
            TRAK(model, states, **kwargs)
    with pytest.raises(ValueError, match="at least one checkpoint"):
        TRAK(model, [])
    with pytest.raises(ValueError, match="integer class labels"):
        TRAK(model, states, projection_dim=None).influence(xtr, ytr.double(), xte, yte)


def test_the_kernel_is_singular_and_the_default_ridge_tends_to_its_pseudo_inverse(setup):
    model, states, (xtr, ytr, xte, yte) = setup
    trak = TRAK(copy.deepcopy(model), states, projection_dim=None, damping=0.0)
    trak.model.load_state_dict(states[0])
    phi = torch.cat(list(trak._features(0, xtr, ytr)))
    rank = torch.linalg.matrix_rank(phi.T @ phi, hermitian=True)
    assert rank == n_params(model) - (3 + 1)  # fc2's rows and bias: the margin ignores a shift of all logits
    few = 10  # fewer train samples than parameters as well
    pinv = TRAK(model, states, projection_dim=None, damping=0.0).influence(xtr[:few], ytr[:few], xte, yte)
    ref = brute_force(model, states, xtr[:few], ytr[:few], xte, yte)
    default = TRAK(model, states, projection_dim=None).influence(xtr[:few], ytr[:few], xte, yte)
    assert rel_err(pinv, ref) < 1e-8 and rel_err(default, pinv) < 1e-3


# ------------------------------------------------------------------ dattri as the peer

def test_dattri_peer_equals_fgtrac_without_projection(setup):
    pytest.importorskip("dattri")
    from fgtrac_assets.studies.peers import dattri_trak_scores

    model, states, data = setup
    before = copy.deepcopy(model.state_dict())
    theirs = dattri_trak_scores(model, states, *data, projection_dim=None)
    ours = TRAK(model, states, projection_dim=None, damping=0.0).influence(*data)
    assert theirs.shape == (N_TRAIN, N_TEST)  # fgtrac's orientation
    assert rel_err(theirs, ours) < 1e-8  # same formula, same sign (positive = proponent)
    # dattri's ridge acts on gradients divided by sqrt(P): regularization r is fgtrac's damping r * P
    theirs = dattri_trak_scores(model, states, *data, projection_dim=None, regularization=1e-3)
    ours = TRAK(model, states, projection_dim=None, damping=1e-3 * n_params(model)).influence(*data)
    assert rel_err(theirs, ours) < 1e-8
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dattri_peer_with_projections(setup):
    pytest.importorskip("dattri")
    from fgtrac_assets.studies.peers import dattri_trak_scores

    model, states, data = setup
    exact = TRAK(model, states, projection_dim=None, damping=0.0).influence(*data)
    square = dattri_trak_scores(model, states, *data, projection_dim=n_params(model), seed=5)
    assert rel_err(square, exact) < 1e-6  # its own Gaussian, square: invariant too
    k = 20  # lossy projections (different random numbers in each library): both track the exact scores
    ours = TRAK(model, states, projection_dim=k, damping=0.0, seed=5).influence(*data)
    theirs = dattri_trak_scores(model, states, *data, projection_dim=k, seed=5)
    for scores in (ours, theirs):
        rho = [spearmanr(scores[:, j], exact[:, j]).statistic for j in range(N_TEST)]
        assert sum(rho) / N_TEST > 0.7, rho


def test_float32_gradients_give_the_float64_scores():
    """The kernel is solved in float64 and only numerically-null directions are dropped, so a float32 model
    scores like its float64 copy (a rank cutoff scaled by dim * eps32 once threw away real eigenvalues here)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.tensor(digits.data[:520] / 16.0, dtype=torch.float32), torch.tensor(digits.target[:520])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    states = []
    for _ in range(3):
        for s in range(0, 500, 50):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[s : s + 50]), y[s : s + 50]).backward()
            opt.step()
        states.append(copy.deepcopy(net.state_dict()))
    net64, states64 = copy.deepcopy(net).double(), [{k: v.double() for k, v in s.items()} for s in states]
    for dim in (None, 512):
        ours = TRAK(net, states, projection_dim=dim).influence(x[:500], y[:500], x[500:], y[500:])
        ref = TRAK(net64, states64, projection_dim=dim).influence(x[:500].double(), y[:500], x[500:].double(), y[500:])
        assert ours.dtype == torch.float32 and rel_err(ours.double(), ref) < 1e-3
