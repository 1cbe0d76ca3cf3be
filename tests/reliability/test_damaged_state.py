"""Damaged state: a clear message and a non-zero exit, never a silent fresh start that forgets history."""

import shutil
import subprocess
import sys
import textwrap

import pytest

from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.ledger.store import Commit, Ledger, LedgerDamaged
from fgtrac_assets.ledger.verify import verify_ledger

ROW = {"events": [{"sample_id": "s", "kind": "ingested"}]}


def test_corrupted_ledger_file(digits_copy, capsys):
    (digits_copy / "ledger.duckdb").write_bytes(b"this is not a database" * 1000)
    capsys.readouterr()
    assert fgtrac(["--home", str(digits_copy), "verify"]) == 1
    out = capsys.readouterr()
    assert "not a readable DuckDB ledger" in out.out and out.out.startswith("FAIL ledger")
    assert out.err == "" and out.out.count("FAIL") == 1
    with pytest.raises(LedgerDamaged):
        Ledger(digits_copy).commit(Commit("p", "a", "r", rows=ROW))


def test_missing_ledger_is_not_replaced_by_a_fresh_one(digits_copy, capsys):
    (digits_copy / "ledger.duckdb").unlink()
    capsys.readouterr()
    assert fgtrac(["--home", str(digits_copy), "verify"]) == 1
    assert "history is lost" in capsys.readouterr().out
    with pytest.raises(LedgerDamaged, match="restore it"):
        Ledger(digits_copy).commit(Commit("p", "a", "r", rows=ROW))
    assert not (digits_copy / "ledger.duckdb").exists()


def test_missing_signing_key(digits_copy):
    shutil.rmtree(digits_copy / "keys")
    report = verify_ledger(Ledger(digits_copy), update_witness=False)
    assert report.ok  # the verifier keys are in the ledger's own key history, not in keys/
    assert any("signing key" in n and "refused" in n for n in report.notices)
    with pytest.raises(LedgerDamaged, match="signing key .* is missing"):
        Ledger(digits_copy).commit(Commit("p", "a", "r", rows=ROW))


def test_empty_home_has_nothing_to_verify(tmp_path, capsys):
    assert fgtrac(["--home", str(tmp_path / "empty"), "verify"]) == 0
    assert "nothing to verify" in capsys.readouterr().out


def test_full_disk_during_training_loses_nothing(tmp_path):
    """A write that fails (file size limit, as on a full disk) stops the stage cleanly; the ledger still verifies."""
    home = tmp_path / "home"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from fgtrac_assets.ledger.store import Ledger
        from fgtrac_assets.pipelines import stages
        from fgtrac_assets.pipelines.base import IngestSettings, TrainSettings
        from fgtrac_assets.pipelines.digits import DigitsPipeline
        ledger, p = Ledger({str(home)!r}), DigitsPipeline()
        raw = stages.ingest(ledger, p, "r1", IngestSettings(limit=150))
        prep = stages.preprocess(ledger, p, "r2", raw.handle)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write returns EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            stages.train(ledger, p, "r3", prep.handle, TrainSettings(epochs=2))
        except OSError as exc:
            print("FAILED:", exc)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "writing artifact" in proc.stdout and "failed" in proc.stdout
    report = verify_ledger(Ledger(home))
    assert report.ok, [f.line() for f in report.findings]
    assert Ledger(home).query("SELECT count(*) AS n FROM checkpoints").to_pylist()[0]["n"] == 0
