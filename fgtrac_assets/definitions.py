"""The Dagster Definitions: every pipeline's asset chain, its job, and the ledger resource."""

import os

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from .assets.automation import daily_retraining, inbox_sensor
from .assets.factory import build_pipeline_assets, build_sharded_assets
from .assets.resources import FgtracResource
from .errors import InputError
from .pipelines.registry import DEFAULT_LIMITS, PIPELINES
from .studies.catalog import STUDIES


def shards_setting() -> int:
    """Return FGTRAC_SHARDS (default 2) as an int; raise InputError naming the setting if it is not one."""
    raw = os.environ.get("FGTRAC_SHARDS", "2").strip()
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"FGTRAC_SHARDS={raw!r} is not a whole number of shards (1..4096)") from None


# Shards of the sharded influence path (FGTRAC_SHARDS, default 2): fixed when definitions load.
SHARDS = shards_setting()

all_assets = [a for pipeline, defaults in PIPELINES
              for a in build_pipeline_assets(pipeline, defaults, tuple(STUDIES.get(pipeline.name, ())))
              + build_sharded_assets(pipeline, SHARDS)]

# One in-process job per pipeline: a torch chain runs faster without a process per step.
# Their default run config keeps the console at INFO: progress lines, not every engine event.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _job_config(name: str) -> dict:
    """Return a pipeline job's default run config: QUIET, plus its default raw_samples limit if any."""
    if name not in DEFAULT_LIMITS:
        return QUIET
    return {**QUIET, "ops": {f"{name}__raw_samples": {"config": {"limit": DEFAULT_LIMITS[name]}}}}


jobs = [define_asset_job(f"{pipeline.name}_job", selection=AssetSelection.groups(pipeline.name),
                         executor_def=in_process_executor, config=_job_config(pipeline.name),
                         description=f"Materialise the whole {pipeline.name} chain.")
        for pipeline, _ in PIPELINES]

sharded_jobs = [define_asset_job(f"{pipeline.name}_sharded_job",
                                 selection=AssetSelection.assets(*[[pipeline.name, n] for n in
                                                                   ("gradient_cache_shards", "influence_shards")]),
                                 config=QUIET,
                                 description=f"One shard of {pipeline.name}'s influence (a partition per shard); "
                                             "launch all partitions as a backfill, then materialise influence_combined.")
                for pipeline, _ in PIPELINES]

schedules = [daily_retraining(job, pipeline.name) for job, (pipeline, _) in zip(jobs, PIPELINES)]
sensors = [inbox_sensor(job, pipeline.name) for job, (pipeline, _) in zip(jobs, PIPELINES)]

defs = Definitions(assets=all_assets, jobs=jobs + sharded_jobs, schedules=schedules, sensors=sensors,
                   resources={"fgtrac": FgtracResource()})
