"""The further-training gold standard for final-model-only attribution (Wei et al. 2024, section 4).

From the final parameters, training continues with plain SGD (``lr``, ``batch_size``) on
the full training set and, for each probe sample i, on the set without i: same seed,
same batch order, sample i's batch simply one sample smaller (its loss is the mean over
the samples present).  The score of (i, z') is the test loss after further training
without i minus the loss with i, averaged over ``seeds``: positive = sample i helped,
the sign convention of TracInCP and :class:`.InfluenceFunction`.  Output differences
g(z', theta_-i) - g(z', theta) are kept too.

All runs of a probe chunk and of every seed train together: their parameters are
stacked (seeds x (1 + len(chunk)) copies) and a nested ``torch.func`` vmap -- over the
runs of a seed, which share that seed's batch, and over the seeds -- computes every
run's gradient, so a step costs one batched forward/backward for all of them.  Scores are
recorded after each step count in ``steps`` along one trajectory (not re-run per count).
Models run with their modules' modes as given (call-time eval mode: no dropout noise, no
batch-norm statistic updates); parameters outside ``layer`` and buffers stay fixed.
"""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .hessian import snapshot_state
from .model_calls import (
    ForwardFn,
    LossFn,
    iter_batches,
    model_device,
    model_guard,
    per_sample_losses,
    reiterable,
    to_device,
)
from .per_sample import _ForwardWrapper, selected_parameter_names
from .topk import RunningTopK, TopK

__all__ = ["FurtherTraining"]


def _materialise(inputs: Any, targets: Any) -> tuple[Any, Tensor]:
    """Return (inputs, targets) as whole tensors (inputs may be a tuple), concatenating the batches of an iterable."""
    if isinstance(inputs, Tensor) or (targets is not None and isinstance(inputs, (tuple, list))):
        return (tuple(inputs) if isinstance(inputs, list) else inputs), targets
    xs, ts = [], []
    for x, t in iter_batches(reiterable(inputs), targets, 1 << 30):
        xs.append(x)
        ts.append(t)
    if not xs:
        raise ValueError("no training data")
    x = tuple(torch.cat(p) for p in zip(*xs)) if isinstance(xs[0], (tuple, list)) else torch.cat(xs)
    return x, torch.cat(ts)


def _take(x: Any, idx: Tensor) -> Any:
    return tuple(v[idx] for v in x) if isinstance(x, tuple) else x[idx]


