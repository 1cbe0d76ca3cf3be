"""The Lightning callback: each test's module collects the ground truth (the items every optimizer step trained on)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from fgtrac_assets.ledger import Ledger
from fgtrac_assets.session import SessionError

from .common import IDS, N, checkpoints, features, recorded, steps, verify_and_audit

pl = pytest.importorskip("pytorch_lightning")
from fgtrac_assets.integrations.lightning import FgtracCallback  # noqa: E402


def dataset(n: int = N) -> TensorDataset:
    """Items (index, features, label): the index tells the test which item it is, the callback never reads it."""
    x, y = features(n)
    return TensorDataset(torch.arange(n), x, y)


class Tiny(pl.LightningModule):
    """Linear on 4 features, 3 classes; notes the items of every training batch and which step they went into."""

    def __init__(self, manual: bool = False, skip_epoch_at: int | None = None, fail_at: int | None = None):
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.automatic_optimization = not manual
        self.skip_epoch_at, self.fail_at = skip_epoch_at, fail_at
        self.order: list[list[int]] = []  # every batch trained, in order
        self.truth: dict[int, list[int]] = {}  # step -> the items trained since the step before
        self._pending: list[int] = []

    def training_step(self, batch, batch_idx):
        i, x, y = batch
        if self.fail_at is not None and len(self.order) == self.fail_at:
            raise RuntimeError("diverged")
        self.order.append(i.tolist())
        self._pending += i.tolist()
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            if batch_idx % 3 != 2:  # every third batch's gradients are dropped: its items go into the next step
                opt.step()
            return None
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.truth[len(self.truth)], self._pending = sorted(self._pending), []

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == self.skip_epoch_at and self.current_epoch == 0:
            return -1  # Lightning: skip the rest of this epoch
        return None

    def validation_step(self, batch, batch_idx):
        i, x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


def fit(module, home=None, run="pl-run", loaders=None, callback_args=None, **trainer_args):
    """Fit the module for 2 epochs on the CPU, with the callback when home is given; return the trainer."""
    pl.seed_everything(0, verbose=False)
    callback_args = callback_args or {"sample_ids": IDS}
    callbacks = [FgtracCallback(run=run, home=home, **callback_args)] if home is not None else []
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=callbacks, **trainer_args)
    train, val = loaders or (DataLoader(dataset(), batch_size=4, shuffle=True), DataLoader(dataset(), batch_size=12))
    trainer.fit(module, train, val)
    return trainer


def test_accumulated_micro_batches_go_into_their_step_and_the_run_commits(tmp_path, capsys, one_torch_thread):
    torch.manual_seed(0)
    plain = Tiny()
    fit(plain, accumulate_grad_batches=2)
    torch.manual_seed(0)
    module = Tiny()
    trainer = fit(module, tmp_path, run="pl-accum", accumulate_grad_batches=2)

    assert module.order == plain.order  # the callback changes neither the batches nor their order
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), plain.parameters()))
    assert recorded(tmp_path) == module.truth  # sanity-check and validation batches are not training
    assert sum(map(len, module.truth.values())) == 2 * N
    rows = steps(tmp_path)
    assert [r["micro_batches"] for r in rows] == [2, 2, 2, 2, 1] * 2
    assert [r["epoch"] for r in rows] == [0] * 5 + [1] * 5 and all(r["applied"] for r in rows)
    assert [r["lrs"]["0"][0] for r in rows] == pytest.approx([0.1] * 5 + [0.09] * 5)
    ckpts = checkpoints(tmp_path)
    assert [(c["epoch"], c["step"]) for c in ckpts] == [(0, 5), (1, 10)]
    assert ckpts[-1]["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    assert all(c["train_loss"] is not None and c["sha256"] for c in ckpts)
    used = verify_and_audit(tmp_path, "pl-accum", capsys)
    assert used["used"] and used["epochs"] == 2
    assert "process_dataloader" not in vars(trainer.strategy)  # the strategy's own hook is back


def test_manual_optimization_reloads_and_a_skipped_epoch_rest_are_recorded_as_trained(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    module = Tiny(manual=True, skip_epoch_at=7)
    fit(module, tmp_path, run="pl-manual", reload_dataloaders_every_n_epochs=1)

    assert len(module.order) == 7 + 9  # epoch 0 stops before its 8th batch
    assert recorded(tmp_path) == module.truth
    skipped_batch = set(range(N)) - {i for b in module.order[:7] for i in b}
    assert len(skipped_batch) == 8  # the batch Lightning was handed and skipped, and the one never fetched
    assert [r["epoch"] for r in steps(tmp_path)] == [0] * 5 + [1] * 6
    # the third batch of every three is never stepped: the last of epoch 1 is discarded, not trained
    assert recorded(tmp_path, "discarded") == {None: sorted(module.order[-1])}


def test_a_failing_fit_commits_nothing_and_removes_its_checkpoints(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    module = Tiny(fail_at=12)  # in the second epoch, after the first epoch's checkpoint
    with pytest.raises(RuntimeError, match="diverged"):
        fit(module, tmp_path, run="pl-fails")
    assert not list(tmp_path.rglob("*.pt"))
    ledger = Ledger(tmp_path)
    assert not ledger.exists() or ledger.query("SELECT count(*) FROM events").column(0)[0].as_py() == 0
    assert not module.trainer.optimizers[0]._optimizer_step_pre_hooks  # unhooked, the session's hook too
    assert "process_dataloader" not in vars(module.trainer.strategy)


def test_a_training_step_fetching_its_own_batches_is_refused(tmp_path):
    class OwnFetch(Tiny):
        def training_step(self, dataloader_iter):
            return super().training_step(*next(dataloader_iter))

    with pytest.raises(SessionError, match="dataloader_iter"):
        fit(OwnFetch(), tmp_path, run="pl-iter")


class Stream(IterableDataset):
    """Items with their own ids and no length: Lightning then fetches one batch ahead of the one it trains."""

    def __iter__(self):
        x, y = features()
        for i in range(N):
            yield {"id": IDS[i], "i": i, "x": x[i], "y": y[i]}


class OnStream(Tiny):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["i"], batch["x"], batch["y"]), batch_idx)


def test_an_iterable_dataset_fetched_ahead_names_its_items_with_a_key(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    module = OnStream()
    fit(module, tmp_path, run="pl-stream", loaders=(DataLoader(Stream(), batch_size=4), None),
        callback_args={"sample_ids": None, "key": lambda item: item["id"]}, accumulate_grad_batches=2)
    assert recorded(tmp_path) == module.truth
    assert [r["micro_batches"] for r in steps(tmp_path)] == [2, 2, 2, 2, 1] * 2
