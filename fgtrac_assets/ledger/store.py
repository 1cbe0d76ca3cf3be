"""The DuckDB ledger: append-only tables, the Merkle log beside them, signed tree heads."""

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from ..config import Home, log_origin, resolve_home
from ..errors import FgtracError
from ..integrity import merkle, notes
from .catalog import install_code_definitions
from .groups import RecordedGroups, member_rows, sample_keys, seal_groups
from .keys import KeyHistory, endorse, load_history
from .leaves import row_leaf, table_leaves, to_arrow
from . import witnessing
from .lock import LedgerBusy, ledger_lock
from .nodes import StoredNodes, append_hashes, migrate_log_nodes
from .schema import LEAF_ORDER, LEAF_TABLES, all_ddl, migrate_events_table, physical


class LedgerMissing(FgtracError, FileNotFoundError):
    """There is no ledger file where one was expected."""


class LedgerDamaged(FgtracError, RuntimeError):
    """The ledger, its key or its files are not in a state fgtrac can safely continue from."""


@dataclass
class Commit:
    """What one materialisation commits: rows per leaf table plus its provenance."""

    pipeline: str
    asset: str
    run_id: str
    training_run: str | None = None
    code_version: str = ""
    upstream: Mapping[str, str] = field(default_factory=dict)
    rows: dict[str, pa.Table | list[dict]] = field(default_factory=dict)
    groups: RecordedGroups | None = None  # events logged one leaf per group (recorded by tracing.groups.GroupLog)


@dataclass(frozen=True)
class CommitResult:
    """The log position and signed tree head a commit produced."""

    leaf_start: int
    leaf_count: int
    tree_size: int
    root: bytes
    checkpoint: str
    rows: dict[str, int]
    witnessed: dict[str, str] = field(default_factory=dict)  # witness name -> "cosigned" or why not

    @property
    def root_hex(self) -> str:
        return self.root.hex()


