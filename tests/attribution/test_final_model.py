"""Final-model-only attribution (Grad-Dot, Grad-Cos, influence functions, further training) through one interface."""

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fgtrac_assets.attribution import FurtherTraining, GradCos, GradDot, InfluenceFunction, TracInCP
from fgtrac_assets.pipelines.digits import build_cnn

LOSS = nn.CrossEntropyLoss(reduction="none")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def digits(n_train, n_test, image=False):
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float64)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:n_train], y[:n_train], x[n_train : n_train + n_test], y[n_train : n_train + n_test]


def fit(model, x, y, epochs, lr=0.2, batch=25):
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for s in range(0, len(x), batch):
            b = perm[s : s + batch]
            opt.zero_grad()
            LOSS(model(x[b]), y[b]).mean().backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="module")
def mlp_setup():
    xtr, ytr, xte, yte = digits(150, 30)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    return fit(model, xtr, ytr, 30), None, (xtr, ytr, xte, yte)


@pytest.fixture(scope="module")
def cnn_setup():
    xtr, ytr, xte, yte = digits(100, 20, image=True)
    torch.manual_seed(0)
    return fit(build_cnn(10).double(), xtr, ytr, 15, lr=0.1), "fc", (xtr, ytr, xte, yte)


def methods(model, layer, xtr, ytr):
    """Every final-model method, IF over `layer` (the CNN's `fc`; the whole MLP)."""
    kw = dict(layer=layer, damping=0.05)
    return {
        "grad_dot": GradDot(model, LOSS),
        "grad_cos": GradCos(model, LOSS),
        "grad_dot_layer": GradDot(model, LOSS, layer=layer),
        "if_explicit": InfluenceFunction(model, LOSS, xtr, ytr, method="explicit", **kw),
        "if_cg": InfluenceFunction(model, LOSS, xtr, ytr, method="cg", tol=1e-8, max_iter=500, **kw),
        "if_lissa": InfluenceFunction(model, LOSS, xtr, ytr, method="lissa", tol=1e-7, depth=20_000, **kw),
        "further": FurtherTraining(model, LOSS, probes=[0, 3, 5, 8, 13, 21], lr=0.05, batch_size=16, steps=(3, 12),
                                   seeds=(0, 1)),
    }


def close(a, b, tol=1e-6):
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * float(b.abs().max())


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], [p.grad for p in model.parameters()])


def assert_unchanged(model, snap):
    state, modes, flags, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None and g is None for p, g in zip(model.parameters(), grads))


@pytest.mark.parametrize("setup", ["mlp_setup", "cnn_setup"])
def test_common_interface(setup, request):
    model, layer, (xtr, ytr, xte, yte) = request.getfixturevalue(setup)
    model.train()  # modes must come back as they were
    snap = snapshot(model)
    scores = {}
    for name, m in methods(model, layer, xtr, ytr).items():
        s = m.influence(xtr, ytr, xte, yte)
        rows = len(m.probes) if name == "further" else len(xtr)
        assert s.shape == (rows, len(xte)) and torch.isfinite(s).all(), name
        scores[name] = s
        # self-influence is the diagonal of influence(train, train)
        if name == "further":
            probes = torch.tensor(m.probes)
            diag = torch.diagonal(m.influence(xtr, ytr, xtr[probes], ytr[probes]))
            assert torch.allclose(m.self_influence(xtr, ytr), diag, rtol=1e-9, atol=1e-12)
        else:
            sub = slice(0, 12)
            diag = torch.diagonal(m.influence(xtr[sub], ytr[sub], xtr[sub], ytr[sub]))
            assert close(m.self_influence(xtr[sub], ytr[sub]), diag), name
        # top-k agrees with the full matrix; indices are training indices
        top = m.top_k(xtr, ytr, xte, yte, k=3)
        best = s.topk(3, dim=0)
        index = torch.tensor(m.probes) if name == "further" else torch.arange(len(xtr))
        assert torch.equal(top.proponent_idx, index[best.indices.T]), name
        assert torch.allclose(top.proponent_score, best.values.T), name
        # a DataLoader (no targets) gives the same scores
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=37)
        test_loader = DataLoader(TensorDataset(xte, yte), batch_size=11)
        assert close(m.influence(loader, None, test_loader, None), s), name
        assert_unchanged(model, snap)
    model.eval()
    cos = scores["grad_cos"]
    assert cos.min() >= -1 - 1e-9 and cos.max() <= 1 + 1e-9
    # the three influence-function solvers agree
    ref = scores["if_explicit"]
    for name in ("if_cg", "if_lissa"):
        assert close(scores[name], ref, 1e-5), name


