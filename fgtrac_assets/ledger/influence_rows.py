"""The rows an influence computation commits: per test sample its k proponents and opponents, and self-influence."""

import numpy as np
import pyarrow as pa


def influence_rows(train_ids: list, test_ids: list, top, selfinf, k: int) -> pa.Table:
    """Return the influence rows: k proponents and opponents per test sample, then every self-influence, ranked."""
    import torch

    ids = np.asarray(train_ids, dtype=object)
    parts = []
    if top is not None:
        n_test = len(test_ids)
        # per test sample, ranks 1..k, each rank's proponent then its opponent (columns built whole, no row loop)
        idx = torch.stack([top.proponent_idx[:, :k], top.opponent_idx[:, :k]], dim=2).reshape(-1).numpy()
        score = torch.stack([top.proponent_score[:, :k], top.opponent_score[:, :k]], dim=2).reshape(-1)
        parts.append({"test_sample_id": np.repeat(np.asarray(test_ids, dtype=object), 2 * k),
                      "train_sample_id": ids[idx], "kind": np.tile(np.array(["proponent", "opponent"]), n_test * k),
                      "rank": np.tile(np.repeat(np.arange(1, k + 1), 2), n_test),
                      "score": score.double().numpy()})
    order = torch.argsort(selfinf, descending=True).numpy()
    parts.append({"test_sample_id": np.full(len(order), None, dtype=object), "train_sample_id": ids[order],
                  "kind": np.full(len(order), "self"), "rank": np.arange(1, len(order) + 1),
                  "score": selfinf[torch.from_numpy(order)].double().numpy()})
    cols = {key: pa.array(np.concatenate([p[key] for p in parts]).tolist(),
                          type={"rank": pa.int64(), "score": pa.float64()}.get(key, pa.string()))
            for key in ("test_sample_id", "train_sample_id", "kind", "rank", "score")}
    return pa.table({**cols, "method": pa.array(["tracincp"] * len(cols["kind"]), pa.string())})
