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


ORDER_KIND = "dataset_order"


def write_dataset_order(ledger, pipeline: str, run: str, ids: list[str]):
    """Write the dataset's sample ids in index order (what a DistributedSampler's indices point into)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..ledger.artifacts import write_artifact

    rel = f"artifacts/{pipeline}/runs/{run}/dataset_order.parquet"
    table = pa.table({"sample_id": pa.array(ids, pa.string())})
    return write_artifact(ledger.ensure_home().root, rel, ORDER_KIND, lambda p: pq.write_table(table, p))


def check_assignment(ledger, run: str) -> list[str]:
    """Return how the recorded batches of a DDP run differ from what its DistributedSampler gives each rank.

    For each recorded epoch the sampler's permutation is recomputed from the recorded seed, shuffle, drop_last,
    world size and set_epoch value, and each rank's share (in order) is compared with the members recorded for
    that rank, padding flags included. An empty list: every rank trained on exactly its share.
    """
    import json

    import pyarrow.parquet as pq
    from torch.utils.data.distributed import DistributedSampler

    from ..ledger.artifacts import check_artifact

    with ledger.reader() as con:
        meta = con.execute("SELECT sampler, world_size FROM training_runs WHERE training_run = ?", [run]).fetchall()
        order = con.execute("SELECT path, sha256 FROM artifacts WHERE training_run = ? AND kind = ?",
                            [run, ORDER_KIND]).fetchall()
        events = con.execute("SELECT epoch, sample_id, detail FROM events WHERE training_run = ? "
                             "AND kind IN ('batched', 'skipped', 'discarded') ORDER BY leaf_index, position",
                             [run]).fetchall()
    if not meta:
        return [f"training run {run}: no recorded sampler"]
    sampler, world = json.loads(meta[0][0]), meta[0][1]
    if sampler.get("class") != "DistributedSampler":
        return [f"training run {run}: not recorded with a DistributedSampler ({sampler.get('class')})"]
    if not order or (why := check_artifact(ledger.home.root, order[0][0], order[0][1])):
        return [f"training run {run}: dataset order {'missing' if not order else why}"]
    ids = pq.read_table(ledger.home.root / order[0][0]).column("sample_id").to_pylist()
    recorded: dict[tuple[int, int], list[tuple[str, bool]]] = {}
    for epoch, sid, detail in events:
        d = json.loads(detail) if detail else {}
        recorded.setdefault((epoch, d.get("rank", 0)), []).append((sid, bool(d.get("padding"))))
    problems = []
    size = sampler["dataset_size"]
    for e, set_epoch in enumerate(sampler["epochs"]):
        for rank in range(world):
            s = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=sampler["shuffle"],
                                   seed=sampler["seed"], drop_last=sampler["drop_last"])
            s.set_epoch(set_epoch)
            expected = [(ids[i], not s.drop_last and rank + n * world >= size) for n, i in enumerate(s)]
            got = recorded.get((e, rank), [])
            if got != expected:
                first = next((n for n, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                problems.append(f"epoch {e} (set_epoch {set_epoch}) rank {rank}: recorded {len(got)} items, the "
                                f"sampler gives {len(expected)}; first difference at item {first}")
    return problems


def _order(key: tuple) -> tuple:
    """Sort groups by step (unstepped `discarded` groups last, by epoch)."""
    kind, step, epoch = key
    return (step is None, step if step is not None else 0, epoch if epoch is not None else -1, kind)
