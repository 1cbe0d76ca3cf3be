"""C2SP tlog-cosignature: timestamped Ed25519 checkpoint cosignatures (cosignature/v1, key type 0x04).

A cosignature is a signed-note signature line "— <name> base64(keyid || timestamp || sig)" where
keyid = SHA-256(name || 0x0A || 0x04 || pubkey)[:4], timestamp is a big-endian uint64 of POSIX seconds and
sig is Ed25519 over "cosignature/v1\\ntime <timestamp>\\n" followed by the whole checkpoint body (extension
lines included). Verifier keys are vkeys "name+keyid+base64(0x04 || pubkey)"; signer keys, as
transparency-dev/formats reads them, "PRIVATE+KEY+name+keyid+base64(0x04 || seed)".
"""

import base64
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import FgtracError
from .notes import (
    NoteError,
    NoteSignature,
    encode_signer_key,
    encode_verifier_key,
    key_id,
    parse_checkpoint,
    parse_key_parts,
    raw_public_key,
    split_note,
    valid_key_name,
)

ALG_COSIGNATURE_V1 = 4
_SIG_PREFIX = "\u2014 "  # EM DASH, space
_SIG_LEN = 8 + 64
_MAX_TIMESTAMP = 2**63 - 1
_HEX8 = re.compile(r"[0-9a-f]{8}")


class CosignatureError(FgtracError, ValueError):
    """A cosignature or cosigner key that is malformed or does not verify."""


def cosigned_message(checkpoint_body: str, timestamp: int) -> bytes:
    """Return the bytes a cosignature/v1 signs: the header line, the time line and the checkpoint body."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise CosignatureError(f"cosignature timestamp must be an int in [0, 2^63-1], got {timestamp!r}")
    try:
        parse_checkpoint(checkpoint_body)
    except ValueError as e:
        raise CosignatureError(f"cannot cosign: {e}") from None
    return f"cosignature/v1\ntime {timestamp}\n{checkpoint_body}".encode()


class CosignatureVerifier:
    """An Ed25519 cosigner's public key (type 0x04): name, key id, and verification of its cosignatures."""

    __slots__ = ("name", "key_id", "_public", "_raw")

    def __init__(self, name: str, public_key: Ed25519PublicKey):
        if not valid_key_name(name):
            raise CosignatureError(f"invalid cosigner name {name!r}")
        self.name = name
        self._public = public_key
        self._raw = raw_public_key(public_key)
        self.key_id = key_id(name, ALG_COSIGNATURE_V1, self._raw)

    @property
    def verifier_key(self) -> str:
        """Return the vkey "name+keyid+base64(0x04||pubkey)"."""
        return encode_verifier_key(self.name, ALG_COSIGNATURE_V1, self._raw)

    def verify_signature(self, checkpoint_body: str, signature: bytes) -> int:
        """Return the timestamp of signature (the blob after the key id) on checkpoint_body; raise CosignatureError."""
        if len(signature) != _SIG_LEN:
            raise CosignatureError(f"malformed cosignature from {self.name}: {len(signature)} bytes, not {_SIG_LEN}")
        timestamp = struct.unpack(">Q", signature[:8])[0]
        if timestamp > _MAX_TIMESTAMP:
            raise CosignatureError(f"malformed cosignature from {self.name}: timestamp above 2^63-1")
        try:
            self._public.verify(signature[8:], cosigned_message(checkpoint_body, timestamp))
        except InvalidSignature:
            raise CosignatureError(f"invalid cosignature from {self.name}+{self.key_id:08x}") from None
        return timestamp

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CosignatureVerifier) and other.verifier_key == self.verifier_key

    def __hash__(self) -> int:
        return hash(self.verifier_key)

    def __repr__(self) -> str:
        return f"CosignatureVerifier({self.verifier_key!r})"


def _key_parts(name: str, hash16: str, key64: str, what: str) -> tuple[int, bytes]:
    if not _HEX8.fullmatch(hash16):  # cosigner key ids are lowercase hex
        raise CosignatureError(f"malformed cosigner {what} key")
    try:
        return parse_key_parts(name, hash16, key64, f"cosigner {what}", ALG_COSIGNATURE_V1)
    except ValueError as e:
        raise CosignatureError(f"{e} (cosignature/v1)" if "type" in str(e) else str(e)) from None


def parse_cosignature_vkey(vkey: str) -> CosignatureVerifier:
    """Return the CosignatureVerifier of a type 0x04 vkey; raise CosignatureError if malformed or of another type."""
    name, _, rest = vkey.strip().partition("+")
    hash16, _, key64 = rest.partition("+")
    kid, raw = _key_parts(name, hash16, key64, "verifier")
    verifier = CosignatureVerifier(name, Ed25519PublicKey.from_public_bytes(raw))
    if verifier.key_id != kid:
        raise CosignatureError("invalid cosigner verifier key: key id does not match the key")
    return verifier


