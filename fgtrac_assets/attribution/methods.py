"""The influence methods the product commits: one name each, what it is computed from, and its scorer.

Every method's scorer has TracInCP's shape (``top_k``, ``self_influence``) and its sign: a positive score
means the training sample helped the test sample (lowered its loss, or raised its margin for TRAK).
``source`` says what a method reads from the ledger: the gradient cache of the selected checkpoints, the
selected checkpoints' weights, or the whole recorded trace (initial weights, every step's samples and
learning rate, the checkpoints the replay must reproduce). This module imports no torch at load time, so
configs that list the names load fast.
"""

from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Method:
    """An influence method: its name in rows and configs, what it reads, and what its scores mean."""

    name: str
    source: str  # "cache", "checkpoints" or "trace"
    description: str
    self_influence_nonnegative: bool  # a sum of squared norms (checked by the influence stage's numbers_sane)


METHODS = {m.name: m for m in (
    Method("tracincp", "cache", "TracInCP (last layer, selected checkpoints)", True),
    Method("trak", "checkpoints", "TRAK (last layer, selected checkpoints, random projection)", True),
    Method("step_exact", "trace", "step-exact TracIn (last layer, every recorded step's own weights, replayed)",
           True),
    Method("metagradient", "trace", "exact metagradients through the recorded training run (all parameters)",
           False),
)}
DEFAULT_METHOD = "tracincp"


def method(name: str) -> Method:
    """Return the method of that name, or raise InputError naming the choices."""
    if name not in METHODS:
        raise InputError(f"unknown influence method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def build_scorer(name: str, model, loss_fn, train_targets, *, layer: str | None = None, checkpoints=None,
                 trace=None):
    """Return the scorer of a checkpoint or trace method, verified against the trace where it replays one.

    train_targets (a tensor) says what TRAK differentiates: the margin for class labels, else minus the loss.
    """
    m = method(name)
    if m.source == "checkpoints":
        from .trak import TRAK

        output = "margin" if not train_targets.is_floating_point() else (lambda outputs, targets: -loss_fn(outputs, targets))
        return TRAK(model, checkpoints, loss_fn, layer=layer, output=output)
    if m.source == "trace":
        if name == "step_exact":
            from .step_exact import StepExactTracIn

            return StepExactTracIn(model, trace, loss_fn, layer=layer)
        from .metagradient import Metagradient

        return Metagradient(model, trace, loss_fn)
    raise InputError(f"influence method {name!r} is computed from the gradient cache, not by a scorer")
