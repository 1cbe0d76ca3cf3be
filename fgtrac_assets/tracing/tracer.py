"""Record sample lifecycle events from any torch training loop, without touching the model."""

from collections.abc import Sequence

import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from .groups import EventGroups, GroupLog
from .loader import TracedLoader
from .steps import StepRecorder, as_indices


class Tracer:
    """Records which samples each optimiser step used (and at which lr) for one training run, as event groups.

    A :class:`~fgtrac_assets.tracing.recorder.Recorder`: a loop calls ``start_epoch``,
    ``record_batch`` and ``record`` itself, or wraps its loader and hooks its optimizer
    (``wrap_loader``, ``wrap_optimizer``: tracing/loader.py and tracing/steps.py, the same
    hooks a session uses, so accumulation, several optimizers and skipped steps are
    recorded right; ``fgtrac_assets.track`` also commits everything). A step costs one
    small append here: the batch's dataset indices as an array. The ids, the `batched` event
    rows and their log leaves (one per step, see tracing/groups.py) are built once,
    column-wise, when the run is committed.
    """

    def __init__(self, sample_ids: Sequence[str], training_run: str):
        self.sample_ids = pa.array(list(sample_ids), pa.string())
        self.training_run = training_run
        self._log = GroupLog()
        self._steps = StepRecorder(self._log)

    @property
    def step(self) -> int:
        """The number of steps recorded so far."""
        return self._steps.step

    @property
    def epoch(self) -> int:
        """The current epoch (-1 before the first)."""
        return self._steps.epoch

    def wrap_loader(self, loader: DataLoader) -> TracedLoader:
        """Return a loader yielding the same batches while recording which samples each holds (an epoch per iter)."""
        return TracedLoader(loader, lambda keys, padding: self._steps.batch(keys), self._steps.start_epoch)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Hook the optimizer so each step records the batches it consumed; return the same optimizer."""
        return self._steps.attach(optimizer)

    def start_epoch(self, epoch: int) -> None:
        """Mark the start of an epoch: the batches and roles recorded next belong to it."""
        self._steps.epoch = epoch

    def record_batch(self, indices, lr: float, details=None) -> None:
        """Record that the samples at these dataset indices formed the current step's batch, applied at lr."""
        self._steps.record_step(as_indices(indices), lr, details() if callable(details) else details)

    def record(self, kind: str, indices, details=None, whole_run: bool = False) -> None:
        """Record one event of `kind` per sample at these indices, in this epoch or (whole_run) for the whole run.

        details: one string per sample (a pyarrow array), or a function returning them, called here only.
        """
        self._add(kind, indices, None if whole_run else self.epoch, None, None, details)

    def _add(self, kind: str, indices, epoch: int | None, step: int | None, lr: float | None, details) -> None:
        self._log.add(kind, as_indices(indices), epoch=epoch, step=step, lr=lr,
                      details=details() if callable(details) else details)

    def groups(self) -> EventGroups:
        """Return everything recorded as event groups, ready for Ledger.commit (batches never stepped: `discarded`)."""
        self._steps.finish()
        return self._log.build(self.training_run, self.sample_ids)

    def events(self) -> pa.Table:
        """Return the recorded events as rows of the ledger's `events` columns (no pipeline/run/asset)."""
        return self.groups().events()

    def __len__(self) -> int:
        return len(self._log)

    def used_sample_ids(self) -> list[str]:
        """Return the sorted distinct ids of the samples some step trained on."""
        return sorted(self.sample_ids.take(pa.array(self._log.trained_indices())).to_pylist())
