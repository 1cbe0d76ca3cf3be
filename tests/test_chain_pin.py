"""A fixed-seed chain commits the same records as the code it was pinned on: refactors must not change the log.

The pin has two parts. tests/data/chain_pin.json holds, per leaf table, the count and SHA-256 of its
normalised rows: run ids, timestamps and the roots that depend on them are masked, and so is every value
that float arithmetic decides (scores, losses, gradient norms in group members, the bytes of checkpoint and
score files), which is replaced by a placeholder. Those values go to tests/data/chain_pin_floats.npz, one
vector per table and field, and are compared with a relative tolerance: torch's CPU kernels differ in the
last bits between processors (AVX2, AVX-512, AMX), so exact float bits would pin the machine, not the code.
Issue 17 changed `checkpoint_selections.reason` on purpose, so it is left out. After a change that alters
records on purpose, regenerate with `.venv/bin/python tests/test_chain_pin.py --write` and say why in the
commit.
"""

import hashlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

PIN = Path(__file__).parent / "data" / "chain_pin.json"
FLOATS = Path(__file__).parent / "data" / "chain_pin_floats.npz"
LIMITS = {"digits_cnn": 300, "multimodal_graph": 3000}
EPOCHS = 3
VOLATILE = {"created_at"}
UNPINNED = {("checkpoint_selections", "reason")}
FLOAT_FILES = {"checkpoint", "influence_scores", "gradient_cache"}  # artifacts whose bytes are floats
RTOL = 1e-3


class _Floats:
    """Float values pulled out of rows, one list per "table.field"; each is replaced by a placeholder."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.lists: dict[tuple, int] = {}  # influence lists (pipeline, method, kind, test sample) -> number

    def record(self, key: str, value: float):
        """Record one value under key."""
        self.values.setdefault(key, []).append(float(value))

    def pull(self, key: str, value):
        """Return value with its floats (also inside JSON text) replaced by "F" and recorded under key."""
        if isinstance(value, float):
            self.record(key, value)
            return "F"
        if isinstance(value, dict):
            return {k: self.pull(f"{key}.{k}", v) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [self.pull(key, v) for v in value]
        if isinstance(value, str) and value[:1] in "{[":
            try:
                return json.dumps(self.pull(key, json.loads(value)), sort_keys=True)
            except ValueError:
                return value
        return value


def _normalised(table: str, row: dict, runs: re.Pattern, floats: _Floats, members: dict[int, str]) -> str:
    """Return one row as JSON with run ids, the roots derived from them and float-decided values masked."""
    if table == "influence":  # near-tied scores may swap ranks between processors: ranks go to the floats
        floats.record("influence.rank", row["rank"])
        floats.record("influence.list", floats.lists.setdefault(_influence_order(row)[:-1], len(floats.lists)))
        row = {k: v for k, v in row.items() if k not in ("leaf_index", "rank")}
    row = {k: floats.pull(f"{table}.{k}", v) for k, v in row.items()}
    if table == "event_groups":
        row["members"] = members[row["leaf_index"]]
    if table == "checkpoints" or (table == "artifacts" and row.get("kind") in FLOAT_FILES):
        row.update(sha256="-", **({"bytes": 0} if "bytes" in row else {}))
    text = runs.sub("RUN", json.dumps(row, sort_keys=True, default=str))
    if table == "materializations":
        text = re.sub(r"[0-9a-f]{64}", "ROOT", text)
    return text


def _group_members(con, floats: _Floats) -> dict[int, str]:
    """Return each event group's members (sample ids and details, floats pulled out) as one SHA-256."""
    digests: dict[int, hashlib._Hash] = {}
    for leaf, sample_id, detail in con.execute(
            "SELECT m.leaf_index, k.sample_id, m.detail FROM group_members m JOIN sample_keys k USING (sample_key) "
            "ORDER BY m.leaf_index, m.position").fetchall():
        line = json.dumps([sample_id, floats.pull("group_members.detail", detail)]) + "\n"
        digests.setdefault(leaf, hashlib.sha256()).update(line.encode())
    return {leaf: h.hexdigest() for leaf, h in digests.items()}


def chain_digests(home: Path) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """Run both pipelines' chains with fixed seeds in home; return {table: [rows, sha256]} and the floats."""
    import torch

    from fgtrac_assets.cli_run import Progress, run_pipeline
    from fgtrac_assets.ledger.schema import LEAF_ORDER, LEAF_TABLES, physical
    from fgtrac_assets.ledger.store import Ledger
    from fgtrac_assets.pipelines.registry import PIPELINES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums in one fixed order
    try:
        for pipeline, defaults in PIPELINES:
            run_pipeline(Ledger(home), pipeline, defaults, LIMITS[pipeline.name], EPOCHS, Progress(io.StringIO()))
    finally:
        torch.set_num_threads(threads)
    rows = []
    floats = _Floats()
    with Ledger(home).reader() as con:
        members = _group_members(con, floats)
        for table in LEAF_ORDER:
            cols = [c for c, _ in LEAF_TABLES[table] if c not in VOLATILE and (table, c) not in UNPINNED]
            for r in con.execute(f"SELECT leaf_index, {', '.join(cols)} FROM {physical(table)}").fetchall():
                rows.append((r[0], table, dict(zip(["leaf_index", *cols], r))))
    rows.sort(key=lambda r: (r[1] == "influence", _influence_order(r[2]) if r[1] == "influence" else r[0]))
    runs = sorted({r["run_id"] for _, _, r in rows if r.get("run_id")} | {r["training_run"] for _, _, r in rows
                                                                          if r.get("training_run")})
    pattern = re.compile("|".join(map(re.escape, runs)))
    out: dict[str, list] = {}
    for _, table, row in rows:
        count, h = out.setdefault(table, [0, hashlib.sha256()])
        h.update(_normalised(table, row, pattern, floats, members).encode() + b"\n")
        out[table][0] = count + 1
    return ({t: [n, h.hexdigest()] for t, (n, h) in sorted(out.items())},
            {k: np.asarray(v, dtype=np.float64) for k, v in sorted(floats.values.items())})


