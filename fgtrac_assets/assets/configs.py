"""Run configuration of the chain's assets, as shown in the Dagster launchpad."""

from typing import Optional

from dagster import Config
from pydantic import Field


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
    """FG-Trac's checkpoint selection rule."""

    min_rel_improvement: float = Field(default=0.05, description="relative validation-loss improvement that counts as substantial")
    max_checkpoints: int = 3
    always_keep_last: bool = True
    consider_from: float = Field(default=0.5, description="apply the rule to checkpoints from this fraction of training "
                                 "on: late checkpoints find mislabelled samples best (see the mislabel_evaluation asset)")


class InfluenceConfig(Config):
    """How many proponents and opponents to keep per test sample."""

    top_k: int = 10


class StudyConfig(Config):
    """Which of a study's settings to run, and its seed."""

    preset: str = Field(default="default", description="'default' (minutes on 2 cores) or 'large' (a real study)")
    seed: int = 0
