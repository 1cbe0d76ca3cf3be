"""Event groups in the ledger: sealed into one log leaf each, their members stored, and verified.

Groups are recorded in tracing/groups.py; ``Ledger.commit`` seals each into an
`event_groups` row: the columns its members share (kind, run, epoch, step, lr, ...) plus
``first_position``, ``size`` and ``members``, the hex SHA-256 of their *members bytes*
(format in integrity/members.py: lengths and UTF-8 of the sample ids, then of the details,
column by column), which are slices of the Arrow buffers: sealing is one hash pass per
group, with no per-member encoding.

Members are `group_members` rows (leaf_index of their group, position, 8-byte sample key,
detail) and `sample_keys` maps keys to ids; the `events` view joins them back into
ordinary event rows, so audits and views read them as before.  ``fgtrac verify``
rebuilds each group's members bytes from those rows; a member receipt carries the bytes
beside the group leaf's inclusion receipt, so a third party re-hashes them and reads the
sample at its index.
"""

from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa

from ..integrity.members import StringColumn, members_bytes, members_digests


class RecordedGroups(Protocol):
    """Event groups as recorded (tracing.groups.EventGroups): what Ledger.commit seals and stores."""

    groups: pa.Table        # per group: kind, training_run, epoch, step, lr, checkpoint_id, first_position
    sample_ids: pa.Array    # the ids members point into
    member_group: np.ndarray
    member_sample: np.ndarray
    position: np.ndarray
    detail: pa.Array

    @property
    def num_members(self) -> int:
        """The number of members over all groups."""

    def member_ids(self) -> pa.Array:
        """Return each member's sample id."""


