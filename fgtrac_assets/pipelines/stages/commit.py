"""What every stage does last: write its artifacts, commit its rows, run its checks, hand back a typed handle."""

from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ...errors import InputError
from ...ledger.artifacts import ArtifactFile, write_artifact
from ...ledger.checks import SqlCheck, run_checks
from ...ledger.store import Commit, Ledger
from ..base import Pipeline
from ..handles import ArtifactRef, Handle, StageResult

Log = Callable[[str], None]


class NothingToTrain(InputError):
    """Every sample was rejected, or a split is empty: there is nothing to train on."""


def quiet(_: str) -> None:
    """Discard a stage's log line (the default log)."""


def write_parquet(ledger: Ledger, relpath: str, kind: str, table: pa.Table) -> ArtifactFile:
    """Write a Parquet artifact under $FGTRAC_HOME/artifacts/ (its recorded path is relative to FGTRAC_HOME)."""
    return write_artifact(ledger.ensure_home().root, f"artifacts/{relpath}", kind, lambda p: pq.write_table(table, p))


def commit_stage(ledger: Ledger, pipeline: Pipeline, asset: str, run_id: str, rows: dict, upstream: Sequence[Handle],
                 artifacts: dict[str, ArtifactFile], metadata: dict, checks: Sequence[SqlCheck] = (),
                 training_run: str | None = None, groups=None, handle_type: type[Handle] = Handle,
                 **handle_fields) -> StageResult:
    """Commit a stage's rows (and event groups) and artifacts; return its handle, metadata and check outcomes."""
    if artifacts:
        rows = {**rows, "artifacts": [a.row() for a in artifacts.values()]}
    result = ledger.commit(Commit(pipeline=pipeline.name, asset=asset, run_id=run_id, training_run=training_run,
                                  upstream={h.asset: h.root_hex for h in upstream}, rows=rows, groups=groups))
    handle = handle_type(pipeline=pipeline.name, asset=asset, root_hex=result.root_hex, tree_size=result.tree_size,
                         leaf_start=result.leaf_start, leaf_count=result.leaf_count, training_run=training_run,
                         artifacts={k: ArtifactRef.of(a) for k, a in artifacts.items()}, **handle_fields)
    meta = {**metadata, "ledger_rows": sum(result.rows.values()) + 1, "log_leaves": result.leaf_count,
            "leaf_start": result.leaf_start,
            "leaf_end": result.leaf_start + result.leaf_count - 1, "tree_size": result.tree_size,
            "root": result.root_hex, "signed_tree_head": result.checkpoint,
            "upstream_roots": {h.asset: h.root_hex for h in upstream}}
    outcomes = run_checks(ledger, checks, run_id, training_run, result.checkpoint)
    return StageResult(handle=handle, metadata=meta, checkpoint=result.checkpoint, checks=outcomes)
