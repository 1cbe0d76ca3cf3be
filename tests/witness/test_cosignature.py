"""C2SP tlog-cosignature (cosignature/v1, Ed25519, key type 0x04): real-world vectors, round trips, bad keys."""

import base64
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fgtrac_assets.integrity.cosignature import (
    CosignatureError,
    CosignatureSigner,
    cosigned_by,
    cosigned_message,
    cosigner_from_key,
    generate_cosigner,
    parse_cosignature_vkey,
    verify_cosignature,
)
from fgtrac_assets.integrity.notes import NoteError, format_checkpoint, generate_signer, open_note, parse_verifier_key

# A real checkpoint of the staging CT log arche2025h1.staging.ct.transparency.dev, signed by the log (an RFC 6962
# STH signature, type 0x05, and an Ed25519 note signature) and cosigned by four public witnesses of the
# transparency-dev witness network at time 1779573024. The remora.n621.de vkey is also in transparency-dev/formats
# note/note_cosigv1_test.go (TestCoSigV1NewVerifier); the others are the witnesses' published vkeys.
REAL_BODY = "arche2025h1.staging.ct.transparency.dev\n1432088532\nU7WM79jrzyhGZ5/GUBTpM7NzwdyfFx61t3RovgcC4Ro=\n"
REAL_LOG_VKEY = "arche2025h1.staging.ct.transparency.dev+ba2f06c0+AU0vHmlGCS/PdN8b2OaGmKprLI8HKM+dJ472xgFYh15f"
REAL_SIGS = {
    "log-sth": "— arche2025h1.staging.ct.transparency.dev zTM8sQAAAZ5W0WdjBAMARjBEAiBjW5IQf9pvsYLfQFX6hoGREPMHbdQ3"
               "urbllzalApkptQIgIpwtEroeW2BXaHAI4kJXFbon5Ch9MNL5zRNZ55lvGt0=\n",
    "log": "— arche2025h1.staging.ct.transparency.dev ui8GwCF1+kWqZrxGdhj4aX3gcw7XUlXQQabg/27lefwhUkzbC3NygNI75Mdh"
           "L1bfTW9g8Ei59RA23oHP7Ry1k3ZFWwQ=\n",
    "little-garden": "— transparency.dev/DEV:witness-little-garden 2AQqhwAAAABqEiEgzgFIqqhbUoDwjMWE6UP8nd8/KYTzwZ2r"
                     "hIgcqoXHAwVkjZr4AscylP3v7sEodkRAErumC2q44vdgJY096st5BQ==\n",
    "smartit": "— witness1.smartit.nu/witness1 pIyCDwAAAABqEiEghIp82KWebrw7/oHQwlTAm3g2RKS4+eebl8eO0WH+/iEcxZ75W3u5"
               "hNI7TOQtmJbqmNWVuE0tgh0XwzdZsDsUAQ==\n",
    "remora": "— remora.n621.de 2net5wAAAABqEiEgPlfF3V06o0Y+fHM+J5J9s27wgxxcOVSpZ/2g/KSiXCg9DEZI+aVCIobWX9sXTynk5XeU"
              "/zZ0WBxtqB0DrAWfBw==\n",
    "stagemole": "— witness.stagemole.eu Z/euoAAAAABqEiEgw0i+7g2ENfDAWHmtRzCfKTHSDwYDJA2NmKeGi9Y8FtEyOUvVr+AJmIY/2TUF"
                 "ucgKi7lI7cUiOvKFYe/TmN9DAg==\n",
}
REAL_NOTE = REAL_BODY + "\n" + "".join(REAL_SIGS.values())
REAL_TIME = 1779573024
WITNESS_VKEYS = {
    "little-garden": "transparency.dev/DEV:witness-little-garden+d8042a87+BCtusOxINQNUTN5Oj8HObRkh2yHf/MwYaGX4CPdiVEPM",
    "smartit": "witness1.smartit.nu/witness1+a48c820f+BPSFWg9G6KPiO7QPryYO5Xq4oYJJ+kAvLKLSimDhoxMO",
    "remora": "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2",
    "stagemole": "witness.stagemole.eu+67f7aea0+BEqSG3yu9YrmcM3BHvQYTxwFj3uSWakQepafafpUqklv",
}
# golang.org/x/mod/sumdb/note's example key: type 0x01, not a cosigner key.
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"

BODY = format_checkpoint("example.com/log", 5, bytes(range(32)))


# --- the real-world vector -------------------------------------------------------


@pytest.mark.parametrize("witness", sorted(WITNESS_VKEYS))
def test_real_cosignatures_verify(witness):
    vkey = WITNESS_VKEYS[witness]
    assert verify_cosignature(REAL_NOTE, REAL_BODY, vkey) == REAL_TIME
    assert verify_cosignature(REAL_SIGS[witness], REAL_BODY, vkey) == REAL_TIME
    assert parse_cosignature_vkey(vkey).verifier_key == vkey


