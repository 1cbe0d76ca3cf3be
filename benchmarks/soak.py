"""Soak: many chain runs into one FGTRAC_HOME, many SIGKILLs, concurrent audits and verifies, for a set time.

    .venv/bin/python benchmarks/soak.py [--minutes 5] [--workers 2] [--kill-fraction 0.6] [--seed 8]

Each worker is a warm fork server (tests/reliability/chaos.py) running the digits chain (300 samples, 2 epochs)
into the same home, one run after another; a seeded draw kills a share of the runs with SIGKILL at a time
uniform over the worker's measured run duration. Meanwhile one thread loops `fgtrac audit sql` (the count of
events must never fail nor go backwards) and another loops the full checks: `fgtrac verify`, whole
materialisations only (chaos.ledger_problems), and every commit a run saw succeed still present. After the
time is up the workers stop, the checks run once more over the quiet home, and leftover partial files must
all belong to killed processes. Prints a table and writes the "Soak" section of benchmarks/RESULTS.md.
"""

import argparse
import collections
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "reliability"))

import chaos  # noqa: E402
from benchmarks.results import machine, table, write_section  # noqa: E402


class Stats:
    """Counters shared by the soak's threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = self.completed = self.killed = self.failed = 0
        self.kill_places: collections.Counter = collections.Counter()
        self.killed_pids: set[int] = set()
        self.acks: list[tuple[str, str, int, int]] = []
        self.failures: list[str] = []
        self.checks = self.verify_failures = self.ledger_failures = 0

    def add(self, outcome: "chaos.Outcome") -> None:
        with self.lock:
            self.started += 1
            self.acks += outcome.acknowledged()
            if outcome.killed:
                self.killed += 1
                self.killed_pids.add(outcome.pid)
                self.kill_places[outcome.where().split(" (")[0] + (" (commit)" if "(commit)" in outcome.where() else "")] += 1
            elif outcome.completed:
                self.completed += 1
            else:
                self.failed += 1


def worker(n: int, home: Path, logs: Path, rng: random.Random, args, stop: threading.Event, stats: Stats) -> None:
    """Run the chain again and again into home; kill a share of the runs at a uniform point of the run."""
    try:
        with chaos.ChainServer(logs / f"worker-{n}") as server:
            duration = None
            while not stop.is_set():
                kill = duration is not None and rng.random() < args.kill_fraction
                outcome = server.run(home, limit=args.limit, epochs=args.epochs,
                                     kill_after=rng.uniform(0, duration) if kill else None)
                stats.add(outcome)
                if outcome.completed and duration is None:
                    duration = outcome.duration
                if not outcome.killed and not outcome.completed:
                    with stats.lock:
                        stats.failures.append(f"worker {n}: run {outcome.run_id} failed (status {outcome.status}): "
                                              f"{server.stderr_tail(1500)}")
    except Exception as exc:  # noqa: BLE001 - reported in the table as a failure
        with stats.lock:
            stats.failures.append(f"worker {n} crashed: {type(exc).__name__}: {exc}")


def check(home: Path, stats: Stats) -> None:
    """verify + whole materialisations + no acknowledged commit lost; count failures."""
    with stats.lock:
        acks = list(stats.acks)
    rc, out = chaos.verify_cli(home)
    problems = chaos.ledger_problems(home)
    lost = chaos.missing_commits(home, acks)
    with stats.lock:
        stats.checks += 1
        if rc != 0:
            stats.verify_failures += 1
            stats.failures.append(f"verify: {out.strip()[-1500:]}")
        if problems:
            stats.ledger_failures += 1
            stats.failures.append("ledger: " + "; ".join(problems))
        if lost:
            stats.failures.append(f"lost commits: {lost}")


class WitnessChaos(threading.Thread):
    """One real witness of the home's log, SIGKILLed and restarted (same state, same port) at random moments.

    Its latest cosigned size, read between kills, must never go backwards.
    """

    def __init__(self, home: Path, state: Path, rng: random.Random, every_s: float):
        super().__init__(daemon=True)
        from fgtrac_assets.ledger.store import Ledger
        from tests.witness_process import Witness

        self.ledger = Ledger(home)
        vkey = self.ledger.initialise().verifier_key
        port = _free_port()
        self.witness = Witness(state, [vkey], name="witness.soak/w1", listen=f"127.0.0.1:{port}").start()
        (home / "policy").write_text(f"log {vkey}\nwitness w1 {self.witness.vkey} {self.witness.url}\nquorum 1\n")
        self.rng, self.every_s, self.stop_event = rng, every_s, threading.Event()
        self.kills, self.sizes, self.backwards = 0, [], []

    def latest_size(self) -> int | None:
        from fgtrac_assets.integrity import notes
        from fgtrac_assets.witness import client

        try:
            note = client.latest_checkpoint(self.witness.url, self.ledger.origin, timeout_s=2)
        except client.WitnessError:
            return None
        return None if note is None else notes.parse_checkpoint(notes.split_note(note)[0]).size

    def observe(self) -> None:
        size = self.latest_size()
        if size is not None:
            if self.sizes and size < self.sizes[-1]:
                self.backwards.append(f"witness went back from {self.sizes[-1]} to {size}")
            self.sizes.append(size)

    def run(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(0.2, 2) * self.every_s):
            self.observe()
            self.witness.kill9()
            self.kills += 1
            time.sleep(self.rng.uniform(0, 1.0))
            self.witness.start()
            self.observe()

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)
        self.observe()

    def close(self) -> None:
        self.witness.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def checker(home: Path, stop: threading.Event, stats: Stats) -> None:
    while not stop.is_set():
        if (home / "ledger.duckdb").exists():
            try:
                check(home, stats)
            except Exception as exc:  # noqa: BLE001
                with stats.lock:
                    stats.verify_failures += 1
                    stats.failures.append(f"check crashed: {type(exc).__name__}: {exc}")
        stop.wait(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="how long to keep starting runs (default 5)")
    ap.add_argument("--workers", type=int, default=2, help="chain runs at the same time (default 2)")
    ap.add_argument("--kill-fraction", type=float, default=0.6, help="share of runs killed (default 0.6)")
    ap.add_argument("--limit", type=int, default=300, help="digits per run (default 300)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--home", help="FGTRAC_HOME to soak (default: a fresh temporary folder, removed afterwards)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    ap.add_argument("--witness-kill-s", type=float, default=10.0,
                    help="a witness of the log is SIGKILLed and restarted about this often (0: no witness)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fgtrac-soak-"))
    home = Path(args.home) if args.home else tmp / "home"
    stats, stop = Stats(), threading.Event()
    rng = random.Random(args.seed)
    audits = chaos.AuditLoop(home, pause_s=0.05)
    threads = [threading.Thread(target=worker, args=(i, home, tmp / "logs", random.Random(rng.random()), args, stop,
                                                     stats), daemon=True) for i in range(args.workers)]
    check_stop = threading.Event()
    check_thread = threading.Thread(target=checker, args=(home, check_stop, stats), daemon=True)
    if args.witness_kill_s:
        os.environ["FGTRAC_WITNESS_TIMEOUT"] = "0.5"  # the forked workers inherit it: a dead witness costs 0.5 s
        witness = WitnessChaos(home, tmp / "witness-state", random.Random(rng.random()), args.witness_kill_s)
    else:
        witness = None
    t0 = time.monotonic()
    if witness:
        witness.start()
    audits.start()
    check_thread.start()
    for t in threads:
        t.start()
    out = sys.__stdout__
    while time.monotonic() - t0 < args.minutes * 60:
        time.sleep(min(15.0, max(0.1, args.minutes * 60 - (time.monotonic() - t0))))
        with stats.lock:
            out.write(f"  {time.monotonic() - t0:6.0f} s: {stats.started} runs, {stats.completed} completed, "
                      f"{stats.killed} killed, {len(audits.results)} audits, {stats.checks} verifies, "
                      f"{len(stats.failures)} failures\n")
        out.flush()
    stop.set()
    for t in threads:
        t.join(timeout=600)
    check_stop.set()
    check_thread.join(timeout=600)
    audits.finish()
    elapsed = time.monotonic() - t0
    witness_rows, witness_problems = [], []
    if witness:
        witness.finish()
        witness_rows, witness_problems = _witness_outcome(home, witness)
        witness.close()

    check(home, stats)  # once more over the quiet home
    partial, whole = chaos.uncommitted_files(home)
    strays = [p for p in partial if int(chaos.PARTIAL.match(p.name)["pid"]) not in stats.killed_pids]
    lost = chaos.missing_commits(home, stats.acks)
    rows_lost = sum(count for *_, count in lost)
    audit_failures = audits.failures()
    from fgtrac_assets.ledger.store import Ledger

    head = Ledger(home).latest_tree_head() if (home / "ledger.duckdb").exists() else None
    rows = [["runs started", stats.started], ["runs completed", stats.completed], ["kills (SIGKILL)", stats.killed],
            ["runs failed otherwise", stats.failed],
            ["kills by place", ", ".join(f"{k} {v}" for k, v in sorted(stats.kill_places.items())) or "-"],
            ["concurrent audits run (`fgtrac audit sql`)", len(audits.results)],
            ["audit failures (error, or count went backwards)", len(audit_failures)],
            ["concurrent full checks (verify + whole materialisations + acknowledged commits)", stats.checks],
            ["verify failures", stats.verify_failures], ["ledger consistency failures", stats.ledger_failures],
            ["acknowledged commits", len(stats.acks)], ["rows lost", rows_lost],
            ["partial files left (all from killed runs)", f"{len(partial)} ({len(strays)} not from a killed run)"],
            ["whole uncommitted files left", len(whole)],
            ["final log size", f"{head['size']:,} leaves" if head else "-"], *witness_rows,
            ["duration", f"{elapsed:.0f} s"]]
    print()
    print(table(["what", "value"], rows))
    problems = stats.failures + audit_failures + [f"partial file of a live or unknown process: {p}" for p in strays]
    problems += witness_problems
    for p in problems[:20]:
        print("FAILURE", p[:2000])
    ok = not problems and rows_lost == 0 and stats.failed == 0
    cmd = (f".venv/bin/python benchmarks/soak.py --minutes {args.minutes:g} --workers {args.workers} "
           f"--kill-fraction {args.kill_fraction:g} --seed {args.seed}")
    if not args.no_write:
        write_section("Soak", f"Machine: {machine()}. Command: `{cmd}`. {args.workers} workers run the digits chain "
                      f"({args.limit} samples, {args.epochs} epochs, stages called directly in forked processes) into "
                      f"one FGTRAC_HOME; {args.kill_fraction:.0%} of runs are killed with SIGKILL at a time uniform "
                      "over the run, while one thread loops `fgtrac audit sql` and another loops `fgtrac verify` "
                      "plus the whole-materialisation and acknowledged-commit checks"
                      + (f"; the log has a witness policy and its one witness is SIGKILLed and restarted about every "
                         f"{args.witness_kill_s:g} s" if witness else "") + ". "
                      f"Outcome: {'PASS' if ok else 'FAIL'}.\n\n" + table(["what", "value"], rows))
    if not args.home:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


def _witness_outcome(home: Path, witness: WitnessChaos) -> tuple[list[list], list[str]]:
    """After the soak: sync, then verify --policy; every stored cosignature must verify and the witness never went back."""
    from fgtrac_assets.integrity.policy import load_policy
    from fgtrac_assets.ledger.store import Ledger
    from fgtrac_assets.ledger.verify import verify_ledger

    sync = Ledger(home).witness_sync()
    report = verify_ledger(Ledger(home), policy=load_policy(home / "policy"), update_witness=False)
    cosigned = Ledger(home).query("SELECT count(*) AS n FROM cosignatures").column(0)[0].as_py()
    heads = Ledger(home).query("SELECT count(*) AS n FROM tree_heads").column(0)[0].as_py()
    problems = list(witness.backwards) + [f"verify --policy: {f.line()}" for f in report.findings]
    if sync.get("w1") != "cosigned":
        problems.append(f"witness sync after the soak: {sync}")
    rows = [["witness SIGKILLs and restarts", witness.kills],
            ["tree heads cosigned by the witness", f"{cosigned} of {heads}"],
            ["witness sizes observed; went backwards", f"{len(witness.sizes)}; {len(witness.backwards)}"],
            ["`verify --policy` after `witness sync`", "OK" if report.ok else f"{len(report.findings)} findings"]]
    return rows, problems


if __name__ == "__main__":
    sys.exit(main())
