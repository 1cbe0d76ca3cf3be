"""A PyTorch Lightning callback recording a fit as an fgtrac run: ``Trainer(callbacks=[FgtracCallback(ids, run=...)])``.

How it knows the samples: the train DataLoader, once Lightning has prepared it (its DistributedSampler
injected under DDP), is swapped for the session's traced loader, which rebuilds it over the same dataset,
sampler and options with every item carrying its index. The swap is made in the trainer's strategy's
``process_dataloader`` (wrapped for the fit's duration), the last point before Lightning makes an iterator
of the loader, so the user's loader is never iterated and the shuffling is the one an untraced fit gets.
Lightning may fetch ahead of training (always for loaders without a length), so a batch
is recorded only when Lightning is about to train it (``on_train_batch_start``, handed to the recorder at
the optimizer's step pre-hook or at ``on_train_batch_end``, whichever comes first); a batch Lightning skips
(``on_train_batch_start`` returning -1) is not recorded. Every optimizer Lightning uses is hooked
(Lightning's ``LightningOptimizer`` calls the real optimizer's ``step``), so with
``accumulate_grad_batches`` all the micro-batches go into their step. Sanity-check and validation batches
come from other loaders and are never recorded.
"""

import inspect
import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch.utils.data import DataLoader

from ..session.run import Run, SessionError

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.seed import pl_worker_init_function
except ImportError:
    import pytorch_lightning as pl
    from lightning_fabric.utilities.seed import pl_worker_init_function

__all__ = ["FgtracCallback"]


class FgtracCallback(pl.Callback):
    """Record which samples every optimizer step of ``trainer.fit`` consumed; commit when the fit ends.

    ``sample_ids`` name the train dataset's items in order; for an ``IterableDataset`` give ``sample_ids=None``
    and ``key``, a function returning an item's sample id (as ``run.loader(loader, key=...)``).
    """

    def __init__(self, sample_ids: Sequence[str] | None, run: str, home=None, pipeline: str = "own_training",
                 checkpoint_every_epoch: bool = True, monitor: str = "val_loss",
                 key: Callable[[Any], str] | None = None):
        self.sample_ids, self.training_run, self.home, self.pipeline = sample_ids, run, home, pipeline
        self.checkpoint_every_epoch, self.monitor, self.key = checkpoint_every_epoch, monitor, key
        self.run: Run | None = None
        self._loader = None
        self._fresh: list = []
        self._started = False
        self._handles: list = []
        self._strategy = self._own_hook = None

    # -- fit start: the session, the loader swap, the optimizer hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Open the session and arrange for the train DataLoader to be traced (fit only)."""
        if stage != "fit":
            return
        if "dataloader_iter" in inspect.signature(pl_module.training_step).parameters:
            raise SessionError("FgtracCallback: a training_step that takes dataloader_iter fetches its own "
                               "batches, so which step trains which samples cannot be recorded")
        self.run = Run(self.sample_ids, self.training_run, self.home, self.pipeline)
        self._strategy, self._own_hook = trainer.strategy, vars(trainer.strategy).get("process_dataloader")
        process = trainer.strategy.process_dataloader
        trainer.strategy.process_dataloader = lambda dl: self._trace(trainer, process(dl))

    def _trace(self, trainer, dataloader):
        if not trainer.training:
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise SessionError(f"FgtracCallback: the train dataloader is a {type(dataloader).__name__}; "
                               "it records torch DataLoaders")
        if int(os.environ.get("PL_SEED_WORKERS", 0)) and dataloader.worker_init_fn is None:
            # what Lightning does right after this hook, done first so that the traced loader has it
            dataloader.worker_init_fn = partial(pl_worker_init_function, rank=trainer.global_rank)
        traced = self.run.loader(dataloader, key=self.key, deferred=True)
        self._fresh.append(traced)
        return traced

    def on_fit_start(self, trainer, pl_module) -> None:
        """Hook every optimizer (and the AMP grad scaler) Lightning trains with."""
        for optimizer in trainer.optimizers:
            # registered before the session's own hook, so that the batch is recorded before its step is taken
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self._hand_over()))
            self.run.optimizer(optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.run.scaler(scaler)

    # -- batches
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        """Take the traced loader Lightning (re)loaded for this epoch."""
        if self._fresh:
            if len(self._fresh) > 1:
                raise SessionError(f"FgtracCallback: {len(self._fresh)} train dataloaders; it records one")
            self._loader, self._fresh = self._fresh[0], []
        self._started = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        """Note that Lightning starts training the next batch the traced loader handed out."""
        self._started = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Record the batch just trained (if no optimizer step recorded it already)."""
        self._hand_over()

    def _hand_over(self) -> None:
        if self._started:
            self._started = False
            self._loader.consumed()

    # -- checkpoints, commit
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Save a checkpoint with the epoch's logged losses (``monitor`` and ``train_loss``) when present."""
        if self.checkpoint_every_epoch:
            self._checkpoint(trainer, pl_module)

    def _checkpoint(self, trainer, pl_module) -> None:
        step = self.run.recorder.step
        if any(c["step"] == step for c in self.run.checkpoints):
            return  # no step since the last checkpoint: the same weights
        metrics = trainer.callback_metrics
        self.run.checkpoint(pl_module, val_loss=_metric(metrics, self.monitor),
                            train_loss=_metric(metrics, "train_loss"))

    def on_fit_end(self, trainer, pl_module) -> None:
        """Checkpoint the final model if its step has none yet, and commit the run."""
        self._checkpoint(trainer, pl_module)
        run = self._close(trainer)
        run.commit()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Commit nothing and remove the checkpoint files written."""
        if self.run is not None:
            self._close(trainer).discard()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Give the strategy back its own dataloader hook."""
        self._restore()

    def _close(self, trainer) -> Run:
        run, self.run = self.run, None
        for h in self._handles:
            h.remove()
        self._handles, self._loader, self._fresh = [], None, []
        self._restore()
        return run

    def _restore(self) -> None:
        if self._strategy is not None:
            if self._own_hook is None:
                del self._strategy.process_dataloader
            else:
                self._strategy.process_dataloader = self._own_hook
            self._strategy = self._own_hook = None


def _metric(metrics: dict, name: str) -> float | None:
    """Return a logged metric (or its epoch aggregate, ``<name>_epoch``) as a float; None if absent or not finite."""
    value = metrics.get(name, metrics.get(f"{name}_epoch"))
    return None if value is None or not math.isfinite(float(value)) else float(value)
