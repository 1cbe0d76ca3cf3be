"""C2SP tlog-proof@v1: the exact text format, parsing, and verification (log signature, origin, witness hook, inclusion)."""

import base64
import random

import pytest

from fgtrac_assets.integrity import merkle, notes
from fgtrac_assets.integrity.tlog_proof import (HEADER, TlogProof, TlogProofError, format_tlog_proof,
                                                parse_tlog_proof, verify_tlog_proof)

ORIGIN = "fgtrac.test/tlog-proof"
LEAVES = [f'{{"i":{i},"table":"samples"}}'.encode() for i in range(300)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def log():
    signer = notes.generate_signer(ORIGIN)
    return signer, {n: signer.sign(notes.format_checkpoint(ORIGIN, n, merkle.merkle_root(LEAVES[:n])))
                    for n in (1, 2, 3, 7, 8, 9, 255, 256, 257, 300)}


def proof_text(log, index, size, extra=None):
    signer, checkpoints = log
    return format_tlog_proof(index, merkle.inclusion_proof(LEAVES[:size], index), checkpoints[size], extra)


def test_format_is_the_specs_layout(log):
    signer, checkpoints = log
    proof = merkle.inclusion_proof(LEAVES[:257], 100)
    text = format_tlog_proof(100, proof, checkpoints[257], extra=b"age-v1.2.1")
    assert text == (f"{HEADER}\nextra {b64(b'age-v1.2.1')}\nindex 100\n" + "".join(b64(h) + "\n" for h in proof)
                    + "\n" + checkpoints[257])
    assert text.startswith("c2sp.org/tlog-proof@v1\nextra YWdlLXYxLjIuMQ==\nindex 100\n")
    # no extra line without extra data; a one-leaf tree has no proof hashes at all
    assert format_tlog_proof(0, [], checkpoints[1]) == f"{HEADER}\nindex 0\n\n{checkpoints[1]}"


def test_parse_round_trips(log):
    signer, checkpoints = log
    for extra in (None, b"\x00\xffopaque"):
        text = proof_text(log, 255, 300, extra)
        parsed = parse_tlog_proof(text)
        assert parsed == TlogProof(255, tuple(merkle.inclusion_proof(LEAVES[:300], 255)), checkpoints[300], extra)
        assert format_tlog_proof(parsed.index, parsed.proof, parsed.checkpoint, parsed.extra) == text
        assert parse_tlog_proof(text.encode()) == parsed


def test_verifies_every_index_of_several_sizes(log):
    signer, checkpoints = log
    rng = random.Random(6962)
    for size in checkpoints:
        for index in {0, size - 1, size // 2, rng.randrange(size)}:
            got_index, cp = verify_tlog_proof(proof_text(log, index, size), LEAVES[index], [signer.verifier])
            assert (got_index, cp.size, cp.origin) == (index, size, ORIGIN)
            assert cp.root == merkle.merkle_root(LEAVES[:size])
    # verifier keys may be given as strings, and the origin may be pinned
    assert verify_tlog_proof(proof_text(log, 3, 9), LEAVES[3], [signer.verifier_key], origin=ORIGIN)[0] == 3


def _edit_note(text, old, new):
    head, sep, note = text.partition("\n\n")
    body, sep2, sigs = note.partition("\n\n")
    assert old in body
    return head + sep + body.replace(old, new, 1) + sep2 + sigs


TAMPERS = {
    "index + 1": lambda t: t.replace("index 100\n", "index 101\n"),
    "index - 1": lambda t: t.replace("index 100\n", "index 99\n"),
    "index beyond size": lambda t: t.replace("index 100\n", "index 257\n"),
    "first proof hash flipped": lambda t: t.replace(t.split("\n")[2], b64(bytes(32)), 1),
    "proof hash dropped": lambda t: t.replace(t.split("\n")[3] + "\n", "", 1),
    "proof hash added": lambda t: t.replace("\n\n", "\n" + b64(bytes(32)) + "\n\n", 1),
    "checkpoint size edited": lambda t: _edit_note(t, "\n257\n", "\n258\n"),
    "checkpoint origin edited": lambda t: _edit_note(t, ORIGIN + "\n", ORIGIN + "x\n"),
    "signature line removed": lambda t: t[:t.rindex("\u2014 ")],
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_proof_rejected(log, tamper):
    signer, _ = log
    good = proof_text(log, 100, 257)
    verify_tlog_proof(good, LEAVES[100], [signer.verifier])
    bad = TAMPERS[tamper](good)
    assert bad != good
    with pytest.raises(TlogProofError):
        verify_tlog_proof(bad, LEAVES[100], [signer.verifier])


def test_wrong_leaf_or_wrong_key_rejected(log):
    signer, checkpoints = log
    good = proof_text(log, 100, 257)
    with pytest.raises(TlogProofError, match="inclusion proof"):
        verify_tlog_proof(good, LEAVES[101], [signer.verifier])
    with pytest.raises(TlogProofError, match="no verifiable signatures"):
        verify_tlog_proof(good, LEAVES[100], [notes.generate_signer(ORIGIN).verifier])
    # a key named for another origin is not configured for this checkpoint's
    with pytest.raises(TlogProofError, match="no log key is configured"):
        verify_tlog_proof(good, LEAVES[100], [notes.Verifier("other.example/log", signer._private.public_key())])
    with pytest.raises(TlogProofError, match="not the expected"):
        verify_tlog_proof(good, LEAVES[100], [signer.verifier], origin="other.example/log")
    # re-signed by another key with a root over other leaves: the signature check fails first
    forged = format_tlog_proof(100, merkle.inclusion_proof(LEAVES[:257], 100),
                               notes.generate_signer(ORIGIN).sign(notes.format_checkpoint(ORIGIN, 257, bytes(32))))
    with pytest.raises(TlogProofError, match="checkpoint"):
        verify_tlog_proof(forged, LEAVES[100], [signer.verifier])


def test_cosignatures_are_kept_and_the_witness_hook_decides(log):
    signer, checkpoints = log
    witness = notes.generate_signer("witness.example/w1")
    cosigned = checkpoints[257] + witness.sign(checkpoints[257].partition("\n\n")[0] + "\n").rpartition("\n\n")[2]
    assert cosigned.count("\u2014 ") == 2
    text = format_tlog_proof(100, merkle.inclusion_proof(LEAVES[:257], 100), cosigned)
    seen = []
    verify_tlog_proof(text, LEAVES[100], [signer.verifier], witness_check=seen.append)
    assert seen == [cosigned]  # the whole signed note, every cosignature line included

    def reject(note):
        raise ValueError("quorum 2 of 3 not met")

    with pytest.raises(ValueError, match="quorum"):
        verify_tlog_proof(text, LEAVES[100], [signer.verifier], witness_check=reject)
    with pytest.raises(TlogProofError, match="witness policy"):
        verify_tlog_proof(text, LEAVES[100], [signer.verifier], witness_check=lambda note: False)


MALFORMED = {
    "no header": lambda t: t.split("\n", 1)[1],
    "other version": lambda t: t.replace("@v1", "@v2", 1),
    "index with leading zero": lambda t: t.replace("index 100", "index 0100"),
    "index negative": lambda t: t.replace("index 100", "index -1"),
    "index missing": lambda t: t.replace("index 100\n", ""),
    "extra after index": lambda t: t.replace("index 100\n", "index 100\nextra AAAA\n"),
    "extra not base64": lambda t: t.replace(HEADER + "\n", HEADER + "\nextra %%%\n"),
    "hash not canonical base64": lambda t: t.replace(t.split("\n")[2], t.split("\n")[2][:-2] + "B="),
    "hash of 31 bytes": lambda t: t.replace(t.split("\n")[2], b64(bytes(31))),
    "no empty line": lambda t: t.replace("\n\n", "\n", 1),
    "checkpoint not a signed note": lambda t: t.partition("\n\n")[0] + "\n\nexample.com/log\n1\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_proof_rejected_with_a_reason(log, case):
    signer, _ = log
    bad = MALFORMED[case](proof_text(log, 100, 257))
    with pytest.raises(TlogProofError) as exc:
        verify_tlog_proof(bad, LEAVES[100], [signer.verifier])
    assert isinstance(exc.value, ValueError) and "\n" not in str(exc.value)


def test_go_verifies_tlog_proofs(log, tmp_path):
    """Go's x/mod (tests/interop/read_tiles.go `proof`) accepts our tlog-proofs and rejects a changed leaf."""
    from tests.interop.build import go_read_tiles, go_unavailable_reason, tiles_reader_binary

    if go_unavailable_reason():
        pytest.skip(f"Go unavailable: {go_unavailable_reason()}")
    tiles_reader_binary(tmp_path / "go")
    signer, checkpoints = log
    for size in (1, 9, 256, 257, 300):
        for index in {0, size // 3, size - 1}:
            proof, leaf = tmp_path / f"{size}-{index}.tlog-proof", tmp_path / f"{size}-{index}.leaf"
            proof.write_text(proof_text(log, index, size, extra=b"x" if index % 2 else None))
            leaf.write_bytes(LEAVES[index])
            proc = go_read_tiles("proof", proof, leaf, key=signer.verifier_key)
            assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout + proc.stderr
    leaf.write_bytes(LEAVES[0] + b" ")
    proc = go_read_tiles("proof", proof, leaf, key=signer.verifier_key)
    assert proc.returncode == 1 and proc.stdout.startswith("FAIL inclusion"), proc.stdout + proc.stderr
