"""The Recorder contract: what a training loop tells fgtrac, and a recorder that keeps nothing.

Every shipped training loop makes the same calls, whatever it trains::

    recorder.record(kind, indices, details=..., whole_run=True)  # roles for the whole run, e.g. message passing
    for epoch in range(epochs):
        recorder.start_epoch(epoch)
        for indices, batch in ...:
            ...; loss.backward()
            recorder.record_batch(indices, lr)                   # the step about to be applied
            optimizer.step()
        ... recorder.step ...                                    # steps so far

:class:`~fgtrac_assets.tracing.tracer.Tracer` records them as event groups;
:class:`NullRecorder` only counts steps, so the same loop runs without records.
"""

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Recorder(Protocol):
    """What a training loop reports: epochs, each step's batch at its learning rate, and other per-sample roles."""

    @property
    def step(self) -> int:
        """The number of steps recorded so far."""

    def start_epoch(self, epoch: int) -> None:
        """Mark the start of an epoch: the batches and roles that follow belong to it."""

    def record_batch(self, indices: Any, lr: float, details: Any = None) -> None:
        """Record one training step: the dataset indices of its batch and the lr it applies (details: one each)."""

    def record(self, kind: str, indices: Any, details: Any = None, whole_run: bool = False) -> None:
        """Record one event of `kind` per sample at these indices, in this epoch or (whole_run) for the whole run.

        details: one string per sample, or a function returning them that only a recorder keeping records calls
        (so a loop run without records does not compute them).
        """


class NullRecorder:
    """A Recorder that keeps nothing and counts steps: runs a training loop without records."""

    def __init__(self) -> None:
        self.epoch = -1
        self.step = 0

    def start_epoch(self, epoch: int) -> None:
        """Note the epoch (nothing is recorded)."""
        self.epoch = epoch

    def record_batch(self, indices: Any, lr: float, details: Any = None) -> None:
        """Count the step (nothing is recorded)."""
        self.step += 1

    def record(self, kind: str, indices: Any, details: Any = None, whole_run: bool = False) -> None:
        """Record nothing."""
