"""What both integration tests read back: the committed events per step, the step rows, the CLI's answers."""

import json

import torch

import fgtrac_assets as fg
from fgtrac_assets.cli import main
from fgtrac_assets.ledger import Ledger

N = 36  # batches of 4: 9 per epoch, so accumulating 2 leaves a last step of one micro-batch
IDS = [f"item-{i:03d}" for i in range(N)]
SID = {fg.sample_id(n): i for i, n in enumerate(IDS)}


def features(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Return distinct random features (4 per item) and labels of 3 classes."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def recorded(home, kind: str = "batched") -> dict[int, list[int]]:
    """Return {step: sorted dataset indices} of the committed events of a kind."""
    rows = Ledger(home).query("SELECT step, sample_id FROM events WHERE kind = ? ORDER BY step, position",
                              [kind]).to_pylist()
    out: dict[int, list[int]] = {}
    for r in rows:
        out.setdefault(r["step"], []).append(SID[r["sample_id"]])
    return {k: sorted(v) for k, v in out.items()}


def steps(home) -> list[dict]:
    """Return the committed optimizer_steps rows, lrs decoded."""
    rows = Ledger(home).query("SELECT * FROM optimizer_steps ORDER BY step").to_pylist()
    return [{**r, "lrs": json.loads(r["lrs"])} for r in rows]


def checkpoints(home) -> list[dict]:
    """Return the committed checkpoints in step order."""
    return Ledger(home).query("SELECT * FROM checkpoints ORDER BY step").to_pylist()


def verify_and_audit(home, run: str, capsys) -> dict:
    """Check `fgtrac verify` passes and return `fgtrac audit used item-007 --run <run>` as a row."""
    assert main(["--home", str(home), "verify"]) == 0
    capsys.readouterr()
    assert main(["--home", str(home), "audit", "used", IDS[7], "--run", run, "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    return row
