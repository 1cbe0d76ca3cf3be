"""Evidence that leaves the machine (issue 16): commits cosigned by real witness processes, verify --policy
that trusts only the policy and the witnesses' own views, and the measured attacks each a FAIL naming a witness."""

import json
import shutil
import time

import duckdb
import pytest

from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.ledger.store import Commit, Ledger
from tests.test_proofs import rebuild_and_resign
from tests.witness_process import Witness

ORIGIN = "fgtrac.test/witnessed"


def event_rows(n: int, tag: str) -> dict:
    return {"events": [{"sample_id": f"{tag}-{i:04d}", "kind": "ingested"} for i in range(n)]}


@pytest.fixture
def log_home(tmp_path, monkeypatch):
    """A home whose log key exists (witnesses are configured with it) and a unique origin."""
    monkeypatch.setenv("FGTRAC_ORIGIN", ORIGIN)
    home = tmp_path / "home"
    Ledger(home).initialise()  # `fgtrac key init`: the key exists before the first commit
    return home


@pytest.fixture
def witnesses(tmp_path, log_home):
    """Two witness processes of the home's log; each is stopped by its pid at teardown."""
    vkey = Ledger(log_home).keystore.current_verifier_key(ORIGIN)
    started = [Witness(tmp_path / f"w{i}", [vkey], name=f"witness.test/w{i}").start() for i in (1, 2)]
    yield started
    for w in started:
        w.stop()


def write_policy(path, log_home, witnesses, quorum="2") -> None:
    vkey = Ledger(log_home).keystore.current_verifier_key(ORIGIN)
    lines = [f"log {vkey}"] + [f"witness w{i} {w.vkey} {w.url}" for i, w in enumerate(witnesses, 1)]
    path.write_text("\n".join(lines + [f"quorum {quorum}"]) + "\n")


def verify(home, capsys, *extra) -> tuple[int, str]:
    capsys.readouterr()
    code = fgtrac(["--home", str(home), "verify", *extra])
    return code, capsys.readouterr().out


@pytest.fixture
def witnessed(tmp_path, log_home, witnesses, monkeypatch):
    """A home with three commits, each cosigned by both witnesses; returns (home, policy file)."""
    policy = tmp_path / "policy"
    write_policy(policy, log_home, witnesses)
    monkeypatch.setenv("FGTRAC_POLICY", str(policy))
    for k in range(3):
        result = Ledger(log_home).commit(Commit("p", "raw", f"r{k}", rows=event_rows(40, f"c{k}")))
        assert result.witnessed == {"w1": "cosigned", "w2": "cosigned"}, result.witnessed
    return log_home, policy


def test_every_commit_is_cosigned_and_verifies_under_the_policy(witnessed, witnesses, capsys):
    home, policy = witnessed
    rows = Ledger(home).query("SELECT size, witness FROM cosignatures ORDER BY size, witness").to_pylist()
    sizes = [r["size"] for r in Ledger(home).query("SELECT size FROM tree_heads ORDER BY size").to_pylist()]
    assert [(r["size"], r["witness"]) for r in rows] == [(s, w) for s in sizes for w in ("w1", "w2")]
    code, out = verify(home, capsys, "--policy", str(policy))
    assert code == 0 and out.splitlines()[-1].startswith("OK"), out
    for w in witnesses:  # each witness's own view is the ledger's latest head
        assert f"\n{sizes[-1]}\n" in w.latest(ORIGIN)


def test_a_down_witness_never_fails_a_commit_and_sync_catches_up(witnessed, witnesses, capsys, monkeypatch):
    home, policy = witnessed
    monkeypatch.setenv("FGTRAC_WITNESS_TIMEOUT", "0.5")
    witnesses[1].kill9()
    started = time.monotonic()
    result = Ledger(home).commit(Commit("p", "raw", "r-down", rows=event_rows(10, "down")))
    assert time.monotonic() - started < 5
    assert result.witnessed["w1"] == "cosigned" and "unavailable" in result.witnessed["w2"]
    code, out = verify(home, capsys, "--policy", str(policy))
    assert code == 0 and "not yet cosigned by the quorum" in out, out
    witnesses[1].start()  # the same state directory: it remembers what it cosigned
    write_policy(policy, home, witnesses)  # its new port
    capsys.readouterr()
    assert fgtrac(["--home", str(home), "witness", "sync"]) == 0
    assert capsys.readouterr().out.count("OK") == 2
    code, out = verify(home, capsys, "--policy", str(policy))
    assert code == 0 and "not yet" not in out, out


def test_a_witness_that_is_ahead_of_what_the_ledger_recorded_is_caught_up_through_409(witnessed, witnesses):
    home, _ = witnessed
    con = duckdb.connect(str(home / "ledger.duckdb"))
    con.execute("DELETE FROM cosignatures")  # the ledger forgot what the witnesses cosigned: they answer 409
    con.close()
    result = Ledger(home).commit(Commit("p", "raw", "r-409", rows=event_rows(5, "x")))
    assert result.witnessed == {"w1": "cosigned", "w2": "cosigned"}


