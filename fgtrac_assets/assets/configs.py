"""Run configuration of the chain's assets, as shown in the Dagster launchpad: each mirrors one settings dataclass.

Defaults come from the dataclasses (pipelines/base.py, attribution/selection.py), never from here;
``settings(defaults)`` turns a config into the dataclass the stage takes.
"""

import dataclasses
from typing import Optional

from dagster import Config
from pydantic import Field

from ..attribution.methods import METHODS
from ..attribution.selection import DEFAULT_RULE, SelectionRule
from ..pipelines.base import DEVICE_CHOICES, GradientSettings, InfluenceSettings, IngestSettings, TrainSettings

_INGEST = IngestSettings()
_DEVICE = f"where it runs: {DEVICE_CHOICES}"


class RawSamplesConfig(Config):
    """Where raw samples come from."""

    source: str = Field(default=_INGEST.source, description="'' = the pipeline's bundled data; else an ImageFolder directory, "
                                                "a Parquet or CSV file, or (graph) a directory of nodes/edges tables")
    limit: int = Field(default=_INGEST.limit, description="read at most this many items (0 = all)")
    strict: bool = Field(default=_INGEST.strict, description="fail the run if any item is rejected")
    inbox: bool = Field(default=_INGEST.inbox, description="also ingest everything in $FGTRAC_HOME/inbox/<pipeline>/")
    image_size: str = Field(default=_INGEST.image_size, description="images: the size every image must have, "
                                                    "HEIGHTxWIDTH (e.g. 28x28); '' = the pipeline's (8x8 for digits)")

    def settings(self, defaults: TrainSettings) -> IngestSettings:
        """Return the ingest settings this config describes."""
        return IngestSettings(**self.model_dump())


class TrainingConfig(Config):
    """Training hyper-parameters; unset fields take the pipeline's defaults."""

    epochs: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    seed: Optional[int] = None
    schedule: Optional[str] = Field(default=None, description="'cosine' or 'constant'")
    device: Optional[str] = Field(default=None, description=_DEVICE)

    def settings(self, defaults: TrainSettings) -> TrainSettings:
        """Return the pipeline's default training settings with the fields this config sets."""
        return dataclasses.replace(defaults, **{k: v for k, v in self.model_dump().items() if v is not None})


class SelectionConfig(Config):
    """FG-Trac's checkpoint selection rule; the defaults are the rule's own (attribution.selection.DEFAULT_RULE)."""

    min_rel_improvement: float = Field(default=DEFAULT_RULE.min_rel_improvement,
                                       description="relative validation-loss improvement that counts as substantial")
    max_checkpoints: int = DEFAULT_RULE.max_checkpoints
    always_keep_last: bool = DEFAULT_RULE.always_keep_last
    consider_from: float = Field(default=DEFAULT_RULE.consider_from,
                                 description="apply the rule to checkpoints from this fraction of training "
                                 "on: late checkpoints find mislabelled samples best (see the mislabel_evaluation asset)")

    def settings(self, defaults: TrainSettings) -> SelectionRule:
        """Return the selection rule these settings describe."""
        return SelectionRule(min_rel_improvement=self.min_rel_improvement, max_checkpoints=self.max_checkpoints,
                             always_keep_last=self.always_keep_last, consider_from=self.consider_from)


class GradientConfig(Config):
    """Where the per-sample gradient factors are taken."""

    device: str = Field(default=GradientSettings().device, description=_DEVICE)

    def settings(self, defaults: TrainSettings) -> GradientSettings:
        """Return the gradient settings this config describes."""
        return GradientSettings(device=self.device)


class InfluenceConfig(Config):
    """How many proponents and opponents to keep per test sample, by which method, and where they are scored."""

    top_k: int = InfluenceSettings().top_k
    device: str = Field(default=InfluenceSettings().device, description=_DEVICE)
    method: str = Field(default=InfluenceSettings().method,
                        description="how scores are computed: " + "; ".join(f"'{m.name}' = {m.description}"
                                                                            for m in METHODS.values()))

    def settings(self, defaults: TrainSettings) -> InfluenceSettings:
        """Return the influence settings this config describes."""
        return InfluenceSettings(top_k=self.top_k, device=self.device, method=self.method)


class StudyConfig(Config):
    """Which of a study's settings to run, and its seed."""

    preset: str = Field(default="default", description="'default' (small, runs with the job) or 'large' (a real study)")
    seed: int = 0


#: the launchpad config of each stage settings type
CONFIG_OF = {IngestSettings: RawSamplesConfig, TrainSettings: TrainingConfig, SelectionRule: SelectionConfig,
             GradientSettings: GradientConfig, InfluenceSettings: InfluenceConfig}
