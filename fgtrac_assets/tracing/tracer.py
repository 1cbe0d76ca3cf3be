"""Record sample lifecycle events from any torch training loop, without touching the model."""

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import BatchSampler, DataLoader

from .groups import EventGroups, GroupLog


class _RecordingBatchSampler:
    """A batch sampler that remembers the indices of every batch it hands out, in order."""

    def __init__(self, inner):
        self.inner = inner
        self.issued: deque[list[int]] = deque()

    def __iter__(self):
        for batch in self.inner:
            self.issued.append(list(batch))
            yield batch

    def __len__(self):
        return len(self.inner)


class Tracer:
    """Records which samples each optimiser step used (and at which lr) for one training run, as event groups.

    A :class:`~fgtrac_assets.tracing.recorder.Recorder`: a loop calls ``start_epoch``,
    ``record_batch`` and ``record`` itself, or wraps its loader and optimizer
    (``wrap_loader``, ``wrap_optimizer``), which make those calls for it. A step costs one
    small append here: the batch's dataset indices as an array. The ids, the `batched` event
    rows and their log leaves (one per step, see tracing/groups.py) are built once,
    column-wise, when the run is committed.
    """

    def __init__(self, sample_ids: Sequence[str], training_run: str):
        self.sample_ids = pa.array(list(sample_ids), pa.string())
        self.training_run = training_run
        self.epoch = -1
        self.step = 0
        self._current: list[int] | None = None
        self._log = GroupLog()

    def wrap_loader(self, loader: DataLoader) -> "TracedLoader":
        """Return a loader yielding the same batches while recording which samples each holds."""
        return TracedLoader(self, loader)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> "TracedOptimizer":
        """Return an optimizer whose step() records the batch it applies as a `batched` event group."""
        return TracedOptimizer(self, optimizer)

    def start_epoch(self, epoch: int) -> None:
        """Mark the start of an epoch: the batches and roles recorded next belong to it."""
        self.epoch = epoch

    def record_batch(self, indices, lr: float, details=None) -> None:
        """Record that the samples at these dataset indices formed the current step's batch, applied at lr."""
        self._add("batched", indices, self.epoch, self.step, float(lr), details)
        self.step += 1

    def record(self, kind: str, indices, details=None, whole_run: bool = False) -> None:
        """Record one event of `kind` per sample at these indices, in this epoch or (whole_run) for the whole run.

        details: one string per sample (a pyarrow array), or a function returning them, called here only.
        """
        self._add(kind, indices, None if whole_run else self.epoch, None, None, details)

    def _add(self, kind: str, indices, epoch: int | None, step: int | None, lr: float | None, details) -> None:
        idx = indices.numpy() if torch.is_tensor(indices) else np.asarray(indices, dtype=np.int64)
        self._log.add(kind, idx, epoch=epoch, step=step, lr=lr, details=details() if callable(details) else details)

    def groups(self) -> EventGroups:
        """Return everything recorded as event groups, ready for Ledger.commit."""
        return self._log.build(self.training_run, self.sample_ids)

    def events(self) -> pa.Table:
        """Return the recorded events as rows of the ledger's `events` columns (no pipeline/run/asset)."""
        return self.groups().events()

    def __len__(self) -> int:
        return len(self._log)

    def used_sample_ids(self) -> list[str]:
        """Return the sorted distinct ids of the samples some step trained on."""
        used = [i for k, i in zip(self._log.kind, self._log.indices) if k == "batched"]
        if not used:
            return []
        return sorted(self.sample_ids.take(pa.array(np.unique(np.concatenate(used)))).to_pylist())


class TracedLoader:
    """Iterates a DataLoader unchanged; tells the tracer which dataset indices each batch holds."""

    def __init__(self, tracer: Tracer, loader: DataLoader):
        self.tracer = tracer
        self.sampler = _RecordingBatchSampler(loader.batch_sampler if loader.batch_sampler is not None
                                              else BatchSampler(loader.sampler, 1, False))
        self.loader = DataLoader(loader.dataset, batch_sampler=self.sampler, num_workers=loader.num_workers,
                                 collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                                 worker_init_fn=loader.worker_init_fn, generator=loader.generator)

    def __iter__(self) -> Iterator:
        self.tracer.epoch += 1
        self.sampler.issued.clear()
        for batch in self.loader:
            self.tracer._current = self.sampler.issued.popleft()
            yield batch
        self.tracer._current = None

    def __len__(self) -> int:
        return len(self.loader)


class TracedOptimizer:
    """Wraps an optimizer: step() records the current batch at the lr each group applies."""

    def __init__(self, tracer: Tracer, optimizer: torch.optim.Optimizer):
        self.tracer = tracer
        self.optimizer = optimizer

    def step(self, closure=None):
        """Record the batch with the learning rate about to be applied, then step."""
        if self.tracer._current is None:
            raise RuntimeError("TracedOptimizer.step() called outside an iteration of the traced loader")
        self.tracer.record_batch(self.tracer._current, applied_lr(self.optimizer))
        return self.optimizer.step(closure)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


def applied_lr(optimizer: torch.optim.Optimizer) -> float:
    """Return the learning rate of the first parameter group (what SGD applies this step)."""
    lr = optimizer.param_groups[0]["lr"]
    return float(lr.item() if torch.is_tensor(lr) else lr)
