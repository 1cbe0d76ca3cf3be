"""Which saved checkpoints TracInCP sums over (FG-Trac's selection rule)."""

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["DEFAULT_RULE", "SelectionRule", "select_checkpoints"]


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
        return select_checkpoints(val_losses, **dataclasses.asdict(self))


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
    if not 0 <= consider_from < 1:
        raise ValueError("consider_from must lie in [0, 1)")
    start = int(len(val_losses) * consider_from)
    if start:
        return [start + i for i in select_checkpoints(list(val_losses)[start:], min_rel_improvement,
                                                      max_checkpoints, always_keep_last, consider_from=0.0)]
    if max_checkpoints < 1:
        raise ValueError("max_checkpoints must be >= 1")
    if min_rel_improvement < 0:
        raise ValueError("min_rel_improvement must be >= 0")
    n = len(val_losses)
    if n == 0:
        return []
    budget = min(int(max_checkpoints), n)

    # 1. qualifying checkpoints and their relative improvement over the previous best
    qualified: list[tuple[float, int]] = []
    best = math.nan
    for i, raw in enumerate(val_losses):
        v = float(raw)
        if math.isnan(v):
            continue
        if not math.isnan(best) and v < best:
            rel = (best - v) / abs(best) if best != 0 else math.inf
            if rel >= min_rel_improvement:
                qualified.append((rel, i))
        if math.isnan(best) or v < best:
            best = v

    chosen: set[int] = set()
    # 2. the final checkpoint
    if always_keep_last:
        chosen.add(n - 1)
    # 3. largest improvements first
    for _rel, i in sorted(qualified, key=lambda ri: (-ri[0], ri[1])):
        if len(chosen) >= budget:
            break
        chosen.add(i)
    # 4. evenly spread fill (greedy farthest point)
    while len(chosen) < budget:
        def gap(i: int) -> float:
            return min((abs(i - j) for j in chosen), default=math.inf)

        chosen.add(max((i for i in range(n) if i not in chosen), key=lambda i: (gap(i), -i)))
    return sorted(chosen)