def arrow_strings(strings: pa.Array | pa.ChunkedArray) -> StringColumn:
    """Return a string array as the members encoder's buffers, sharing Arrow's offsets and data (no copy)."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    if strings.type != pa.large_string():  # 64-bit offsets, so that slices share its buffers
        strings = strings.cast(pa.large_string())
    n = len(strings)
    if strings.null_count == n:
        return StringColumn(np.zeros(n + 1, np.int64), b"", np.ones(n, dtype=bool))
    _, offsets, data = strings.buffers()
    off = np.frombuffer(offsets, dtype=np.int64, count=n + 1, offset=strings.offset * 8)
    nulls = strings.is_null().to_numpy(zero_copy_only=False) if strings.null_count else None
    return StringColumn(off, data if data is not None else b"", nulls)


def seal_groups(groups: RecordedGroups, **constant) -> pa.Table:
    """Return the event_groups rows, with the commit's constant columns, each group's size and members digest."""
    sizes = np.bincount(groups.member_group, minlength=groups.groups.num_rows)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    digests = members_digests(arrow_strings(groups.member_ids()), arrow_strings(groups.detail), bounds)
    n = groups.groups.num_rows
    cols = {c: groups.groups.column(c) for c in groups.groups.column_names}
    cols.update({k: pa.array([v] * n, pa.string()) for k, v in constant.items()})
    cols.update(size=pa.array(sizes, pa.int64()), members=pa.array(digests, pa.string()))
    return pa.table(cols)


def member_rows(groups: RecordedGroups, group_leaf: np.ndarray, sample_key: np.ndarray) -> pa.Table:
    """Return the group_members rows, given each group's leaf index and each sample's key."""
    return pa.table({"leaf_index": pa.array(group_leaf[groups.member_group]),
                     "position": pa.array(groups.position),
                     "sample_key": pa.array(sample_key[groups.member_sample]),
                     "detail": groups.detail})


def sample_keys(con: duckdb.DuckDBPyConnection, sample_ids: pa.Array) -> np.ndarray:
    """Return the sample_keys key of each id, adding the ids not seen before (inside the caller's transaction)."""
    con.register("_fgtrac_ids", pa.table({"i": pa.array(np.arange(len(sample_ids))), "sample_id": sample_ids}))
    try:
        con.execute("""INSERT INTO sample_keys
                       SELECT (SELECT coalesce(max(sample_key) + 1, 0) FROM sample_keys) + row_number() OVER (ORDER BY sample_id) - 1,
                              sample_id
                       FROM (SELECT DISTINCT sample_id FROM _fgtrac_ids) n
                       WHERE NOT EXISTS (SELECT 1 FROM sample_keys k WHERE k.sample_id = n.sample_id)""")
        keys = con.sql("SELECT k.sample_key FROM _fgtrac_ids i JOIN sample_keys k USING (sample_id) ORDER BY i.i")
        out = keys.to_arrow_table().column(0).to_numpy()
    finally:
        con.unregister("_fgtrac_ids")
    if len(out) != len(sample_ids):
        raise ValueError("a sample id is null: every grouped event needs a sample")
    return out


def group_members_bytes(con: duckdb.DuckDBPyConnection, leaf_index: int) -> bytes:
    """Return the members bytes of the group at a leaf, rebuilt from its member rows."""
    rows = con.sql("SELECT k.sample_id, m.detail FROM group_members m JOIN sample_keys k USING (sample_key) "
                   "WHERE m.leaf_index = ? ORDER BY m.position", params=[leaf_index]).to_arrow_table()
    return members_bytes(arrow_strings(rows.column("sample_id")), arrow_strings(rows.column("detail")))


def group_problems(con: duckdb.DuckDBPyConnection) -> list[tuple[int, str, str | None, str | None]]:
    """Return (leaf_index, problem, asset, sample) for every group its member rows no longer give exactly."""
    problems = []
    for leaf, count in con.execute("SELECT leaf_index, count(*) FROM group_members m WHERE NOT EXISTS "
                                   "(SELECT 1 FROM event_groups g WHERE g.leaf_index = m.leaf_index) "
                                   "GROUP BY ALL ORDER BY 1").fetchall():
        problems.append((leaf, f"{count} member row(s) of no logged group (rows added)", None, None))
    for leaf, key in con.execute("SELECT leaf_index, sample_key FROM group_members m WHERE NOT EXISTS "
                                 "(SELECT 1 FROM sample_keys k WHERE k.sample_key = m.sample_key) ORDER BY 1").fetchall():
        problems.append((leaf, f"a member's sample key {key} names no sample (sample_keys row deleted)", None, None))
    groups = con.execute("SELECT leaf_index, first_position, size, members, asset FROM event_groups "
                         "ORDER BY leaf_index").fetchall()
    members = con.sql("SELECT m.leaf_index, k.sample_id, m.detail, m.position FROM group_members m "
                      "LEFT JOIN sample_keys k USING (sample_key) ORDER BY m.leaf_index, m.position").to_arrow_table()
    leaf_of = members.column("leaf_index").to_numpy()
    positions = members.column("position").to_numpy()
    firsts = [g[0] for g in groups]
    starts = np.searchsorted(leaf_of, firsts, side="left").tolist()
    ends = np.searchsorted(leaf_of, firsts, side="right").tolist()
    complete = []  # (group, a, b) whose count and positions hold: their digests are checked together
    for (leaf, first, size, digest, asset), a, b in zip(groups, starts, ends):
        if b - a != size:
            problems.append((leaf, f"the group logged {size} members but {b - a} rows hold it (member rows "
                                   f"{'deleted' if b - a < size else 'added'})", asset, None))
        elif not np.array_equal(positions[a:b], np.arange(first, first + size)):
            problems.append((leaf, "member positions differ from the logged group (row changed)", asset, None))
        else:
            complete.append(((leaf, digest, asset), a, b))
    bounds = [x for _, a, b in complete for x in (a, b)]
    ids, details = members.column("sample_id"), members.column("detail")
    # runs (a, b) of each complete group; the gaps between them skipped
    digests = members_digests(arrow_strings(ids), arrow_strings(details), bounds)[::2]
    for ((leaf, digest, asset), _, _), got in zip(complete, digests):
        if got != digest:
            problems.append((leaf, "a member's sample or detail differs from the logged group (row changed)",
                             asset, None))
    return sorted(problems, key=lambda p: p[0])


def member_count(con: duckdb.DuckDBPyConnection) -> int:
    """Return how many events are group members."""
    return con.execute("SELECT count(*) FROM group_members").fetchall()[0][0]
