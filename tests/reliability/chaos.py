"""Helpers for the crash and concurrency tests and benchmarks/soak.py (not a test module).

ChainServer: a warm fork server that runs the digits chain (fgtrac_assets.pipelines.stages, called directly)
in child processes, reporting stage, artifact-write and commit boundaries as they happen, so a caller can
SIGKILL a child at a chosen moment. Forking from a process that has already imported torch, sklearn and
matplotlib saves the ~2-5 s of imports each fresh interpreter would spend, so many kills fit in a short test.

ledger_problems / uncommitted_files / verify_cli: the checks made after every kill.
"""

import contextlib
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("raw_samples", "preprocessed_samples", "training_checkpoints", "selected_checkpoints",
          "gradient_cache", "influence_scores")
PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")

_SERVER = r'''
import json, os, sys, time, traceback

# Warm every lazy import of the chain so a forked child starts working at once. Nothing here opens the
# ledger or a DuckDB/Arrow thread pool: the children inherit no locks, connections or threads.
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import sklearn.datasets  # noqa: F401
import torch, torch.optim, torch._dynamo  # noqa: F401,E401
import pyarrow.parquet  # noqa: F401
from fgtrac_assets.attribution import ghost, selection  # noqa: F401
from fgtrac_assets.ledger import artifacts, store
from fgtrac_assets.pipelines import stages
from fgtrac_assets.pipelines.base import IngestSettings, TrainSettings
from fgtrac_assets.pipelines.digits import DigitsPipeline
from fgtrac_assets.pipelines.digits import build_cnn
from fgtrac_assets.report import plots
from fgtrac_assets.tracing import tracer  # noqa: F401

# Also run what the first training step, checkpoint save and plot would initialise lazily (autograd, the
# optimiser, matplotlib's fonts), on one torch thread so that no OpenMP pool exists when the server forks.
torch.set_num_threads(1)
_m = build_cnn(10)
_opt = torch.optim.SGD(_m.parameters(), lr=0.1)
torch.nn.functional.cross_entropy(_m(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
_opt.step()
import io as _io
torch.save(_m.state_dict(), _io.BytesIO())
plots.loss_curve([(0, 1.0, 1.1), (1, 0.5, 0.6)], [1])
plots.histogram([0.1, 0.2, 0.3], "warm-up", "x")
del _m, _opt


def emit(event, arg=""):
    sys.stdout.write(f"EV {os.getpid()} {time.monotonic():.6f} {event} {arg}\n")
    sys.stdout.flush()


def instrument():
    from fgtrac_assets.pipelines.stages import commit as stage_commit, training as stage_train

    commit, write = store.Ledger.commit, stage_commit.write_artifact

    def traced_commit(self, c):
        emit("commit_begin", c.asset)
        out = commit(self, c)
        emit("commit_end", f"{c.asset} {c.run_id} {out.leaf_start} {out.leaf_count}")
        return out

    def traced_write(root, relpath, kind, fn):
        emit("write_begin", relpath)
        out = write(root, relpath, kind, fn)
        emit("write_end", relpath)
        return out

    store.Ledger.commit = traced_commit
    stage_commit.write_artifact = stage_train.write_artifact = traced_write  # every artifact a stage writes


def chain(home, run_id, limit, epochs):
    instrument()
    ledger, p = store.Ledger(home), DigitsPipeline()
    settings = TrainSettings(epochs=epochs, lr=0.1, batch_size=32, seed=0, schedule="cosine")
    emit("start", run_id)

    def stage(name, fn, *args, **kw):
        emit("stage_begin", name)
        r = fn(ledger, p, run_id, *args, **kw)
        emit("stage_end", name)
        return r

    raw = stage("raw_samples", stages.ingest, IngestSettings(limit=limit))
    prep = stage("preprocessed_samples", stages.preprocess, raw.handle)
    tr = stage("training_checkpoints", stages.train, prep.handle, settings)
    sel = stage("selected_checkpoints", stages.select, tr.handle)
    g = stage("gradient_cache", stages.gradients, prep.handle, tr.handle, sel.handle)
    stage("influence_scores", stages.influence, g.handle)
    emit("done", run_id)


print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            chain(**cmd)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(f"PID {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"EXIT {pid} {status}", flush=True)
'''


