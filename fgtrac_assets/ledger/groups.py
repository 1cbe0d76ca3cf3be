"""Event groups: one log leaf for many events that differ only in sample, position and detail.

A training step touches every sample of its batch; a leaf per sample-step made the log's
work (canonical JSON, two SHA-256, a tile append, a wide indexed insert) dominate small
models' training time.  An `event_groups` row instead stands for a run of members: the
columns they share (kind, run, epoch, step, lr, ...) plus ``first_position``, ``size``
and ``members``, the hex SHA-256 of their *members bytes* (format in
integrity/members.py: lengths and UTF-8 of the sample ids, then of the details, column by
column), which are slices of the Arrow buffers: sealing is one hash pass per group, with
no per-member encoding.

Members are `group_members` rows (leaf_index of their group, position, 8-byte sample key,
detail) and `sample_keys` maps keys to ids; the `events` view joins them back into
ordinary event rows, so audits and views read them as before.  ``fgtrac verify``
rebuilds each group's members bytes from those rows; a member receipt carries the bytes
beside the group leaf's inclusion receipt, so a third party re-hashes them and reads the
sample at its index.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa

from ..integrity.members import MAGIC as MEMBERS_MAGIC
from ..integrity.members import NULL_LENGTH as _NULL_LENGTH

#: the columns a group's members share with it (besides the commit's pipeline/run_id/asset)
SHARED = ("kind", "training_run", "epoch", "step", "lr", "checkpoint_id")
#: a group holds at most this many members (bigger batches become several groups): bounds a receipt's size
GROUP_LIMIT = 1024


def _column_bytes(strings: pa.Array) -> tuple[memoryview, np.ndarray, memoryview]:
    """Return a string array's u32 big-endian lengths (0xFFFFFFFF for nulls) as bytes, its 64-bit offsets and UTF-8 data."""
    strings = _large(strings)
    n = len(strings)
    if strings.null_count == n:
        return memoryview(np.full(n, _NULL_LENGTH, dtype=">u4").tobytes()), np.zeros(n + 1, np.int64), memoryview(b"")
    _, offsets, data = strings.buffers()
    off = np.frombuffer(offsets, dtype=np.int64, count=n + 1, offset=strings.offset * 8)
    lengths = np.diff(off).astype(">u4")
    if strings.null_count:
        lengths[strings.is_null().to_numpy(zero_copy_only=False)] = _NULL_LENGTH
    return memoryview(lengths.tobytes()), off, memoryview(data)


