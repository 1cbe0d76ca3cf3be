"""One call builds a pipeline's whole asset chain: thin assets over the plain-Python stages."""

import dataclasses
import warnings

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    BetaWarning,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    DataVersion,
    Failure,
    Output,
    StaticPartitionsDefinition,
    asset,
)

from ..ledger.checks import NON_BLOCKING, check_names
from ..ledger.lock import LedgerBusy
from ..ledger.store import LedgerDamaged
from ..pipelines import stages
from ..pipelines.base import Pipeline, TrainSettings
from ..pipelines.handles import Handle, StageResult
from ..pipelines.studies import Study, run_study
from .configs import InfluenceConfig, RawSamplesConfig, SelectionConfig, StudyConfig, TrainingConfig
from .metadata import to_dagster
from .resources import FgtracResource

CODE_VERSION = "1"
ASSET_NAMES = ("raw_samples", "preprocessed_samples", "training_checkpoints", "selected_checkpoints",
               "gradient_cache", "influence_scores")
EXPECTED_ERRORS = (ValueError, OSError, LedgerBusy, LedgerDamaged)


def _output(result: StageResult, row_count: int | None = None):
    """Yield the asset's output (value, metadata, data version = its root) and its check results."""
    meta = to_dagster(result.metadata)
    if row_count is not None:
        meta["dagster/row_count"] = row_count
    # Output's data_version is what records upstream roots on every downstream materialisation; Dagster 1.13
    # marks that parameter beta and warns on each Output: we rely on it knowingly, so silence that one warning here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=BetaWarning, message="Parameter `data_version`")
        output = Output(result.handle, metadata=meta, data_version=DataVersion(result.handle.root_hex))
    yield output
    for c in result.checks:
        yield AssetCheckResult(check_name=c.name, passed=c.passed, description=c.description,
                               metadata=to_dagster(c.metadata),
                               severity=AssetCheckSeverity.WARN if c.name in NON_BLOCKING else AssetCheckSeverity.ERROR)


def _check_specs(pipeline: str, asset: str) -> list[AssetCheckSpec]:
    """Every asset's checks; a failed tree head or incomplete lineage blocks the assets downstream."""
    descriptions = {"tree_head_verifies": "the signed tree head of this commit verifies and matches the stored tree",
                    "lineage_complete": "every sample has the lifecycle events this asset must record",
                    "numbers_sane": "losses are finite; scores are finite and in rank order (no proponent below "
                                    "an opponent, no negative self-influence)",
                    "witnessed": "the signed tree head is cosigned by the witness policy's quorum (passes when "
                                 "there is no policy; a down witness only warns)"}
    return [AssetCheckSpec(name, asset=AssetKey([pipeline, asset]), description=descriptions[name],
                           blocking=name not in NON_BLOCKING) for name in check_names(asset)]


def _run(context: AssetExecutionContext, fn, *args, **kwargs) -> StageResult:
    """Run a stage, turning the errors a user can fix into a one-line Dagster failure."""
    try:
        return fn(*args, log=context.log.info, **kwargs)
    except EXPECTED_ERRORS as exc:
        context.log.error(str(exc))
        raise Failure(description=str(exc), allow_retries=False) from None


