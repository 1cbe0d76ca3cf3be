"""Security hygiene: the private key never leaves keys/, receipts carry no local paths, artifacts stay inside."""

import json
import os
from pathlib import Path

import pytest

from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.ledger.artifacts import write_artifact
from fgtrac_assets.ledger.store import Ledger


def secret_of(home: Path) -> str:
    key = next((home / "keys").glob("*.key")).read_text().strip()
    assert key.startswith("PRIVATE+KEY+")
    secret = key.split("+", 4)[4]  # PRIVATE+KEY+name+keyid+base64(0x01 || seed)
    assert len(secret) == 44
    return secret


def test_private_key_appears_nowhere_else(digits_copy, tmp_path, capsys):
    secret = secret_of(digits_copy)
    keys = digits_copy / "keys"
    assert (keys.stat().st_mode & 0o777) == 0o700
    assert all((f.stat().st_mode & 0o777) == 0o600 for f in keys.glob("*.key"))
    s = Ledger(digits_copy).query("SELECT sample_id FROM events WHERE kind = 'batched' LIMIT 1").to_pylist()[0]["sample_id"]
    outputs = []
    for argv in (["verify"], ["verify", "--json"], ["summary"], ["key", "list"], ["prove", s],
                 ["audit", "sql", "SELECT * FROM tree_heads"], ["audit", "sql", "DROP TABLE events"],
                 ["report", "--out", str(tmp_path / "rep")], ["audit", "sample", "zzzzzz"]):
        fgtrac(["--home", str(digits_copy)] + argv)
        out = capsys.readouterr()
        outputs.append(out.out + out.err)
    everything = "\n".join(outputs)
    for f in digits_copy.rglob("*"):
        if f.is_file() and keys not in f.parents:
            everything += f.read_bytes().decode("latin-1")
    everything += (tmp_path / "rep" / "index.html").read_text()
    assert secret not in everything
    assert "PRIVATE+KEY" not in everything


def test_receipts_hold_no_local_paths(digits_home, capsys):
    s = Ledger(digits_home).query("SELECT sample_id FROM events WHERE kind = 'batched' LIMIT 1").to_pylist()[0]["sample_id"]
    capsys.readouterr()
    assert fgtrac(["--home", str(digits_home), "prove", s]) == 0
    text = capsys.readouterr().out
    receipts = json.loads(text)
    import base64

    leaves = " ".join(base64.b64decode(r["leaf"]).decode() for r in receipts)
    for local in (str(digits_home), os.path.expanduser("~"), "/tmp/"):
        assert local not in text and local not in leaves


@pytest.mark.parametrize("bad", ["../escape.bin", "/etc/passwd", "a/../../b"])
def test_artifact_paths_cannot_escape_home(tmp_path, bad):
    with pytest.raises(ValueError, match="inside FGTRAC_HOME"):
        write_artifact(tmp_path, bad, "x", lambda p: p.write_bytes(b"x"))
