import base64
import os
import stat

import pytest

from fgtrac_assets.integrity.notes import (
    KeyStore,
    NoteError,
    format_checkpoint,
    generate_signer,
    open_note,
    parse_checkpoint,
    parse_verifier_key,
    signer_from_key,
)

# Reference vectors from golang.org/x/mod/sumdb/note (repo golang/mod,
# sumdb/note/note.go package docs and note_test.go TestSign / TestOpen).
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
ENOCH_SIG = "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"

ROOT = bytes(range(32))


# --- Go reference vectors ------------------------------------------------------


def test_go_signer_key_gives_go_verifier_key():
    signer = signer_from_key(PETER_SKEY)
    assert signer.name == "PeterNeumann"
    assert signer.key_id == 0xC74F20A3
    assert signer.verifier_key == PETER_VKEY
    assert signer.signer_key == PETER_SKEY


def test_go_verifier_key_parses():
    v = parse_verifier_key(PETER_VKEY)
    assert (v.name, v.key_id, v.verifier_key) == ("PeterNeumann", 0xC74F20A3, PETER_VKEY)
    assert parse_verifier_key(ENOCH_VKEY).key_id == 0xAF0CFE78


def test_signature_reproduces_go_vector():
    assert signer_from_key(PETER_SKEY).sign(TEXT) == TEXT + "\n" + PETER_SIG


def test_open_go_vectors():
    peter, enoch = parse_verifier_key(PETER_VKEY), parse_verifier_key(ENOCH_VKEY)
    both = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert open_note(both, [peter]) == TEXT
    assert open_note(both, [enoch]) == TEXT
    assert open_note(both, [peter, enoch]) == TEXT
    assert open_note(both.encode(), [peter]) == TEXT
    with pytest.raises(NoteError, match="no verifiable signatures"):
        open_note(both, [])
    # Repeated identical signatures are ignored, as in Go.
    assert open_note(TEXT + "\n" + PETER_SIG * 3, [peter]) == TEXT
    bad_enoch = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    assert open_note(TEXT + "\n" + PETER_SIG * 2 + ENOCH_SIG * 2 + bad_enoch, [peter]) == TEXT
    with pytest.raises(NoteError, match="^invalid signature for key PeterNeumann\\+c74f20a3$"):
        open_note(TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:], [peter])


