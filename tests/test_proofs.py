"""Receipts, absence proofs, consistency proofs, the witness and key rotation, against a real pipeline run."""

import base64
import copy
import json
import shutil

import duckdb
import pytest

from fgtrac_assets.pipelines.base import IngestSettings
from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.integrity import merkle, notes
from fgtrac_assets.integrity.receipts import ReceiptError, verify_receipt
from fgtrac_assets.ledger import proofs
from fgtrac_assets.ledger.leaves import row_leaf
from fgtrac_assets.ledger.nodes import append_hashes, rebuild_tiles
from fgtrac_assets.ledger.schema import LEAF_ORDER, physical
from fgtrac_assets.ledger.store import Ledger
from fgtrac_assets.ledger.verify import verify_ledger


def one(home, sql):
    return Ledger(home).query(sql).to_pylist()[0]


def held_out_sample(home):
    return one(home, "SELECT sample_id FROM events WHERE kind='split' AND detail LIKE '%\"test\"%' LIMIT 1")["sample_id"]


def trained_sample(home):
    return one(home, "SELECT sample_id, training_run FROM events WHERE kind='batched' LIMIT 1")


def test_every_receipt_of_a_sample_verifies_offline(digits_home, tmp_path, capsys):
    s = trained_sample(digits_home)["sample_id"]
    out = tmp_path / "r.json"
    assert fgtrac(["--home", str(digits_home), "prove", s, "--out", str(out)]) == 0
    receipts = json.loads(out.read_text())
    kinds = [json.loads(base64.b64decode(r["leaf"])).get("kind") for r in receipts]
    assert {"ingested", "preprocessed", "split", "batched", "gradient"} <= set(kinds)
    assert set(receipts[0]) == {"leaf", "leaf_index", "tree_size", "inclusion_proof", "checkpoint", "verifier_key"}
    capsys.readouterr()
    assert fgtrac(["verify-receipt", str(out)]) == 0
    assert capsys.readouterr().out.count("OK ") == len(receipts)


def _mutations(receipt):
    other = notes.generate_signer(notes.parse_verifier_key(receipt["verifier_key"]).name)
    leaf = bytearray(base64.b64decode(receipt["leaf"]))
    leaf[10] ^= 1
    proof0 = bytearray(base64.b64decode(receipt["inclusion_proof"][0]))
    proof0[0] ^= 1
    yield "leaf", {**receipt, "leaf": base64.b64encode(bytes(leaf)).decode()}
    yield "proof", {**receipt, "inclusion_proof": [base64.b64encode(bytes(proof0)).decode()] + receipt["inclusion_proof"][1:]}
    yield "index", {**receipt, "leaf_index": receipt["leaf_index"] + 1}
    yield "size", {**receipt, "tree_size": receipt["tree_size"] - 1}
    yield "checkpoint", {**receipt, "checkpoint": receipt["checkpoint"].replace("\n", "\n\n", 1)}
    yield "other key", {**receipt, "verifier_key": other.verifier_key}
    yield "re-signed by another key", {**receipt, "verifier_key": other.verifier_key,
                                        "checkpoint": other.sign(receipt["checkpoint"].split("\n\n")[0] + "\n")}


def test_tampered_receipts_fail(digits_home):
    receipt = proofs.sample_receipts(Ledger(digits_home), held_out_sample(digits_home))[0]
    verify_receipt(receipt)
    real_key = receipt["verifier_key"]
    for name, bad in _mutations(receipt):
        with pytest.raises(ReceiptError):
            # a receipt re-signed by another key only fails against the published key
            verify_receipt(bad, [real_key] if name == "re-signed by another key" else None)


def test_absence_of_a_held_out_sample_is_proved_and_checked(digits_home, tmp_path, capsys):
    run = trained_sample(digits_home)["training_run"]
    s = held_out_sample(digits_home)
    out = tmp_path / "absent.json"
    assert fgtrac(["--home", str(digits_home), "prove", "--absent", s, "--run", run, "--out", str(out)]) == 0
    assert fgtrac(["verify-receipt", str(out)]) == 0
    receipt = json.loads(out.read_text())
    # neighbours that do not bracket the sample, or are not adjacent, or a changed set root, fail
    swapped = copy.deepcopy(receipt)
    swapped["left"], swapped["right"] = receipt["right"], receipt["left"]
    gap = copy.deepcopy(receipt)
    if gap["left"]:
        gap["left"]["index"] -= 1
    else:
        gap["right"]["index"] += 1
    root = copy.deepcopy(receipt)
    root["set_root"] = base64.b64encode(b"\x00" * 32).decode()
    for bad in (swapped, gap, root):
        with pytest.raises(ReceiptError):
            verify_receipt(bad)