def build_pipeline_assets(pipeline: Pipeline, defaults: TrainSettings,
                          studies: tuple[Study, ...] = ()) -> list[AssetsDefinition]:
    """Return the six assets raw_samples -> ... -> influence_scores for a pipeline, and its study assets, in group pipeline.name."""
    p = pipeline.name

    def chain_asset(name: str, description: str, upstream: tuple[str, ...] = ()):
        return asset(name=name, key_prefix=[p], group_name=p, code_version=CODE_VERSION, description=description,
                     ins={n: AssetIn(key=AssetKey([p, n])) for n in upstream}, check_specs=_check_specs(p, name))

    @chain_asset("raw_samples", f"Raw samples of {p}, each identified by the SHA-256 of its content; "
                 "`ingested` and `rejected` events with reasons.")
    def raw_samples(context: AssetExecutionContext, config: RawSamplesConfig, fgtrac: FgtracResource):
        r = _run(context, stages.ingest, fgtrac.ledger(), pipeline, context.run.run_id, source=config.source,
                 limit=config.limit, strict=config.strict, inbox=config.inbox, image_size=config.image_size)
        yield from _output(r, r.metadata["samples"])

    @chain_asset("preprocessed_samples", "Normalised samples with a deterministic train/val/test split; "
                 "events link each input hash to its output hash.", upstream=("raw_samples",))
    def preprocessed_samples(context: AssetExecutionContext, fgtrac: FgtracResource, raw_samples: Handle):
        r = _run(context, stages.preprocess, fgtrac.ledger(), pipeline, context.run.run_id, raw_samples)
        yield from _output(r, r.metadata["samples"])

    @chain_asset("training_checkpoints", "A new model version: one checkpoint per epoch (file sha256 in the "
                 "ledger) and a `batched` event per sample per step.", upstream=("preprocessed_samples",))
    def training_checkpoints(context: AssetExecutionContext, config: TrainingConfig, fgtrac: FgtracResource,
                             preprocessed_samples: Handle):
        chosen = {k: v for k, v in config.model_dump().items() if v is not None}
        settings = dataclasses.replace(defaults, **chosen)
        r = _run(context, stages.train, fgtrac.ledger(), pipeline, context.run.run_id, preprocessed_samples, settings)
        yield from _output(r, r.metadata["epochs"])

    @chain_asset("selected_checkpoints", "Checkpoints where validation loss improved substantially (FG-Trac), "
                 "the final one always kept.", upstream=("training_checkpoints",))
    def selected_checkpoints(context: AssetExecutionContext, config: SelectionConfig, fgtrac: FgtracResource,
                             training_checkpoints: Handle):
        r = _run(context, stages.select, fgtrac.ledger(), pipeline, context.run.run_id, training_checkpoints,
                 rule=config.rule())
        yield from _output(r, len(r.metadata["selected"]))

    @chain_asset("gradient_cache", f"Per-sample gradient factors of layer `{pipeline.influence_layer}` at each "
                 "selected checkpoint (output error and input activation), as a Parquet artifact.",
                 upstream=("preprocessed_samples", "training_checkpoints", "selected_checkpoints"))
    def gradient_cache(context: AssetExecutionContext, fgtrac: FgtracResource, preprocessed_samples: Handle,
                       training_checkpoints: Handle, selected_checkpoints: Handle):
        r = _run(context, stages.gradients, fgtrac.ledger(), pipeline, context.run.run_id, preprocessed_samples,
                 training_checkpoints, selected_checkpoints)
        yield from _output(r, r.metadata["rows"])

    @chain_asset("influence_scores", "Signed TracInCP scores: top-k proponents and opponents per test sample "
                 "and the self-influence of every training sample.", upstream=("gradient_cache",))
    def influence_scores(context: AssetExecutionContext, config: InfluenceConfig, fgtrac: FgtracResource,
                         gradient_cache: Handle):
        r = _run(context, stages.influence, fgtrac.ledger(), pipeline, context.run.run_id, gradient_cache,
                 k=config.top_k)
        yield from _output(r, r.metadata["influence_rows"])

    return [raw_samples, preprocessed_samples, training_checkpoints, selected_checkpoints, gradient_cache,
            influence_scores] + [_study_asset(pipeline, study) for study in studies]


def shard_partitions(shards: int) -> StaticPartitionsDefinition:
    """Return the partitions of the sharded influence assets: '0-of-N' .. 'N-1-of-N'."""
    if not 1 <= shards <= 4096:
        raise ValueError(f"FGTRAC_SHARDS={shards} is out of range (1..4096)")
    return StaticPartitionsDefinition([f"{i}-of-{shards}" for i in range(shards)])


