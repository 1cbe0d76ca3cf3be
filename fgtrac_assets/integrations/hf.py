"""The Hugging Face ``transformers.Trainer`` recorded as an fgtrac run: a callback plus a small Trainer mixin.

    from fgtrac_assets.integrations.hf import FgtracTrainer, FgtracTrainerCallback
    trainer = FgtracTrainer(model=..., args=..., train_dataset=...,
                            callbacks=[FgtracTrainerCallback(sample_ids, run="hf-1", home="./data")])

Why a mixin as well: a ``TrainerCallback`` never sees the batches. The Trainer builds its own DataLoader
(its sampler, its column removal, accelerate's ``prepare``, which may swap the sampler and fetches one
batch ahead) and fetches all the micro-batches of a step before training the first. So the mixin
(``FgtracTrainerMixin``, already in ``FgtracTrainer``; put it first in your own subclass's bases) makes
every training item carry its dataset index under ``fgtrac_index`` through the workers, the collator and
the device transfer, and takes it out of the batch in ``training_step``, where the batch is recorded just
before the model sees it. The callback hooks the torch optimizer inside accelerate's
``AcceleratedOptimizer`` (and its GradScaler), so each step gets the micro-batches trained since the one
before; it checkpoints the model at each epoch end, with the step's logged ``loss``/``eval_loss``, and
commits at ``on_train_end``. A ``train()`` that raises commits nothing.
"""

import math
from collections.abc import Mapping, Sequence

import torch
from transformers import Trainer, TrainerCallback

from ..session.ids import check_names
from ..tracing.loader import IndexedDataset
from ..session.run import Run, SessionError

__all__ = ["INDEX", "FgtracTrainer", "FgtracTrainerCallback", "FgtracTrainerMixin"]

INDEX = "fgtrac_index"


def _tagged(index, item) -> dict:
    if not isinstance(item, Mapping):
        raise SessionError(f"FgtracTrainerMixin: dataset items are {type(item).__name__}; the Trainer's "
                           "items are dicts of model inputs")
    return {**item, INDEX: int(index)}


