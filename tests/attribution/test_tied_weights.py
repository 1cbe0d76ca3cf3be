"""Tied weights (one Parameter held by two modules) never give a partial gradient: the exact path, and why."""

import copy

import pytest
import torch
from torch import nn

from fgtrac_assets.attribution import GradCos, GradDot, InfluenceFunction, TracInCP
from fgtrac_assets.attribution.ghost import GhostNotApplicable, linear_factors, linear_layer_names, shared_parameters
from fgtrac_assets.attribution.hessian import MeanLossHessian

LOSS = nn.CrossEntropyLoss(reduction="none")
V, D = 11, 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TiedLM(nn.Module):
    """Mean-pooled token embeddings -> a decoder whose weight is the embedding's (V, D) weight."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(V, D)
        self.decoder = nn.Linear(D, V)
        self.decoder.weight = self.embedding.weight

    def forward(self, x):
        return self.decoder(torch.tanh(self.embedding(x).mean(1)))


def tied_setup():
    torch.manual_seed(0)
    model = TiedLM().double()
    x = torch.randint(0, V, (40, 5))
    y = torch.randint(0, V, (40,))
    ckpts = []
    for lr in (0.3, 0.1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        ckpts.append((copy.deepcopy(model.state_dict()), lr))
    return model, ckpts, x[:30], y[:30], x[30:], y[30:]


def brute_grads(model, x, y):
    """(n, P) per-sample gradients of the decoder's Parameters (the shared weight, the bias), one backward each."""
    model = copy.deepcopy(model)
    params = list(model.decoder.parameters())
    losses = LOSS(model(x), y)
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
                        for i in range(len(losses))])


def brute_scores(model, ckpts, xtr, ytr, xte, yte):
    total = 0
    for state, lr in ckpts:
        model.load_state_dict(state)
        total = total + lr * brute_grads(model, xtr, ytr) @ brute_grads(model, xte, yte).T
    return total


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


def test_the_shared_parameter_is_found_under_both_module_paths():
    model = TiedLM()
    assert linear_layer_names(model, ["decoder"]) == ["decoder"]  # Linear-only by type ...
    assert shared_parameters(model, ["decoder"]) == [("decoder.weight", "embedding.weight")]  # ... but tied
    assert shared_parameters(model, [model.decoder]) == [("decoder.weight", "embedding.weight")]
    assert linear_layer_names(model, None) == ["decoder"]  # every trainable Parameter sits in the decoder
    with pytest.raises(GhostNotApplicable, match="'decoder'.*'embedding'"):
        linear_factors(model, ["decoder"], torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), LOSS)


@pytest.mark.parametrize("layer", ["decoder", None])
def test_tracin_on_a_tied_decoder_is_exact_and_says_why(layer):
    model, ckpts, xtr, ytr, xte, yte = tied_setup()
    with pytest.warns(RuntimeWarning, match="'decoder' shares decoder.weight with module 'embedding'"):
        tracin = TracInCP(model, ckpts, LOSS, layer=layer, batch_size=16)
    assert tracin.path == "per_sample"
    ref = brute_scores(model, ckpts, xtr, ytr, xte, yte)
    scores = tracin.influence(xtr, ytr, xte, yte)
    assert close(scores, ref)
    assert close(tracin.self_influence(xtr, ytr), torch.diagonal(brute_scores(model, ckpts, xtr, ytr, xtr, ytr)))
    top = tracin.top_k(xtr, ytr, xte, yte, k=3, chunk=7)
    assert torch.equal(top.proponent_idx, torch.topk(ref, 3, dim=0).indices.T)
    # the same through the per-sample path asked for by name: no warning, the same numbers
    assert torch.equal(TracInCP(model, ckpts, LOSS, layer=layer, batch_size=16, method="per_sample")
                       .influence(xtr, ytr, xte, yte), scores)


def test_ghost_refuses_a_tied_decoder():
    model, ckpts, *_ = tied_setup()
    for layer in ("decoder", None):
        with pytest.raises(ValueError, match="'decoder'.*'embedding'"):
            TracInCP(model, ckpts, LOSS, layer=layer, method="ghost")


