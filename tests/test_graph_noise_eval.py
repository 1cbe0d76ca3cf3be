"""Issue #6: self-influence on the graph model surfaces injected noisy ratings (5% flipped to 5.5 - rating).

Measured (limit 6000 = 4,040 training ratings, 8 epochs, seeds 0/1/2, 2-core machine, ~2 s a seed):
TracInCP over all checkpoints found 35% / 34% / 30% of the noisy ratings in the top 10% (random: 10%),
51% / 50% / 50% in the top 20%, AUROC 0.735 / 0.716 / 0.713.  Thresholds below leave ~0.06 AUROC of margin.
"""

import pytest

from fgtrac_assets.assets.configs import SelectionConfig
from fgtrac_assets.attribution import select_checkpoints
from fgtrac_assets.studies.graph_noise import noisy_rating_evaluation

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def runs():
    return {seed: noisy_rating_evaluation(seed=seed) for seed in SEEDS}


def by_method(result) -> dict:
    return {row["method"]: row for row in result["table"]}


def test_noise_is_injected_as_specified(runs):
    for seed, r in runs.items():
        run = r["run"]
        assert run["noisy_ratings"] == round(0.05 * run["train_ratings"]) > 100, seed
        assert 0 < run["noisy_change_at_least_2"] < run["noisy_ratings"]
        assert len(run["val_losses"]) == 8 and len(run["fgtrac_checkpoints"]) <= 3
        # the `tracincp_fgtrac` row uses the rule the selected_checkpoints asset uses by default
        asset_rule = select_checkpoints(run["val_losses"], **SelectionConfig().model_dump())
        assert by_method(r)["tracincp_fgtrac"]["checkpoints"] == run["fgtrac_checkpoints"] == asset_rule, seed
    # a different seed flips other ratings: the figures are not one run copied three times
    assert len({by_method(r)["tracincp_all"]["auroc"] for r in runs.values()}) == len(SEEDS)


@pytest.mark.parametrize("seed", SEEDS)
def test_self_influence_ranks_noisy_ratings_well_above_random(runs, seed):
    rows = by_method(runs[seed])
    tracin, rand = rows["tracincp_all"], rows["random"]
    assert tracin["auroc"] >= 0.65, rows
    assert tracin["found_10"] >= 0.25 and tracin["found_20"] >= 0.40, tracin  # random finds ~0.10 and ~0.20
    assert rows["tracincp_fgtrac"]["auroc"] >= 0.65  # the pipeline's own checkpoint selection
    assert abs(rand["auroc"] - 0.5) < 0.1
    for row in rows.values():
        found = [row[f"found_{p}"] for p in (5, 10, 20, 30)]
        assert found == sorted(found) and all(0 <= f <= 1 for f in found), row["method"]
