"""What the trainer integrations use of a session: deferred loaders, batches reported by index, losses set later."""

import pytest
import torch
from torch.utils.data import DataLoader

import fgtrac_assets as fg
from fgtrac_assets.session import SessionError

from .test_recording_patterns import IDS, N, data, loss_of, model_and_opt, recorded, steps


def test_a_deferred_loader_records_a_batch_when_it_is_consumed_not_when_fetched(tmp_path):
    model, opt = model_and_opt()
    truth = {}
    with fg.track(IDS, run="deferred", home=tmp_path) as run:
        loader, opt = run.loader(DataLoader(data(), batch_size=8), deferred=True), run.optimizer(opt)
        it = iter(loader)
        ahead = next(it)  # a trainer fetching one batch ahead of the one it trains
        for s, fetched in enumerate(it):
            batch, ahead = ahead, fetched
            loader.consumed()
            loss_of(model, *batch[1:]).backward()
            opt.step()
            truth[s] = sorted(batch[0].tolist())
        next(iter(loader))  # a new epoch: the last batch of the old one was never trained, so never recorded
    assert recorded(tmp_path) == truth and len(truth) == N // 8 - 1
    assert not recorded(tmp_path, "discarded")


def test_an_iterator_made_and_dropped_draws_what_the_plain_loader_would_and_is_no_epoch(tmp_path):
    plain, orders = DataLoader(data(), batch_size=8, shuffle=True), []
    with fg.track(IDS, run="dropped", home=tmp_path) as run:
        traced = run.loader(DataLoader(data(), batch_size=8, shuffle=True))
        for loader in (plain, traced):
            torch.manual_seed(0)
            iter(loader)  # as Lightning does once before the epoch's own iterator
            orders.append([b[0].tolist() for b in loader])
        model, opt = model_and_opt()
        opt = run.optimizer(opt)
        opt.step()
    assert orders[0] == orders[1]
    assert [r["epoch"] for r in steps(tmp_path)] == [0]


def test_batches_reported_by_index_and_losses_set_after_saving(tmp_path):
    model, opt = model_and_opt()
    with fg.track(IDS, run="by-index", home=tmp_path) as run:
        run.optimizer(opt)
        run.next_epoch()
        run.batch([3, 1])
        run.batch(torch.tensor([2]))
        opt.step()
        with pytest.raises(SessionError, match=f"the run has {N} sample ids"):
            run.batch([N])
        cid = run.checkpoint(model)
        run.set_losses(cid, val_loss=0.5)
        run.set_losses(cid, train_loss=0.7)
    assert recorded(tmp_path) == {0: [1, 2, 3]}
    from fgtrac_assets.ledger import Ledger

    assert Ledger(tmp_path).query("SELECT val_loss, train_loss FROM checkpoints").to_pylist() == [
        {"val_loss": 0.5, "train_loss": 0.7}]
