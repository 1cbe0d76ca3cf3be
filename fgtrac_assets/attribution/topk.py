"""Chunked top-k: proponents / opponents per test sample without the full score matrix.

Score chunks of shape (chunk, n_test) (rows = a contiguous range of train samples) are
folded into running (n_test, k) buffers, so memory stays O(chunk x n_test + n_test x k).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RunningTopK", "TopK", "top_k_of_scores"]


@dataclass(eq=False)
class TopK:
    """Proponents (largest scores, descending) and opponents (most negative, ascending), each (n_test, k)."""

    proponent_idx: Tensor
    proponent_score: Tensor
    opponent_idx: Tensor
    opponent_score: Tensor


class RunningTopK:
    """Running k largest and k smallest train scores per test sample, updated one train chunk at a time."""

    def __init__(self, k: int):
        if k <= 0:
            raise ValueError("k must be positive")
        self.k = int(k)
        self._pos: tuple[Tensor, Tensor] | None = None
        self._neg: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def _merge(
        best: tuple[Tensor, Tensor] | None, scores: Tensor, idx: Tensor, k: int, largest: bool
    ) -> tuple[Tensor, Tensor]:
        if best is not None:
            scores = torch.cat([best[0], scores], dim=1)
            idx = torch.cat([best[1], idx], dim=1)
        kk = min(k, scores.shape[1])
        s, pos = torch.topk(scores, kk, dim=1, largest=largest, sorted=True)
        return s, torch.gather(idx, 1, pos)

    def update(self, scores: Tensor, offset: int) -> None:
        """Fold in ``scores`` (chunk, n_test) whose row r is train sample ``offset + r``; returns None.

        Fastest when ``scores`` is the transpose of a contiguous (n_test, chunk) matrix.
        """
        c = scores.shape[0]
        if c == 0:
            return
        if scores.stride(0) != 1 and c > 1:
            # torch.topk along dim 0 of a row-major chunk walks strided memory, much slower than along contiguous
            # memory; one transposed copy serves both calls below
            scores = scores.T.contiguous().T
        kk = min(self.k, c)
        for largest in (True, False):
            s, i = torch.topk(scores, kk, dim=0, largest=largest, sorted=False)
            s, i = s.T, i.T + offset
            if largest:
                self._pos = self._merge(self._pos, s, i, self.k, True)
            else:
                self._neg = self._merge(self._neg, s, i, self.k, False)

    def result(self) -> TopK:
        """Return the accumulated :class:`TopK` (indices int64, scores in the chunks' dtype)."""
        if self._pos is None or self._neg is None:
            raise ValueError("no scores were given")
        return TopK(
            proponent_idx=self._pos[1],
            proponent_score=self._pos[0],
            opponent_idx=self._neg[1],
            opponent_score=self._neg[0],
        )


def top_k_of_scores(scores: Tensor, k: int, chunk: int = 4096, progress=None) -> TopK:
    """Return the :class:`TopK` of a full (n_train, n_test) score matrix, folded ``chunk`` train rows at a time."""
    running = RunningTopK(min(k, scores.shape[0]))
    for start in range(0, scores.shape[0], chunk):
        running.update(scores[start:start + chunk], start)
        if progress is not None:
            progress(min(start + chunk, scores.shape[0]), scores.shape[0])
    return running.result()
