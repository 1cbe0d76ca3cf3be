"""The signing key can live outside FGTRAC_HOME (FGTRAC_SIGNING_KEY), mode 0600 enforced, rotation included."""

import os

import pytest

from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.ledger.store import Commit, Ledger
from fgtrac_assets.ledger.verify import verify_ledger

ROWS = {"events": [{"sample_id": "s", "kind": "ingested"}]}


@pytest.fixture
def outside(tmp_path, monkeypatch):
    key = tmp_path / "vault" / "log.key"
    key.parent.mkdir()
    monkeypatch.setenv("FGTRAC_SIGNING_KEY", str(key))
    return key


def test_a_key_outside_the_home_signs_and_never_lands_in_it(tmp_path, outside, capsys):
    home = tmp_path / "home"
    Ledger(home).commit(Commit("p", "raw", "r", rows=ROWS))
    assert outside.is_file() and outside.stat().st_mode & 0o777 == 0o600
    assert not (home / "keys").exists() or not list((home / "keys").glob("*.key"))
    secret = outside.read_text().strip()
    assert all(secret not in f.read_bytes().decode("latin-1") for f in home.rglob("*") if f.is_file())
    assert verify_ledger(Ledger(home)).ok
    capsys.readouterr()
    assert fgtrac(["--home", str(home), "key"]) == 0
    assert capsys.readouterr().out.strip() == Ledger(home).keystore.current_verifier_key(Ledger(home).origin)


def test_a_key_others_can_read_is_refused(tmp_path, outside):
    Ledger(tmp_path / "home").commit(Commit("p", "raw", "r", rows=ROWS))
    os.chmod(outside, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        Ledger(tmp_path / "home").commit(Commit("p", "raw", "r2", rows=ROWS))


def test_rotation_of_a_key_outside_the_home(tmp_path, outside, capsys):
    home = tmp_path / "home"
    Ledger(home).commit(Commit("p", "raw", "r", rows=ROWS))
    before = outside.read_text()
    capsys.readouterr()
    assert fgtrac(["--home", str(home), "key", "rotate"]) == 0
    assert outside.read_text() != before and outside.stat().st_mode & 0o777 == 0o600
    Ledger(home).commit(Commit("p", "raw", "r2", rows=ROWS))
    assert verify_ledger(Ledger(home)).ok
    assert len(Ledger(home).key_history().keys) == 2


def test_a_different_key_at_the_path_is_refused_for_an_existing_log(tmp_path, outside):
    home = tmp_path / "home"
    Ledger(home).commit(Commit("p", "raw", "r", rows=ROWS))
    outside.unlink()
    outside.with_name("log.vkey").unlink()
    with pytest.raises(Exception, match="missing"):
        Ledger(home).commit(Commit("p", "raw", "r2", rows=ROWS))


def test_a_rotation_killed_after_its_commit_is_finished_by_the_next_commit(tmp_path):
    from fgtrac_assets.integrity import notes
    from fgtrac_assets.ledger.keys import endorse
    from fgtrac_assets.ledger.store import utc_now

    ledger = Ledger(tmp_path / "home")
    ledger.commit(Commit("p", "raw", "r", rows=ROWS))
    store, origin = ledger.keystore, ledger.origin
    old, new = store.load_or_create(origin), notes.generate_signer(origin)
    store.stage(new)  # what rotate_key does before its commit ...
    ledger.commit(Commit("fgtrac", "key_rotation", "rot", rows={"log_keys": [{
        "origin": origin, "verifier_key": new.verifier_key, "previous_key": old.verifier_key,
        "endorsement": endorse(old, origin, new.verifier_key), "created_at": utc_now()}]}))
    assert store.current_verifier_key(origin) == old.verifier_key  # ... killed before promoting the new key
    ledger.commit(Commit("p", "raw", "r2", rows=ROWS))
    assert store.current_verifier_key(origin) == new.verifier_key
    assert verify_ledger(ledger).ok and ledger.key_history().keys == [old.verifier_key, new.verifier_key]
