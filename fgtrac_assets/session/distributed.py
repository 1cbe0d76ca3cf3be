"""Sessions under torch.distributed: every rank's records go to rank 0, one event group per global step."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..tracing.groups import GroupLog
from ..tracing.steps import StepRow


@dataclass
class Share:
    """What one rank recorded: its sample names (group indices point into them), event groups and step rows."""

    names: list[str]
    log: GroupLog
    rows: list[StepRow]
    sampler: dict | None


def rank_and_size() -> tuple[int, int]:
    """Return (rank, world size) of this process (0, 1 outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(share: Share, world_size: int) -> list[Share]:
    """Return every rank's share on rank 0 (an empty list elsewhere); just this one outside torch.distributed."""
    if world_size == 1:
        return [share]
    import torch.distributed as dist

    out = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(share, out, dst=0)
    return out or []


def barrier(world_size: int) -> None:
    """Wait for every rank (nothing to wait for outside torch.distributed)."""
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def merge(shares: Sequence[Share]) -> tuple[list[str], GroupLog]:
    """Return the union of the ranks' names and one group log: a group per (kind, step, epoch), ranks in order."""
    if len(shares) == 1:
        return shares[0].names, shares[0].log
    index: dict[str, int] = {}
    merged: dict[tuple, dict] = {}
    for share in shares:
        remap = np.fromiter((index.setdefault(n, len(index)) for n in share.names), dtype=np.int64,
                            count=len(share.names))
        log = share.log
        for g in range(len(log.kind)):
            key = (log.kind[g], log.step[g], log.epoch[g])
            slot = merged.setdefault(key, {"lr": log.lr[g], "indices": [], "details": []})
            slot["indices"].append(remap[log.indices[g]])
            slot["details"].append(log.details[g])
    names = sorted(index, key=index.get)
    out = GroupLog()
    for (kind, step, epoch), slot in sorted(merged.items(), key=lambda kv: _order(kv[0])):
        details = slot["details"]
        joined = None
        if any(d is not None for d in details):
            import pyarrow as pa

            joined = pa.concat_arrays([d if d is not None else pa.nulls(len(i), pa.string())
                                       for d, i in zip(details, slot["indices"])])
        out.add(kind, np.concatenate(slot["indices"]), epoch=epoch, step=step, lr=slot["lr"], details=joined)
    return names, out


def _order(key: tuple) -> tuple:
    """Sort groups by step (unstepped `discarded` groups last, by epoch)."""
    kind, step, epoch = key
    return (step is None, step if step is not None else 0, epoch if epoch is not None else -1, kind)
