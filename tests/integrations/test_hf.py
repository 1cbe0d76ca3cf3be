"""The transformers.Trainer callback and mixin: the model's forward collects the ground truth (the items of each call)."""

import pytest
import torch
from torch import nn

from fgtrac_assets.ledger import Ledger
from fgtrac_assets.session import SampleIdError, SessionError

from .common import IDS, N, checkpoints, features, recorded, steps, verify_and_audit

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from fgtrac_assets.integrations.hf import FgtracTrainer, FgtracTrainerCallback  # noqa: E402

X, Y = features()


class Items(torch.utils.data.Dataset):
    """Dict items as the Trainer expects, with an "idx" the test reads (and the Trainer may drop)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"x": X[i], "labels": Y[i], "idx": i}


class Tiny(nn.Module):
    """Linear on 4 features, 3 classes, returning {"loss", "logits"}; notes the items of every training forward."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.fail_at = fail_at
        self.seen: list[list[int]] = []

    def forward(self, x, labels=None):
        if self.training:
            if len(self.seen) == self.fail_at:
                raise RuntimeError("diverged")
            # "idx" is not a forward argument, so remove_unused_columns drops it: find the items by their features
            self.seen.append((x[:, None, :] == X[None]).all(-1).int().argmax(1).tolist())
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Lrs(transformers.TrainerCallback):
    """Notes the learning rate each optimizer step applies."""

    def __init__(self):
        self.lrs = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def train(tmp_path, model, callbacks, trainer_class=None, **overrides):
    """Train the model with per-device batches of 4 and 2 accumulation steps for 2 epochs on the CPU."""
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                num_train_epochs=2, report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
                dataloader_num_workers=0, seed=0, disable_tqdm=True, eval_strategy="epoch",
                per_device_eval_batch_size=12)
    trainer_class = trainer_class or FgtracTrainer
    trainer = trainer_class(model=model, args=transformers.TrainingArguments(**{**args, **overrides}),
                            train_dataset=Items(), eval_dataset=Items(), callbacks=callbacks)
    trainer.train()
    return trainer


def truth(seen: list[list[int]], micro_batches: list[int]) -> dict[int, list[int]]:
    """Return {step: sorted items} from the forwards in order and how many micro-batches each step had."""
    forwards, out = iter(seen), {}
    for s, n in enumerate(micro_batches):
        out[s] = sorted(i for _ in range(n) for i in next(forwards))
    return out


def test_per_device_batches_and_accumulation_make_their_steps(tmp_path, capsys, one_torch_thread):
    torch.manual_seed(0)
    plain = Tiny()
    train(tmp_path / "plain", plain, [], trainer_class=transformers.Trainer)
    torch.manual_seed(0)
    model, lrs = Tiny(), Lrs()
    trainer = train(tmp_path, model, [FgtracTrainerCallback(IDS, run="hf-accum", home=tmp_path), lrs])

    assert model.seen == plain.seen  # the mixin changes neither the batches nor their order
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    rows = steps(tmp_path)
    assert [r["micro_batches"] for r in rows] == [2, 2, 2, 2, 1] * 2  # 9 batches of 4 per epoch
    assert recorded(tmp_path) == truth(model.seen, [r["micro_batches"] for r in rows])
    assert sum(map(len, recorded(tmp_path).values())) == 2 * N  # evaluation batches are not training
    assert [r["lrs"]["0"][0] for r in rows] == pytest.approx(lrs.lrs)
    assert [r["epoch"] for r in rows] == [0] * 5 + [1] * 5
    ckpts = checkpoints(tmp_path)
    assert [(c["epoch"], c["step"]) for c in ckpts] == [(0, 5), (1, 10)]
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert [c["val_loss"] for c in ckpts] == pytest.approx(evals)  # evaluated after saving, filled in after
    assert all(c["train_loss"] is None for c in ckpts)  # logging_strategy="no": no train loss logged
    state = torch.load(tmp_path / ckpts[-1]["path"])
    assert torch.equal(state["net.weight"], model.net.weight.detach())
    used = verify_and_audit(tmp_path, "hf-accum", capsys)
    assert used["used"] and used["epochs"] == 2


def test_an_index_the_model_takes_is_kept_and_max_steps_checkpoints_the_last_step(tmp_path, one_torch_thread):
    class TakesIdx(Tiny):
        def forward(self, x, labels=None, idx=None):
            if self.training:
                self.seen.append(idx.tolist())
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    torch.manual_seed(0)
    model = TakesIdx()
    callback = FgtracTrainerCallback(IDS, run="hf-idx", home=tmp_path, checkpoint_every_epoch=False)
    train(tmp_path, model, [callback], max_steps=7, logging_strategy="steps", logging_steps=7,
          eval_strategy="no", dataloader_num_workers=2)
    rows = steps(tmp_path)
    assert [r["micro_batches"] for r in rows] == [2, 2, 2, 2, 1, 2, 2]
    assert recorded(tmp_path) == truth(model.seen, [r["micro_batches"] for r in rows])
    (ckpt,) = checkpoints(tmp_path)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 7) and ckpt["train_loss"] is not None and ckpt["val_loss"] is None


def test_a_failing_train_commits_nothing_and_removes_its_checkpoints(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    model = Tiny(fail_at=12)  # in the second epoch, after the first epoch's checkpoint
    with pytest.raises(RuntimeError, match="diverged"):
        train(tmp_path, model, [FgtracTrainerCallback(IDS, run="hf-fails", home=tmp_path)])
    assert not list(tmp_path.rglob("*.pt"))
    ledger = Ledger(tmp_path)
    assert not ledger.exists() or ledger.query("SELECT count(*) FROM events").column(0)[0].as_py() == 0


def test_the_callback_without_the_mixin_is_refused(tmp_path):
    with pytest.raises(SessionError, match="FgtracTrainerMixin"):
        train(tmp_path, Tiny(), [FgtracTrainerCallback(IDS, run="hf-plain", home=tmp_path)],
              trainer_class=transformers.Trainer)


def test_sample_ids_must_name_every_item(tmp_path):
    with pytest.raises(SampleIdError, match="35 given for a dataset of 36"):
        train(tmp_path, Tiny(), [FgtracTrainerCallback(IDS[:-1], run="hf-ids", home=tmp_path)])
