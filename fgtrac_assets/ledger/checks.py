"""Post-commit checks of one materialisation: its tree head, its lineage, its numbers (SQL over the ledger)."""

from collections.abc import Sequence
from dataclasses import dataclass, field

import duckdb

from ..integrity import merkle, notes
from . import witnessing
from .keys import load_history
from .nodes import StoredNodes
from .store import Ledger


@dataclass(frozen=True)
class CheckOutcome:
    """One check's result: name, pass/fail, a one-line description and numbers behind it."""

    name: str
    passed: bool
    description: str
    metadata: dict = field(default_factory=dict)


def tree_head_check(con: duckdb.DuckDBPyConnection, ledger: Ledger, note: str) -> CheckOutcome:
    """Return whether the commit's signed tree head verifies and equals the root of the stored tree."""
    history = load_history(con, ledger.origin)[0]  # the ledger's own keys, never a file planted in keys/
    try:
        cp = notes.parse_checkpoint(notes.open_note(note, [notes.parse_verifier_key(k) for k in history.keys]))
        notes.open_note(note, [notes.parse_verifier_key(history.key_for(cp.size))])
    except ValueError as exc:
        return CheckOutcome("tree_head_verifies", False, f"signature does not verify: {exc}")
    stored = StoredNodes(con).run(merkle.root_from, cp.size)
    ok = stored == cp.root
    return CheckOutcome("tree_head_verifies", ok, f"signed tree head of size {cp.size} "
                        + ("verifies and matches the stored tree" if ok else "differs from the stored tree"),
                        {"tree_size": cp.size, "root": cp.root.hex()})


@dataclass(frozen=True)
class SqlCheck:
    """A check a stage declares: SQL counting violations in its commit ($run, $tr) and what a violation is."""

    name: str  # "lineage_complete" or "numbers_sane"
    sql: str
    what: str


def check_names(checks: Sequence[SqlCheck]) -> list[str]:
    """Return the names of the checks a stage with these SQL checks gets (tree head and witnessing first and last)."""
    return ["tree_head_verifies", *(c.name for c in checks), "witnessed"]


#: checks that warn without stopping the assets downstream
NON_BLOCKING = ("numbers_sane", "witnessed")


def witnessed_check(con: duckdb.DuckDBPyConnection, ledger: Ledger, note: str) -> CheckOutcome:
    """Return whether the commit's tree head is cosigned by the witness policy's quorum (passes with no policy)."""
    try:
        policy = witnessing.policy_in_force(ledger.home.root)
    except ValueError as exc:
        return CheckOutcome("witnessed", False, f"the witness policy cannot be read: {exc}")
    if policy is None:
        return CheckOutcome("witnessed", True, "no witness policy (FGTRAC_POLICY or $FGTRAC_HOME/policy): "
                            "tree heads are signed but not witnessed")
    size = notes.parse_checkpoint(notes.split_note(note)[0]).size
    cosigned = witnessing.cosigned_note(con, size) or note
    names = sorted(policy.cosigners(cosigned))
    ok = policy.satisfied(set(names))
    return CheckOutcome("witnessed", ok, (f"cosigned by {', '.join(names)}" if ok else
                                          f"not yet witnessed ({policy.needed()} needed, cosigned by "
                                          f"{', '.join(names) or 'none'}): run `fgtrac witness sync`"),
                        {"tree_size": size, "witnesses": ", ".join(names)})


def run_checks(ledger: Ledger, checks: Sequence[SqlCheck], run_id: str, training_run: str | None,
               note: str) -> list[CheckOutcome]:
    """Return the outcomes of every check of one materialisation, read back from the committed ledger."""
    params = {"run": run_id, "tr": training_run}
    with ledger.reader() as con:
        out = [tree_head_check(con, ledger, note)]
        for check in checks:
            bad = con.execute(check.sql, {k: v for k, v in params.items() if f"${k}" in check.sql}).fetchall()[0][0]
            out.append(CheckOutcome(check.name, bad == 0, f"{bad} {check.what}" if bad else f"no {check.what}",
                                    {"violations": bad}))
        out.append(witnessed_check(con, ledger, note))
    return out