class CosignatureSigner:
    """An Ed25519 cosigner (cosignature/v1); repr/str show only the name and key id."""

    __slots__ = ("name", "_private", "_verifier")

    def __init__(self, name: str, private_key: Ed25519PrivateKey):
        self._verifier = CosignatureVerifier(name, private_key.public_key())
        self.name = name
        self._private = private_key

    @property
    def key_id(self) -> int:
        """Return the 32-bit key id (type byte 0x04)."""
        return self._verifier.key_id

    @property
    def verifier(self) -> CosignatureVerifier:
        """Return the verifier of this cosigner's public key."""
        return self._verifier

    @property
    def verifier_key(self) -> str:
        """Return the public vkey "name+keyid+base64(0x04||pubkey)"."""
        return self._verifier.verifier_key

    @property
    def signer_key(self) -> str:
        """Return the encoded PRIVATE signer key string (secret: store it, never log it)."""
        return encode_signer_key(self.name, ALG_COSIGNATURE_V1, self._private)

    def cosign(self, checkpoint_body: str, timestamp: int) -> str:
        """Return the cosignature line "— name base64(keyid||timestamp||sig)\\n" over checkpoint_body at timestamp."""
        if timestamp == 0:
            raise CosignatureError("a checkpoint cosignature must not have a zero timestamp")
        sig = self._private.sign(cosigned_message(checkpoint_body, timestamp))
        blob = struct.pack(">IQ", self.key_id, timestamp) + sig
        return f"{_SIG_PREFIX}{self.name} {base64.b64encode(blob).decode()}\n"

    def __repr__(self) -> str:
        return f"CosignatureSigner(name={self.name!r}, key_id={self.key_id:08x})"


def generate_cosigner(name: str) -> CosignatureSigner:
    """Return a new CosignatureSigner with a fresh random Ed25519 key."""
    return CosignatureSigner(name, Ed25519PrivateKey.generate())


def cosigner_from_key(skey: str) -> CosignatureSigner:
    """Return the CosignatureSigner of a "PRIVATE+KEY+name+keyid+base64(0x04||seed)" string; raise CosignatureError."""
    parts = skey.strip().split("+", 4)
    if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
        raise CosignatureError("malformed cosigner signer key")
    kid, seed = _key_parts(*parts[2:], "signer")
    signer = CosignatureSigner(parts[2], Ed25519PrivateKey.from_private_bytes(seed))
    if signer.key_id != kid:
        raise CosignatureError("invalid cosigner signer key: key id does not match the key")
    return signer


@dataclass(frozen=True)
class Cosigned:
    """A verified cosignature: who made it and when."""

    witness: CosignatureVerifier
    timestamp: int


def _signature_lines(note_or_line: str) -> tuple[str | None, list[NoteSignature]]:
    """Return (note text or None, signatures) of a whole signed note or of bare signature lines."""
    try:
        return split_note(note_or_line)
    except NoteError:
        pass
    try:
        # Bare signature lines: give them a dummy text so the signed-note parser reads them.
        return None, split_note("x\n\n" + (note_or_line if note_or_line.endswith("\n") else note_or_line + "\n"))[1]
    except NoteError as e:
        raise CosignatureError(f"malformed cosignature: {e}") from None


def verify_cosignature(note_or_line: str, checkpoint_body: str, vkey: str | CosignatureVerifier) -> int:
    """Return the timestamp of vkey's cosignature of checkpoint_body in a signed note or signature line(s).

    Raises CosignatureError when there is no line with vkey's name and key id, the line is malformed, the
    signature does not verify, or a whole note's text is not checkpoint_body.
    """
    verifier = parse_cosignature_vkey(vkey) if isinstance(vkey, str) else vkey
    text, signatures = _signature_lines(note_or_line)
    if text is not None and text != checkpoint_body:
        raise CosignatureError("the note's text is not the checkpoint body")
    mine = [s for s in signatures if (s.name, s.key_id) == (verifier.name, verifier.key_id)]
    if not mine:
        raise CosignatureError(f"no cosignature from {verifier.name}+{verifier.key_id:08x}")
    return max(verifier.verify_signature(checkpoint_body, s.signature) for s in mine)


def cosigned_by(note: str, witnesses: Iterable[str | CosignatureVerifier]) -> dict[str, Cosigned]:
    """Return {witness vkey: Cosigned} for every given witness whose cosignature on the signed note verifies.

    Lines from unknown keys are ignored (signed-note); a line that matches a witness's name and key id but
    does not verify raises CosignatureError, as a note with a bad signature from a known key is malformed.
    """
    try:
        text, signatures = split_note(note)
    except NoteError as e:
        raise CosignatureError(f"malformed cosigned note: {e}") from None
    known: dict[tuple[str, int], CosignatureVerifier] = {}
    for w in witnesses:
        v = parse_cosignature_vkey(w) if isinstance(w, str) else w
        other = known.setdefault((v.name, v.key_id), v)
        if other != v:
            raise CosignatureError(f"ambiguous witness key {v.name}+{v.key_id:08x}")
    found: dict[str, Cosigned] = {}
    for sig in signatures:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            continue
        timestamp = v.verify_signature(text, sig.signature)
        previous = found.get(v.verifier_key)
        if previous is None or timestamp > previous.timestamp:
            found[v.verifier_key] = Cosigned(v, timestamp)
    return found
