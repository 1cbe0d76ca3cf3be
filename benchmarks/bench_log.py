"""Log and verify benchmarks (issue 3 targets): append rate, proof time on a 10M-leaf log, receipt check, full verify.

    .venv/bin/python benchmarks/bench_log.py [--leaves 10000000] [--events 1000000]

Prints a table and writes the "Log and verify" section of benchmarks/RESULTS.md.
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import machine, table, write_section  # noqa: E402
from fgtrac_assets.integrity import merkle  # noqa: E402
from fgtrac_assets.integrity.receipts import verify_receipt  # noqa: E402
from fgtrac_assets.ledger import proofs  # noqa: E402
from fgtrac_assets.ledger.nodes import StoredNodes  # noqa: E402
from fgtrac_assets.ledger.nodes import append_hashes  # noqa: E402
from fgtrac_assets.ledger.store import Commit, Ledger  # noqa: E402
from fgtrac_assets.ledger.verify import verify_ledger  # noqa: E402


def synthetic_events(n: int, seed: int = 0) -> pa.Table:
    """Return n events shaped like a training run's `batched` events."""
    rnd = random.Random(seed)
    ids = [f"{rnd.getrandbits(256):064x}" for _ in range(min(n, 50_000))]
    run = str(uuid.UUID(int=rnd.getrandbits(128)))
    return pa.table({
        "sample_id": [ids[i % len(ids)] for i in range(n)], "kind": ["batched"] * n, "training_run": [run] * n,
        "epoch": [i // len(ids) for i in range(n)], "step": [i // 32 for i in range(n)],
        "position": [i % 32 for i in range(n)], "lr": [0.1 * (1 - i / n) + 1e-4 for i in range(n)],
        "pipeline": ["bench"] * n, "run_id": [run] * n, "asset": ["training_checkpoints"] * n})


def bench_commit(home: Path, n: int) -> tuple[float, Ledger]:
    ledger = Ledger(home)
    events = synthetic_events(n)
    t = time.perf_counter()
    ledger.commit(Commit(pipeline="bench", asset="training_checkpoints", run_id="bench", rows={"events": events}))
    return time.perf_counter() - t, ledger


def bench_grouped_commit(home: Path, n: int, batch: int = 32) -> tuple[float, float, Ledger]:
    """Commit n `batched` events the way training does (a Tracer; one leaf per step); return (commit s, verify s, ledger)."""
    import numpy as np

    from fgtrac_assets.tracing.tracer import Tracer

    rnd = random.Random(0)
    ids = [f"{rnd.getrandbits(256):064x}" for _ in range(min(n, 50_000))]
    tracer = Tracer(ids, "grouped")
    rng = np.random.default_rng(0)
    while len(tracer) < n:  # recording, not timed (it is inside the training loop: see bench_tracing.py)
        tracer.epoch += 1
        for b in np.array_split(rng.permutation(len(ids)), len(ids) // batch):
            if len(tracer) + len(b) > n:
                b = b[:n - len(tracer)]
            tracer.record_batch(b, 0.1)
            if len(tracer) >= n:
                break
    ledger = Ledger(home)
    t = time.perf_counter()
    ledger.commit(Commit(pipeline="bench", asset="training_checkpoints", run_id="bench", groups=tracer.groups()))
    commit_s = time.perf_counter() - t
    t = time.perf_counter()
    report = verify_ledger(ledger, update_witness=False)
    assert report.ok, report.findings[:3]
    return commit_s, time.perf_counter() - t, ledger


def bench_bulk_insert(home: Path, n: int) -> float:
    """Return the seconds to insert n event rows through the Arrow bulk path alone (no leaves, no log)."""
    import duckdb

    from fgtrac_assets.ledger.leaves import to_arrow
    from fgtrac_assets.ledger.schema import all_ddl

    home.mkdir(parents=True)
    con = duckdb.connect(str(home / "bulk.duckdb"))
    for ddl in all_ddl():
        con.execute(ddl)
    events = synthetic_events(n)
    t = time.perf_counter()
    tbl = to_arrow("events", events)
    tbl = tbl.add_column(0, "leaf_index", pa.array(range(n), type=pa.int64()))
    con.execute("BEGIN TRANSACTION")
    con.register("rows", tbl)
    con.execute("INSERT INTO event_rows SELECT * FROM rows")  # events that are leaves themselves
    con.execute("COMMIT")
    dt = time.perf_counter() - t
    con.close()
    return dt


def bench_big_log(home: Path, leaves: int, chunk: int = 1_000_000) -> tuple[float, float, list[float]]:
    """Append `leaves` synthetic leaf hashes through the real append path; return (append s, size, proof times)."""
    import duckdb

    ledger = Ledger(home)
    ledger.commit(Commit(pipeline="bench", asset="x", run_id="x", rows={}))  # creates the schema and key
    con = duckdb.connect(str(home / "ledger.duckdb"))
    size = con.execute("SELECT max(size) FROM tree_heads").fetchall()[0][0]
    append_s = 0.0
    done = 0
    while done < leaves:
        m = min(chunk, leaves - done)
        data = [i.to_bytes(8, "big") for i in range(done, done + m)]  # the leaves themselves: not timed
        t = time.perf_counter()
        hashes = merkle.leaf_hashes(data)
        con.execute("BEGIN TRANSACTION")
        size, _ = append_hashes(con, size, hashes)
        con.execute("COMMIT")
        append_s += time.perf_counter() - t
        done += m
    con.close()
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    rnd = random.Random(1)
    times = []
    for _ in range(300):
        i = rnd.randrange(size)
        s = time.perf_counter()
        proof = StoredNodes(con).run(merkle.inclusion_proof_from, i, size)
        times.append(time.perf_counter() - s)
        assert len(proof) > 0
    con.close()
    return append_s, size, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leaves", type=int, default=10_000_000, help="size of the big log for proof timing")
    ap.add_argument("--events", type=int, default=1_000_000, help="events in the ledger for append and verify")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bulk_s = bench_bulk_insert(Path(tmp) / "bulk", args.events)
        rows.append(["events that are leaves into the ledger (Arrow bulk insert into DuckDB, one transaction)",
                     f"{args.events:,}",
                     f"{bulk_s:.2f} s", f"{args.events / bulk_s:,.0f} events/s", ">= 1,000,000 /s"])
        grouped_s, grouped_verify_s, grouped = bench_grouped_commit(Path(tmp) / "g", args.events)
        rows.append(["commit a training run's `batched` events as event groups (a leaf per step of 32: rows, "
                     "members digests, log, signed head)", f"{args.events:,}", f"{grouped_s:.2f} s",
                     f"{args.events / grouped_s:,.0f} events/s", ">= 1,000,000 /s"])
        rows.append(["full verify of those (every group's members bytes rebuilt and hashed)", f"{args.events:,} events",
                     f"{grouped_verify_s:.2f} s", f"{grouped_verify_s / args.events * 1e6:.2f} s per million",
                     "<= 10 s per million"])
        g_sample = grouped.query("SELECT sample_id FROM events LIMIT 1").to_pylist()[0]["sample_id"]
        g_receipts = [r for r in proofs.sample_receipts(grouped, g_sample) if "member" in r]
        t = time.perf_counter()
        for r in g_receipts:
            verify_receipt(r)
        g_per = (time.perf_counter() - t) / len(g_receipts)
        rows.append(["member receipt verification (signature + inclusion proof + members bytes)",
                     f"{len(g_receipts)} receipts", f"{g_per * 1e3:.3f} ms each", "", "<= 1 ms"])
        commit_s, ledger = bench_commit(Path(tmp) / "a", args.events)
        rows.append(["commit events (rows + leaves + log + signed head, one transaction)",
                     f"{args.events:,}", f"{commit_s:.2f} s", f"{args.events / commit_s:,.0f} leaves/s", ">= 500,000 /s"])
        t = time.perf_counter()
        report = verify_ledger(ledger, update_witness=False)
        verify_s = time.perf_counter() - t
        assert report.ok, report.findings[:3]
        rows.append(["full verify (recompute every leaf, node, signature)", f"{report.leaves:,} leaves",
                     f"{verify_s:.2f} s", f"{verify_s / report.leaves * 1e6:.2f} s per million", "<= 10 s per million"])
        sample = ledger.query("SELECT sample_id FROM events LIMIT 1").to_pylist()[0]["sample_id"]
        receipts = proofs.sample_receipts(ledger, sample)
        t = time.perf_counter()
        for r in receipts:
            verify_receipt(r)
        per = (time.perf_counter() - t) / len(receipts)
        rows.append(["receipt verification (signature + inclusion proof)", f"{len(receipts)} receipts",
                     f"{per * 1e3:.3f} ms each", "", "<= 1 ms"])
        append_s, size, times = bench_big_log(Path(tmp) / "b", args.leaves)
        rows.append(["append leaves to the stored tree (leaf hashes + nodes + storage, 1M per transaction)", f"{size:,}",
                     f"{append_s:.1f} s", f"{size / append_s:,.0f} leaves/s", ">= 500,000 /s"])
        times.sort()
        rows.append([f"inclusion proof from the stored tree (median / p99 of {len(times)})", f"{size:,} leaves",
                     f"{statistics.median(times) * 1e3:.2f} / {times[int(len(times) * 0.99)] * 1e3:.2f} ms", "",
                     "<= 10 ms"])
    header = ["what", "size", "time", "rate", "target"]
    print(table(header, rows))
    write_section("Log and verify", f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_log.py "
                  f"--leaves {args.leaves} --events {args.events}`\n\n" + table(header, rows))


if __name__ == "__main__":
    main()
