"""The library surface: the names a training script imports, and the packages' small deliberate __all__."""

import subprocess
import sys

import pytest


def test_readme_tracing_example_runs_with_the_package_imports(tmp_path):
    """README 'How it works': wrap a loader and an optimizer, train, commit the groups with Ledger and Commit."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fgtrac_assets.ledger import Commit, Ledger
    from fgtrac_assets.tracing import Tracer

    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    sample_ids = [f"s{i}" for i in range(20)]
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer = Tracer(sample_ids, training_run="run-1")
    loader = tracer.wrap_loader(DataLoader(TensorDataset(x, y), batch_size=8))
    step = tracer.wrap_optimizer(optimizer)
    for xb, yb in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        step.step()
    result = Ledger(tmp_path).commit(Commit(pipeline="mine", asset="training", run_id="run-1",
                                            groups=tracer.groups()))
    assert result.rows["events"] == 20
    used = Ledger(tmp_path).query("SELECT count(DISTINCT sample_id) AS n, max(step) AS last FROM events "
                                  "WHERE kind = 'batched'").to_pylist()[0]
    assert used == {"n": 20, "last": 2}


def test_attribution_exports_the_methods_and_the_selection_rule_only():
    import fgtrac_assets.attribution as attribution
    from fgtrac_assets.attribution import TRAK, FurtherTraining, GradCos, GradDot, InfluenceFunction, TracInCP
    from fgtrac_assets.attribution.final_model import GradDot as home

    assert attribution.__all__ == ["FurtherTraining", "GradCos", "GradDot", "InfluenceFunction", "Metagradient",
                                   "OptimizerSpec", "SelectionRule", "StepExactTracIn", "TRAK", "TracInCP",
                                   "TrainingTrace", "select_checkpoints"]
    assert GradDot is home and all(callable(c) for c in (FurtherTraining, GradCos, InfluenceFunction, TracInCP, TRAK))
    for internal in ("factor_dot", "solve_block_cg", "model_guard", "linear_factors", "TopK"):
        with pytest.raises(AttributeError):
            getattr(attribution, internal)
    # internals stay importable from their own modules
    from fgtrac_assets.attribution.ghost import factor_dot  # noqa: F401
    from fgtrac_assets.attribution.ihvp import solve_block_cg  # noqa: F401
    from fgtrac_assets.attribution.model_calls import model_guard  # noqa: F401


def test_ledger_and_tracing_packages_export_their_entry_points():
    import fgtrac_assets.ledger as ledger
    import fgtrac_assets.tracing as tracing
    from fgtrac_assets.ledger.store import Commit, Ledger
    from fgtrac_assets.tracing.tracer import Tracer

    assert ledger.__all__ == ["Commit", "Ledger"] and (ledger.Ledger, ledger.Commit) == (Ledger, Commit)
    assert "Tracer" in tracing.__all__ and tracing.Tracer is Tracer
    with pytest.raises(AttributeError):
        ledger.LedgerBusy  # noqa: B018  (lives in ledger.lock)


def test_definitions_and_the_selection_rule_load_without_torch():
    """Dagster loads the definitions (and with them the selection rule's defaults) without importing torch."""
    code = ("import sys, fgtrac_assets.definitions, fgtrac_assets.attribution.selection, fgtrac_assets.tracing; "
            "from fgtrac_assets.ledger import Ledger; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