def test_absence_of_a_trained_sample_is_refused(digits_home, capsys):
    t = trained_sample(digits_home)
    assert fgtrac(["--home", str(digits_home), "prove", "--absent", t["sample_id"], "--run", t["training_run"]]) == 1
    assert "IS in training run" in capsys.readouterr().err


def test_absence_of_a_rejected_sample(tmp_path):
    """A sample rejected at ingestion (wrong size) gets an absence proof against the run trained without it."""
    import numpy as np
    from PIL import Image

    from fgtrac_assets.pipelines import stages
    from fgtrac_assets.pipelines.base import TrainSettings
    from fgtrac_assets.pipelines.digits import DigitsPipeline

    rng = np.random.default_rng(0)
    for label in range(2):
        (tmp_path / "imgs" / str(label)).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(rng.integers(0, 255, (8, 8)).astype(np.uint8)).save(tmp_path / "imgs" / str(label) / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (9, 9)).astype(np.uint8)).save(tmp_path / "imgs" / "1" / "odd.png")
    ledger, p = Ledger(tmp_path / "home"), DigitsPipeline()
    raw = stages.ingest(ledger, p, "r1", IngestSettings(source=str(tmp_path / "imgs")))
    prep = stages.preprocess(ledger, p, "r2", raw.handle)
    stages.train(ledger, p, "r3", prep.handle, TrainSettings(epochs=1))
    rejected = one(tmp_path / "home", "SELECT sample_id, detail FROM events WHERE kind='rejected'")
    assert "wrong size 9x9" in rejected["detail"]
    verify_receipt(proofs.absence(ledger, rejected["sample_id"], "r3"))


def test_consistency_between_signed_heads(digits_home, capsys):
    sizes = [r["size"] for r in Ledger(digits_home).query("SELECT size FROM tree_heads ORDER BY size").to_pylist()]
    old, new = sizes[1], sizes[-1]
    capsys.readouterr()
    assert fgtrac(["--home", str(digits_home), "log", "consistency", "--old", str(old), "--new", str(new)]) == 0
    doc = json.loads(capsys.readouterr().out)
    key = [notes.parse_verifier_key(doc["verifier_key"])]
    a = notes.parse_checkpoint(notes.open_note(doc["old_checkpoint"], key))
    b = notes.parse_checkpoint(notes.open_note(doc["new_checkpoint"], key))
    proof = [base64.b64decode(h) for h in doc["proof"]]
    assert (a.size, b.size) == (old, new)
    assert merkle.verify_consistency(old, new, a.root, b.root, proof)
    assert not merkle.verify_consistency(old, new, a.root, b.root, proof[:-1])


