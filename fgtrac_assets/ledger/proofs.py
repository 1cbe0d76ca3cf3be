"""Receipts and proofs read from the stored tree: O(log n) node reads per proof."""

import duckdb

from ..errors import FgtracError
from ..integrity import merkle
from ..integrity.receipts import absence_receipt, b64, inclusion_receipt, member_receipt, set_leaf
from .groups import group_members_bytes
from .leaves import row_leaf
from .nodes import StoredNodes, tree_head
from .store import Ledger

SAMPLE_COLUMNS = {"samples": ["sample_id"], "events": ["sample_id"], "influence": ["train_sample_id", "test_sample_id"]}


class ProofError(FgtracError, ValueError):
    """A proof that cannot be made (unknown sample, sizes out of range, sample present)."""


def _latest(con) -> tuple[int, str, str]:
    head = tree_head(con)
    if head is None:
        raise ProofError("the log is empty: nothing has been committed yet")
    return head


def leaf_receipt(con: duckdb.DuckDBPyConnection, table: str, row: dict, head: tuple[int, str, str]) -> dict:
    """Return the inclusion receipt of one ledger row under the given tree head."""
    size, note, vkey = head
    proof = StoredNodes(con).run(merkle.inclusion_proof_from, row["leaf_index"], size)
    return inclusion_receipt(row_leaf(table, row), row["leaf_index"], size, proof, note, vkey)


def sample_receipts(ledger: Ledger, sample_id: str, asset: str | None = None) -> list[dict]:
    """Return an inclusion receipt for every ledger row about a sample (optionally one asset's), in log order."""
    with ledger.reader() as con:
        head = _latest(con)
        found = []
        for table, cols in SAMPLE_COLUMNS.items():
            cond = " OR ".join(f"{c} = ?" for c in cols)
            sql = f"SELECT * FROM {table} WHERE ({cond})" + (" AND asset = ?" if asset and table != "influence" else "")
            params = [sample_id] * len(cols) + ([asset] if asset and table != "influence" else [])
            if asset and table == "influence" and asset != "influence_scores":
                continue
            for row in con.sql(sql, params=params).to_arrow_table().to_pylist():
                found.append((row["leaf_index"], table, row))
        found.sort(key=lambda x: x[0])
        if not found:
            raise ProofError(f"sample {sample_id}: no ledger row" + (f" from asset {asset}" if asset else ""))
        groups = _groups_of(con, sorted({i for i, table, _ in found if table == "events"}))
        return [leaf_receipt(con, table, row, head) if table != "events" or i not in groups
                else member_receipt(leaf_receipt(con, "event_groups", groups[i], head),
                                    row["position"] - groups[i]["first_position"], group_members_bytes(con, i))
                for i, table, row in found]


def _groups_of(con: duckdb.DuckDBPyConnection, leaf_indexes: list[int]) -> dict[int, dict]:
    """Return the event_groups rows at these leaf indexes, by leaf index (leaves that are not groups are left out)."""
    if not leaf_indexes or not con.execute("SELECT count(*) FROM information_schema.tables "
                                           "WHERE table_name = 'event_groups'").fetchall()[0][0]:
        return {}
    rows = con.sql("SELECT * FROM event_groups WHERE leaf_index IN (SELECT unnest(?))",
                   params=[leaf_indexes]).to_arrow_table().to_pylist()
    return {r["leaf_index"]: r for r in rows}


def consistency(ledger: Ledger, old_size: int, new_size: int) -> dict:
    """Return the RFC 6962 consistency proof between two signed tree heads, with both checkpoints."""
    with ledger.reader() as con:
        old, new = tree_head(con, old_size), tree_head(con, new_size)
        if old is None or new is None:
            sizes = [r[0] for r in con.execute("SELECT size FROM tree_heads ORDER BY size").fetchall()]
            missing = old_size if old is None else new_size
            raise ProofError(f"no signed tree head of size {missing}; signed sizes: {sizes[:5]}"
                             f"{'…' if len(sizes) > 10 else ''}{sizes[-5:] if len(sizes) > 5 else ''}")
        if old_size > new_size:
            raise ProofError(f"--old {old_size} is larger than --new {new_size}")
        proof = StoredNodes(con).run(merkle.consistency_proof_from, old_size, new_size)
    return {"old_checkpoint": old[1], "new_checkpoint": new[1], "proof": [b64(h) for h in proof],
            "verifier_key": new[2]}


def training_set_ids(con: duckdb.DuckDBPyConnection, training_run: str) -> list[str]:
    """Return the sorted distinct sample ids a training run was trained on (from its batched events)."""
    rows = con.execute("SELECT DISTINCT sample_id FROM events WHERE kind = 'batched' AND training_run = ? "
                       "ORDER BY sample_id", [training_run]).fetchall()
    return [r[0] for r in rows]


def training_set_root(sample_ids: list[str]) -> bytes:
    """Return the Merkle root of a training set: leaves are the sorted raw sample ids."""
    return merkle.merkle_root([set_leaf(s) for s in sorted(sample_ids)])


def absence(ledger: Ledger, sample_id: str, training_run: str) -> dict:
    """Return a receipt proving sample_id is not in the training run's committed training set."""
    import bisect

    with ledger.reader() as con:
        head = _latest(con)
        rows = con.sql("SELECT * FROM training_sets WHERE training_run = ?", params=[training_run]).to_arrow_table().to_pylist()
        if not rows:
            raise ProofError(f"training run {training_run}: no committed training set")
        row = rows[0]
        ids = training_set_ids(con, training_run)
        commitment = leaf_receipt(con, "training_sets", row, head)
    leaves = [set_leaf(s) for s in ids]
    root = merkle.merkle_root(leaves)
    if root.hex() != row["root"] or len(ids) != row["size"]:
        raise ProofError(f"training run {training_run}: the batched events no longer match the committed set "
                         "(run `fgtrac verify`)")
    pos = bisect.bisect_left(ids, sample_id)
    if pos < len(ids) and ids[pos] == sample_id:
        raise ProofError(f"sample {sample_id} IS in training run {training_run}'s training set: absence cannot be proved")
    left = (ids[pos - 1], pos - 1, merkle.inclusion_proof(leaves, pos - 1)) if pos > 0 else None
    right = (ids[pos], pos, merkle.inclusion_proof(leaves, pos)) if pos < len(ids) else None
    return absence_receipt(sample_id, training_run, len(ids), root, left, right, commitment)


def check_training_sets(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """Return (training_run, problem) for every committed training set whose events no longer give its root."""
    problems = []
    for run, size, root in con.execute("SELECT training_run, size, root FROM training_sets").fetchall():
        ids = training_set_ids(con, run)
        try:
            same = len(ids) == size and training_set_root(ids).hex() == root
        except ValueError:  # a changed sample id that is no longer hex
            same = False
        if not same:
            problems.append((run, f"the batched events give {len(ids)} samples with a different root than committed"))
    return problems
