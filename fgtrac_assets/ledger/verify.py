"""Recompute every leaf, node, signature and artifact hash; report each difference found."""

from dataclasses import asdict, dataclass, field

from pathlib import Path

from ..integrity import merkle, notes
from .artifacts import check_artifact
from .groups import group_problems, member_count
from .leaves import row_leaf, table_leaves
from .nodes import TILE_HEIGHT, TILE_WIDTH, all_tiles
from .proofs import check_training_sets
from .schema import LEAF_ORDER, physical
from .store import Ledger
from .witness import check_witness, default_witness, write_witness


@dataclass(frozen=True)
class Finding:
    """One thing that does not hold: where (table, row, asset, sample) and what differs."""

    table: str
    row: str
    what: str
    asset: str | None = None
    sample: str | None = None

    def line(self) -> str:
        """Return the finding as one human-readable line."""
        where = f"{self.table} {self.row}"
        extra = ", ".join(x for x in (f"asset {self.asset}" if self.asset else "",
                                      f"sample {self.sample[:16]}…" if self.sample else "") if x)
        return f"{where}{f' ({extra})' if extra else ''}: {self.what}"

    def to_dict(self) -> dict:
        """Return the finding as a JSON-ready dict."""
        return asdict(self)


@dataclass
class Report:
    """The outcome of a full verify."""

    findings: list[Finding]
    notices: list[str] = field(default_factory=list)
    leaves: int = 0
    tree_heads: int = 0
    artifacts: int = 0
    rows: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.findings


