"""Exact metagradients against finite differences of actually retraining with one sample's weight perturbed."""

import pytest
import torch
from torch import nn

from fgtrac_assets.attribution.metagradient import Metagradient
from fgtrac_assets.attribution.trace import OptimizerSpec, ReplayMismatch, TraceStep, TrainingTrace
from fgtrac_assets.attribution.trak import margin

LOSS = nn.CrossEntropyLoss(reduction="none")


def tiny_problem(seed=0, n=12, epochs=2, batch=4):
    """Return (model, x, y, test x, test y, steps): a 2-layer tanh MLP, random data, a seeded batch order."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    xt, yt = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    steps = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g).tolist()
        steps += [TraceStep(tuple(order[i:i + batch]), 0.3 / (1 + epoch)) for i in range(0, n, batch)]
    return model, x, y, xt, yt, steps


def make_optimizer(spec: OptimizerSpec, params):
    """Return the torch.optim optimiser the spec describes."""
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=1.0, momentum=spec.momentum, dampening=spec.dampening,
                               nesterov=spec.nesterov, weight_decay=spec.weight_decay)
    cls = torch.optim.Adam if spec.kind == "adam" else torch.optim.AdamW
    return cls(params, lr=1.0, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


def retrain(model, init, steps, spec, x, y, weights):
    """Train a copy of the model with torch.optim over the recorded steps, each minimising the weighted mean loss."""
    import copy

    net = copy.deepcopy(model)
    net.load_state_dict(init)
    opt = make_optimizer(spec, net.parameters())
    for s in steps:
        rows = torch.tensor(s.rows)
        for group in opt.param_groups:
            group["lr"] = s.lr
        opt.zero_grad()
        ((weights[rows] * LOSS(net(x[rows]), y[rows])).sum() / len(rows)).backward()
        opt.step()
    return net


SPECS = [OptimizerSpec(), OptimizerSpec(momentum=0.9), OptimizerSpec(momentum=0.9, nesterov=True, weight_decay=1e-2),
         OptimizerSpec(kind="adam", betas=(0.8, 0.9)), OptimizerSpec(kind="adamw", weight_decay=0.1)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-m{s.momentum}-n{s.nesterov}-wd{s.weight_decay}")
def test_metagradients_equal_finite_differences_of_retraining(spec):
    model, x, y, xt, yt, steps = tiny_problem()
    if spec.kind != "sgd":  # Adam's normalised steps need a smaller lr to stay smooth
        steps = [TraceStep(s.rows, s.lr * 0.1) for s in steps]
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trace = TrainingTrace(init, steps, spec)
    scores = Metagradient(model, trace, LOSS, dtype=torch.float64).influence(x, y, xt, yt)
    eps = 1e-6
    for i in (0, 5, 11):
        losses = []
        for sign in (1, -1):
            w = torch.ones(len(y), dtype=torch.float64)
            w[i] += sign * eps
            net = retrain(model, init, steps, spec, x, y, w)
            with torch.no_grad():
                losses.append(LOSS(net(xt), yt))
        fd = -(losses[0] - losses[1]) / (2 * eps)  # minus: positive = raising the weight lowers the loss
        assert torch.allclose(scores[i], fd, rtol=1e-5, atol=1e-9), (i, scores[i], fd)
    assert scores.abs().max() > 1e-4  # not trivially zero


def test_a_kept_state_per_segment_gives_the_same_scores_as_all_states():
    model, x, y, xt, yt, steps = tiny_problem(epochs=3)
    trace = TrainingTrace(model.state_dict(), steps, OptimizerSpec(momentum=0.5))
    full = Metagradient(model, trace, LOSS)
    segmented = Metagradient(model, trace, LOSS, memory_budget=0)
    a, b = full.influence(x, y, xt, yt), segmented.influence(x, y, xt, yt)
    assert full.segment == 1 and segmented.segment == 3  # ceil(sqrt(9 steps))
    assert torch.equal(a, b)


def test_batch_influence_is_the_mean_of_the_per_test_scores_and_self_influence_the_diagonal():
    model, x, y, xt, yt, steps = tiny_problem()
    meta = Metagradient(model, TrainingTrace(model.state_dict(), steps), LOSS, chunk=3)
    per_test = meta.influence(x, y, xt, yt)
    assert torch.allclose(meta.batch_influence(x, y, xt, yt), per_test.mean(1), atol=1e-12)
    assert torch.allclose(meta.self_influence(x, y), meta.influence(x, y, x, y).diagonal(), atol=1e-12)
    top = meta.top_k(x, y, xt, yt, k=3)
    assert torch.equal(top.proponent_idx, per_test.T.topk(3).indices)


def test_a_sample_no_step_used_has_no_effect_and_the_margin_is_an_output():
    model, x, y, xt, yt, steps = tiny_problem()
    steps = [TraceStep(tuple(r for r in s.rows if r != 7), s.lr) for s in steps]
    trace = TrainingTrace(model.state_dict(), steps)

    scores = Metagradient(model, trace, LOSS, output=margin).influence(x, y, xt, yt)
    assert torch.equal(scores[7], torch.zeros(len(yt), dtype=scores.dtype))
    assert scores.abs().max() > 1e-4


def test_a_trace_that_does_not_reproduce_its_checkpoint_is_refused():
    model, x, y, xt, yt, steps = tiny_problem()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    real = retrain(model, init, steps, OptimizerSpec(), x, y, torch.ones(len(y), dtype=torch.float64))
    good = TrainingTrace(init, steps, checkpoints={len(steps): real.state_dict()})
    meta = Metagradient(model, good, LOSS)
    meta.influence(x, y, xt, yt)
    assert meta.reproduced_max_abs_diff < 1e-12
    swapped = [steps[1], steps[0], *steps[2:]]  # an edited order
    with pytest.raises(ReplayMismatch, match=f"after step {len(steps)}"):
        Metagradient(model, TrainingTrace(init, swapped, checkpoints={len(steps): real.state_dict()}),
                     LOSS).influence(x, y, xt, yt)


@pytest.mark.parametrize("spec", SPECS[:2], ids=["sgd", "momentum"])
def test_taken_at_every_weight_a_it_equals_finite_differences_of_retraining_at_those_weights(spec):
    model, x, y, xt, yt, steps = tiny_problem()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trace = TrainingTrace(init, steps, spec)
    at = 0.5
    scores = Metagradient(model, trace, LOSS, dtype=torch.float64, at=at).influence(x, y, xt, yt)
    segmented = Metagradient(model, trace, LOSS, dtype=torch.float64, at=at, memory_budget=0).influence(x, y, xt, yt)
    assert torch.allclose(scores, segmented, atol=1e-12)
    at_one = Metagradient(model, trace, LOSS, dtype=torch.float64).influence(x, y, xt, yt)
    assert (scores - at_one).abs().max() > 1e-4  # another point of the run: other derivatives
    eps = 1e-6
    for i in (0, 5, 11):
        losses = []
        for sign in (1, -1):
            w = torch.full((len(y),), at, dtype=torch.float64)
            w[i] += sign * eps
            net = retrain(model, init, steps, spec, x, y, w)
            with torch.no_grad():
                losses.append(LOSS(net(xt), yt))
        fd = -(losses[0] - losses[1]) / (2 * eps)
        assert torch.allclose(scores[i], fd, rtol=1e-5, atol=1e-9), (i, scores[i], fd)


def test_taken_elsewhere_it_still_checks_the_recorded_run_first():
    model, x, y, xt, yt, steps = tiny_problem()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    real = retrain(model, init, steps, OptimizerSpec(), x, y, torch.ones(len(y), dtype=torch.float64))
    good = TrainingTrace(init, steps, checkpoints={len(steps): real.state_dict()})
    meta = Metagradient(model, good, LOSS, at=0.5)
    meta.influence(x, y, xt, yt)
    assert meta.reproduced_max_abs_diff < 1e-12
    swapped = [steps[1], steps[0], *steps[2:]]
    with pytest.raises(ReplayMismatch):
        Metagradient(model, TrainingTrace(init, swapped, checkpoints={len(steps): real.state_dict()}), LOSS,
                     at=0.5).influence(x, y, xt, yt)
    with pytest.raises(ValueError, match="at must be in"):
        Metagradient(model, good, LOSS, at=0)
