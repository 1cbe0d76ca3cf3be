"""Exact TracIn from the trace: replay recorded SGD training step by step (small models).

The tracer's ``batched`` events say which samples formed each step's batch, in which
order, and at which learning rate.  :func:`replay_tracin` re-runs that training from the
initial weights (plain SGD on the mean batch loss, as ``train_supervised`` does) and,
for a set of test samples z', measures at every step t with batch B_t and rate lr_t:

(a) **first-order TracIn** of each z in B_t::

        fo(z, z', t) = lr_t / |B_t| * grad l(w_t, z) . grad l(w_t, z')

    The 1/|B_t| comes from the mean-reduced batch loss: the update is
    w_{t+1} - w_t = -lr_t * (1/|B_t|) * sum_{z in B_t} grad l(w_t, z), so the
    first-order change of l(., z') over the step, sum_{z in B_t} fo(z, z', t), splits
    into one term per batch member (the paper's section 3.2).  Gradients are over all
    trainable parameters (the ones the update moves).

(b) the **true loss change** delta(z', t) = l(w_t, z') - l(w_{t+1}, z') (a reduction
    is positive, like TracIn's sign convention: proponents reduce the loss);

(c) **TracInIdeal** per training sample: the step's true change attributed to the
    members of its batch.  With batch size 1 this is the paper's definition exactly.
    For larger batches the paper notes there is no canonical split; ``split`` chooses:

    * ``"residual"`` (default): each member gets its first-order term plus an equal
      share of the step's higher-order residual, fo(z, z', t) + (delta - sum_B fo) / |B|;
    * ``"proportional"``: delta * fo(z, z', t) / sum_B fo (undefined where the
      first-order terms cancel; such steps fall back to an equal split);
    * ``"equal"``: delta / |B|.

    Every split sums over the batch to delta, so Lemma 3.1 holds for each:
    sum over training samples of TracInIdeal(z, z') = l(w_0, z') - l(w_T, z').

The replay runs in float64 by default (so the Lemma holds to ~1e-12 relative and
the first-order/true comparison is not blurred by float32 rounding); a float32 replay
of a float32 run repeats the same operations and reproduces the weights bit for bit on
CPU.  ``checkpoints`` ({steps done: state_dict}, e.g. each ``EpochResult.step`` and
``state_dict``) are compared with the replayed weights, which verifies that the
replay reproduced the recorded training.

Assumptions: the loss of a sample depends only on that sample (no batch norm), the
forward is deterministic (no dropout) and the same in train and eval mode, the
optimizer was plain SGD (no momentum / weight decay).  The checkpoint comparison
reports any violation as a mismatch.  Cost per step: per-sample gradients of the batch
and of the m test samples (``torch.func.vmap``) plus one training step, so this is for
small models and runs (thousands of steps, hundreds of test samples).
"""

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .model_calls import LossFn

__all__ = ["ReplayResult", "ReplayStep", "replay_steps", "replay_tracin"]

_SPLITS = ("residual", "proportional", "equal")


@dataclass(frozen=True)
class ReplayStep:
    """One recorded optimizer step: its step number, the training rows of its batch (in order) and the lr applied."""

    step: int
    rows: tuple[int, ...]
    lr: float


def replay_steps(
    events: Any, sample_ids: Sequence[Any] | None = None, training_run: str | None = None
) -> list[ReplayStep]:
    """Return the recorded steps, in order, from ``batched`` events.

    ``events`` is a pyarrow table of event rows (``Tracer.events()``, the ledger's ``events``), a column dict
    with those columns, a list of row dicts, or a list of ``(step, sample_id, lr)``
    tuples.  Rows of other kinds (a ``kind`` column other than ``"batched"``) are
    ignored; within a step rows are ordered by ``position`` when given, else kept in
    order.  ``sample_ids[i]`` is the id of training row i (the ids the tracer was given);
    without it the events' sample ids must be the row indices themselves.
    """
    cols = _columns(events)
    n = len(cols["step"])
    kinds = cols.get("kind")
    positions = cols.get("position")
    runs = cols.get("training_run")
    if training_run is not None and runs is None:
        raise ValueError("events have no training_run column to filter on")
    index = None if sample_ids is None else {s: i for i, s in enumerate(sample_ids)}
    if index is not None and len(index) != len(sample_ids):
        raise ValueError("sample_ids are not unique")
    grouped: dict[int, list[tuple[int, int, int, float]]] = {}
    order: list[int] = []
    for r in range(n):
        if kinds is not None and kinds[r] != "batched":
            continue
        if training_run is not None and runs[r] != training_run:
            continue
        step, sid, lr = int(cols["step"][r]), cols["sample_id"][r], cols["lr"][r]
        if lr is None or (isinstance(lr, float) and math.isnan(lr)):
            raise ValueError(f"event row {r} (step {step}) has no learning rate")
        if index is None:
            row = int(sid)
        elif sid in index:
            row = index[sid]
        else:
            raise KeyError(f"event row {r}: sample {sid!r} is not among the training samples")
        pos = int(positions[r]) if positions is not None and positions[r] is not None else r
        if step not in grouped:
            grouped[step] = []
            order.append(step)
        grouped[step].append((pos, r, row, float(lr)))
    steps = []
    for step in sorted(order):
        rows = sorted(grouped[step])
        lrs = {lr for *_, lr in rows}
        if len(lrs) != 1:
            raise ValueError(f"step {step} records several learning rates: {sorted(lrs)}")
        steps.append(ReplayStep(step, tuple(row for _, _, row, _ in rows), lrs.pop()))
    return steps


