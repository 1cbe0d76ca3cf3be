"""Event groups as they are recorded: one group for many events that differ only in sample, position and detail.

A training step touches every sample of its batch; a log leaf per sample-step would make the
log's work dominate small models' training time.  So a step (or a role recorded for the whole
run) is one group: the columns its members share (kind, run, epoch, step, lr, checkpoint) and,
per member, an index into the run's sample ids, a position and an optional detail.  Recording
appends arrays; :meth:`GroupLog.build` turns them into :class:`EventGroups` column-wise, which
``Ledger.commit`` seals into one leaf per group (ledger/groups.py) with the members bytes of
integrity/members.py.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

#: the columns a group's members share with it (besides the commit's pipeline/run_id/asset)
SHARED = ("kind", "training_run", "epoch", "step", "lr", "checkpoint_id")
#: a group holds at most this many members (bigger batches become several groups): bounds a receipt's size
GROUP_LIMIT = 1024


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
        """The number of members over all groups."""
        return len(self.member_group)

    def member_ids(self) -> pa.Array:
        """Return each member's sample id."""
        return self.sample_ids.take(pa.array(self.member_sample))

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

    def trained_indices(self) -> np.ndarray:
        """Return the sorted distinct sample indices of the `batched` groups (what some step trained on)."""
        used = [i for k, i in zip(self.kind, self.indices) if k == "batched"]
        return np.unique(np.concatenate(used)) if used else np.zeros(0, dtype=np.int64)

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
