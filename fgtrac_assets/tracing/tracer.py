"""Record sample lifecycle events from any torch training loop, without touching the model."""

from collections import deque
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader

from .events import EventBuffer


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
    """Collects `batched` events (sample, epoch, step, position, applied lr) for one training run."""

    def __init__(self, sample_ids: Sequence[str], training_run: str):
        self.sample_ids = list(sample_ids)
        self.training_run = training_run
        self.events = EventBuffer()
        self.epoch = -1
        self.step = 0
        self._current: list[int] | None = None

    def wrap_loader(self, loader: DataLoader) -> "TracedLoader":
        """Return a loader yielding the same batches while recording which samples each holds."""
        return TracedLoader(self, loader)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> "TracedOptimizer":
        """Return an optimizer whose step() records a `batched` event for each sample of the batch."""
        return TracedOptimizer(self, optimizer)

    def record_batch(self, indices: Sequence[int], lr: float) -> None:
        """Record that the samples at these dataset indices were used in the current step at lr."""
        ids = [self.sample_ids[i] for i in indices]
        self.events.add(ids, "batched", training_run=self.training_run, epoch=self.epoch,
                        step=self.step, position=list(range(len(ids))), lr=float(lr))
        self.step += 1


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
