"""`fgtrac run`: the whole chain of a pipeline from plain Python (no Dagster), with a progress bar."""

import sys
import time
import uuid


class Progress:
    """A one-line progress display on a terminal; plain lines elsewhere."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()

    def stage(self, name: str, i: int, total: int) -> None:
        """Show that stage i of total (name) starts."""
        self._line(f"[{i}/{total}] {name}")

    def __call__(self, message: str) -> None:
        """Show a stage's log line (epoch, loss, samples/s, ETA ...)."""
        self._line(f"      {message}")

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        text = f"{text}  ({elapsed:.0f}s)"
        if self.tty:
            self.stream.write("\r\033[K" + text[:160])
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def done(self) -> None:
        """End the progress display."""
        if self.tty:
            self.stream.write("\n")


def run_pipeline(ledger, pipeline, defaults, limit: int, epochs: int | None, progress: Progress) -> dict:
    """Run the declared chain (pipelines/chain.py) for one pipeline through the plain stages; return each asset's root.

    Like the Dagster job, a failed blocking check (signed tree head, lineage) stops the chain.
    """
    import dataclasses

    from .ledger.checks import NON_BLOCKING
    from .ledger.store import LedgerDamaged
    from .pipelines.base import IngestSettings, TrainSettings
    from .pipelines.chain import CHAIN, default_settings

    chosen = {IngestSettings: IngestSettings(limit=limit),
              TrainSettings: dataclasses.replace(defaults, **({"epochs": epochs} if epochs else {}))}
    run_id = f"cli-{uuid.uuid4()}"
    handles: dict = {}
    for i, stage in enumerate(CHAIN, 1):
        progress.stage(f"{pipeline.name}/{stage.name}", i, len(CHAIN))
        settings = chosen.get(stage.settings, default_settings(stage, defaults))
        result = stage.call(ledger, pipeline, run_id, handles, settings, log=progress)
        blocking = [c for c in result.checks if not c.passed and c.name not in NON_BLOCKING]
        if blocking:
            raise LedgerDamaged(f"{stage.name}: check {blocking[0].name} failed: {blocking[0].description}")
        handles[stage.name] = result.handle
    progress.done()
    return {name: handle.root_hex for name, handle in handles.items()}
