"""Exact metagradients through a recorded training run: each training sample's first-order effect on a test output.

The recorded run is a function of per-sample weights w (see :mod:`.trace`): theta_T(w), with every step
minimising sum_i w_i l(theta, z_i) / |B_t| over its recorded batch, at its recorded learning rate, under the
recorded optimiser (SGD with momentum, Adam, AdamW). The metagradient of a test output f is d f(theta_T(w)) / d w
at w = 1, computed exactly by reverse-mode differentiation through every optimiser step (MAGIC, Ilyas and
Engstrom 2025, for replicable training). ``at`` takes it elsewhere on the diagonal, at w = at * 1: the run with
every sample weighted ``at``, which is where a linear prediction of retraining on random subsets that keep a
fraction ``at`` of the samples is most accurate (the subsets' mean weight vector). Scores follow the package's
sign: ``influence`` is -d l(theta_T, z') / d w_i, positive when up-weighting z_i lowers the test loss (a proponent).

The reverse pass carries one adjoint per test output through the steps, for all of them at once
(``is_grads_batched``): at step t it differentiates the update theta_{t+1} = U(theta_t, s_t, grad L_t(theta_t, w))
(a double backward: Hessian-vector products of the batch loss) and reads the weights' share. The replayed states
the reverse pass needs are kept in memory when they fit ``memory_budget`` bytes, otherwise every k-th state is
kept (k = ceil(sqrt(T))) and each segment is replayed again: memory O(sqrt(T)) states for one more forward pass.
The forward replay is checked against the trace's recorded checkpoints first (:func:`.trace.check_reproduced`).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .model_calls import LossFn
from .topk import TopK, top_k_of_scores
from .trace import (
    ReplayState,
    TrainingTrace,
    _forward_step,
    _start,
    check_reproduced,
    optimizer_update,
    step_loss,
    trainable_names,
)

__all__ = ["Metagradient"]

#: an output whose increase counts as good: f(outputs, targets) -> per-sample values (default: minus the loss)
OutputFn = Callable[[Tensor, Tensor], Tensor]


class Metagradient:
    """Exact d(test output)/d(training sample weight) through the recorded run ``trace``, for every training sample.

    ``loss_fn(outputs, targets)`` returns per-sample losses (the training loss, and by default the test output:
    scores are minus its metagradient). ``output`` (optional) is another test output to raise, e.g. the margin;
    scores are then its metagradient. ``dtype`` casts the replay (None: the trace's dtype; float64 for exactness
    checks). ``verify`` checks the replay against the trace's checkpoints. ``memory_budget`` bounds the bytes of
    replayed states kept for the reverse pass; ``chunk`` is how many test outputs share one reverse pass. ``at``
    (0 < at <= 1) is the weight of every sample where the derivative is taken: 1, the recorded run, by default;
    another value replays the run with every weight ``at`` (after checking the recorded run, when ``verify``).
    """

    def __init__(self, model: nn.Module, trace: TrainingTrace, loss_fn: LossFn, *, output: OutputFn | None = None,
                 dtype: torch.dtype | None = None, verify: bool = True, memory_budget: int = 512 << 20,
                 chunk: int = 256, at: float = 1.0):
        if chunk < 1 or memory_budget < 0:
            raise ValueError("chunk must be >= 1 and memory_budget >= 0")
        if not 0 < at <= 1:
            raise ValueError(f"at must be in (0, 1], got {at}")
        self.model, self.trace, self.loss_fn, self.output = model, trace, loss_fn, output
        self.dtype, self.verify, self.memory_budget, self.chunk, self.at = dtype, verify, memory_budget, chunk, at
        self.names = trainable_names(model)
        self.reproduced_max_abs_diff: float | None = None
        self.segment: int | None = None

    # ------------------------------------------------------------------------------------------- public

    def influence(self, train_inputs: Tensor, train_targets: Tensor, test_inputs: Tensor, test_targets: Tensor
                  ) -> Tensor:
        """Return (n_train, n_test) scores: each training sample's metagradient for each test sample's output."""
        return self._scores(train_inputs, train_targets, lambda out: self._test_values(out, test_targets),
                            test_inputs, len(test_targets))

    def batch_influence(self, train_inputs: Tensor, train_targets: Tensor, test_inputs: Tensor, test_targets: Tensor
                        ) -> Tensor:
        """Return (n_train,) scores for the test batch's mean output: one reverse pass for all training samples."""
        return self._scores(train_inputs, train_targets,
                            lambda out: self._test_values(out, test_targets).mean().unsqueeze(0),
                            test_inputs, 1)[:, 0]

    def self_influence(self, train_inputs: Tensor, train_targets: Tensor) -> Tensor:
        """Return (n_train,) each training sample's metagradient for its own final output (one adjoint per sample)."""
        n = len(train_targets)
        out = torch.empty(n, dtype=self._work_dtype(train_inputs), device=train_inputs.device)
        for start in range(0, n, self.chunk):
            rows = slice(start, min(n, start + self.chunk))
            scores = self._scores(train_inputs, train_targets,
                                  lambda o, r=rows: self._test_values(o, train_targets[r]),
                                  train_inputs[rows], rows.stop - rows.start)
            out[rows] = scores[torch.arange(rows.start, rows.stop), torch.arange(rows.stop - rows.start)]
        return out

    def top_k(self, train_inputs: Tensor, train_targets: Tensor, test_inputs: Tensor, test_targets: Tensor,
              k: int = 10, chunk: int = 4096, progress: Callable[[int, int], None] | None = None) -> TopK:
        """Return the k proponents / opponents per test sample as :class:`.TopK`, each field (n_test, k)."""
        return top_k_of_scores(self.influence(train_inputs, train_targets, test_inputs, test_targets), k, chunk,
                               progress)

    # ----------------------------------------------------------------------------------------- internals

    def _work_dtype(self, like: Tensor) -> torch.dtype:
        return self.dtype or next(iter(self.trace.initial_state.values())).dtype

    def _test_values(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.output is not None:
            return self.output(outputs, targets)
        return -self.loss_fn(outputs, targets)

    def _scores(self, x: Tensor, y: Tensor, values: Callable[[Tensor], Tensor], test_x: Tensor, count: int) -> Tensor:
        """Return (n_train, count) metagradients of ``values(model(test_x) at theta_T)``, in chunks of test outputs."""
        trace, model = self.trace, self.model
        trace.check_rows(len(y))
        names, fixed, params = _start(model, trace, self.dtype)
        dtype = params[0].dtype
        x = x.to(dtype) if x.is_floating_point() else x
        test_x = test_x.to(dtype) if test_x.is_floating_point() else test_x
        weights = None  # every sample's weight in the replay: None is the recorded run's 1
        if self.at != 1:
            if self.verify:  # the recorded run first: a trace that does not reproduce it is refused
                self._forward(names, fixed, params, x, y, None, keep=False)
            weights = torch.full((len(y),), self.at, dtype=dtype, device=params[0].device)
        stored, final = self._forward(names, fixed, params, x, y, weights)
        scores = torch.zeros(len(y), count, dtype=dtype, device=params[0].device)
        for start in range(0, count, self.chunk):
            stop = min(count, start + self.chunk)
            adjoint = self._final_adjoint(names, fixed, final, test_x, values, start, stop)
            self._reverse(names, fixed, stored, adjoint, x, y, weights, scores[:, start:stop])
        return scores

    def _forward(self, names, fixed, params, x, y, weights: Tensor | None, keep: bool = True
                 ) -> tuple[dict[int, ReplayState], ReplayState]:
        """Replay the trace at these sample weights (None: the recorded run, whose checkpoints are verified);
        return (the kept states by step, none unless keep, and the final state)."""
        trace = self.trace
        T = len(trace.steps)
        per_state = sum(p.numel() * p.element_size() for p in params) * (1 + trace.optimizer.state_size)
        self.segment = 1 if T * per_state <= self.memory_budget else max(1, math.ceil(math.sqrt(T)))
        state = ReplayState(0, params, [torch.zeros_like(p) for p in params for _ in range(trace.optimizer.state_size)])
        stored: dict[int, ReplayState] = {}
        worst = None
        recorded = weights is None
        for t in range(T + 1):
            if self.verify and recorded:
                diff = check_reproduced(names, state, trace)
                worst = diff if worst is None else (worst if diff is None else max(worst, diff))
            if t == T:
                break
            if keep and t % self.segment == 0:
                stored[t] = state
            p, s = _forward_step(self.model, names, fixed, self.loss_fn, state.params, state.opt_state, trace, t,
                                 trace.steps[t], x, y, weights)
            state = ReplayState(t + 1, p, s)
        if recorded:
            self.reproduced_max_abs_diff = worst
        return stored, state

    def _final_adjoint(self, names, fixed, final: ReplayState, test_x, values, start: int, stop: int) -> list[Tensor]:
        """Return, per trainable parameter, the (outputs, *shape) gradients of test outputs start..stop at theta_T."""
        model = self.model

        def picked(p: list[Tensor]) -> Tensor:
            out = functional_call(model, {**fixed, **dict(zip(names, p))}, (test_x,))
            return values(out)[start:stop]

        with torch.enable_grad():
            live = [p.detach().requires_grad_(True) for p in final.params]
            vals = picked(live)
            eye = torch.eye(stop - start, dtype=vals.dtype, device=vals.device)
            grads = torch.autograd.grad(vals, live, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        return [torch.zeros((stop - start, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                for p, g in zip(final.params, grads)]

    def _reverse(self, names, fixed, stored: dict[int, ReplayState], lam_p: list[Tensor], x, y,
                 weights: Tensor | None, out: Tensor) -> None:
        """Run the adjoints back from theta_T to theta_0, adding each step's weight gradients into ``out``."""
        trace = self.trace
        T = len(trace.steps)
        k = trace.optimizer.state_size
        lam_s = [torch.zeros_like(lp) for lp in lam_p for _ in range(k)]
        for seg in sorted(stored, reverse=True):
            states = [stored[seg]]
            for t in range(seg, min(T, seg + self.segment) - 1):  # replay the segment again (nothing when segment 1)
                s = states[-1]
                p, o = _forward_step(self.model, names, fixed, self.loss_fn, s.params, s.opt_state, trace, t,
                                     trace.steps[t], x, y, weights)
                states.append(ReplayState(t + 1, p, o))
            for state in reversed(states):
                lam_p, lam_s, w_grad = self._vjp_step(names, fixed, state, lam_p, lam_s, x, y)
                rows = torch.tensor(trace.steps[state.done].rows, dtype=torch.long, device=out.device)
                out.index_add_(0, rows, w_grad.T.to(out.dtype))

    def _vjp_step(self, names, fixed, state: ReplayState, lam_p, lam_s, x, y):
        """Return (adjoints of theta_t, of the optimiser state, (outputs, |B_t|) weight gradients) for step t."""
        t = state.done
        s = self.trace.steps[t]
        rows = torch.tensor(s.rows, dtype=torch.long, device=x.device)
        with torch.enable_grad():
            p = [q.detach().requires_grad_(True) for q in state.params]
            o = [q.detach().requires_grad_(True) for q in state.opt_state]
            w = torch.full((len(rows),), self.at, dtype=p[0].dtype, device=p[0].device, requires_grad=True)
            loss = step_loss(self.model, names, fixed, self.loss_fn, p, x[rows], y[rows.to(y.device)], w)
            g = torch.autograd.grad(loss, p, create_graph=True, allow_unused=True)
            g = [torch.zeros_like(q) if gi is None else gi for q, gi in zip(p, g)]
            new_p, new_o = optimizer_update(p, g, o, s.lr, t, self.trace.optimizer)
            ins = p + o + [w]
            count = lam_p[0].shape[0]
            if count == 1:  # one adjoint: a plain backward pass, without vmap's overhead
                res = torch.autograd.grad(new_p + new_o, ins, grad_outputs=[v[0] for v in lam_p + lam_s],
                                          allow_unused=True)
                res = [None if r is None else r.unsqueeze(0) for r in res]
            else:
                res = torch.autograd.grad(new_p + new_o, ins, grad_outputs=lam_p + lam_s, is_grads_batched=True,
                                          allow_unused=True)
        res = [torch.zeros((count, *v.shape), dtype=v.dtype, device=v.device) if r is None else r.detach()
               for v, r in zip(ins, res)]
        n_p = len(p)
        return res[:n_p], res[n_p:-1], res[-1]