def failing(home, policy, capsys) -> list[str]:
    code, out = verify(home, capsys, "--policy", str(policy))
    assert code == 1, out
    return [line for line in out.splitlines() if line.startswith("FAIL")]


@pytest.mark.parametrize("witness_file", ["deleted", "downgraded"])
def test_a_rollback_is_a_fail_naming_the_witness(witnessed, capsys, monkeypatch, witness_file):
    home, policy = witnessed
    monkeypatch.delenv("FGTRAC_POLICY")  # the auditor's policy comes with --policy below
    assert verify(home, capsys)[0] == 0  # the home's own witness file now holds the newest head
    sizes = [r["size"] for r in Ledger(home).query("SELECT size FROM tree_heads ORDER BY size").to_pylist()]
    old_head = Ledger(home).query(f"SELECT note FROM tree_heads WHERE size = {sizes[0]}").to_pylist()[0]["note"]
    rebuild_and_resign(home, keep_size=sizes[0])  # roll back to the first head, with the home's own key
    con = duckdb.connect(str(home / "ledger.duckdb"))
    con.execute(f"DELETE FROM cosignatures WHERE size > {sizes[0]}")
    con.close()
    local = next((home / "witness").glob("*.checkpoint"))
    if witness_file == "deleted":
        shutil.rmtree(home / "witness")
    else:
        local.write_text(old_head)  # the genuine older head: the home alone cannot tell
    assert verify(home, capsys)[0] == 0  # without the policy, the rollback is invisible
    lines = failing(home, policy, capsys)
    assert any(line.startswith("FAIL witness w1") and "rolled back" in line for line in lines), lines
    assert any(line.startswith("FAIL witness w2") and "rolled back" in line for line in lines), lines


def test_a_history_rewritten_and_re_signed_with_the_home_key_is_a_fail_naming_the_witness(witnessed, capsys):
    home, policy = witnessed
    con = duckdb.connect(str(home / "ledger.duckdb"))
    con.execute("UPDATE event_rows SET sample_id = 'forged' WHERE leaf_index = 0")
    con.close()
    rebuild_and_resign(home)
    shutil.rmtree(home / "witness", ignore_errors=True)
    lines = failing(home, policy, capsys)
    assert any(line.startswith("FAIL witness w1") and "rewritten" in line for line in lines), lines


def test_a_replaced_key_pair_is_a_fail_under_the_policy_and_the_pinned_key(witnessed, capsys, monkeypatch):
    home, policy = witnessed
    monkeypatch.delenv("FGTRAC_POLICY")
    assert verify(home, capsys)[0] == 0  # pins the log key in the trust store (outside the home)
    shutil.rmtree(home / "keys")
    shutil.rmtree(home / "witness")
    rebuild_and_resign(home)  # a new key pair re-signs every head and fills in its verifier_key
    code, out = verify(home, capsys)
    assert code == 1 and "pinned" in out, out
    lines = failing(home, policy, capsys)
    assert any(line.startswith("FAIL keys log key") and "policy" in line for line in lines), lines
    assert any(line.startswith("FAIL tree_heads") for line in lines), lines


def test_a_forged_cosignature_row_fails(witnessed, capsys):
    home, policy = witnessed
    con = duckdb.connect(str(home / "ledger.duckdb"))
    line = con.execute("SELECT line FROM cosignatures LIMIT 1").fetchall()[0][0]
    forged = line[:-6] + ("A" if line[-6] != "A" else "B") + line[-5:]
    con.execute("UPDATE cosignatures SET line = ? WHERE line = ?", [forged, line])
    con.close()
    assert any(line.startswith("FAIL cosignatures") for line in failing(home, policy, capsys))


def test_no_policy_means_no_witnessing_and_a_passing_check(log_home):
    result = Ledger(log_home).commit(Commit("p", "raw", "r", rows=event_rows(3, "n")))
    assert result.witnessed == {}
    from fgtrac_assets.ledger.checks import run_checks

    check = next(c for c in run_checks(Ledger(log_home), (), "r", None, result.checkpoint) if c.name == "witnessed")
    assert check.passed and "no witness policy" in check.description


def test_the_witnessed_check_warns_when_the_quorum_is_missing(witnessed, witnesses, monkeypatch):
    home, _ = witnessed
    from fgtrac_assets.ledger.checks import run_checks

    monkeypatch.setenv("FGTRAC_WITNESS_TIMEOUT", "0.3")
    witnesses[0].kill9()
    result = Ledger(home).commit(Commit("p", "raw", "r-q", rows=event_rows(3, "q")))
    check = next(c for c in run_checks(Ledger(home), (), "r-q", None, result.checkpoint) if c.name == "witnessed")
    assert not check.passed and "witness sync" in check.description