class _CarryIndex:
    """A collator that collates the items as the Trainer's would and adds their indices to the batch."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features: list) -> Mapping:
        indices = [f[INDEX] for f in features]
        batch = self.collate([{k: v for k, v in f.items() if k != INDEX} for f in features])
        batch[INDEX] = torch.tensor(indices, dtype=torch.long)
        return batch


class FgtracTrainerMixin:
    """Trainer mixin: each training batch carries its items' dataset indices to the FgtracTrainerCallback."""

    def get_train_dataloader(self):
        """Return the Trainer's train DataLoader, built over the dataset with each item's index added."""
        callback = self._fgtrac_callback()
        dataset, collator = self.train_dataset, self.data_collator
        self.train_dataset, self.data_collator = callback.indexed(dataset), _CarryIndex(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = dataset, collator

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and INDEX not in self._signature_columns:
            self._signature_columns.append(INDEX)  # so that remove_unused_columns keeps the index

    def training_step(self, model, inputs, *args, **kwargs):
        """Record the batch's samples (taking the index out of the inputs), then train on it as the Trainer does."""
        if INDEX not in inputs:
            raise SessionError(f"FgtracTrainerMixin: a training batch without {INDEX!r} (was the train "
                               "dataloader built by get_train_dataloader?)")
        self._fgtrac_callback().batch(inputs.pop(INDEX))
        return super().training_step(model, inputs, *args, **kwargs)

    def train(self, *args, **kwargs):
        """Train as the Trainer does; if it raises, the run commits nothing and its checkpoint files go."""
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            self._fgtrac_callback().abandon()
            raise

    def _fgtrac_callback(self) -> "FgtracTrainerCallback":
        found = [c for c in self.callback_handler.callbacks if isinstance(c, FgtracTrainerCallback)]
        if len(found) != 1:
            raise SessionError(f"FgtracTrainerMixin: the Trainer has {len(found)} FgtracTrainerCallback; give it one")
        return found[0]


class FgtracTrainer(FgtracTrainerMixin, Trainer):
    """``transformers.Trainer`` with ``FgtracTrainerMixin``: pass an ``FgtracTrainerCallback`` in ``callbacks``."""


class FgtracTrainerCallback(TrainerCallback):
    """Record which samples every optimizer step of ``Trainer.train`` consumed; commit at ``on_train_end``."""

    def __init__(self, sample_ids: Sequence[str], run: str, home=None, pipeline: str = "own_training",
                 checkpoint_every_epoch: bool = True):
        self.sample_ids, self.training_run, self.home, self.pipeline = sample_ids, run, home, pipeline
        self.checkpoint_every_epoch = checkpoint_every_epoch
        self.run: Run | None = None
        self._indexed = False
        self._sampler = None

    # -- called by the mixin
    def indexed(self, dataset) -> IndexedDataset:
        """Return the train dataset with each item's index added, after checking there is one id per item."""
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise SessionError("FgtracTrainerCallback records map-style train datasets (indexed items, a length)")
        check_names(self.sample_ids, len(dataset))
        self._indexed = True
        return IndexedDataset(dataset, _tagged)

    def batch(self, indices: torch.Tensor) -> None:
        """Record a batch about to be trained, by its items' dataset indices."""
        self.run.batch(indices.tolist())

    def abandon(self) -> None:
        """Forget the run (training failed): nothing committed, its checkpoint files removed."""
        if self.run is not None:
            run, self.run = self.run, None
            run.discard()

    # -- the Trainer's events
    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        """Open the session and hook the torch optimizer the Trainer steps (inside accelerate's wrapper)."""
        if not self._indexed:
            raise SessionError("FgtracTrainerCallback needs a Trainer with FgtracTrainerMixin (e.g. FgtracTrainer) "
                               "to know which samples each batch holds")
        self.run = Run(self.sample_ids, self.training_run, self.home, self.pipeline)
        self.run.optimizer(getattr(optimizer, "optimizer", optimizer))
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            self.run.scaler(scaler)
        self._sampler = _sampler_of(train_dataloader)

    def on_epoch_begin(self, args, state, control, **kwargs):
        """Begin the next recorded epoch."""
        self.run.next_epoch(self._sampler)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        """Checkpoint the model (every epoch, or the last only with checkpoint_every_epoch=False)."""
        if self.checkpoint_every_epoch or state.global_step >= state.max_steps or control.should_training_stop:
            self._checkpoint(state, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Give the last checkpoint the losses logged at its step (the Trainer logs and evaluates after saving)."""
        last = self.run.checkpoints[-1] if self.run is not None and self.run.checkpoints else None
        if last is not None and logs and last["step"] == self.run.recorder.step:
            self.run.set_losses(last["checkpoint_id"], val_loss=_finite(logs.get("eval_loss")),
                                train_loss=_finite(logs.get("loss")))

    def on_train_end(self, args, state, control, **kwargs):
        """Commit the run."""
        run, self.run = self.run, None
        run.commit()

    def _checkpoint(self, state, model) -> None:
        if any(c["step"] == self.run.recorder.step for c in self.run.checkpoints):
            return  # no step since the last checkpoint: the same weights
        logged = [e for e in state.log_history if e.get("step") == state.global_step]
        self.run.checkpoint(model, val_loss=_last(logged, "eval_loss"), train_loss=_last(logged, "loss"))


def _last(entries: list[dict], name: str) -> float | None:
    """Return the last finite value logged under name among entries, None if none."""
    values = [v for v in (_finite(e.get(name)) for e in entries) if v is not None]
    return values[-1] if values else None


def _finite(value) -> float | None:
    """Return a logged loss as a float, None if absent or not finite (the ledger stores finite losses only)."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _sampler_of(loader):
    """Return the sampler that orders the loader's items (inside accelerate's batch sampler wrappers)."""
    batches = getattr(loader, "batch_sampler", None)
    for holder in (batches, getattr(batches, "batch_sampler", None)):
        sampler = getattr(holder, "sampler", None)
        if sampler is not None:
            return sampler
    return getattr(loader, "sampler", None)
