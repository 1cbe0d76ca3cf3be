"""Run every benchmark, then time the end-to-end run and definition loading; each writes its RESULTS.md section.

    .venv/bin/python benchmarks/run.py [--quick]     (or: make bench)

--quick uses smaller sizes (for a smoke run); the figures in RESULTS.md come from full runs.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import machine, table, write_section  # noqa: E402

BIN = Path(sys.executable).parent

SCRIPTS = [  # (script, full args, quick args)
    ("bench_tracing.py", ["--reps", "5"], ["--reps", "1", "--graph-limit", "3000"]),
    ("bench_session.py", [], ["--reps", "1", "--samples", "2048", "--ddp-samples", "1024", "--epochs", "1"]),
    ("bench_tracin.py", [], ["--quick"]),
    ("bench_dattri.py", [], ["--quick"]),
    ("bench_replay.py", [], ["--reps", "1", "--train", "300", "--epochs", "4"]),
    ("bench_canonical.py", [], []),
    ("bench_log.py", [], ["--leaves", "1000000", "--events", "200000"]),
    ("bench_audit.py", [], ["--events", "1000000"]),
    ("bench_scale.py", [], ["--samples", "5000", "--train", "20000", "--test", "2000"]),
    ("bench_witness.py", ["--reps", "40"], ["--reps", "5"]),
    ("bench_export.py", [], ["--leaves", "200000", "--commit-rows", "100000", "--repeats", "5", "--proofs", "100"]),
]


def run_script(name: str, args: list[str]) -> int:
    path = REPO / "benchmarks" / name
    if not path.exists():
        print(f"-- {name}: missing, skipped")
        return 0
    print(f"-- {name} {' '.join(args)}", flush=True)
    return subprocess.call([sys.executable, str(path), *args], cwd=REPO)


def end_to_end() -> list[list]:
    """Time what `make run` does after install (every pipeline job), and loading the definitions."""
    rows = []
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fgtrac_assets.definitions"], cwd=REPO, check=True)
    rows.append(["load the Dagster definitions (fresh interpreter)", f"{time.perf_counter() - t:.2f} s", "< 2 s"])
    from fgtrac_assets.definitions import jobs

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FGTRAC_HOME": f"{tmp}/home", "DAGSTER_HOME": f"{tmp}/dagster"}
        Path(env["DAGSTER_HOME"]).mkdir()
        (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
        total = 0.0
        for job in jobs:
            t = time.perf_counter()
            subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "fgtrac_assets.definitions", "-j", job.name],
                           cwd=REPO, env=env, check=True, capture_output=True)
            dt = time.perf_counter() - t
            total += dt
            rows.append([f"`{job.name}` (default config, through the Dagster CLI)", f"{dt:.1f} s", ""])
        t = time.perf_counter()
        subprocess.run([str(BIN / "fgtrac"), "summary"], cwd=REPO, env=env, check=True, capture_output=True)
        total += time.perf_counter() - t
    rows.append(["`make run` after install (every pipeline job + summary and verify)", f"{total:.1f} s", "<= 5 min"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--end-to-end-only", action="store_true", help="only time `make run` and definition loading")
    args = ap.parse_args()
    failed = [] if args.end_to_end_only else [
        name for name, full, quick in SCRIPTS if run_script(name, quick if args.quick else full) != 0]
    rows = end_to_end()
    print(table(["what", "wall time", "target"], rows))
    write_section("End to end", f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/run.py`.\n\n"
                  + table(["what", "wall time", "target"], rows))
    if failed:
        print(f"failed: {failed}")
        sys.exit(1)


if __name__ == "__main__":
    main()