def test_grad_dot_and_cos_against_autograd(cnn_setup):
    model, _, (xtr, ytr, xte, yte) = cnn_setup
    m = copy.deepcopy(model).eval()

    def grads(x, y):
        return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(LOSS(m(x[i : i + 1]), y[i : i + 1])
                                                                               .sum(), list(m.parameters()))])
                            for i in range(len(x))])

    gtr, gte = grads(xtr, ytr), grads(xte, yte)
    dot = gtr @ gte.T
    assert torch.allclose(GradDot(model, LOSS).influence(xtr, ytr, xte, yte), dot, rtol=1e-9, atol=1e-12)
    cos = dot / gtr.norm(dim=1)[:, None] / gte.norm(dim=1)[None, :]
    assert torch.allclose(GradCos(model, LOSS).influence(xtr, ytr, xte, yte), cos, rtol=1e-9, atol=1e-12)
    # Grad-Dot is TracInCP with the final model as its single checkpoint (step size 1)
    tracin = TracInCP(model, [(model.state_dict(), 1.0)], LOSS, layer="fc")
    assert torch.allclose(GradDot(model, LOSS, layer="fc").influence(xtr, ytr, xte, yte),
                          tracin.influence(xtr, ytr, xte, yte))
    # the Linear-factor path of Grad-Cos is exact too
    fc = GradCos(model, LOSS, layer="fc")
    assert fc.path == "ghost"
    names = ["fc.weight", "fc.bias"]
    sel = [i for i, (n, _) in enumerate(m.named_parameters()) if n in names]
    sizes = [p.numel() for p in m.parameters()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    cols = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in sel])
    a, b = gtr[:, cols], gte[:, cols]
    want = (a @ b.T) / a.norm(dim=1)[:, None] / b.norm(dim=1)[None, :]
    assert torch.allclose(fc.influence(xtr, ytr, xte, yte), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layer", ["fc", None])  # the Linear-factor path and per-sample gradients
def test_normalized_tracin_sums_the_checkpoints_gradient_cosines(cnn_setup, layer):
    model, _, (xtr, ytr, xte, yte) = cnn_setup
    first = {k: v + 0.01 * torch.sin(torch.arange(v.numel(), dtype=v.dtype).reshape(v.shape)) if v.is_floating_point()
             else v for k, v in model.state_dict().items()}
    last = {k: v.clone() for k, v in model.state_dict().items()}
    tracin = TracInCP(model, [(first, 0.5), (last, 2.0)], LOSS, layer=layer, normalize=True)
    cos = [GradCos(model, LOSS, layer=layer, state_dict=s) for s in (first, last)]
    assert tracin.path == cos[0].path == ("ghost" if layer else "per_sample")
    want = 0.5 * cos[0].influence(xtr, ytr, xte, yte) + 2.0 * cos[1].influence(xtr, ytr, xte, yte)
    assert torch.allclose(tracin.influence(xtr, ytr, xte, yte), want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(tracin.self_influence(xtr, ytr), torch.full((len(ytr),), 2.5, dtype=want.dtype))
    top = tracin.top_k(xtr, ytr, xte, yte, k=3, chunk=7)
    assert torch.allclose(top.proponent_score, want.T.topk(3, dim=1).values, rtol=1e-9, atol=1e-12)


def test_sign_a_duplicated_hard_sample_is_a_proponent(mlp_setup):
    model, _, (xtr, ytr, xte, yte) = mlp_setup
    losses = LOSS(model(xtr), ytr).detach()
    j = int(losses.argmax())  # the hardest training sample, duplicated as a test sample
    xq, yq = xtr[j : j + 1], ytr[j : j + 1]
    for m in (GradDot(model, LOSS), InfluenceFunction(model, LOSS, xtr, ytr, method="explicit", damping=0.05)):
        s = m.influence(xtr, ytr, xq, yq)[:, 0]
        assert s[j] > 0 and int(s.argmax()) == j
    probes = [j] + [i for i in range(0, 150, 10) if i != j]
    further = FurtherTraining(model, LOSS, probes=probes, lr=0.1, batch_size=None, steps=(5,), seeds=(0,))
    s = further.influence(xtr, ytr, xq, yq)[:, 0]
    assert s[0] > 0 and int(s.argmax()) == 0  # leaving the sample out raises its own loss the most


def test_grad_dot_predicts_one_step_of_further_training(mlp_setup):
    """One full-batch step of further training, small lr: the loss change is (lr / n) grad . grad to first order."""
    model, _, (xtr, ytr, xte, yte) = mlp_setup
    probes = list(range(0, 150, 3))
    further = FurtherTraining(model, LOSS, probes=probes, lr=1e-3, batch_size=None, steps=(1,), seeds=(0,))
    gold = further.influence(xtr, ytr, xte, yte)
    dot = GradDot(model, LOSS).influence(xtr[probes], ytr[probes], xte, yte)
    a, b = gold.flatten() - gold.mean(), dot.flatten() - dot.mean()
    assert float(a @ b / (a.norm() * b.norm())) > 0.99
    assert float((gold * dot).sum()) > 0


def test_further_training_equals_a_plain_loop(mlp_setup):
    """The vmapped runs reproduce ordinary SGD on the data without the probe, step by step."""
    model, _, (xtr, ytr, xte, yte) = mlp_setup
    probe, lr, steps = 7, 0.05, 9
    further = FurtherTraining(model, LOSS, probes=[probe], lr=lr, batch_size=16, steps=(steps,), seeds=(3,))
    cost = further.cost()
    assert cost["runs"] == 2 and cost["training_steps"] == 2 * steps and cost["probes"] == 1
    got = further.influence(xtr, ytr, xte, yte)[0]
    finals = []
    for drop in (False, True):
        m = copy.deepcopy(model).eval()
        batches = further._batches(len(xtr), 3, torch.device("cpu"))
        for _ in range(steps):
            idx = next(batches)
            if drop:
                idx = idx[idx != probe]
            m.zero_grad()
            LOSS(m(xtr[idx]), ytr[idx]).mean().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= lr * p.grad
        with torch.no_grad():
            finals.append(LOSS(m(xte), yte))
    assert torch.allclose(got, finals[1] - finals[0], rtol=1e-8, atol=1e-12)
    assert further.last["output"].shape == (1, 1, len(xte), 10)  # output differences kept too


def test_explicit_refuses_large_parameter_counts(cnn_setup):
    model, _, (xtr, ytr, xte, yte) = cnn_setup
    m = InfluenceFunction(model, LOSS, xtr, ytr, method="explicit", layer=None, max_explicit_params=5_000)
    with pytest.raises(ValueError, match="max_explicit_params"):
        m.influence(xtr, ytr, xte, yte)
    with pytest.raises(ValueError, match="method"):
        InfluenceFunction(model, LOSS, xtr, ytr, method="arnoldi")


def test_hessian_data_as_a_loader_and_per_row_cg(mlp_setup):
    model, _, (xtr, ytr, xte, yte) = mlp_setup
    ref = InfluenceFunction(model, LOSS, xtr, ytr, method="explicit", damping=0.05).influence(xtr, ytr, xte, yte)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=40)
    from_loader = InfluenceFunction(model, LOSS, loader, None, method="explicit", damping=0.05)
    assert close(from_loader.influence(xtr, ytr, xte, yte), ref, 1e-9)
    per_row = InfluenceFunction(model, LOSS, xtr, ytr, method="cg", damping=0.05, tol=1e-9, max_iter=500,
                                cg_block=False)
    assert close(per_row.influence(xtr, ytr, xte, yte), ref, 1e-6)
    assert per_row.report()["block"] is False and per_row.report()["not_converged"] == 0


def test_report_names_damping_and_solver_work(mlp_setup):
    model, _, (xtr, ytr, xte, yte) = mlp_setup
    cg = InfluenceFunction(model, LOSS, xtr, ytr, method="cg", damping=0.05, tol=1e-6)
    cg.influence(xtr, ytr, xte, yte)
    rep = cg.report()
    assert rep["damping"] == cg.damping == 0.05 and rep["method"] == "cg"
    assert rep["not_converged"] == 0 and rep["relative_residual_max"] <= 1e-6 and rep["iterations_max"] > 0
    lissa = InfluenceFunction(model, LOSS, xtr, ytr, method="lissa", damping=0.05, depth=50, lissa_batch_size=30,
                              repeat=2, seed=4)
    s = lissa.influence(xtr, ytr, xte, yte)
    rep = lissa.report()
    assert rep["sampled"] and rep["repeat"] == 2 and rep["steps"] == 50 and rep["scale"] > 0
    assert torch.isfinite(s).all()


# ----------------------------------------------------------------------------- convex case


def test_convex_influence_matches_leave_one_out_retraining():
    """L2-regularised multinomial logistic regression at its optimum: explicit, CG and LiSSA agree, and predict LOO."""
    lam, n = 0.01, 400
    xtr, ytr, xte, yte = digits(n, 10)
    torch.manual_seed(0)
    model = nn.Linear(64, 10).double()

    def objective(m, weights):
        reg = 0.5 * lam * sum(p.pow(2).sum() for p in m.parameters())
        return (LOSS(m(xtr), ytr) * weights).sum() / n + reg

    def optimum(m, weights):
        opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = objective(m, weights)
            value.backward()
            return value

        for _ in range(3):
            opt.step(closure)
        m.zero_grad(set_to_none=True)
        return m

    optimum(model, torch.ones(n))
    with torch.no_grad():
        base = LOSS(model(xte), yte)
    # damping = the L2 coefficient: H + damping I is the Hessian of the regularised objective
    kw = dict(damping=lam)
    scores = {
        "explicit": InfluenceFunction(model, LOSS, xtr, ytr, method="explicit", **kw),
        "cg": InfluenceFunction(model, LOSS, xtr, ytr, method="cg", tol=1e-10, max_iter=1000, **kw),
        "lissa": InfluenceFunction(model, LOSS, xtr, ytr, method="lissa", tol=1e-9, depth=50_000, **kw),
    }
    probes = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:30]
    scores = {k: m.influence(xtr[probes], ytr[probes], xte, yte) for k, m in scores.items()}

    def pearson(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float(a @ b / (a.norm() * b.norm()))

    for k in ("cg", "lissa"):
        assert pearson(scores[k], scores["explicit"]) >= 0.99999, k
    loo = []
    for i in probes.tolist():
        w = torch.ones(n)
        w[i] = 0.0
        m = optimum(copy.deepcopy(model), w)
        with torch.no_grad():
            loo.append(LOSS(m(xte), yte) - base)  # loss without i minus with i
    actual = torch.stack(loo) * n  # influence ~ n x (loss change when i is removed)
    for k, s in scores.items():
        assert pearson(s, actual) >= 0.99, k
    assert (scores["explicit"] - actual).abs().max() <= 0.2 * actual.abs().max()
