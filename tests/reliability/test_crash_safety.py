"""Crash safety: SIGKILL the chain at random points; the ledger keeps only whole materialisations and verifies.

The chain (fgtrac_assets.pipelines.stages: ingest -> preprocess -> train -> select -> gradients -> influence)
runs in child processes of a warm fork server (chaos.ChainServer), 300 digits and 2 epochs, all into one
FGTRAC_HOME. A first complete run measures the chain; then the test kills runs at times drawn with a seeded
RNG: most uniformly over [0, duration], plus one at a uniform point of each stage, of each stage's ledger
commit (the DuckDB transaction) and of each stage's artifact write, so that kills land in every stage and in
every kind of critical section whatever the draw. After every kill:
`fgtrac verify` exits 0, the ledger holds only whole materialisations (chaos.ledger_problems), every commit the
run saw succeed is there, and the only files left behind are uncommitted ones, which verify reports as such
(partial writes are also named `.NAME.partial-PID` after the killed process).
At the end a full run completes into the same home and verifies.

The other tests kill the very first commit of a fresh home (DuckDB creates the file before the schema exists)
at steps of 5 ms: verify must not call what is left damaged, and the next run must complete.
"""

import os
import random

import pytest

try:
    from . import chaos
except ImportError:
    import chaos

SEED = 20261124
UNIFORM_KILLS = 12
MIN_KILLS = 20
# the artifact each stage writes (a part of its path), for kills in the middle of a write
WRITES = {"raw_samples": "/raw/", "preprocessed_samples": "/preprocessed/", "training_checkpoints": "/checkpoints/",
          "gradient_cache": "/gradient_cache-", "influence_scores": "/influence-"}


def _check_after_kill(home, outcome, killed_pids):
    lost = chaos.missing_commits(home, outcome.acknowledged())
    assert not lost, f"commits acknowledged before a kill in {outcome.where()} are missing: {lost}"
    rc, out = chaos.verify_cli(home)
    assert rc == 0 and "FAIL" not in out, f"verify failed after a kill in {outcome.where()}:\n{out}"
    problems = chaos.ledger_problems(home)
    assert not problems, f"after a kill in {outcome.where()}: " + "; ".join(problems)
    partial, whole = chaos.uncommitted_files(home)
    for p in partial:
        pid = int(chaos.PARTIAL.match(p.name)["pid"])
        assert pid in killed_pids and not chaos.pid_alive(pid), \
            f"{p} is a partial write of process {pid}, which was not a killed chain run"
    if partial or whole:  # and verify names them as left over, never as part of the record
        assert f"{len(partial) + len(whole)} file(s) under artifacts/ were never committed ({len(partial)} partial" \
            in out, f"verify does not report the {len(partial) + len(whole)} uncommitted file(s):\n{out}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with chaos.ChainServer(tmp_path_factory.mktemp("chain-server")) as s:
        yield s


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_only_whole_materialisations(server, tmp_path):
    rng = random.Random(SEED)
    home = tmp_path / "home"
    measured = server.run(home)
    assert measured.completed, server.stderr_tail()
    duration = measured.duration
    plan = [("uniform", None, rng.uniform(0, duration)) for _ in range(UNIFORM_KILLS)]
    for stage in chaos.STAGES:
        _, length = measured.window("stage_begin", "stage_end", stage)
        plan.append((f"in {stage}", ("stage_begin", stage), rng.uniform(0, length)))
        _, length = measured.window("commit_begin", "commit_end", stage)
        plan.append((f"in the commit of {stage}", ("commit_begin", stage), rng.uniform(0, length)))
        if stage in WRITES:
            _, length = measured.window("write_begin", "write_end", WRITES[stage])
            plan.append((f"in an artifact write of {stage}", ("write_begin", WRITES[stage]), rng.uniform(0, length)))
    rng.shuffle(plan)

    kills, killed_pids, completed, acks, partials = [], set(), 1, measured.acknowledged(), set()
    for label, trigger, delay in plan:
        outcome = server.run(home, kill_after=delay, kill_on=trigger)
        acks += outcome.acknowledged()
        partials |= {p.name for p in chaos.uncommitted_files(home)[0]}
        if not outcome.killed:  # finished before the signal: a normal run
            assert outcome.completed, server.stderr_tail()
            completed += 1
            continue
        assert outcome.status is not None and os.WIFSIGNALED(outcome.status)
        killed_pids.add(outcome.pid)
        kills.append((label, round(outcome.killed_at - outcome.started, 3), outcome.where()))
        _check_after_kill(home, outcome, killed_pids)

    final = server.run(home)
    assert final.completed, server.stderr_tail()
    acks += final.acknowledged()

    where = [w for _, _, w in kills]
    print(f"\n{len(kills)} kills over a {duration:.2f} s chain, {completed} runs completed:")
    for label, t, w in kills:
        print(f"  {label:40s} t={t:6.3f}s  landed in {w}")
    assert len(kills) >= MIN_KILLS
    assert {w.split(" (")[0] for w in where} >= set(chaos.STAGES), f"not every stage was hit: {where}"
    assert sum("(commit)" in w for w in where) >= 3, f"too few kills inside a ledger commit: {where}"
    assert sum("(write)" in w for w in where) >= 2, f"too few kills inside an artifact write: {where}"
    assert partials, "no kill left a partial artifact file: the marking of partial writes went untested"

    rc, out = chaos.verify_cli(home)
    assert rc == 0, out
    assert chaos.ledger_problems(home) == []
    assert chaos.missing_commits(home, acks) == [], "an acknowledged commit was lost"
    from fgtrac_assets.ledger.store import Ledger

    assets = Ledger(home).query("SELECT asset FROM materializations WHERE run_id = ?", [final.run_id]).column(0)
    assert sorted(assets.to_pylist()) == sorted(chaos.STAGES)
    # leftovers are only uncommitted files: partial writes marked with a killed process's pid, or whole files
    # that no ledger row names (written just before a commit that never happened)
    partial, whole = chaos.uncommitted_files(home)
    assert all(int(chaos.PARTIAL.match(p.name)["pid"]) in killed_pids for p in partial)
    assert not {p.relative_to(home).as_posix() for p in partial + whole} & chaos.committed_paths(home)


