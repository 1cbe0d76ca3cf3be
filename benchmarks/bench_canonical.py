"""Time the column-wise RFC 8785 leaf encoder against rfc8785.dumps (not a test; prints a table).

    python benchmarks/bench_canonical.py [--rows 1000000] [--ref-rows 100000] [--rounds 3]

Rows are shaped like the ledger's ``events`` table: a 64-hex sample_id, a pipeline, a
run_id UUID, asset, kind, training_run, epoch/step/position ints, a cosine-schedule lr
(full-precision float, one value per step), a checkpoint_id that is mostly None, and a
detail that is mostly None or a short JSON string (which needs escaping).

* rfc8785.dumps: ``rfc8785.dumps({"table": "events", **row})`` per row on the first
  ``--ref-rows`` rows, extrapolated to ``--rows`` (it is linear).
* encode_rows (lists): ``encode_rows`` over Python lists, one per column.
* encode_arrow_rows (arrow): the same from a pyarrow Table's columns (ledger/leaves.py: to_pylist, or a
  dictionary for few-valued strings).
* sha256 leaf hashes: ``sha256(0x00 || leaf)`` over every leaf (RFC 6962 leaf hash).

Times are the best of ``--rounds`` runs, since background load only ever adds time; both
wall-clock and process CPU time are shown (on a shared, busy machine the CPU time is the
steadier measure of the code itself).  The encoder's output is checked byte for byte
against rfc8785 on the reference rows, and the Arrow-input leaves against the list ones.
"""

import argparse
import gc
import hashlib
import math
import os
import random
import time
import uuid

import pyarrow as pa
import rfc8785

from fgtrac_assets.integrity.fast_canonical import encode_rows
from fgtrac_assets.ledger.leaves import encode_arrow_rows
from fgtrac_assets.ledger.schema import LEAF_TABLES

COLUMNS = [c for c, _ in LEAF_TABLES["events"]]


def events(n: int, seed: int = 0) -> dict[str, list]:
    """Return n synthetic events rows as columns."""
    rnd = random.Random(seed)
    batch, per_epoch = 64, 50_000
    steps_per_epoch = per_epoch // batch + 1
    total_steps = max(1, n // batch)
    run_ids = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(3)]
    training_runs = [f"train-{rnd.getrandbits(32):08x}" for _ in range(2)]
    kinds = ["batched"] * 18 + ["ingested", "split"]
    data: dict[str, list] = {c: [] for c in COLUMNS}
    for i in range(n):
        step = i // batch
        epoch = step // steps_per_epoch
        data["sample_id"].append(rnd.randbytes(32).hex())
        data["pipeline"].append("mnist")
        data["run_id"].append(run_ids[(i >> 16) % 3])
        data["asset"].append("training_events")
        data["kind"].append(kinds[rnd.randrange(20)])
        data["training_run"].append(training_runs[(i >> 18) % 2])
        data["epoch"].append(epoch)
        data["step"].append(step)
        data["position"].append(i % batch)
        data["lr"].append(0.1 * 0.5 * (1 + math.cos(math.pi * step / total_steps)))
        data["checkpoint_id"].append(f"ckpt-{epoch:04d}-{step:07d}" if rnd.random() < 0.1 else None)
        data["detail"].append('{"loss": %.4f, "note": "ok"}' % rnd.random() if rnd.random() < 0.1 else None)
    return data


def best_of(rounds: int, fn):
    """Return ((best wall s, best CPU s), last result)."""
    wall = cpu = math.inf
    out = None
    for _ in range(rounds):
        out = None
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return (wall, cpu), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ref-rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n, m = args.rows, min(args.ref_rows, args.rows)

    t0 = time.perf_counter()
    data = events(n)
    arrow = pa.table({c: data[c] for c in COLUMNS})
    print(f"generated {n:,} events rows in {time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.1f}"
          f" on {os.cpu_count()} CPUs")

    sub = [{c: data[c][i] for c in COLUMNS} for i in range(m)]
    t_ref, ref = best_of(1, lambda: [rfc8785.dumps({"table": "events", **row}) for row in sub])
    t_ref = (t_ref[0] * n / m, t_ref[1] * n / m)

    t_list, leaves = best_of(args.rounds, lambda: encode_rows("events", COLUMNS, data))
    t_arrow, leaves_arrow = best_of(args.rounds, lambda: encode_arrow_rows("events", COLUMNS, arrow))
    assert leaves[:m] == ref, "encode_rows differs from rfc8785.dumps"
    assert leaves_arrow == leaves, "arrow input differs from list input"

    sha = hashlib.sha256
    t_hash, _ = best_of(args.rounds, lambda: [sha(b"\x00" + leaf).digest() for leaf in leaves])

    mean_len = sum(map(len, leaves[:m])) / m
    print(f"{n:,} rows, mean leaf {mean_len:.0f} bytes, identical to rfc8785 on {m:,} rows\n")
    print(f"{'':<34}{'---------- wall ----------':>30}{'---------- CPU -----------':>30}")
    print(f"{'step':<34}" + f"{'total s':>10}{'us/row':>10}{'speedup':>10}" * 2)
    for name, t in [
        (f"rfc8785.dumps (x{n // m} of {m:,})", t_ref),
        ("encode_rows (lists)", t_list),
        ("encode_arrow_rows (arrow Table)", t_arrow),
        ("sha256(0x00 || leaf)", t_hash),
        ("encode_rows (lists) + sha256", (t_list[0] + t_hash[0], t_list[1] + t_hash[1])),
    ]:
        print(f"{name:<34}" + "".join(f"{x:>10.2f}{x / n * 1e6:>10.2f}{r / x:>9.1f}x" for x, r in zip(t, t_ref)))


if __name__ == "__main__":
    main()
