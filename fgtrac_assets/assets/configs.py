"""Run configuration of the chain's assets, as shown in the Dagster launchpad."""

from typing import Optional

from dagster import Config
from pydantic import Field

from ..attribution.selection import DEFAULT_RULE, SelectionRule


class RawSamplesConfig(Config):
    """Where raw samples come from."""

    source: str = Field(default="", description="'' = the pipeline's bundled data; else an ImageFolder directory, "
                                                "a Parquet or CSV file, or (graph) a directory of nodes/edges tables")
    limit: int = Field(default=0, description="read at most this many items (0 = all)")
    strict: bool = Field(default=False, description="fail the run if any item is rejected")
    inbox: bool = Field(default=False, description="also ingest everything in $FGTRAC_HOME/inbox/<pipeline>/")
    image_size: str = Field(default="", description="images: the size every image must have, HEIGHTxWIDTH "
                                                    "(e.g. 28x28); '' = the pipeline's (8x8 for digits)")


class TrainingConfig(Config):
    """Training hyper-parameters; unset fields take the pipeline's defaults."""

    epochs: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    seed: Optional[int] = None
    schedule: Optional[str] = Field(default=None, description="'cosine' or 'constant'")


class SelectionConfig(Config):
    """FG-Trac's checkpoint selection rule; the defaults are the rule's own (attribution.selection.DEFAULT_RULE)."""

    min_rel_improvement: float = Field(default=DEFAULT_RULE.min_rel_improvement,
                                       description="relative validation-loss improvement that counts as substantial")
    max_checkpoints: int = DEFAULT_RULE.max_checkpoints
    always_keep_last: bool = DEFAULT_RULE.always_keep_last
    consider_from: float = Field(default=DEFAULT_RULE.consider_from,
                                 description="apply the rule to checkpoints from this fraction of training "
                                 "on: late checkpoints find mislabelled samples best (see the mislabel_evaluation asset)")

    def rule(self) -> SelectionRule:
        """Return the selection rule these settings describe."""
        return SelectionRule(min_rel_improvement=self.min_rel_improvement, max_checkpoints=self.max_checkpoints,
                             always_keep_last=self.always_keep_last, consider_from=self.consider_from)


class InfluenceConfig(Config):
    """How many proponents and opponents to keep per test sample."""

    top_k: int = 10


class StudyConfig(Config):
    """Which of a study's settings to run, and its seed."""

    preset: str = Field(default="default", description="'default' (small, runs with the job) or 'large' (a real study)")
    seed: int = 0
