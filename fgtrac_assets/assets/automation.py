"""Scheduled retraining and the inbox sensor, one of each per pipeline job."""

import hashlib
import json

from dagster import (
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from ..config import resolve_home
from ..pipelines.inbox import new_content, scan_inbox

QUIET_LOGGER = {"console": {"config": {"log_level": "INFO"}}}


def retraining_run_config(pipeline: str) -> dict:
    """Return the run config of a retraining: the pipeline's default source plus everything in its inbox."""
    return {"ops": {f"{pipeline}__raw_samples": {"config": {"inbox": True}}}, "loggers": QUIET_LOGGER}


def daily_retraining(job, pipeline: str) -> ScheduleDefinition:
    """Return a daily schedule (03:00) retraining the pipeline; a new model version each time, the log extended."""
    return ScheduleDefinition(name=f"{pipeline}_daily_retraining", job=job, cron_schedule="0 3 * * *",
                              run_config=retraining_run_config(pipeline), default_status=DefaultScheduleStatus.STOPPED,
                              description=f"Retrain {pipeline} every day at 03:00 on its data plus its inbox.")


def inbox_sensor(job, pipeline: str):
    """Return a sensor that starts ingestion and retraining when new content lands in $FGTRAC_HOME/inbox/<pipeline>/."""

    @sensor(name=f"{pipeline}_inbox", job=job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING,
            description=f"New files in $FGTRAC_HOME/inbox/{pipeline}/ (class folders of images, or Parquet) trigger "
                        "ingestion and a retraining run; content already seen does not.")
    def _inbox(context: SensorEvaluationContext):
        state = json.loads(context.cursor) if context.cursor else {"files": {}, "seen": []}
        root = resolve_home().inbox / pipeline
        files = scan_inbox(root, state["files"])
        fresh = new_content(files, set(state["seen"]))
        state["files"] = files
        if not fresh:
            context.update_cursor(json.dumps(state))
            return SkipReason(f"no new content in {root}")
        state["seen"] = sorted(set(state["seen"]) | set(fresh))
        context.update_cursor(json.dumps(state))
        key = hashlib.sha256("".join(fresh).encode()).hexdigest()[:16]
        return RunRequest(run_key=f"{pipeline}-inbox-{key}", run_config=retraining_run_config(pipeline),
                          tags={"fgtrac/trigger": "inbox", "fgtrac/new_files": str(len(fresh))})

    return _inbox
