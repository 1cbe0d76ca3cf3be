"""The pipelines fgtrac ships, with their default training settings, data limits and studies (no Dagster here)."""

from .base import TrainSettings
from .digits import DigitsPipeline
from .mislabel_eval import mislabel_evaluation, table_markdown
from .movielens import MovieLensPipeline
from .studies import Study

PIPELINES = [(DigitsPipeline(), TrainSettings(epochs=12, lr=0.1, batch_size=32, seed=0, schedule="cosine")),
             (MovieLensPipeline(), TrainSettings(epochs=5, lr=0.005, batch_size=512, seed=0, schedule="cosine"))]

# A job's default raw_samples limit where it is not 0 (= everything). The graph job takes the first
# 200 users' ratings (27,944 of 100,004) so that its chain runs in about a minute on 2 cores;
# `limit: 0` in its run config (launchpad or -c) takes the whole of MovieLens.
DEFAULT_LIMITS = {"multimodal_graph": 28_000}

MISLABEL_STUDY = Study(
    name="mislabel_evaluation",
    description="TracIn section 4.1 on digits: flip 10% of training labels to the most confusable class, retrain, "
                "rank by self-influence; fraction of flipped labels found after inspecting 5/10/20/30% and AUROC, "
                "for TracInCP under several checkpoint rules, Grad-Dot, training loss and random.",
    run=mislabel_evaluation, table_markdown=table_markdown,
    presets={"default": {}, "large": {"n_train": 1200, "n_val": 300, "epochs": 40}},
    headline=lambda r: {"ceiling_3_checkpoints": r.get("ceiling"), "run": {k: v for k, v in r["run"].items()
                                                                           if k != "flipped_rows"}})

# Evaluation assets per pipeline: each trains its own models on bundled data and commits a table and a plot.
STUDIES: dict[str, list[Study]] = {"digits_cnn": [MISLABEL_STUDY]}
