"""Every way people train, recorded right: each test compares the committed events with what the loop really did.

The datasets yield each item's index beside it, so the loop itself knows the ground truth (which items each
optimizer step consumed); the session only sees the user's loader and optimizer.
"""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import fgtrac_assets as fg
from fgtrac_assets.ledger import Ledger
from fgtrac_assets.session import SampleIdError, SessionError

N = 40
IDS = [f"item-{i:03d}" for i in range(N)]
SID = {fg.sample_id(n): i for i, n in enumerate(IDS)}


def data(n=N):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.arange(n), torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def model_and_opt(lr=0.1, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=lr, **kw)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def recorded(home, kind="batched"):
    """Return {step: sorted dataset indices} of the committed events of a kind."""
    rows = Ledger(home).query("SELECT step, sample_id FROM events WHERE kind = ? ORDER BY step, position",
                              [kind]).to_pylist()
    out = {}
    for r in rows:
        out.setdefault(r["step"], []).append(SID[r["sample_id"]])
    return {k: sorted(v) for k, v in out.items()}


def steps(home):
    return Ledger(home).query("SELECT * FROM optimizer_steps ORDER BY step").to_pylist()


def test_parameter_groups_record_every_groups_lr(tmp_path, capsys):
    model, _ = model_and_opt()
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 0.002},
                             {"params": model[2].parameters(), "lr": 0.001}])
    truth = {}
    with fg.track(IDS, run="groups", home=tmp_path) as run:
        loader, opt = run.loader(DataLoader(data(), batch_size=8, shuffle=True)), run.optimizer(opt)
        for s, (i, x, y) in enumerate(loader):
            loss_of(model, x, y).backward()
            opt.step()
            opt.zero_grad()
            truth[s] = sorted(i.tolist())
        run.checkpoint(model, val_loss=1.0)
    assert recorded(tmp_path) == truth
    assert {r["lrs"] for r in steps(tmp_path)} == {json.dumps({"0": [0.002, 0.001]})}
    groups = json.loads(Ledger(tmp_path).query("SELECT optimizers FROM training_runs").column(0)[0].as_py())[0]["groups"]
    assert [g["parameters"] for g in groups] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    from fgtrac_assets.cli import main

    capsys.readouterr()
    assert main(["--home", str(tmp_path), "audit", "used", IDS[0], "--run", "groups", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["lrs_by_group"] == "group 0 0.002, group 1 0.001"


def test_gradient_accumulation_every_micro_batch_belongs_to_its_step(tmp_path):
    model, opt = model_and_opt()
    truth, pending, step = {}, [], 0
    with fg.track(IDS, run="accum", home=tmp_path) as run:
        loader, opt = run.loader(DataLoader(data(), batch_size=4, shuffle=True)), run.optimizer(opt)
        for _ in range(2):
            for b, (i, x, y) in enumerate(loader):
                (loss_of(model, x, y) / 2).backward()
                pending += i.tolist()
                if b % 2 == 1:
                    opt.step()
                    opt.zero_grad()
                    truth[step], pending, step = sorted(pending), [], step + 1
    assert recorded(tmp_path) == truth
    assert sum(len(v) for v in truth.values()) == 2 * N
    assert {r["micro_batches"] for r in steps(tmp_path)} == {2}


def test_amp_skipped_step_is_recorded_as_skipped(tmp_path):
    model, opt = model_and_opt()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    applied, skipped = {}, {}
    with fg.track(IDS, run="amp", home=tmp_path) as run:
        loader, opt = run.loader(DataLoader(data(), batch_size=8)), run.optimizer(opt)
        scaler = run.scaler(scaler)
        for s, (i, x, y) in enumerate(loader):
            loss = loss_of(model, x, y) * (float("inf") if s == 2 else 1.0)
            scaler.scale(loss).backward()
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
            (applied if moved else skipped)[s] = sorted(i.tolist())
    assert list(skipped) == [2]
    assert recorded(tmp_path) == applied
    assert recorded(tmp_path, "skipped") == skipped
    assert [r["applied"] for r in steps(tmp_path)] == [s not in skipped for s in range(5)]
    used = Ledger(tmp_path).query("SELECT size FROM training_sets").column(0)[0].as_py()
    assert used == N - len(skipped[2])


def test_two_optimizers_make_one_step_per_batch(tmp_path):
    model, _ = model_and_opt()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.Adam(model[2].parameters(), lr=0.01)
    with fg.track(IDS, run="two-opts", home=tmp_path) as run:
        loader = run.loader(DataLoader(data(), batch_size=10))
        first, second = run.optimizer(first), run.optimizer(second)
        for i, x, y in loader:
            loss_of(model, x, y).backward()
            first.step()
            second.step()
            first.zero_grad()
            second.zero_grad()
    events = Ledger(tmp_path).query("SELECT count(*) AS n FROM events WHERE kind = 'batched'").column(0)[0].as_py()
    assert events == N
    assert [json.loads(r["lrs"]) for r in steps(tmp_path)] == [{"0": [0.1], "1": [0.01]}] * 4


def test_break_then_one_more_step_records_the_last_batch_once(tmp_path):
    model, opt = model_and_opt()
    truth = {}
    with fg.track(IDS, run="break", home=tmp_path) as run:
        loader, opt = run.loader(DataLoader(data(), batch_size=8)), run.optimizer(opt)
        opt.step()  # a step with no batch at all
        for s, (i, x, y) in enumerate(loader, start=1):
            loss_of(model, x, y).backward()
            opt.step()
            truth[s] = sorted(i.tolist())
            if s == 2:
                break
        opt.step()  # the last gradients applied once more: no new samples
    assert recorded(tmp_path) == truth
    assert [(r["step"], r["samples"]) for r in steps(tmp_path)] == [(0, 0), (1, 8), (2, 8), (3, 0)]


class Stream(IterableDataset):
    """Items with their own ids, no indices; split between workers by worker id."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, k = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(w, N, k):
            yield {"id": IDS[i], "i": i, "x": torch.randn(4), "y": i % 3}


@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_dataset_ids_come_from_a_key_function(tmp_path, workers):
    model, opt = model_and_opt()
    truth = {}
    with fg.track(None, run="stream", home=tmp_path) as run:
        loader = run.loader(DataLoader(Stream(), batch_size=6, num_workers=workers), key=lambda item: item["id"])
        opt = run.optimizer(opt)
        for s, batch in enumerate(loader):
            loss_of(model, batch["x"], batch["y"]).backward()
            opt.step()
            opt.zero_grad()
            truth[s] = sorted(batch["i"].tolist())
    assert recorded(tmp_path) == truth
    assert sum(map(len, truth.values())) == N


def test_batch_size_none_yields_items_unbatched(tmp_path):
    model, opt = model_and_opt()
    truth = {}
    with fg.track(IDS, run="unbatched", home=tmp_path) as run:
        loader, opt = run.loader(DataLoader(data(), batch_size=None, shuffle=True)), run.optimizer(opt)
        for s, (i, x, y) in enumerate(loader):
            assert x.shape == (4,)  # the item itself, as the plain loader yields it
            loss_of(model, x[None], y[None]).backward()
            opt.step()
            opt.zero_grad()
            truth[s] = [int(i)]
    assert recorded(tmp_path) == truth


def test_worker_processes_and_persistent_workers_are_kept(tmp_path):
    model, opt = model_and_opt()
    truth, step = {}, 0
    plain = DataLoader(data(), batch_size=8, shuffle=True, num_workers=2, persistent_workers=True,
                       prefetch_factor=3)
    with fg.track(IDS, run="workers", home=tmp_path) as run:
        loader, opt = run.loader(plain), run.optimizer(opt)
        assert loader._keyed.persistent_workers and loader._keyed.prefetch_factor == 3
        for _ in range(2):
            for i, x, y in loader:
                loss_of(model, x, y).backward()
                opt.step()
                opt.zero_grad()
                truth[step], step = sorted(i.tolist()), step + 1
    assert recorded(tmp_path) == truth


def test_lr_scheduler_runs_on_the_optimizer_and_every_steps_lr_is_recorded(tmp_path):
    model, opt = model_and_opt(lr=0.1, momentum=0.9)
    lrs = []
    with fg.track(IDS, run="sched", home=tmp_path) as run:
        loader, opt = run.loader(DataLoader(data(), batch_size=10)), run.optimizer(opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):
            for i, x, y in loader:
                loss_of(model, x, y).backward()
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                opt.zero_grad()
            sched.step()
            run.checkpoint(model, val_loss=0.5)
    assert [json.loads(r["lrs"])["0"][0] for r in steps(tmp_path)] == lrs
    assert Ledger(tmp_path).query("SELECT lr FROM checkpoints ORDER BY step").column(0).to_pylist() == [0.1, 0.05, 0.025]


def test_batches_never_stepped_are_discarded_not_trained(tmp_path):
    model, opt = model_and_opt()
    with fg.track(IDS, run="tail", home=tmp_path) as run:
        loader, opt = run.loader(DataLoader(data(), batch_size=8)), run.optimizer(opt)
        for s, (i, x, y) in enumerate(loader):
            loss_of(model, x, y).backward()
            if s < 3:
                opt.step()
    assert sum(map(len, recorded(tmp_path).values())) == 24
    assert sum(map(len, recorded(tmp_path, "discarded").values())) == 16


@pytest.mark.parametrize("ids, why", [(IDS[:-1], "39 given for a dataset of 40"),
                                      (IDS[:-1] + [IDS[0]], "names more than one item"),
                                      (IDS[:-1] + [7], "not a non-empty text")])
def test_sample_ids_are_checked_when_the_loader_is_wrapped(tmp_path, ids, why):
    with pytest.raises(SampleIdError, match=why):
        with fg.track(ids, run="bad", home=tmp_path) as run:
            run.loader(DataLoader(data(), batch_size=8))
    assert not (tmp_path / "ledger.duckdb").exists()


def test_an_iterable_dataset_without_a_key_is_refused(tmp_path):
    with pytest.raises(SessionError, match="pass key="):
        with fg.track(None, run="nokey", home=tmp_path) as run:
            run.loader(DataLoader(Stream(), batch_size=4))


def test_a_failure_commits_nothing_and_removes_its_checkpoints(tmp_path):
    model, opt = model_and_opt()
    with pytest.raises(RuntimeError, match="diverged"):
        with fg.track(IDS, run="fails", home=tmp_path) as run:
            loader, opt = run.loader(DataLoader(data(), batch_size=8)), run.optimizer(opt)
            for i, x, y in loader:
                loss_of(model, x, y).backward()
                opt.step()
            run.checkpoint(model, val_loss=1.0)
            raise RuntimeError("diverged")
    assert not list(tmp_path.rglob("*.pt"))
    assert not Ledger(tmp_path).exists() or Ledger(tmp_path).query("SELECT count(*) FROM events").column(0)[0].as_py() == 0
    opt.step()  # the hooks are gone: stepping the user's optimizer later records nothing and does not fail


def test_a_run_name_is_used_once(tmp_path):
    model, opt = model_and_opt()
    with fg.track(IDS, run="once", home=tmp_path) as run:
        run.optimizer(opt)
    with pytest.raises(SessionError, match="already in the ledger"):
        fg.track(IDS, run="once", home=tmp_path).__enter__()
