"""Time fgtrac TracInCP against Captum (not a test; prints a small table).

    python benchmarks/bench_tracin.py [--quick]

* last layer: fgtrac TracInCP(layer="fc") vs Captum TracInCPFast (best of batch_size
  1000 / 5000) at 20,000 train x 5,000 test.  (TracInCPFast scores the final layer's
  weight only; fgtrac scores weight + bias — the same work up to one rank-1 term.)
* all layers: fgtrac TracInCP(layer=None) vs Captum TracInCP at 5,000 x 1,000 (Captum's
  per-example loss mode, and its faster sample_wise_grads_per_batch mode).

Synthetic MLP 64-256-10, float32, 3 checkpoints, CPU.
"""

import argparse
import os
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fgtrac_assets.attribution import TracInCP


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.act = nn.ReLU()
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(self.act(self.fc1(x)))


def make(n_train, n_test, tmp):
    torch.manual_seed(0)
    x = torch.randn(n_train + n_test, 64)
    y = (x[:, :10].argmax(1) + (torch.rand(len(x)) < 0.1).long()) % 10
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpts, paths = [], []
    for c, lr in enumerate((0.1, 0.05, 0.02)):
        for g in opt.param_groups:
            g["lr"] = lr
        for s in range(0, 4096, 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[s : s + 128]), y[s : s + 128]).backward()
            opt.step()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ckpts.append((state, lr))
        path = os.path.join(tmp, f"c{c}.pt")
        torch.save({"state": state, "lr": lr}, path)
        paths.append(path)
    return model, ckpts, paths, (x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def load_ckpt(model, path):
    blob = torch.load(path, weights_only=True)
    model.load_state_dict(blob["state"])
    return blob["lr"]


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    from captum.influence import TracInCP as CaptumTracInCP
    from captum.influence import TracInCPFast

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10x smaller problem sizes")
    args = ap.parse_args()
    div = 10 if args.quick else 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # ---------------- last layer, 20,000 x 5,000
        n_tr, n_te = 20_000 // div, 5_000 // div
        model, ckpts, paths, (xtr, ytr, xte, yte) = make(n_tr, n_te, tmp)
        ours = TracInCP(model, ckpts, nn.CrossEntropyLoss(reduction="none"), layer="fc", batch_size=4096)
        t_ours, s_ours = timed(lambda: ours.influence(xtr, ytr, xte, yte), repeat=2)
        t_cap = {}
        for bs in (1000, 5000):
            cap = TracInCPFast(
                model, "fc", TensorDataset(xtr, ytr), paths, checkpoints_load_func=load_ckpt,
                loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=bs,
            )
            t_cap[bs], s_cap = timed(lambda: cap.influence((xte, yte)), repeat=1)
            del s_cap
        best_bs = min(t_cap, key=t_cap.get)
        rows.append((f"last layer {n_tr}x{n_te}", "TracInCPFast", f"bs={best_bs}", t_cap[best_bs], t_ours))
        del s_ours

        # ---------------- all layers, 5,000 x 1,000
        n_tr, n_te = 5_000 // div, 1_000 // div
        model, ckpts, paths, (xtr, ytr, xte, yte) = make(n_tr, n_te, tmp)
        ours = TracInCP(model, ckpts, nn.CrossEntropyLoss(reduction="none"), layer=None, batch_size=1024)
        t_ours, s_ours = timed(lambda: ours.influence(xtr, ytr, xte, yte), repeat=2)
        cap = CaptumTracInCP(
            model, TensorDataset(xtr, ytr), paths, checkpoints_load_func=load_ckpt,
            loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=1000,
        )
        t_cap, s_cap = timed(lambda: cap.influence((xte, yte)))
        err = ((s_cap.T - s_ours).abs().max() / s_cap.abs().max()).item()
        rows.append((f"all layers {n_tr}x{n_te}", "TracInCP", "per-example loss", t_cap, t_ours))
        cap_fast = CaptumTracInCP(
            model, TensorDataset(xtr, ytr), paths, checkpoints_load_func=load_ckpt,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=1000,
            sample_wise_grads_per_batch=True,
        )
        t_capf, _ = timed(lambda: cap_fast.influence((xte, yte)))
        rows.append((f"all layers {n_tr}x{n_te}", "TracInCP", "sample_wise_grads_per_batch", t_capf, t_ours))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; all-layer max rel. diff vs Captum {err:.1e}")
    head = f"{'case':<24} {'captum':<13} {'captum setting':<28} {'captum s':>9} {'fgtrac s':>9} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    for case, name, setting, tc, to in rows:
        print(f"{case:<24} {name:<13} {setting:<28} {tc:>9.2f} {to:>9.2f} {tc / to:>8.1f}x")


if __name__ == "__main__":
    main()
