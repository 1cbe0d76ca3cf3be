"""Check that training and attribution on a GPU give the CPU's numbers (not a test; prints a table).

    .venv/bin/python benchmarks/gpu_check.py [--devices cuda,cpu] [--small] [--tol 1e-4]

Compares device A (default ``cuda``) with device B (default ``cpu``):

(a) the digits chain (``digits_cnn``: ingestion .. influence_scores through the stage
    functions, fixed seed, the registry's training settings), run once per device into its
    own temporary FGTRAC_HOME: the training and validation loss of every epoch, the
    selected checkpoints, and the influence rows (every top-k score by test sample, kind and
    rank, and every self-influence); then, on device B's own checkpoints, the gradient cache
    and TracInCP re-run on device A, which isolates attribution from training; the same for
    the graph chain (``multimodal_graph``, its default 28,000 ratings);
(b) a small ResNet-style CNN (BatchNorm, residual blocks) on random 3x32x32 data, trained a
    few steps on the CPU with a checkpoint every few steps, then TracInCP over its last layer
    (the exact Linear-factor path) and over all parameters (per-sample gradients, torch.func)
    on each device, fed CPU tensors: the influence matrices and self-influence.

Scores are compared relative to their scale: max |a - b| / max |b| (b = device B) must
not exceed ``--tol``; losses relative to each loss, max |a - b| / |b|.  Each stage's
recorded ``device`` and the scores' placement (the model's device, TracInCP's rule) are
checked too.  On CUDA, TF32 is switched off for matmuls and cuDNN convolutions (and cuDNN
made deterministic): TF32's 10-bit mantissa alone is ~1e-3 off.

Exit 0 with the table when everything agrees, 1 on any mismatch; exit 0 with one line
"no CUDA device: skipped" when a CUDA device is asked for and there is none.  ``--small``
(tiny sizes, the digits chain only: seconds on a CPU) is what ``tests/test_devices.py`` runs,
with ``--devices cpu,cpu``.  A few minutes on an H200 machine at the default sizes (the CPU side takes most of them).
"""

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # per chain, items to ingest (0 = all) and epochs (None = the registry's); ResNet width, train and
    # test samples, training steps
    "default": {"chains": {"digits_cnn": (0, None), "multimodal_graph": (28_000, None)},
                "width": 32, "n_train": 512, "n_test": 64, "steps": 30},
    "small": {"chains": {"digits_cnn": (120, 1)}, "width": 4, "n_train": 16, "n_test": 4, "steps": 3},
}
LABEL = {"digits_cnn": "digits", "multimodal_graph": "graph"}


@dataclasses.dataclass
class Row:
    """One comparison: what, how far apart, on what scale, and whether it is within tolerance."""

    check: str
    diff: float
    scale: float
    ok: bool
    note: str = ""

    @property
    def relative(self) -> float:
        return self.diff / self.scale if self.scale > 0 else self.diff


def compare_scores(check: str, a, b, tol: float, note: str = "") -> Row:
    """Return the row comparing two score arrays: max |a - b| relative to max |b|."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return Row(check, float("inf"), 1.0, False, f"shapes differ: {a.shape} vs {b.shape}")
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    ok = bool(np.isfinite(a).all() and np.isfinite(b).all()) and diff <= tol * max(scale, 1e-30)
    return Row(check, diff, scale, ok, note)


def compare_losses(check: str, a, b, tol: float) -> Row:
    """Return the row comparing two loss arrays: max |a - b| / |b| over the entries."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return Row(check, float("inf"), 1.0, False, f"shapes differ: {a.shape} vs {b.shape}")
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
    worst = int(rel.argmax()) if rel.size else 0
    diff, scale = (float(abs(a.flat[worst] - b.flat[worst])), float(abs(b.flat[worst]))) if rel.size else (0.0, 1.0)
    return Row(check, diff, scale, bool(np.isfinite(a).all()) and float(rel.max(initial=0.0)) <= tol)


# ----------------------------------------------------------------------------- (a) the chains


def run_chain(home: Path, name: str, device: str, limit: int, epochs: int | None) -> tuple:
    """Run a pipeline's chain on one device into home; return (pipeline, ledger, handles and metadata by asset)."""
    from fgtrac_assets.ledger.store import Ledger
    from fgtrac_assets.pipelines.base import IngestSettings, TrainSettings
    from fgtrac_assets.pipelines.chain import CHAIN, default_settings
    from fgtrac_assets.pipelines.registry import PIPELINES

    pipeline, defaults = next((p, d) for p, d in PIPELINES if p.name == name)
    train = dataclasses.replace(defaults, **({"epochs": epochs} if epochs else {}))
    chosen = {IngestSettings: IngestSettings(limit=limit), TrainSettings: train}
    ledger, handles, meta = Ledger(home), {}, {}
    for stage in CHAIN:
        settings = chosen.get(stage.settings, default_settings(stage, train))
        if hasattr(settings, "device"):
            settings = dataclasses.replace(settings, device=device)
        result = stage.call(ledger, pipeline, f"gpu-check-{device}", handles, settings)
        failed = [c.name for c in result.checks if not c.passed]
        if failed:
            raise SystemExit(f"{stage.name} on {device}: checks failed: {failed}")
        handles[stage.name], meta[stage.name] = result.handle, result.metadata
    return pipeline, ledger, handles, meta