def utc_now() -> str:
    """Return the current UTC time as an ISO 8601 string."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Ledger:
    """The ledger under one FGTRAC_HOME: short locked transactions, read-only audits."""

    def __init__(self, home: Home | str | None = None, lock_timeout_s: float | None = None):
        self.home = home if isinstance(home, Home) else resolve_home(home)
        self.lock_timeout_s = lock_timeout_s
        self.origin = log_origin()

    @property
    def keystore(self) -> notes.KeyStore:
        """Return the signing key's store: $FGTRAC_SIGNING_KEY if set (a key kept outside the home), else keys/."""
        return notes.KeyStore(self.home.keys, os.environ.get("FGTRAC_SIGNING_KEY") or None)

    def exists(self) -> bool:
        """Return whether the ledger file exists."""
        return self.home.ledger.is_file()

    @contextmanager
    def _connect(self, read_only: bool, code_views: bool = True,
                 threads: int | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.exists():
            raise LedgerMissing(f"no ledger at {self.home.ledger}: nothing has been materialised yet")
        if not read_only:
            self.ensure_home()
        with ledger_lock(self.home.lock, exclusive=not read_only, timeout_s=self.lock_timeout_s):
            if not read_only and not self.home.ledger.exists():
                _create_ledger_file(self.home.ledger)
            con = _connect_retrying(str(self.home.ledger), read_only, self.lock_timeout_s, threads)
            try:
                if read_only and code_views:
                    install_code_definitions(con)  # audits read the code's views, never the file's (catalog.py)
                _lock_configuration(con)
                if not read_only and not _schema_current(con):
                    _install_schema(con)
                yield con
            finally:
                con.close()

    @contextmanager
    def reader(self, code_views: bool = True, threads: int | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """Yield a read-only connection held under the shared lock (code_views=False: base tables only, faster).

        threads: DuckDB's worker threads (default: one per core), 1 for a process that is itself one of several.
        """
        with self._connect(read_only=True, code_views=code_views, threads=threads) as con:
            yield con

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        """Return the result of a read-only query as an Arrow table."""
        with self.reader() as con:
            return con.sql(sql, params=params or None).to_arrow_table()

    def commit(self, commit: Commit) -> CommitResult:
        """Append a materialisation's rows and their leaves, and sign the new tree head, atomically."""
        rows, groups = dict(commit.rows), commit.groups
        if groups is not None and groups.groups.num_rows:
            rows["event_groups"] = seal_groups(groups, pipeline=commit.pipeline, run_id=commit.run_id,
                                               asset=commit.asset)
        tables = {t: to_arrow(t, _with_provenance(t, rows[t], commit))
                  for t in LEAF_ORDER if t in rows and t != "materializations"}
        leaves: list[bytes] = []
        for name, tbl in tables.items():
            leaves.extend(table_leaves(name, tbl))
        hashes = merkle.leaf_hashes(leaves)
        self._refuse_fresh_start()
        policy = witnessing.policy_in_force(self.home.root)  # a malformed policy fails before anything is written
        witnessed: dict[str, str] = {}
        with self._connect(read_only=False) as con:
            signer = self._signer(con)
            con.execute("BEGIN TRANSACTION")
            try:
                start = _tree_size(con)
                offset = start
                for name, tbl in tables.items():
                    idx = pa.array(range(offset, offset + tbl.num_rows), type=pa.int64())
                    _insert(con, physical(name), tbl.add_column(0, "leaf_index", idx))
                    if name == "event_groups":  # the members, under their group's leaf
                        keys = sample_keys(con, groups.sample_ids)
                        _insert(con, "group_members", member_rows(groups, idx.to_numpy(), keys))
                    offset += tbl.num_rows
                mat = {"pipeline": commit.pipeline, "asset": commit.asset, "run_id": commit.run_id,
                       "training_run": commit.training_run, "code_version": commit.code_version,
                       "leaf_start": start, "leaf_count": len(leaves) + 1,
                       "upstream": json.dumps(dict(sorted(commit.upstream.items()))), "created_at": utc_now()}
                mat_tbl = to_arrow("materializations", [mat])
                _insert(con, "materializations", mat_tbl.add_column(0, "leaf_index", pa.array([offset], pa.int64())))
                hashes.append(merkle.leaf_hash(row_leaf("materializations", mat)))
                nodes = StoredNodes(con)
                size, root = append_hashes(con, start, hashes, nodes)
                text = notes.format_checkpoint(self.origin, size, root)
                note = signer.sign(text)
                con.execute("INSERT INTO tree_heads VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [size, root, note, signer.verifier_key, commit.pipeline, commit.asset, commit.run_id, mat["created_at"]])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            if policy is not None:  # on this connection: the lock is held at most the witnesses' short timeout
                try:
                    witnessed = _witness(con, policy, size, note, previous=start, nodes=nodes)
                except (duckdb.Error, OSError) as exc:  # the commit is durable: witnessing never undoes it
                    witnessed = {name: f"not stored: {exc}" for name in policy.witnesses}
        counts = {name: tbl.num_rows for name, tbl in tables.items()}
        if "event_groups" in tables:
            counts["events"] = counts.get("events", 0) + groups.num_members
        return CommitResult(leaf_start=start, leaf_count=len(hashes), tree_size=size, root=root,
                            checkpoint=note, rows=counts, witnessed=witnessed)

    def known_samples(self, pipeline: str, sample_ids: list[str]) -> set[str]:
        """Return which of these sample ids the pipeline has ingested before (an empty set for a new ledger)."""
        if not self.exists() or not sample_ids:
            return set()
        with self.reader(code_views=False) as con:
            if not _has_table(con, "samples"):
                return set()  # a file a killed first commit left without its schema
            con.register("_ids", pa.table({"sample_id": sample_ids}))
            rows = con.execute("SELECT DISTINCT s.sample_id FROM samples s JOIN _ids USING (sample_id) "
                               "WHERE s.pipeline = ?", [pipeline]).fetchall()
        return {r[0] for r in rows}

    def has_training_run(self, training_run: str) -> bool:
        """Return whether a training set of this run is committed (False for a new ledger)."""
        if not self.exists():
            return False
        with self.reader(code_views=False) as con:
            return _has_table(con, "training_sets") and con.execute(
                "SELECT count(*) FROM training_sets WHERE training_run = ?", [training_run]).fetchall()[0][0] > 0

    def committed_rows(self, table: str, leaf_start: int, leaf_count: int) -> list[dict]:
        """Return the rows of a leaf table that one commit logged (its leaf range), in log order."""
        cols = [c for c, _ in LEAF_TABLES[table]]
        with self.reader(code_views=False) as con:
            got = con.execute(f"SELECT {', '.join(cols)} FROM {physical(table)} WHERE leaf_index >= ? "
                              "AND leaf_index < ? ORDER BY leaf_index", [leaf_start, leaf_start + leaf_count])
            return [dict(zip(cols, r)) for r in got.fetchall()]

    def witness_sync(self) -> dict[str, str]:
        """Submit the latest signed tree head to every witness of the policy again; return each one's outcome."""
        policy = witnessing.policy_in_force(self.home.root)
        if policy is None:
            raise LedgerDamaged(f"no witness policy: set FGTRAC_POLICY or write {self.home.root / 'policy'}")
        head = self.latest_tree_head()
        if head is None:
            return {}
        with self._connect(read_only=False) as con:
            return _witness(con, policy, head["size"], head["note"])

    def ensure_home(self) -> "Home":
        """Return the home after making sure it is a writable directory; raise LedgerDamaged saying why not."""
        try:
            self.home.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerDamaged(f"FGTRAC_HOME {self.home.root} is not a usable directory ({exc.strerror or exc})") from None
        if not os.access(self.home.root, os.W_OK):
            raise LedgerDamaged(f"FGTRAC_HOME {self.home.root} is not writable")
        return self.home

    def _refuse_fresh_start(self) -> None:
        """Refuse to start a new, empty ledger where one existed: that would silently forget history."""
        if self.exists():
            return
        # keys are made inside the first commit, the witness by a verify: either means a ledger existed
        # (artifacts alone do not: a stage writes its files before its first commit)
        leftovers = [p for p in (self.home.keys, self.home.witness) if p.is_dir() and any(p.iterdir())]
        if leftovers:
            raise LedgerDamaged(f"{self.home.ledger} is missing but {', '.join(p.name + '/' for p in leftovers)} "
                                "exist: the ledger was lost or moved; restore it rather than start a new history")

    def _signer(self, con: duckdb.DuckDBPyConnection) -> notes.LogSigner:
        """Return the signing key: the current key of the ledger's key history (keys.py), never another one."""
        expected = load_history(con, self.origin)[0].current_key
        store = self.keystore
        if expected is None:
            return store.load_or_create(self.origin)
        held = store.current_verifier_key(self.origin)
        if held != expected and store.pending_verifier_key(self.origin) == expected:
            return store.promote(self.origin)  # a rotation committed just before a crash: finish it
        if held is None:
            raise LedgerDamaged(f"the signing key for {self.origin} is missing under {store.directory} although the "
                                "log has signed tree heads: restore the key (or start a new key deliberately with "
                                "`fgtrac key rotate`)")
        if held != expected:
            raise LedgerDamaged(f"the signing key under {store.directory} ({held}) is not the log's current key "
                                f"({expected}) in the ledger's key history: restore the key; a new key is started "
                                "only with `fgtrac key rotate`, which the retiring key endorses")
        return store.load_or_create(self.origin)

    def initialise(self) -> notes.Signer:
        """Create the home, an empty ledger and the signing key (before any commit, e.g. to configure witnesses)."""
        self._refuse_fresh_start()
        with self._connect(read_only=False) as con:
            return self._signer(con)

    def key_history(self) -> KeyHistory:
        """Return the log's key history as the ledger records it (keys.py)."""
        with self.reader() as con:
            return load_history(con, self.origin)[0]

    def rotate_key(self) -> notes.Signer:
        """Start a new signing key, endorsed by the current one in a committed `log_keys` record; return it."""
        store = self.keystore
        if not self.exists() or store.current_verifier_key(self.origin) is None:
            return store.rotate(self.origin)  # nothing signed yet: no history to extend
        old = store.load_or_create(self.origin)
        new = notes.generate_signer(self.origin)
        store.stage(new)  # kept until the record is committed; a crash in between is finished by _signer
        record = {"origin": self.origin, "verifier_key": new.verifier_key, "previous_key": old.verifier_key,
                  "endorsement": endorse(old, self.origin, new.verifier_key), "created_at": utc_now()}
        self.commit(Commit(pipeline="fgtrac", asset="key_rotation", run_id=f"key-rotation-{new.key_id:08x}",
                           rows={"log_keys": [record]}))
        return store.promote(self.origin)

    def record_verification(self, tree_size: int, ok: bool, findings: int, summary: str) -> None:
        """Append one `fgtrac verify` outcome (shown by the integrity_status view)."""
        with self._connect(read_only=False) as con:
            con.execute("INSERT INTO verifications VALUES (?, ?, ?, ?, ?)", [utc_now(), tree_size, ok, findings, summary])

    def latest_tree_head(self) -> dict | None:
        """Return the newest signed tree head as a dict, or None for an empty log."""
        if not self.exists():
            return None
        rows = self.query("SELECT size, root, note, verifier_key, created_at FROM tree_heads ORDER BY size DESC, created_at DESC LIMIT 1").to_pylist()
        return rows[0] if rows else None


# The digest of every DDL statement: a ledger whose fgtrac_schema row holds it needs no DDL on connect.
SCHEMA_DIGEST = hashlib.sha256("\n".join(all_ddl()).encode()).hexdigest()


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Return whether the file has this table (a killed first commit can leave a file without the schema)."""
    return con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchall()[0][0] > 0


def _with_provenance(table: str, rows: pa.Table | list[dict], commit: Commit) -> pa.Table | list[dict]:
    """Fill the commit's pipeline/run_id/asset/training_run into the rows of a table that has those columns."""
    cols = {c for c, _ in LEAF_TABLES[table]}
    fill = {k: v for k, v in (("pipeline", commit.pipeline), ("run_id", commit.run_id), ("asset", commit.asset),
                              ("training_run", commit.training_run)) if k in cols}
    if isinstance(rows, pa.Table):
        for k, v in fill.items():
            if k not in rows.column_names:
                rows = rows.append_column(k, pa.array([v] * rows.num_rows, pa.string()))
        return rows
    return [{**fill, **{k: v for k, v in r.items() if v is not None or k not in fill}} for r in rows]


def _schema_current(con: duckdb.DuckDBPyConnection) -> bool:
    """Return whether the ledger's tables and views are those of this version (one small query)."""
    try:
        return con.execute("SELECT digest FROM fgtrac_schema").fetchall() == [(SCHEMA_DIGEST,)]
    except duckdb.CatalogException:
        return False


def _witness(con: duckdb.DuckDBPyConnection, policy, size: int, note: str, previous: int | None = None,
             nodes: StoredNodes | None = None) -> dict[str, str]:
    """Submit a committed head to the policy's witnesses; store the cosignatures received; return each outcome."""
    nodes = nodes if nodes is not None else StoredNodes(con)  # the commit's: its tiles are cached already
    submissions = witnessing.plan(nodes, policy, size, previous)
    one_at_a_time = threading.Lock()  # a 409 asks for a proof from a witness's thread

    def proof_from(old: int) -> list[bytes]:
        with one_at_a_time:
            return nodes.run(merkle.consistency_proof_from, old, size)

    outcomes = witnessing.submit(submissions, note, proof_from, witnessing.timeout_s())
    witnessing.store(con, size, policy, outcomes, utc_now())
    return {o.witness: "cosigned" if o.line else o.problem for o in outcomes}


def _install_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create or migrate the schema in one transaction: a kill leaves all of it or none."""
    con.execute("BEGIN TRANSACTION")
    migrate_events_table(con)
    for ddl in all_ddl():
        con.execute(ddl)
    migrate_log_nodes(con)
    con.execute("CREATE OR REPLACE TABLE fgtrac_schema AS SELECT ? AS digest", [SCHEMA_DIGEST])
    con.execute("COMMIT")


def _create_ledger_file(path: Path) -> None:
    """Make a new ledger file with its schema under a temporary name, then move it into place.

    DuckDB writes a new file's headers in several steps; killed between them, it leaves a file it cannot open
    again. Built aside and renamed, the ledger file either does not exist or is whole. Called under the
    exclusive lock, so a temporary file left by a killed creator can be removed.
    """
    for stale in path.parent.glob(f".{path.name}.creating-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    con = duckdb.connect(str(tmp), config={"enable_external_access": False})
    try:
        _install_schema(con)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _lock_configuration(con: duckdb.DuckDBPyConnection) -> None:
    """Lock the connection's configuration, so SQL cannot turn file access back on."""
    try:
        con.execute("SET lock_configuration = true")
    except duckdb.InvalidInputException:
        pass  # another connection of this process to the same file locked the shared database already


def _connect_retrying(path: str, read_only: bool, timeout_s: float | None,
                      threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """Open DuckDB, retrying while a process outside fgtrac's lock holds the file."""
    deadline = time.monotonic() + (600 if timeout_s is None else timeout_s)
    delay = 0.05
    while True:
        try:
            # no file access from SQL: not read_text, COPY, ATTACH, EXPORT (a user's `audit sql` runs here too)
            config: dict = {"enable_external_access": False}
            if threads is not None:
                config["threads"] = threads
            return duckdb.connect(path, read_only=read_only, config=config)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() and ("not a valid" in str(exc).lower() or "corrupt" in str(exc).lower()):
                raise LedgerDamaged(f"{path} is not a readable DuckDB ledger ({str(exc).splitlines()[0]}); "
                                    "restore it from a backup") from None
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                if "lock" in str(exc).lower():
                    raise LedgerBusy(f"{path}: held by another process outside fgtrac ({exc})") from None
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _insert(con: duckdb.DuckDBPyConnection, table: str, tbl: pa.Table) -> None:
    if tbl.num_rows == 0:
        return
    con.register("_fgtrac_rows", tbl)
    try:
        con.execute(f"INSERT INTO {table} SELECT * FROM _fgtrac_rows")
    finally:
        con.unregister("_fgtrac_rows")


def _tree_size(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT coalesce(max(size), 0) FROM tree_heads").fetchall()[0][0]
