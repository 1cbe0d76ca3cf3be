"""The ledger: bulk commits, signed heads, concurrent writers and readers from separate processes."""

import multiprocessing as mp

from fgtrac_assets.integrity import merkle, notes
from fgtrac_assets.ledger.store import Commit, Ledger
from fgtrac_assets.ledger.verify import verify_ledger


def _commit_many(home: str, worker: int, n: int) -> None:
    ledger = Ledger(home, lock_timeout_s=120)
    for i in range(n):
        ledger.commit(Commit(pipeline="p", asset=f"a{worker}", run_id=f"w{worker}-{i}",
                             rows={"events": [{"sample_id": f"{worker}-{i}-{j}", "kind": "ingested"} for j in range(50)]}))


def _read_many(home: str, n: int) -> None:
    ledger = Ledger(home, lock_timeout_s=120)
    for _ in range(n):
        if ledger.exists():
            ledger.query("SELECT count(*) FROM events")


def test_concurrent_writers_and_readers_never_fail(tmp_path):
    home = str(tmp_path / "h")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_commit_many, args=(home, w, 8)) for w in range(3)]
    procs += [ctx.Process(target=_read_many, args=(home, 40))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    ledger = Ledger(home)
    assert ledger.query("SELECT count(*) AS n FROM events").to_pylist()[0]["n"] == 3 * 8 * 50
    report = verify_ledger(ledger)
    assert report.ok, [f.line() for f in report.findings]
    assert report.tree_heads == 24


def test_tree_head_is_a_signed_c2sp_checkpoint_over_the_rows(tmp_path):
    ledger = Ledger(tmp_path)
    rows = [{"sample_id": f"s{i}", "kind": "ingested"} for i in range(5)]
    result = ledger.commit(Commit(pipeline="p", asset="a", run_id="r", rows={"events": rows}))
    assert result.tree_size == 6  # five events and the materialisation row
    verifier = notes.parse_verifier_key(ledger.keystore.verifier_keys()[0])
    cp = notes.parse_checkpoint(notes.open_note(result.checkpoint, [verifier]))
    assert (cp.origin, cp.size, cp.root) == (ledger.origin, 6, result.root)
    from fgtrac_assets.ledger.leaves import row_leaf

    stored = ledger.query("SELECT * FROM events ORDER BY leaf_index").to_pylist()
    mat = ledger.query("SELECT * FROM materializations").to_pylist()
    leaves = [row_leaf("events", r) for r in stored] + [row_leaf("materializations", mat[0])]
    assert merkle.merkle_root(leaves) == result.root


def test_private_key_is_0600_and_never_in_the_ledger(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.commit(Commit(pipeline="p", asset="a", run_id="r", rows={"events": [{"sample_id": "s", "kind": "x"}]}))
    key_files = list((tmp_path / "keys").glob("*.key"))
    assert len(key_files) == 1
    assert key_files[0].stat().st_mode & 0o777 == 0o600
    secret = key_files[0].read_text().strip().split("+", 4)[4]  # PRIVATE+KEY+name+keyid+base64(seed)
    assert len(secret) == 44
    assert secret.encode() not in (tmp_path / "ledger.duckdb").read_bytes()
