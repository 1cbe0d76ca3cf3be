"""The session API's cost: a user's own ResNet-style loop with and without fg.track, alone and under DDP.

    .venv/bin/python benchmarks/bench_session.py [--reps 3] [--samples 20000] [--epochs 3] [--ddp-samples 8000]

1. A ResNet-style CNN (BatchNorm, residual blocks, SGD with momentum, StepLR) over synthetic 3x32x32
   images, batch 128, one torch thread: the plain loop against the same loop through run.loader /
   run.optimizer, a checkpoint per epoch on both sides, the session's commit included. Time inside
   fgtrac is timed around its own calls (the loader's batch report, the step hook, checkpoint
   bookkeeping beyond torch.save, the commit); the wall-clock ratio checks it.
2. The same loop under torchrun --nproc_per_node=2 (gloo, one thread per rank), DistributedSampler,
   with and without a session; rank 0 reports its wall time, the commit (gather to rank 0) included.
3. `fgtrac influence`'s engine (fg.influence) against the digits pipeline's own gradient-cache and
   influence stages on the same run: the same training samples, test samples, checkpoints and layer.

Prints a table and writes the "Session API" section of benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks.bench_tracing import time_calls  # noqa: E402
from benchmarks.results import machine, table, write_section  # noqa: E402

BIN = Path(sys.executable).parent


class Block(nn.Module):
    """A residual block: two 3x3 convolutions with BatchNorm, and a projected skip when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential() if stride == 1 and cin == cout
                     else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.skip(x))


def resnet() -> nn.Module:
    """Return a small ResNet for 3x32x32 images and 10 classes."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Block(16, 16, 1),
                         Block(16, 32, 2), Block(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def images(n: int):
    """Return n synthetic images, labels and names."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), [f"img-{i}" for i in range(n)]


def loop(x, y, names, epochs: int, out: Path, session_home: Path | None, sampler=None) -> tuple[float, float]:
    """Train; return (wall seconds, seconds inside fgtrac). With session_home, through fg.track."""
    from fgtrac_assets.session.run import Run

    torch.manual_seed(0)
    model = resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=sampler is None, sampler=sampler,
                        generator=torch.Generator().manual_seed(0) if sampler is None else None)
    if sampler is not None:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    own = [0.0]
    started = time.perf_counter()
    run = None
    if session_home is not None:
        run = Run(names, f"bench-{time.time_ns()}", session_home)
        time_calls(run.recorder, ["batch", "_stepping"], own, [0])
        loader, optimizer = run.loader(loader), run.optimizer(optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        scheduler.step()
        plain = model.module if sampler is not None else model
        if run is None:
            torch.save({k: v.detach().clone() for k, v in plain.state_dict().items()}, out / f"epoch-{epoch}.pt")
        else:
            run.checkpoint(plain, val_loss=1.0)
    if run is not None:
        t = time.perf_counter()
        run.commit()
        own[0] += time.perf_counter() - t
    return time.perf_counter() - started, own[0]


def single(args, tmp: Path) -> list[str]:
    """Part 1: plain vs session on one process; return the table row."""
    x, y, names = images(args.samples)
    home = tmp / "home"  # one ledger, as a user's: its creation (schema, key) is the warm-up's, not timed
    loop(x[:1024], y[:1024], names[:1024], 1, tmp, None)
    loop(x[:1024], y[:1024], names[:1024], 1, tmp, home)
    plain, traced, inside = [], [], []
    for r in range(args.reps):
        plain.append(loop(x, y, names, args.epochs, tmp, None)[0])
        wall, own = loop(x, y, names, args.epochs, tmp, home)
        traced.append(wall)
        inside.append(own)
        print(f"  rep {r}: plain {plain[-1]:.1f} s, traced {wall:.1f} s, inside fgtrac {own:.3f} s", flush=True)
    p, t, i = statistics.median(plain), statistics.median(traced), statistics.median(inside)
    return [f"ResNet-style CNN, {args.samples:,} images 3x32x32, {args.epochs} epochs, batch 128, 1 thread",
            f"{p:.1f} s", f"{t:.1f} s", f"{t / p:.3f} ({(t - p) / p * 100:+.1f}%)", f"{i:.3f} s = {i / p * 100:.2f}%",
            "<= 2%"]


def ddp_worker(args) -> None:
    """Run inside torchrun: one loop (plain or traced) and rank 0 prints its wall and inside seconds as JSON."""
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    x, y, names = images(args.ddp_samples)
    sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, seed=0)
    out = Path(args.worker_out)
    home = out / "ddp-home" if args.worker == "traced" else None  # one ledger for every repetition
    dist.barrier()
    wall, own = loop(x, y, names, args.epochs, out, home, sampler)
    if dist.get_rank() == 0:
        print(json.dumps({"wall": wall, "inside": own}), flush=True)
    dist.destroy_process_group()


