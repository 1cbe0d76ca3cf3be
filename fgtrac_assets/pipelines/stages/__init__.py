"""The chain's stages as plain functions (no Dagster): compute, write artifacts, commit signed rows, check them.

Each takes ``(ledger, pipeline, run_id, *upstream handles, settings, log=)`` and returns a StageResult;
``pipelines/chain.py`` declares which stage follows which, for the Dagster factory and ``fgtrac run``.
"""

from .commit import Log, NothingToTrain, commit_stage, quiet, write_parquet
from .gradient_cache import gradients
from .influence_scores import combine_influence, influence, influence_shard
from .ingestion import ingest, preprocess
from .selection import select
from .training import train

__all__ = ["Log", "NothingToTrain", "combine_influence", "commit_stage", "gradients", "influence",
           "influence_shard", "ingest", "preprocess", "quiet", "select", "train", "write_parquet"]
