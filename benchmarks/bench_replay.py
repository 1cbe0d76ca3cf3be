"""The replay methods' cost against the training run they replay, and TracInCP / dattri's TRAK in the same run.

    .venv/bin/python benchmarks/bench_replay.py [--train 1000] [--epochs 20] [--test-batch 32] [--reps 3]

The digits CNN trained with the pipeline's own loop (``train_supervised``, recorded by the pipeline's Tracer) is
the reference: its wall time is the denominator. Each method then scores every training sample for one test
batch: the metagradient and the step-exact replay for the batch's mean test loss (one reverse pass; one test
gradient per step), and as matrices for every test sample of the batch; TracInCP over every epoch's checkpoint
and dattri's TRAK on the final model as the peers. Best of --reps. Prints a table and writes the "Replay
methods" section of benchmarks/RESULTS.md.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.results import machine, table, write_section  # noqa: E402


def best_of(reps: int, fn) -> float:
    """Return the fastest of reps calls of fn, in seconds."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    """Time the reference training and each method; print and record the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--test-batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from fgtrac_assets.attribution import Metagradient, StepExactTracIn, TracInCP
    from fgtrac_assets.attribution.trace import OptimizerSpec, trace_from_events
    from fgtrac_assets.pipelines.base import TrainSettings
    from fgtrac_assets.pipelines.digits import build_cnn
    from fgtrac_assets.studies.digits_data import digits_splits, train_cnn
    from fgtrac_assets.studies.peers import dattri_trak_scores
    from fgtrac_assets.tracing.tracer import Tracer

    (x, y, ids), val, (xt, yt) = digits_splits(0, args.train, 300)
    xt, yt = xt[:args.test_batch], yt[:args.test_batch]
    settings = TrainSettings(epochs=args.epochs, lr=0.1, batch_size=16, seed=0, schedule="cosine")
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    torch.manual_seed(0)
    initial = build_cnn(10).state_dict()
    result = {}

    def train():
        tracer = Tracer(ids, "bench")
        result["model"], result["history"] = train_cnn(x, y, val, settings, 0, recorder=tracer)
        result["tracer"] = tracer

    training = best_of(args.reps, train)
    model, history = result["model"], result["history"]
    trace = trace_from_events(result["tracer"].events(), ids, initial, OptimizerSpec(),
                              {h.step: h.state_dict for h in history})
    meta, exact = Metagradient(model, trace, loss), StepExactTracIn(model, trace, loss)
    tracin = TracInCP(model, [(h.state_dict, h.lr) for h in history], loss, layer=None)
    runs = [
        ("metagradient, test batch mean", lambda: meta.batch_influence(x, y, xt, yt), "<= 3x"),
        ("step-exact replay, test batch mean", lambda: exact.batch_influence(x, y, xt, yt), "<= 2x"),
        (f"metagradient, {len(yt)} test samples", lambda: meta.influence(x, y, xt, yt), ""),
        (f"step-exact replay, {len(yt)} test samples", lambda: exact.influence(x, y, xt, yt), ""),
        (f"TracInCP, all {len(history)} checkpoints, all parameters", lambda: tracin.influence(x, y, xt, yt), ""),
        ("dattri TRAK (final model, dim 256)",
         lambda: dattri_trak_scores(model, [history[-1].state_dict], x, y, xt, yt, projection_dim=256), ""),
    ]
    rows = [["training run (train_supervised + Tracer)", f"{training:.2f}", "1.00x", ""]]
    for name, fn, target in runs:
        seconds = best_of(args.reps, fn)
        ratio = seconds / training
        verdict = "" if not target else (" met" if ratio <= float(target[3:-1]) else " MISSED")
        rows.append([name, f"{seconds:.2f}", f"{ratio:.2f}x", target + verdict])
    header = ["what", "seconds (best of %d)" % args.reps, "vs training", "target"]
    body = table(header, rows)
    print(body)
    if not args.no_write:
        write_section("Replay methods", f"{machine()}; one torch thread. Digits CNN, {args.train} training "
                      f"samples, {args.epochs} epochs of batch 16 ({len(trace.steps)} steps, SGD with the cosine "
                      f"schedule); one test batch of {len(yt)}. Command: `.venv/bin/python "
                      f"benchmarks/bench_replay.py`.\n\n{body}")


if __name__ == "__main__":
    main()