def test_go_verifier_key_manglings_rejected():
    b = PETER_VKEY
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if i != 0 or j != len(b):
                with pytest.raises(ValueError):
                    parse_verifier_key(b[i:j])
    for i in range(len(b)):
        with pytest.raises(ValueError):
            parse_verifier_key(b[:i] + chr(ord(b[i]) + 1) + b[i + 1:])
    with pytest.raises(ValueError):  # wrong key length, with adjusted key hash
        parse_verifier_key("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")
    with pytest.raises(ValueError):  # unknown algorithm, with adjusted key hash
        parse_verifier_key("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


def test_go_signer_key_manglings_rejected():
    b = PETER_SKEY
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if i != 0 or j != len(b):
                with pytest.raises(ValueError):
                    signer_from_key(b[i:j])
    for i in range(len(b)):
        with pytest.raises(ValueError):
            signer_from_key(b[:i] + chr(ord(b[i]) + 1) + b[i + 1:])


# --- round trips and rejection -------------------------------------------------


def test_round_trip_checkpoint():
    signer = generate_signer("fgtrac.example/log")
    text = format_checkpoint("fgtrac.example/log", 42, ROOT)
    assert text == f"fgtrac.example/log\n42\n{base64.b64encode(ROOT).decode()}\n"
    note = signer.sign(text)
    verifier = parse_verifier_key(signer.verifier_key)
    opened = open_note(note, [verifier])
    assert opened == text
    cp = parse_checkpoint(opened)
    assert (cp.origin, cp.size, cp.root) == ("fgtrac.example/log", 42, ROOT)
    assert signer_from_key(signer.signer_key).sign(text) == note


def test_tampered_text_rejected():
    signer = generate_signer("log")
    note = signer.sign(format_checkpoint("log", 5, ROOT))
    with pytest.raises(NoteError, match="invalid signature for key log\\+"):
        open_note(note.replace("\n5\n", "\n6\n"), [signer.verifier])


def test_tampered_signature_rejected():
    signer = generate_signer("log")
    note = signer.sign(format_checkpoint("log", 5, ROOT))
    text, _, sigline = note.rpartition("\n\n")
    name, b64 = sigline.rstrip("\n").split(" ")[1:]
    raw = bytearray(base64.b64decode(b64))
    raw[10] ^= 1
    bad = f"{text}\n\n— {name} {base64.b64encode(bytes(raw)).decode()}\n"
    with pytest.raises(NoteError, match="invalid signature"):
        open_note(bad, [signer.verifier])
    # Go behaviour: a bad signature from a known key fails even if another verifies.
    with pytest.raises(NoteError, match="invalid signature"):
        open_note(bad + signer.sign(text + "\n").rpartition("\n\n")[2], [signer.verifier])


def test_other_key_rejected():
    signer, other = generate_signer("log"), generate_signer("log")
    note = signer.sign("hello\n")
    with pytest.raises(NoteError, match="no verifiable signatures .*unknown keys: log\\+"):
        open_note(note, [other.verifier])
    # Same key id under another name is a different key too.
    with pytest.raises(NoteError, match="no verifiable signatures"):
        open_note(note.replace("— log ", "— gol "), [signer.verifier])


def test_duplicate_identical_verifiers_accepted():
    peter = parse_verifier_key(PETER_VKEY)
    assert open_note(TEXT + "\n" + PETER_SIG, [peter, parse_verifier_key(PETER_VKEY)]) == TEXT


@pytest.mark.parametrize("msg", [
    TEXT,
    TEXT + "\n",
    TEXT + "\n" + PETER_SIG[:-1],
    "\x01" + TEXT + "\n" + PETER_SIG,
    TEXT + "\n" + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
    TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    TEXT + "\n" + PETER_SIG * 101,
    TEXT + "\n" + "- PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n",
    TEXT + "\n" + "— PeterNeumann AAAA\n",
    TEXT + "\n" + "— PeterNeumann not*base64\n",
])
def test_malformed_notes_rejected(msg):
    with pytest.raises(NoteError, match="malformed note"):
        open_note(msg, [parse_verifier_key(PETER_VKEY)])


def test_invalid_utf8_rejected():
    with pytest.raises(NoteError, match="malformed"):
        open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), [parse_verifier_key(PETER_VKEY)])


def test_sign_rejects_bad_text():
    signer = generate_signer("log")
    with pytest.raises(ValueError):
        signer.sign("no newline")
    with pytest.raises(ValueError):
        signer.sign("tab\there\n")


def test_verifier_verify_raw():
    signer = signer_from_key(PETER_SKEY)
    sig = base64.b64decode(PETER_SIG.split(" ")[2])[4:]
    v = parse_verifier_key(PETER_VKEY)
    assert v.verify(TEXT, sig)
    assert v.verify(TEXT.encode(), sig)
    assert not v.verify(TEXT + "x", sig)
    assert not v.verify(TEXT, sig[:-1])
    assert signer.verifier.verifier_key == PETER_VKEY


def test_repr_hides_private_key():
    signer = signer_from_key(PETER_SKEY)
    seed_b64 = PETER_SKEY.rsplit("+", 1)[1]
    for s in (repr(signer), str(signer), f"{signer}", repr([signer])):
        assert seed_b64 not in s and "PRIVATE" not in s
        assert "PeterNeumann" in s and "c74f20a3" in s


# --- checkpoints -----------------------------------------------------------------


def test_checkpoint_parse_ignores_extension_lines():
    text = format_checkpoint("o", 0, ROOT) + "ext line\n"
    assert parse_checkpoint(text).size == 0


