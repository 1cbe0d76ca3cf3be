"""Deterministic train/val/test and shard assignment from a sample's id."""

import hashlib

SPLITS = ("train", "val", "test")


def split_of(sample_id: str, val_fraction: float = 0.15, test_fraction: float = 0.15) -> str:
    """Return the split of a sample: a pure function of its id, stable as data is added."""
    u = int(sample_id[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def shard_of(sample_id: str, shards: int) -> int:
    """Return the shard (0..shards-1) a training sample's influence is computed in: a pure function of its id."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") % shards
