"""Per-parameter learning rates in TracInCP: sum_c sum_p lr_cp g_p(z) . g_p(z') on both paths, against brute force."""

import copy

import pytest
import torch
from torch import nn

from fgtrac_assets.attribution import TracInCP
from fgtrac_assets.attribution.ghost import influence_from_factors, linear_factors
from fgtrac_assets.attribution.per_sample import RandomProjection

LOSS = nn.CrossEntropyLoss(reduction="none")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def perturbed_checkpoints(model, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ckpts = []
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        ckpts.append(copy.deepcopy(model.state_dict()))
    return ckpts


def mlp_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 5)).double()
    x, y = torch.randn(50, 12, dtype=torch.float64), torch.randint(0, 5, (50,))
    states = perturbed_checkpoints(model)
    # two parameter groups per checkpoint: the first layer at 4x the second's lr, decayed between checkpoints
    lrs = [{"0.weight": 0.4, "0.bias": 0.4, "2.weight": 0.1, "2.bias": 0.1},
           {"0.weight": 0.2, "0.bias": 0.2, "2.weight": 0.05, "2.bias": 0.05}]
    return model, list(zip(states, lrs)), (x[:35], y[:35], x[35:], y[35:])


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def cnn_setup():
    torch.manual_seed(1)
    model = ConvNet().double()
    x, y = torch.randn(40, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (40,))
    states = perturbed_checkpoints(model, seed=1)
    lrs = [{"conv.weight": 0.2, "conv.bias": 0.2, "fc.weight": 0.1, "fc.bias": 0.1},  # the conv group at 2x
           {"conv.weight": 0.06, "conv.bias": 0.06, "fc.weight": 0.03, "fc.bias": 0.01}]
    return model, list(zip(states, lrs)), (x[:30], y[:30], x[30:], y[30:])


def brute_grads(model, names, x, y):
    """Per-sample gradients {name: (n, numel)}, one autograd backward per sample."""
    params = [model.get_parameter(n) for n in names]
    losses = LOSS(model(x), y)
    rows = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(len(losses))]
    return {n: torch.stack([r[j].reshape(-1) for r in rows]) for j, n in enumerate(names)}


def brute_scores(model, ckpts, names, xtr, ytr, xte, yte, unit=False):
    """sum_c sum_p lr_cp g_p(train) . g_p(test), an explicit sum over the parameters."""
    model = copy.deepcopy(model)
    total = 0
    for state, lrs in ckpts:
        model.load_state_dict(state)
        tr, te = brute_grads(model, names, xtr, ytr), brute_grads(model, names, xte, yte)
        if unit:
            tr, te = normalised(tr), normalised(te)
        total = total + sum(lrs[n] * tr[n] @ te[n].T for n in names)
    return total


def normalised(grads):
    norm = torch.cat(list(grads.values()), dim=1).norm(dim=1, keepdim=True)
    return {n: g / norm for n, g in grads.items()}


def close(a, b, tol=1e-9):
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


def check_all_three(tracin, model, ckpts, xtr, ytr, xte, yte):
    """influence, self_influence and top_k of ``tracin`` against the explicit sums."""
    names = tracin.param_names
    ref = brute_scores(model, ckpts, names, xtr, ytr, xte, yte)
    scores = tracin.influence(xtr, ytr, xte, yte)
    assert close(scores, ref)
    assert close(tracin.self_influence(xtr, ytr), torch.diagonal(brute_scores(model, ckpts, names, xtr, ytr, xtr, ytr)))
    top = tracin.top_k(xtr, ytr, xte, yte, k=4, chunk=9)
    assert torch.equal(top.proponent_idx, torch.topk(scores, 4, dim=0).indices.T)
    assert torch.equal(top.opponent_idx, torch.topk(scores, 4, dim=0, largest=False).indices.T)
    assert torch.allclose(top.proponent_score, torch.topk(ref, 4, dim=0).values.T, rtol=1e-9)