class FurtherTraining:
    """Leave-one-out further training from the final model: the gold standard the gradient methods approximate.

    ``probes``: training indices to score (None: every training sample -- costly);
    ``steps``: step counts at which scores are recorded; ``seeds``: batch orders
    averaged; ``batch_size`` None = full-batch gradient descent (deterministic: one seed
    is enough).  :meth:`cost` says how many training steps a run takes before running it.
    Rows of :meth:`influence` follow ``probes``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        layer: str | list[str] | None = None,
        forward: ForwardFn | None = None,
        state_dict: dict[str, Tensor] | None = None,
        probes: Sequence[int] | None = None,
        lr: float = 0.01,
        batch_size: int | None = 32,
        steps: Sequence[int] = (10, 50, 200),
        seeds: Sequence[int] = (0, 1, 2),
        probe_chunk: int = 64,
    ):
        if not steps or min(steps) < 1:
            raise ValueError("steps must be positive step counts")
        if not seeds:
            raise ValueError("at least one seed is required")
        self.model = model
        self.loss_fn = loss_fn
        self.layers = None if layer is None else ([layer] if isinstance(layer, str) else list(layer))
        self.forward = forward
        self.state = snapshot_state(model, state_dict)
        self.probes = None if probes is None else [int(i) for i in probes]
        self.lr = float(lr)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.steps = sorted({int(s) for s in steps})
        self.seeds = [int(s) for s in seeds]
        self.probe_chunk = max(1, int(probe_chunk))
        self.param_names = selected_parameter_names(model, self.layers)
        self.last: dict | None = None

    # ------------------------------------------------------------------ cost

    def cost(self, n_train: int | None = None) -> dict:
        """Return the work a run takes: probes, seeds, steps, runs and total model-steps (1 + chunk runs per chunk)."""
        n_probes = len(self.probes) if self.probes is not None else n_train
        if n_probes is None:
            raise ValueError("probes=None scores every training sample: pass n_train")
        chunks = -(-n_probes // self.probe_chunk)
        runs = (n_probes + chunks) * len(self.seeds)
        return {
            "probes": n_probes, "seeds": len(self.seeds), "steps": list(self.steps), "max_steps": self.steps[-1],
            "probe_chunks": chunks, "runs": runs, "training_steps": runs * self.steps[-1],
            "batch_size": self.batch_size,
        }

    # ------------------------------------------------------------------ running

    def _probe_list(self, n: int) -> list[int]:
        probes = list(range(n)) if self.probes is None else self.probes
        bad = [i for i in probes if not 0 <= i < n]
        if bad:
            raise ValueError(f"probe indices out of range for {n} training samples: {bad[:5]}")
        return probes

    def _batches(self, n: int, seed: int, device: torch.device):
        """Yield the index batches of one further-training run (epoch-wise reshuffles from ``seed``)."""
        if self.batch_size is None or self.batch_size >= n:
            full = torch.arange(n, device=device)
            while True:
                yield full
        gen = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(n, generator=gen).to(device)
            for s in range(0, n, self.batch_size):
                yield perm[s : s + self.batch_size]

    def run(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any) -> dict:
        """Return {"steps", "probes", "loss": (n_steps, n_probes, n_test), "output": (n_steps, n_probes, n_test, ...)}.

        ``loss[s, i, j]`` = test loss of z'_j after ``steps[s]`` further steps without
        probe i minus with it, averaged over the seeds; ``output`` likewise for the
        model's outputs; ``loss_per_seed`` (n_seeds, n_steps, n_probes, n_test) before
        averaging (to judge how many seeds suffice).
        """
        x, t = _materialise(train_inputs, train_targets)
        xt, tt = _materialise(test_inputs, test_targets)
        device = model_device(self.model)
        if self.forward is None:
            x, xt = to_device(x, device), to_device(xt, device)
        t, tt = to_device(t, device), to_device(tt, device)
        n = len(t)
        probes = self._probe_list(n)
        with self._functional() as (module, fixed, base):
            loss_parts, out_parts = [], []
            for c in range(0, len(probes), self.probe_chunk):
                chunk = torch.tensor(probes[c : c + self.probe_chunk], device=device)
                lo, out = self._chunk(module, fixed, base, x, t, xt, tt, chunk)
                loss_parts.append(lo)
                out_parts.append(out)
        per_seed = torch.cat(loss_parts, dim=2)
        self.last = {"steps": list(self.steps), "probes": probes, "loss": per_seed.mean(0), "loss_per_seed": per_seed,
                     "output": torch.cat(out_parts, dim=1), "cost": self.cost(n)}
        return self.last

    @contextlib.contextmanager
    def _functional(self):
        with model_guard(self.model):
            self.model.eval()
            if self.forward is None:
                module, prefix = self.model, ""
            else:
                module, prefix = _ForwardWrapper(self.model, self.forward), "model."
            device = model_device(self.model)
            chosen = set(self.param_names)
            fixed = {prefix + k: v.to(device) for k, v in self.state.items() if k not in chosen}
            base = {prefix + k: self.state[k].to(device) for k in self.param_names}
            yield module, fixed, base

    def _chunk(self, module, fixed, base, x, t, xt, tt, chunk: Tensor) -> tuple[Tensor, Tensor]:
        """Run all seeds x (full run + one run per probe in ``chunk``); return per-seed loss and mean output diffs."""
        loss_fn = self.loss_fn
        n_seeds, per_seed = len(self.seeds), 1 + chunk.numel()

        def batch_loss(p, xb, tb, w):
            losses = per_sample_losses(loss_fn, functional_call(module, {**fixed, **p}, (xb,)), tb)
            return (losses * w).sum() / w.sum().clamp_min(1.0)

        def outputs(p, xb):
            return functional_call(module, {**fixed, **p}, (xb,))

        # inner vmap: the runs of one seed share its batch; outer vmap: the seeds, each with its own batch
        step_grads = vmap(vmap(grad(batch_loss), in_dims=(0, None, None, 0)), in_dims=(0, 0, 0, 0))
        run_outputs = vmap(vmap(outputs, in_dims=(0, None)), in_dims=(0, None))
        params = {k: v.expand(n_seeds, per_seed, *v.shape).clone() for k, v in base.items()}
        dtype = next(iter(params.values())).dtype
        streams = [self._batches(len(t), seed, chunk.device) for seed in self.seeds]
        loss_seed = torch.zeros(n_seeds, len(self.steps), chunk.numel(), len(tt), dtype=torch.float64,
                                device=chunk.device)
        out_mean: Tensor | None = None
        record = 0
        for step in range(1, self.steps[-1] + 1):
            idx = torch.stack([next(stream) for stream in streams])  # (seeds, b): equal sizes at every step
            w = torch.ones(n_seeds, per_seed, idx.shape[1], dtype=dtype, device=idx.device)
            w[:, 1:] = (idx[:, None, :] != chunk[None, :, None]).to(dtype)
            g = step_grads(params, _take(x, idx), t[idx], w)
            with torch.no_grad():
                params = {k: v - self.lr * g[k] for k, v in params.items()}
            if step != self.steps[record]:
                continue
            with torch.no_grad():
                out = run_outputs(params, xt)  # (seeds, runs, n_test, ...)
                flat = out.reshape(n_seeds * per_seed, *out.shape[2:])
                lo = torch.stack([per_sample_losses(loss_fn, o, tt) for o in flat]).view(n_seeds, per_seed, -1)
            loss_seed[:, record] = (lo[:, 1:] - lo[:, :1]).double()
            diff = (out[:, 1:] - out[:, :1]).double().mean(0)
            if out_mean is None:
                out_mean = torch.zeros(len(self.steps), *diff.shape, dtype=torch.float64, device=diff.device)
            out_mean[record] = diff
            record += 1
        return loss_seed, out_mean

    # ------------------------------------------------------------------ interface

    def _at(self, result: dict, at: int | None) -> int:
        if at is None:
            return len(result["steps"]) - 1
        if at not in result["steps"]:
            raise ValueError(f"scores were recorded at steps {result['steps']}, not {at}")
        return result["steps"].index(at)

    def influence(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any,
                  at: int | None = None) -> Tensor:
        """Return loss(without i) - loss(with i) after ``at`` steps (default the most), (n_probes, n_test)."""
        res = self.run(train_inputs, train_targets, test_inputs, test_targets)
        return res["loss"][self._at(res, at)]

    def self_influence(self, train_inputs: Any, train_targets: Any, at: int | None = None) -> Tensor:
        """Return each probe's own loss change when it is left out (n_probes,)."""
        x, t = _materialise(train_inputs, train_targets)
        probes = torch.tensor(self._probe_list(len(t)))
        res = self.run(x, t, _take(x, probes), t[probes])
        return torch.diagonal(res["loss"][self._at(res, at)])

    def top_k(self, train_inputs: Any, train_targets: Any, test_inputs: Any, test_targets: Any, k: int = 10,
              chunk: int = 4096, progress: Callable[[int, int], None] | None = None, at: int | None = None) -> TopK:
        """Return the k proponents / opponents among the probes per test sample as :class:`.TopK` (training indices)."""
        scores = self.influence(train_inputs, train_targets, test_inputs, test_targets, at=at)
        acc = RunningTopK(k)
        acc.update(scores, 0)
        res = acc.result()
        index = torch.tensor(self.last["probes"], device=res.proponent_idx.device)
        if progress is not None:
            progress(len(index), len(index))
        return TopK(index[res.proponent_idx], res.proponent_score, index[res.opponent_idx], res.opponent_score)
