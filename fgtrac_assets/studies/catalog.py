"""The studies fgtrac ships, per pipeline: what each shows, its function and its presets."""

from . import datamodeling, final_model
from .graph_noise import noisy_rating_evaluation
from .mislabel import mislabel_evaluation, table_markdown
from .run import Study

MISLABEL_STUDY = Study(
    name="mislabel_evaluation",
    description="TracIn section 4.1 on digits: flip 10% of training labels to the most confusable class, retrain, "
                "rank by self-influence; fraction of flipped labels found after inspecting 5/10/20/30% and AUROC, "
                "for TracInCP under several checkpoint rules, Grad-Dot, the step-exact replay, TRAK, training loss "
                "and random; the strongest attribution method against the loss baseline.",
    run=mislabel_evaluation, table_markdown=table_markdown,
    presets={"default": {}, "large": {"n_train": 1200, "n_val": 300, "epochs": 40}},
    headline=lambda r: {"ceiling_3_checkpoints": r.get("ceiling"), "against_loss": r["against_loss"], "run": {k: v for k, v in r["run"].items()
                                                                           if k not in ("flipped_rows", "flipped_sample_ids")}})

FINAL_MODEL_STUDY = Study(
    name="final_model_attribution",
    description="Wei et al. on digits: Grad-Dot, Grad-Cos and influence functions (explicit, CG, LiSSA) on the "
                "final model, and TracInCP from the checkpoints, against the gold standard of further training "
                "with and without each probe sample; cosine and Spearman per amount of further training.",
    run=final_model.final_model_evaluation, table_markdown=final_model.table_markdown,
    # default: further training (3 seeds x 40 probes x 200 steps) is most of its time
    presets={"default": {"further_seeds": 3, "lissa_depth": 1500}, "large": {"n_train": 1000, "n_test": 100, "n_probes": 100, "further_seeds": 8,
                                      "further_steps": (10, 50, 200, 1000)},
             "smoke": {"n_train": 200, "n_val": 100, "n_test": 20, "n_probes": 10, "epochs": 4,
                       "further_steps": (10, 50), "further_seeds": 2}},
    headline=lambda r: {"further_training_cost": r["cost"], "solvers": r["solvers"],
                        "seconds_by_method": r["seconds"]})

NOISY_RATING_STUDY = Study(
    name="noisy_rating_evaluation",
    description="Self-influence on the graph model: set 5% of the training ratings to 5.5 - rating, retrain the GNN, "
                "rank ratings by self-influence; fraction of noisy ratings found after inspecting 5/10/20/30% and "
                "AUROC, for TracInCP (all and FG-Trac-selected checkpoints), Grad-Dot, the step-exact replay, the loss "
                "and random; the strongest attribution method against the loss baseline.",
    run=noisy_rating_evaluation, table_markdown=table_markdown,
    # default: the first users' 6,000 ratings; large: the job's default 28,000
    presets={"default": {}, "large": {"limit": 28_000}},
    headline=lambda r: {"against_loss": r["against_loss"], "run": r["run"]})

LDS_STUDY = Study(
    name="lds_evaluation",
    description="The linear datamodeling score on digits: random training subsets (half, and 90%) retrained with "
                "the recorded order and seed (fixed order) and with fresh seeds; Spearman correlation per test "
                "sample between each method's summed scores and the retrained models' test loss and margin, for "
                "TracInCP (all, FG-Trac-selected and final checkpoints), Grad-Dot, Grad-Cos, influence functions "
                "(CG), TRAK (fgtrac's and dattri's) and the replay methods (step-exact TracIn, metagradients at the "
                "recorded run and at the subsets' centre).",
    run=datamodeling.lds_evaluation, table_markdown=datamodeling.table_markdown,
    # default: 300 training samples, 8 epochs (152 steps), 50 subsets per fraction: about 40 s
    presets={"default": {}, "large": {"n_train": 1000, "n_val": 300, "n_test": 100, "epochs": 20, "subsets": 100,
                                      "trak_dim": 256},
             "smoke": {"n_train": 60, "n_val": 40, "n_test": 8, "epochs": 2, "subsets": 6}},
    headline=lambda r: {"winners": r["winners"], "run": r["run"]})

GRAPH_LDS_STUDY = Study(
    name="lds_evaluation",
    description="The linear datamodeling score on the graph pipeline's GNN (trained with Adam): random subsets of "
                "the training ratings (half, and 90%) retrained in the recorded order and with fresh seeds; "
                "Spearman correlation per test rating between each method's summed scores and minus the "
                "retrained squared error, for TracInCP (all and FG-Trac-selected checkpoints), Grad-Dot and the "
                "replay methods (step-exact TracIn, metagradients through Adam).",
    run=datamodeling.graph_lds_evaluation, table_markdown=datamodeling.table_markdown,
    # default: the first users' 2,000 ratings (770 for training), 20 subsets per fraction: about 25 s
    presets={"default": {}, "large": {"limit": 6000, "subsets": 50, "n_test": 100, "epochs": 8},
             "smoke": {"limit": 800, "subsets": 6, "n_test": 8, "epochs": 2}},
    headline=lambda r: {"winners": r["winners"], "run": r["run"]})

# Evaluation assets per pipeline: each depends on the pipeline's preprocessed_samples, trains its own models on
# the bundled data and commits a table and a plot.
STUDIES: dict[str, list[Study]] = {"digits_cnn": [MISLABEL_STUDY, FINAL_MODEL_STUDY, LDS_STUDY],
                                   "multimodal_graph": [NOISY_RATING_STUDY, GRAPH_LDS_STUDY]}
