"""Concurrency: two pipelines materialise into one FGTRAC_HOME at once while audits loop; bounded, fair lock waits.

Every fgtrac writer takes an inter-process lock (fgtrac_assets/ledger/lock.py) for one short DuckDB
transaction; readers take it shared. These tests check the promises that rest on it: no run fails on a lock,
no audit fails, no row is lost, the log verifies, a loop of audits cannot starve a commit, and a wait that
cannot end in time fails fast with a message naming the lock file.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fgtrac_assets.ledger.lock import LedgerBusy, ledger_lock
from tests.conftest import chain_selection
from fgtrac_assets.ledger.store import Commit, Ledger

try:
    from . import chaos
except ImportError:
    import chaos

REPO = Path(__file__).resolve().parents[2]
LOCK_ERRORS = ("Could not set lock", "Conflicting lock", "LedgerBusy", "could not get the")


def _rows(n: int, tag: str = "s") -> dict:
    return {"events": [{"sample_id": f"{tag}{i}", "kind": "ingested"} for i in range(n)]}


def _pipelines() -> list[str]:
    """One run of each pipeline if there are two or more, else two runs of the digits one."""
    from fgtrac_assets.definitions import PIPELINES

    names = [p.name for p, _ in PIPELINES]
    return names[:2] if len(names) >= 2 else ["digits_cnn", "digits_cnn"]


def _reported(dagster_home: Path) -> tuple[str, list[dict]]:
    """Return the run id and, per materialisation, what the run reported (Dagster's own record of it)."""
    from dagster import DagsterEventType, DagsterInstance

    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        (run,) = instance.get_runs()
        records = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
        out = []
        for r in records:
            m = r.event_log_entry.dagster_event.event_specific_data.materialization
            out.append({"asset": m.asset_key.path[-1], **{k: m.metadata[k].value for k in
                                                          ("ledger_rows", "log_leaves", "leaf_start", "leaf_end")}})
        return run.run_id, out
    finally:
        instance.dispose()


@pytest.mark.slow
def test_two_pipelines_in_the_multiprocess_executor_while_audits_loop(tmp_path):
    home = tmp_path / "home"
    pipelines = _pipelines()
    audits = chaos.AuditLoop(home, pause_s=0.1)
    audits.start()
    procs, logs, dagster_homes = [], [], []
    started = time.monotonic()
    for i, name in enumerate(pipelines):
        dh = tmp_path / f"dagster-{i}"
        dh.mkdir()
        shutil.copy(REPO / "dagster.yaml", dh / "dagster.yaml")
        config = {"ops": {f"{name}__raw_samples": {"config": {"limit": 200}},
                          f"{name}__training_checkpoints": {"config": {"epochs": 1}}}}
        env = {**os.environ, "FGTRAC_HOME": str(home), "DAGSTER_HOME": str(dh), "FGTRAC_LOCK_TIMEOUT": "60"}
        log = open(tmp_path / f"run-{i}.log", "w")
        # no --in-process / job: `dagster asset materialize` runs the Definitions' default, the multiprocess executor
        procs.append(subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "fgtrac_assets.definitions",
             "--select", chain_selection(name), "--config-json", json.dumps(config)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
        dagster_homes.append(dh)
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
        audits.finish()
    elapsed = time.monotonic() - started

    outputs = [(tmp_path / f"run-{i}.log").read_text() for i in range(len(pipelines))]
    for name, code, out in zip(pipelines, codes, outputs):
        assert code == 0, f"the {name} run failed:\n{out[-4000:]}"
        assert "multiprocess executor" in out
        for needle in LOCK_ERRORS:
            assert needle not in out, f"the {name} run met a lock error ({needle}):\n{out[-4000:]}"

    # every audit succeeded, ran while the runs did, and never saw the log shrink
    print(f"{len(audits.results)} audits during {elapsed:.1f} s of runs")
    assert len(audits.results) >= 20, f"only {len(audits.results)} audits ran in {elapsed:.0f} s"
    assert audits.failures() == []

    # no row is lost: what each run reported for each materialisation is exactly in the ledger
    ledger = Ledger(home)
    held = {(r["run_id"], r["asset"]): r for r in
            ledger.query("SELECT run_id, asset, leaf_start, leaf_count, created_at FROM materializations").to_pylist()}
    reported_rows, spans = 0, []
    for dh in dagster_homes:
        run_id, reports = _reported(dh)
        assert len(reports) == 6, reports
        for rep in reports:
            row = held.get((run_id, rep["asset"]))
            assert row is not None, f"run {run_id} reported {rep}, the ledger has no such materialisation"
            assert (row["leaf_start"], row["leaf_start"] + row["leaf_count"] - 1) == (rep["leaf_start"], rep["leaf_end"])
            assert rep["log_leaves"] == row["leaf_count"]
            reported_rows += rep["ledger_rows"]
        times = sorted(r["created_at"] for (rid, _), r in held.items() if rid == run_id)
        spans.append((times[0], times[-1]))
    total = sum(ledger.query(f"SELECT count(*) AS n FROM {t}").column(0)[0].as_py()
                for t in ("samples", "events", "event_groups", "artifacts", "checkpoints", "checkpoint_selections",
                          "influence", "training_sets", "materializations"))
    assert len(held) == 12
    assert total == reported_rows, f"{total} rows in the ledger, {reported_rows} reported by the two runs"
    # the two runs really overlapped: each committed something before the other had finished
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    assert chaos.ledger_problems(home) == []
    rc, out = chaos.verify_cli(home)
    assert rc == 0, out


HOLD = textwrap.dedent("""
    import select, sys
    from pathlib import Path
    from fgtrac_assets.ledger.lock import ledger_lock
    with ledger_lock(Path(sys.argv[1]), exclusive=True, timeout_s=10):
        print("held", flush=True)
        select.select([sys.stdin], [], [], 8)  # until the test lets go, 8 s at most
""")


def test_a_held_lock_gives_a_bounded_wait_and_a_clear_error(tmp_path, monkeypatch):
    home = tmp_path / "home"
    ledger = Ledger(home)
    ledger.commit(Commit("p", "a", "r1", rows=_rows(3)))
    size = ledger.latest_tree_head()["size"]
    lock = home / "ledger.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("FGTRAC_LOCK_TIMEOUT", "1")  # read when the lock is taken, not at import
        t = time.monotonic()
        with pytest.raises(LedgerBusy) as busy:
            Ledger(home).commit(Commit("p", "a", "r2", rows=_rows(3, "t")))
        waited = time.monotonic() - t
        assert 0.9 <= waited < 3, waited
        assert str(busy.value).startswith(f"{lock}: could not get the write lock within 1 s")
        assert "FGTRAC_LOCK_TIMEOUT" in str(busy.value)
        # a reader (an audit in another process) gets the same bounded wait, one clear line and exit status 2
        env = {**os.environ, "FGTRAC_LOCK_TIMEOUT": "1"}
        r = subprocess.run([sys.executable, "-m", "fgtrac_assets.cli", "--home", str(home), "audit", "sql",
                            "SELECT count(*) FROM events"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r
        assert r.stderr.strip() == f"fgtrac: {lock}: could not get the read lock within 1 s (another fgtrac " \
                                   "process holds it; set FGTRAC_LOCK_TIMEOUT to wait longer)"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the failed commit left nothing behind; once the lock is free, commits go through
    assert Ledger(home).latest_tree_head()["size"] == size
    Ledger(home).commit(Commit("p", "a", "r3", rows=_rows(3, "u")))
    assert chaos.ledger_problems(home) == []


def test_a_bad_lock_timeout_setting_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FGTRAC_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FGTRAC_LOCK_TIMEOUT='soon' is not a number of seconds"):
        Ledger(tmp_path / "home").commit(Commit("p", "a", "r1", rows=_rows(1)))


AUDIT_LOOP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fgtrac_assets.ledger.store import Ledger
    ledger, stop, n = Ledger(sys.argv[1], lock_timeout_s=30), Path(sys.argv[2]), 0
    print("looping", flush=True)
    while not stop.exists():
        ledger.query("SELECT count(*) FROM events")
        n += 1
    print(n, flush=True)
""")


@pytest.mark.slow
def test_a_loop_of_audits_does_not_starve_a_commit(tmp_path):
    """Back-to-back shared locks from audit loops must not keep a writer out (readers queue behind a waiting writer)."""
    home = tmp_path / "home"
    Ledger(home).commit(Commit("p", "a", "r0", rows=_rows(2000)))
    stop = tmp_path / "stop"
    readers = [subprocess.Popen([sys.executable, "-c", AUDIT_LOOP, str(home), str(stop)], stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    waits = []
    try:
        for r in readers:
            assert r.stdout.readline().strip() == "looping"
        time.sleep(0.5)
        for i in range(8):
            t = time.monotonic()
            Ledger(home, lock_timeout_s=4).commit(Commit("p", "a", f"r{i + 1}", rows=_rows(5, f"w{i}-")))
            waits.append(time.monotonic() - t)
    finally:
        stop.touch()
        audits = [int(r.communicate(timeout=60)[0].strip() or 0) for r in readers]
    assert all(r.returncode == 0 for r in readers)
    assert min(audits) > 0, audits
    assert max(waits) < 2.0, f"commits waited {[round(w, 2) for w in waits]} s behind a loop of audits"
    assert chaos.ledger_problems(home) == []


FORK_HOLD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from fgtrac_assets.ledger.lock import LedgerBusy, ledger_lock
    lock = Path(sys.argv[1])
    with ledger_lock(lock, exclusive=True):
        child = os.fork()
        if child == 0:
            time.sleep(5)
            os._exit(0)
    try:
        with ledger_lock(lock, exclusive=True, timeout_s=1):
            print("free")
    except LedgerBusy:
        print("still held by the forked child")
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
""")


def test_the_lock_ends_with_its_block_even_if_a_child_was_forked_meanwhile(tmp_path):
    """A process forked while the lock is held shares the lock's file description; the lock must not outlive its block."""
    r = subprocess.run([sys.executable, "-c", FORK_HOLD, str(tmp_path / "ledger.lock")], capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.strip() == "free", r


def test_verifies_finishing_together_update_the_witness_safely(tmp_path):
    """Two verifies at once (say a loop of audits beside a scheduled check) must both be able to write the witness."""
    import threading

    from fgtrac_assets.ledger.witness import write_witness

    witness, errors = tmp_path / "witness" / "log.checkpoint", []

    def verify_like(n):
        for i in range(500):
            try:
                write_witness(witness, f"fgtrac.local/ledger\n{i}\nroot-{n}\n" * 20)
            except OSError as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=verify_like, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
