"""Receipts and consistency proofs built from fgtrac's integrity primitives verify with Go's
golang.org/x/mod/sumdb/note + sumdb/tlog (tests/interop/verify_receipt.go), and tampered ones do not.

The receipts are assembled here from merkle/notes/canonical only, so this test does not depend on
fgtrac's receipt code; tests of `fgtrac prove` can reuse ``go_verify`` to check real output.
"""

import base64
import copy
import json
import random
import subprocess

import pytest

from fgtrac_assets.integrity import merkle, notes
from fgtrac_assets.integrity.canonical import canonical_json
from tests.interop.build import (
    EXIT_NOTHING,
    EXIT_OK,
    EXIT_REJECTED,
    go_unavailable_reason,
    go_verify,
    verifier_binary,
)

__all__ = ["go_verify"]  # re-exported for other tests

ORIGIN = "fgtrac.test/go-interop"
N_LEAVES = 1000
# Checkpoint sizes: powers of two, their neighbours and other non-powers of two.
SIZES = [1, 2, 3, 5, 7, 8, 9, 13, 64, 100, 255, 256, 257, 511, 512, 513, 777, 999, 1000]
CONSISTENCY_PAIRS = [
    (1, 1), (1, 2), (1, 1000), (2, 5), (3, 7), (5, 8), (7, 8), (8, 9), (8, 13), (13, 64),
    (64, 100), (100, 777), (255, 256), (256, 257), (511, 512), (512, 513), (513, 1000),
    (777, 999), (999, 1000), (1000, 1000),
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@pytest.fixture(scope="session")
def go_verifier(tmp_path_factory):
    """The Go verifier, built once per session into a tmp dir (skips if go or x/mod is missing)."""
    reason = go_unavailable_reason()
    if reason:
        pytest.skip(f"Go interop verifier unavailable: {reason}")
    return verifier_binary(tmp_path_factory.mktemp("gover"))


class Log:
    """A log of N_LEAVES canonical-JSON leaves with signed checkpoints at every size in SIZES."""

    def __init__(self):
        self.signer = notes.generate_signer(ORIGIN)
        self.other = notes.generate_signer(ORIGIN)  # same name, different key
        self.leaves = [
            canonical_json({"seq": i, "sample_id": f"digits/{i:05d}", "event": "ingested",
                            "label": i % 10, "note": "ünïcödé" if i % 97 == 0 else None})
            for i in range(N_LEAVES)
        ]
        self.roots = {n: merkle.merkle_root(self.leaves[:n]) for n in set(SIZES) | {0}}
        self.checkpoints = {n: self.sign(n) for n in self.roots}

    def sign(self, size, root=None, signer=None, origin=ORIGIN):
        root = self.roots[size] if root is None else root
        return (signer or self.signer).sign(notes.format_checkpoint(origin, size, root))

    def receipt(self, index, size):
        return {
            "leaf": b64(self.leaves[index]),
            "leaf_index": index,
            "tree_size": size,
            "inclusion_proof": [b64(h) for h in merkle.inclusion_proof(self.leaves[:size], index)],
            "checkpoint": self.checkpoints[size],
            "verifier_key": self.signer.verifier_key,
        }

    def consistency(self, old, new):
        return {
            "old_checkpoint": self.checkpoints[old],
            "new_checkpoint": self.checkpoints[new],
            "proof": [b64(h) for h in merkle.consistency_proof(self.leaves[:new], old)],
            "verifier_key": self.signer.verifier_key,
        }


@pytest.fixture(scope="module")
def log():
    return Log()


def sample_indices(size, rng):
    picks = {0, size - 1, size // 2, (size - 1) // 3}
    picks |= {(1 << k) - d for k in range(11) for d in (0, 1) if 0 <= (1 << k) - d < size}
    picks |= {rng.randrange(size) for _ in range(3)}
    return sorted(picks)


def assert_ok(proc):
    assert proc.returncode == EXIT_OK and proc.stdout.strip() == "OK", (
        f"Go rejected: rc={proc.returncode} stdout={proc.stdout!r} stderr={proc.stderr!r}")


def assert_rejected(proc, *fragments):
    assert proc.returncode == EXIT_REJECTED, (
        f"Go did not reject: rc={proc.returncode} stdout={proc.stdout!r} stderr={proc.stderr!r}")
    line = proc.stdout.strip()
    assert line and "\n" not in line, f"want a one-line reason, got {proc.stdout!r}"
    for fragment in fragments:
        assert fragment in line, line


# --- RFC 6962 proof order ----------------------------------------------------------

# RFC 6962 vectors (transparency-dev/merkle, as in tests/integrity/test_merkle.py).
RFC_LEAVES = [bytes.fromhex(h) for h in
              ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]]
RFC_ROOTS = {
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
# (index, size, audit path leaf upward), verbatim from the vectors.
RFC_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
RFC_CONSISTENCY = [
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]


def _rfc_checkpoint(signer, size):
    return signer.sign(notes.format_checkpoint("rfc6962.vectors", size, bytes.fromhex(RFC_ROOTS[size])))


def test_tlog_proof_order_is_rfc6962_on_published_vectors(go_verifier):
    """tlog.RecordProof / TreeProof are RFC 6962 PATH / PROOF order: deepest sibling first, leaf upward."""
    signer = notes.generate_signer("rfc6962.vectors")
    receipts, reversed_receipts = [], []
    for index, size, path in RFC_INCLUSION:
        r = {"leaf": b64(RFC_LEAVES[index]), "leaf_index": index, "tree_size": size,
             "inclusion_proof": [b64(bytes.fromhex(h)) for h in path],
             "checkpoint": _rfc_checkpoint(signer, size), "verifier_key": signer.verifier_key}
        receipts.append(r)
        if len(path) > 1:
            reversed_receipts.append(dict(r, inclusion_proof=r["inclusion_proof"][::-1]))
    assert_ok(go_verify("receipt", receipts))
    for r in reversed_receipts:
        assert_rejected(go_verify("receipt", r))

    proofs, reversed_proofs = [], []
    for old, new, path in RFC_CONSISTENCY:
        c = {"old_checkpoint": _rfc_checkpoint(signer, old), "new_checkpoint": _rfc_checkpoint(signer, new),
             "proof": [b64(bytes.fromhex(h)) for h in path], "verifier_key": signer.verifier_key}
        proofs.append(c)
        reversed_proofs.append(dict(c, proof=c["proof"][::-1]))
    assert_ok(go_verify("consistency", proofs))
    for c in reversed_proofs:
        assert_rejected(go_verify("consistency", c))


# --- inclusion receipts --------------------------------------------------------------


def test_receipts_verify_in_go(go_verifier, log):
    rng = random.Random(6962)
    receipts = [log.receipt(i, n) for n in SIZES for i in sample_indices(n, rng)]
    assert len(receipts) > 150
    assert {0, N_LEAVES - 1} <= {r["leaf_index"] for r in receipts}
    # Python's own verifier agrees before we ask Go (a failure here is not an interop problem).
    for r in receipts:
        assert merkle.verify_inclusion(unb64(r["leaf"]), r["leaf_index"], r["tree_size"],
                                       [unb64(h) for h in r["inclusion_proof"]], log.roots[r["tree_size"]])
    assert_ok(go_verify("receipt", receipts))
    # Single objects, and the trusted key given on the command line, work as well.
    assert_ok(go_verify("receipt", receipts[0]))
    assert_ok(go_verify("receipt", receipts[-1], key=log.signer.verifier_key))


def _flip(b64_text, pos=0):
    raw = bytearray(unb64(b64_text))
    raw[pos % len(raw)] ^= 0x01
    return b64(bytes(raw))


def _edit_body(checkpoint, old, new):
    body, sep, sig = checkpoint.partition("\n\n")
    assert old in body
    return body.replace(old, new, 1) + sep + sig


TAMPERS = {
    "leaf byte": lambda r, log: r.update(leaf=_flip(r["leaf"], 7)),
    "leaf of neighbour": lambda r, log: r.update(leaf=b64(log.leaves[r["leaf_index"] + 1])),
    "leaf empty": lambda r, log: r.update(leaf=""),
    "leaf not base64": lambda r, log: r.update(leaf="%%%"),
    "proof first element": lambda r, log: r["inclusion_proof"].__setitem__(0, _flip(r["inclusion_proof"][0])),
    "proof last element": lambda r, log: r["inclusion_proof"].__setitem__(-1, _flip(r["inclusion_proof"][-1], 31)),
    "proof element truncated": lambda r, log: r["inclusion_proof"].__setitem__(2, b64(unb64(r["inclusion_proof"][2])[:31])),
    "proof element dropped": lambda r, log: r["inclusion_proof"].pop(),
    "proof element added": lambda r, log: r["inclusion_proof"].append(b64(bytes(32))),
    "proof reversed": lambda r, log: r["inclusion_proof"].reverse(),
    "proof empty": lambda r, log: r["inclusion_proof"].clear(),
    "leaf_index + 1": lambda r, log: r.update(leaf_index=r["leaf_index"] + 1),
    "leaf_index - 1": lambda r, log: r.update(leaf_index=r["leaf_index"] - 1),
    "leaf_index = tree_size": lambda r, log: r.update(leaf_index=r["tree_size"]),
    "leaf_index negative": lambda r, log: r.update(leaf_index=-1),
    "tree_size + 1": lambda r, log: r.update(tree_size=r["tree_size"] + 1),
    "tree_size - 1": lambda r, log: r.update(tree_size=r["tree_size"] - 1),
    "checkpoint size line": lambda r, log: r.update(checkpoint=_edit_body(r["checkpoint"], "\n777\n", "\n778\n")),
    "checkpoint size and tree_size": lambda r, log: r.update(
        tree_size=778, checkpoint=_edit_body(r["checkpoint"], "\n777\n", "\n778\n")),
    "checkpoint root": lambda r, log: r.update(checkpoint=_edit_body(
        r["checkpoint"], b64(log.roots[777]), b64(log.roots[1000]))),
    "checkpoint origin": lambda r, log: r.update(checkpoint=_edit_body(r["checkpoint"], ORIGIN, ORIGIN + "x")),
    "checkpoint signature": lambda r, log: r.update(checkpoint=r["checkpoint"][:-6] + (
        "AAAAA\n" if r["checkpoint"][-6:] != "AAAAA\n" else "BBBBB\n")),
    "checkpoint unsigned": lambda r, log: r.update(checkpoint=r["checkpoint"].partition("\n\n")[0] + "\n"),
    "checkpoint re-signed with wrong root": lambda r, log: r.update(checkpoint=log.sign(777, log.roots[1000])),
    "checkpoint signed by other key": lambda r, log: r.update(checkpoint=log.sign(777, signer=log.other)),
    "verifier_key of other key": lambda r, log: r.update(verifier_key=log.other.verifier_key),
    "verifier_key missing": lambda r, log: r.pop("verifier_key"),
    "inclusion_proof missing": lambda r, log: r.pop("inclusion_proof"),
    "leaf_index as string": lambda r, log: r.update(leaf_index=str(r["leaf_index"])),
    "kind inclusion still checked": lambda r, log: r.update(kind="inclusion", leaf=_flip(r["leaf"])),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_receipt_rejected_by_go(go_verifier, log, tamper):
    good = log.receipt(345, 777)
    assert len(good["inclusion_proof"]) == 10
    assert_ok(go_verify("receipt", good))
    bad = copy.deepcopy(good)
    TAMPERS[tamper](bad, log)
    assert bad != good
    assert_rejected(go_verify("receipt", bad))
    # One bad receipt fails a whole list, and the reason names it.
    assert_rejected(go_verify("receipt", [good, bad, good]), "receipt 1")


def test_trusted_key_replaces_receipts_own(go_verifier, log):
    good = log.receipt(0, 513)
    assert_ok(go_verify("receipt", good, key=log.signer.verifier_key))
    assert_rejected(go_verify("receipt", good, key=log.other.verifier_key))
    # The receipt cannot vouch for itself: claiming the right key does not help under another trusted key,
    # and a wrong own key does not matter under the right trusted key.
    assert_ok(go_verify("receipt", dict(good, verifier_key=log.other.verifier_key), key=log.signer.verifier_key))
    forged = dict(good, checkpoint=log.sign(513, signer=log.other), verifier_key=log.other.verifier_key)
    assert_ok(go_verify("receipt", forged))  # self-consistent, but ...
    assert_rejected(go_verify("receipt", forged, key=log.signer.verifier_key))  # ... not under the trusted key
    assert go_verify("receipt", good, key="not-a-key").returncode == 2


def test_other_kinds_are_skipped_not_verified(go_verifier, log):
    good = log.receipt(3, 8)
    absent = {"kind": "absent", "sample_id": "digits/99999", "whatever": [1, 2]}
    proc = go_verify("receipt", [absent, good])
    assert_ok(proc)
    assert "skipped receipt 0" in proc.stderr and "absent" in proc.stderr
    only_skipped = go_verify("receipt", [absent])
    assert only_skipped.returncode == EXIT_NOTHING and "skipped" in only_skipped.stderr
    assert go_verify("receipt", []).returncode == EXIT_NOTHING


def test_cli_reads_a_file_argument(go_verifier, log, tmp_path):
    path = tmp_path / "receipts.json"
    path.write_text(json.dumps([log.receipt(0, 1), log.receipt(998, 999)]))
    proc = subprocess.run([str(go_verifier), "receipt", str(path), "-key", log.signer.verifier_key],
                          capture_output=True, text=True, timeout=60)
    assert_ok(proc)
    usage = subprocess.run([str(go_verifier), "prove", str(path)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_malformed_input_rejected(go_verifier, log):
    assert_rejected(go_verify("receipt", "not json"))
    assert_rejected(go_verify("receipt", "[1, 2]"))
    assert_rejected(go_verify("receipt", '{"leaf": ""} {}'))
    assert_rejected(go_verify("consistency", {"proof": []}))


# --- consistency proofs --------------------------------------------------------------


def test_consistency_proofs_verify_in_go(go_verifier, log):
    proofs = [log.consistency(old, new) for old, new in CONSISTENCY_PAIRS]
    for (old, new), c in zip(CONSISTENCY_PAIRS, proofs):
        assert merkle.verify_consistency(old, new, log.roots[old], log.roots[new], [unb64(h) for h in c["proof"]])
    assert_ok(go_verify("consistency", proofs))
    assert_ok(go_verify("consistency", proofs[3], key=log.signer.verifier_key))
    # From the empty tree (tlog.CheckTree itself takes sizes >= 1; the verifier handles 0 per RFC 9162).
    assert_ok(go_verify("consistency", log.consistency(0, 777)))
    assert_rejected(go_verify("consistency", dict(log.consistency(0, 777), proof=[b64(log.roots[777])])))


CONSISTENCY_TAMPERS = {
    "proof element": lambda c, log: c["proof"].__setitem__(1, _flip(c["proof"][1])),
    "proof element dropped": lambda c, log: c["proof"].pop(0),
    "proof element added": lambda c, log: c["proof"].append(c["proof"][0]),
    "proof reversed": lambda c, log: c["proof"].reverse(),
    "proof empty": lambda c, log: c["proof"].clear(),
    "checkpoints swapped": lambda c, log: c.update(old_checkpoint=c["new_checkpoint"],
                                                   new_checkpoint=c["old_checkpoint"]),
    "old checkpoint of another size": lambda c, log: c.update(old_checkpoint=log.checkpoints[512]),
    "new checkpoint of another size": lambda c, log: c.update(new_checkpoint=log.checkpoints[999]),
    "old root re-signed": lambda c, log: c.update(old_checkpoint=log.sign(100, log.roots[64])),
    "new root re-signed": lambda c, log: c.update(new_checkpoint=log.sign(777, log.roots[999])),
    "old checkpoint text edited": lambda c, log: c.update(old_checkpoint=_edit_body(c["old_checkpoint"], "\n100\n", "\n101\n")),
    "new checkpoint from other origin": lambda c, log: c.update(new_checkpoint=log.sign(777, origin=ORIGIN + ".fork")),
    "old checkpoint signed by other key": lambda c, log: c.update(old_checkpoint=log.sign(100, signer=log.other)),
    "verifier_key of other key": lambda c, log: c.update(verifier_key=log.other.verifier_key),
    "old_size claimed wrong": lambda c, log: c.update(old_size=101),
}


@pytest.mark.parametrize("tamper", sorted(CONSISTENCY_TAMPERS))
def test_tampered_consistency_rejected_by_go(go_verifier, log, tamper):
    good = log.consistency(100, 777)
    assert len(good["proof"]) >= 3
    assert_ok(go_verify("consistency", dict(good, old_size=100, new_size=777)))
    bad = copy.deepcopy(good)
    CONSISTENCY_TAMPERS[tamper](bad, log)
    assert bad != good
    assert_rejected(go_verify("consistency", bad))
    assert_rejected(go_verify("consistency", [good, bad]), "consistency 1")