def ddp(args, tmp: Path) -> list[str]:
    """Part 2: plain DDP vs DDP with a session, two ranks under torchrun; return the table row."""
    import socket

    def once(mode: str, samples: int | None = None) -> dict:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [str(BIN / "torchrun"), "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}", __file__, "--worker", mode, "--worker-out", str(tmp),
                "--ddp-samples", str(samples or args.ddp_samples), "--epochs", str(args.epochs)]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode:
            raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
        return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])

    once("traced", 512)  # warm-up: creates the ledger
    plain, traced = [], []
    for r in range(args.reps):
        plain.append(once("plain"))
        traced.append(once("traced"))
        print(f"  rep {r}: plain {plain[-1]['wall']:.1f} s, traced {traced[-1]['wall']:.1f} s, "
              f"inside fgtrac {traced[-1]['inside']:.3f} s", flush=True)
    p = statistics.median(d["wall"] for d in plain)
    t = statistics.median(d["wall"] for d in traced)
    i = statistics.median(d["inside"] for d in traced)
    return [f"the same under DDP, 2 ranks (gloo, 1 thread each), {args.ddp_samples:,} images, {args.epochs} epochs",
            f"{p:.1f} s", f"{t:.1f} s", f"{t / p:.3f} ({(t - p) / p * 100:+.1f}%)", f"{i:.3f} s = {i / p * 100:.2f}%",
            "<= 3%"]


def influence(args, tmp: Path) -> list[str]:
    """Part 3: fg.influence against the digits pipeline's gradient-cache + influence stages, same sizes."""
    import fgtrac_assets as fg
    from fgtrac_assets.ledger.store import Ledger
    from fgtrac_assets.pipelines import stages
    from fgtrac_assets.pipelines.base import InfluenceSettings, TrainSettings
    from fgtrac_assets.pipelines.digits import DigitsPipeline

    ledger, p = Ledger(tmp / "chain"), DigitsPipeline()
    raw = stages.ingest(ledger, p, "r")
    prep = stages.preprocess(ledger, p, "r", raw.handle)
    trained = stages.train(ledger, p, "r", prep.handle, TrainSettings())
    selected = stages.select(ledger, p, "r", trained.handle)
    t = time.perf_counter()
    cache = stages.gradients(ledger, p, "r", prep.handle, trained.handle, selected.handle)
    stages.influence(ledger, p, "r", cache.handle, InfluenceSettings())
    stage_s = time.perf_counter() - t
    chosen = [c["checkpoint_id"] for c in ledger.committed_rows("checkpoint_selections", selected.handle.leaf_start,
                                                                 selected.handle.leaf_count) if c["selected"]]
    table_ = prep.handle.artifacts["prepared"].read_parquet(ledger.home.root)
    train, test = p.tensors(table_, "train"), p.tensors(table_, "test")
    # the same training through a session, the pipeline's own loop recording into it
    home = tmp / "session"
    with fg.track(train[0], run="digits-session", home=home) as run:
        model = p.build_model(table_)
        for ep in p.train(table_, TrainSettings(), run):  # the pipeline's loop, reporting to the session
            model.load_state_dict(ep.state_dict)
            run.checkpoint(model, val_loss=ep.val_loss)
    t = time.perf_counter()
    fg.influence("digits-session", p.build_model(table_), p.loss_fn(), train[1:], train[0], test[1:], test[0],
                 home=home, layer="fc", k=InfluenceSettings().top_k, checkpoints=len(chosen))
    session_s = time.perf_counter() - t
    return [f"influence: {len(train[0]):,} train x {len(test[0]):,} test digits, {len(chosen)} checkpoints, layer fc",
            f"{stage_s:.2f} s (gradient_cache + influence_scores stages)", f"{session_s:.2f} s (fg.influence)",
            f"{session_s / stage_s:.2f}", "-", "<= 1.0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--ddp-samples", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--parts", default="single,ddp,influence")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        ddp_worker(args)
        return
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            print(part, flush=True)
            rows.append({"single": single, "ddp": ddp, "influence": influence}[part](args, Path(tmp)))
    header = ["loop", "without fgtrac (median)", "with the session (median)", "wall-clock ratio",
              "inside fgtrac (recording + commit) / plain loop", "target"]
    print(table(header, rows))
    write_section("Session API", f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_session.py "
                  f"--reps {args.reps} --samples {args.samples} --ddp-samples {args.ddp_samples} --epochs "
                  f"{args.epochs} --parts {args.parts}` (medians of {args.reps} interleaved repetitions after a "
                  "warm-up). Inside fgtrac: the time of the loader's batch reports, the optimizer step hook and the "
                  "commit (under DDP: rank 0's, the gather of every rank's records included). The wall-clock ratio "
                  "also counts the rebuilt loader's key passing and the checkpoint's sha256; it is noisy on a "
                  "shared 2-core machine.\n\n" + table(header, rows))


if __name__ == "__main__":
    main()
