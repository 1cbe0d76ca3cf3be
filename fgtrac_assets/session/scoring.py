"""TracInCP over a recorded run: its checkpoints (sha256 checked) at the learning rates its steps applied.

Each checkpoint's lr is what the last applied step before it used, per parameter: a run with parameter
groups at different lrs gives TracInCP a mapping from parameter name to lr (from the run's recorded
optimizers), one with a single lr a number. Runs the pipelines trained (no optimizer steps recorded) use
their checkpoints' `lr`. The top-k proponents and opponents and the self-influence are committed as the
pipelines' influence stage commits them, signed, under asset `influence_scores`.
"""

import bisect
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..ledger.artifacts import check_artifact
from ..ledger.audit import resolve_run
from ..ledger.influence_rows import influence_rows
from ..ledger.store import Commit, CommitResult, Ledger
from ..tracing.ids import name_sample_id

Lr = float | dict[str, float]


class InfluenceError(InputError):
    """A run whose checkpoints cannot be scored (none recorded, a file changed, inputs that do not match)."""


@dataclass
class RecordedCheckpoint:
    """A committed checkpoint: its id, file, and the lr (a number, or per parameter name) its steps applied."""

    checkpoint_id: str
    path: str
    sha256: str
    lr: Lr


def recorded_checkpoints(ledger: Ledger, run: str) -> tuple[str, list[RecordedCheckpoint]]:
    """Return (full run id, its checkpoints in step order with their applied lrs); `run` may be a prefix or latest."""
    with ledger.reader() as con:
        rid = resolve_run(con, run)
        ckpts = con.execute("SELECT checkpoint_id, step, lr, path, sha256 FROM checkpoints WHERE training_run = ? "
                            "AND path IS NOT NULL ORDER BY step, leaf_index", [rid]).fetchall()
        steps = con.execute("SELECT step, lrs FROM optimizer_steps WHERE training_run = ? AND applied "
                            "ORDER BY step", [rid]).fetchall()
        opts = con.execute("SELECT optimizers FROM training_runs WHERE training_run = ?", [rid]).fetchall()
    if not ckpts:
        raise InfluenceError(f"training run {rid}: no checkpoints recorded (call run.checkpoint(model) in the loop)")
    groups = [[g["parameters"] for g in o["groups"]] for o in json.loads(opts[0][0])] if opts else []
    step_numbers = [s for s, _ in steps]
    out = []
    for cid, step, lr, path, sha in ckpts:
        last = bisect.bisect_left(step_numbers, step) - 1  # the last step applied before the checkpoint
        applied = json.loads(steps[last][1]) if last >= 0 else None
        out.append(RecordedCheckpoint(cid, path, sha, _lr(applied, groups, lr, cid)))
    return rid, out


def _lr(applied: dict | None, groups: list[list[list[str]]], fallback: float | None, cid: str) -> Lr:
    """Return one lr when every parameter group applied the same, else {parameter name: lr}."""
    if not applied:
        if fallback is None:
            raise InfluenceError(f"checkpoint {cid}: no step applied before it, so no learning rate")
        return float(fallback)
    values = {v for lrs in applied.values() for v in lrs}
    if len(values) == 1:
        return float(values.pop())
    per_param = {}
    for opt, lrs in applied.items():
        for names, lr in zip(groups[int(opt)], lrs):
            for name in names:
                if name.startswith("#"):
                    raise InfluenceError(f"checkpoint {cid}: parameter groups at different lrs but no parameter "
                                         "names recorded (call run.checkpoint(model) during the run)")
                per_param[name] = float(lr)
    return per_param


def _load(ledger: Ledger, ckpts: list[RecordedCheckpoint]) -> list[tuple[dict, Lr]]:
    """Return (state_dict, lr) per checkpoint, each file's sha256 checked against the ledger first."""
    import torch

    out = []
    for c in ckpts:
        if (why := check_artifact(ledger.home.root, c.path, c.sha256)) is not None:
            raise InfluenceError(f"checkpoint {c.checkpoint_id} ({c.path}): {why}")
        out.append((torch.load(ledger.home.root / c.path, map_location="cpu", weights_only=True), c.lr))
    return out


def checkpoints(run: str, home=None) -> list[tuple[dict, Lr]]:
    """Return a recorded run's checkpoints as TracInCP takes them: (state_dict, lr), files checked, in step order."""
    ledger = Ledger(home)
    return _load(ledger, recorded_checkpoints(ledger, run)[1])


