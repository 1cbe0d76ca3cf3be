"""Column buffers of lifecycle events, the rows of the ledger's `events` table."""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa


@dataclass
class EventBuffer:
    """Column buffers of lifecycle events, ready to become one Arrow table."""

    columns: dict[str, list] = field(default_factory=lambda: {c: [] for c in EVENT_COLUMNS})

    def add(self, sample_ids: Sequence[str], kind: str, **values) -> None:
        """Append one event per sample id; scalar values repeat, sequences go one per sample."""
        n = len(sample_ids)
        self.columns["sample_id"].extend(sample_ids)
        self.columns["kind"].extend([kind] * n)
        for col in EVENT_COLUMNS:
            if col in ("sample_id", "kind"):
                continue
            v = values.get(col)
            if col == "detail" and v is not None and not isinstance(v, list):
                v = json.dumps(v, sort_keys=True)
            if isinstance(v, list):
                if len(v) != n:
                    raise ValueError(f"{col}: {len(v)} values for {n} samples")
                if col == "detail":
                    v = [None if d is None else (d if isinstance(d, str) else json.dumps(d, sort_keys=True)) for d in v]
                self.columns[col].extend(v)
            else:
                self.columns[col].extend([v] * n)

    def __len__(self) -> int:
        return len(self.columns["sample_id"])

    def to_arrow(self, **constant) -> pa.Table:
        """Return the events as an Arrow table, with constant columns (pipeline, run_id, ...) filled in."""
        n = len(self)
        cols = dict(self.columns)
        for k, v in constant.items():
            cols[k] = [v] * n
        return pa.table(cols)


EVENT_COLUMNS = ["sample_id", "kind", "training_run", "epoch", "step", "position", "lr", "checkpoint_id", "detail"]
