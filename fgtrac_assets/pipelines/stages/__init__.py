"""The chain's stages as plain functions (no Dagster): compute, write artifacts, commit signed rows, check them.

Each takes ``(ledger, pipeline, run_id, *upstream handles, settings, log=)`` and returns a StageResult;
``pipelines/chain.py`` declares which stage follows which, for the Dagster factory and ``fgtrac run``.
"""

from .commit import Log, NothingToTrain, commit_stage, quiet, write_parquet
from .gradients import gradients
from .influence import combine_influence, influence, influence_shard
from .ingest import ingest, preprocess
from .select import select
from .train import train

__all__ = ["Log", "NothingToTrain", "combine_influence", "commit_stage", "gradients", "influence",
           "influence_shard", "ingest", "preprocess", "quiet", "select", "train", "write_parquet"]
