"""Post-commit checks of one materialisation: its tree head, its lineage, its numbers (SQL over the ledger)."""

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


def _lineage_sql(asset: str) -> tuple[str, str] | None:
    """Return (SQL counting violations, what a violation is) for an asset's lineage completeness."""
    return {
        "raw_samples": ("""SELECT abs((SELECT count(*) FROM samples WHERE run_id = $run)
                                  - (SELECT count(*) FROM events WHERE run_id = $run AND kind = 'ingested'))""",
                        "samples without an `ingested` event"),
        # an item whose only events in the run are `rejected` was never a sample of it: nothing to preprocess
        "preprocessed_samples": ("""SELECT count(*) FROM (SELECT sample_id FROM events WHERE run_id = $run
                                    GROUP BY sample_id HAVING count(*) FILTER (kind <> 'rejected') > 0
                                    AND (count(*) FILTER (kind = 'preprocessed') <> 1
                                         OR count(*) FILTER (kind = 'split') <> 1))""",
                                 "samples without exactly one `preprocessed` and one `split` event"),
        "training_checkpoints": ("""SELECT count(*) FROM (SELECT sample_id, count(DISTINCT epoch) AS e FROM events
                                    WHERE training_run = $tr AND kind = 'batched' GROUP BY 1)
                                    WHERE e <> (SELECT count(*) FROM checkpoints WHERE training_run = $tr)""",
                                 "training samples missing a `batched` event in some epoch"),
        "selected_checkpoints": ("""SELECT CASE WHEN count(*) FILTER (selected) = 0 THEN 1 ELSE 0 END
                                    FROM checkpoint_selections WHERE run_id = $run""",
                                 "no checkpoint selected"),
        "gradient_cache": ("""SELECT count(*) FROM (SELECT sample_id, count(DISTINCT checkpoint_id) AS c FROM events
                              WHERE run_id = $run AND kind = 'gradient' GROUP BY 1)
                              WHERE c <> (SELECT count(DISTINCT checkpoint_id) FROM events
                                          WHERE run_id = $run AND kind = 'gradient')""",
                           "samples missing a gradient at some selected checkpoint"),
        # a detail is JSON read as JSON, whatever its spacing; one that is not JSON is no test sample's (verify
        # reports it)
        "influence_scores": ("""SELECT count(*) FROM (SELECT DISTINCT sample_id FROM events
                                WHERE kind = 'gradient' AND training_run = $tr
                                AND CASE WHEN json_valid(detail) THEN json_extract_string(detail, '$.split') END = 'test') t
                                WHERE t.sample_id NOT IN (SELECT test_sample_id FROM influence
                                                          WHERE run_id = $run AND kind = 'proponent')""",
                             "test samples without influence scores"),
    }.get(asset)


def _numbers_sql(asset: str) -> tuple[str, str] | None:
    """Return (SQL counting violations, what a violation is) for an asset's numeric sanity."""
    return {
        "training_checkpoints": ("""SELECT count(*) FROM checkpoints WHERE training_run = $tr
                                    AND (val_loss IS NULL OR isnan(val_loss) OR isinf(val_loss)
                                         OR train_loss IS NULL OR isnan(train_loss) OR lr IS NULL OR lr <= 0)""",
                                 "checkpoints without a finite validation/training loss or a positive lr"),
        "gradient_cache": ("""SELECT count(*) FROM events WHERE run_id = $run AND kind = 'gradient'
                              AND (lr IS NULL OR lr <= 0)""", "gradient events without a positive lr"),
        # Proponents are a test sample's k largest scores and opponents its k smallest, whatever their sign (when
        # every score is negative, so are the proponents'): each rank's score is at most the one before it (at least,
        # for opponents) and no proponent scores below an opponent. Self-influence, sum of lr |g|^2, is never negative.
        "influence_scores": ("""WITH s AS (SELECT kind, test_sample_id, score,
                                       lag(score) OVER (PARTITION BY kind, test_sample_id ORDER BY rank) AS before
                                       FROM influence WHERE run_id = $run),
                                bounds AS (SELECT test_sample_id, min(score) FILTER (kind = 'proponent') AS lowest,
                                                  max(score) FILTER (kind = 'opponent') AS highest
                                           FROM s WHERE kind IN ('proponent', 'opponent') GROUP BY 1)
                                SELECT (SELECT count(*) FROM s WHERE score IS NULL OR isnan(score) OR isinf(score)
                                        OR (kind = 'self' AND score < 0)
                                        OR (kind IN ('proponent', 'self') AND score > before)
                                        OR (kind = 'opponent' AND score < before))
                                     + (SELECT count(*) FROM bounds WHERE lowest < highest)""",
                             "scores that are missing or not finite, out of rank order, negative self-influence, "
                             "or test samples with a proponent scored below an opponent"),
    }.get(asset)


def check_names(asset: str) -> list[str]:
    """Return the names of the checks an asset gets."""
    names = ["tree_head_verifies"]
    if _lineage_sql(asset):
        names.append("lineage_complete")
    if _numbers_sql(asset):
        names.append("numbers_sane")
    names.append("witnessed")
    return names


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


def run_checks(ledger: Ledger, asset: str, run_id: str, training_run: str | None, note: str) -> list[CheckOutcome]:
    """Return the outcomes of every check of one materialisation, read back from the committed ledger."""
    params = {"run": run_id, "tr": training_run}
    with ledger.reader() as con:
        out = [tree_head_check(con, ledger, note)]
        for name, spec in (("lineage_complete", _lineage_sql(asset)), ("numbers_sane", _numbers_sql(asset))):
            if spec is None:
                continue
            sql, what = spec
            bad = con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql}).fetchall()[0][0]
            out.append(CheckOutcome(name, bad == 0, f"{bad} {what}" if bad else f"no {what}", {"violations": bad}))
        out.append(witnessed_check(con, ledger, note))
    return out
