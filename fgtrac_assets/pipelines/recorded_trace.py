"""A pipeline's training run read back from the ledger as the trace a replay re-runs, every file checked first.

The trace is what the training stage committed: the initial weights (artifact ``initial_weights``), each
step's batch in order with its learning rate (the run's ``batched`` events), the optimiser the pipeline
steps (``Pipeline.make_optimizer``) and the checkpoints, which the replay methods must reproduce before
they attribute anything (``ReplayMismatch`` otherwise).
"""

from ..errors import InputError
from ..ledger.store import Ledger
from .base import Pipeline
from .handles import ArtifactRef
from .stages.training import INITIAL_WEIGHTS


class TraceNotRecorded(InputError):
    """A training run whose trace cannot be read back: no initial weights, no steps, no checkpoints."""


def recorded_trace(ledger: Ledger, pipeline: Pipeline, training_run: str, model, train_ids: list[str]):
    """Return the TrainingTrace of a training run of model (the pipeline's architecture); train_ids[i]: row i's id."""
    from ..attribution.trace import OptimizerSpec, trace_from_events

    with ledger.reader() as con:
        initial = con.execute("SELECT path, sha256 FROM artifacts WHERE training_run = ? AND kind = ? "
                              "ORDER BY leaf_index DESC LIMIT 1", [training_run, INITIAL_WEIGHTS]).fetchall()
        checkpoints = con.execute("SELECT step, path, sha256 FROM checkpoints WHERE training_run = ? "
                                  "AND path IS NOT NULL ORDER BY step", [training_run]).fetchall()
        events = con.sql("SELECT sample_id, step, position, lr, training_run FROM events WHERE training_run = ? "
                         "AND kind = 'batched' ORDER BY step, position", params=[training_run]).to_arrow_table()
    if not initial:
        raise TraceNotRecorded(f"training run {training_run}: no initial weights recorded (it was trained before "
                               "fgtrac kept them), so it cannot be replayed: retrain it, or use method tracincp")
    if not checkpoints or events.num_rows == 0:
        raise TraceNotRecorded(f"training run {training_run}: no recorded steps or checkpoints to replay")
    root = ledger.home.root
    start = ArtifactRef(*initial[0]).load_torch(root)
    spec = OptimizerSpec.of(pipeline.make_optimizer(model.parameters(), 1.0))
    states = {int(step): ArtifactRef(path, sha).load_torch(root) for step, path, sha in checkpoints}
    return trace_from_events(events, train_ids, start, spec, states, training_run)
