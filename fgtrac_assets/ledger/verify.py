"""Recompute every leaf, node, signature and artifact hash; report each difference found."""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb

from ..integrity import merkle, notes
from ..integrity.cosignature import CosignatureError, verify_cosignature
from ..integrity.policy import Policy
from ..integrity.truststore import TrustStore
from ..witness import client
from . import witnessing
from .artifacts import check_artifact
from .catalog import damaged_tables, is_legacy_layout, reference_objects, schema_differences, schema_objects
from .groups import group_problems, member_count
from .keys import KeyHistory, load_history
from .leaves import row_leaf, table_leaves
from .nodes import TILE_HEIGHT, TILE_WIDTH, all_tiles
from .proofs import check_training_sets
from .schema import LEAF_ORDER, physical
from .store import Ledger, LedgerDamaged
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
                  update_witness: bool = True, policy: Policy | None = None,
                  trust_store: TrustStore | None = None) -> Report:
    """Return a Report over the whole ledger: schema vs code, rows vs leaves, leaves vs tiles, tree heads vs signatures, key history and witness, artifacts vs files.

    witness: the file holding the last verified tree head (default $FGTRAC_HOME/witness/<origin>.checkpoint);
    trusted_keys: verifier keys to trust as the start of the key history instead of the key that signed the
    first tree head; policy: trust only its log keys and require its witnesses' views and quorum (asks each
    witness for its latest cosigned checkpoint); trust_store: log keys pinned on first use outside the home.
    """
    try:
        return _verify(ledger, witness, trusted_keys, update_witness, policy, trust_store)
    except LedgerDamaged as exc:
        return Report([Finding("ledger", "file", str(exc))])
    except duckdb.Error as exc:  # a truncated or byte-flipped file: one finding, no traceback
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Report([Finding("ledger", "file", f"{ledger.home.ledger} cannot be read as a ledger ({first}): "
                               "the file is damaged; restore it from a backup")])


