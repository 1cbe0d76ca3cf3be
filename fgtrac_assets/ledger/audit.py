"""Named audits over the ledger's views; every one is a read-only query."""

import json

import duckdb

from ..errors import FgtracError
from .store import Ledger


class AuditError(FgtracError, ValueError):
    """An audit that cannot be answered as asked (unknown or ambiguous id, a write attempted)."""


def resolve_sample(con: duckdb.DuckDBPyConnection, prefix: str) -> str:
    """Return the sample id that starts with prefix, or whose source is exactly it (a session's sample name)."""
    named = con.execute("SELECT DISTINCT sample_id FROM samples WHERE source = ? LIMIT 2", [prefix.strip()]).fetchall()
    if len(named) == 1:
        return named[0][0]
    prefix = prefix.strip().lower()
    if len(prefix) == 64:
        return prefix
    if len(prefix) < 6:
        raise AuditError(f"sample id {prefix!r}: give at least 6 hex characters, or the sample's name")
    rows = con.execute("SELECT DISTINCT sample_id FROM samples WHERE starts_with(sample_id, ?) LIMIT 3",
                       [prefix]).fetchall()
    if not rows:
        raise AuditError(f"no sample id starts with {prefix}, and no sample is named so")
    if len(rows) > 1:
        raise AuditError(f"sample id prefix {prefix} is ambiguous ({', '.join(r[0][:16] for r in rows)}, …)")
    return rows[0][0]


def resolve_run(con: duckdb.DuckDBPyConnection, prefix: str) -> str:
    """Return the full training run id that starts with prefix ('latest' = the newest run)."""
    if prefix == "latest":
        rows = con.execute("SELECT training_run FROM training_sets ORDER BY leaf_index DESC LIMIT 1").fetchall()
    else:
        rows = con.execute("SELECT DISTINCT training_run FROM training_sets WHERE starts_with(training_run, ?) LIMIT 3",
                           [prefix]).fetchall()
    if not rows:
        raise AuditError(f"no training run {prefix!r}")
    if len(rows) > 1:
        raise AuditError(f"training run prefix {prefix} is ambiguous")
    return rows[0][0]


Result = tuple[list[str], list[tuple]]

#: what preprocessing recorded about each sample in ``ids`` (a subquery yielding sample ids): the detail of its
#: latest ``split`` event (e.g. a rating's user, movie and title), as ``about``
ABOUT_SQL = ("SELECT DISTINCT ON (sample_id) sample_id, detail AS about FROM events "
             "WHERE kind = 'split' AND sample_id IN ({ids}) ORDER BY sample_id, leaf_index DESC")


def describe_about(detail: str | None) -> str:
    """Return a split event's detail as 'key=value, ...' without the split itself ('' when there is nothing else)."""
    if not detail:
        return ""
    try:
        about = json.loads(detail)
    except ValueError:
        return ""
    if not isinstance(about, dict):
        return ""
    return ", ".join(f"{k}={v}" for k, v in about.items() if k != "split" and v is not None)


def describe_group_lrs(step_lrs: list[str]) -> str:
    """Return 'group G lo..hi' (with several optimizers 'optimizer O group G') per parameter group over these steps."""
    ranges: dict[tuple[int, int], list[float]] = {}
    for text in step_lrs:
        for opt, lrs in json.loads(text).items():
            for g, lr in enumerate(lrs):
                ranges.setdefault((int(opt), g), []).append(lr)
    several = len({o for o, _ in ranges}) > 1
    return ", ".join((f"optimizer {o} " if several else "") + f"group {g} {min(v):.4g}"
                     + (f"..{max(v):.4g}" if max(v) != min(v) else "") for (o, g), v in sorted(ranges.items()))


def _q(con, sql: str, params: list | None = None) -> Result:
    rel = con.execute(sql, params or [])
    return [d[0] for d in rel.description], rel.fetchall()


def sample_history(ledger: Ledger, sample: str) -> Result:
    """Return every event of a sample in log order."""
    with ledger.reader() as con:
        sid = resolve_sample(con, sample)
        return _q(con, "SELECT leaf_index, kind, asset, training_run, epoch, step, position, lr, checkpoint_id, detail "
                       "FROM sample_history_of(?)", [sid])


