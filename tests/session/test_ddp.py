"""Sessions under torchrun --nproc_per_node=2 (gloo on CPU): every rank's batches, committed once."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fgtrac_assets as fg
from fgtrac_assets.ledger import Ledger
from fgtrac_assets.session.distributed import check_assignment

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, timeout: float = 240) -> None:
    """Run a script under torchrun with two ranks on loopback; stop the whole process group if it hangs."""
    argv = [str(BIN / "torchrun"), "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script), *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def ddp_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    torchrun(HERE / "ddp_train.py", str(root / "home"), str(root))
    truth = [json.loads((root / f"truth-{r}.json").read_text()) for r in range(2)]
    return root / "home", truth


def test_every_ranks_batches_are_one_group_per_global_step(ddp_home):
    home, truth = ddp_home
    from tests.session.ddp_train import NAMES

    ids = {fg.sample_id(n): i for i, n in enumerate(NAMES)}
    rows = Ledger(home).query("SELECT leaf_index, step, sample_id, detail FROM events WHERE kind = 'batched' "
                              "ORDER BY step, position").to_pylist()
    by_step: dict[int, list] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append((json.loads(r["detail"])["rank"], ids[r["sample_id"]]))
    global_steps = sorted({(t["epoch"], t["step"]) for t in truth[0]})
    assert len(by_step) == len(global_steps) == 2 * 5
    for g, (epoch, step) in enumerate(global_steps):
        expected = [(rank, i) for rank in range(2) for t in truth[rank] if (t["epoch"], t["step"]) == (epoch, step)
                    for i in t["indices"]]
        assert by_step[g] == expected
    leaves = {r["step"]: set() for r in rows}
    for r in rows:
        leaves[r["step"]].add(r["leaf_index"])
    assert all(len(v) == 1 for v in leaves.values())  # one leaf per global step, holding all ranks' members
    assert len(rows) == sum(len(t["indices"]) for rank in truth for t in rank) == 2 * 2 * 23


def test_padding_duplicates_are_marked_and_the_commit_happened_once(ddp_home):
    home, _ = ddp_home
    ledger = Ledger(home)
    padding = ledger.query("SELECT epoch, detail FROM events WHERE kind = 'batched' AND detail LIKE '%padding%' ORDER BY epoch"
                           ).to_pylist()
    assert [(p["epoch"], json.loads(p["detail"])) for p in padding] == [(0, {"padding": True, "rank": 1}),
                                                                          (1, {"padding": True, "rank": 1})]
    assert ledger.query("SELECT count(*) FROM materializations").column(0)[0].as_py() == 1
    assert ledger.query("SELECT count(*) FROM checkpoints").column(0)[0].as_py() == 2
    sampler = json.loads(ledger.query("SELECT sampler FROM training_runs").column(0)[0].as_py())
    assert (sampler["seed"], sampler["num_replicas"], sampler["epochs"]) == (7, 2, [0, 1])
    assert ledger.query("SELECT size FROM training_sets").column(0)[0].as_py() == 45


def test_a_verifier_recomputes_each_ranks_share_and_flags_a_mismatch(ddp_home, tmp_path):
    home, _ = ddp_home
    assert check_assignment(Ledger(home), "ddp-run") == []
    import shutil

    other = tmp_path / "home"
    shutil.copytree(home, other)
    with Ledger(other)._connect(read_only=False) as con:  # what a wrong record would look like: another seed
        con.execute("UPDATE training_runs SET sampler = replace(sampler, '\"seed\": 7', '\"seed\": 8')")
    problems = check_assignment(Ledger(other), "ddp-run")
    assert problems and "rank 0" in problems[0]


def test_tracincp_runs_on_the_ddp_checkpoints(ddp_home):
    home, _ = ddp_home
    from tests.session.ddp_train import NAMES, dataset

    data = dataset()
    _, x, y = data.tensors
    result = fg.influence("ddp-run", nn.Linear(4, 3), nn.CrossEntropyLoss(reduction="none"), (x[5:], y[5:]),
                          NAMES[5:], (x[:5], y[:5]), NAMES[:5], home=home, k=3)
    assert result.top.proponent_idx.shape == (5, 3) and torch.isfinite(result.self_influence).all()