def influence_scores(ledger, handle) -> dict:
    """Return {(kind, test sample, rank): score} and {(kind, test sample, rank): train sample} of an influence commit."""
    rows = handle.artifacts["influence"].read_parquet(ledger.home.root).to_pylist()
    key = lambda r: (r["kind"], r["test_sample_id"] or "", r["rank"])  # noqa: E731
    return {key(r): r["score"] for r in rows}, {key(r): r["train_sample_id"] for r in rows}


def chain_rows(name: str, dev_a: str, dev_b: str, size: tuple, tol: float, tmp: Path) -> list[Row]:
    """Return the rows of part (a) for one pipeline: its chain on both devices, and attribution re-run on A over
    B's checkpoints."""
    from fgtrac_assets.pipelines.base import GradientSettings, InfluenceSettings, resolve_device
    from fgtrac_assets.pipelines.chain import stage

    label, runs = LABEL[name], {}
    for tag, dev in (("a", dev_a), ("b", dev_b)):
        started = time.perf_counter()
        runs[tag] = run_chain(tmp / f"{name}-{tag}", name, dev, *size)
        print(f"  {name} chain on {dev}: {time.perf_counter() - started:.1f}s", file=sys.stderr)
    rows = []
    want = {"a": resolve_device(dev_a), "b": resolve_device(dev_b)}
    recorded = {tag: {asset: m["device"] for asset, m in run[3].items() if "device" in m} for tag, run in runs.items()}
    wrong = {tag: {k: v for k, v in rec.items() if v != want[tag]} for tag, rec in recorded.items()}
    rows.append(Row(f"{label}: each stage's recorded device", 0.0, 1.0, not any(wrong.values()) and
                    all(len(rec) == 3 for rec in recorded.values()),
                    f"{want['a']} / {want['b']}" + (f"; wrong: {wrong}" if any(wrong.values()) else "")))
    hist = {tag: run[3]["training_checkpoints"]["loss_history"] for tag, run in runs.items()}
    rows.append(compare_losses(f"{label}: train and val loss per epoch", [h[1:] for h in hist["a"]],
                               [h[1:] for h in hist["b"]], tol))
    sel = {tag: run[3]["selected_checkpoints"]["selected_epochs"] for tag, run in runs.items()}
    rows.append(Row(f"{label}: selected checkpoints (epochs)", 0.0, 1.0, sel["a"] == sel["b"],
                    f"{sel['a']}" + ("" if sel["a"] == sel["b"] else f" vs {sel['b']}")))
    scores = {tag: influence_scores(run[1], run[2]["influence_scores"]) for tag, run in runs.items()}
    rows.append(_influence_row(f"{label}: influence rows, each chain on its device", scores["a"], scores["b"], tol))
    # attribution alone: B's checkpoints, gradient cache and TracInCP on device A
    pipeline, ledger, handles, _ = runs["b"]
    cache = stage("gradient_cache").call(ledger, pipeline, "gpu-check-cross", handles, GradientSettings(device=dev_a))
    crossed = stage("influence_scores").call(ledger, pipeline, "gpu-check-cross", {"gradient_cache": cache.handle},
                                             InfluenceSettings(device=dev_a))
    row = _influence_row(f"{label}: influence rows, B's checkpoints scored on A",
                         influence_scores(ledger, crossed.handle), scores["b"], tol)
    used = {cache.metadata["device"], crossed.metadata["device"]}
    if used != {want["a"]}:
        row.ok, row.note = False, f"{row.note}; ran on {sorted(used)}, not {want['a']}"
    rows.append(row)
    return rows


def _influence_row(check: str, a: tuple, b: tuple, tol: float) -> Row:
    (score_a, ids_a), (score_b, ids_b) = a, b
    if set(score_a) != set(score_b):
        return Row(check, float("inf"), 1.0, False, f"{len(set(score_a) ^ set(score_b))} rows differ in key")
    keys = sorted(score_b)
    same = sum(ids_a[k] == ids_b[k] for k in keys)
    return compare_scores(check, [score_a[k] for k in keys], [score_b[k] for k in keys], tol,
                          f"{len(keys)} rows, same sample at {same}")


