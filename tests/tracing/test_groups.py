"""Recording event groups: batches become groups of at most GROUP_LIMIT members, with positions and details."""

import numpy as np
import pyarrow as pa
import pytest

from fgtrac_assets.tracing.groups import GroupLog, build_groups

IDS = [f"s{i:03d}" for i in range(300)]


def test_a_batch_larger_than_the_limit_becomes_consecutive_groups():
    g = build_groups(["batched"], "run", [0], [5], [0.1], [np.arange(250)], pa.array(IDS), limit=100)
    assert g.groups.column("first_position").to_pylist() == [0, 100, 200]
    assert np.array_equal(g.position, np.arange(250))
    assert np.bincount(g.member_group).tolist() == [100, 100, 50]
    assert g.events().column("sample_id").to_pylist() == IDS[:250]


def test_group_log_keeps_shared_columns_and_details():
    log = GroupLog()
    log.add("batched", np.array([3, 1]), epoch=0, step=0, lr=0.5)
    log.add("gradient", np.array([2]), lr=0.1, checkpoint_id="c", details=pa.array(['{"n": 1}']))
    assert len(log) == 3
    g = log.build("run", pa.array(IDS))
    assert g.num_members == 3 and g.member_ids().to_pylist() == ["s003", "s001", "s002"]
    assert g.groups.column("checkpoint_id").to_pylist() == [None, "c"]
    assert g.detail.to_pylist() == [None, None, '{"n": 1}']
    with pytest.raises(ValueError, match="2 details for 1 samples"):
        log.add("gradient", np.array([0]), details=pa.array(["a", "b"]))
