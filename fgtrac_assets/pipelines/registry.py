"""The pipelines fgtrac ships, with their default training settings and data limits (no Dagster here)."""

from .base import TrainSettings
from .digits import DigitsPipeline
from .movielens import MovieLensPipeline

PIPELINES = [(DigitsPipeline(), TrainSettings(epochs=12, lr=0.1, batch_size=32, seed=0, schedule="cosine")),
             (MovieLensPipeline(), TrainSettings(epochs=5, lr=0.005, batch_size=512, seed=0, schedule="cosine"))]

# A job's default raw_samples limit where it is not 0 (= everything). The graph job takes the first
# 200 users' ratings (27,944 of 100,004) so that its chain runs in about a minute on 2 cores;
# `limit: 0` in its run config (launchpad or -c) takes the whole of MovieLens.
DEFAULT_LIMITS = {"multimodal_graph": 28_000}
