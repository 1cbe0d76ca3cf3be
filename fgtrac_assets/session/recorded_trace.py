"""A training run read back from the ledger as the trace a replay re-runs, every file checked first.

The trace is what the run committed: the initial weights (artifact ``initial_weights``), each step's batch
in order with its learning rate (the run's ``batched`` events) and the checkpoints, which the replay
methods must reproduce before they attribute anything (``ReplayMismatch`` otherwise). The optimiser is the
one the run recorded (``training_runs``, written by ``fg.track``), else the one the pipeline steps
(``Pipeline.make_optimizer``). Steps a session recorded as skipped (a GradScaler's inf/NaN steps) are left
out, so a checkpoint counts the steps that changed the weights.
"""

import bisect
import json
from pathlib import Path

from ..errors import InputError
from ..ledger.artifacts import INITIAL_WEIGHTS, checked_path
from ..ledger.store import Ledger


class TraceNotRecorded(InputError):
    """A training run whose trace cannot be read back: no initial weights, no steps, no checkpoints."""


def load_checked(root: Path, path: str, sha256: str):
    """Return a torch-saved artifact (a state_dict) loaded on the CPU, after checking its sha256 (LedgerDamaged)."""
    import torch

    return torch.load(checked_path(root, path, sha256), map_location="cpu", weights_only=True)


def recorded_trace(ledger: Ledger, training_run: str, model, train_ids: list[str], pipeline=None):
    """Return the TrainingTrace of a training run of model; train_ids[i] is training row i's id.

    pipeline (a pipelines.base.Pipeline) gives the optimiser of runs that recorded none (the pipelines' own).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..attribution.trace import trace_from_events

    with ledger.reader() as con:
        initial = con.execute("SELECT path, sha256 FROM artifacts WHERE training_run = ? AND kind = ? "
                              "ORDER BY leaf_index DESC LIMIT 1", [training_run, INITIAL_WEIGHTS]).fetchall()
        checkpoints = con.execute("SELECT step, path, sha256 FROM checkpoints WHERE training_run = ? "
                                  "AND path IS NOT NULL ORDER BY step", [training_run]).fetchall()
        events = con.sql("SELECT sample_id, step, position, lr, training_run FROM events WHERE training_run = ? "
                         "AND kind = 'batched' ORDER BY step, position", params=[training_run]).to_arrow_table()
        steps = con.execute("SELECT step, applied, lrs FROM optimizer_steps WHERE training_run = ? ORDER BY step",
                            [training_run]).fetchall()
        runs = con.execute("SELECT optimizers FROM training_runs WHERE training_run = ?", [training_run]).fetchall()
    if not initial:
        raise TraceNotRecorded(f"training run {training_run}: no initial weights recorded (a pipeline run trained "
                               "before fgtrac kept them, or a session that never called run.checkpoint(model)), "
                               "so it cannot be replayed: use method tracincp or trak")
    if not checkpoints or events.num_rows == 0:
        raise TraceNotRecorded(f"training run {training_run}: no recorded steps or checkpoints to replay")
    spec = _optimizer(training_run, runs, pipeline, model)
    applied = [s for s, ok, _ in steps if ok]
    for step, ok, lrs in steps:
        if ok and len({v for group in json.loads(lrs).values() for v in group}) > 1:
            raise TraceNotRecorded(f"training run {training_run}: step {step} applied different learning rates to "
                                   "its parameter groups, which the replay methods do not support yet: use tracincp")
    if steps:  # a session: only the applied steps changed the weights
        events = events.filter(pc.is_in(events.column("step"), value_set=pa.array(applied, pa.int64())))
    root = ledger.home.root
    start = load_checked(root, *initial[0])
    done = (lambda step: bisect.bisect_left(applied, step)) if steps else int  # steps applied before a checkpoint
    states = {done(int(step)): load_checked(root, path, sha) for step, path, sha in checkpoints}
    try:
        return trace_from_events(events, train_ids, start, spec, states, training_run)
    except KeyError as exc:  # a sample the run trained on is not among the training rows given
        raise TraceNotRecorded(f"training run {training_run}: {exc.args[0]}: give every sample it trained on") from None
    except ValueError as exc:
        raise TraceNotRecorded(f"training run {training_run}: {exc}") from None


def _optimizer(training_run: str, runs: list, pipeline, model):
    """Return the OptimizerSpec of the run: the one it recorded, else the pipeline's."""
    from ..attribution.trace import OptimizerSpec

    try:
        if runs:
            optimizers = json.loads(runs[0][0])
            if len(optimizers) != 1:
                raise ValueError(f"{len(optimizers)} optimizers stepped the run; the replay follows exactly one")
            return OptimizerSpec.from_groups(optimizers[0]["class"], optimizers[0]["groups"])
        if pipeline is None:
            raise ValueError("no optimizer recorded for it")
        return OptimizerSpec.of(pipeline.make_optimizer(model.parameters(), 1.0))
    except ValueError as exc:
        raise TraceNotRecorded(f"training run {training_run}: cannot be replayed: {exc}") from None
