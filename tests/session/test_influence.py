"""fg.influence: TracInCP over a session's recorded checkpoints at the lrs its steps applied, per parameter."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fgtrac_assets as fg
from fgtrac_assets.ledger import Ledger
from fgtrac_assets.attribution.trace import ReplayMismatch
from fgtrac_assets.session.scoring import InfluenceError, recorded_checkpoints

N, T = 48, 6
NAMES = [f"train-{i}" for i in range(N)]
TEST = [f"test-{i}" for i in range(T)]


def setup():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N + T, 5, generator=g), torch.randint(0, 3, (N + T,), generator=g)
    return (x[:N], y[:N]), (x[N:], y[N:])


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def train(home, groups: bool):
    (x, y), _ = setup()
    model = make_model()
    params = ([{"params": model[0].parameters(), "lr": 0.2}, {"params": model[2].parameters(), "lr": 0.05}]
              if groups else model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    with fg.track(NAMES, run="r", home=home) as run:
        loader, opt = run.loader(DataLoader(TensorDataset(x, y), batch_size=12, shuffle=True)), run.optimizer(opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):
            for xb, yb in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
            run.checkpoint(model, val_loss=1.0)
            sched.step()
    return model


def brute_force(home, lr_of):
    """sum over checkpoints and parameters of lr * g_train . g_test, from per-sample autograd."""
    (x, y), (tx, ty) = setup()
    model = make_model()
    _, ckpts = recorded_checkpoints(Ledger(home), "r")
    total = torch.zeros(N, T)
    for c in ckpts:
        model.load_state_dict(torch.load(Ledger(home).home.root / c.path))

        def grads(xs, ys):
            out = []
            for i in range(len(ys)):
                loss = nn.functional.cross_entropy(model(xs[i:i + 1]), ys[i:i + 1])
                out.append(dict(zip([n for n, _ in model.named_parameters()],
                                    torch.autograd.grad(loss, list(model.parameters())))))
            return out

        gtr, gte = grads(x, y), grads(tx, ty)
        for name, _ in model.named_parameters():
            a = torch.stack([g[name].flatten() for g in gtr])
            b = torch.stack([g[name].flatten() for g in gte])
            total += lr_of(c, name) * a @ b.T
    return total




def test_each_checkpoint_uses_the_lr_its_steps_applied(tmp_path):
    train(tmp_path, groups=False)
    _, ckpts = recorded_checkpoints(Ledger(tmp_path), "r")
    assert [c.lr for c in ckpts] == [0.1, 0.05, 0.025]  # StepLR halves after each checkpoint
    pairs = fg.checkpoints("r", tmp_path)  # what TracInCP takes, for users who call it themselves
    assert [lr for _, lr in pairs] == [0.1, 0.05, 0.025] and set(pairs[0][0]) == set(make_model().state_dict())
    (x, y), (tx, ty) = setup()
    result = fg.influence("r", make_model(), nn.CrossEntropyLoss(reduction="none"), (x, y), NAMES, (tx, ty), TEST,
                          home=tmp_path, k=5)
    expected = brute_force(tmp_path, lambda c, name: c.lr)
    top = expected.T.topk(5, dim=1)
    assert torch.equal(result.top.proponent_idx, top.indices)
    assert torch.allclose(result.top.proponent_score, top.values, atol=1e-5)
    stored = Ledger(tmp_path).query("SELECT count(*) FROM influence WHERE kind = 'proponent'").column(0)[0].as_py()
    assert stored == T * 5 and result.commit.tree_size > 0


def test_parameter_groups_give_each_parameter_its_own_lr(tmp_path):
    train(tmp_path, groups=True)
    _, ckpts = recorded_checkpoints(Ledger(tmp_path), "r")
    assert ckpts[0].lr == {"0.weight": 0.2, "0.bias": 0.2, "2.weight": 0.05, "2.bias": 0.05}
    assert ckpts[2].lr["0.weight"] == pytest.approx(0.05)
    (x, y), (tx, ty) = setup()
    result = fg.influence("r", make_model(), nn.CrossEntropyLoss(reduction="none"), (x, y), NAMES, (tx, ty), TEST,
                          home=tmp_path, k=4, commit=False)
    expected = brute_force(tmp_path, lambda c, name: c.lr[name])
    top = expected.T.topk(4, dim=1)
    assert torch.equal(result.top.proponent_idx, top.indices)
    assert torch.allclose(result.top.proponent_score, top.values, atol=1e-5)


def test_a_changed_checkpoint_file_is_refused(tmp_path):
    train(tmp_path, groups=False)
    _, ckpts = recorded_checkpoints(Ledger(tmp_path), "r")
    with open(tmp_path / ckpts[1].path, "ab") as f:
        f.write(b"\0")
    (x, y), (tx, ty) = setup()
    with pytest.raises(InfluenceError, match=ckpts[1].checkpoint_id):
        fg.influence("r", make_model(), nn.CrossEntropyLoss(reduction="none"), (x, y), NAMES, (tx, ty), TEST,
                     home=tmp_path)


def test_trak_scores_a_session_run_and_each_scoring_is_its_own_commit(tmp_path):
    from fgtrac_assets.attribution import TRAK

    train(tmp_path, groups=False)
    (x, y), (tx, ty) = setup()
    loss = nn.CrossEntropyLoss(reduction="none")
    result = fg.influence("r", make_model(), loss, (x, y), NAMES, (tx, ty), TEST, home=tmp_path, k=4, method="trak")
    expected = TRAK(make_model(), [s for s, _ in fg.checkpoints("r", tmp_path)], loss).top_k(x, y, tx, ty, k=4)
    assert torch.equal(result.top.proponent_idx, expected.proponent_idx)
    methods = Ledger(tmp_path).query("SELECT DISTINCT method FROM influence").column(0).to_pylist()
    assert methods == ["trak"]
    # a second scoring is its own commit: the audit shows one scoring, not both mixed
    fg.influence("r", make_model(), loss, (x, y), NAMES, (tx, ty), TEST, home=tmp_path, k=4)
    from fgtrac_assets.ledger.audit import influence as audit_influence

    cols, rows = audit_influence(Ledger(tmp_path), TEST[0], "r")
    assert len(rows) == 8 and {r[cols.index("method")] for r in rows} == {"tracincp"}



class Indexed(torch.utils.data.Dataset):
    """(x, y, index): the loop sees which rows each batch holds, the ground truth the ledger must match."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def train_recording_truth(home, make_opt, run="replayed"):
    """Train with the session; return (the initial state, the true steps as TraceSteps, the optimizer's spec)."""
    from fgtrac_assets.attribution.trace import OptimizerSpec, TraceStep

    (x, y), _ = setup()
    model = make_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_opt(model.parameters())
    truth = []
    with fg.track(NAMES, run=run, home=home) as session:
        loader = session.loader(DataLoader(Indexed(x, y), batch_size=12, shuffle=True))
        opt = session.optimizer(opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):
            for xb, yb, idx in loader:
                truth.append(TraceStep(tuple(idx.tolist()), opt.param_groups[0]["lr"]))
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
            session.checkpoint(model, val_loss=1.0)
            sched.step()
    return initial, truth, OptimizerSpec.of(opt)


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                      lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95))],
                         ids=["sgd-momentum", "adam"])
