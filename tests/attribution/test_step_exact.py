"""Step-exact TracIn against a brute-force loop over the recorded steps, one sample's gradient at a time."""

import copy

import pytest
import torch

from fgtrac_assets.attribution.replay import replay_tracin
from fgtrac_assets.attribution.step_exact import StepExactTracIn
from fgtrac_assets.attribution.trace import OptimizerSpec, ReplayMismatch, TraceStep, TrainingTrace

from .test_metagradient import LOSS, tiny_problem


def brute_force(model, steps, x, y, xt, yt, layer=None):
    """Return (n_train, n_test) sum over steps of lr/|B| g(z).g(z'), training with torch.optim.SGD on the way."""
    net = copy.deepcopy(model)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    params = list(net.parameters() if layer is None else net.get_submodule(layer).parameters())

    def grad_of(xi, yi):
        g = torch.autograd.grad(LOSS(net(xi[None]), yi[None]).sum(), params)
        return torch.cat([v.reshape(-1) for v in g])

    scores = torch.zeros(len(y), len(yt), dtype=torch.float64)
    for s in steps:
        tests = torch.stack([grad_of(xt[j], yt[j]) for j in range(len(yt))])
        for i in s.rows:
            scores[i] += s.lr / len(s.rows) * (tests @ grad_of(x[i], y[i]))
        rows = torch.tensor(s.rows)
        opt.param_groups[0]["lr"] = s.lr
        opt.zero_grad()
        LOSS(net(x[rows]), y[rows]).mean().backward()
        opt.step()
    return scores, net


def test_step_exact_scores_equal_a_brute_force_loop_and_the_lemma_machinery():
    model, x, y, xt, yt, steps = tiny_problem(epochs=3)
    steps[1] = TraceStep(steps[1].rows + (steps[1].rows[0],), steps[1].lr)  # a sample drawn twice in one step
    expected, trained = brute_force(model, steps, x, y, xt, yt)
    trace = TrainingTrace(model.state_dict(), steps, checkpoints={len(steps): trained.state_dict()})
    method = StepExactTracIn(model, trace, LOSS)
    scores = method.influence(x, y, xt, yt)
    assert torch.allclose(scores, expected, rtol=1e-10, atol=1e-12)
    assert method.reproduced_max_abs_diff < 1e-12
    events = [(t, i, s.lr) for t, s in enumerate(steps) for i in s.rows]
    lemma = replay_tracin(model, x, y, events, xt, yt, LOSS)
    assert torch.allclose(scores, lemma.tracin, rtol=1e-10, atol=1e-12)


def test_a_layer_restricts_the_gradients_not_the_replay():
    model, x, y, xt, yt, steps = tiny_problem()
    expected, _ = brute_force(model, steps, x, y, xt, yt, layer="2")
    method = StepExactTracIn(model, TrainingTrace(model.state_dict(), steps), LOSS, layer="2")
    assert torch.allclose(method.influence(x, y, xt, yt), expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(method.self_influence(x, y), method.influence(x, y, x, y).diagonal(), atol=1e-12)


def test_self_and_batch_influence_and_top_k_agree_with_the_score_matrix():
    model, x, y, xt, yt, steps = tiny_problem()
    method = StepExactTracIn(model, TrainingTrace(model.state_dict(), steps), LOSS)
    assert torch.allclose(method.self_influence(x, y), method.influence(x, y, x, y).diagonal(), atol=1e-12)
    per_test = method.influence(x, y, xt, yt)
    assert torch.allclose(method.batch_influence(x, y, xt, yt), per_test.mean(1), atol=1e-12)
    top = method.top_k(x, y, xt, yt, k=4)
    assert torch.equal(top.opponent_idx, (-per_test.T).topk(4).indices)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.influence(x, y, xt, yt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_step_exact_replay_of_another_run_is_refused():
    model, x, y, xt, yt, steps = tiny_problem()
    _, trained = brute_force(model, steps, x, y, xt, yt)
    lr_changed = [TraceStep(s.rows, s.lr * 1.5) for s in steps]
    trace = TrainingTrace(model.state_dict(), lr_changed, checkpoints={len(steps): trained.state_dict()})
    with pytest.raises(ReplayMismatch, match="does not reproduce"):
        StepExactTracIn(model, trace, LOSS).influence(x, y, xt, yt)


def test_batch_scores_from_the_replayed_pass_equal_the_forward_mode_ones_on_a_convolution():
    """The factored path (each layer's inputs and output gradients) and the forward-mode path agree."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 5 * 5, 4)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)
    xt, yt = torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (3,), generator=g)
    steps = [TraceStep(tuple(torch.randperm(10, generator=g)[:4].tolist()), 0.2) for _ in range(6)]
    method = StepExactTracIn(model, TrainingTrace(model.state_dict(), steps, OptimizerSpec(momentum=0.9)), LOSS)
    factored = method.batch_influence(x, y, xt, yt)
    forward_mode = method._run(x, y, None, method._jvp_dots(xt, yt))[:, 0]
    assert torch.allclose(factored, forward_mode, rtol=1e-10, atol=1e-13)
    assert torch.allclose(factored, method.influence(x, y, xt, yt).mean(1), rtol=1e-10, atol=1e-13)
    assert factored.abs().max() > 1e-4
