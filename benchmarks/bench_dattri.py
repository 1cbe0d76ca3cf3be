"""Time fgtrac's influence functions against dattri's (not a test; prints a table, writes RESULTS.md).

    python benchmarks/bench_dattri.py [--quick] [--reps 3] [--dattri-explicit]

Model and data as in NOTES.md: an MLP 64-64-32-10 (6,570 parameters) trained with SGD
on scikit-learn's digits, 1,000 train x 200 test samples (``--quick``: 250 x 50).  Both
libraries use the Hessian of the FULL mean training loss (dattri's ``cache`` gets one
batch of all training samples: with several batches it sums per-batch inverse-Hessian
products instead) and the same damping, chosen so that H + damping I is positive
definite (LiSSA diverges otherwise; the Hessian's smallest eigenvalue is printed).

Rows:

* CG, defaults: fgtrac block CG (stops at relative residual ``--cg-tol``) vs dattri
  ``IFAttributorCG`` at its default ``max_iter=10``.
* CG, fewest iterations: each library at the fewest iterations whose scores reach
  Pearson >= 0.99 with the exact ones (time to accuracy).
* LiSSA: both run the same recursion (same scale, damping, full-batch Hessian-vector
  products; dattri's ``damping`` is per unit of ``scaling``) for the fewest steps with
  which fgtrac's reaches Pearson >= 0.99.
* explicit (``--dattri-explicit``): fgtrac's dense Hessian + Cholesky vs dattri
  ``IFAttributorExplicit``, whose ``torch.func.hessian`` over one batch of 1,000 samples
  ran out of 23 GB here; with batches of 250 it sums per-batch inverse Hessians (a
  different quantity: its agreement shows by how much).

fgtrac's Hessian-vector products take its structured MLP path here (the model is an
``nn.Sequential`` of Linear layers and ReLUs: hand-written forward-over-reverse, see
``fgtrac_assets/attribution/hessian.py``); ``--generic`` forces the torch.func path.
Each fgtrac row runs twice: with the products' GEMMs in bfloat16
(``product_dtype=torch.bfloat16``, the setting the speed-up target is read from) and
with the default float32 products.

Agreement: Pearson and cosine of the (1000 x 200) score matrices against the exact
solution (fgtrac explicit, float64 factorisation) and between the two libraries.
Times are medians of ``--reps`` interleaved repetitions, end to end (gradients,
Hessian products, solve, scores).
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import machine, table, write_section  # noqa: E402
from fgtrac_assets.attribution import InfluenceFunction  # noqa: E402
from fgtrac_assets.attribution.hessian import MeanLossHessian, snapshot_state  # noqa: E402

LOSS = nn.CrossEntropyLoss(reduction="none")


def make(n_train, n_test):
    """Return (model, xtr, ytr, xte, yte): the digits MLP 64-64-32-10 trained with SGD (40 epochs, lr 0.1)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train : n_train + n_test], y[n_train : n_train + n_test]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(40):
        order = torch.randperm(n_train)
        for s in range(0, n_train, 32):
            b = order[s : s + 32]
            opt.zero_grad()
            LOSS(model(xtr[b]), ytr[b]).mean().backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model, xtr, ytr, xte, yte


def dattri_task(model):
    """Return a dattri AttributionTask over the mean cross-entropy (labels cast back to long: LiSSA floats them)."""
    from dattri.task import AttributionTask

    def loss_func(params, data):
        xx, tt = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, xx), tt.long())

    return AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())


def dattri_scores(attributor, xtr, ytr, xte, yte):
    """Return dattri's (n_train, n_test) scores with one full-data batch for the Hessian and one test batch."""
    train = TensorDataset(xtr, ytr)
    attributor.cache(DataLoader(train, batch_size=len(xtr)))
    return attributor.attribute(DataLoader(train, batch_size=len(xtr)),
                                DataLoader(TensorDataset(xte, yte), batch_size=len(xte)))


def pick_damping(model, xtr, ytr):
    """Return the smallest grid damping d with H + (d / 1.5) I positive definite (Cholesky), so LiSSA can converge."""
    h = InfluenceFunction(model, LOSS, xtr, ytr, method="explicit").hessian().matrix(10_000).double()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for d in (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0):
        if int(torch.linalg.cholesky_ex(h + (d / 1.5) * eye).info) == 0:
            return d
    raise RuntimeError("the Hessian is too indefinite for the damping grid")


def dattri_version():
    """Return the installed dattri version."""
    from importlib.metadata import version

    return version("dattri")


def pearson(a, b):
    """Return the Pearson correlation of two score matrices (flattened)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def cosine(a, b):
    """Return the cosine similarity of two score matrices (flattened)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def block_product_seconds(model, xtr, ytr, m, dtype, reps=15):
    """Return the median seconds of one structured Hessian product of m random vectors (products in ``dtype``)."""
    names = [n for n, _ in model.named_parameters()]
    hess = MeanLossHessian(model, names, snapshot_state(model), xtr, ytr, LOSS, batch_size=200, product_dtype=dtype)
    v = torch.randn(m, hess.dim, generator=torch.Generator().manual_seed(0))
    hess.matmul(v)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        hess.matmul(v)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_times(fns, reps):
    """Return ({name: median seconds}, {name: last result}), running the callables round-robin ``reps`` times."""
    times = {name: [] for name in fns}
    out = {}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, out


