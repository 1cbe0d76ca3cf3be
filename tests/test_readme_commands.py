"""The README's commands work exactly as printed: its own-data job run, and every `fgtrac` command it lists."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fgtrac_assets.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(lang: str) -> list[str]:
    """Return the README's fenced code blocks of one language ('' = blocks without one)."""
    out, current, fence_lang = [], None, None
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, fence_lang = [], line[3:].strip()
            else:
                if fence_lang == lang:
                    out.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return out


def image_folder(root: Path, per_class: int = 12) -> int:
    """Write an ImageFolder of bundled digits (class folders 0..9); return how many images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    n = 0
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for i in np.flatnonzero(data.target == label)[:per_class]:
            Image.fromarray((data.images[i] * 16).clip(0, 255).astype(np.uint8)).save(root / str(label) / f"{i}.png")
            n += 1
    return n


@pytest.mark.slow
def test_the_own_data_job_runs_as_printed(tmp_path):
    config = next(b for b in blocks("yaml") if "my-data.yaml" in b)
    command = next(line for b in blocks("sh") for line in b.splitlines() if "-c my-data.yaml" in line)
    n = image_folder(tmp_path / "images")
    (tmp_path / "my-data.yaml").write_text(config.replace("/path/to/images", str(tmp_path / "images")))
    env = {**os.environ, "FGTRAC_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    argv = shlex.split(command)
    argv[0] = str(BIN / Path(argv[0]).name)  # `.venv/bin/dagster` is this interpreter's dagster
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = subprocess.run([str(BIN / "fgtrac"), "summary"], env=env, capture_output=True, text=True, timeout=300)
    assert summary.returncode == 0, summary.stdout + summary.stderr
    assert re.search(rf"^samples\s+{n}$", summary.stdout, flags=re.M), summary.stdout
    assert summary.stdout.splitlines()[-1].startswith("OK:")


def listed_fgtrac_commands() -> list[str]:
    """Return the `fgtrac …` lines of the README's command list, comments removed."""
    block = next(b for b in blocks("sh") if b.lstrip().startswith("fgtrac verify"))
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("fgtrac ")]


def concrete(command: str) -> list[str]:
    """Return a listed command's argv with its placeholders filled in and its optional parts taken."""
    values = {"ID": "0123456789ab", "RUN": "latest", "TEST_ID": "0123456789ab", "TEST": "0123456789ab",
              "FILE": "x.json", "VKEY": "k", "A": "raw_samples", "N": "1", "M": "2", "DIR": "out"}
    argv = []
    for word in shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " "))[1:]:
        argv.append(values.get(word, word))
    if argv[:1] == ["key"]:
        argv = ["key", "list"]
    return argv


@pytest.mark.parametrize("command", listed_fgtrac_commands())
def test_every_listed_fgtrac_command_parses(command):
    args = build_parser().parse_args(concrete(command) + ["--home", "/nonexistent"])
    assert args.home == "/nonexistent" and callable(args.func)


def test_the_policy_example_parses_once_its_keys_are_filled_in():
    from fgtrac_assets.integrity import notes
    from fgtrac_assets.integrity.cosignature import generate_cosigner
    from fgtrac_assets.integrity.policy import parse_policy

    example = next(b for b in blocks("") if "\nquorum " in b and b.lstrip().startswith("# the log's key"))
    keys = {"log": notes.generate_signer("fgtrac.local/ledger").verifier_key}
    lines = []
    for line in example.splitlines():
        words = line.split()
        if words[:1] == ["log"]:
            line = f"log {keys['log']}"
        elif words[:1] == ["witness"]:
            line = f"witness {words[1]} {generate_cosigner(words[2].split('+')[0]).verifier_key} {words[3]}"
        lines.append(line)
    policy = parse_policy("\n".join(lines) + "\n")
    assert sorted(policy.witnesses) == ["w1", "w2"] and policy.satisfied({"w1", "w2"}) and not policy.satisfied({"w1"})
