"""Tracing overhead: the same training loop with and without fgtrac (events, hashing, ledger writes), digits and graph.

    .venv/bin/python benchmarks/bench_tracing.py [--reps 5] [--graph-limit 28000] [--no-large]

Digits: the CNN loop a user would write (plain_loop) against the same loop through the
Tracer's loader/optimizer wrappers (traced_loop).  Graph: the multimodal_graph
pipeline's own training loop (MovieLensPipeline.train) with a NullRecorder against the same
call with a Tracer, which adds the per-target 2-hop details and the `message_passing`
roles (once per run) and the `batched` events; both then commit to a ledger (one leaf per
step, tracing/groups.py).  Each configuration runs at the job's default size and, unless
--no-large, at a larger one (digits replicated 8x; all of MovieLens), where the fixed
cost of a commit weighs less.

Prints a table and writes the "Tracing overhead" section of benchmarks/RESULTS.md.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks.results import machine, table, write_section  # noqa: E402
from fgtrac_assets.ledger.store import Commit, Ledger  # noqa: E402
from fgtrac_assets.pipelines import stages  # noqa: E402
from fgtrac_assets.pipelines.base import TrainSettings  # noqa: E402
from fgtrac_assets.pipelines.digits import DigitsPipeline, build_cnn  # noqa: E402
from fgtrac_assets.pipelines.movielens import MovieLensPipeline  # noqa: E402
from fgtrac_assets.pipelines.registry import DEFAULT_LIMITS, PIPELINES  # noqa: E402
from fgtrac_assets.pipelines.training import lr_at  # noqa: E402
from fgtrac_assets.tracing.recorder import NullRecorder  # noqa: E402
from fgtrac_assets.tracing.tracer import Tracer  # noqa: E402


def plain_loop(x, y, settings: TrainSettings) -> None:
    """The loop a user would write without fgtrac."""
    torch.manual_seed(settings.seed)
    model = build_cnn(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=settings.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(settings.seed))
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    for epoch in range(settings.epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(settings, epoch)
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).mean().backward()
            opt.step()


def traced_loop(x, y, ids, settings: TrainSettings, home: Path) -> tuple[float, float, int]:
    """The same loop through fgtrac's tracer, events committed to a ledger; return (record s, commit s, events)."""
    torch.manual_seed(settings.seed)
    model = build_cnn(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=settings.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(settings.seed))
    tracer = Tracer(ids, "bench")
    own = [0.0]  # seconds spent inside fgtrac's recording calls: the loader's batch report and the step hook
    time_calls(tracer._steps, ["batch", "_stepping"], own, [0])
    traced, opt = tracer.wrap_loader(loader), torch.optim.SGD(model.parameters(), lr=settings.lr)
    step = tracer.wrap_optimizer(opt)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    for epoch in range(settings.epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(settings, epoch)
        for xb, yb in traced:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).mean().backward()
            step.step()
    return own[0], commit_events(tracer, home), len(tracer)


def commit_events(tracer: Tracer, home: Path) -> float:
    """Commit the tracer's events to the ledger at home (event rows, a leaf per group, log, signed head); return seconds."""
    t = time.perf_counter()
    Ledger(home).commit(Commit(pipeline="bench", asset="training_checkpoints", run_id="bench", groups=tracer.groups()))
    return time.perf_counter() - t


def empty_commit(home: Path) -> float:
    """Return the seconds of a commit with no rows: what any materialisation pays, traced or not (not timed as overhead)."""
    t = time.perf_counter()
    Ledger(home).commit(Commit(pipeline="bench", asset="training_checkpoints", run_id="bench"))
    return time.perf_counter() - t


def time_calls(obj, names: list[str], own: list[float], depth: list[int]) -> None:
    """Replace obj's methods `names` by wrappers adding their wall time to own[0] (outermost calls only)."""
    for name in names:
        inner = getattr(obj, name)

        def wrapper(*args, _inner=inner, **kwargs):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    own[0] += time.perf_counter() - t

        setattr(obj, name, wrapper)


def graph_plain_loop(pipeline: MovieLensPipeline, prepared, settings: TrainSettings) -> None:
    """The graph pipeline's training loop without records (a NullRecorder)."""
    for _ in pipeline.train(prepared, settings, NullRecorder()):
        pass


def graph_traced_loop(pipeline: MovieLensPipeline, prepared, ids, settings: TrainSettings,
                      home: Path) -> tuple[float, float, int]:
    """The same loop traced, events committed to a ledger; return (record s, commit s, events)."""
    own, depth = [0.0], [0]
    tracer = Tracer(ids, "bench")
    time_calls(tracer, ["record_batch", "record"], own, depth)  # the batched and message_passing events
    time_calls(pipeline, ["receptive_fields"], own, depth)  # per-target 2-hop sizes and hashes
    try:
        for _ in pipeline.train(prepared, settings, tracer):
            pass
    finally:
        del pipeline.receptive_fields  # back to the class's method
    return own[0], commit_events(tracer, home), len(tracer)


def measure(reps: int, plain, traced, home: Path) -> dict:
    """Return medians over interleaved reps of plain and traced seconds, recording, commit and empty-commit seconds."""
    plain()  # warm-up, not timed: first-call costs (imports, PyG's to_hetero, allocator) hit neither side
    runs = {"plain": [], "traced": [], "record": [], "commit": [], "empty": []}
    for _ in range(reps):  # interleaved so drift hits both alike
        t = time.perf_counter()
        plain()
        runs["plain"].append(time.perf_counter() - t)
        t = time.perf_counter()
        record, commit, events = traced()
        runs["traced"].append(time.perf_counter() - t)
        runs["record"].append(record)
        runs["commit"].append(commit)
        runs["empty"].append(empty_commit(home))
    print("  per repetition (s): " + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in vs) for k, vs in runs.items()),
          flush=True)
    paired = statistics.median(t / p for t, p in zip(runs["traced"], runs["plain"]))
    inside = statistics.median((r + c) / p for r, c, p in zip(runs["record"], runs["commit"], runs["plain"]))
    return {**{k: statistics.median(v) for k, v in runs.items()}, "events": events, "paired": paired, "inside": inside}