def sample_used(ledger: Ledger, sample: str, run: str, test: str | None = None) -> Result:
    """Return whether a sample was used by a training run (epochs, steps, lrs) and, with test, its influence on it."""
    with ledger.reader() as con:
        sid, rid = resolve_sample(con, sample), resolve_run(con, run)
        cols, rows = _q(con, "SELECT sample_id, training_run, used, epochs, steps, first_step, last_step, min_lr, max_lr "
                             "FROM sample_usage_of(?, ?)", [sid, rid])
        groups = con.execute("SELECT o.lrs FROM optimizer_steps o WHERE o.training_run = ? AND o.applied AND o.step IN "
                             "(SELECT step FROM events WHERE sample_id = ? AND kind = 'batched' AND training_run = ?)",
                             [rid, sid, rid]).fetchall()
        if groups:  # a session-recorded run: every parameter group's lr range over the sample's steps
            cols, rows = cols + ["lrs_by_group"], [rows[0] + (describe_group_lrs([g[0] for g in groups]),)]
        if test is None:
            return cols, rows
        tid = resolve_sample(con, test)
        score = con.execute("SELECT kind, rank, score FROM influence WHERE training_run = ? AND test_sample_id = ? "
                            "AND train_sample_id = ? ORDER BY leaf_index DESC LIMIT 1", [rid, tid, sid]).fetchall()
    influence = f"{score[0][0]} #{score[0][1]}: {score[0][2]:+.6g}" if score else "not among the recorded top-k"
    return cols + ["test_sample_id", "influence"], [rows[0] + (tid, influence)]


def training_run(ledger: Ledger, run: str) -> Result:
    """Return a training run's checkpoints with losses, learning rates and selection, and its committed set."""
    with ledger.reader() as con:
        rid = resolve_run(con, run)
        return _q(con, "SELECT c.checkpoint_id, c.epoch, c.step, c.lr, c.train_loss, c.val_loss, c.selected, "
                       "c.reason, t.size AS training_set_size, t.root AS training_set_root "
                       "FROM checkpoint_summary c JOIN training_sets t USING (training_run) "
                       "WHERE c.training_run = ? ORDER BY c.epoch", [rid])


def lineage(ledger: Ledger) -> Result:
    """Return the asset lineage edges recorded in the ledger."""
    with ledger.reader() as con:
        return _q(con, "SELECT pipeline, upstream_asset, asset FROM asset_lineage ORDER BY ALL")


def influence(ledger: Ledger, test: str, run: str | None = None, method: str | None = None) -> Result:
    """Return a test sample's proponents and opponents from the latest scoring of it (of that run and method).

    A training run may be scored several times and by several methods (attribution/methods.py): the rows shown
    are one scoring's, named in the ``method`` column.
    """
    with ledger.reader() as con:
        tid = resolve_sample(con, test)
        rid = resolve_run(con, run) if run else None
        latest = con.execute("SELECT training_run, run_id FROM influence WHERE test_sample_id = ? "
                             "AND kind IN ('proponent', 'opponent') AND (? IS NULL OR training_run = ?) "
                             "AND (? IS NULL OR method = ?) ORDER BY leaf_index DESC LIMIT 1",
                             [tid, rid, rid, method, method]).fetchall()
        if not latest:
            scored = [r[0] for r in con.execute("SELECT DISTINCT method FROM influence WHERE test_sample_id = ? "
                                                "ORDER BY 1", [tid]).fetchall()]
            if method and scored:
                raise AuditError(f"sample {tid[:16]}… has no {method} scores{' in run ' + rid if rid else ''}; "
                                 f"it was scored by {', '.join(scored)}")
            raise AuditError(f"sample {tid[:16]}… has no influence scores"
                             f"{' in run ' + rid if rid else ''} (is it a test sample?)")
        rid, scoring = latest[0]
        cols, rows = _q(con, "WITH top AS (SELECT kind, rank, train_sample_id, score, method FROM influence "
                             "WHERE test_sample_id = ? AND training_run = ? AND run_id = ? "
                             "AND kind IN ('proponent', 'opponent')) "
                             "SELECT t.kind, t.rank, t.train_sample_id, t.score, s.label, s.source, a.about, t.method "
                             "FROM top t LEFT JOIN (SELECT DISTINCT ON (sample_id) sample_id, label, source "
                             "FROM samples) s ON s.sample_id = t.train_sample_id "
                             f"LEFT JOIN ({ABOUT_SQL.format(ids='SELECT train_sample_id FROM top')}) a "
                             "ON a.sample_id = t.train_sample_id ORDER BY t.kind DESC, t.rank", [tid, rid, scoring])
        return cols, [(*r[:6], describe_about(r[6]), r[7]) for r in rows]


def sql(ledger: Ledger, statement: str) -> Result:
    """Return the result of arbitrary SQL run on a read-only connection; writes fail with AuditError."""
    with ledger.reader() as con:
        try:
            return _q(con, statement)
        except duckdb.Error as exc:
            msg = str(exc).splitlines()[0]
            if "read-only" in msg or "read only" in msg:
                raise AuditError("audits open the ledger read-only: statements that write are refused; "
                                 "nothing was changed") from None
            raise AuditError(msg) from None
