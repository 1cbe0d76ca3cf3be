"""What witnessing adds to a commit: the same small commits with no policy and with one loopback witness.

    .venv/bin/python benchmarks/bench_witness.py [--reps 40] [--rows 100]

Interleaved: each repetition commits once into a home without a policy and once into a home whose
policy names one real `fgtrac witness serve` process on 127.0.0.1 (fsyncs included on both sides).
Writes the "Witnessing" section of benchmarks/RESULTS.md.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import machine, table, write_section  # noqa: E402
from fgtrac_assets.ledger.store import Commit, Ledger  # noqa: E402
from tests.witness_process import Witness  # noqa: E402

ORIGIN = "fgtrac.bench/witnessed"


def rows(n: int, tag: str) -> dict:
    return {"events": [{"sample_id": f"{tag}-{i}", "kind": "ingested"} for i in range(n)]}


def timed_commit(home: Path, policy: Path | None, n: int, tag: str) -> float:
    if policy is None:
        os.environ.pop("FGTRAC_POLICY", None)
    else:
        os.environ["FGTRAC_POLICY"] = str(policy)
    t = time.perf_counter()
    result = Ledger(home).commit(Commit("bench", "raw", tag, rows=rows(n, tag)))
    dt = time.perf_counter() - t
    if policy is not None and result.witnessed != {"w1": "cosigned"}:
        raise SystemExit(f"the witness did not cosign: {result.witnessed}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=100)
    args = ap.parse_args()
    os.environ["FGTRAC_ORIGIN"] = ORIGIN
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain, witnessed = tmp / "plain", tmp / "witnessed"
        vkey = Ledger(witnessed).initialise().verifier_key
        witness = Witness(tmp / "wstate", [vkey], name="witness.bench/w1").start()
        try:
            policy = tmp / "policy"
            policy.write_text(f"log {vkey}\nwitness w1 {witness.vkey} {witness.url}\nquorum 1\n")
            for warm in range(3):
                timed_commit(plain, None, args.rows, f"warm{warm}")
                timed_commit(witnessed, policy, args.rows, f"warm{warm}")
            a, b = [], []
            for i in range(args.reps):
                a.append(timed_commit(plain, None, args.rows, f"r{i}"))
                b.append(timed_commit(witnessed, policy, args.rows, f"r{i}"))
        finally:
            witness.stop()
    ma, mb = statistics.median(a) * 1000, statistics.median(b) * 1000
    out = [["commit, no policy", f"{ma:.1f} ms", ""],
           ["commit, one loopback witness (submit, cosign, store)", f"{mb:.1f} ms", ""],
           ["added by witnessing (difference of medians)", f"{mb - ma:+.1f} ms", "<= 5 ms"],
           ["with no policy: the policy lookup per commit", "one stat() of $FGTRAC_HOME/policy", "0"]]
    header = ["what", f"median of {args.reps} (interleaved)", "target"]
    print(table(header, out))
    write_section("Witnessing", f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_witness.py "
                  f"--reps {args.reps} --rows {args.rows}`. Each commit appends {args.rows} event rows; the witness "
                  "is a real `fgtrac witness serve` process on 127.0.0.1 that verifies the consistency proof, "
                  "cosigns, and fsyncs its state before answering.\n\n" + table(header, out))


if __name__ == "__main__":
    main()
