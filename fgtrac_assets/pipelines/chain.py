"""The chain, declared once: which stage makes which asset, from which upstream assets, with which settings.

The Dagster factory (``assets/factory.py``) and ``fgtrac run`` (``cli_run.py``) both iterate
``CHAIN``; nothing else lists it. The sharded influence path is ``SHARDED``: its stages run one
partition per shard and are merged by ``influence_combined``.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..attribution.selection import SelectionRule
from ..ledger.checks import SqlCheck, check_names
from . import stages
from .base import GradientSettings, InfluenceSettings, IngestSettings, Pipeline, TrainSettings
from .handles import Handle, StageResult
from .stages.gradient_cache import GRADIENT_CHECKS
from .stages.influence_scores import INFLUENCE_CHECKS
from .stages.ingestion import INGEST_CHECKS, PREPROCESS_CHECKS
from .stages.selection import SELECT_CHECKS
from .stages.training import TRAIN_CHECKS


@dataclass(frozen=True)
class Stage:
    """One asset of the chain: its stage function, upstream assets, settings type, description and checks."""

    name: str
    run: Callable[..., StageResult]
    upstream: tuple[str, ...] = ()
    settings: type | None = None  # the stage's settings dataclass; its Dagster config mirrors it
    description: str = ""  # formatted with the pipeline: {p.name}, {p.influence_layer}
    row_count: str = ""  # the metadata entry Dagster shows as the asset's row count
    checks: tuple[SqlCheck, ...] = ()

    def call(self, ledger, pipeline: Pipeline, run_id: str, inputs: Mapping[str, Handle], settings=None,
             log: stages.Log = stages.quiet, **options) -> StageResult:
        """Run the stage on its upstream handles (by asset name) with its settings; return its result."""
        args = [inputs[name] for name in self.upstream] + ([settings] if self.settings is not None else [])
        return self.run(ledger, pipeline, run_id, *args, log=log, **options)

    def check_names(self) -> list[str]:
        """Return the names of every check this stage's asset gets."""
        return check_names(self.checks)

    def describe(self, pipeline: Pipeline) -> str:
        """Return the asset description for this pipeline."""
        return self.description.format(p=pipeline)


CHAIN: tuple[Stage, ...] = (
    Stage("raw_samples", stages.ingest, (), IngestSettings,
          "Raw samples of {p.name}, each identified by the SHA-256 of its content; `ingested` and `rejected` "
          "events with reasons.", "samples", INGEST_CHECKS),
    Stage("preprocessed_samples", stages.preprocess, ("raw_samples",), None,
          "Normalised samples with a deterministic train/val/test split; events link each input hash to its "
          "output hash.", "samples", PREPROCESS_CHECKS),
    Stage("training_checkpoints", stages.train, ("preprocessed_samples",), TrainSettings,
          "A new model version: one checkpoint per epoch (file sha256 in the ledger) and a `batched` event per "
          "sample per step.", "epochs", TRAIN_CHECKS),
    Stage("selected_checkpoints", stages.select, ("training_checkpoints",), SelectionRule,
          "Checkpoints where validation loss improved substantially (FG-Trac), the final one always kept; "
          "each decision signed with the numbers the rule computed.", "selected", SELECT_CHECKS),
    Stage("gradient_cache", stages.gradients, ("preprocessed_samples", "training_checkpoints", "selected_checkpoints"),
          GradientSettings, "Per-sample gradient factors of layer `{p.influence_layer}` at each selected checkpoint "
          "(output error and input activation), as a Parquet artifact.", "rows", GRADIENT_CHECKS),
    Stage("influence_scores", stages.influence, ("gradient_cache",), InfluenceSettings,
          "Signed TracInCP scores: top-k proponents and opponents per test sample and the self-influence of every "
          "training sample.", "influence_rows", INFLUENCE_CHECKS),
)

SHARDED: tuple[Stage, ...] = (
    Stage("gradient_cache_shards", stages.gradients,
          ("preprocessed_samples", "training_checkpoints", "selected_checkpoints"), GradientSettings,
          "The gradient cache of one shard of training samples (all test samples).", "rows"),
    Stage("influence_shards", stages.influence_shard, ("gradient_cache_shards",), InfluenceSettings,
          "TracInCP top-k and self-influence of one shard of training samples, to be combined.", "rows"),
    Stage("influence_combined", stages.combine_influence, ("influence_shards",), InfluenceSettings,
          "Every shard's top-k merged: exactly the unsharded TracInCP scores, committed once.", "influence_rows"),
)

#: the chain's asset names, in order
CHAIN_NAMES: tuple[str, ...] = tuple(s.name for s in CHAIN)


def stage(name: str) -> Stage:
    """Return the declared stage that makes this asset."""
    for s in CHAIN + SHARDED:
        if s.name == name:
            return s
    raise KeyError(f"no stage makes an asset {name!r}; the chain is {', '.join(CHAIN_NAMES)}")


def default_settings(stage_: Stage, pipeline_defaults: TrainSettings) -> object | None:
    """Return a stage's settings at their defaults (training: the pipeline's registry defaults)."""
    if stage_.settings is None:
        return None
    return pipeline_defaults if stage_.settings is TrainSettings else stage_.settings()