def test_the_replay_methods_score_a_session_run_from_the_trace_it_recorded(tmp_path, make_opt):
    from fgtrac_assets.attribution.metagradient import Metagradient
    from fgtrac_assets.attribution.step_exact import StepExactTracIn
    from fgtrac_assets.attribution.trace import TrainingTrace

    initial, truth, spec = train_recording_truth(tmp_path, make_opt)
    (x, y), (tx, ty) = setup()
    loss = nn.CrossEntropyLoss(reduction="none")
    kept = Ledger(tmp_path).query("SELECT count(*) FROM artifacts WHERE kind = 'initial_weights'").column(0)[0]
    assert kept.as_py() == 1
    true_trace = TrainingTrace({k: v for k, v in initial.items()}, truth, spec)  # the loop's own record
    for method, cls in (("step_exact", StepExactTracIn), ("metagradient", Metagradient)):
        result = fg.influence("replayed", make_model(), loss, (x, y), NAMES, (tx, ty), TEST, home=tmp_path, k=5,
                              method=method)
        expected = cls(make_model(), true_trace, loss).top_k(x, y, tx, ty, k=5)
        assert torch.equal(result.top.proponent_idx, expected.proponent_idx), method
        assert torch.allclose(result.top.proponent_score, expected.proponent_score, rtol=1e-4, atol=1e-7), method
    methods = Ledger(tmp_path).query("SELECT DISTINCT method FROM influence ORDER BY 1").column(0).to_pylist()
    assert methods == ["metagradient", "step_exact"]


def test_a_session_run_the_replay_cannot_follow_is_refused_with_the_reason(tmp_path):
    (x, y), (tx, ty) = setup()
    loss = nn.CrossEntropyLoss(reduction="none")
    train(tmp_path, groups=True)  # two parameter groups at different lrs
    with pytest.raises(InfluenceError, match="different learning rates to its parameter groups"):
        fg.influence("r", make_model(), loss, (x, y), NAMES, (tx, ty), TEST, home=tmp_path, method="step_exact")
    train_recording_truth(tmp_path, lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(InfluenceError, match="give every sample it trained on"):
        fg.influence("replayed", make_model(), loss, (x[:40], y[:40]), NAMES[:40], (tx, ty), TEST, home=tmp_path,
                     method="metagradient")
    with pytest.raises(InfluenceError, match="takes no checkpoints selection"):
        fg.influence("replayed", make_model(), loss, (x, y), NAMES, (tx, ty), TEST, home=tmp_path,
                     method="metagradient", checkpoints=1)
    doubled = lambda out, t: 2 * loss(out, t)  # not the loss the loop trained with  # noqa: E731
    with pytest.raises(ReplayMismatch, match="does not reproduce"):
        fg.influence("replayed", make_model(), doubled, (x, y), NAMES, (tx, ty), TEST, home=tmp_path,
                     method="step_exact")


def test_a_gradscaler_skipped_step_is_left_out_of_the_replay(tmp_path):
    (x, y), (tx, ty) = setup()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    with fg.track(NAMES, run="amp", home=tmp_path) as run:
        loader, opt = run.loader(DataLoader(TensorDataset(x, y), batch_size=12)), run.optimizer(opt)
        scaler = run.scaler(torch.amp.GradScaler("cpu", init_scale=2.0 ** 4))
        for epoch in range(2):
            for s, (xb, yb) in enumerate(loader):
                loss = nn.functional.cross_entropy(model(xb), yb) * (float("inf") if (epoch, s) == (0, 1) else 1.0)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
            run.checkpoint(model)
    applied = Ledger(tmp_path).query("SELECT applied FROM optimizer_steps ORDER BY step").column(0).to_pylist()
    assert applied.count(False) == 1
    result = fg.influence("amp", make_model(), nn.CrossEntropyLoss(reduction="none"), (x, y), NAMES, (tx, ty), TEST,
                          home=tmp_path, method="step_exact", k=3)  # refused unless the replay skips that step too
    assert torch.isfinite(result.top.proponent_score).all()
