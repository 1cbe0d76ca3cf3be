"""The rows an influence computation commits: per test sample its k proponents and opponents, and self-influence."""

import numpy as np
import pyarrow as pa


def influence_rows(train_ids: list, test_ids: list, top, selfinf, k: int, method: str = "tracincp") -> pa.Table:
    """Return the influence rows: k proponents and opponents per test sample, then every self-influence, ranked.

    top holds (n_test, k) index and score arrays (torch tensors on any device, or numpy), selfinf one score per
    train sample; method names what computed them (attribution/methods.py).
    """
    ids = np.asarray(train_ids, dtype=object)
    parts = []
    if top is not None:
        n_test = len(test_ids)
        # per test sample, ranks 1..k, each rank's proponent then its opponent (columns built whole, no row loop)
        idx = np.stack([_host(top.proponent_idx)[:, :k], _host(top.opponent_idx)[:, :k]], axis=2).reshape(-1)
        score = np.stack([_host(top.proponent_score)[:, :k], _host(top.opponent_score)[:, :k]],
                         axis=2).reshape(-1)
        parts.append({"test_sample_id": np.repeat(np.asarray(test_ids, dtype=object), 2 * k),
                      "train_sample_id": ids[idx], "kind": np.tile(np.array(["proponent", "opponent"]), n_test * k),
                      "rank": np.tile(np.repeat(np.arange(1, k + 1), 2), n_test),
                      "score": score.astype(np.float64)})
    self_scores = _host(selfinf)
    order = np.argsort(-self_scores, kind="stable")
    parts.append({"test_sample_id": np.full(len(order), None, dtype=object), "train_sample_id": ids[order],
                  "kind": np.full(len(order), "self"), "rank": np.arange(1, len(order) + 1),
                  "score": self_scores[order].astype(np.float64)})
    cols = {key: pa.array(np.concatenate([p[key] for p in parts]).tolist(),
                          type={"rank": pa.int64(), "score": pa.float64()}.get(key, pa.string()))
            for key in ("test_sample_id", "train_sample_id", "kind", "rank", "score")}
    return pa.table({**cols, "method": pa.array([method] * len(cols["kind"]), pa.string())})


def _host(values) -> np.ndarray:
    """Return a torch tensor (on any device) or array-like as a numpy array in host memory."""
    return values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
