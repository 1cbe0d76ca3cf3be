"""C2SP log export benchmarks: full export rate, incremental re-export after a 1,000-leaf commit, tlog-proof verify.

    .venv/bin/python benchmarks/bench_export.py [--leaves 10000000] [--commit-rows 1000000] [--repeats 20]

Builds a synthetic ledger of `batched` events (one leaf per event, about 330 bytes of canonical JSON each)
in commits of --commit-rows rows, exports it with `export_log` into a fresh directory (timed), then commits
999 events (1,000 leaves with the materialisation row) and re-exports, --repeats times, and verifies
tlog-proofs of random leaves. Prints a table and writes its section of benchmarks/RESULTS.md.
"""

import argparse
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_log import synthetic_events  # noqa: E402
from benchmarks.results import machine, table, write_section  # noqa: E402
from fgtrac_assets.integrity import merkle, notes  # noqa: E402
from fgtrac_assets.integrity.tiles import Tile, decode_bundle  # noqa: E402
from fgtrac_assets.integrity.tlog_proof import format_tlog_proof, verify_tlog_proof  # noqa: E402
from fgtrac_assets.ledger.export import export_log  # noqa: E402
from fgtrac_assets.ledger.nodes import StoredNodes, tree_head  # noqa: E402
from fgtrac_assets.ledger.store import Commit, Ledger  # noqa: E402


def build(home: Path, leaves: int, per_commit: int) -> tuple[Ledger, float]:
    """Return a ledger of about `leaves` leaves and the seconds its commits took."""
    ledger = Ledger(home)
    head = ledger.latest_tree_head()  # a --dir kept from an earlier run is reused
    spent, done, seed = 0.0, head["size"] if head else 0, 1000 if head else 0
    while done < leaves:
        n = min(per_commit, leaves - done) - 1  # each commit adds its materialisation row
        rows = synthetic_events(max(n, 1), seed)
        t = time.perf_counter()
        r = ledger.commit(Commit(pipeline="bench", asset="training_checkpoints", run_id=f"b{seed}", rows={"events": rows}))
        spent += time.perf_counter() - t
        done, seed = r.tree_size, seed + 1
        print(f"  built {done:,} leaves", file=sys.stderr, flush=True)
    return ledger, spent


def cpu_seconds() -> tuple[float, float]:
    """Return the (user, system) CPU seconds used so far by this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def write_floor(src: Path, dest: Path) -> float:
    """Return the seconds a bare loop takes to write files of the same sizes as src's (temporary name, rename)."""
    sizes = [p.stat().st_size for p in src.rglob("*") if p.is_file()]
    data = bytes(max(sizes))
    t = time.perf_counter()
    for i, n in enumerate(sizes):
        sub = dest / str(i // 1000)
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        fd = os.open(sub / f".{i}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data[:n])
        os.close(fd)
        os.replace(sub / f".{i}.tmp", sub / str(i))
    return time.perf_counter() - t


def median_ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f} ms (min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--leaves", type=int, default=10_000_000)
    ap.add_argument("--commit-rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--proofs", type=int, default=1000)
    ap.add_argument("--dir", help="work directory, kept and reused (default: a temporary one, removed afterwards)")
    args = ap.parse_args()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fgtrac-bench-export-"))
    try:
        ledger, build_s = build(work / "home", args.leaves, args.commit_rows)
        out = work / "tiles"
        shutil.rmtree(out, ignore_errors=True)
        (u0, s0), load0 = cpu_seconds(), os.getloadavg()[0]
        full = export_log(ledger, out)
        (u1, s1) = cpu_seconds()
        user, system = u1 - u0, s1 - s0
        rate = full.size / full.seconds
        floor_s = write_floor(out, work / "floor")
        shutil.rmtree(work / "floor")
        print(f"  full export {full.size:,} leaves in {full.seconds:.1f} s", file=sys.stderr)

        incremental, floor = [], []
        for i in range(args.repeats):
            ledger.commit(Commit(pipeline="bench", asset="training_checkpoints", run_id=f"inc{i}",
                                 rows={"events": synthetic_events(999, 10_000 + i)}))
            t = time.perf_counter()
            r = export_log(ledger, out)
            incremental.append(time.perf_counter() - t)
            assert r.size - r.previous_size == 1000, r
            t = time.perf_counter()
            with ledger.reader(code_views=False):
                pass
            floor.append(time.perf_counter() - t)

        rng = random.Random(0)
        with ledger.reader(code_views=False) as con:
            size, note, vkey = tree_head(con)
            nodes = StoredNodes(con)
            picks = [rng.randrange(size) for _ in range(args.proofs)]
            texts = [format_tlog_proof(i, nodes.run(merkle.inclusion_proof_from, i, size), note) for i in picks]
        leaves = {}  # the entries themselves, read back from the published bundles
        for i in picks:
            k = i // 256
            leaves[i] = decode_bundle((out / Tile(None, k, min(256, size - k * 256)).path).read_bytes())[i % 256]
        verifier = notes.parse_verifier_key(vkey)
        times = []
        for i, text in zip(picks, texts):
            t = time.perf_counter()
            verify_tlog_proof(text, leaves[i], [verifier])
            times.append(time.perf_counter() - t)

        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        intro = (f"Machine: {machine()}, load average {load}. Command: `.venv/bin/python benchmarks/bench_export.py "
                 f"--leaves {args.leaves}`. The ledger is built in {build_s:.0f} s ({args.commit_rows:,} event rows "
                 "per commit), then exported with `fgtrac log export` (C2SP tlog-tiles), re-exported after small "
                 "commits, and tlog-proofs are verified.")
        print(f"\n{intro}\n")
        rows = [
            ["full export (tiles copied, bundles built, every entry checked)", f"{full.size:,} leaves",
             f"{full.seconds:.1f} s, {rate:,.0f} leaves/s, {full.tiles:,} tiles + {full.bundles:,} bundles, "
             f"{full.bytes / 2**20:,.0f} MiB", ">= 500,000 leaves/s"],
            ["  CPU it used, all processes (user: fgtrac's code; system: the kernel's file writes)", "",
             f"user {user:.1f} s ({user / full.size * 1e6:.2f} us/leaf), system {system:.1f} s "
             f"({system / full.size * 1e6:.2f} us/leaf); load average {load0:.1f} when it started", ""],
            ["  the same files written by a bare loop (no fgtrac code, one process)", "",
             f"{floor_s:.1f} s ({full.size / floor_s:,.0f} leaves/s)", ""],
            [f"re-export after a 1,000-leaf commit ({args.repeats} times)", f"{size:,} leaves",
             median_ms(incremental), "<= 50 ms"],
            ["  of which: opening and closing `Ledger.reader(code_views=False)` alone", "", median_ms(floor), ""],
            ["verify one tlog-proof (Ed25519 + inclusion)", f"{size:,} leaves", f"median {statistics.median(times) * 1e3:.3f} ms",
             "<= 1 ms"],
        ]
        print(table(["what", "size", "measured", "target"], rows))
        write_section("Published log (tlog-tiles export)", intro + "\n\n" + table(["what", "size", "measured", "target"], rows))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