def row(what: str, m: dict, target: str) -> list[str]:
    """Return one table row: plain, traced, wall-clock ratio, time inside fgtrac (recording, commit) over the plain loop."""
    a = m["plain"]
    own = m["record"] + m["commit"]
    return [what, f"{a:.2f} s", f"{m['traced']:.2f} s", f"{m['traced'] / a:.2f} ({(m['traced'] - a) / a * 100:+.1f}%); "
            f"paired {m['paired']:.2f}",
            f"{m['record']:.3f} s = {m['record'] / a * 100:.1f}%", f"{m['commit']:.3f} s = {m['commit'] / a * 100:.1f}%",
            f"{own:.3f} s = {own / a * 100:.1f}% (per repetition: {m['inside'] * 100:.1f}%)",
            f"{m['empty'] * 1e3:.0f} ms = {m['empty'] / a * 100:.1f}%", target]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--graph-limit", type=int, default=DEFAULT_LIMITS["multimodal_graph"],
                    help="ratings of the graph run (whole users; default: the job's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the note in RESULTS.md)")
    ap.add_argument("--no-large", action="store_true", help="only the default-size runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = TrainSettings()
        ledger, p = Ledger(Path(tmp) / "prep"), DigitsPipeline()
        raw = stages.ingest(ledger, p, "r")
        prep = stages.preprocess(ledger, p, "p", raw.handle)
        table_ = prep.handle.artifacts["prepared"].read_parquet(ledger.home.root)
        ids, x, y = p.tensors(table_, "train")
        for copies in (1,) if args.no_large else (1, 8):
            xs, ys = x.repeat(copies, 1, 1, 1), y.repeat(copies)
            ids_k = [f"{s}#{k}" if copies > 1 else s for k in range(copies) for s in ids]
            print(f"digits CNN x{copies}", flush=True)
            home = Path(tmp) / f"digits-{copies}"
            m = measure(args.reps, lambda: plain_loop(xs, ys, settings),
                        lambda: traced_loop(xs, ys, ids_k, settings, home), home)
            rows.append(row(f"digits CNN, {settings.epochs} epochs, {len(ids_k):,} samples"
                            f"{' (the digits 8 times)' if copies > 1 else ' (the default run)'} ({m['events']:,} "
                            "batched events)", m, "<= 5%"))

        gp = MovieLensPipeline()
        g_settings = dict((q.name, s) for q, s in PIPELINES)[gp.name]
        for limit in (args.graph_limit,) if args.no_large else (args.graph_limit, 0):
            g_prep = gp.preprocess(gp.ingest("", limit).table).table
            g_ids, _, _ = gp.tensors(g_prep, "train")
            print(f"multimodal_graph GNN, limit {limit}", flush=True)
            home = Path(tmp) / f"graph-{limit}"
            m = measure(args.reps, lambda: graph_plain_loop(gp, g_prep, g_settings),
                        lambda: graph_traced_loop(gp, g_prep, g_ids, g_settings, home), home)
            rows.append(row(f"multimodal_graph GNN, {g_settings.epochs} epochs, batch {g_settings.batch_size}, "
                            f"{len(g_ids):,} training ratings of {g_prep.num_rows:,}"
                            f"{' (the default run)' if limit else ' (all of MovieLens)'} ({m['events']:,} batched, "
                            "message_passing and receptive_field events)", m, "<= 10%"))
    header = ["training loop", "without fgtrac (median)", "with tracing + ledger commit (median)",
              "wall-clock ratio of the medians; median of the per-repetition ratios", "inside fgtrac: recording in the loop / plain loop",
              "inside fgtrac: ledger commit / plain loop", "inside fgtrac: total / plain loop",
              "a commit with no rows (any materialisation's fixed cost, included above)", "target"]
    print(table(header, rows))
    write_section("Tracing overhead", f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_tracing.py "
                  f"--reps {args.reps} --threads {args.threads}` (medians of {args.reps} interleaved repetitions after "
                  f"one untimed warm-up; graph: the first {args.graph_limit:,} MovieLens ratings, whole users, the "
                  "job's default training settings; both loops are the pipeline's own `train` with and without a "
                  "Tracer). The time spent inside fgtrac's own calls is measured directly: recording (digits: the "
                  "`batched` events; graph: also each target's 2-hop size and hash and the once-per-run "
                  "`message_passing` and `receptive_field` roles) and the ledger commit of those events (one "
                  "log leaf per step or per 1,024 members, member rows as 8-byte sample keys, signed tree head). "
                  "The last column is a commit of no rows to the same ledger: the fixed cost every "
                  "materialisation pays, traced or not, which is part of the overhead figures. The time inside "
                  "fgtrac is the steadier measure of the overhead (it is timed around fgtrac's own calls); the "
                  "wall-clock ratios check it, within the machine's noise: the untraced graph loop alone varied "
                  "by +-10% between repetitions on a quiet machine. The wall-clock "
                  "ratio is noisy on a shared 2-core machine: with 2 torch threads, single repetitions of the same "
                  "untraced loop took from 2 s to 60 s while other jobs ran, hence one thread by default.\n\n"
                  + table(header, rows))


if __name__ == "__main__":
    main()