def test_real_log_signature_verifies_and_cosignatures_are_ignored_by_the_log_key():
    assert open_note(REAL_NOTE, [parse_verifier_key(REAL_LOG_VKEY)]) == REAL_BODY


def test_real_note_cosigned_by_every_known_witness_and_not_by_others():
    found = cosigned_by(REAL_NOTE, list(WITNESS_VKEYS.values()) + [generate_cosigner("other.example").verifier_key])
    assert set(found) == set(WITNESS_VKEYS.values())
    assert {c.timestamp for c in found.values()} == {REAL_TIME}
    assert cosigned_by(REAL_NOTE, []) == {}


def test_real_cosignature_fails_on_a_changed_body():
    changed = REAL_BODY.replace("1432088532", "1432088533")
    with pytest.raises(CosignatureError, match="invalid cosignature from remora.n621.de\\+da77ade7"):
        verify_cosignature(REAL_SIGS["remora"], changed, WITNESS_VKEYS["remora"])
    with pytest.raises(CosignatureError, match="not the checkpoint body"):
        verify_cosignature(REAL_NOTE, changed, WITNESS_VKEYS["remora"])
    with pytest.raises(CosignatureError, match="invalid cosignature"):
        cosigned_by(changed + "\n" + REAL_SIGS["remora"], [WITNESS_VKEYS["remora"]])


def test_key_id_is_sha256_of_name_newline_type_4_and_public_key():
    for vkey in WITNESS_VKEYS.values():
        name, key_id, key64 = vkey.split("+", 2)
        raw = base64.b64decode(key64)
        assert raw[0] == 0x04 and len(raw) == 33
        digest = hashlib.sha256(name.encode() + b"\x0a" + b"\x04" + raw[1:]).digest()
        assert digest[:4].hex() == key_id == f"{parse_cosignature_vkey(vkey).key_id:08x}"


# --- round trips ----------------------------------------------------------------


def test_cosign_round_trip_and_wire_layout():
    signer = generate_cosigner("witness.example/w1")
    line = signer.cosign(BODY, 1679315147)
    assert line.startswith("— witness.example/w1 ") and line.endswith("\n") and line.count("\n") == 1
    blob = base64.b64decode(line.split(" ")[2])
    assert len(blob) == 4 + 8 + 64
    assert struct.unpack(">I", blob[:4])[0] == signer.key_id
    assert struct.unpack(">Q", blob[4:12])[0] == 1679315147
    # The signed message, independently of the module: header, time line, the whole body.
    raw = base64.b64decode(signer.verifier_key.split("+", 2)[2])[1:]
    message = b"cosignature/v1\ntime 1679315147\n" + BODY.encode()
    assert cosigned_message(BODY, 1679315147) == message
    Ed25519PublicKey.from_public_bytes(raw).verify(blob[12:], message)
    assert verify_cosignature(line, BODY, signer.verifier_key) == 1679315147
    assert verify_cosignature(BODY + "\n" + line, BODY, signer.verifier) == 1679315147


def test_signer_key_round_trip_and_repr_hides_the_key():
    signer = generate_cosigner("witness.example/w1")
    skey = signer.signer_key
    assert skey.startswith(f"PRIVATE+KEY+witness.example/w1+{signer.key_id:08x}+")
    assert base64.b64decode(skey.split("+", 4)[4])[0] == 0x04
    again = cosigner_from_key(skey)
    assert again.verifier_key == signer.verifier_key
    assert skey.split("+", 4)[4] not in repr(signer) + str(signer)


def test_extension_lines_are_signed():
    signer = generate_cosigner("w")
    body = BODY + "extension line\n"
    line = signer.cosign(body, 42)
    assert verify_cosignature(line, body, signer.verifier_key) == 42
    with pytest.raises(CosignatureError, match="invalid cosignature"):
        verify_cosignature(line, BODY + "other extension\n", signer.verifier_key)


@pytest.mark.parametrize("change", [
    lambda b: b.replace("\n5\n", "\n6\n"),
    lambda b: b.replace("example.com/log", "example.com/other"),
    lambda b: format_checkpoint("example.com/log", 5, bytes(32)),
])
def test_changed_body_fails(change):
    signer = generate_cosigner("w")
    line = signer.cosign(BODY, 100)
    with pytest.raises(CosignatureError, match="invalid cosignature"):
        verify_cosignature(line, change(BODY), signer.verifier_key)


def test_changed_timestamp_fails():
    signer = generate_cosigner("w")
    blob = bytearray(base64.b64decode(signer.cosign(BODY, 100).split(" ")[2]))
    blob[11] ^= 1
    with pytest.raises(CosignatureError, match="invalid cosignature"):
        verify_cosignature(f"— w {base64.b64encode(blob).decode()}\n", BODY, signer.verifier_key)