def _verify(ledger: Ledger, witness: Path | None, trusted_keys: list[str] | None, update_witness: bool,
            policy: Policy | None, trust_store: TrustStore | None) -> Report:
    findings: list[Finding] = []
    notices: list[str] = []
    home = ledger.home
    with ledger.reader() as con:
        objects = schema_objects(con)
        ours = {name for kind, name in reference_objects() if kind == "table"}
        if not {name for kind, name in objects if kind == "table"} & ours:
            return _not_a_ledger(ledger, objects)
        differences = schema_differences(con)
        findings += [Finding("schema", label, what) for label, what in differences]
        if damaged_tables(differences):  # rows cannot be read as fgtrac's: report the schema alone
            return Report(findings, notices)
        # ledgers written before event groups keep a plain `events` table (and no group tables) until their next write
        grouped = not is_legacy_layout(objects)
        existing = {name.removeprefix("main.") for kind, name in objects if kind == "table"}
        stored = {t: physical(t) if grouped else t for t in LEAF_ORDER
                  if (grouped or t != "event_groups") and (physical(t) if grouped else t) in existing}
        tiles = all_tiles(con)
        heads = con.execute("SELECT size, root, note, verifier_key, pipeline, asset, run_id, created_at "
                            "FROM tree_heads ORDER BY size, created_at").fetchall()
        history, key_problems = load_history(con, ledger.origin)
        cosignatures = con.execute("SELECT size, witness, vkey, line FROM cosignatures ORDER BY size").fetchall() \
            if "cosignatures" in existing else []
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
    findings += _row_findings(tables, logged)

    levels = merkle.build_levels(logged)
    findings += _tile_findings(tiles, levels, size)

    def perfect(level: int, index: int) -> bytes:
        return levels[level][index]

    findings += [Finding("log_keys", p.partition(": ")[0].removeprefix("log_keys "), p.partition(": ")[2])
                 for p in key_problems]
    pinned = trust_store.pinned(ledger.origin, str(home.root)) if trust_store is not None else []
    roots, anchor = ((policy.log_keys, "the policy's log keys") if policy is not None
                     else (trusted_keys, "the keys given with --key") if trusted_keys
                     else (pinned, f"the key pinned for this home in {trust_store.path}") if pinned
                     else (None, ""))
    try:
        trusted = _trusted_keys(history, roots)
    except ValueError as exc:
        return Report([Finding("keys", "verifier keys", str(exc))])
    if roots and history.first_key and not set(history.keys) & set(roots):
        findings.append(Finding("keys", "log key", f"no key of the ledger's key history is among {anchor} "
                                f"(the first tree head is signed by {history.first_key[:48]}…): the key pair was "
                                "replaced, or this is another log"
                                + ("; if you replaced the ledger yourself, `fgtrac key forget` unpins the old key"
                                   if roots is pinned else "")))
    findings += _head_findings(heads, history, trusted, perfect, size)
    findings += _materialization_findings(heads, tables["materializations"].to_pylist())

    for art in artifacts:
        problem = check_artifact(home.root, art["path"], art["sha256"])
        if problem:
            findings.append(Finding("artifacts", f"{art['path']}", problem, art.get("asset")))

    committed = {a["path"] for a in artifacts}
    if home.artifacts.is_dir():
        stray = [p.relative_to(home.root).as_posix() for p in home.artifacts.rglob("*")
                 if p.is_file() and p.relative_to(home.root).as_posix() not in committed]
        partial = [p for p in stray if ".partial-" in p]
        if stray:
            notices.append(f"{len(stray)} file(s) under artifacts/ were never committed ({len(partial)} partial "
                           f"writes), left by interrupted runs; they are not part of the record, e.g. {stray[0]}")

    if heads and ledger.keystore.current_verifier_key(ledger.origin) is None:
        notices.append(f"the signing key is missing under {home.keys}: the records verify, but new commits are "
                       "refused until it is restored")
    signed = max((h[0] for h in heads), default=0)
    if size > signed:
        findings.append(Finding("log leaves", f"{signed}..{size - 1}", "no signed tree head covers them "
                                "(appended outside fgtrac, or a commit was interrupted)"))

    if policy is not None:
        problems, notes_ = _policy_findings(ledger.origin, policy, heads, cosignatures, perfect, size)
        findings += problems
        notices += notes_

    witness_path = witness or default_witness(home.witness, ledger.origin)
    verifiers = [notes.parse_verifier_key(k) for k in trusted]
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
    if not findings and trust_store is not None and history.keys:
        added = trust_store.pin(ledger.origin, str(home.root), history.keys)
        if added and not pinned:
            notices.append(f"pinned this log's key on first use in {trust_store.path}: a later verify trusts only "
                           "it and the rotations it endorses")

    return Report(findings, notices, leaves=size, tree_heads=len(heads), artifacts=len(artifacts),
                  rows={t: len(tbl) + (members if t == "events" else 0) for t, tbl in tables.items()})


def _not_a_ledger(ledger: Ledger, objects: dict) -> Report:
    """Return the report for a file that holds none of fgtrac's tables."""
    foreign = sorted(name.removeprefix("main.") for kind, name in objects if kind in ("table", "view"))
    evidence = [p.name + "/" for p in (ledger.home.keys, ledger.home.witness) if p.is_dir() and any(p.iterdir())]
    if foreign or evidence:
        held = f"holds only tables fgtrac does not define ({', '.join(foreign[:5])})" if foreign else "is empty"
        why = f" while {' and '.join(evidence)} exist: the ledger was replaced or emptied" if evidence else ""
        return Report([Finding("ledger", str(ledger.home.ledger), f"the file {held}{why}; it is not this "
                               "home's ledger")])
    return Report([], ["the ledger file holds no tables: nothing was ever committed (an interrupted first run)"])


def _row_findings(tables: dict, logged: list[bytes]) -> list[Finding]:
    """Return a finding for every row whose leaf is not its logged leaf, and every leaf no row holds."""
    findings = []
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
    return findings


