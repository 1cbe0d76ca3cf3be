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
    """Run raw -> ... -> influence for one pipeline through the plain stages; return each asset's root.

    Like the Dagster job, a failed blocking check (signed tree head, lineage) stops the chain.
    """
    import dataclasses

    from .ledger.checks import NON_BLOCKING
    from .pipelines import stages

    settings = dataclasses.replace(defaults, **({"epochs": epochs} if epochs else {}))
    run_id = f"cli-{uuid.uuid4()}"
    h: dict = {}
    chain = [
        ("raw_samples", lambda: stages.ingest(ledger, pipeline, run_id, limit=limit, log=progress)),
        ("preprocessed_samples", lambda: stages.preprocess(ledger, pipeline, run_id, h["raw_samples"], log=progress)),
        ("training_checkpoints", lambda: stages.train(ledger, pipeline, run_id, h["preprocessed_samples"], settings,
                                                      log=progress)),
        ("selected_checkpoints", lambda: stages.select(ledger, pipeline, run_id, h["training_checkpoints"],
                                                       log=progress)),
        ("gradient_cache", lambda: stages.gradients(ledger, pipeline, run_id, h["preprocessed_samples"],
                                                    h["training_checkpoints"], h["selected_checkpoints"], log=progress)),
        ("influence_scores", lambda: stages.influence(ledger, pipeline, run_id, h["gradient_cache"], log=progress)),
    ]
    for i, (name, step) in enumerate(chain, 1):
        progress.stage(f"{pipeline.name}/{name}", i, len(chain))
        result = step()
        blocking = [c for c in result.checks if not c.passed and c.name not in NON_BLOCKING]
        if blocking:
            raise RuntimeError(f"{name}: check {blocking[0].name} failed: {blocking[0].description}")
        h[name] = result.handle
    progress.done()
    return {name: handle.root_hex for name, handle in h.items()}
