"""Step-exact first-order TracIn from the recorded trace: the TracIn paper's idealised TracIn for minibatches.

For every recorded step t with batch B_t and learning rate lr_t, taken at the parameters theta_t of that very
step (replayed from the trace, not a checkpoint near it):

    score(z, z') = sum over the steps t whose batch holds z of  lr_t / |B_t| * grad l(theta_t, z) . grad f(theta_t, z')

with f the test loss (or another test output, whose gradient then enters with a minus sign: positive = the
sample raises the output). It is each step's first-order change of the test loss split over the batch members
(Pruthi et al., section 3.2; the Lemma 3.1 bookkeeping is :mod:`.replay`). It needs the exact data order and
every step's learning rate, which only a recorded run has; TracInCP approximates the sum with a few checkpoints.
An optimiser's momentum or Adam state is not propagated across steps (that is what :mod:`.metagradient` does).
The forward replay is checked against the trace's recorded checkpoints first.
"""

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .model_calls import LossFn
from .per_sample import per_sample_grads, selected_parameter_names
from .topk import RunningTopK, TopK
from .trace import TrainingTrace, check_reproduced, replay, trainable_names

__all__ = ["StepExactTracIn"]

OutputFn = Callable[[Tensor, Tensor], Tensor]


class StepExactTracIn:
    """First-order TracIn summed over every recorded step at that step's own parameters (see the module).

    Arguments as :class:`.metagradient.Metagradient`: the model (never modified), the recorded ``trace``, the
    per-sample ``loss_fn``, an optional test ``output`` to raise instead of the loss to lower, ``dtype`` and
    ``verify``. ``batch_size`` bounds the per-sample gradients computed at once. ``layer`` (a submodule name or
    names, as :class:`.TracInCP` takes) restricts the gradients to that layer's parameters, which makes the
    per-step gradients of a Linear layer exact factor products; the replay itself always moves every trainable
    parameter, as the recorded optimiser did.
    """

    def __init__(self, model: nn.Module, trace: TrainingTrace, loss_fn: LossFn, *, output: OutputFn | None = None,
                 dtype: torch.dtype | None = None, verify: bool = True, batch_size: int = 512,
                 layer: str | Sequence[str] | None = None):
        self.model, self.trace, self.loss_fn, self.output = model, trace, loss_fn, output
        self.dtype, self.verify, self.batch_size = dtype, verify, batch_size
        self.trained = trainable_names(model)
        self.names = self.trained if layer is None else selected_parameter_names(
            model, [layer] if isinstance(layer, str) else list(layer))
        self.reproduced_max_abs_diff: float | None = None

    def influence(self, train_inputs: Tensor, train_targets: Tensor, test_inputs: Tensor, test_targets: Tensor
                  ) -> Tensor:
        """Return (n_train, n_test) step-exact scores."""
        return self._run(train_inputs, train_targets, lambda work, t: self._test_grads(work, test_inputs,
                                                                                       test_targets).T)

    def batch_influence(self, train_inputs: Tensor, train_targets: Tensor, test_inputs: Tensor, test_targets: Tensor
                        ) -> Tensor:
        """Return (n_train,) step-exact scores for the test batch's mean output (one test gradient per step).

        Per step: the gradient v of the test batch's mean loss (one backward pass), then every batch member's
        g(z) . v at once as a forward-mode derivative of the batch's losses along v (no per-sample gradients).
        """
        from torch.func import functional_call, jvp

        model, names = self.model, self.trained
        if self.names != self.trained:
            raise ValueError("batch_influence takes every trainable parameter (build the method without layer=)")

        def dots(work: nn.Module, params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
            fixed = {n: t.detach() for n, t in work.named_parameters() if n not in names}
            fixed.update(dict(work.named_buffers()))
            live = [p.detach().requires_grad_(True) for p in params]
            with torch.enable_grad():
                out = functional_call(model, {**fixed, **dict(zip(names, live))}, (self._cast(test_inputs),))
                v = torch.autograd.grad(self._minus_output(out, test_targets).mean(), live, allow_unused=True)
            v = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, v))

            def losses(*p: Tensor) -> Tensor:
                return self.loss_fn(functional_call(model, {**fixed, **dict(zip(names, p))}, (x,)), y)

            return jvp(losses, tuple(p.detach() for p in params), v)[1][:, None]

        return self._run(train_inputs, train_targets, None, dots)[:, 0]

    def self_influence(self, train_inputs: Tensor, train_targets: Tensor) -> Tensor:
        """Return (n_train,) sum over the steps using z of lr_t / |B_t| * |grad l(theta_t, z)|^2."""
        return self._run(train_inputs, train_targets, None)[:, 0]

    def top_k(self, train_inputs: Tensor, train_targets: Tensor, test_inputs: Tensor, test_targets: Tensor,
              k: int = 10, chunk: int = 4096, progress: Callable[[int, int], None] | None = None) -> TopK:
        """Return the k proponents / opponents per test sample as :class:`.TopK`, each field (n_test, k)."""
        scores = self.influence(train_inputs, train_targets, test_inputs, test_targets)
        running = RunningTopK(min(k, scores.shape[0]))
        for start in range(0, scores.shape[0], chunk):
            running.update(scores[start:start + chunk], start)
            if progress is not None:
                progress(min(start + chunk, scores.shape[0]), scores.shape[0])
        return running.result()

    # ----------------------------------------------------------------------------------------- internals

    def _test_grads(self, work: nn.Module, x: Tensor, y: Tensor, mean: bool = False) -> Tensor:
        """Return (n_test, P) gradients of minus the test output (the loss by default), or (1, P) of their mean."""
        values = self._minus_output
        if mean:
            params = [work.get_parameter(n) for n in self.names]
            with torch.enable_grad():
                total = values(work(self._cast(x)), y).mean()
                grads = torch.autograd.grad(total, params, allow_unused=True)
            return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(1, -1) for p, g in zip(params, grads)],
                             dim=1)
        return per_sample_grads(work, self.names, self._cast(x), y, values, batch_size=self.batch_size)

    def _minus_output(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(outputs, targets) if self.output is None else -self.output(outputs, targets)

    def _cast(self, x: Tensor) -> Tensor:
        dtype = next(self._work.parameters()).dtype
        return x.to(dtype) if x.is_floating_point() else x

    def _run(self, x: Tensor, y: Tensor, test_grads: Callable[[nn.Module, int], Tensor] | None,
             dots: Callable[[nn.Module, list[Tensor], Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """Replay the trace; per step, add lr/|B| * (batch gradients) @ test_grads(theta_t) (or |g|^2) per row.

        ``dots(work, params, x_batch, y_batch)`` (when given) returns the (|B|, width) products directly instead.
        """
        self._work = work = copy.deepcopy(self.model)
        if self.dtype is not None:
            work.to(self.dtype)
        x = self._cast(x)
        live = [work.get_parameter(n) for n in self.trained]
        out = None
        worst = None
        for state in replay(self.model, self.trace, self.loss_fn, x, y, dtype=self.dtype):
            if self.verify:
                diff = check_reproduced(self.trained, state, self.trace)
                worst = diff if worst is None else (worst if diff is None else max(worst, diff))
            if state.done == len(self.trace.steps):
                break
            with torch.no_grad():
                for p, v in zip(live, state.params):
                    p.copy_(v)
            step = self.trace.steps[state.done]
            rows = torch.tensor(step.rows, dtype=torch.long, device=x.device)
            xb, yb = x[rows], y[rows.to(y.device)]
            if dots is not None:
                part = dots(work, state.params, xb, yb)
            else:
                g_train = per_sample_grads(work, self.names, xb, yb, self.loss_fn, batch_size=self.batch_size)
                part = (g_train * g_train).sum(1, keepdim=True) if test_grads is None else \
                    g_train @ test_grads(work, state.done)
            part = part * (step.lr / len(rows))
            if out is None:
                out = torch.zeros(len(y), part.shape[1], dtype=part.dtype, device=part.device)
            out.index_add_(0, rows.to(out.device), part)
        self.reproduced_max_abs_diff = worst
        if out is None:
            width = 1 if test_grads is None else test_grads(work, 0).shape[1]
            out = torch.zeros(len(y), width, dtype=next(work.parameters()).dtype)
        return out
