"""Which saved checkpoints TracInCP sums over (FG-Trac's selection rule), and why each was or was not chosen."""

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["DEFAULT_RULE", "Decision", "SelectionRule", "select_checkpoints"]


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the rule decided about one checkpoint and the numbers it decided on."""

    index: int
    val_loss: float
    selected: bool
    rank: int | None  # position among the selected checkpoints, in checkpoint order (1 = earliest)
    in_window: bool  # at or after ``consider_from`` of training: the rule looked at it
    improvement: float | None  # relative improvement on the window's best before it (None: nothing to improve on)
    because: str  # "final checkpoint", "improvement", "spread" or "" when not selected

    def reason(self, rule: "SelectionRule") -> str:
        """Return the one-line reason recorded with the decision (the numbers the rule computed)."""
        text = f"val loss {self.val_loss:.4f}"
        if not self.in_window:
            return text + f"; before the rule's window (consider_from {rule.consider_from:g})"
        if self.improvement is not None:
            text += f", relative improvement {self.improvement:.3f} within the window"
        why = {"final checkpoint": "; final checkpoint",
               "improvement": f"; selected: improvement of at least {rule.min_rel_improvement:g}",
               "spread": "; selected to spread the remaining slots over the window"}
        return text + why.get(self.because, "")


@dataclasses.dataclass(frozen=True)
class SelectionRule:
    """FG-Trac's checkpoint selection settings, each with its one default (see :func:`select_checkpoints`).

    The ``selected_checkpoints`` asset's config, the plain ``select`` stage and the studies' ``fgtrac``
    rows all take their defaults from here.
    """

    min_rel_improvement: float = 0.05
    max_checkpoints: int = 3
    always_keep_last: bool = True
    consider_from: float = 0.5

    def select(self, val_losses: Sequence[float]) -> list[int]:
        """Return the sorted indices of the checkpoints this rule selects."""
        return [d.index for d in self.decide(val_losses) if d.selected]

    def decide(self, val_losses: Sequence[float]) -> list[Decision]:
        """Return the rule's decision about every checkpoint, with the numbers it was computed from."""
        return _decide(list(val_losses), self)


#: the rule with every setting at its default
DEFAULT_RULE = SelectionRule()


def select_checkpoints(
    val_losses: Sequence[float],
    min_rel_improvement: float = DEFAULT_RULE.min_rel_improvement,
    max_checkpoints: int = DEFAULT_RULE.max_checkpoints,
    always_keep_last: bool = DEFAULT_RULE.always_keep_last,
    consider_from: float = DEFAULT_RULE.consider_from,
) -> list[int]:
    """Return sorted indices of at most ``max_checkpoints`` checkpoints chosen by FG-Trac's rule.

    Rule, with ``val_losses[i]`` the validation loss after checkpoint ``i``:

    1. Qualify: checkpoint ``i >= 1`` qualifies when its loss improves on the best loss of
       all earlier checkpoints by a relative amount
       ``(best_before - val_losses[i]) / |best_before| >= min_rel_improvement``.
       Checkpoint 0 has nothing to improve on and never qualifies; NaN losses never
       qualify and do not update the running best.
    2. Last: with ``always_keep_last`` the final checkpoint is always kept and takes one
       of the ``max_checkpoints`` slots.  (Checkpoints chosen by validation-loss
       improvement alone are all early, before mislabelled samples are fitted;
       self-influence summed over them found 59% of flipped labels vs 89% with all
       checkpoints, so the final one is kept.)
    3. Rank: the remaining slots go to the qualifying checkpoints with the largest
       relative improvements (ties: earlier checkpoint first).
    4. Fill: if slots are still free, add checkpoints spread evenly over training:
       repeatedly the unselected index farthest from every selected one (ties: the
       smaller index; with nothing selected yet that is index 0).

    With ``consider_from`` = f > 0 (as by default) the rule is applied to the checkpoints from
    fraction f of training onward only (improvements measured within that window); f = 0 applies
    it to all of training. On the mislabelled-digits study (``mislabel_evaluation``, default
    preset, seeds 0-4) f = 0.5 found 89.4% of flipped labels in the top 10% with 3 checkpoints
    (min 87%), against 84.2% (min 78%) for the rule over all of training: late checkpoints are
    the ones that have fitted the mislabelled samples.

    The result is deterministic: it depends only on the arguments.
    """
    return SelectionRule(min_rel_improvement, max_checkpoints, always_keep_last, consider_from).select(val_losses)


def _decide(val_losses: list[float], rule: SelectionRule) -> list[Decision]:
    """Apply the rule (see :func:`select_checkpoints`) and return one decision per checkpoint."""
    if not 0 <= rule.consider_from < 1:
        raise ValueError("consider_from must lie in [0, 1)")
    if rule.max_checkpoints < 1:
        raise ValueError("max_checkpoints must be >= 1")
    if rule.min_rel_improvement < 0:
        raise ValueError("min_rel_improvement must be >= 0")
    start = int(len(val_losses) * rule.consider_from)
    window = val_losses[start:]
    n = len(window)
    budget = min(int(rule.max_checkpoints), n)

    # 1. relative improvement of each checkpoint on the best of the window before it
    improvement: dict[int, float] = {}
    best = math.nan
    for i, raw in enumerate(window):
        v = float(raw)
        if math.isnan(v):
            continue
        if not math.isnan(best):
            improvement[i] = (best - v) / abs(best) if best != 0 else (math.inf if v < best else 0.0)
        if math.isnan(best) or v < best:
            best = v
    qualified = [(rel, i) for i, rel in improvement.items() if rel > 0 and rel >= rule.min_rel_improvement]

    because: dict[int, str] = {}
    # 2. the final checkpoint
    if rule.always_keep_last and n:
        because[n - 1] = "final checkpoint"
    # 3. largest improvements first
    for _rel, i in sorted(qualified, key=lambda ri: (-ri[0], ri[1])):
        if len(because) >= budget:
            break
        because[i] = "improvement"
    # 4. evenly spread fill (greedy farthest point)
    while len(because) < budget:
        def gap(i: int) -> float:
            return min((abs(i - j) for j in because), default=math.inf)

        because[max((i for i in range(n) if i not in because), key=lambda i: (gap(i), -i))] = "spread"
    rank = {i: r + 1 for r, i in enumerate(sorted(because))}
    return [Decision(index=j, val_loss=float(v), selected=(j - start) in because, rank=rank.get(j - start),
                     in_window=j >= start, improvement=improvement.get(j - start) if j >= start else None,
                     because=because.get(j - start, ""))
            for j, v in enumerate(val_losses)]