def _columns(events: Any) -> dict[str, list]:
    if hasattr(events, "to_pydict"):  # pyarrow Table
        events = events.to_pydict()
    if isinstance(events, Mapping):
        missing = [c for c in ("step", "sample_id", "lr") if c not in events]
        if missing:
            raise ValueError(f"events lack column(s) {missing}")
        return {k: list(v) for k, v in events.items()}
    rows = list(events)
    if not rows:
        return {"step": [], "sample_id": [], "lr": []}
    if isinstance(rows[0], Mapping):
        keys = rows[0].keys()
        return {k: [row.get(k) for row in rows] for k in keys}
    step, sid, lr = zip(*[tuple(row)[:3] for row in rows])
    return {"step": list(step), "sample_id": list(sid), "lr": list(lr)}


@dataclass(eq=False)
class ReplayResult:
    """What a replay measured.  Losses are reductions (positive = the step lowered the test loss).

    Per step t (T steps) and test sample j (m test samples):

    * ``first_order[t, j]``: sum over the batch of lr/|B| g(z).g(z'_j) (the first-order change);
    * ``true_change[t, j]``: l(w_t, z'_j) - l(w_{t+1}, z'_j).

    Per training row i (n_train rows of ``train_inputs``):

    * ``tracin[i, j]``: first-order TracIn, summed over the steps that used row i;
    * ``tracin_ideal[i, j]``: TracInIdeal, the true changes attributed to row i (see ``split``).

    ``pairs`` (when ``keep_pairs``): one entry per recorded event, aligned arrays
    ``step_index`` (T-index), ``row``, ``first_order`` and ``ideal`` (each (events, m)).
    ``checkpoint_max_abs_diff``: {steps done: max |replayed - recorded|} over floating
    state entries; ``reproduced`` says whether every one was allclose.
    """

    steps: np.ndarray
    lrs: np.ndarray
    batch_sizes: np.ndarray
    first_order: Tensor
    true_change: Tensor
    tracin: Tensor
    tracin_ideal: Tensor
    initial_loss: Tensor
    final_loss: Tensor
    final_state: dict[str, Tensor]
    split: str
    checkpoint_max_abs_diff: dict[int, float] = field(default_factory=dict)
    reproduced: bool | None = None
    checkpoint_final_loss: Tensor | None = None
    pairs: dict[str, Tensor] | None = None

    @property
    def loss_reduction(self) -> Tensor:
        """Total loss reduction per test sample over the replay, l(w_0, z') - l(w_T, z')."""
        return self.initial_loss - self.final_loss

    def lemma_residual(self, against_checkpoint: bool = False) -> Tensor:
        """Per test sample: sum_z TracInIdeal(z, z') - (l(w_0, z') - l(w_T, z')).

        ``against_checkpoint`` uses l at the recorded final checkpoint's weights for
        l(w_T, z') instead of the replayed final weights (needs a final checkpoint).
        """
        end = self.final_loss
        if against_checkpoint:
            if self.checkpoint_final_loss is None:
                raise ValueError("no checkpoint at the final step was given")
            end = self.checkpoint_final_loss
        return self.tracin_ideal.sum(0) - (self.initial_loss - end)

    def lemma_relative_error(self, against_checkpoint: bool = False) -> float:
        """Max over test samples of |Lemma 3.1 residual| / |total loss reduction| (denominator floored at 1e-12)."""
        res = self.lemma_residual(against_checkpoint).abs()
        end = self.checkpoint_final_loss if against_checkpoint else self.final_loss
        denom = (self.initial_loss - end).abs().clamp_min(1e-12)
        return float((res / denom).max()) if res.numel() else 0.0

    def pearson(self) -> float:
        """Pearson correlation of first-order and true loss changes over all (step, test sample) points."""
        return _pearson(self.first_order.flatten(), self.true_change.flatten())

    def spearman(self) -> float:
        """Rank correlation of the same points."""
        return _pearson(_ranks(self.first_order.flatten()), _ranks(self.true_change.flatten()))

    def summary(self) -> dict:
        """Return the headline figures as plain numbers."""
        out = {
            "steps": int(len(self.steps)),
            "test_samples": int(self.first_order.shape[1]),
            "split": self.split,
            "lemma_relative_error": self.lemma_relative_error(),
            "pearson_first_order_vs_true": self.pearson(),
            "spearman_first_order_vs_true": self.spearman(),
            "mean_total_loss_reduction": float(self.loss_reduction.mean()),
            "reproduced": self.reproduced,
        }
        if self.checkpoint_final_loss is not None:
            out["lemma_relative_error_vs_checkpoint"] = self.lemma_relative_error(against_checkpoint=True)
        if self.checkpoint_max_abs_diff:
            out["checkpoint_max_abs_diff"] = max(self.checkpoint_max_abs_diff.values())
        return out