@dataclass
class Outcome:
    """What happened to one chain run: its events (monotonic time, name, arg), how it ended, where it was killed."""

    pid: int
    run_id: str
    events: list[tuple[float, str, str]] = field(default_factory=list)
    started: float = 0.0
    killed: bool = False
    killed_at: float | None = None
    status: int | None = None

    @property
    def completed(self) -> bool:
        return not self.killed and self.status == 0 and any(e[1] == "done" for e in self.events)

    @property
    def duration(self) -> float:
        return self.events[-1][0] - self.started if self.events else 0.0

    def where(self) -> str:
        """Return where the kill landed: the stage, and 'commit' or 'write' if inside one."""
        if not self.killed:
            return "not killed"
        stage, inner = "before raw_samples", ""
        for t, name, arg in self.events:
            if t > self.killed_at:
                break
            if name == "stage_begin":
                stage, inner = arg, ""
            elif name == "stage_end":
                stage, inner = f"after {arg}", ""
            elif name in ("commit_begin", "write_begin"):
                inner = name.split("_")[0]
            elif name in ("commit_end", "write_end"):
                inner = ""
        return f"{stage} ({inner})" if inner else stage

    def window(self, begin: str, end: str, arg: str | None = None) -> tuple[float, float] | None:
        """Return (start offset from run start, length) of the first begin..end pair (whose arg contains arg)."""
        t0 = None
        for t, name, a in self.events:
            if name == begin and (arg is None or arg in a) and t0 is None:
                t0 = t
            elif name == end and t0 is not None and (arg is None or arg in a):
                return t0 - self.started, t - t0
        return None

    def acknowledged(self) -> list[tuple[str, str, int, int]]:
        """Return the commits this run saw succeed: (asset, run_id, leaf_start, leaf_count)."""
        out = []
        for _, name, arg in self.events:
            if name == "commit_end":
                asset, run_id, start, count = arg.split(" ")
                out.append((asset, run_id, int(start), int(count)))
        return out


