"""The `fgtrac` command: verify, summarise and inspect the ledger of an FGTRAC_HOME."""

import argparse
import json
import sys

from .config import resolve_home
from .ledger.lock import LedgerBusy
from .ledger.store import Ledger, LedgerMissing


def _ledger(args) -> Ledger:
    return Ledger(resolve_home(args.home))


def cmd_verify(args) -> int:
    """Verify everything; print OK or one line per finding."""
    from .ledger.verify import verify_ledger

    ledger = _ledger(args)
    if not ledger.exists():
        if ledger.home.keys.exists() or ledger.home.artifacts.exists():
            msg = f"{ledger.home.ledger}: the ledger file is missing but keys/artifacts exist: history has been lost"
            print(json.dumps({"ok": False, "findings": [{"table": "ledger", "row": "file", "what": msg}]}) if args.json
                  else f"FAIL {msg}")
            return 1
        print(json.dumps({"ok": True, "nothing_to_verify": True}) if args.json
              else f"nothing to verify: no ledger at {ledger.home.ledger}")
        return 0
    report = verify_ledger(ledger)
    if args.json:
        print(json.dumps({"ok": report.ok, "leaves": report.leaves, "tree_heads": report.tree_heads,
                          "artifacts": report.artifacts, "rows": report.rows,
                          "findings": [f.to_dict() for f in report.findings]}, indent=2))
    elif report.ok:
        print(f"OK: {report.leaves} leaves over {sum((report.rows or {}).values())} rows, "
              f"{report.tree_heads} signed tree heads, {report.artifacts} artifacts verified")
    else:
        for f in report.findings:
            print(f"FAIL {f.line()}")
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
    return cmd_verify(argparse.Namespace(home=args.home, json=False))


def cmd_key(args) -> int:
    """Print the log's verifier key (public; safe to share)."""
    ledger = _ledger(args)
    keys = ledger.keystore.verifier_keys()
    if not keys:
        print(f"no keys under {ledger.home.keys}: nothing has been signed yet", file=sys.stderr)
        return 1
    for k in keys:
        print(k)
    return 0


def cmd_sql(args) -> int:
    """Run a read-only SQL query against the ledger and print the result."""
    ledger = _ledger(args)
    with ledger.reader() as con:
        try:
            rel = con.execute(args.query)
        except Exception as exc:  # duckdb raises many error types; the message is what matters
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
        cols = [d[0] for d in rel.description or []]
        rows = rel.fetchall()
    if args.format == "json":
        print(json.dumps([dict(zip(cols, r)) for r in rows], default=str, indent=2))
    elif args.format == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    else:
        _print_table(cols, rows)
    return 0


def _print_table(cols: list[str], rows: list[tuple]) -> None:
    cells = [[("" if v is None else str(v)) for v in r] for r in rows]
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
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("summary", help="counts, the latest signed tree head, and a verify")
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("key", help="print the verifier key")
    p.set_defaults(func=cmd_key)
    p = sub.add_parser("sql", help="run read-only SQL against the ledger")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_sql)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the fgtrac command; return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LedgerMissing, LedgerBusy, ValueError, OSError) as exc:
        print(f"fgtrac: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
