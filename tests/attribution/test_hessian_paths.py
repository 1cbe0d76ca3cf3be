"""Structured MLP Hessian-vector products and preconditioned block CG agree with the generic / exact answers."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from fgtrac_assets.attribution import InfluenceFunction
from fgtrac_assets.attribution.hessian import MeanLossHessian, snapshot_state
from fgtrac_assets.attribution.ihvp import ExplicitInverse, solve_block_cg
from fgtrac_assets.attribution.preconditioner import KroneckerPreconditioner

LOSS = nn.CrossEntropyLoss(reduction="none")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mlp():
    d = load_digits()
    x = torch.tensor(d.data[:160] / 16.0, dtype=torch.float64)
    y = torch.tensor(d.target[:160], dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(8, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(150):
        opt.zero_grad()
        LOSS(model(x), y).mean().backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, x, y


@pytest.mark.parametrize("names", [None, ["0.weight", "2.bias", "5.weight", "5.bias"], ["2.weight"]])
def test_structured_products_equal_the_generic_ones(mlp, names):
    model, x, y = mlp
    names = names or [n for n, _ in model.named_parameters()]
    state = snapshot_state(model)
    generic = MeanLossHessian(model, names, state, x, y, LOSS, batch_size=50, structured=False)
    fast = MeanLossHessian(model, names, state, x, y, LOSS, batch_size=50)
    assert fast._mlp is not None and generic._mlp is None
    v = torch.randn(9, generic.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = generic.matmul(v)
    assert torch.allclose(fast.matmul(v), want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    # one data batch, weighted (LiSSA's sampled mode)
    assert torch.allclose(fast.matmul(v, [2], 3.0), generic.matmul(v, [2], 3.0), rtol=1e-10, atol=1e-12)


def test_structured_path_only_where_it_applies(mlp):
    model, x, y = mlp
    names = [n for n, _ in model.named_parameters()]
    state = snapshot_state(model)
    cnn_like = nn.Sequential(nn.Linear(64, 4), nn.LayerNorm(4), nn.Linear(4, 10)).double()
    assert MeanLossHessian(cnn_like, ["0.weight"], snapshot_state(cnn_like), x, y, LOSS)._mlp is None
    with pytest.raises(ValueError, match="structured"):
        MeanLossHessian(model, names, state, x, y, LOSS, forward=lambda m, xx: m(xx), structured=True)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_preconditioned_block_cg_converges_to_the_explicit_solution(mlp, kind):
    model, x, y = mlp
    names = [n for n, _ in model.named_parameters()]
    damping = 0.05
    hess = MeanLossHessian(model, names, snapshot_state(model), x, y, LOSS, batch_size=80)
    rhs = torch.randn(6, hess.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = ExplicitInverse(hess.matrix(10_000), damping).solve(rhs)
    precond = KroneckerPreconditioner(hess, damping, kind)
    assert precond.report["kronecker_layers"] == 3 and precond.report["other_parameters"] == 0
    # M is symmetric positive definite
    probe = torch.randn(5, hess.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gram = probe @ precond(probe).T
    assert torch.allclose(gram, gram.T, rtol=1e-9, atol=1e-12) and bool((torch.linalg.eigvalsh(gram) > 0).all())
    x_pcg, rep = solve_block_cg(hess.matmul, rhs, damping, max_iter=500, tol=1e-10, precondition=precond)
    assert rep["solver"] == "block_pcg" and rep["not_converged"] == 0
    assert torch.allclose(x_pcg, exact, rtol=1e-6, atol=1e-8 * float(exact.abs().max()))


def test_influence_function_preconditioner_option(mlp):
    model, x, y = mlp
    xtr, ytr, xte, yte = x[:120], y[:120], x[120:], y[120:]
    ref = InfluenceFunction(model, LOSS, xtr, ytr, method="explicit", damping=0.05).influence(xtr, ytr, xte, yte)
    m = InfluenceFunction(model, LOSS, xtr, ytr, method="cg", damping=0.05, tol=1e-9, max_iter=500,
                          preconditioner="ekfac")
    s = m.influence(xtr, ytr, xte, yte)
    assert float((s - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    rep = m.report()
    assert rep["preconditioner"] == "ekfac" and rep["not_converged"] == 0
    assert "preconditioner" in rep["seconds"]
    with pytest.raises(ValueError, match="preconditioner"):
        InfluenceFunction(model, LOSS, xtr, ytr, method="cg", preconditioner="shampoo")


def test_bfloat16_products_stay_close_and_keep_the_scores(mlp):
    """Products with bf16 GEMMs differ by about bf16's precision; influence scores still agree with the exact ones."""
    model, x, y = mlp
    model32 = copy_to(model, torch.float32)
    x32 = x.float()
    names = [n for n, _ in model32.named_parameters()]
    state = snapshot_state(model32)
    full = MeanLossHessian(model32, names, state, x32, y, LOSS, batch_size=50)
    half = MeanLossHessian(model32, names, state, x32, y, LOSS, batch_size=50, product_dtype=torch.bfloat16)
    v = torch.randn(16, full.dim, generator=torch.Generator().manual_seed(2))
    want, got = full.matmul(v), half.matmul(v)
    assert got.dtype == torch.float32 and half.product_dtype == torch.bfloat16
    rel = float((got - want).norm() / want.norm())
    assert 1e-5 < rel < 3e-2  # really bf16 (not silently float32), and close
    exact = InfluenceFunction(model32, LOSS, x32, y, method="explicit", damping=0.5).influence(x32, y, x32[:20], y[:20])
    for method, kw in (("cg", {"tol": 1e-3}), ("lissa", {"tol": 1e-3})):
        f = InfluenceFunction(model32, LOSS, x32, y, method=method, damping=0.5, product_dtype=torch.bfloat16, **kw)
        scores = f.influence(x32, y, x32[:20], y[:20])
        assert torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1] > 0.99, method
        assert f.report()["product_dtype"] == "bfloat16"
    cnn_like = nn.Sequential(nn.Linear(64, 4), nn.LayerNorm(4), nn.Linear(4, 10))
    with pytest.raises(ValueError, match="structured"):
        MeanLossHessian(cnn_like, ["0.weight"], snapshot_state(cnn_like), x32, y, LOSS, product_dtype=torch.bfloat16)


def copy_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Return a copy of the model in another dtype (the fixture's model stays float64)."""
    import copy

    return copy.deepcopy(model).to(dtype)


@pytest.mark.parametrize("solver", ["block_cg", "cg", "lissa"])
def test_solvers_never_update_a_product_that_is_their_own_input(solver):
    from fgtrac_assets.attribution.ihvp import solve_cg, solve_lissa

    rhs = torch.randn(5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    identity = lambda v: v  # noqa: E731 - an operator that hands back its input
    if solver == "block_cg":
        x, _ = solve_block_cg(identity, rhs, damping=0.5, max_iter=5, tol=1e-12)
    elif solver == "cg":
        x, _ = solve_cg(identity, rhs, damping=0.5, max_iter=5, tol=1e-12)
    else:
        x, _ = solve_lissa(identity, rhs, damping=0.5, scale=1.0, depth=60, tol=1e-12)
    assert torch.allclose(x, rhs / 1.5, rtol=1e-9, atol=1e-12)