class ChainServer:
    """A warm fork server for digits chain runs; use as a context manager."""

    def __init__(self, log_dir: Path, python: str = sys.executable):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / "chain-server.stderr"
        self._stderr = open(self.stderr_path, "ab")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        self.proc = subprocess.Popen([python, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, bufsize=1, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.lines.get(timeout=120)
        if line != "READY":
            raise RuntimeError(f"chain server did not start: {line!r}; see {self.stderr_path}")
        self.runs = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("EOF")

    def __enter__(self) -> "ChainServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def stderr_tail(self, n: int = 3000) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-n:]

    def run(self, home: Path, limit: int = 300, epochs: int = 2, kill_after: float | None = None,
            kill_on: tuple[str, str | None] | None = None, timeout: float = 300) -> Outcome:
        """Run the chain into home; SIGKILL it kill_after seconds after it starts (or after event kill_on).

        kill_on = (event name, None or a substring of its arg): the countdown kill_after starts when the first such
        event is seen instead. Events: start, stage_begin/stage_end STAGE, write_begin/write_end RELPATH,
        commit_begin ASSET, commit_end "ASSET RUN_ID LEAF_START LEAF_COUNT", done.
        """
        self.runs += 1
        run_id = f"crash{self.runs:04d}{os.getpid():x}{time.time_ns() & 0xffffff:06x}"
        self.proc.stdin.write(json.dumps({"home": str(home), "run_id": run_id, "limit": limit, "epochs": epochs}) + "\n")
        self.proc.stdin.flush()
        out: Outcome | None = None
        pending: list[str] = []
        deadline_run = time.monotonic() + timeout
        kill_at = None
        while True:
            wait = None if kill_at is None else max(0.0, kill_at - time.monotonic())
            wait = min(wait if wait is not None else 1.0, max(0.0, deadline_run - time.monotonic()) + 0.1)
            try:
                line = self.lines.get(timeout=wait)
            except queue.Empty:
                line = None
            now = time.monotonic()
            if out is not None and kill_at is not None and not out.killed and now >= kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(out.pid, signal.SIGKILL)
                out.killed, out.killed_at = True, now
            if now > deadline_run and out is not None and not out.killed:
                os.kill(out.pid, signal.SIGKILL)
                raise TimeoutError(f"chain run {run_id} took over {timeout} s")
            if line is None:
                continue
            if line == "EOF":
                raise RuntimeError(f"chain server died: {self.stderr_tail()}")
            if line.startswith("PID "):
                out = Outcome(pid=int(line.split()[1]), run_id=run_id, started=now)
                for held in pending:
                    line_events(out, held)
                pending.clear()
            elif line.startswith("EXIT "):
                _, pid, status = line.split()
                out.status = int(status)
                if out.killed and os.WIFEXITED(out.status):  # it finished before the signal landed
                    out.killed = False
                return out
            elif line.startswith("EV "):
                if out is None:
                    pending.append(line)
                    continue
                line_events(out, line)
            if out is None or out.killed or kill_at is not None:
                continue
            if kill_on is None and kill_after is not None and out.events:
                kill_at = out.started + kill_after
            elif kill_on is not None and kill_after is not None:
                for t, name, arg in out.events:
                    if name == kill_on[0] and (kill_on[1] is None or kill_on[1] in arg):
                        kill_at = t + kill_after
                        break


def line_events(out: Outcome, line: str) -> None:
    _, pid, t, name, *arg = line.split(" ", 4)
    if int(pid) != out.pid:
        return
    out.events.append((float(t), name, arg[0] if arg else ""))
    if name == "start":
        out.started = float(t)


# --- checks --------------------------------------------------------------------------------------------------------


def ledger_problems(home: Path) -> list[str]:
    """Return every way the ledger is not a sequence of whole materialisations (empty list: it is).

    Each `materializations` row closes a contiguous leaf range [leaf_start, leaf_start + leaf_count); the
    ranges tile the log from leaf 0 without gaps or overlaps; every leaf-table row lies in exactly one range
    and carries that materialisation's run_id; every range ends at a signed tree head; the stored level-0
    hashes, the rows and the largest signed head all count the same leaves.
    """
    import numpy as np

    from fgtrac_assets.ledger.schema import LEAF_ORDER, physical
    from fgtrac_assets.ledger.store import Ledger

    ledger = Ledger(home)
    if not ledger.exists():
        return []
    problems: list[str] = []
    with ledger.reader() as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "materializations" not in tables:
            return []
        mats = con.execute("SELECT leaf_start, leaf_count, leaf_index, run_id, asset FROM materializations "
                           "ORDER BY leaf_start").fetchall()
        parts, run_parts = [], []
        for t in LEAF_ORDER:
            cols = {r[0] for r in con.execute(f"DESCRIBE {t}").fetchall()}
            run_col = "run_id" if "run_id" in cols else "NULL"
            rows = con.execute(f"SELECT leaf_index, {run_col} FROM {physical(t)}").fetchall()
            parts.extend(r[0] for r in rows)
            run_parts.extend(r[1] for r in rows)
        heads = {r[0] for r in con.execute("SELECT size FROM tree_heads").fetchall()}
        level0 = con.execute("SELECT count(*) FROM log_tree WHERE level = 0").fetchall()[0][0]
    idx = np.array(parts, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    runs = [run_parts[i] for i in order]
    total = sum(c for _, c, *_ in mats)
    signed = max(heads, default=0)
    if len(np.unique(idx)) != len(idx):
        problems.append("some leaf index is held by two rows")
    if not (len(idx) == total == signed == level0):
        problems.append(f"counts differ: {len(idx)} rows, {total} leaves in materialisations, largest signed head "
                        f"{signed}, {level0} logged leaf hashes")
    expected = 0
    for start, count, mat_leaf, run_id, asset in mats:
        where = f"materialisation {asset} of run {run_id} [{start}, {start + count})"
        if start != expected:
            problems.append(f"{where}: starts at {start}, not where the previous one ended ({expected})")
        expected = start + count
        if mat_leaf != start + count - 1:
            problems.append(f"{where}: its own row is at leaf {mat_leaf}, not the range's last leaf")
        lo, hi = np.searchsorted(idx, start), np.searchsorted(idx, start + count)
        if hi - lo != count:
            problems.append(f"{where}: {hi - lo} rows present, {count} expected (a partial materialisation)")
        strangers = {r for r in runs[lo:hi] if r is not None and r != run_id}
        if strangers:
            problems.append(f"{where}: holds rows of other runs {sorted(strangers)}")
        if start + count not in heads:
            problems.append(f"{where}: no signed tree head of size {start + count}")
    outside = int((idx >= expected).sum() + (idx < 0).sum())
    if outside:
        problems.append(f"{outside} row(s) lie outside every materialisation range")
    return problems


def missing_commits(home: Path, acknowledged: list[tuple[str, str, int, int]]) -> list[tuple[str, str, int, int]]:
    """Return the acknowledged commits (asset, run_id, leaf_start, leaf_count) that the ledger does not hold."""
    from fgtrac_assets.ledger.store import Ledger

    if not acknowledged:
        return []
    with Ledger(home).reader() as con:
        held = set(con.execute("SELECT asset, run_id, leaf_start, leaf_count FROM materializations").fetchall())
    return [a for a in acknowledged if a not in held]


def committed_paths(home: Path) -> set[str]:
    from fgtrac_assets.ledger.store import Ledger

    ledger = Ledger(home)
    if not ledger.exists():
        return set()
    with ledger.reader() as con:
        return {r[0] for r in con.execute("SELECT path FROM artifacts").fetchall()}


def uncommitted_files(home: Path) -> tuple[list[Path], list[Path]]:
    """Return (partial writes, whole files) under home that no ledger row commits (ledger, keys, witness aside)."""
    committed = committed_paths(home)
    partial, whole = [], []
    for p in sorted(home.rglob("*")):
        rel = p.relative_to(home)
        if not p.is_file() or rel.parts[0] in ("keys", "witness", "dagster") or rel.parts[0].startswith("ledger."):
            continue
        if rel.as_posix() in committed:
            continue
        (partial if PARTIAL.match(p.name) else whole).append(p)
    return partial, whole


class _PerThread:
    """A sys.stdout/sys.stderr stand-in that sends a thread's writes to its own buffer while it captures."""

    def __init__(self, fallback):
        self.fallback = fallback
        self.local = threading.local()

    def _target(self):
        return getattr(self.local, "buf", None) or self.fallback

    def write(self, s):
        return self._target().write(s)

    def flush(self):
        return self._target().flush()

    def __getattr__(self, name):
        return getattr(self._target(), name)


_install = threading.Lock()


@contextlib.contextmanager
def captured():
    """Capture what this thread writes to sys.stdout and sys.stderr; other threads' output is left alone.

    (contextlib.redirect_stdout swaps the process-wide sys.stdout: two threads using it at once capture each
    other's output.)
    """
    with _install:
        for name in ("stdout", "stderr"):
            if not isinstance(getattr(sys, name), _PerThread):
                setattr(sys, name, _PerThread(getattr(sys, name)))
        streams = sys.stdout, sys.stderr
    bufs = io.StringIO(), io.StringIO()
    for stream, buf in zip(streams, bufs):
        stream.local.buf = buf
    try:
        yield bufs
    finally:
        for stream in streams:
            stream.local.buf = None


def cli(*argv: str) -> tuple[int, str, str]:
    """Run the fgtrac command's main in this thread; return (exit status, stdout, stderr)."""
    from fgtrac_assets.cli import main

    with captured() as (out, err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def verify_cli(home: Path) -> tuple[int, str]:
    """Run `fgtrac --home HOME verify` in this process; return (exit status, stdout + stderr)."""
    rc, out, err = cli("--home", str(home), "verify")
    return rc, out + err


class AuditLoop(threading.Thread):
    """Run `fgtrac audit sql QUERY` (the CLI's main, in this process) in a loop until stopped.

    Audits start once the ledger file exists. results: (exit status, value or output) per audit; the value is
    the query's single number, so callers can check it never goes backwards.
    """

    def __init__(self, home: Path, query: str = "SELECT count(*) AS n FROM events", pause_s: float = 0.02):
        super().__init__(daemon=True)
        self.home, self.query, self.pause_s = home, query, pause_s
        self.stop = threading.Event()
        self.results: list[tuple[int, str]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            if not (self.home / "ledger.duckdb").exists():
                self.stop.wait(0.05)
                continue
            try:
                rc, out, err = cli("--home", str(self.home), "audit", "sql", self.query, "--format", "csv")
            except BaseException as exc:  # noqa: BLE001 - a crash is a failed audit, recorded
                rc, out, err = 99, "", f"{type(exc).__name__}: {exc}"
            lines = out.split()
            self.results.append((rc, lines[1] if rc == 0 and len(lines) == 2 else out + err))
            self.stop.wait(self.pause_s)

    def finish(self) -> "AuditLoop":
        self.stop.set()
        self.join(timeout=60)
        return self

    def failures(self) -> list[str]:
        """Return each failed audit's output, and any count that went backwards."""
        bad = [out for rc, out in self.results if rc != 0]
        counts = [int(out) for rc, out in self.results if rc == 0 and out.isdigit()]
        bad += [f"count went back from {a} to {b}" for a, b in zip(counts, counts[1:]) if b < a]
        return bad


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