FIRST_COMMIT_DELAYS_S = [x / 1000 for x in range(0, 60, 5)]


@pytest.mark.slow
def test_verify_after_a_kill_during_the_first_commit_of_a_fresh_home(server, tmp_path):
    """DuckDB creates the file, then the schema DDL runs: a kill in between must not leave a ledger verify calls damaged."""
    failures = []
    for i, delay in enumerate(FIRST_COMMIT_DELAYS_S):
        home = tmp_path / f"home{i}"
        outcome = server.run(home, kill_on=("commit_begin", "raw_samples"), kill_after=delay)
        rc, out = chaos.verify_cli(home)
        if rc != 0:
            failures.append(f"kill {delay * 1000:.0f} ms into the first commit ({outcome.where()}): {out.strip()}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_a_fresh_home_recovers_from_a_kill_during_its_first_commit(server, tmp_path):
    """Whatever the kill left (no file, a ledger without tables, an uncommitted transaction), the next run completes."""
    for i, delay in enumerate(FIRST_COMMIT_DELAYS_S[1::4]):
        home = tmp_path / f"home{i}"
        server.run(home, kill_on=("commit_begin", "raw_samples"), kill_after=delay)
        assert server.run(home).completed, server.stderr_tail()
        rc, out = chaos.verify_cli(home)
        assert rc == 0, out
        assert chaos.ledger_problems(home) == []


def test_uncommitted_artifact_files_are_reported_by_verify(tmp_path):
    """A file a stage wrote whose commit never happened (the run was killed) is named by verify as uncommitted."""
    import pyarrow as pa

    from fgtrac_assets.ledger.store import Commit, Ledger
    from fgtrac_assets.ledger.verify import verify_ledger
    from fgtrac_assets.pipelines import stages

    ledger = Ledger(tmp_path / "home")
    ledger.commit(Commit("digits_cnn", "raw_samples", "r1", rows={"events": [{"sample_id": "s", "kind": "ingested"}]}))
    # exactly what ingest writes before its commit
    stages.write_parquet(ledger, "digits_cnn/raw/killed-run.parquet", "raw_samples", pa.table({"x": [1]}))
    report = verify_ledger(ledger, update_witness=False)
    assert report.ok
    assert any("never committed" in n and "killed-run.parquet" in n for n in report.notices), report.notices


def test_a_new_ledger_file_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """DuckDB writes a new file's headers in steps (a kill between them left a file it cannot open): it is built aside."""
    from fgtrac_assets.ledger import store
    from fgtrac_assets.ledger.store import Commit, Ledger
    from fgtrac_assets.ledger.verify import verify_ledger

    ledger = Ledger(tmp_path / "home")
    row = Commit("digits_cnn", "raw_samples", "r1", rows={"events": [{"sample_id": "s", "kind": "ingested"}]})

    def killed(*_):
        raise KeyboardInterrupt  # the process dies after building the file, before moving it into place

    monkeypatch.setattr(store.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ledger.commit(row)
    monkeypatch.undo()
    home = ledger.home.root
    assert not ledger.home.ledger.exists() and list(home.glob(".ledger.duckdb.creating-*"))
    ledger.commit(row)
    assert not list(home.glob(".ledger.duckdb.creating-*"))
    assert verify_ledger(ledger, update_witness=False).ok
