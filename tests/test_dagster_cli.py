"""One real run through `dagster asset materialize` (multiprocess executor), then `fgtrac verify`."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import chain_selection

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_dagster_cli_multiprocess_run_verifies(tmp_path):
    env = {**os.environ, "FGTRAC_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    config = {"ops": {"digits_cnn__raw_samples": {"config": {"limit": 250}},
                      "digits_cnn__training_checkpoints": {"config": {"epochs": 2}}}}
    proc = subprocess.run([str(BIN / "dagster"), "asset", "materialize", "-m", "fgtrac_assets.definitions",
                           "--select", chain_selection("digits_cnn"), "--config-json", json.dumps(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "multiprocess" in log.lower() or "Launching subprocess" in log, "expected the multiprocess executor"
    assert "Could not set lock" not in log
    out = subprocess.run([str(BIN / "fgtrac"), "verify"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].startswith("OK")
    summary = subprocess.run([str(BIN / "fgtrac"), "summary"], env=env, capture_output=True, text=True, timeout=300)
    assert summary.returncode == 0 and "samples          250" in summary.stdout, summary.stdout
