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
from .topk import TopK, top_k_of_scores
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
        g(z) . v. When every trainable parameter belongs to a Linear or Conv2d layer called once per forward,
        those products come from the replayed step's own forward and backward (each layer's inputs and output
        gradients, as in the ghost path: no per-sample gradients, no extra pass); otherwise from a forward-mode
        derivative of the batch's losses along v.
        """
        if self.names != self.trained:
            raise ValueError("batch_influence takes every trainable parameter (build the method without layer=)")
        factored = _FactoredReplay.of(self, train_inputs, train_targets)
        if factored is not None:
            return factored.run(test_inputs, test_targets)
        return self._run(train_inputs, train_targets, None, self._jvp_dots(test_inputs, test_targets))[:, 0]

    def _jvp_dots(self, test_inputs: Tensor, test_targets: Tensor):
        """Return dots(work, params, x, y) -> (|B|, 1) products g(z) . v by a forward-mode derivative."""
        from torch.func import functional_call, jvp

        model, names = self.model, self.trained

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

        return dots

    def self_influence(self, train_inputs: Tensor, train_targets: Tensor) -> Tensor:
        """Return (n_train,) sum over the steps using z of lr_t / |B_t| * |grad l(theta_t, z)|^2."""
        return self._run(train_inputs, train_targets, None)[:, 0]

    def top_k(self, train_inputs: Tensor, train_targets: Tensor, test_inputs: Tensor, test_targets: Tensor,
              k: int = 10, chunk: int = 4096, progress: Callable[[int, int], None] | None = None) -> TopK:
        """Return the k proponents / opponents per test sample as :class:`.TopK`, each field (n_test, k)."""
        return top_k_of_scores(self.influence(train_inputs, train_targets, test_inputs, test_targets), k, chunk,
                               progress)

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


class _FactoredReplay:
    """The step-exact batch scores from each replayed step's own pass: per layer, inputs a and output gradients e.

    For a Linear layer g_i . v = e_i^T V a_i + e_i . v_b; for a Conv2d layer the same summed over the positions
    of the unfolded input. The replay runs on a copy of the model with hooks, step by step as :func:`.trace.replay`
    does, and is verified against the trace's checkpoints the same way.
    """

    def __init__(self, method: "StepExactTracIn", work: nn.Module, layers: list, x: Tensor, y: Tensor):
        self.method, self.work, self.layers, self.x, self.y = method, work, layers, x, y
        self.inputs: dict[nn.Module, Tensor] = {}
        self.grads: dict[nn.Module, Tensor] = {}
        self.calls: dict[nn.Module, int] = {}
        names = {m: n for n, m in work.named_modules()}
        self.param_names = {m: (_joined(names[m], "weight"), _joined(names[m], "bias") if m.bias is not None else None)
                            for m in layers}

    @classmethod
    def of(cls, method: "StepExactTracIn", x: Tensor, y: Tensor) -> "_FactoredReplay | None":
        """Return the factored replay when every trainable parameter is a Linear / plain Conv2d one, else None."""
        work = copy.deepcopy(method.model)
        if method.dtype is not None:
            work.to(method.dtype)
        owners = {}
        for name, module in work.named_modules():
            plain_conv = isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
                and isinstance(module.padding, tuple)
            if isinstance(module, nn.Linear) or plain_conv:
                for kind in ("weight", "bias"):
                    if getattr(module, kind, None) is not None:
                        owners[_joined(name, kind)] = module
        if not all(n in owners for n in method.trained):
            return None
        layers = list(dict.fromkeys(owners[n] for n in method.trained))
        dtype = next(work.parameters()).dtype
        return cls(method, work, layers, x.to(dtype) if x.is_floating_point() else x, y)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.calls[module] = self.calls.get(module, 0) + 1
        self.inputs[module] = args[0].detach()
        if output.requires_grad:
            output.register_hook(lambda g, m=module: self.grads.__setitem__(m, g.detach()))

    def _dots(self, v: dict[nn.Module, tuple[Tensor, Tensor | None]]) -> Tensor:
        """Return per batch member sum over layers of e_i . (V a_i) (+ e_i . v_b), from the last backward pass."""
        total = None
        for module in self.layers:
            a, e = self.inputs[module], self.grads[module]
            vw, vb = v[module]
            if isinstance(module, nn.Linear):
                a, e = a.reshape(a.shape[0], -1, a.shape[-1]), e.reshape(e.shape[0], -1, e.shape[-1])
                part = torch.einsum("bpo,oi,bpi->b", e, vw, a)
                if vb is not None:
                    part = part + torch.einsum("bpo,o->b", e, vb)
            else:
                cols = torch.nn.functional.unfold(a, module.kernel_size, module.dilation, module.padding,
                                                  module.stride)  # (b, C*k*k, L)
                e = e.reshape(e.shape[0], e.shape[1], -1)  # (b, out, L)
                part = torch.einsum("bol,oc,bcl->b", e, vw.reshape(vw.shape[0], -1), cols)
                if vb is not None:
                    part = part + torch.einsum("bol,o->b", e, vb)
            total = part if total is None else total + part
        return total

    def run(self, test_inputs: Tensor, test_targets: Tensor) -> Tensor:
        """Replay the trace with hooks and return the (n_train,) step-exact scores for the test batch's mean."""
        from .trace import ReplayState, initial_optimizer_state, optimizer_update

        method, work, trace = self.method, self.work, self.method.trace
        trace.check_rows(len(self.y))
        names = method.trained
        live = [work.get_parameter(n) for n in names]
        state = {k: v for k, v in trace.initial_state.items()}
        with torch.no_grad():
            for n, p in zip(names, live):
                p.copy_(state[n])
            for n, b in work.named_buffers():
                if n in state:
                    b.copy_(state[n])
        opt_state = initial_optimizer_state(live, trace.optimizer)
        handles = [m.register_forward_hook(self._hook) for m in self.layers]
        xt = test_inputs.to(live[0].dtype) if test_inputs.is_floating_point() else test_inputs
        scores = torch.zeros(len(self.y), dtype=live[0].dtype, device=live[0].device)
        worst = None
        try:
            for t in range(len(trace.steps) + 1):
                if method.verify:
                    diff = check_reproduced(names, ReplayState(t, [p.detach() for p in live], opt_state), trace)
                    worst = diff if worst is None else (worst if diff is None else max(worst, diff))
                if t == len(trace.steps):
                    break
                step = trace.steps[t]
                rows = torch.tensor(step.rows, dtype=torch.long, device=self.x.device)
                with torch.enable_grad():
                    test_grads = torch.autograd.grad(method._minus_output(work(xt), test_targets).mean(), live,
                                                     allow_unused=True)
                    by_name = {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, live, test_grads)}
                    self.calls.clear()
                    loss = method.loss_fn(work(self.x[rows]), self.y[rows.to(self.y.device)]).mean()
                    grads = torch.autograd.grad(loss, live, allow_unused=True)
                if any(c != 1 for c in self.calls.values()) or len(self.calls) != len(self.layers):
                    raise _NotFactored
                v = {m: (by_name[w], None if b is None else by_name[b]) for m, (w, b) in self.param_names.items()}
                # e came from the batch's mean loss (a factor 1/|B|): lr * dot is lr/|B| * g_i . v
                scores.index_add_(0, rows.to(scores.device), self._dots(v) * step.lr)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(live, grads)]
                with torch.no_grad():
                    new_p, opt_state = optimizer_update([p.detach() for p in live], grads, opt_state, step.lr, t,
                                                        trace.optimizer)
                    for p, q in zip(live, new_p):
                        p.copy_(q)
        except _NotFactored:
            return method._run(self.x, self.y, None, method._jvp_dots(test_inputs, test_targets))[:, 0]
        finally:
            for h in handles:
                h.remove()
        method.reproduced_max_abs_diff = worst
        return scores


class _NotFactored(Exception):
    """A layer was called more or less than once in a forward: the products need the forward-mode path."""


def _joined(module_name: str, kind: str) -> str:
    return f"{module_name}.{kind}" if module_name else kind