def test_verify_receipt_checks_a_consistency_proof(digits_home, tmp_path, capsys):
    sizes = [r["size"] for r in Ledger(digits_home).query("SELECT size FROM tree_heads ORDER BY size").to_pylist()]
    capsys.readouterr()
    assert fgtrac(["--home", str(digits_home), "log", "consistency", "--old", str(sizes[1]),
                   "--new", str(sizes[-1])]) == 0
    doc = json.loads(capsys.readouterr().out)
    good, bad, swapped = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "swapped.json"
    good.write_text(json.dumps(doc))
    bad.write_text(json.dumps(dict(doc, proof=doc["proof"][:-1])))
    swapped.write_text(json.dumps(dict(doc, old_checkpoint=doc["new_checkpoint"], new_checkpoint=doc["old_checkpoint"])))
    assert fgtrac(["verify-receipt", str(good)]) == 0
    assert f"consistent: the signed tree of size {sizes[1]} is a prefix" in capsys.readouterr().out
    assert fgtrac(["verify-receipt", str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert fgtrac(["verify-receipt", str(swapped)]) == 1
    assert "larger than the new size" in capsys.readouterr().out


# --- the witness and the keys ------------------------------------------------------------------


def rebuild_and_resign(home, keep_size=None):
    """What an attacker with the real key can do: rewrite rows, rebuild the tree, re-sign every head."""
    ledger = Ledger(home)
    signer = ledger.keystore.load_or_create(ledger.origin)
    con = duckdb.connect(str(home / "ledger.duckdb"))
    if keep_size is not None:
        for t in LEAF_ORDER:
            con.execute(f"DELETE FROM {physical(t)} WHERE leaf_index >= {keep_size}")
        con.execute(f"DELETE FROM group_members WHERE leaf_index >= {keep_size}")
        con.execute(f"DELETE FROM tree_heads WHERE size > {keep_size}")
    rows = []
    for t in LEAF_ORDER:
        rows += [(r["leaf_index"], row_leaf(t, r))
                 for r in con.sql(f"SELECT * FROM {physical(t)}").to_arrow_table().to_pylist()]
    rows.sort()
    levels = merkle.build_levels([merkle.leaf_hash(leaf) for _, leaf in rows])
    rebuild_tiles(con, levels[0])
    for (size,) in con.execute("SELECT size FROM tree_heads").fetchall():
        root = merkle.root_from(lambda lv, i: levels[lv][i], size)
        con.execute("UPDATE tree_heads SET root = ?, note = ?, verifier_key = ? WHERE size = ?",
                    [root, signer.sign(notes.format_checkpoint(ledger.origin, size, root)), signer.verifier_key, size])
    con.close()


def findings(home, **kw):
    return [f.line() for f in verify_ledger(Ledger(home), **kw).findings]


def test_truncated_and_resigned_log_is_caught_by_the_witness(digits_copy):
    assert findings(digits_copy) == []  # writes the witness
    sizes = [r["size"] for r in Ledger(digits_copy).query("SELECT size FROM tree_heads ORDER BY size").to_pylist()]
    rebuild_and_resign(digits_copy, keep_size=sizes[2])
    lines = findings(digits_copy)
    assert len(lines) == 1 and lines[0].startswith("witness") and "truncated" in lines[0], lines


def test_rewritten_and_resigned_log_is_caught_by_the_witness(digits_copy):
    assert findings(digits_copy) == []
    con = duckdb.connect(str(digits_copy / "ledger.duckdb"))
    con.execute("UPDATE samples SET label = (label + 1) % 10 WHERE leaf_index = 0")
    con.close()
    rebuild_and_resign(digits_copy)
    lines = findings(digits_copy)
    assert len(lines) == 1 and "rewritten" in lines[0], lines


def test_substituted_key_pair_is_caught(digits_copy):
    assert findings(digits_copy) == []
    published = Ledger(digits_copy).keystore.current_verifier_key(Ledger(digits_copy).origin)
    shutil.rmtree(digits_copy / "keys")
    rebuild_and_resign(digits_copy)  # a new key pair, everything re-signed with it
    lines = findings(digits_copy)
    assert any(line.startswith("witness") and "signature" in line for line in lines), lines
    lines = findings(digits_copy, trusted_keys=[published])
    assert any(line.startswith("tree_heads") and "signature" in line for line in lines), lines


def test_edited_or_removed_witness_is_reported(digits_copy, capsys):
    assert findings(digits_copy) == []
    witness = next((digits_copy / "witness").glob("*.checkpoint"))
    witness.write_text(witness.read_text().replace("\n", "\n ", 1))
    assert any(line.startswith("witness") for line in findings(digits_copy, update_witness=False))
    witness.unlink()
    capsys.readouterr()
    assert fgtrac(["--home", str(digits_copy), "verify"]) == 0
    assert "NOTE no witness" in capsys.readouterr().out
    assert fgtrac(["--home", str(digits_copy), "verify", "--witness", str(digits_copy / "elsewhere.checkpoint")]) == 1


def test_replaced_tree_head_and_duplicated_leaf_are_caught(digits_copy):
    con = duckdb.connect(str(digits_copy / "ledger.duckdb"))
    notes_by_size = dict(con.execute("SELECT size, note FROM tree_heads").fetchall())
    small, large = min(notes_by_size), max(notes_by_size)
    con.execute("UPDATE tree_heads SET note = ? WHERE size = ?", [notes_by_size[small], large])
    # duplicate a leaf: the same event row and leaf hash appended once more at the end of the log
    i = con.execute("SELECT min(leaf_index) FROM event_rows").fetchall()[0][0]
    con.execute(f"INSERT INTO event_rows SELECT {large}, * EXCLUDE (leaf_index) FROM event_rows WHERE leaf_index = {i}")
    duplicate = con.execute(f"SELECT hash FROM log_tree WHERE level = 0 AND idx = {i}").fetchall()[0][0]
    append_hashes(con, large, [bytes(duplicate)])
    con.close()
    lines = findings(digits_copy, update_witness=False)
    assert any(line.startswith(f"tree_heads size={large}") for line in lines), lines
    assert any(line.startswith("log leaves") and "no signed tree head" in line for line in lines), lines


def test_key_rotation_keeps_old_heads_verifiable(digits_copy, capsys):
    before = Ledger(digits_copy).keystore.current_verifier_key(Ledger(digits_copy).origin)
    assert fgtrac(["--home", str(digits_copy), "key", "rotate"]) == 0
    after = capsys.readouterr().out.strip()
    assert after != before
    from .conftest import materialize_digits

    assert materialize_digits(digits_copy, limit=120, epochs=1).success
    keys = {r["verifier_key"] for r in Ledger(digits_copy).query("SELECT verifier_key FROM tree_heads").to_pylist()}
    assert keys == {before, after}
    assert findings(digits_copy) == []


def test_verify_json(digits_copy, capsys):
    con = duckdb.connect(str(digits_copy / "ledger.duckdb"))
    con.execute("UPDATE influence SET score = score + 1 WHERE leaf_index = (SELECT min(leaf_index) FROM influence)")
    con.close()
    capsys.readouterr()
    assert fgtrac(["--home", str(digits_copy), "verify", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["findings"][0]["table"] == "influence"


def test_member_receipts_prove_each_training_step(digits_home):
    """Every step a sample trained in is proved by its step's group leaf plus the members bytes, without the ledger."""
    from fgtrac_assets.integrity.receipts import verify_member_receipt

    ledger = Ledger(digits_home)
    sid = trained_sample(digits_home)["sample_id"]
    receipts = [r for r in proofs.sample_receipts(ledger, sid) if "member" in r]
    kinds = {verify_member_receipt(r)["kind"] for r in receipts}
    assert kinds == {"batched", "gradient"}  # steps, and the gradients at the selected checkpoints
    receipts = [r for r in receipts if verify_member_receipt(r)["kind"] == "batched"]
    got = [verify_member_receipt(r) for r in receipts]
    expected = ledger.query("SELECT kind, training_run, epoch, step, position, lr FROM events "
                            "WHERE sample_id = ? AND kind = 'batched' ORDER BY leaf_index", [sid]).to_pylist()
    assert len(got) == len(expected) > 0
    assert [{k: g[k] for k in expected[0]} for g in got] == expected
    assert {g["sample_id"] for g in got} == {sid}
    r = receipts[0]
    data = base64.b64decode(r["member"]["members"])
    for bad in ({**r, "member": {**r["member"], "members": base64.b64encode(data[:-1]).decode()}},
                {**r, "member": {**r["member"], "index": 10 ** 6}},
                {**r, "member": {"index": 0}}):
        with pytest.raises(ReceiptError):
            verify_member_receipt(bad)
    neighbour = {**r, "member": {**r["member"], "index": (r["member"]["index"] + 1) % 2}}
    assert verify_member_receipt(neighbour)["sample_id"] != sid  # the bytes name one sample per index


def test_real_receipts_and_consistency_verify_in_go(digits_home, capsys):
    """fgtrac's receipts and consistency proofs from a pipeline run verify with Go's sumdb/note and sumdb/tlog."""
    from tests.interop.build import go_unavailable_reason, go_verify

    if go_unavailable_reason():
        pytest.skip(go_unavailable_reason())
    ledger = Ledger(digits_home)
    key = ledger.keystore.current_verifier_key(ledger.origin)
    receipts = proofs.sample_receipts(ledger, trained_sample(digits_home)["sample_id"])
    proc = go_verify("receipt", receipts, key=key)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr
    bad = copy.deepcopy(receipts[0])
    bad["leaf_index"] += 1
    assert go_verify("receipt", bad, key=key).returncode == 1
    forged = copy.deepcopy(next(r for r in receipts if "member" in r))  # a step's members bytes, changed
    data = bytearray(base64.b64decode(forged["member"]["members"]))
    data[-1] ^= 1
    forged["member"]["members"] = base64.b64encode(bytes(data)).decode()
    proc = go_verify("receipt", forged, key=key)
    assert proc.returncode == 1 and "members digest" in proc.stdout, proc.stdout
    sizes = [r["size"] for r in ledger.query("SELECT size FROM tree_heads ORDER BY size").to_pylist()]
    for old in sizes[:-1]:
        doc = proofs.consistency(ledger, old, sizes[-1])
        proc = go_verify("consistency", doc, key=key)
        assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr
