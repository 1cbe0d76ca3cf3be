"""The `fgtrac` command: verify, summarise and inspect the ledger of an FGTRAC_HOME."""

import argparse
import json
import os
import re
import sys
from pathlib import Path

import duckdb

from .attribution.methods import METHODS
from .config import resolve_home
from .errors import FgtracError, StorageError
from .ledger.lock import LedgerBusy
from .ledger.store import Ledger, LedgerDamaged
from .ledger.log_command import add_log_export_commands
from .session.command import add_influence_command
from .witness.command import add_witness_commands


def _ledger(args) -> Ledger:
    return Ledger(resolve_home(args.home))


def cmd_verify(args) -> int:
    """Verify everything; print OK or one line per finding."""
    from .ledger.verify import verify_ledger

    ledger = _ledger(args)
    if not ledger.exists():
        if ledger.home.keys.exists() or ledger.home.witness.exists():
            msg = f"{ledger.home.ledger}: the ledger file is missing but keys/witness exist: its history is lost"
            print(json.dumps({"ok": False, "findings": [{"table": "ledger", "row": "file", "what": msg}]}) if args.json
                  else f"FAIL {msg}")
            return 1
        print(json.dumps({"ok": True, "nothing_to_verify": True}) if args.json
              else f"nothing to verify: no ledger at {ledger.home.ledger}")
        return 0
    from .integrity.policy import load_policy
    from .integrity.truststore import TrustStore

    witness = Path(args.witness) if args.witness else None
    policy_file = getattr(args, "policy", None) or os.environ.get("FGTRAC_POLICY")
    policy = load_policy(policy_file) if policy_file else None  # the auditor's, never the home's own policy file
    report = verify_ledger(ledger, witness=witness, trusted_keys=args.key or None, policy=policy,
                           trust_store=TrustStore())
    summary = "; ".join(f.line() for f in report.findings[:3])
    try:
        ledger.record_verification(report.leaves, report.ok, len(report.findings), summary or "OK")
    except (duckdb.Error, LedgerDamaged, LedgerBusy, StorageError):
        pass  # a damaged, busy or read-only file: the outcome is printed below all the same
    if args.json:
        print(json.dumps({"ok": report.ok, "notices": report.notices, "leaves": report.leaves, "tree_heads": report.tree_heads,
                          "artifacts": report.artifacts, "rows": report.rows,
                          "findings": [f.to_dict() for f in report.findings]}, indent=2))
    else:
        for notice in report.notices:
            print(f"NOTE {printable(notice)}")
    if args.json:
        pass
    elif report.ok:
        print(f"OK: {report.leaves} leaves over {sum((report.rows or {}).values())} rows, "
              f"{report.tree_heads} signed tree heads, {report.artifacts} artifacts verified")
    else:
        for f in report.findings:
            print(f"FAIL {printable(f.line())}")
        print(f"{len(report.findings)} finding(s)")
    return 0 if report.ok else 1


def cmd_summary(args) -> int:
    """Print samples, rejections, events, log size and the latest signed tree head, then verify."""
    ledger = _ledger(args)
    with ledger.reader() as con:
        q = lambda sql: con.execute(sql).fetchall()[0][0]  # noqa: E731
        samples = q("SELECT count(DISTINCT sample_id) FROM samples")
        rejected = q("SELECT count(*) FROM events WHERE kind = 'rejected'")
        events = q("SELECT count(*) FROM events")
        by_kind = con.execute("SELECT kind, count(*) FROM events GROUP BY kind ORDER BY min(leaf_index)").fetchall()
        runs = q("SELECT count(DISTINCT training_run) FROM checkpoints")
        scores = q("SELECT count(*) FROM influence")
    head = ledger.latest_tree_head()
    print(f"FGTRAC_HOME      {ledger.home.root}")
    print(f"samples          {samples}")
    print(f"rejected         {rejected}")
    print(f"events           {events}  (" + ", ".join(f"{k} {n}" for k, n in by_kind) + ")")
    print(f"model versions   {runs}")
    print(f"influence rows   {scores}")
    if head:
        print(f"log size         {head['size']} leaves")
        print("latest signed tree head:")
        print("  " + head["note"].rstrip("\n").replace("\n", "\n  "))
    print("verify           ", end="", flush=True)
    return cmd_verify(argparse.Namespace(home=args.home, json=False, witness=None, key=None, policy=None))


def cmd_key(args) -> int:
    """Print the log's verifier key (public; safe to share), list the key history, or rotate to a new key."""
    ledger = _ledger(args)
    if args.action == "init":
        print(ledger.initialise().verifier_key)
        return 0
    if args.action == "forget":
        from .integrity.truststore import TrustStore

        store = TrustStore()
        n = store.forget(ledger.origin, str(ledger.home.root))
        print(f"forgot {n} pinned key(s) of {ledger.origin} for {ledger.home.root} in {store.path}", file=sys.stderr)
        return 0
    if args.action == "rotate":
        signer = ledger.rotate_key()
        print(signer.verifier_key)
        print("rotated: new tree heads are signed with this key; the old key endorsed it in the log, and older "
              "heads stay verifiable with it", file=sys.stderr)
        return 0
    current = ledger.keystore.current_verifier_key(ledger.origin)
    if current is None:
        print(f"no key under {ledger.home.keys}: nothing has been signed yet (`fgtrac key init` makes one)",
              file=sys.stderr)
        return 1
    if args.action == "list":
        keys = (ledger.key_history().keys if ledger.exists() else []) or [current]
        for k in keys:
            print(f"{k}  {'current' if k == keys[-1] else 'retired'}")
    else:
        print(current)
    return 0


def _write_json(obj, out: str | None) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    if out:
        try:
            Path(out).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise StorageError(f"{out}: cannot write ({exc.strerror or exc})") from None
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _absent_id(con, text: str) -> str:
    """Return the id whose absence to prove: a full id, a known sample's prefix or name, else the id of that name."""
    from .ledger.audit import AuditError, resolve_sample
    from .tracing.ids import name_sample_id

    try:
        return resolve_sample(con, text)
    except AuditError:
        return name_sample_id(text)


def cmd_prove(args) -> int:
    """Write inclusion receipts for a sample's rows, or an absence receipt against a training run."""
    from .ledger import proofs

    from .ledger.audit import AuditError, resolve_run, resolve_sample
    from .ledger.nodes import TreeDamaged

    ledger = _ledger(args)
    try:
        if args.absent and not args.run:
            print("fgtrac prove --absent needs --run TRAINING_RUN", file=sys.stderr)
            return 2
        with ledger.reader() as con:  # ids by unique prefix, runs also as `latest`, as in the audits
            run = resolve_run(con, args.run) if args.run else None
            sample = _absent_id(con, args.sample_id) if args.absent else resolve_sample(con, args.sample_id)
        if args.format == "tlog-proof":
            if args.absent or not args.out:
                print("fgtrac prove --format tlog-proof needs --out DIR (and proves inclusion, not absence)",
                      file=sys.stderr)
                return 2
            from .ledger.tlog_proofs import tlog_proofs_for_sample

            files = tlog_proofs_for_sample(ledger, sample, args.out, args.asset)
            print(f"wrote {len(files)} tlog-proof(s) with their .leaf files to {args.out}", file=sys.stderr)
            return 0
        if args.absent:
            receipt = proofs.absence(ledger, sample, run)
        else:
            receipts = proofs.sample_receipts(ledger, sample, args.asset)
            receipt = receipts[0] if len(receipts) == 1 else receipts
    except (proofs.ProofError, AuditError, TreeDamaged) as exc:
        print(f"fgtrac prove: {printable(str(exc))}", file=sys.stderr)
        return 1
    _write_json(receipt, args.out)
    return 0


def cmd_verify_receipt(args) -> int:
    """Check a receipt file offline: signature, inclusion (or absence) proof; no database needed."""
    from .integrity.policy import load_policy
    from .integrity.receipts import ReceiptError, verify_receipt
    from .integrity.tlog_proof import FILE_SUFFIX, TlogProofError, check_proof_file

    policy = load_policy(args.policy) if args.policy else None
    if args.file.endswith(FILE_SUFFIX):
        try:
            print(f"OK {args.file}: {printable(check_proof_file(Path(args.file), args.key or [], policy))}")
            return 0
        except TlogProofError as exc:
            print(f"FAIL {args.file}: {printable(str(exc))}")
            return 1
    try:
        data = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"FAIL {args.file}: cannot read a JSON receipt ({exc})")
        return 1
    items = data if isinstance(data, list) else [data]
    failed = 0
    for i, receipt in enumerate(items):
        label = f"{args.file}[{i}]" if isinstance(data, list) else args.file
        try:
            print(f"OK {label}: {printable(verify_receipt(receipt, (policy.log_keys if policy else args.key) or None))}")
        except (ReceiptError, TypeError, AttributeError) as exc:
            failed += 1
            print(f"FAIL {label}: {printable(str(exc))}")
    return 1 if failed else 0


