"""Which samples each optimizer step consumed, from hooks: the user's optimizer and loop stay as they are.

The rule: every batch the traced loader hands out since the previous step belongs to the next step
(gradient accumulation: all its micro-batches). A step is taken when an attached optimizer's step runs
(``register_step_pre_hook``), so LR schedulers, ``GradScaler`` and frameworks that call ``step()`` keep the
user's optimizer object. Several optimizers stepping after the same batches make one step, with each
optimizer's learning rates. A ``step()`` with no new batch is a step of no samples (its gradients came
from batches already recorded). A ``GradScaler`` step that skips the optimizer (inf/NaN gradients) records
its batches as ``skipped``. Batches handed out but never stepped are ``discarded`` at the end.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from .groups import GroupLog


@dataclass
class StepRow:
    """One optimizer step as the ledger's `optimizer_steps` row: its lrs per optimizer and parameter group."""

    step: int
    epoch: int
    applied: bool
    lrs: dict[int, list[float]] = field(default_factory=dict)
    samples: int = 0
    micro_batches: int = 0


def as_indices(indices) -> np.ndarray:
    """Return dataset indices (a tensor, array or list) as an int64 array."""
    return indices.numpy() if torch.is_tensor(indices) else np.asarray(indices, dtype=np.int64)


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Return the learning rate of every parameter group, as the next step applies them."""
    return [float(g["lr"].item() if torch.is_tensor(g["lr"]) else g["lr"]) for g in optimizer.param_groups]


class StepRecorder:
    """Turns batches handed out and optimizer steps taken into event groups (one per step) and step rows."""

    def __init__(self, log: GroupLog | None = None):
        self.log = log if log is not None else GroupLog()
        self.epoch = -1
        self.step = 0
        self.rows: list[StepRow] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self._pending: list[tuple[np.ndarray, list | None]] = []
        self._handles: list = []
        self._stepped_in_scaler = False

    # -- what the loader reports
    def start_epoch(self) -> None:
        """Begin the next epoch."""
        self.epoch += 1

    def batch(self, indices: np.ndarray, details: list | None = None) -> None:
        """Note a batch handed to the loop: its samples' indices (and one detail string each, or None)."""
        self._pending.append((np.asarray(indices, dtype=np.int64), details))

    # -- what the optimizers report
    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Hook this optimizer's step (once); return the same optimizer object."""
        if any(o is optimizer for o in self.optimizers):
            return optimizer
        number = len(self.optimizers)
        self.optimizers.append(optimizer)
        self._handles.append(optimizer.register_step_pre_hook(lambda opt, a, k: self._stepping(number, opt)))
        return optimizer

    def attach_scaler(self, scaler) -> object:
        """Make a GradScaler's skipped steps (inf/NaN gradients) visible; return the same scaler object."""
        if getattr(scaler, "_fgtrac_traced", False):
            return scaler
        original = scaler.step

        def step(optimizer, *args, **kwargs):
            self._stepped_in_scaler = False
            result = original(optimizer, *args, **kwargs)
            if not self._stepped_in_scaler:
                self._skip(optimizer)
            return result

        scaler.step, scaler._fgtrac_traced = step, True
        return scaler

    def detach(self) -> None:
        """Remove the hooks from the optimizers."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _take(self) -> tuple[np.ndarray, list | None, int]:
        """Return the pending batches as one index array, their details (None if none have any) and their count."""
        parts, n = self._pending, len(self._pending)
        self._pending = []
        if not parts:
            return np.zeros(0, dtype=np.int64), None, 0
        idx = np.concatenate([p for p, _ in parts])
        if all(d is None for _, d in parts):
            return idx, None, n
        return idx, [x for p, d in parts for x in (d if d is not None else [None] * len(p))], n

    def _stepping(self, number: int, optimizer: torch.optim.Optimizer) -> None:
        self._stepped_in_scaler = True
        lrs = group_lrs(optimizer)
        last = self.rows[-1] if self.rows else None
        if not self._pending and last is not None and last.applied and number not in last.lrs:
            last.lrs[number] = lrs  # another optimizer stepping on the same batches: the same step
            return
        idx, details, micro = self._take()
        row = StepRow(step=self.step, epoch=self.epoch, applied=True, lrs={number: lrs}, samples=len(idx),
                      micro_batches=micro)
        self.rows.append(row)
        if len(idx):
            self.log.add("batched", idx, epoch=self.epoch, step=self.step, lr=lrs[0], details=_arrow(details))
        self.step += 1

    def record_step(self, indices: np.ndarray, lr: float, details=None) -> None:
        """Record a step a loop reports itself (the Recorder contract): these samples, applied at lr."""
        idx = np.asarray(indices, dtype=np.int64)
        self.rows.append(StepRow(step=self.step, epoch=self.epoch, applied=True, lrs={0: [float(lr)]},
                                 samples=len(idx), micro_batches=1))
        self.log.add("batched", idx, epoch=self.epoch, step=self.step, lr=float(lr), details=details)
        self.step += 1

    def _skip(self, optimizer: torch.optim.Optimizer) -> None:
        number = next((i for i, o in enumerate(self.optimizers) if o is optimizer), None)
        idx, details, micro = self._take()
        self.rows.append(StepRow(step=self.step, epoch=self.epoch, applied=False,
                                 lrs={} if number is None else {number: group_lrs(optimizer)},
                                 samples=len(idx), micro_batches=micro))
        if len(idx):
            self.log.add("skipped", idx, epoch=self.epoch, step=self.step, details=_arrow(details))
        self.step += 1

    def finish(self) -> None:
        """Record batches handed out but never stepped as `discarded` (their gradients were never applied)."""
        idx, details, _ = self._take()
        if len(idx):
            self.log.add("discarded", idx, epoch=self.epoch, details=_arrow(details))

    def current_lrs(self) -> dict[int, list[float]]:
        """Return every attached optimizer's current group lrs."""
        return {i: group_lrs(o) for i, o in enumerate(self.optimizers)}


def _arrow(details: Sequence | None):
    return None if details is None else pa.array(details, pa.string())