# ----------------------------------------------------------------------------- (b) a ResNet-style CNN


def build_resnet(width: int, classes: int = 10, seed: int = 0):
    """Return a small ResNet: a stem, a residual block, a strided residual block with a projection, then `fc`."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip = (nn.Sequential() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + self.skip(x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.layer1 = Block(width, width, 1)
            self.layer2 = Block(width, 2 * width, 2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2 * width, classes)

        def forward(self, x):
            return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))

    torch.manual_seed(seed)
    return ResNet()


def resnet_rows(dev_a: str, dev_b: str, size: dict, tol: float) -> list[Row]:
    """Return the rows of part (b): TracInCP of a briefly trained ResNet on both devices, from CPU data."""
    import torch

    from fgtrac_assets.attribution import TracInCP
    from fgtrac_assets.pipelines.base import resolve_device

    gen = torch.Generator().manual_seed(0)
    n_train, n_test = size["n_train"], size["n_test"]
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    x_tr, y_tr, x_te, y_te = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    model = build_resnet(size["width"])
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpts, every = [], max(1, size["steps"] // 3)
    model.train()
    for step in range(size["steps"]):  # trained on the CPU: both devices score the same checkpoints
        idx = torch.randint(0, n_train, (min(32, n_train),), generator=gen)
        opt.zero_grad()
        loss_fn(model(x_tr[idx]), y_tr[idx]).mean().backward()
        opt.step()
        if (step + 1) % every == 0:
            ckpts.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, 0.05))
    rows = []
    for layer, label in (("fc", "last layer"), (None, "all parameters")):
        out = {}
        for tag, dev in (("a", dev_a), ("b", dev_b)):
            m = copy.deepcopy(model).to(resolve_device(dev))
            tracin = TracInCP(m, ckpts, loss_fn, layer=layer, batch_size=64)
            started = time.perf_counter()
            scores = tracin.influence(x_tr, y_tr, x_te, y_te)
            selfinf = tracin.self_influence(x_tr, y_tr)
            where = {str(scores.device), str(selfinf.device)}
            out[tag] = (scores.cpu(), selfinf.cpu(), tracin.path, where, str(next(m.parameters()).device))
            print(f"  resnet {label} on {dev} ({tracin.path}): {time.perf_counter() - started:.1f}s", file=sys.stderr)
        (s_a, self_a, path_a, where_a, dev_of_a), (s_b, self_b, path_b, where_b, dev_of_b) = out["a"], out["b"]
        note = f"{path_a} path, {n_train}x{n_test}, {len(ckpts)} checkpoints"
        rows.append(compare_scores(f"resnet {label}: TracInCP influence", s_a, s_b, tol, note))
        rows.append(compare_scores(f"resnet {label}: TracInCP self-influence", self_a, self_b, tol))
        placed = where_a == {dev_of_a} and where_b == {dev_of_b} and path_a == path_b
        rows.append(Row(f"resnet {label}: scores on the model's device", 0.0, 1.0, placed,
                        f"{sorted(where_a)} / {sorted(where_b)}"))
    return rows


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the checks; print the table; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="cuda,cpu", help="the two devices to compare, A,B (default cuda,cpu)")
    parser.add_argument("--small", action="store_true", help="tiny sizes: seconds on a CPU (what the test runs)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    args = parser.parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",")]
    if len(devices) != 2:
        parser.error("--devices takes two devices, A,B")
    import torch

    from fgtrac_assets.errors import InputError
    from fgtrac_assets.pipelines.base import resolve_device

    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    try:
        for d in devices:
            resolve_device(d)
    except InputError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    size = SIZES["small" if args.small else "default"]
    dev_a, dev_b = devices
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fgtrac-gpu-check-") as tmp:
        rows = [row for name, chain in size["chains"].items()
                for row in chain_rows(name, dev_a, dev_b, chain, args.tol, Path(tmp))]
        rows += resnet_rows(dev_a, dev_b, size, args.tol)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    print(f"A = {dev_a}, B = {dev_b} ({name}, torch {torch.__version__}); tolerance {args.tol:g}, relative: "
          "scores to max |B score|, losses to each loss")
    width = max(len(r.check) for r in rows)
    print(f"{'check':<{width}}  {'max |A-B|':>10}  {'scale':>10}  {'relative':>10}  ok    note")
    for r in rows:
        print(f"{r.check:<{width}}  {r.diff:>10.3g}  {r.scale:>10.3g}  {r.relative:>10.3g}  "
              f"{'yes' if r.ok else 'NO':<4}  {r.note}")
    bad = [r.check for r in rows if not r.ok]
    print(f"{'all agree' if not bad else f'MISMATCH in {len(bad)} check(s)'} ({time.perf_counter() - started:.0f}s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