def cmd_consistency(args) -> int:
    """Print an RFC 6962 consistency proof between two signed tree heads."""
    from .ledger import proofs

    try:
        _write_json(proofs.consistency(_ledger(args), args.old, args.new), None)
    except proofs.ProofError as exc:
        print(f"fgtrac log consistency: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_audit(args) -> int:
    """Run a named audit or read-only SQL and print the result as a table, CSV or JSON."""
    from .ledger import audit

    ledger = _ledger(args)
    what = args.audit
    try:
        if what == "sample":
            cols, rows = audit.sample_history(ledger, args.sample_id)
        elif what == "used":
            cols, rows = audit.sample_used(ledger, args.sample_id, args.run, args.test)
        elif what == "run":
            cols, rows = audit.training_run(ledger, args.run)
        elif what == "lineage":
            cols, rows = audit.lineage(ledger)
        elif what == "influence":
            cols, rows = audit.influence(ledger, args.test_id, args.run, args.method)
        else:
            cols, rows = audit.sql(ledger, args.query)
    except audit.AuditError as exc:
        print(f"fgtrac audit: {printable(str(exc))}", file=sys.stderr)
        return 2
    _print_result(cols, rows, args.format)
    return 0


def cmd_run(args) -> int:
    """Run pipelines' whole chains from plain Python (no Dagster), with progress, then verify."""
    from .cli_run import Progress, run_pipeline
    from .pipelines.registry import DEFAULT_LIMITS, PIPELINES

    known = {p.name: (p, d) for p, d in PIPELINES}
    names = args.pipelines or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"fgtrac run: unknown pipeline(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
        return 2
    ledger = _ledger(args)
    for name in names:
        pipeline, defaults = known[name]
        limit = args.limit if args.limit is not None else DEFAULT_LIMITS.get(name, 0)
        roots = run_pipeline(ledger, pipeline, defaults, limit, args.epochs, Progress())
        print(f"{name}: influence_scores root {roots['influence_scores']}")
    return cmd_verify(argparse.Namespace(home=args.home, json=False, witness=None, key=None, policy=None))


def cmd_witness_sync(args) -> int:
    """Submit the latest head to every witness of the policy; print each one's outcome."""
    outcomes = _ledger(args).witness_sync()
    for name, outcome in sorted(outcomes.items()):
        print(f"{'OK  ' if outcome == 'cosigned' else 'FAIL'} {name}: {printable(outcome)}")
    if not outcomes:
        print("nothing to submit: the log is empty, or the policy names no witness with a URL")
    return 0 if all(o == "cosigned" for o in outcomes.values()) else 1


def cmd_report(args) -> int:
    """Write the static HTML audit report."""
    from .report.html import write_report

    ledger = _ledger(args)
    if not ledger.exists():
        print(f"fgtrac report: no ledger at {ledger.home.ledger}: nothing to report", file=sys.stderr)
        return 1
    path = write_report(ledger, Path(args.out))
    print(f"wrote {path}")
    return 0


def _print_result(cols: list[str], rows: list[tuple], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps([dict(zip(cols, r)) for r in rows], default=str, indent=2))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)
    else:
        _print_table(cols, rows)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """Return text with control characters (newlines, ANSI escapes, ...) escaped, safe to print on a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return printable(str(v))


def _print_table(cols: list[str], rows: list[tuple]) -> None:
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [min(len(r[i]), 64) for r in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join((v if len(v) <= 64 else v[:63] + "…").ljust(w) for v, w in zip(r, widths)))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the fgtrac command."""
    parser = argparse.ArgumentParser(prog="fgtrac", description="Sample-level traceability: verify and audit the ledger.")
    parser.add_argument("--home", default=None, help="FGTRAC_HOME (default: $FGTRAC_HOME or ./data)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="recompute every leaf, tree head signature and artifact hash")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--witness", help="the witness file (default: $FGTRAC_HOME/witness/<origin>.checkpoint)")
    p.add_argument("--key", action="append", help="trust this verifier key as the log's first key (repeatable)")
    p.add_argument("--policy", help="a C2SP tlog-policy file: trust only its log keys; ask its witnesses "
                                    "(default: $FGTRAC_POLICY)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("prove", help="write receipts for a sample (inclusion), or prove it absent from a training run")
    p.add_argument("sample_id")
    p.add_argument("--asset", help="only rows written by this asset")
    p.add_argument("--absent", action="store_true", help="prove the sample is NOT in --run's training set")
    p.add_argument("--run", help="the training run (model version) for --absent")
    p.add_argument("--out", help="write the receipt(s) to this file instead of stdout (a folder for tlog-proof)")
    p.add_argument("--format", choices=["json", "tlog-proof"], default="json",
                   help="json receipts (default), or C2SP tlog-proof files DIR/<leaf_index>.tlog-proof + .leaf")
    p.set_defaults(func=cmd_prove)
    p = sub.add_parser("verify-receipt", help="check a receipt offline with the public key alone")
    p.add_argument("file")
    p.add_argument("--key", action="append", help="the verifier key to trust (default: the receipt's own)")
    p.add_argument("--policy", help="a C2SP tlog-policy: trust its log keys and require its witness quorum")
    p.set_defaults(func=cmd_verify_receipt)
    p = sub.add_parser("log", help="log proofs")
    log_sub = p.add_subparsers(dest="log_command", required=True)
    c = log_sub.add_parser("consistency", help="RFC 6962 consistency proof between two signed tree heads")
    c.add_argument("--old", type=int, required=True)
    c.add_argument("--new", type=int, required=True)
    c.set_defaults(func=cmd_consistency)
    add_log_export_commands(log_sub)
    p = sub.add_parser("summary", help="counts, the latest signed tree head, and a verify")
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("key", help="print the verifier key; `key list` the history; `key rotate` starts a new "
                                   "one; `key init` makes the first before any commit")
    p.add_argument("action", nargs="?", choices=["show", "list", "rotate", "init", "forget"], default="show",
                   help="forget: unpin this home's log key from your trust store (after replacing the ledger on purpose)")
    p.set_defaults(func=cmd_key)
    p = sub.add_parser("run", help="run pipelines' whole chains from plain Python (no Dagster), with progress")
    p.add_argument("pipelines", nargs="*", help="pipeline names (default: all)")
    p.add_argument("--limit", type=int, help="read at most this many raw items (default: the pipeline's)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the pipeline's)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="write a static HTML audit report")
    p.add_argument("--out", default="report", help="output folder (default ./report)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("audit", help="named audits and read-only SQL over the ledger")
    audits = p.add_subparsers(dest="audit", required=True)

    def audit_parser(name, help_text):
        a = audits.add_parser(name, help=help_text)
        a.add_argument("--format", choices=["table", "csv", "json"], default="table")
        a.set_defaults(func=cmd_audit)
        return a

    audit_parser("sample", "every event of a sample, in order").add_argument("sample_id", help="id or unique prefix")
    a = audit_parser("used", "was the sample used by a training run (epochs, steps, lr), and its influence on --test")
    a.add_argument("sample_id")
    a.add_argument("--run", required=True, help="training run id, unique prefix, or 'latest'")
    a.add_argument("--test", help="a test sample: show the sample's recorded influence on it")
    audit_parser("run", "a training run: checkpoints, losses, lrs, selection, committed training set").add_argument(
        "run", help="training run id, unique prefix, or 'latest'")
    audit_parser("lineage", "asset lineage edges as recorded in the ledger")
    a = audit_parser("influence", "proponents and opponents of a test sample")
    a.add_argument("test_id")
    a.add_argument("--run", help="training run (default: the latest that scored it)")
    a.add_argument("--method", choices=list(METHODS), help="scores of this method (default: the latest scoring)")
    audit_parser("sql", "arbitrary read-only SQL (tables and views: see README)").add_argument("query")
    add_influence_command(sub)
    witness = add_witness_commands(sub)
    w = witness.add_parser("sync", help="submit the latest signed tree head to the policy's witnesses again")
    w.set_defaults(func=cmd_witness_sync)
    _accept_home_everywhere(parser)
    return parser


def _accept_home_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let every subcommand take --home after its name too (`fgtrac verify --home DIR`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--home" not in sub._option_string_actions:
                    sub.add_argument("--home", default=argparse.SUPPRESS, help="FGTRAC_HOME (default: $FGTRAC_HOME or ./data)")
                _accept_home_everywhere(sub)


def main(argv: list[str] | None = None) -> int:
    """Run the fgtrac command; return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `fgtrac audit ... | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except FgtracError as exc:  # an error the user can fix: one line; anything else is a bug and keeps its traceback
        print(f"fgtrac: {printable(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
