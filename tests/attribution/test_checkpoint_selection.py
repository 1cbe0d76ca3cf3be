"""FG-Trac checkpoint selection rule."""

import math

import pytest

from fgtrac_assets.attribution import select_checkpoints


def test_largest_relative_improvements_plus_last():
    losses = [2.0, 1.0, 0.9, 0.5, 0.49, 0.48, 0.47]
    # improvements over previous best: 1: 50%, 2: 10%, 3: 44%, 4..6: ~2% (< 5%)
    assert select_checkpoints(losses, max_checkpoints=3) == [1, 3, 6]
    assert select_checkpoints(losses, max_checkpoints=4) == [1, 2, 3, 6]
    assert select_checkpoints(losses, max_checkpoints=3, always_keep_last=False) == [1, 2, 3]


def test_improvement_is_relative_to_previous_best():
    # checkpoint 2 is worse; checkpoint 3 improves 40% on 1.5 but only 10% on the best so far (1.0)
    losses = [2.0, 1.0, 1.5, 0.9, 0.89]
    assert select_checkpoints(losses, min_rel_improvement=0.3, max_checkpoints=2, always_keep_last=False) == [1, 4]
    assert select_checkpoints(losses, min_rel_improvement=0.05, max_checkpoints=2, always_keep_last=False) == [1, 3]


def test_always_keep_last_even_without_improvement():
    losses = [1.0, 0.5, 0.6, 0.7]  # overfits: the last checkpoint is the worst
    assert 3 in select_checkpoints(losses, max_checkpoints=2)
    assert select_checkpoints(losses, max_checkpoints=1) == [3]
    assert select_checkpoints(losses, max_checkpoints=1, always_keep_last=False) == [1]


def test_fill_spreads_evenly():
    flat = [1.0] * 11  # nothing qualifies
    assert select_checkpoints(flat, max_checkpoints=3) == [0, 5, 10]
    assert select_checkpoints(flat, max_checkpoints=3, always_keep_last=False) == [0, 5, 10]
    assert select_checkpoints(flat, max_checkpoints=2, always_keep_last=False) == [0, 10]
    # one qualifier (index 8) + last; one free slot goes as far as possible from both
    losses = [1.0] * 8 + [0.5, 0.5, 0.5]
    assert select_checkpoints(losses, max_checkpoints=3) == [0, 8, 10]


def test_edge_cases_and_determinism():
    assert select_checkpoints([]) == []
    assert select_checkpoints([0.3]) == [0]
    assert select_checkpoints([0.3, 0.1], max_checkpoints=5) == [0, 1]
    losses = [3.0, math.nan, 2.0, 2.0, 1.0]  # NaN never qualifies; 2 and 4 do; fill adds 0
    first = select_checkpoints(losses)
    assert first == [0, 2, 4]
    assert all(select_checkpoints(tuple(losses)) == first for _ in range(5))
    with pytest.raises(ValueError):
        select_checkpoints([1.0], max_checkpoints=0)
    with pytest.raises(ValueError):
        select_checkpoints([1.0], min_rel_improvement=-0.1)