def _shard(partition_key: str) -> tuple[int, int]:
    i, n = partition_key.split("-of-")
    return int(i), int(n)


def build_sharded_assets(pipeline: Pipeline, shards: int) -> list[AssetsDefinition]:
    """Return the sharded influence path: gradient_cache_shards and influence_shards per shard, influence_combined.

    They read the chain's selected checkpoints; each shard is one partition, so shards run as
    separate runs (in parallel, or on Kubernetes/Celery through Dagster's executors); the
    combined asset merges them into exactly the unsharded scores.
    """
    p = pipeline.name
    parts = shard_partitions(shards)
    group = f"{p}_sharded"
    key = lambda name: AssetKey([p, name])  # noqa: E731

    @asset(name="gradient_cache_shards", key_prefix=[p], group_name=group, code_version=CODE_VERSION,
           partitions_def=parts, check_specs=_check_specs(p, "gradient_cache_shards"),
           ins={n: AssetIn(key=key(n)) for n in ("preprocessed_samples", "training_checkpoints", "selected_checkpoints")},
           description="The gradient cache of one shard of training samples (all test samples).")
    def gradient_cache_shards(context: AssetExecutionContext, fgtrac: FgtracResource, preprocessed_samples: Handle,
                              training_checkpoints: Handle, selected_checkpoints: Handle):
        r = _run(context, stages.gradients, fgtrac.ledger(), pipeline, context.run.run_id, preprocessed_samples,
                 training_checkpoints, selected_checkpoints, shard=_shard(context.partition_key))
        yield from _output(r, r.metadata["rows"])

    @asset(name="influence_shards", key_prefix=[p], group_name=group, code_version=CODE_VERSION,
           partitions_def=parts, check_specs=_check_specs(p, "influence_shards"),
           ins={"gradient_cache_shards": AssetIn(key=key("gradient_cache_shards"))},
           description="TracInCP top-k and self-influence of one shard of training samples, to be combined.")
    def influence_shards(context: AssetExecutionContext, config: InfluenceConfig, fgtrac: FgtracResource,
                         gradient_cache_shards: Handle):
        r = _run(context, stages.influence_shard, fgtrac.ledger(), pipeline, context.run.run_id,
                 gradient_cache_shards, k=config.top_k)
        yield from _output(r, r.metadata["rows"])

    @asset(name="influence_combined", key_prefix=[p], group_name=group, code_version=CODE_VERSION,
           check_specs=_check_specs(p, "influence_combined"),
           ins={"influence_shards": AssetIn(key=key("influence_shards"))},
           description="Every shard's top-k merged: exactly the unsharded TracInCP scores, committed once.")
    def influence_combined(context: AssetExecutionContext, config: InfluenceConfig, fgtrac: FgtracResource,
                           influence_shards: dict):
        handles = [influence_shards[k] for k in sorted(influence_shards, key=lambda k: _shard(k)[0])]
        if len(handles) != shards:
            raise Failure(description=f"{len(handles)} of {shards} shards are materialised: materialise every "
                                      "partition of influence_shards first", allow_retries=False)
        r = _run(context, stages.combine_influence, fgtrac.ledger(), pipeline, context.run.run_id, handles,
                 k=config.top_k)
        yield from _output(r, r.metadata["influence_rows"])

    return [gradient_cache_shards, influence_shards, influence_combined]


def _study_asset(pipeline: Pipeline, study: Study) -> AssetsDefinition:
    """Return the asset that runs one evaluation study of a pipeline and commits its table and plot."""
    p = pipeline.name

    @asset(name=study.name, key_prefix=[p], group_name=p, code_version=CODE_VERSION, description=study.description,
           check_specs=_check_specs(p, study.name))
    def _study(context: AssetExecutionContext, config: StudyConfig, fgtrac: FgtracResource):
        r = _run(context, run_study, fgtrac.ledger(), pipeline, context.run.run_id, study, preset=config.preset,
                 seed=config.seed)
        yield from _output(r)

    return _study
