"""FG-Trac checkpoint selection rule, and its one set of defaults."""

import dataclasses
import functools
import inspect
import math

import pytest

from fgtrac_assets.attribution import SelectionRule, select_checkpoints

# The rule's mechanics over all of training (consider_from=0); the default window is tested below.
whole = functools.partial(select_checkpoints, consider_from=0.0)


def test_largest_relative_improvements_plus_last():
    losses = [2.0, 1.0, 0.9, 0.5, 0.49, 0.48, 0.47]
    # improvements over previous best: 1: 50%, 2: 10%, 3: 44%, 4..6: ~2% (< 5%)
    assert whole(losses, max_checkpoints=3) == [1, 3, 6]
    assert whole(losses, max_checkpoints=4) == [1, 2, 3, 6]
    assert whole(losses, max_checkpoints=3, always_keep_last=False) == [1, 2, 3]


def test_improvement_is_relative_to_previous_best():
    # checkpoint 2 is worse; checkpoint 3 improves 40% on 1.5 but only 10% on the best so far (1.0)
    losses = [2.0, 1.0, 1.5, 0.9, 0.89]
    assert whole(losses, min_rel_improvement=0.3, max_checkpoints=2, always_keep_last=False) == [1, 4]
    assert whole(losses, min_rel_improvement=0.05, max_checkpoints=2, always_keep_last=False) == [1, 3]


def test_always_keep_last_even_without_improvement():
    losses = [1.0, 0.5, 0.6, 0.7]  # overfits: the last checkpoint is the worst
    assert 3 in whole(losses, max_checkpoints=2)
    assert whole(losses, max_checkpoints=1) == [3]
    assert whole(losses, max_checkpoints=1, always_keep_last=False) == [1]


def test_fill_spreads_evenly():
    flat = [1.0] * 11  # nothing qualifies
    assert whole(flat, max_checkpoints=3) == [0, 5, 10]
    assert whole(flat, max_checkpoints=3, always_keep_last=False) == [0, 5, 10]
    assert whole(flat, max_checkpoints=2, always_keep_last=False) == [0, 10]
    # one qualifier (index 8) + last; one free slot goes as far as possible from both
    losses = [1.0] * 8 + [0.5, 0.5, 0.5]
    assert whole(losses, max_checkpoints=3) == [0, 8, 10]


def test_edge_cases_and_determinism():
    assert whole([]) == []
    assert whole([0.3]) == [0]
    assert whole([0.3, 0.1], max_checkpoints=5) == [0, 1]
    losses = [3.0, math.nan, 2.0, 2.0, 1.0]  # NaN never qualifies; 2 and 4 do; fill adds 0
    first = whole(losses)
    assert first == [0, 2, 4]
    assert all(whole(tuple(losses)) == first for _ in range(5))
    with pytest.raises(ValueError):
        whole([1.0], max_checkpoints=0)
    with pytest.raises(ValueError):
        whole([1.0], min_rel_improvement=-0.1)


def test_consider_from_applies_the_rule_to_the_late_window():
    losses = [2.0, 1.0, 0.6, 0.59, 0.58, 0.57, 0.56, 0.50, 0.45, 0.44]
    # over all of training the big early drops win; by default only the second half (5..9) competes
    assert whole(losses) == [1, 2, 9]
    assert select_checkpoints(losses) == [7, 8, 9] == select_checkpoints(losses, consider_from=0.5)
    assert select_checkpoints(losses, consider_from=0.8) == [8, 9]
    with pytest.raises(ValueError):
        select_checkpoints(losses, consider_from=1.0)


def test_one_default_for_the_asset_the_stage_and_the_studies():
    """The asset's config, the plain stage and the studies' `fgtrac` rule select what select_checkpoints does."""
    from fgtrac_assets.assets.configs import SelectionConfig
    from fgtrac_assets.pipelines import stages
    from fgtrac_assets.studies import mislabel as mislabel_eval

    losses = [2.0, 1.0, 0.6, 0.59, 0.58, 0.57, 0.56, 0.50, 0.45, 0.44]
    config = SelectionConfig()
    asset_rule = dict(config.model_dump())
    assert select_checkpoints(losses) == select_checkpoints(losses, **asset_rule) == [7, 8, 9]
    assert mislabel_eval._fgtrac(losses) == select_checkpoints(losses, **asset_rule)
    assert config.settings(None) == SelectionRule() and dataclasses.asdict(SelectionRule()) == asset_rule
    assert inspect.signature(stages.select).parameters["rule"].default == SelectionRule()
    assert SelectionRule(consider_from=0.0).select(losses) == whole(losses)