def test_final_model_methods_on_a_tied_decoder():
    model, ckpts, xtr, ytr, xte, yte = tied_setup()
    g_tr, g_te = brute_grads(model, xtr, ytr), brute_grads(model, xte, yte)
    with pytest.warns(RuntimeWarning, match="'decoder'.*'embedding'"):
        dot = GradDot(model, LOSS, layer="decoder")
    with pytest.warns(RuntimeWarning, match="'decoder'.*'embedding'"):
        cos = GradCos(model, LOSS, layer="decoder")
    assert dot.path == cos.path == "per_sample"
    assert close(dot.influence(xtr, ytr, xte, yte), g_tr @ g_te.T)
    unit = lambda g: g / g.norm(dim=1, keepdim=True)  # noqa: E731
    assert close(cos.influence(xtr, ytr, xte, yte), unit(g_tr) @ unit(g_te).T)
    for cls in (GradDot, GradCos):
        with pytest.raises(ValueError, match="'decoder'.*'embedding'"):
            cls(model, LOSS, layer="decoder", method="ghost")
    # the influence function: H over the shared weight and the bias, with every use of the weight
    damping = 0.1
    ifn = InfluenceFunction(model, LOSS, xtr, ytr, layer="decoder", method="explicit", damping=damping)
    hess = explicit_hessian(model, xtr, ytr)
    want = g_tr @ torch.linalg.solve(hess + damping * torch.eye(len(hess), dtype=hess.dtype), g_te.T)
    assert close(ifn.influence(xtr, ytr, xte, yte), want)


def explicit_hessian(model, x, y):
    """Hessian of the mean loss over the flat (shared weight, bias), the model written out by hand."""
    def mean_loss(flat):
        w, b = flat[: V * D].view(V, D), flat[V * D :]
        return LOSS(torch.tanh(w[x].mean(1)) @ w.T + b, y).mean()

    flat = torch.cat([model.embedding.weight.detach().reshape(-1), model.decoder.bias.detach()])
    return torch.autograd.functional.hessian(mean_loss, flat)


def test_two_selected_linear_layers_sharing_a_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    model[2].weight = model[0].weight
    x, y = torch.randn(24, 8, dtype=torch.float64), torch.randint(0, 4, (24,))
    ckpts = [(copy.deepcopy(model.state_dict()), 0.5)]
    with pytest.warns(RuntimeWarning, match="'0' shares 0.weight with module '2'"):
        tracin = TracInCP(model, ckpts, LOSS, layer=["0", "2"])
    params = [model[0].weight, model[0].bias, model[2].bias]
    losses = LOSS(model(x), y)
    g = torch.stack([torch.cat([p.reshape(-1) for p in torch.autograd.grad(losses[i], params, retain_graph=True)])
                     for i in range(len(losses))])
    assert close(tracin.influence(x, y, x, y), 0.5 * g @ g.T)
    with pytest.raises(ValueError, match="'0'.*'2'"):
        TracInCP(model, ckpts, LOSS, layer=["0", "2"], method="ghost")
    # the Hessian's hand-written MLP path would count each use as its own parameter: it is not taken
    names = [n for n, _ in model.named_parameters()]
    assert MeanLossHessian(model, names, model.state_dict(), x, y, LOSS)._mlp is None
    with pytest.raises(ValueError, match="structured"):
        MeanLossHessian(model, names, model.state_dict(), x, y, LOSS, structured=True)


def test_a_linear_called_twice_stays_refused_by_the_factors():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(20, 8, dtype=torch.float64), torch.randint(0, 4, (20,))
    ckpts = [(copy.deepcopy(model.state_dict()), 1.0)]
    assert linear_layer_names(model, None) is None  # one Linear under two paths: not the factor path at all
    assert shared_parameters(model, ["0"]) == []  # one module under two paths is not a sharer
    auto = TracInCP(model, ckpts, LOSS, layer=["0", "4"])
    assert auto.path == "ghost"
    with pytest.warns(RuntimeWarning, match="'0' ran 2 times"):
        scores = auto.influence(x, y, x, y)
    assert close(scores, TracInCP(model, ckpts, LOSS, layer=["0", "4"], method="per_sample").influence(x, y, x, y))
    with pytest.raises(GhostNotApplicable, match="ran 2 times"):
        TracInCP(model, ckpts, LOSS, layer=["0", "4"], method="ghost").influence(x, y, x, y)


def test_structured_hessian_skips_a_sequential_that_reuses_a_module():
    """One activation instance twice in an nn.Sequential: named_children lists it once, so the hand-written path
    would drop its second use."""
    torch.manual_seed(0)
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 6), act, nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    names = [n for n, _ in model.named_parameters()]
    hess = MeanLossHessian(model, names, model.state_dict(), x, y, LOSS)
    assert hess._mlp is None
    params = list(model.parameters())
    flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(LOSS(model(x), y).mean(), params,
                                                                  create_graph=True)])
    eye = torch.eye(hess.dim, dtype=torch.float64)[:8]
    want = torch.stack([torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ e, params, retain_graph=True)])
                        for e in eye])
    assert torch.allclose(hess.matmul(eye), want, rtol=1e-10, atol=1e-12)