def verify_ledger(ledger: Ledger, witness: Path | None = None, trusted_keys: list[str] | None = None,
                  update_witness: bool = True) -> Report:
    """Return a Report over the whole ledger: rows vs leaves, leaves vs tree, tree heads vs signatures and witness, artifacts vs files.

    witness: the file holding the last verified tree head (default $FGTRAC_HOME/witness/<origin>.checkpoint);
    trusted_keys: verifier keys to trust instead of those stored under $FGTRAC_HOME/keys.
    """
    findings: list[Finding] = []
    notices: list[str] = []
    with ledger.reader() as con:
        existing = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        # ledgers written before event groups lack their tables (and keep a plain `events`) until their next write
        grouped = "group_members" in existing
        stored = {t: physical(t) if grouped else t for t in LEAF_ORDER if grouped or t != "event_groups"}
        missing = [t for t in [*stored.values(), "log_tiles", "tree_heads"] if t not in existing]
        if missing and not existing & {*stored.values(), "log_tiles", "tree_heads"}:
            return Report([], ["the ledger file holds no tables: nothing was ever committed (an interrupted first run)"])
        if missing:
            return Report([Finding("ledger", "schema", f"missing tables {missing}: the ledger file is damaged or foreign")])
        tiles = all_tiles(con)
        heads = con.execute("SELECT size, root, note, verifier_key, asset FROM tree_heads ORDER BY size, created_at").fetchall()
        tables = {t: con.sql(f"SELECT * FROM {name}").to_arrow_table() for t, name in stored.items()}
        for leaf, problem, asset, sample in group_problems(con) if grouped else []:
            findings.append(Finding("events", f"row leaf_index={leaf}", problem, asset, sample))
        members = member_count(con) if grouped else 0
        artifacts = tables["artifacts"].to_pylist()
        for run, problem in check_training_sets(con):
            findings.append(Finding("training_sets", f"training_run={run}", problem))

    logged, problem = _leaf_hashes(tiles.pop(0, []))
    if problem:
        findings.append(Finding("log_tiles", problem[0], problem[1]))
    size = len(logged)

    claimed = bytearray(size)  # how many rows claim each leaf (saturating at 2)
    for table, tbl in tables.items():
        indexes = tbl.column("leaf_index").to_pylist()
        try:
            leaves = table_leaves(table, tbl)
        except ValueError:  # a value no leaf can hold: find the row(s) one by one
            leaves = [_leaf_or_none(table, r) for r in tbl.to_pylist()]
        hashed = [None if x is None else merkle.leaf_hash(x) for x in leaves] if None in leaves \
            else merkle.leaf_hashes(leaves)
        for row_no, (i, leaf, h) in enumerate(zip(indexes, leaves, hashed)):
            if i is not None and 0 <= i < size and claimed[i] == 0 and h is not None and h == logged[i]:
                claimed[i] = 1
                continue
            row = tbl.slice(row_no, 1).to_pylist()[0]
            where = f"row leaf_index={i}"
            asset, sample = row.get("asset"), row.get("sample_id") or row.get("test_sample_id")
            if i is None or not 0 <= i < size:
                findings.append(Finding(table, where, f"claims a leaf outside the log (size {size}): a row added "
                                        "outside fgtrac", asset, sample))
            elif claimed[i]:
                findings.append(Finding(table, where, f"leaf {i} is claimed by another row too: a duplicated row",
                                        asset, sample))
            elif leaf is None:
                claimed[i] = 1
                findings.append(Finding(table, where, "holds a value no leaf can encode (row changed)", asset, sample))
            else:
                claimed[i] = 1
                findings.append(Finding(table, where, "content differs from the logged leaf (row changed)", asset, sample))
    for i in (j for j in range(size) if not claimed[j]):
        findings.append(Finding("log", f"leaf {i}", "logged, but no ledger row holds it (row deleted)"))

    levels = merkle.build_levels(logged)
    for t, stored in tiles.items():
        level = t * TILE_HEIGHT
        for k, hashes in stored:
            first = k * TILE_WIDTH
            expect = levels[level][first:first + len(hashes)] if level < len(levels) else []
            if hashes != expect:
                findings.append(Finding("log_tiles", f"level {level} tile {k}", "stored hashes differ from the "
                                        "hashes recomputed from the leaves"))

    def perfect(level: int, index: int) -> bytes:
        return levels[level][index]

    try:
        verifiers = ([notes.parse_verifier_key(k) for k in trusted_keys] if trusted_keys
                     else ledger.keystore.verifiers())
    except ValueError as exc:
        return Report([Finding("keys", "verifier keys", str(exc))])
    if not verifiers and heads:
        findings.append(Finding("keys", str(ledger.home.keys), "no verifier key: the tree heads cannot be checked"))
    for head_size, root, note, _vkey, asset in heads:
        where = f"size={head_size}"
        try:
            text = notes.open_note(note, verifiers)
            cp = notes.parse_checkpoint(text)
        except ValueError as exc:
            findings.append(Finding("tree_heads", where, f"signature does not verify ({exc})", asset))
            continue
        if cp.size != head_size or cp.root != bytes(root):
            findings.append(Finding("tree_heads", where, "signed checkpoint differs from the row's size/root", asset))
        if cp.size > size:
            findings.append(Finding("tree_heads", where, f"signed size {cp.size} exceeds the log's {size} leaves "
                                    "(log truncated)", asset))
            continue
        if merkle.root_from(perfect, cp.size) != cp.root:
            findings.append(Finding("tree_heads", where, "signed root differs from the root recomputed from the "
                                    "ledger's rows (log rewritten)", asset))

    for art in artifacts:
        problem = check_artifact(ledger.home.root, art["path"], art["sha256"])
        if problem:
            findings.append(Finding("artifacts", f"{art['path']}", problem, art.get("asset")))

    committed = {a["path"] for a in artifacts}
    if ledger.home.artifacts.is_dir():
        stray = [p.relative_to(ledger.home.root).as_posix() for p in ledger.home.artifacts.rglob("*")
                 if p.is_file() and p.relative_to(ledger.home.root).as_posix() not in committed]
        partial = [p for p in stray if ".partial-" in p]
        if stray:
            notices.append(f"{len(stray)} file(s) under artifacts/ were never committed ({len(partial)} partial "
                           f"writes), left by interrupted runs; they are not part of the record, e.g. {stray[0]}")

    signed = max((h[0] for h in heads), default=0)
    if size > signed:
        findings.append(Finding("log leaves", f"{signed}..{size - 1}", "no signed tree head covers them "
                                "(appended outside fgtrac, or a commit was interrupted)"))

    witness_path = witness or default_witness(ledger.home.witness, ledger.origin)
    if witness_path.exists():
        problem = check_witness(witness_path, verifiers, perfect, size)
        if problem:
            findings.append(Finding("witness", str(witness_path), problem))
    elif witness is not None:
        findings.append(Finding("witness", str(witness_path), "the witness file is missing"))
    elif heads:
        notices.append(f"no witness at {witness_path} (first verify, or it was removed): rollback since the last "
                       "verify cannot be checked; a new witness is written now")
    if not findings and heads and update_witness:
        write_witness(witness_path, max(heads, key=lambda h: h[0])[2])

    return Report(findings, notices, leaves=size, tree_heads=len(heads), artifacts=len(artifacts),
                  rows={t: len(tbl) + (members if t == "events" else 0) for t, tbl in tables.items()})


def _leaf_hashes(tiles: list[tuple[int, list[bytes]]]) -> tuple[list[bytes], tuple[str, str] | None]:
    """Return the leaf hashes held by the level-0 tiles, up to the first gap or short tile, and what is wrong."""
    logged: list[bytes] = []
    for k, hashes in tiles:
        if k * TILE_WIDTH != len(logged):
            return logged, (f"level 0 tile {k}", f"tiles are not contiguous (expected leaf {len(logged)})")
        logged.extend(hashes)
        if len(hashes) < TILE_WIDTH and k != tiles[-1][0]:
            return logged, (f"level 0 tile {k}", f"a partial tile ({len(hashes)} hashes) before the last one")
    return logged, None


def _leaf_or_none(table: str, row: dict) -> bytes | None:
    try:
        return row_leaf(table, row)
    except ValueError:
        return None