def test_a_malformed_policy_fails_before_anything_is_written(log_home, tmp_path, monkeypatch):
    bad = tmp_path / "bad-policy"
    bad.write_text("log not-a-key\nquorum none\n")
    monkeypatch.setenv("FGTRAC_POLICY", str(bad))
    with pytest.raises(ValueError, match="bad-policy: policy line 1"):
        Ledger(log_home).commit(Commit("p", "raw", "r", rows=event_rows(3, "m")))
    assert not (log_home / "ledger.duckdb").exists() or Ledger(log_home).latest_tree_head() is None


def test_verify_json_with_a_policy_names_the_witness(witnessed, capsys):
    home, policy = witnessed
    sizes = [r["size"] for r in Ledger(home).query("SELECT size FROM tree_heads ORDER BY size").to_pylist()]
    rebuild_and_resign(home, keep_size=sizes[1])
    shutil.rmtree(home / "witness", ignore_errors=True)
    capsys.readouterr()
    assert fgtrac(["--home", str(home), "verify", "--json", "--policy", str(policy)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert {f["row"] for f in doc["findings"] if f["table"] == "witness"} >= {"w1", "w2"}


def test_a_cosigned_tlog_proof_verifies_offline_in_python_and_go(witnessed, tmp_path, capsys):
    import hashlib

    from tests.interop.build import go_read_tiles, go_unavailable_reason

    home, policy = witnessed
    sid = hashlib.sha256(b"a sample").hexdigest()
    Ledger(home).commit(Commit("p", "raw", "r-s", rows={"samples": [{"sample_id": sid, "source": "x", "label": 1}],
                                                        "events": [{"sample_id": sid, "kind": "ingested"}]}))
    out = tmp_path / "proofs"
    assert fgtrac(["--home", str(home), "prove", sid[:12], "--format", "tlog-proof", "--out", str(out)]) == 0
    proofs = sorted(out.glob("*.tlog-proof"))
    assert len(proofs) == 2 and all(p.with_suffix(".leaf").exists() for p in proofs)
    capsys.readouterr()
    assert fgtrac(["verify-receipt", str(proofs[0]), "--policy", str(policy)]) == 0
    assert "cosigned by w1, w2" in capsys.readouterr().out
    stricter = tmp_path / "stricter"
    stricter.write_text(policy.read_text().replace("quorum 2", "witness w3 " + _third_witness() + "\nquorum 3"))
    assert fgtrac(["verify-receipt", str(proofs[0]), "--policy", str(stricter)]) == 1
    assert "witness policy" in capsys.readouterr().out
    log_key = Ledger(home).keystore.current_verifier_key(ORIGIN)
    wkeys = [line.split()[2] for line in policy.read_text().splitlines() if line.startswith("witness ")]
    if go_unavailable_reason() is None:  # Go and x/mod come from Debian packages (.ci/run, make test)
        ok = go_read_tiles("proof", proofs[0], proofs[0].with_suffix(".leaf"), key=log_key, witnesses=tuple(wkeys),
                           quorum=2)
        assert ok.returncode == 0 and "cosigned by 2 witnesses" in ok.stdout, ok.stdout + ok.stderr
        short = go_read_tiles("proof", proofs[0], proofs[0].with_suffix(".leaf"), key=log_key,
                              witnesses=(wkeys[0], _third_witness()), quorum=2)
        assert short.returncode == 1 and "quorum 2" in short.stdout, short.stdout
    leaf = proofs[0].with_suffix(".leaf")
    assert b'"source":"x"' in leaf.read_bytes()
    leaf.write_bytes(leaf.read_bytes().replace(b'"source":"x"', b'"source":"y"'))
    assert fgtrac(["verify-receipt", str(proofs[0]), "--policy", str(policy)]) == 1


def _third_witness() -> str:
    from fgtrac_assets.integrity.cosignature import generate_cosigner

    return generate_cosigner("witness.test/w3").verifier_key


def test_a_ledger_replaced_on_purpose_is_unpinned_with_key_forget(tmp_path, capsys):
    home = tmp_path / "own"
    Ledger(home).commit(Commit("p", "raw", "r", rows=event_rows(3, "a")))
    assert verify(home, capsys)[0] == 0  # pins the key for this home
    shutil.rmtree(home)  # `make clean-data`, then a new run: a new key at the same place
    Ledger(home).commit(Commit("p", "raw", "r", rows=event_rows(3, "b")))
    code, out = verify(home, capsys)
    assert code == 1 and "fgtrac key forget" in out, out
    assert fgtrac(["--home", str(home), "key", "forget"]) == 0
    assert verify(home, capsys)[0] == 0