def _pearson(a: Tensor, b: Tensor) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x, dtype=torch.float64)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    return r


def replay_tracin(
    model: nn.Module,
    train_inputs: Tensor,
    train_targets: Tensor,
    events: Any,
    test_inputs: Tensor,
    test_targets: Tensor,
    loss_fn: LossFn,
    *,
    sample_ids: Sequence[Any] | None = None,
    training_run: str | None = None,
    initial_state: Mapping[str, Tensor] | None = None,
    checkpoints: Mapping[int, Mapping[str, Tensor]] | None = None,
    dtype: torch.dtype | None = torch.float64,
    split: str = "residual",
    keep_pairs: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> ReplayResult:
    """Replay recorded SGD training and return exact per-step TracIn quantities as a :class:`ReplayResult`.

    ``model`` is not modified: a copy is loaded with ``initial_state`` (default: the
    model's current state, which must then be the weights training started from) and
    cast to ``dtype`` (None keeps the model's dtype).  ``train_inputs[i]`` /
    ``train_targets[i]`` is training row i, whose id is ``sample_ids[i]`` (the ids given
    to the tracer); ``events`` are the tracer's ``batched`` events (see
    :func:`replay_steps`; ``training_run`` selects one run's rows).
    ``loss_fn(outputs, targets)`` returns per-sample losses; each step minimises their
    mean.  ``checkpoints`` maps a number of completed steps
    (``EpochResult.step``) to the state_dict recorded then; the replayed weights are
    compared with it (``torch.allclose`` with ``rtol`` / ``atol``).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}")
    steps = replay_steps(events, sample_ids, training_run)
    n_train = len(train_targets)
    if len(train_inputs) != n_train:
        raise ValueError("train_inputs and train_targets differ in length")
    for s in steps:
        bad = [r for r in s.rows if not 0 <= r < n_train]
        if bad:
            raise IndexError(f"step {s.step}: training rows {bad[:3]} out of range 0..{n_train - 1}")

    net = copy.deepcopy(model)
    if initial_state is not None:
        net.load_state_dict(initial_state)
    if dtype is not None:
        net.to(dtype)
    work = dtype if dtype is not None else next(net.parameters()).dtype

    def cast(x: Tensor) -> Tensor:
        return x.to(work) if x.is_floating_point() else x

    x_train, y_train = cast(train_inputs), cast(train_targets)
    x_test, y_test = cast(test_inputs), cast(test_targets)

    names = [n for n, p in net.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("model has no trainable parameters")
    live = dict(net.named_parameters())
    chosen = {n: live[n].detach() for n in names}  # views: see in-place updates
    fixed = {n: p.detach() for n, p in live.items() if n not in chosen}
    fixed.update(dict(net.named_buffers()))

    def one(p: dict, xi: Tensor, ti: Tensor):
        out = functional_call(net, {**fixed, **p}, (xi.unsqueeze(0),))
        loss = loss_fn(out, ti.unsqueeze(0)).sum()
        return loss, loss.detach()

    per_sample = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))

    def grads_and_losses(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        net.eval()
        g, losses = per_sample(chosen, x, t)
        n = t.shape[0]
        return torch.cat([g[k].reshape(n, -1) for k in names], dim=1), losses

    params = [live[n] for n in names]
    optimizer = torch.optim.SGD(params, lr=1.0)

    m = len(y_test)
    T = len(steps)
    first_order = torch.zeros(T, m, dtype=work)
    true_change = torch.zeros(T, m, dtype=work)
    tracin = torch.zeros(n_train, m, dtype=work)
    ideal = torch.zeros(n_train, m, dtype=work)
    pair_parts: dict[str, list[Tensor]] = {"step_index": [], "row": [], "first_order": [], "ideal": []}
    diffs: dict[int, float] = {}
    reproduced: bool | None = None
    ck = {int(k): v for k, v in (checkpoints or {}).items()}

    def compare(done: int) -> None:
        nonlocal reproduced
        if done not in ck:
            return
        ok, worst = _compare_state(net.state_dict(), ck[done], rtol, atol)
        diffs[done] = worst
        reproduced = ok if reproduced is None else (reproduced and ok)

    with torch.no_grad():
        g_test, loss_test = grads_and_losses(x_test, y_test)
    initial_loss = loss_test.clone()
    compare(0)
    for t, s in enumerate(steps):
        rows = torch.tensor(s.rows, dtype=torch.long)
        xb, yb = x_train[rows], y_train[rows]
        b = len(s.rows)
        g_b, _ = grads_and_losses(xb, yb)
        fo = (g_b @ g_test.T).mul_(s.lr / b)  # (b, m)
        # the recorded step itself: SGD on the mean batch loss, in train mode as in training
        net.train()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = s.lr
        with torch.enable_grad():
            loss_fn(net(xb), yb).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        g_test, loss_next = grads_and_losses(x_test, y_test)
        delta = loss_test - loss_next
        fo_sum = fo.sum(0)
        share = _split(split, fo, fo_sum, delta, b)
        first_order[t] = fo_sum
        true_change[t] = delta
        tracin.index_add_(0, rows, fo)
        ideal.index_add_(0, rows, share)
        if keep_pairs:
            pair_parts["step_index"].append(torch.full((b,), t, dtype=torch.long))
            pair_parts["row"].append(rows)
            pair_parts["first_order"].append(fo)
            pair_parts["ideal"].append(share)
        loss_test = loss_next
        compare(t + 1)

    checkpoint_final_loss = None
    if T in ck:
        probe = copy.deepcopy(net)
        probe.load_state_dict({k: v.to(work) if v.is_floating_point() else v for k, v in ck[T].items()})
        probe.eval()
        with torch.no_grad():
            checkpoint_final_loss = loss_fn(probe(x_test), y_test).detach()
    unknown = sorted(set(ck) - set(range(T + 1)))
    if unknown:
        raise ValueError(f"checkpoints at steps {unknown[:3]} lie beyond the {T} recorded steps")
    net.eval()
    return ReplayResult(
        steps=np.array([s.step for s in steps], dtype=np.int64),
        lrs=np.array([s.lr for s in steps], dtype=np.float64),
        batch_sizes=np.array([len(s.rows) for s in steps], dtype=np.int64),
        first_order=first_order,
        true_change=true_change,
        tracin=tracin,
        tracin_ideal=ideal,
        initial_loss=initial_loss,
        final_loss=loss_test,
        final_state={k: v.detach().clone() for k, v in net.state_dict().items()},
        split=split,
        checkpoint_max_abs_diff=diffs,
        reproduced=reproduced,
        checkpoint_final_loss=checkpoint_final_loss,
        pairs={k: torch.cat(v) for k, v in pair_parts.items()} if keep_pairs and T else None,
    )


def _split(split: str, fo: Tensor, fo_sum: Tensor, delta: Tensor, b: int) -> Tensor:
    """Return each batch member's share (b, m) of the step's true change ``delta`` (m,)."""
    if b == 1:
        return delta.unsqueeze(0).clone()
    if split == "residual":
        return fo + ((delta - fo_sum) / b).unsqueeze(0)
    if split == "equal":
        return (delta / b).unsqueeze(0).expand(b, -1).clone()
    # proportional; columns whose first-order terms (nearly) cancel are split equally
    scale = fo.abs().sum(0)
    ok = fo_sum.abs() > 1e-12 * scale.clamp_min(1e-300)
    share = torch.where(ok, fo * (delta / torch.where(ok, fo_sum, torch.ones_like(fo_sum))),
                        (delta / b).expand_as(fo))
    return share


def _compare_state(
    replayed: Mapping[str, Tensor], recorded: Mapping[str, Tensor], rtol: float, atol: float
) -> tuple[bool, float]:
    if set(replayed) != set(recorded):
        missing = sorted(set(replayed) ^ set(recorded))
        raise ValueError(f"checkpoint keys differ from the model's: {missing[:5]}")
    ok, worst = True, 0.0
    for k, v in recorded.items():
        r = replayed[k]
        if v.is_floating_point():
            r64, v64 = r.double(), v.double()
            worst = max(worst, float((r64 - v64).abs().max())) if v.numel() else worst
            ok = ok and torch.allclose(r64, v64, rtol=rtol, atol=atol)
        else:
            ok = ok and torch.equal(r.cpu(), v.cpu())
    return ok, worst
