"""Witnessed commits: each new tree head goes to the policy's witnesses; their cosignatures are stored beside it.

The policy (C2SP tlog-policy, integrity/policy.py) is `$FGTRAC_POLICY`, else `$FGTRAC_HOME/policy`;
with neither, nothing here runs. After a commit, every witness with a URL gets the new signed
checkpoint with a consistency proof from the size it last cosigned (as far as the ledger knows;
on 409 it says its size and the proof is made from there). A witness that is down, slow or
refuses never fails the commit (the ledger's write lock is held at most the short timeout
while it answers): the head stays unwitnessed, the `witnessed` check says so, and
`fgtrac witness sync` submits the latest head again later.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb

from ..integrity import merkle, notes
from ..integrity.cosignature import CosignatureError, verify_cosignature
from ..integrity.policy import Policy, Witness, load_policy
from ..witness import client
from .nodes import StoredNodes

DEFAULT_TIMEOUT_S = 2.0
MAX_CONFLICTS = 3  # 409 answers followed per witness and head before giving up


def policy_path(home_root: Path) -> Path | None:
    """Return the policy file in force ($FGTRAC_POLICY, else $FGTRAC_HOME/policy), or None if there is none."""
    explicit = os.environ.get("FGTRAC_POLICY")
    if explicit:
        return Path(explicit).expanduser()
    default = home_root / "policy"
    return default if default.is_file() else None


def policy_in_force(home_root: Path) -> Policy | None:
    """Return the parsed policy in force, or None; raise PolicyError if the file is malformed."""
    path = policy_path(home_root)
    return load_policy(path) if path is not None else None


def timeout_s() -> float:
    """Return how long one witness may take to answer ($FGTRAC_WITNESS_TIMEOUT seconds, default 2)."""
    try:
        return max(0.05, float(os.environ.get("FGTRAC_WITNESS_TIMEOUT", DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Submission:
    """What one witness gets for one head: the size it is believed to have and the proof from there."""

    witness: Witness
    old_size: int
    proof: list[bytes]


@dataclass(frozen=True)
class Outcome:
    """One witness's answer for one head: its cosignature line, or why there is none."""

    witness: str
    line: str | None
    problem: str | None = None


def cosigned_sizes(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Return, per witness verifier key, the largest size it has cosigned as far as the ledger knows."""
    return dict(con.execute("SELECT vkey, max(size) FROM cosignatures GROUP BY vkey").fetchall())


def plan(nodes: StoredNodes, policy: Policy, size: int, previous: int | None = None) -> list[Submission]:
    """Return the submissions of the head of this size to every witness of the policy that has a URL.

    previous: the size of the head before it, which each witness is assumed to hold (a commit's common case,
    saving a query; a witness that holds another size answers 409 with it); else the sizes recorded here.
    """
    known = {} if previous is not None else cosigned_sizes(nodes.con)
    out, proofs = [], {}
    for w in policy.witnesses.values():
        if not w.url:
            continue
        old = min(previous if previous is not None else known.get(w.vkey, 0), size)
        if old not in proofs:
            proofs[old] = nodes.run(merkle.consistency_proof_from, old, size) if 0 < old < size else []
        out.append(Submission(w, old, proofs[old]))
    return out


def submit(submissions: list[Submission], note: str, proof_from, timeout: float) -> list[Outcome]:
    """Send the head to every witness at once; return each one's outcome (never raises for a witness's failure).

    proof_from(old_size) returns the consistency proof from another size, for a witness that answers 409.
    """
    if not submissions:
        return []
    body = notes.split_note(note)[0]
    if len(submissions) == 1:
        return [_submit_one(submissions[0], note, body, proof_from, timeout)]
    with ThreadPoolExecutor(max_workers=len(submissions)) as pool:
        return list(pool.map(lambda s: _submit_one(s, note, body, proof_from, timeout), submissions))


def _submit_one(s: Submission, note: str, body: str, proof_from, timeout: float) -> Outcome:
    size = notes.parse_checkpoint(body).size
    old, proof = s.old_size, s.proof
    for _ in range(MAX_CONFLICTS + 1):
        try:
            lines = client.add_checkpoint(s.witness.url, old, proof, note, timeout_s=timeout)
        except client.WitnessConflict as exc:
            if exc.size > size:
                return Outcome(s.witness.name, None, f"the witness has cosigned size {exc.size}, larger than this "
                               f"log's {size}: the log was rolled back, or another log uses its origin")
            old = exc.size
            proof = proof_from(old) if 0 < old < size else []
            continue
        except client.WitnessError as exc:
            return Outcome(s.witness.name, None, str(exc))
        for line in lines:
            try:
                verify_cosignature(line, body, s.witness.vkey)
                return Outcome(s.witness.name, line)
            except CosignatureError:
                continue
        return Outcome(s.witness.name, None, "the witness answered without a valid cosignature from its policy key")
    return Outcome(s.witness.name, None, f"the witness kept answering 409 ({MAX_CONFLICTS + 1} tries)")


def store(con: duckdb.DuckDBPyConnection, size: int, policy: Policy, outcomes: list[Outcome], received_at: str) -> int:
    """Insert the cosignatures received for the head of this size; return how many."""
    rows = [(size, o.witness, policy.witnesses[o.witness].vkey, o.line, received_at) for o in outcomes if o.line]
    if rows:  # one statement, atomic on its own: executemany and an explicit transaction cost a commit's third
        con.execute("INSERT INTO cosignatures VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * len(rows)),
                    [v for row in rows for v in row])
    return len(rows)


def cosigned_note(con: duckdb.DuckDBPyConnection, size: int) -> str | None:
    """Return the signed tree head of this size with every stored cosignature line appended, or None."""
    head = con.execute("SELECT note FROM tree_heads WHERE size = ? LIMIT 1", [size]).fetchall()
    if not head:
        return None
    lines = [line for (line,) in con.execute("SELECT DISTINCT line FROM cosignatures WHERE size = ? ORDER BY line",
                                             [size]).fetchall()]
    return head[0][0] + "".join(lines)
