"""One call builds a pipeline's whole asset chain: thin assets over the plain-Python stages."""

import dataclasses
import warnings

from dagster import (
    AssetExecutionContext,
    BetaWarning,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    DataVersion,
    Failure,
    Output,
    asset,
)

from ..pipelines import stages
from ..pipelines.base import Pipeline, TrainSettings
from ..pipelines.handles import Handle, StageResult
from .configs import InfluenceConfig, RawSamplesConfig, SelectionConfig, TrainingConfig
from .metadata import to_dagster
from .resources import FgtracResource

CODE_VERSION = "1"
ASSET_NAMES = ("raw_samples", "preprocessed_samples", "training_checkpoints", "selected_checkpoints",
               "gradient_cache", "influence_scores")
EXPECTED_ERRORS = (ValueError, FileNotFoundError, PermissionError)

# DataVersion on Output is what records upstream roots on every downstream materialisation.
warnings.filterwarnings("ignore", category=BetaWarning, message=".*data_version.*")


def _output(result: StageResult, row_count: int | None = None) -> Output:
    meta = to_dagster(result.metadata)
    if row_count is not None:
        meta["dagster/row_count"] = row_count
    return Output(result.handle, metadata=meta, data_version=DataVersion(result.handle.root_hex))


def _run(context: AssetExecutionContext, fn, *args, **kwargs) -> StageResult:
    """Run a stage, turning the errors a user can fix into a one-line Dagster failure."""
    try:
        return fn(*args, log=context.log.info, **kwargs)
    except EXPECTED_ERRORS as exc:
        context.log.error(str(exc))
        raise Failure(description=str(exc), allow_retries=False) from None


def build_pipeline_assets(pipeline: Pipeline, defaults: TrainSettings) -> list[AssetsDefinition]:
    """Return the six assets raw_samples -> ... -> influence_scores for a pipeline, in group pipeline.name."""
    p = pipeline.name

    def ins(*names: str) -> dict:
        return {n: AssetIn(key=AssetKey([p, n])) for n in names}

    common = {"key_prefix": [p], "group_name": p, "code_version": CODE_VERSION}

    @asset(name="raw_samples", description=f"Raw samples of {p}, each identified by the SHA-256 of its content; "
           "`ingested` and `rejected` events with reasons.", **common)
    def raw_samples(context: AssetExecutionContext, config: RawSamplesConfig, fgtrac: FgtracResource) -> Output:
        r = _run(context, stages.ingest, fgtrac.ledger(), pipeline, context.run.run_id, source=config.source,
                 limit=config.limit, strict=config.strict)
        return _output(r, r.metadata["samples"])

    @asset(name="preprocessed_samples", ins=ins("raw_samples"), description="Normalised samples with a deterministic "
           "train/val/test split; events link each input hash to its output hash.", **common)
    def preprocessed_samples(context: AssetExecutionContext, fgtrac: FgtracResource, raw_samples: Handle) -> Output:
        r = _run(context, stages.preprocess, fgtrac.ledger(), pipeline, context.run.run_id, raw_samples)
        return _output(r, r.metadata["samples"])

    @asset(name="training_checkpoints", ins=ins("preprocessed_samples"), description="A new model version: one "
           "checkpoint per epoch (file sha256 in the ledger) and a `batched` event per sample per step.", **common)
    def training_checkpoints(context: AssetExecutionContext, config: TrainingConfig, fgtrac: FgtracResource,
                             preprocessed_samples: Handle) -> Output:
        chosen = {k: v for k, v in config.model_dump().items() if v is not None}
        settings = dataclasses.replace(defaults, **chosen)
        r = _run(context, stages.train, fgtrac.ledger(), pipeline, context.run.run_id, preprocessed_samples, settings)
        return _output(r, r.metadata["epochs"])

    @asset(name="selected_checkpoints", ins=ins("training_checkpoints"), description="Checkpoints where validation "
           "loss improved substantially (FG-Trac), the final one always kept.", **common)
    def selected_checkpoints(context: AssetExecutionContext, config: SelectionConfig, fgtrac: FgtracResource,
                             training_checkpoints: Handle) -> Output:
        r = _run(context, stages.select, fgtrac.ledger(), pipeline, context.run.run_id, training_checkpoints,
                 min_rel_improvement=config.min_rel_improvement, max_checkpoints=config.max_checkpoints,
                 always_keep_last=config.always_keep_last)
        return _output(r, len(r.metadata["selected"]))

    @asset(name="gradient_cache", ins=ins("preprocessed_samples", "training_checkpoints", "selected_checkpoints"),
           description=f"Per-sample gradient factors of layer `{pipeline.influence_layer}` at each selected "
           "checkpoint (output error and input activation), as a Parquet artifact.", **common)
    def gradient_cache(context: AssetExecutionContext, fgtrac: FgtracResource, preprocessed_samples: Handle,
                       training_checkpoints: Handle, selected_checkpoints: Handle) -> Output:
        r = _run(context, stages.gradients, fgtrac.ledger(), pipeline, context.run.run_id, preprocessed_samples,
                 training_checkpoints, selected_checkpoints)
        return _output(r, r.metadata["rows"])

    @asset(name="influence_scores", ins=ins("gradient_cache"), description="Signed TracInCP scores: top-k "
           "proponents and opponents per test sample and the self-influence of every training sample.", **common)
    def influence_scores(context: AssetExecutionContext, config: InfluenceConfig, fgtrac: FgtracResource,
                         gradient_cache: Handle) -> Output:
        r = _run(context, stages.influence, fgtrac.ledger(), pipeline, context.run.run_id, gradient_cache, k=config.top_k)
        return _output(r, r.metadata["influence_rows"])

    return [raw_samples, preprocessed_samples, training_checkpoints, selected_checkpoints, gradient_cache,
            influence_scores]
