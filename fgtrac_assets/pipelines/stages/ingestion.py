"""The first two stages: ingest a source (content ids, `ingested`/`rejected` events) and preprocess it (split)."""

import pyarrow as pa

from ...errors import InputError
from ...ledger.checks import SqlCheck
from ...ledger.store import Ledger
from ...tracing.events import EventBuffer
from ..base import IngestSettings, Pipeline
from ..handles import Handle, StageResult
from .commit import Log, NothingToTrain, commit_stage, quiet, write_parquet


INGEST_CHECKS = (SqlCheck("lineage_complete",
                          """SELECT abs((SELECT count(*) FROM samples WHERE run_id = $run)
                                      - (SELECT count(*) FROM events WHERE run_id = $run AND kind = 'ingested'))""",
                          "samples without an `ingested` event"),)
# an item whose only events in the run are `rejected` was never a sample of it: nothing to preprocess
PREPROCESS_CHECKS = (SqlCheck("lineage_complete",
                              """SELECT count(*) FROM (SELECT sample_id FROM events WHERE run_id = $run
                                 GROUP BY sample_id HAVING count(*) FILTER (kind <> 'rejected') > 0
                                 AND (count(*) FILTER (kind = 'preprocessed') <> 1
                                      OR count(*) FILTER (kind = 'split') <> 1))""",
                              "samples without exactly one `preprocessed` and one `split` event"),)


def ingest(ledger: Ledger, pipeline: Pipeline, run_id: str, settings: IngestSettings = IngestSettings(),
           log: Log = quiet) -> StageResult:
    """Read the source (and the pipeline's inbox), record `ingested` events for new content and `rejected` ones.

    The raw artifact is this run's whole snapshot; a sample whose content the pipeline ingested before gets no
    second `ingested` event (ids are content hashes), so its history shows where it first came from.
    """
    source = settings.source
    if settings.image_size:
        pipeline = pipeline.with_image_size(settings.image_size)
    got = pipeline.ingest(source, settings.limit)
    inbox_dir = ledger.home.inbox / pipeline.name
    if settings.inbox and inbox_dir.is_dir() and any(inbox_dir.iterdir()):
        more = pipeline.ingest(str(inbox_dir), 0)
        got = type(got)(pa.concat_tables([got.table, more.table]), got.rejected + more.rejected)
    for r in got.rejected[:20]:
        log(r.message())
    if len(got.rejected) > 20:
        log(f"... and {len(got.rejected) - 20} more rejected items (see events with kind='rejected')")
    table = got.table
    ids = table.column("sample_id").to_pylist()
    known = ledger.known_samples(pipeline.name, ids)
    new = pa.array([sid not in known for sid in ids], type=pa.bool_())
    fresh = table.filter(new)
    events = EventBuffer()
    events.add(fresh.column("sample_id").to_pylist(), "ingested",
               detail=[{"source": s, "label": y} for s, y in zip(fresh.column("source").to_pylist(),
                                                                 fresh.column("label").to_pylist())])
    events.add([r.sample_id for r in got.rejected], "rejected",
               detail=[{"source": r.source, "reason": r.reason} for r in got.rejected])
    rows = {"samples": fresh.select(["sample_id", "source", "label"]), "events": events.to_arrow()}
    if settings.strict and got.rejected:
        # Record what was rejected, then stop: nothing is trained on a partially bad source.
        commit_stage(ledger, pipeline, "raw_samples", run_id, {"events": events.to_arrow()}, [], {}, {},
                     INGEST_CHECKS)
        raise InputError(f"strict ingestion: {len(got.rejected)} item(s) rejected; first: {got.rejected[0].message()}")
    if table.num_rows == 0:
        commit_stage(ledger, pipeline, "raw_samples", run_id, rows, [], {}, {}, INGEST_CHECKS)
        raise NothingToTrain(f"source {source or '(bundled default)'}: every item was rejected "
                             f"({len(got.rejected)} rejected, 0 accepted); nothing to train on")
    art = write_parquet(ledger, f"{pipeline.name}/raw/{run_id}.parquet", "raw_samples", table)
    meta = {"samples": table.num_rows, "unique_samples": len(set(ids)), "new_samples": fresh.num_rows,
            "already_ingested": table.num_rows - fresh.num_rows, "rejected": len(got.rejected),
            "source": (source or "(bundled default)") + (" + inbox" if settings.inbox else ""),
            "rejections": [r.message() for r in got.rejected[:50]]}
    log(f"{table.num_rows} samples ({fresh.num_rows} new, {table.num_rows - fresh.num_rows} already ingested), "
        f"{len(got.rejected)} rejected")
    return commit_stage(ledger, pipeline, "raw_samples", run_id, rows, [], {"raw": art}, meta, INGEST_CHECKS)


def preprocess(ledger: Ledger, pipeline: Pipeline, run_id: str, raw: Handle, log: Log = quiet) -> StageResult:
    """Normalise and split the raw samples; record `preprocessed` (input -> output hash) and `split` events."""
    table = raw.artifacts["raw"].read_parquet(ledger.home.root)
    prep = pipeline.preprocess(table)
    ids = prep.table.column("sample_id").to_pylist()
    events = EventBuffer()
    events.add(ids, "preprocessed", detail=[{"input": d["input"], "output": d["output"], "params": prep.params}
                                            for d in prep.details])
    events.add(ids, "split", detail=[{"split": d["split"], **d.get("about", {})} for d in prep.details])
    art = write_parquet(ledger, f"{pipeline.name}/preprocessed/{run_id}.parquet", "preprocessed_samples", prep.table)
    counts = {s: 0 for s in ("train", "val", "test")}
    for s in prep.table.column("split").to_pylist():
        counts[s] = counts.get(s, 0) + 1
    log(f"preprocessed {len(ids)} samples: {counts}")
    meta = {"samples": len(ids), **{f"{k}_samples": v for k, v in counts.items()}, "params": prep.params}
    return commit_stage(ledger, pipeline, "preprocessed_samples", run_id, {"events": events.to_arrow()}, [raw],
                        {"prepared": art}, meta, PREPROCESS_CHECKS)
