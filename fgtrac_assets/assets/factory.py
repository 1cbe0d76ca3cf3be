"""The Dagster side of the chain: one thin asset per declared stage (pipelines/chain.py), its checks and config."""

import inspect
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

from ..ledger.checks import NON_BLOCKING
from ..errors import FgtracError, InputError
from ..pipelines.base import Pipeline, TrainSettings
from ..pipelines.chain import CHAIN, SHARDED, Stage
from ..pipelines.handles import StageResult
from ..studies.run import Study, run_study
from .configs import CONFIG_OF, StudyConfig
from .metadata import to_dagster
from .resources import FgtracResource

CODE_VERSION = "1"
EXPECTED_ERRORS = (FgtracError,)
CHECK_DESCRIPTIONS = {
    "tree_head_verifies": "the signed tree head of this commit verifies and matches the stored tree",
    "lineage_complete": "every sample has the lifecycle events this asset must record",
    "numbers_sane": "losses are finite; scores are finite and in rank order (no proponent below an opponent, no "
                    "negative self-influence)",
    "witnessed": "the signed tree head is cosigned by the witness policy's quorum (passes when there is no policy; "
                 "a down witness only warns)"}


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


def _check_specs(pipeline: str, asset_name: str, names: list[str]) -> list[AssetCheckSpec]:
    """Return an asset's check specs; a failed tree head or incomplete lineage blocks the assets downstream."""
    return [AssetCheckSpec(name, asset=AssetKey([pipeline, asset_name]), description=CHECK_DESCRIPTIONS[name],
                           blocking=name not in NON_BLOCKING) for name in names]


def _run(context: AssetExecutionContext, fn, *args, **kwargs) -> StageResult:
    """Run a stage, turning the errors a user can fix into a one-line Dagster failure."""
    try:
        return fn(*args, log=context.log.info, **kwargs)
    except EXPECTED_ERRORS as exc:
        context.log.error(str(exc))
        raise Failure(description=str(exc), allow_retries=False) from None


def _no_options(context: AssetExecutionContext, inputs: dict) -> tuple[dict, dict]:
    return inputs, {}


def _stage_asset(stage: Stage, pipeline: Pipeline, defaults: TrainSettings, group: str,
                 partitions: StaticPartitionsDefinition | None = None, prepare=_no_options) -> AssetsDefinition:
    """Return the asset of a declared stage: its config is the stage's settings, its ins the stage's upstream.

    prepare(context, inputs) returns the inputs and extra stage options of one run (a shard, merged partitions).
    """

    def body(context: AssetExecutionContext, fgtrac: FgtracResource, config=None, **inputs):
        inputs, options = prepare(context, inputs)
        settings = config.settings(defaults) if config is not None else None
        r = _run(context, stage.call, fgtrac.ledger(), pipeline, context.run.run_id, inputs, settings, **options)
        yield from _output(r, r.metadata[stage.row_count] if stage.row_count else None)

    # Dagster reads an asset's config type and resources from its signature: give each stage's body its own
    P = inspect.Parameter
    params = [P("context", P.POSITIONAL_OR_KEYWORD, annotation=AssetExecutionContext),
              P("fgtrac", P.POSITIONAL_OR_KEYWORD, annotation=FgtracResource)]
    if stage.settings is not None:
        params.append(P("config", P.POSITIONAL_OR_KEYWORD, annotation=CONFIG_OF[stage.settings]))
    body.__signature__ = inspect.Signature(params + [P("inputs", P.VAR_KEYWORD)])
    body.__annotations__ = {p.name: p.annotation for p in params}
    p = pipeline.name
    return asset(name=stage.name, key_prefix=[p], group_name=group, code_version=CODE_VERSION,
                 description=stage.describe(pipeline), partitions_def=partitions,
                 ins={n: AssetIn(key=AssetKey([p, n])) for n in stage.upstream},
                 check_specs=_check_specs(p, stage.name, stage.check_names()))(body)


def build_pipeline_assets(pipeline: Pipeline, defaults: TrainSettings,
                          studies: tuple[Study, ...] = ()) -> list[AssetsDefinition]:
    """Return the declared chain's assets for a pipeline and its study assets, in group pipeline.name."""
    return ([_stage_asset(s, pipeline, defaults, pipeline.name) for s in CHAIN]
            + [_study_asset(pipeline, study) for study in studies])


def shard_partitions(shards: int) -> StaticPartitionsDefinition:
    """Return the partitions of the sharded influence assets: '0-of-N' .. 'N-1-of-N'."""
    if not 1 <= shards <= 4096:
        raise InputError(f"FGTRAC_SHARDS={shards} is out of range (1..4096)")
    return StaticPartitionsDefinition([f"{i}-of-{shards}" for i in range(shards)])


def _shard(partition_key: str) -> tuple[int, int]:
    i, n = partition_key.split("-of-")
    return int(i), int(n)


def build_sharded_assets(pipeline: Pipeline, shards: int) -> list[AssetsDefinition]:
    """Return the sharded influence path (chain.SHARDED): gradient_cache_shards and influence_shards per shard, then
    influence_combined.

    They read the chain's selected checkpoints; each shard is one partition, so shards run as
    separate runs (in parallel, or on Kubernetes/Celery through Dagster's executors); the
    combined asset merges them into exactly the unsharded scores.
    """
    parts = shard_partitions(shards)
    group = f"{pipeline.name}_sharded"

    def one_shard(context, inputs):
        return inputs, {"shard": _shard(context.partition_key)}

    def every_shard(context, inputs):
        by_key = inputs["influence_shards"]
        if len(by_key) != shards:
            raise Failure(description=f"{len(by_key)} of {shards} shards are materialised: materialise every "
                                      "partition of influence_shards first", allow_retries=False)
        return {"influence_shards": [by_key[k] for k in sorted(by_key, key=lambda k: _shard(k)[0])]}, {}

    gradient, scores, combined = SHARDED
    return [_stage_asset(gradient, pipeline, TrainSettings(), group, parts, one_shard),
            _stage_asset(scores, pipeline, TrainSettings(), group, parts),
            _stage_asset(combined, pipeline, TrainSettings(), group, prepare=every_shard)]


def _study_asset(pipeline: Pipeline, study: Study) -> AssetsDefinition:
    """Return the asset that runs one evaluation study of a pipeline and commits its table and plot."""
    p = pipeline.name

    @asset(name=study.name, key_prefix=[p], group_name=p, code_version=CODE_VERSION, description=study.description,
           ins={"preprocessed_samples": AssetIn(key=AssetKey([p, "preprocessed_samples"]))},
           check_specs=_check_specs(p, study.name, ["tree_head_verifies", "witnessed"]))
    def _study(context: AssetExecutionContext, config: StudyConfig, fgtrac: FgtracResource, preprocessed_samples):
        r = _run(context, run_study, fgtrac.ledger(), pipeline, context.run.run_id, study, preprocessed_samples,
                 preset=config.preset, seed=config.seed)
        yield from _output(r)

    return _study