def make(model, ckpts, **kw):
    return TracInCP(model, ckpts, LOSS, batch_size=16, **kw)


def test_layers_in_two_groups_take_the_ghost_path():
    model, ckpts, (xtr, ytr, xte, yte) = mlp_setup()
    tracin = make(model, ckpts, layer=["0", "2"])
    assert tracin.path == "ghost"
    check_all_three(tracin, model, ckpts, xtr, ytr, xte, yte)
    # the factor API directly: per-(checkpoint, layer) lrs are per-layer scalings of one checkpoint's dot products
    model.load_state_dict(ckpts[0][0])
    tr, te = linear_factors(model, ["0", "2"], xtr, ytr, LOSS), linear_factors(model, ["0", "2"], xte, yte, LOSS)
    split = 0.4 * influence_from_factors([tr[:1]], [te[:1]], [1.0]) + 0.1 * influence_from_factors(
        [tr[1:]], [te[1:]], [1.0])
    assert torch.allclose(influence_from_factors([tr], [te], [[0.4, 0.1]]), split, rtol=1e-12)
    with pytest.raises(ValueError, match="3 learning rates for 2 layers"):
        influence_from_factors([tr], [te], [[0.4, 0.1, 0.2]])


def test_conv_and_linear_take_the_per_sample_path():
    model, ckpts, (xtr, ytr, xte, yte) = cnn_setup()
    tracin = make(model, ckpts)
    assert tracin.path == "per_sample"
    check_all_three(tracin, model, ckpts, xtr, ytr, xte, yte)


def test_weight_and_bias_at_different_lrs_leave_the_ghost_path():
    model, ckpts, (xtr, ytr, xte, yte) = mlp_setup()
    ckpts[1][1]["2.bias"] = 0.5
    with pytest.warns(RuntimeWarning, match="layer '2' has its weight and bias at different learning rates"):
        tracin = make(model, ckpts, layer=["0", "2"])
    assert tracin.path == "per_sample"
    check_all_three(tracin, model, ckpts, xtr, ytr, xte, yte)
    with pytest.raises(ValueError, match="layer '2' has its weight and bias"):
        make(model, ckpts, layer=["0", "2"], method="ghost")