@pytest.mark.parametrize("text,reason", [
    ("o\n1\n" + base64.b64encode(ROOT).decode(), "newline"),
    ("o\n1\n", "at least 3 lines"),
    ("\n1\n" + base64.b64encode(ROOT).decode() + "\n", "origin"),
    ("o\n01\n" + base64.b64encode(ROOT).decode() + "\n", "tree size"),
    ("o\n-1\n" + base64.b64encode(ROOT).decode() + "\n", "tree size"),
    ("o\n 1\n" + base64.b64encode(ROOT).decode() + "\n", "tree size"),
    ("o\n1\n" + base64.b64encode(ROOT[:31]).decode() + "\n", "root hash"),
    ("o\n1\nnot base64!\n", "root hash"),
    ("o\n1\n" + base64.b64encode(ROOT).decode() + "\n\n— x AAAA\n", "blank line"),
])
def test_checkpoint_parse_errors(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_checkpoint(text)


def test_format_checkpoint_rejects_bad_input():
    for args in [("", 1, ROOT), ("a\nb", 1, ROOT), ("o", -1, ROOT), ("o", 1, ROOT[:5])]:
        with pytest.raises(ValueError):
            format_checkpoint(*args)


# --- key store -----------------------------------------------------------------


def test_keystore_creates_private_file_0600(tmp_path):
    store = KeyStore(tmp_path / "keys")
    signer = store.load_or_create("fgtrac-log")
    key_file = tmp_path / "keys" / "fgtrac-log.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) & 0o077 == 0
    assert key_file.read_text().strip() == signer.signer_key
    assert (tmp_path / "keys" / "fgtrac-log.vkey").read_text().strip() == signer.verifier_key
    again = KeyStore(tmp_path / "keys").load_or_create("fgtrac-log")
    assert again.signer_key == signer.signer_key


def test_keystore_keeps_rotated_verifier_keys(tmp_path):
    store = KeyStore(tmp_path)
    old = store.load_or_create("log")
    (tmp_path / "log.key").rename(tmp_path / "log-2024.key")
    (tmp_path / "log.vkey").rename(tmp_path / "log-2024.vkey")
    new = store.load_or_create("log")
    assert new.key_id != old.key_id
    assert sorted(store.verifier_keys()) == sorted([old.verifier_key, new.verifier_key])
    note = old.sign("old checkpoint\n")
    assert open_note(note, store.verifiers()) == "old checkpoint\n"


def test_keystore_malformed_key_file(tmp_path):
    (tmp_path / "log.key").write_text("PRIVATE+KEY+log+00000000+AAAA\n")
    with pytest.raises(ValueError, match="malformed signer key file .*log.key"):
        KeyStore(tmp_path).load_or_create("log")


def test_keystore_unreadable_key_file(tmp_path):
    (tmp_path / "log.key").mkdir()  # exists but cannot be read as a file
    with pytest.raises(ValueError, match="cannot read signer key file .*log.key"):
        KeyStore(tmp_path).load_or_create("log")


def test_keystore_error_does_not_leak_key(tmp_path):
    skey = PETER_SKEY.replace("PeterNeumann", "log")  # wrong key id for this name
    (tmp_path / "log.key").write_text(skey)
    with pytest.raises(ValueError) as info:
        KeyStore(tmp_path).load_or_create("log")
    assert skey.rsplit("+", 1)[1] not in str(info.value)


def test_keystore_name_mismatch_and_bad_names(tmp_path):
    (tmp_path / "log.key").write_text(PETER_SKEY + "\n")
    with pytest.raises(ValueError, match="PeterNeumann"):
        KeyStore(tmp_path).load_or_create("log")
    for bad in ["", "a b", "a+b", "../x", ".hidden"]:
        with pytest.raises(ValueError):
            KeyStore(tmp_path).load_or_create(bad)


def test_keystore_mismatched_vkey(tmp_path):
    store = KeyStore(tmp_path)
    store.load_or_create("log")
    (tmp_path / "log.vkey").write_text(PETER_VKEY + "\n")
    with pytest.raises(ValueError, match="log.vkey does not match"):
        store.load_or_create("log")


def test_keystore_missing_directory(tmp_path):
    assert KeyStore(tmp_path / "nope").verifier_keys() == []
