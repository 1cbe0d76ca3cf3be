"""What one stage hands the next: a small, picklable, typed reference to what it committed and signed.

A handle names a commit (its leaf range and root); what a later stage decides from is read back
from those signed rows (``Ledger.committed_rows``), not carried in the handle.
"""

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..ledger.artifacts import ArtifactFile, checked_path


@dataclass(frozen=True)
class ArtifactRef:
    """A committed artifact: path relative to FGTRAC_HOME and its sha256."""

    path: str
    sha256: str

    @classmethod
    def of(cls, art: ArtifactFile) -> "ArtifactRef":
        return cls(art.path, art.sha256)

    def open_checked(self, root: Path) -> Path:
        """Return the artifact's full path after checking its sha256 against the commitment."""
        return checked_path(root, self.path, self.sha256)

    def read_parquet(self, root: Path, columns: list[str] | None = None) -> pa.Table:
        """Return the artifact's Parquet table (those columns, default all) after checking its sha256."""
        return pq.read_table(self.open_checked(root), columns=columns)

    def load_torch(self, root: Path):
        """Return the artifact's torch-saved object (a state_dict), loaded on the CPU after checking its sha256."""
        from ..session.recorded_trace import load_checked

        return load_checked(root, self.path, self.sha256)


@dataclass(frozen=True)
class Handle:
    """The output of a stage: which pipeline/asset, the log root it committed, and its artifacts."""

    pipeline: str
    asset: str
    root_hex: str
    tree_size: int
    leaf_start: int
    leaf_count: int
    training_run: str | None = None
    artifacts: dict[str, ArtifactRef] = field(default_factory=dict)


@dataclass(frozen=True)
class GradientCacheHandle(Handle):
    """A gradient cache's commit, with the preprocessed samples it was taken from and its shard ('' = all)."""

    prepared: ArtifactRef | None = None
    shard: str = ""


@dataclass
class StageResult:
    """A stage's handle plus the metadata a user sees for it."""

    handle: Handle
    metadata: dict
    checkpoint: str
    checks: list = field(default_factory=list)