def _influence_order(row: dict) -> tuple:
    """Order influence rows by what they are about, not by rank (ranks of near ties are not pinned exactly)."""
    return row["pipeline"], row["method"], row["kind"], row["test_sample_id"] or "", row["train_sample_id"]


def rank_differences(pinned: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[str]:
    """Return the influence rows whose rank moved, except swaps between scores equal within RTOL."""
    rank, lists, score = pinned["influence.rank"], pinned["influence.list"], pinned["influence.score"]
    now = got.get("influence.rank")
    if now is None or now.shape != rank.shape:
        return ["the influence rows changed in number"]
    scale = max(float(np.abs(score).max(initial=0.0)), 1e-12)
    out = []
    for i in np.flatnonzero(rank != now):
        twin = np.flatnonzero((lists == lists[i]) & (rank == now[i]))  # the row pinned at the rank it has now
        if twin.size != 1 or abs(score[twin[0]] - score[i]) > RTOL * scale:
            out.append(f"influence row {i}: rank {int(rank[i])} pinned, {int(now[i])} now")
    return out


def float_differences(pinned: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, str]:
    """Return, per "table.field" that differs beyond RTOL (of the field's largest magnitude), what differs."""
    out = {}
    for key in sorted(set(pinned) | set(got)):
        a, b = pinned.get(key), got.get(key)
        if a is None or b is None or a.shape != b.shape:
            out[key] = f"{None if a is None else a.size} values pinned, {None if b is None else b.size} now"
            continue
        scale = max(float(np.abs(a).max(initial=0.0)), 1e-12)
        worst = np.abs(a - b).max(initial=0.0) / scale
        if worst > RTOL:
            i = int(np.argmax(np.abs(a - b)))
            out[key] = f"value {i}: pinned {a[i]!r}, now {b[i]!r} ({worst:.2g} of the largest)"
    return out


@pytest.mark.slow
def test_fixed_seed_chain_commits_the_pinned_records(tmp_path):
    pinned = json.loads(PIN.read_text())
    with np.load(FLOATS) as pinned_floats:
        pinned_values = dict(pinned_floats)
    got, values = chain_digests(tmp_path / "home")
    changed = {t: (pinned.get(t), got.get(t)) for t in set(pinned) | set(got) if pinned.get(t) != got.get(t)}
    assert not changed, f"records changed (table: (pinned, now)): {changed}"
    assert not (swapped := rank_differences(pinned_values, values)), f"influence ranks changed: {swapped[:5]}"
    exact = ("influence.rank", "influence.list")
    moved = float_differences({k: v for k, v in pinned_values.items() if k not in exact},
                              {k: v for k, v in values.items() if k not in exact})
    assert not moved, f"float values changed beyond {RTOL:g}: {moved}"



def test_the_float_comparison_tolerates_last_bits_and_near_ties_but_not_a_change():
    score = np.array([0.5, 0.5 * (1 + 1e-6), 0.2, -0.3, 0.4])
    pinned = {"influence.score": score, "influence.rank": np.array([1.0, 2.0, 3.0, 1.0, 2.0]),
              "influence.list": np.array([0.0, 0.0, 0.0, 1.0, 1.0])}
    last_bits = dict(pinned, **{"influence.score": score * (1 + 1e-7)})
    assert not float_differences(pinned, last_bits)
    assert not rank_differences(pinned, dict(pinned, **{"influence.rank": np.array([2.0, 1.0, 3.0, 1.0, 2.0])}))
    assert rank_differences(pinned, dict(pinned, **{"influence.rank": np.array([1.0, 3.0, 2.0, 1.0, 2.0])}))
    assert rank_differences(pinned, dict(pinned, **{"influence.rank": np.array([1.0, 2.0, 3.0, 2.0, 1.0])}))
    one_moved = score.copy()
    one_moved[3] *= 1.01
    assert "influence.score" in float_differences(pinned, dict(pinned, **{"influence.score": one_moved}))
    assert float_differences(pinned, {k: v[:-1] for k, v in pinned.items()})


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    digests, values = chain_digests(Path(tempfile.mkdtemp()) / "home")
    PIN.write_text(json.dumps(digests, indent=1) + "\n")
    np.savez_compressed(FLOATS, **values)
    print(f"wrote {PIN} and {FLOATS}")