def _large(strings: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Return one large_string array (64-bit offsets), so that slices share its buffers."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    return strings.cast(pa.large_string()) if strings.type != pa.large_string() else strings


def members_digests(sample_ids: pa.Array, details: pa.Array, bounds: Sequence[int]) -> list[str]:
    """Return the hex SHA-256 of the members bytes of each run [bounds[g], bounds[g+1]) of these columns."""
    columns = (_column_bytes(sample_ids), _column_bytes(details))
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        h = hashlib.sha256(MEMBERS_MAGIC + (b - a).to_bytes(4, "big"))
        for lengths, off, data in columns:
            h.update(lengths[4 * a:4 * b])
            h.update(data[off[a]:off[b]])
        out.append(h.hexdigest())
    return out


def members_bytes(sample_ids: pa.Array, details: pa.Array) -> bytes:
    """Return the members bytes (fgtrac/members/v1) of these (sample_id, detail) columns."""
    parts = [bytes(p) for lengths, off, data in map(_column_bytes, (sample_ids, details))
             for p in (lengths, data[off[0]:off[-1]])]
    return MEMBERS_MAGIC + len(sample_ids).to_bytes(4, "big") + b"".join(parts)


@dataclass
class EventGroups:
    """Groups of events before commit: one row per group; per member its group, sample (an index into
    sample_ids), position and detail, members in group order."""

    groups: pa.Table        # SHARED columns, first_position
    sample_ids: pa.Array    # the ids members point into (a training run's samples)
    member_group: np.ndarray
    member_sample: np.ndarray
    position: np.ndarray
    detail: pa.Array

    @property
    def num_members(self) -> int:
        return len(self.member_group)

    def member_ids(self) -> pa.Array:
        """Return each member's sample id."""
        return self.sample_ids.take(pa.array(self.member_sample))

    def seal(self, **constant) -> pa.Table:
        """Return the event_groups rows, with the commit's constant columns, each group's size and members digest."""
        sizes = np.bincount(self.member_group, minlength=self.groups.num_rows)
        digests = members_digests(self.member_ids(), self.detail, np.concatenate([[0], np.cumsum(sizes)]).tolist())
        n = self.groups.num_rows
        cols = {c: self.groups.column(c) for c in self.groups.column_names}
        cols.update({k: pa.array([v] * n, pa.string()) for k, v in constant.items()})
        cols.update(size=pa.array(sizes, pa.int64()), members=pa.array(digests, pa.string()))
        return pa.table(cols)

    def member_rows(self, group_leaf: np.ndarray, sample_key: np.ndarray) -> pa.Table:
        """Return the group_members rows, given each group's leaf index and each sample's key."""
        return pa.table({"leaf_index": pa.array(group_leaf[self.member_group]),
                         "position": pa.array(self.position),
                         "sample_key": pa.array(sample_key[self.member_sample]),
                         "detail": self.detail})

    def events(self) -> pa.Table:
        """Return the members as rows of the `events` columns (group columns repeated; no pipeline/run/asset)."""
        shared = self.groups.select(list(SHARED)).take(pa.array(self.member_group))
        return pa.table({"sample_id": self.member_ids(), "position": pa.array(self.position), "detail": self.detail,
                         **{c: shared.column(c) for c in SHARED}})


@dataclass
class GroupLog:
    """Groups as they are recorded: per group its shared columns and its members (indices into the sample ids)."""

    kind: list[str] = field(default_factory=list)
    epoch: list[int | None] = field(default_factory=list)
    step: list[int | None] = field(default_factory=list)
    lr: list[float | None] = field(default_factory=list)
    checkpoint_id: list[str | None] = field(default_factory=list)
    indices: list[np.ndarray] = field(default_factory=list)
    details: list[pa.Array | None] = field(default_factory=list)

    def add(self, kind: str, indices: np.ndarray, epoch: int | None = None, step: int | None = None,
            lr: float | None = None, checkpoint_id: str | None = None, details: pa.Array | None = None) -> None:
        """Record one group: an event of `kind` for each sample at these indices (details: one string each)."""
        if details is not None and len(details) != len(indices):
            raise ValueError(f"{kind}: {len(details)} details for {len(indices)} samples")
        for name, value in (("kind", kind), ("epoch", epoch), ("step", step), ("lr", lr),
                            ("checkpoint_id", checkpoint_id), ("indices", indices), ("details", details)):
            getattr(self, name).append(value)

    def __len__(self) -> int:
        return sum(len(i) for i in self.indices)

    def build(self, training_run: str, sample_ids: pa.Array) -> EventGroups:
        """Return the recorded groups over these sample ids, ready for Ledger.commit."""
        return build_groups(self.kind, training_run, self.epoch, self.step, self.lr, self.indices, sample_ids,
                            self.details, self.checkpoint_id)


def build_groups(kind: Sequence[str], training_run: str, epoch: Sequence[int | None], step: Sequence[int | None],
                 lr: Sequence[float | None], indices: Sequence[np.ndarray], sample_ids: pa.Array,
                 details: Sequence[pa.Array | None] | None = None, checkpoint_id: Sequence[str | None] | None = None,
                 limit: int = GROUP_LIMIT) -> EventGroups:
    """Return the groups of recorded batches: batch g holds sample_ids[indices[g]] (split every `limit` members)."""
    rows: dict[str, list] = {c: [] for c in (*SHARED, "first_position")}
    member_group, member_sample, positions, member_details = [], [], [], []
    for g, idx in enumerate(indices):
        idx = np.asarray(idx, dtype=np.int64)
        for a in range(0, max(len(idx), 1), limit):
            chunk = idx[a:a + limit]
            number = len(rows["kind"])
            for col, v in (("kind", kind[g]), ("training_run", training_run), ("epoch", epoch[g]), ("step", step[g]),
                           ("lr", lr[g]), ("checkpoint_id", None if checkpoint_id is None else checkpoint_id[g]),
                           ("first_position", a)):
                rows[col].append(v)
            member_group.append(np.full(len(chunk), number, dtype=np.int64))
            member_sample.append(chunk)
            positions.append(np.arange(a, a + len(chunk), dtype=np.int64))
            d = None if details is None else details[g]
            member_details.append(len(chunk) if d is None else d.slice(a, len(chunk)).cast(pa.string()))
    types = {"kind": pa.string(), "training_run": pa.string(), "epoch": pa.int64(), "step": pa.int64(),
             "lr": pa.float64(), "checkpoint_id": pa.string(), "first_position": pa.int64()}
    empty = np.zeros(0, dtype=np.int64)
    return EventGroups(
        groups=pa.table({c: pa.array(rows[c], t) for c, t in types.items()}),
        sample_ids=sample_ids,
        member_group=np.concatenate(member_group) if member_group else empty,
        member_sample=np.concatenate(member_sample) if member_sample else empty,
        position=np.concatenate(positions) if positions else empty,
        detail=_concat_details(member_details))


def _concat_details(parts: list[pa.Array | int]) -> pa.Array:
    """Return the details of all members: arrays as given, an int n for n members without details."""
    if all(isinstance(p, int) for p in parts):
        return pa.nulls(sum(parts), pa.string())
    return pa.concat_arrays([pa.nulls(p, pa.string()) if isinstance(p, int) else p for p in parts])


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
    return members_bytes(rows.column("sample_id").combine_chunks(), rows.column("detail").combine_chunks())


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
    digests = members_digests(ids, details, bounds)[::2]  # runs (a, b) of each complete group; the gaps between skipped
    for ((leaf, digest, asset), _, _), got in zip(complete, digests):
        if got != digest:
            problems.append((leaf, "a member's sample or detail differs from the logged group (row changed)",
                             asset, None))
    return sorted(problems, key=lambda p: p[0])


def member_count(con: duckdb.DuckDBPyConnection) -> int:
    """Return how many events are group members."""
    return con.execute("SELECT count(*) FROM group_members").fetchall()[0][0]