def main():
    """Print the benchmark table and write the RESULTS.md section."""
    from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit, IFAttributorLiSSA

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="250 train x 50 test")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported")
    ap.add_argument("--damping", type=float, default=None,
                    help="default: the smallest of 0.05 ... 2 that is at least 1.5 x |min eigenvalue of H|")
    ap.add_argument("--cg-tol", type=float, default=1e-2)
    ap.add_argument("--lissa-steps", type=int, default=None, help="default: the fewest reaching Pearson >= 0.99")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--generic", action="store_true",
                    help="fgtrac: torch.func Hessian-vector products instead of the structured MLP path")
    ap.add_argument("--dattri-explicit", action="store_true",
                    help="also time dattri's explicit solver (minutes; per-batch Hessians, see the docstring)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    n_train, n_test = (250, 50) if args.quick else (1000, 200)
    model, xtr, ytr, xte, yte = make(n_train, n_test)
    lam = args.damping if args.damping is not None else pick_damping(model, xtr, ytr)
    n_params = sum(p.numel() for p in model.parameters())
    data = (xtr, ytr, xte, yte)

    def ours(method, **kw):
        def run():
            m = InfluenceFunction(model, LOSS, xtr, ytr, method=method, damping=lam, hvp_batch_size=200,
                                  **({} if args.generic else {"product_dtype": product_dtype}), **kw)
            if args.generic:
                m._hessian = MeanLossHessian(model, m.param_names, m.state, xtr, ytr, LOSS, batch_size=200,
                                             structured=False)
            return m.influence(*data)
        return run

    product_dtype = None  # the model's float32; set to bfloat16 for the bf16 column below

    def bf16(fn):
        """Return fn run with the products' GEMMs in bfloat16."""
        def run():
            nonlocal product_dtype
            product_dtype = torch.bfloat16
            try:
                return fn()
            finally:
                product_dtype = None
        return run

    t0 = time.perf_counter()
    exact_if = InfluenceFunction(model, LOSS, xtr, ytr, method="explicit", damping=lam, hvp_batch_size=200)
    exact = exact_if.influence(*data)
    t_exact_once = time.perf_counter() - t0
    spectrum = exact_if.hessian().top_eigenvalue()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n_params} parameters, {n_train} x {n_test}; "
          f"damping {lam}; fgtrac explicit once {t_exact_once:.1f} s; {exact_if.report()['explicit']}")
    product_ms = {} if args.generic else {
        str(dt).removeprefix("torch."): 1e3 * block_product_seconds(model, xtr, ytr, n_test, dt)
        for dt in (torch.float32, torch.bfloat16)}
    products = ("" if args.generic else
                f"; one product of {n_test} vectors over the {n_train:,} samples (median of 15): "
                f"{product_ms['float32']:.1f} ms with fp32 GEMMs, {product_ms['bfloat16']:.1f} ms with bf16 GEMMs")
    print(products.removeprefix("; "))

    task = dattri_task(model)

    def fewest(candidates, make_fn):
        """Return the first candidate whose scores reach Pearson >= 0.99 with the exact ones (else the last)."""
        for c in candidates:
            if pearson(make_fn(c)(), exact) >= 0.99:
                return c
        return candidates[-1]

    def dattri_cg(k):
        return lambda: dattri_scores(IFAttributorCG(task=task, max_iter=k, regularization=lam), *data)

    def ours_cg(k):
        return ours("cg", tol=0.0, max_iter=k)

    cg_probe = InfluenceFunction(model, LOSS, xtr, ytr, method="cg", damping=lam, tol=args.cg_tol, hvp_batch_size=200)
    cg_probe.influence(*data)
    cg_iters = cg_probe.report()["iterations_max"]
    k_ours = fewest([1, 2, 3, 4, 6, 8, 12, 16], ours_cg)
    k_dattri = fewest([1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30], dattri_cg)
    lissa_probe = InfluenceFunction(model, LOSS, xtr, ytr, method="lissa", damping=lam, tol=0.0, depth=1)
    lissa_probe.influence(xtr[:1], ytr[:1], xte[:1], yte[:1])
    scale = lissa_probe.scale

    def ours_lissa(steps):
        return ours("lissa", tol=0.0, depth=steps, scale=scale)

    steps = args.lissa_steps or fewest([10, 20, 30, 40, 50, 75, 100, 150, 200, 300], ours_lissa)

    cases = [
        ("CG, defaults", f"block CG, tol {args.cg_tol:g} ({cg_iters} iterations)",
         "IFAttributorCG max_iter=10 (default)", ours("cg", tol=args.cg_tol), dattri_cg(10)),
        ("CG, fewest iterations to Pearson >= 0.99", f"block CG, {k_ours} iterations",
         f"IFAttributorCG max_iter={k_dattri}", ours_cg(k_ours), dattri_cg(k_dattri)),
        ("LiSSA, fewest steps to Pearson >= 0.99", f"{steps} steps, scale {scale:.3g}, full-batch HVPs",
         f"IFAttributorLiSSA, same steps and scale, batch_size={n_train}", ours_lissa(steps),
         lambda: dattri_scores(IFAttributorLiSSA(task=task, batch_size=n_train, recursion_depth=steps,
                                                 damping=lam / scale, scaling=scale), *data)),
    ]
    if args.dattri_explicit:
        batch = min(250, n_train)

        def dattri_explicit():
            att = IFAttributorExplicit(task=task, regularization=lam)
            train = TensorDataset(xtr, ytr)
            att.cache(DataLoader(train, batch_size=batch))
            return att.attribute(DataLoader(train, batch_size=n_train),
                                 DataLoader(TensorDataset(xte, yte), batch_size=n_test))

        cases.append(("explicit", "dense Hessian + Cholesky (float64)",
                      f"IFAttributorExplicit, Hessian in batches of {batch} (one batch of {n_train} ran out of memory)",
                      ours("explicit"), dattri_explicit))

    rows = []
    for name, ours_desc, dattri_desc, f_ours, f_dattri in cases:
        reps = args.reps if name != "explicit" else 1
        fns = {"fgtrac": f_ours, "dattri": f_dattri}
        if name != "explicit" and not args.generic:
            fns["fgtrac_bf16"] = bf16(f_ours)
        med, out = median_times(fns, reps)
        s_o, s_d = out["fgtrac"], out["dattri"].T if out["dattri"].shape != exact.shape else out["dattri"]
        s_b = out.get("fgtrac_bf16")
        row = (name, ours_desc, dattri_desc, med["dattri"], med["fgtrac"], pearson(s_o, exact), pearson(s_d, exact),
               pearson(s_o, s_d), cosine(s_o, exact), cosine(s_d, exact), reps,
               med.get("fgtrac_bf16"), None if s_b is None else pearson(s_b, exact))
        rows.append(row)
        bf = "" if row[11] is None else f"bf16 {row[11]:6.2f} s x{row[3] / row[11]:5.1f}  "
        print(f"{name:<20} dattri {med['dattri']:7.2f} s  {bf}fp32 {med['fgtrac']:6.2f} s x{row[3] / row[4]:5.1f}  "
              f"Pearson vs exact {row[5]:.5f} / {row[6]:.5f}  fgtrac-dattri {row[7]:.5f}", flush=True)

    head = ["solver", "fgtrac", "dattri", "dattri s", "fgtrac s, bf16 products", "speed-up, bf16",
            "fgtrac s, fp32 products", "speed-up, fp32", "Pearson vs exact (fgtrac bf16 / fp32 / dattri)",
            "cosine vs exact (fgtrac fp32 / dattri)", "Pearson fgtrac vs dattri", "reps"]

    def bf16_cell(r, value):
        return "-" if r[11] is None else value

    md = [[r[0], r[1], r[2], f"{r[3]:.2f}", bf16_cell(r, f"{r[11]:.2f}"), bf16_cell(r, f"**{r[3] / r[11]:.1f}x**"),
           f"{r[4]:.2f}", f"{r[3] / r[4]:.1f}x", f"{bf16_cell(r, f'{r[12]:.5f}')} / {r[5]:.5f} / {r[6]:.5f}",
           f"{r[8]:.5f} / {r[9]:.5f}", f"{r[7]:.5f}", r[10]] for r in rows]
    print(table(head, md))
    rep = exact_if.report()["explicit"]
    write_section(
        "Influence functions vs dattri",
        f"Machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"dattri {dattri_version()}. Command: "
        f"`.venv/bin/python benchmarks/bench_dattri.py{' --quick' if args.quick else ''}"
        f"{' --generic' if args.generic else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}` (medians of the reps "
        f"shown, interleaved). Digits MLP 64-64-32-10 ({n_params:,} parameters), {n_train:,} train x {n_test} test, "
        f"Hessian of the full mean training loss, damping {lam} for both (the smallest grid value at least 1.5x "
        f"the magnitude of the Hessian's most negative eigenvalue, so that LiSSA converges; largest eigenvalue "
        f"{spectrum:.2f}; {rep.get('factorization')} factorisation, H + damping I positive definite: "
        f"{rep.get('positive_definite')}). fgtrac's Hessian-vector products: "
        f"{'torch.func (generic)' if args.generic else 'structured MLP path (hand-written forward-over-reverse)'}"
        f"{products}. "
        f"bf16 products: `InfluenceFunction(..., product_dtype=torch.bfloat16)`, the products' GEMMs in bfloat16 "
        f"with fp32 accumulation inside each GEMM (this CPU has AVX-512 BF16); the solver, gradients and scores "
        f"stay in float32. fp32 products: the default. Exact = fgtrac explicit (float64 factorisation). Target: "
        f">= 10x faster than dattri with Pearson >= 0.99 against the exact scores.\n\n" + table(head, md))


if __name__ == "__main__":
    main()
