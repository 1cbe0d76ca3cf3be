"""Scale (issue 9): a 100,000-sample synthetic image pipeline through the whole chain, and chunked 100k x 10k influence.

    .venv/bin/python benchmarks/bench_scale.py [--samples 100000] [--train 100000 --test 10000]

Each part runs in its own process so its peak RSS (ru_maxrss) is its own. Prints a table and
writes the "Scale" section of benchmarks/RESULTS.md.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import machine, table, write_section  # noqa: E402


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_digits(n: int, path: Path, seed: int = 0) -> None:
    """Write n labelled 8x8 images (bundled digits, shifted and noised, all distinct) as a Parquet 'pixels' table."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(d.images), n)
    imgs = d.images[pick] * (255 / 16)
    shifts = rng.integers(-1, 2, (n, 2))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            m = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            imgs[m] = np.roll(imgs[m], (dy, dx), axis=(1, 2))
    imgs = np.clip(imgs + rng.normal(0, 12, imgs.shape), 0, 255).round().astype(np.int64)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(imgs.reshape(-1)), 64)
    pq.write_table(pa.table({"pixels": pixels, "height": np.full(n, 8), "width": np.full(n, 8),
                             "label": d.target[pick].astype(np.int64)}), path)


def part_chain(samples: int, epochs: int) -> dict:
    """Run ingest -> ... -> influence on `samples` synthetic images; return per-stage seconds and peak RSS."""
    from fgtrac_assets.ledger.store import Ledger
    from fgtrac_assets.ledger.verify import verify_ledger
    from fgtrac_assets.pipelines import stages
    from fgtrac_assets.pipelines.base import IngestSettings, TrainSettings
    from fgtrac_assets.pipelines.digits import DigitsPipeline

    out: dict = {"stages": []}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images.parquet"
        t = time.perf_counter()
        synthetic_digits(samples, src)
        out["generate_s"] = time.perf_counter() - t
        ledger, p, run = Ledger(Path(tmp) / "home"), DigitsPipeline(), "scale"
        h: dict = {}
        steps = [
            ("raw_samples", lambda: stages.ingest(ledger, p, run, IngestSettings(source=str(src)))),
            ("preprocessed_samples", lambda: stages.preprocess(ledger, p, run, h["raw_samples"])),
            ("training_checkpoints", lambda: stages.train(ledger, p, run, h["preprocessed_samples"],
                                                          TrainSettings(epochs=epochs, lr=0.1, batch_size=128))),
            ("selected_checkpoints", lambda: stages.select(ledger, p, run, h["training_checkpoints"])),
            ("gradient_cache", lambda: stages.gradients(ledger, p, run, h["preprocessed_samples"],
                                                        h["training_checkpoints"], h["selected_checkpoints"])),
            ("influence_scores", lambda: stages.influence(ledger, p, run, h["gradient_cache"])),
        ]
        for name, step in steps:
            t = time.perf_counter()
            r = step()
            h[name] = r.handle
            out["stages"].append([name, time.perf_counter() - t, peak_rss_mb(), r.handle.leaf_count])
        t = time.perf_counter()
        report = verify_ledger(ledger, update_witness=False)
        out["verify_s"], out["verify_ok"], out["leaves"] = time.perf_counter() - t, report.ok, report.leaves
        out["peak_rss_mb"] = peak_rss_mb()
        out["ledger_mb"] = ledger.home.ledger.stat().st_size / 2**20
    return out


def part_influence(n_train: int, n_test: int, k: int = 10, checkpoints: int = 3) -> dict:
    """Score n_train x n_test (last layer of an MLP 64-256-10) in chunks keeping top-k; return seconds and peak RSS."""
    import torch

    from fgtrac_assets.attribution.ghost import Factors, self_influence_from_factors, top_k_from_factors

    torch.manual_seed(0)
    before = peak_rss_mb()
    train = [[Factors(errors=torch.randn(n_train, 10), activations=torch.rand(n_train, 256))] for _ in range(checkpoints)]
    test = [[Factors(errors=torch.randn(n_test, 10), activations=torch.rand(n_test, 256))] for _ in range(checkpoints)]
    inputs_mb = peak_rss_mb() - before
    lrs = [0.1, 0.05, 0.01][:checkpoints]
    ticks = []
    t = time.perf_counter()
    top = top_k_from_factors(train, test, lrs, k, progress=lambda done, total: ticks.append(done))
    score_s = time.perf_counter() - t
    t = time.perf_counter()
    self_influence_from_factors(train, lrs)
    self_s = time.perf_counter() - t
    # spot-check exactness of the chunked top-1 against a direct computation for a few test samples
    j = torch.arange(5)
    full = sum(lr * (tr[0].errors @ te[0].errors[j].T) * (tr[0].activations @ te[0].activations[j].T + 1)
               for lr, tr, te in zip(lrs, train, test))
    exact = bool(torch.allclose(full.max(0).values, top.proponent_score[:5, 0], rtol=1e-4))
    return {"score_s": score_s, "self_s": self_s, "peak_rss_mb": peak_rss_mb(), "inputs_mb": inputs_mb,
            "full_matrix_mb": n_train * n_test * 4 / 2**20, "progress_reports": len(ticks), "exact_top1": exact}


def child(args: list[str]) -> dict:
    """Run one part in a fresh interpreter and return its JSON result."""
    proc = subprocess.run([sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train", type=int, default=100_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--part", choices=["chain", "influence"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part == "chain":
        print(json.dumps(part_chain(args.samples, args.epochs)))
        return
    if args.part == "influence":
        print(json.dumps(part_influence(args.train, args.test)))
        return
    chain = child(["--part", "chain", "--samples", str(args.samples), "--epochs", str(args.epochs)])
    inf = child(["--part", "influence", "--train", str(args.train), "--test", str(args.test)])
    rows = [[f"chain: {name}", f"{sec:.1f} s", f"{rss:,.0f} MiB", f"{leaves:,} leaves"]
            for name, sec, rss, leaves in chain["stages"]]
    rows.append(["chain: full verify", f"{chain['verify_s']:.1f} s", "", f"{chain['leaves']:,} leaves, "
                 + ("OK" if chain["verify_ok"] else "FAILED")])
    rows.append([f"chain total ({args.samples:,} samples, {args.epochs} epochs)",
                 f"{sum(s[1] for s in chain['stages']):.0f} s", f"peak {chain['peak_rss_mb']:,.0f} MiB",
                 f"ledger {chain['ledger_mb']:,.0f} MiB"])
    rows.append([f"influence {args.train:,} x {args.test:,}, top-10, 3 checkpoints (chunked)",
                 f"{inf['score_s']:.1f} s", f"peak {inf['peak_rss_mb']:,.0f} MiB",
                 f"full matrix would be {inf['full_matrix_mb']:,.0f} MiB; inputs {inf['inputs_mb']:,.0f} MiB; "
                 f"{inf['progress_reports']} progress reports; top-1 exact: {inf['exact_top1']}"])
    rows.append([f"self-influence of {args.train:,}", f"{inf['self_s']:.2f} s", "", ""])
    header = ["what", "time", "peak RSS (process)", "notes"]
    print(table(header, rows))
    write_section("Scale", f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_scale.py --samples "
                  f"{args.samples} --epochs {args.epochs} --train {args.train} --test {args.test}`. Peak RSS is "
                  "the process's high-water mark after each stage (ru_maxrss), so it only grows.\n\n"
                  + table(header, rows))


if __name__ == "__main__":
    main()
