"""The README's "Use it in your own training" quick start runs exactly as printed, and every audit then works."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from fgtrac_assets.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def section() -> str:
    """Return the README's "Use it in your own training" section."""
    start = README.index("## Use it in your own training")
    return README[start:README.index("\n## ", start + 3)]


def fenced(text: str, lang: str) -> list[str]:
    """Return the fenced blocks of one language in text."""
    parts = text.split("```")
    return [p[len(lang) + 1:] for p in parts[1::2] if p.startswith(lang + "\n")]


def test_the_quick_start_runs_as_printed(tmp_path):
    script = next(b for b in fenced(section(), "python") if b.startswith("# quickstart.py"))
    (tmp_path / "quickstart.py").write_text(script)
    commands = [line for line in fenced(section(), "sh")[0].splitlines() if line.strip()]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for line in commands:
        argv = shlex.split(line)
        argv[0] = sys.executable if argv[0] == "python" else str(BIN / argv[0])
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        outputs.append(proc.stdout)
    used = dict(zip(*[ln.split() for ln in outputs[1].splitlines()[0:3:2]]))
    assert used["used"] == "True" and int(used["epochs"]) == 3
    assert "run-1/step-0000010" in outputs[2] and "run-1/step-0000030" in outputs[2]
    assert all(r.startswith("OK") for r in outputs[4].splitlines())
    assert json.loads((tmp_path / "item-7.json").read_text())
    assert '"kind": "absent"' in outputs[5]
    assert "proponent" in outputs[6] and "opponent" in outputs[6]
    assert outputs[-1].splitlines()[-1].startswith("OK:")
    ledger = Ledger(tmp_path / "data")
    counts = ledger.query("SELECT kind, count(*) AS n FROM events GROUP BY 1").to_pylist()
    assert {r["kind"]: r["n"] for r in counts} == {"ingested": 200, "batched": 3 * 160}
    by_method = ledger.query("SELECT method, count(*) AS n FROM influence WHERE kind = 'proponent' GROUP BY 1").to_pylist()
    assert {r["method"]: r["n"] for r in by_method} == {"tracincp": 40 * 10, "step_exact": 40 * 10}