@dataclass
class InfluenceResult:
    """What fg.influence scored and committed: the run, the checkpoints used, the top-k and the commit."""

    training_run: str
    checkpoints: list[str]
    top: Any
    self_influence: Any
    train_ids: list[str]
    test_ids: list[str]
    commit: CommitResult | None


def influence(run: str, model, loss_fn, train: tuple, train_ids: Sequence[str], test: tuple,
              test_ids: Sequence[str], home=None, layer: str | Sequence[str] | None = None, k: int = 10,
              pipeline: str | None = None, commit: bool = True, batch_size: int = 512,
              checkpoints: Sequence[str] | int | None = None, method: str = "tracincp") -> InfluenceResult:
    """Score test samples against the run's training samples over its recorded checkpoints.

    train and test are (inputs, targets); ids are the samples' names (or content ids), in the same order.
    loss_fn(outputs, targets) returns per-sample losses. checkpoints: ids to use, or how many of the latest
    (default: all). method: one of attribution/methods.py: "tracincp", "trak" (over the checkpoints), or
    "step_exact", "metagradient", which replay the whole recorded run from its initial weights and must
    reproduce every checkpoint first (checkpoints does not apply to them). With commit, the rows are signed
    into the ledger.
    """
    from ..attribution import TracInCP
    from ..attribution.methods import build_scorer
    from ..attribution.methods import method as influence_method
    from .recorded_trace import TraceNotRecorded, recorded_trace

    replays = influence_method(method).source == "trace"
    if replays and checkpoints is not None:
        raise InfluenceError(f"method {method!r} replays the whole run: it takes no checkpoints selection")
    ledger = Ledger(home)
    if not ledger.exists():
        raise InfluenceError(f"no ledger at {ledger.home.root}")
    rid, ckpts = recorded_checkpoints(ledger, run)
    if isinstance(checkpoints, int):
        ckpts = ckpts[-checkpoints:]
    elif checkpoints is not None:
        unknown = set(checkpoints) - {c.checkpoint_id for c in ckpts}
        if unknown:
            raise InfluenceError(f"training run {rid} has no checkpoint {sorted(unknown)[0]}")
        ckpts = [c for c in ckpts if c.checkpoint_id in set(checkpoints)]
    states = _load(ledger, ckpts) if not replays else []
    names = list(train_ids) + list(test_ids)
    train_ids, test_ids = [name_sample_id(n) for n in train_ids], [name_sample_id(n) for n in test_ids]
    for name, ids, data in (("train", train_ids, train), ("test", test_ids, test)):
        if len(ids) != len(data[1]):
            raise InfluenceError(f"{name}_ids: {len(ids)} ids for {len(data[1])} {name} samples")
    k = min(k, len(train_ids))
    if method == "tracincp":
        scorer = TracInCP(model, states, loss_fn, layer=layer, batch_size=batch_size)
    else:
        try:
            trace = recorded_trace(ledger, rid, model, train_ids) if replays else None
        except TraceNotRecorded as exc:
            raise InfluenceError(str(exc)) from None
        scorer = build_scorer(method, model, loss_fn, train[1], layer=layer, checkpoints=[state for state, _ in states],
                              trace=trace)
    top = scorer.top_k(*train, *test, k=k)
    selfinf = scorer.self_influence(*train)
    result = None
    if commit:
        from .run import new_sample_rows

        owner = pipeline or _pipeline_of(ledger, rid)
        rows = {**new_sample_rows(ledger, owner, train_ids + test_ids, names),
                "influence": influence_rows(train_ids, test_ids, top, selfinf, k, method)}
        result = ledger.commit(Commit(pipeline=owner, asset="influence_scores", run_id=f"{rid}/influence-{method}-{uuid.uuid4().hex[:12]}",
                                      training_run=rid, rows=rows))
    return InfluenceResult(rid, [c.checkpoint_id for c in ckpts], top, selfinf, train_ids, test_ids, result)


def _pipeline_of(ledger: Ledger, run: str) -> str:
    """Return the pipeline that committed a training run's set."""
    return ledger.query("SELECT pipeline FROM training_sets WHERE training_run = ? LIMIT 1", [run]).column(0)[0].as_py()
