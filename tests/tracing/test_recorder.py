"""One Recorder contract: the Tracer records what a loop reports, the NullRecorder only counts steps, and a loop
trains the same under either."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fgtrac_assets.pipelines.base import TrainSettings
from fgtrac_assets.pipelines.training import train_supervised
from fgtrac_assets.tracing import NullRecorder, Recorder, Tracer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def report(recorder: Recorder) -> None:
    """Make every call of the contract once or more."""
    recorder.record("message_passing", [0, 1, 2], whole_run=True)
    for epoch in range(2):
        recorder.start_epoch(epoch)
        recorder.record_batch(torch.tensor([2, 0]), 0.5)
        recorder.record_batch([1], 0.25, details=pa.array(['{"n": 1}']))
        recorder.record("checked", np.array([1]))


def test_both_recorders_follow_the_contract_and_count_steps_alike():
    tracer, null = Tracer(["a", "b", "c"], "run"), NullRecorder()
    assert isinstance(tracer, Recorder) and isinstance(null, Recorder)
    report(tracer)
    report(null)
    assert tracer.step == null.step == 4
    events = tracer.events().to_pylist()
    assert [(e["kind"], e["epoch"], e["step"], e["lr"], e["sample_id"]) for e in events] == [
        ("message_passing", None, None, None, "a"), ("message_passing", None, None, None, "b"),
        ("message_passing", None, None, None, "c"),
        ("batched", 0, 0, 0.5, "c"), ("batched", 0, 0, 0.5, "a"), ("batched", 0, 1, 0.25, "b"),
        ("checked", 0, None, None, "b"),
        ("batched", 1, 2, 0.5, "c"), ("batched", 1, 2, 0.5, "a"), ("batched", 1, 3, 0.25, "b"),
        ("checked", 1, None, None, "b")]
    assert events[5]["detail"] == '{"n": 1}'


def test_details_given_as_a_function_are_computed_only_where_kept():
    calls = []

    def details():
        calls.append(1)
        return pa.array(["x", "y"])

    NullRecorder().record("receptive_field", [0, 1], details=details, whole_run=True)
    assert calls == []
    tracer = Tracer(["a", "b"], "run")
    tracer.record("receptive_field", [0, 1], details=details, whole_run=True)
    assert calls == [1] and tracer.events().column("detail").to_pylist() == ["x", "y"]


def supervised(recorder):
    """Train a small model with the pipelines' supervised loop; return its epochs' results."""
    torch.manual_seed(0)
    x, y = torch.randn(70, 5), torch.randint(0, 3, (70,))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    settings = TrainSettings(epochs=3, lr=0.1, batch_size=16, seed=3)
    return list(train_supervised(model, loss, (x, y), (x[:10], y[:10]), settings, recorder))


def test_a_loop_trains_identically_with_or_without_records():
    tracer = Tracer([f"s{i}" for i in range(70)], "run")
    traced, plain = supervised(tracer), supervised(NullRecorder())
    for a, b in zip(traced, plain, strict=True):
        assert (a.epoch, a.step, a.lr, a.train_loss, a.val_loss) == (b.epoch, b.step, b.lr, b.train_loss, b.val_loss)
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert [e.step for e in traced] == [5, 10, 15]  # 70 samples in 5 near-equal batches per epoch
    groups = tracer.groups()
    assert groups.groups.column("epoch").to_pylist() == [0] * 5 + [1] * 5 + [2] * 5
    per_epoch = np.split(groups.member_sample, 3)
    assert all(sorted(p.tolist()) == list(range(70)) for p in per_epoch)  # every sample once per epoch


def test_the_wrappers_record_what_the_explicit_calls_record():
    """A user's own loop through wrap_loader / wrap_optimizer gives the same groups as reporting each step."""
    x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    ids = [f"s{i}" for i in range(30)]

    def loop(explicit: bool):
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracer = Tracer(ids, "run")
        data = TensorDataset(torch.arange(30), x, y)
        loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))
        step = opt if explicit else tracer.wrap_optimizer(opt)
        for epoch in range(2):
            if explicit:
                tracer.start_epoch(epoch)
            for idx, xb, yb in (loader if explicit else tracer.wrap_loader(loader)):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                if explicit:
                    tracer.record_batch(idx, opt.param_groups[0]["lr"])
                step.step()
        return tracer.events().to_pydict(), model.weight.detach().clone()

    (explicit, w1), (wrapped, w2) = loop(True), loop(False)
    assert explicit == wrapped and torch.equal(w1, w2)


def test_movielens_trains_identically_with_or_without_records():
    from fgtrac_assets.pipelines.movielens import MovieLensPipeline

    pipeline = MovieLensPipeline()
    prepared = pipeline.preprocess(pipeline.ingest("", 2000).table).table
    ids, _, _ = pipeline.tensors(prepared, "train")
    settings = TrainSettings(epochs=2, lr=0.005, batch_size=256, seed=0)
    tracer = Tracer(ids, "run")
    traced, plain = list(pipeline.train(prepared, settings, tracer)), list(pipeline.train(prepared, settings,
                                                                                        NullRecorder()))
    for a, b in zip(traced, plain, strict=True):
        assert (a.epoch, a.step, a.lr, a.train_loss, a.val_loss) == (b.epoch, b.step, b.lr, b.train_loss, b.val_loss)
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    kinds = tracer.groups().groups.column("kind").to_pylist()
    assert kinds.count("batched") == traced[-1].step and {"message_passing", "receptive_field"} <= set(kinds)


def loaded_after(imports: str) -> set[str]:
    """Return the top-level packages (and fgtrac_assets.ledger) a fresh interpreter has loaded after these imports."""
    code = (f"import sys\n{imports}\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} | "
            "({'fgtrac_assets.ledger'} if 'fgtrac_assets.ledger' in sys.modules else set()))))")
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_integrity_imports_neither_pyarrow_nor_duckdb():
    loaded = loaded_after("import fgtrac_assets.integrity.members, fgtrac_assets.integrity.fast_canonical")
    assert "pyarrow" not in loaded and "duckdb" not in loaded


def test_tracing_imports_neither_duckdb_nor_the_ledger():
    loaded = loaded_after("import fgtrac_assets.tracing.groups, fgtrac_assets.tracing.recorder\n"
                          "from fgtrac_assets.tracing import Tracer")
    assert "torch" in loaded and "duckdb" not in loaded and "fgtrac_assets.ledger" not in loaded
    assert "torch" not in loaded_after("from fgtrac_assets.tracing import NullRecorder, Recorder")