def _tile_findings(tiles: dict[int, list[tuple[int, list[bytes]]]], levels: list[list[bytes]], size: int) -> list[Finding]:
    """Return a finding for every interior tile that is missing, extra or holds other hashes than the leaves give."""
    findings = []
    t = 1
    while (size >> (TILE_HEIGHT * t)) or tiles.get(t):
        level = t * TILE_HEIGHT
        count = size >> level  # hashes of complete subtrees at this level
        stored = dict(tiles.get(t, []))
        for k in range((count + TILE_WIDTH - 1) // TILE_WIDTH):
            first = k * TILE_WIDTH
            expect = levels[level][first:min(first + TILE_WIDTH, count)]
            if k not in stored:
                findings.append(Finding("log_tiles", f"level {level} tile {k}", "missing: the log of "
                                        f"{size} leaves needs it (a tile deleted)"))
            elif stored.pop(k) != expect:
                findings.append(Finding("log_tiles", f"level {level} tile {k}", "stored hashes differ from the "
                                        "hashes recomputed from the leaves"))
        for k in stored:
            findings.append(Finding("log_tiles", f"level {level} tile {k}", f"beyond the log of {size} leaves "
                                    "(a tile added outside fgtrac)"))
        t += 1
    return findings


def _trusted_keys(history: KeyHistory, given: list[str] | None) -> list[str]:
    """Return the keys of the history to trust: all of them, or those from the first given key on."""
    for key in given or []:
        notes.parse_verifier_key(key)  # a malformed --key is an error, not a silent mismatch
    chain = history.keys
    if not given:
        return chain
    starts = [i for i, k in enumerate(chain) if k in given]
    return chain[starts[0]:] if starts else list(given)


def _head_findings(heads: list[tuple], history: KeyHistory, trusted: list[str], perfect, size: int) -> list[Finding]:
    """Return a finding for every tree head not signed by its key of the history, or not a head of this log."""
    findings = []
    seen: set[int] = set()
    for head_size, root, note, vkey, _pipeline, asset, _run, _created in heads:
        where = f"size={head_size}"
        if head_size in seen:
            findings.append(Finding("tree_heads", where, "a second tree head of this size (a duplicated head)", asset))
            continue
        seen.add(head_size)
        key = history.key_for(head_size)
        if key not in trusted:
            findings.append(Finding("tree_heads", where, "its signature is by a key you did not trust "
                                    f"({(key or '')[:48]}…; the ledger's key history names it for this size)", asset))
            continue
        try:
            text = notes.open_note(note, [notes.parse_verifier_key(key)])
            cp = notes.parse_checkpoint(text)
        except ValueError as exc:
            findings.append(Finding("tree_heads", where, "signature does not verify with the log's key for this "
                                    f"size in the ledger's key history ({exc}): signed by a planted key, or edited",
                                    asset))
            continue
        if vkey != key:
            findings.append(Finding("tree_heads", where, "its verifier_key column is not the key that signed it "
                                    "(row changed)", asset))
        if cp.size != head_size or cp.root != bytes(root):
            findings.append(Finding("tree_heads", where, "signed checkpoint differs from the row's size/root", asset))
        if cp.size > size:
            findings.append(Finding("tree_heads", where, f"signed size {cp.size} exceeds the log's {size} leaves "
                                    "(log truncated)", asset))
            continue
        if merkle.root_from(perfect, cp.size) != cp.root:
            findings.append(Finding("tree_heads", where, "signed root differs from the root recomputed from the "
                                    "ledger's rows (log rewritten)", asset))
    return findings


def _policy_findings(origin: str, policy: Policy, heads: list[tuple], cosignatures: list[tuple], perfect,
                     size: int) -> tuple[list[Finding], list[str]]:
    """Return the findings and notices of a policy: stored cosignatures, the quorum, each witness's own view."""
    findings, notices = [], []
    bodies = {h[0]: notes.split_note(h[2])[0] for h in heads if _splits(h[2])}
    by_vkey = {w.vkey: w for w in policy.witnesses.values()}
    cosigned: dict[int, set[str]] = {}
    for head_size, name, vkey, line in cosignatures:
        w = by_vkey.get(vkey)
        if w is None or head_size not in bodies:
            continue  # a witness this policy does not name: not counted
        try:
            verify_cosignature(line, bodies[head_size], w.vkey)
            cosigned.setdefault(head_size, set()).add(w.name)
        except CosignatureError as exc:
            findings.append(Finding("cosignatures", f"size={head_size} witness={name}", f"does not verify ({exc}): "
                                    "forged or edited"))
    if heads and policy.quorum != "none":
        quorate = [s for s in sorted(bodies) if policy.satisfied(cosigned.get(s, set()))]
        if not quorate:
            findings.append(Finding("witness", "quorum", f"no signed tree head is cosigned by the policy's quorum "
                                    f"({policy.needed()}): run `fgtrac witness sync`"))
        elif quorate[-1] < max(bodies):
            notices.append(f"the newest tree heads (after size {quorate[-1]}) are not yet cosigned by the quorum: "
                           "run `fgtrac witness sync`")
    for w in policy.witnesses.values():
        if not w.url:
            continue
        try:
            latest = client.latest_checkpoint(w.url, origin, timeout_s=witnessing.timeout_s())
        except client.WitnessError as exc:
            notices.append(f"witness {w.name} could not be asked for its latest checkpoint ({exc})")
            continue
        if latest is None:
            notices.append(f"witness {w.name} has cosigned nothing of {origin} yet")
            continue
        problem = _witness_view_problem(latest, w, policy, perfect, size)
        if problem:
            findings.append(Finding("witness", w.name, problem))
    return findings, notices


def _witness_view_problem(note: str, w, policy: Policy, perfect, size: int) -> str | None:
    """Return why the ledger does not extend a witness's latest cosigned checkpoint, or None if it does."""
    try:
        body = notes.open_note(note, [notes.parse_verifier_key(k) for k in policy.log_keys])
        verify_cosignature(note, body, w.vkey)
        cp = notes.parse_checkpoint(body)
    except ValueError as exc:
        return f"its latest checkpoint does not verify with the policy's keys ({exc})"
    if cp.size > size:
        return (f"it cosigned size {cp.size}, but the ledger has {size} leaves: the log was rolled back "
                "(or truncated) after the witness saw it")
    if cp.size and merkle.root_from(perfect, cp.size) != cp.root:
        return (f"it cosigned root {cp.root.hex()[:16]}… at size {cp.size}, but the ledger's first {cp.size} leaves "
                "hash to another root: the log's history was rewritten")
    return None


def _splits(note: str) -> bool:
    try:
        notes.split_note(note)
        return True
    except ValueError:
        return False


def _materialization_findings(heads: list[tuple], materializations: list[dict]) -> list[Finding]:
    """Return a finding for every head without its logged materialization, and every materialization without its head.

    A commit's head has size leaf_start + leaf_count of its `materializations` leaf and repeats its pipeline,
    asset, run_id and created_at: the signed leaf vouches for the head's unsigned columns.
    """
    findings = []
    by_size = {m["leaf_start"] + m["leaf_count"]: m for m in materializations
               if m["leaf_start"] is not None and m["leaf_count"] is not None}
    headed = set()
    for head_size, _root, _note, _vkey, pipeline, asset, run_id, created_at in heads:
        m = by_size.get(head_size)
        if m is None:
            findings.append(Finding("tree_heads", f"size={head_size}", "no logged materialization ends at this "
                                    "size (a head added outside fgtrac)", asset))
            continue
        headed.add(head_size)
        row = {"pipeline": pipeline, "asset": asset, "run_id": run_id, "created_at": created_at}
        changed = [c for c, v in row.items() if v != m[c]]
        if changed:
            findings.append(Finding("tree_heads", f"size={head_size}", f"column(s) {', '.join(changed)} differ from "
                                    "the logged materialization of this commit (row changed)", asset))
    for head_size in sorted(by_size.keys() - headed):
        findings.append(Finding("tree_heads", f"size={head_size}", "missing: the logged materialization of "
                                f"{by_size[head_size]['asset']} ends here but its signed tree head is gone "
                                "(a head deleted)", by_size[head_size]["asset"]))
    return findings


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