def test_a_ghost_failure_at_run_time_keeps_the_lrs():
    """A Linear on 3-D inputs: the factors refuse it while running, the per-sample fallback scales by lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (3, 4)), nn.Linear(4, 5), nn.Flatten(), nn.Linear(15, 3)).double()
    x, y = torch.randn(30, 12, dtype=torch.float64), torch.randint(0, 3, (30,))
    ckpts = [(copy.deepcopy(model.state_dict()), {"1.weight": 0.3, "1.bias": 0.3, "3.weight": 0.1, "3.bias": 0.1})]
    tracin = make(model, ckpts)
    assert tracin.path == "ghost"
    with pytest.warns(RuntimeWarning, match="not applicable"):
        scores = tracin.influence(x[:20], y[:20], x[20:], y[20:])
    assert close(scores, brute_scores(model, ckpts, tracin.param_names, x[:20], y[:20], x[20:], y[20:]))


@pytest.mark.parametrize("setup, layer", [(mlp_setup, ["0", "2"]), (cnn_setup, None)])
def test_a_uniform_mapping_is_the_float(setup, layer):
    model, ckpts, (xtr, ytr, xte, yte) = setup()
    names = make(model, ckpts, layer=layer).param_names
    as_map = [(s, {n: 0.25 for n in names}) for s, _ in ckpts]
    as_float = [(s, 0.25) for s, _ in ckpts]
    a, b = make(model, as_map, layer=layer), make(model, as_float, layer=layer)
    assert a.path == b.path and [lr for _, lr in a.checkpoints] == [0.25, 0.25]
    assert torch.equal(a.influence(xtr, ytr, xte, yte), b.influence(xtr, ytr, xte, yte))
    assert torch.equal(a.self_influence(xtr, ytr), b.self_influence(xtr, ytr))
    ta, tb = a.top_k(xtr, ytr, xte, yte, k=3), b.top_k(xtr, ytr, xte, yte, k=3)
    assert torch.equal(ta.proponent_idx, tb.proponent_idx) and torch.equal(ta.opponent_score, tb.opponent_score)


def test_mapping_rules():
    model, ckpts, _ = mlp_setup()
    del ckpts[1][1]["2.bias"]
    with pytest.raises(ValueError, match="no entry for selected parameter '2.bias'"):
        make(model, ckpts)
    assert make(model, ckpts, layer="0").path == "ghost"  # entries for unselected parameters are not needed
    ckpts[1][1]["2.bias"] = -0.1
    with pytest.raises(ValueError, match=">= 0"):
        make(model, ckpts)
    # a tied parameter may be named by any of its names
    emb, dec = nn.Embedding(5, 4), nn.Linear(4, 5)
    dec.weight = emb.weight
    tied = nn.ModuleDict({"emb": emb, "dec": dec})
    tracin = TracInCP(tied, [(tied.state_dict(), {"dec.weight": 0.2, "dec.bias": 0.1})], LOSS, layer="dec",
                      method="per_sample")
    assert tracin.param_names == ["emb.weight", "dec.bias"] and tracin.checkpoints[0][1] == [0.2, 0.1]
    with pytest.raises(ValueError, match="tied parameter 'emb.weight' different values"):
        TracInCP(tied, [(tied.state_dict(), {"dec.weight": 0.2, "emb.weight": 0.3, "dec.bias": 0.1})], LOSS,
                 layer="dec", method="per_sample")


def test_projection_scales_the_train_side_before_projecting():
    model, ckpts, (xtr, ytr, xte, yte) = cnn_setup()
    tracin = make(model, ckpts, projection_dim=64, seed=5)
    names, got = tracin.param_names, tracin.influence(xtr, ytr, xte, yte)
    want = 0
    net = copy.deepcopy(model)
    for state, lrs in ckpts:
        net.load_state_dict(state)
        tr, te = brute_grads(net, names, xtr, ytr), brute_grads(net, names, xte, yte)
        proj = RandomProjection(64, seed=5)
        want = want + proj([lrs[n] * tr[n] for n in names]) @ proj([te[n] for n in names]).T
    assert close(got, want)


@pytest.mark.parametrize("setup, layer", [(mlp_setup, ["0", "2"]), (cnn_setup, None)])
def test_normalize_scales_the_unit_gradients(setup, layer):
    model, ckpts, (xtr, ytr, xte, yte) = setup()
    tracin = make(model, ckpts, layer=layer, normalize=True)
    ref = brute_scores(model, ckpts, tracin.param_names, xtr, ytr, xte, yte, unit=True)
    assert close(tracin.influence(xtr, ytr, xte, yte), ref)
    with pytest.raises(ValueError, match="projection"):
        make(model, ckpts, layer=layer, normalize=True, projection_dim=8)


def test_a_parameter_the_loss_does_not_use():
    """vmap returns such a parameter's zero gradient as an expanded tensor: the lr scaling must not write into it."""
    model, ckpts, (xtr, ytr, xte, yte) = cnn_setup()
    model.spare = nn.Parameter(torch.ones(3, dtype=torch.float64))
    ckpts = [({**state, "spare": model.spare.detach().clone()}, {**lrs, "spare": 0.7}) for state, lrs in ckpts]
    tracin = make(model, ckpts)
    assert tracin.path == "per_sample" and "spare" in tracin.param_names
    used = [n for n in tracin.param_names if n != "spare"]
    assert close(tracin.influence(xtr, ytr, xte, yte), brute_scores(model, ckpts, used, xtr, ytr, xte, yte))