def test_wrong_cosigner_or_no_line():
    a, b = generate_cosigner("w"), generate_cosigner("w")
    with pytest.raises(CosignatureError, match="no cosignature from w\\+"):
        verify_cosignature(a.cosign(BODY, 1), BODY, b.verifier_key)
    with pytest.raises(CosignatureError, match="malformed"):
        verify_cosignature("not a signature line", BODY, a.verifier_key)


def test_timestamps_out_of_range():
    signer = generate_cosigner("w")
    with pytest.raises(CosignatureError, match="zero timestamp"):
        signer.cosign(BODY, 0)
    with pytest.raises(CosignatureError, match="timestamp"):
        signer.cosign(BODY, 2**63)
    blob = struct.pack(">IQ", signer.key_id, 2**63) + bytes(64)
    with pytest.raises(CosignatureError, match="2\\^63"):
        verify_cosignature(f"— w {base64.b64encode(blob).decode()}\n", BODY, signer.verifier_key)


def test_cosigning_needs_a_checkpoint_body():
    with pytest.raises(CosignatureError, match="cannot cosign"):
        generate_cosigner("w").cosign("just text\n", 5)


# --- keys -------------------------------------------------------------------------


def test_type_1_key_is_not_a_cosigner_key():
    with pytest.raises(CosignatureError, match="type 0x01, not 0x04"):
        parse_cosignature_vkey(PETER_VKEY)
    signer = generate_cosigner("w")
    name, key_id, key64 = signer.verifier_key.split("+", 2)
    relabelled = f"{name}+{key_id}+" + base64.b64encode(b"\x01" + base64.b64decode(key64)[1:]).decode()
    with pytest.raises(CosignatureError, match="type 0x01"):
        parse_cosignature_vkey(relabelled)
    with pytest.raises(CosignatureError, match="type 0x01"):
        cosigner_from_key(generate_signer("w").signer_key)


def test_ordinary_note_key_of_the_same_name_and_public_key_ignores_cosignatures():
    # Domain separation: the 0x01 key id of the same name and public key differs, so a note verifier skips it.
    signer = generate_cosigner("w")
    raw = base64.b64decode(signer.verifier_key.split("+", 2)[2])[1:]
    key_id = hashlib.sha256(b"w\n\x01" + raw).digest()[:4].hex()
    note_verifier = parse_verifier_key(f"w+{key_id}+{base64.b64encode(bytes([1]) + raw).decode()}")
    assert note_verifier.key_id != signer.key_id
    with pytest.raises(NoteError, match="no verifiable signatures"):
        open_note(BODY + "\n" + signer.cosign(BODY, 7), [note_verifier])


@pytest.mark.parametrize("vkey, reason", [
    ("", "malformed"),
    ("w", "malformed"),
    ("w+1234567+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2", "malformed"),
    ("w+ABCDEF01+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2", "malformed"),  # vkeys use lowercase hex
    ("w+00000000+not base64!", "malformed"),
    ("w x+00000000+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2", "malformed"),
    ("w+00000000+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onl", "wrong key length"),
    ("remora.n621.de+00000000+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2", "key id does not match"),
    ("other.name+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2", "key id does not match"),
])
def test_bad_verifier_keys(vkey, reason):
    with pytest.raises(CosignatureError, match=reason):
        parse_cosignature_vkey(vkey)


def test_bad_signer_keys():
    signer = generate_cosigner("w")
    parts = signer.signer_key.split("+", 4)
    for bad in ["", "KEY+w", "+".join(parts[:3] + ["00000000"] + parts[4:]), "+".join(parts[:4] + ["AAAA"])]:
        with pytest.raises(CosignatureError):
            cosigner_from_key(bad)
    with pytest.raises(CosignatureError, match="invalid cosigner name"):
        CosignatureSigner("two words", generate_cosigner("w")._private)


# --- quorum helper --------------------------------------------------------------


def test_cosigned_by_reports_each_witness_once_with_its_latest_timestamp():
    log = generate_signer("example.com/log")
    a, b, c = generate_cosigner("a.example"), generate_cosigner("b.example"), generate_cosigner("c.example")
    body = BODY
    note = log.sign(body) + a.cosign(body, 10) + a.cosign(body, 12) + b.cosign(body, 11)
    found = cosigned_by(note, [a.verifier_key, b.verifier, c.verifier_key])
    assert {k: v.timestamp for k, v in found.items()} == {a.verifier_key: 12, b.verifier_key: 11}
    assert found[a.verifier_key].witness == a.verifier


def test_cosigned_by_rejects_a_bad_signature_from_a_known_witness():
    a = generate_cosigner("a.example")
    forged = f"— a.example {base64.b64encode(struct.pack('>IQ', a.key_id, 5) + bytes(64)).decode()}\n"
    with pytest.raises(CosignatureError, match="invalid cosignature from a.example"):
        cosigned_by(BODY + "\n" + forged, [a.verifier_key])
    assert cosigned_by(BODY + "\n" + forged, [generate_cosigner("a.example").verifier_key]) == {}
    with pytest.raises(CosignatureError, match="malformed"):
        cosigned_by("no signatures\n", [a.verifier_key])
