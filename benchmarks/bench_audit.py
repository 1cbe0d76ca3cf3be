"""Audit latency on a ledger of 10,000,000 events: sample_history and sample_usage for one sample.

    .venv/bin/python benchmarks/bench_audit.py [--events 10000000]

The events are generated in SQL (synthetic, quickly: audits read rows, they do not check leaves).
Prints a table and writes the "Audits" section of benchmarks/RESULTS.md.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402

from benchmarks.results import machine, table, write_section  # noqa: E402
from fgtrac_assets.ledger.schema import all_ddl  # noqa: E402


def build(path: Path, n: int, samples: int = 100_000, runs: int = 10) -> float:
    """Create a ledger holding n batched events over `samples` samples and `runs` runs, in steps of 32 (event groups)."""
    t = time.perf_counter()
    con = duckdb.connect(str(path))
    for ddl in all_ddl():
        con.execute(ddl)
    con.execute(f"""INSERT INTO samples SELECT i, sha256(i::VARCHAR), 'bench', 'synthetic#' || i, i % 10, 'r', 'raw_samples'
                    FROM range({samples}) t(i)""")
    con.execute(f"""INSERT INTO training_sets SELECT {samples} + r, 'run-' || r, 'bench', 'run-' || r,
                    'training_checkpoints', {samples}, 'root' FROM range({runs}) t(r)""")
    con.execute(f"INSERT INTO sample_keys SELECT i, sha256(i::VARCHAR) FROM range({samples}) t(i)")
    steps = -(-n // 32)
    con.execute(f"""INSERT INTO event_groups
        SELECT {samples + runs} + s, 'batched', 'bench', 'run-' || (s % {runs}), 'training_checkpoints',
               'run-' || (s % {runs}), (s * 32 // {samples * runs})::BIGINT, s, 0.1, NULL, 0, 32, 'digest'
        FROM range({steps}) t(s)""")
    con.execute(f"""INSERT INTO group_members
        SELECT {samples + runs} + i // 32, i % 32, (i * 7919) % {samples}, NULL FROM range({n}) t(i)""")
    con.close()
    return time.perf_counter() - t


def timed(con, sql: str, params: list, reps: int = 15) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        con.execute(sql, params).fetchall()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.duckdb"
        build_s = build(path, args.events)
        con = duckdb.connect(str(path), read_only=True)
        sample = con.execute("SELECT sample_id FROM samples LIMIT 1 OFFSET 777").fetchall()[0][0]
        hist = timed(con, "SELECT * FROM sample_history_of(?)", [sample])
        usage = timed(con, "SELECT * FROM sample_usage_of(?, ?)", [sample, "run-3"])
        usage_view = timed(con, "SELECT * FROM sample_usage WHERE sample_id = ? AND training_run = ?",
                           [sample, "run-3"], reps=3)
        n_hist = len(con.execute("SELECT * FROM sample_history WHERE sample_id = ?", [sample]).fetchall())
        con.close()
    rows = [["sample_history_of(id): one sample, all its events in order (`fgtrac audit sample`)", f"{args.events:,}",
             f"{n_hist} rows", f"{hist * 1e3:.1f} ms", "<= 100 ms"],
            ["sample_usage_of(id, run): one sample, one run (`fgtrac audit used`)", f"{args.events:,}", "1 row",
             f"{usage * 1e3:.1f} ms", "<= 100 ms"],
            ["the sample_usage view filtered to the same (a full scan: for whole-ledger reports)", f"{args.events:,}",
             "1 row", f"{usage_view * 1e3:.0f} ms", ""]]
    header = ["audit", "events in ledger", "result", "median latency", "target"]
    print(table(header, rows))
    print(f"(generated in {build_s:.1f} s)")
    write_section("Audits", f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_audit.py --events "
                  f"{args.events}` (synthetic events generated in SQL in {build_s:.0f} s; medians of 15).\n\n"
                  + table(header, rows))


if __name__ == "__main__":
    main()
