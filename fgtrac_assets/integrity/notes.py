"""C2SP tlog-checkpoints and signed notes with Ed25519 keys.

Wire formats follow C2SP signed-note / tlog-checkpoint and Go's
golang.org/x/mod/sumdb/note, so notes and keys interoperate with that package.
"""

import base64
import binascii
import hashlib
import os
import re
import struct
from collections.abc import Sequence
from typing import Protocol
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import FgtracError, InputError, StorageError

ALG_ED25519 = 1
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f]")  # a note's text and signature lines: no control but newline
_SIG_PREFIX = "\u2014 "  # EM DASH, space
_MAX_SIGNATURES = 100
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class NoteError(FgtracError, ValueError):
    """A signed note that is malformed or carries no valid signature from a known key."""


# --- checkpoints -----------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A parsed checkpoint body: log origin, tree size and root hash."""

    origin: str
    size: int
    root: bytes


def format_checkpoint(origin: str, size: int, root: bytes) -> str:
    """Return the checkpoint body text "origin\\nsize\\nbase64(root)\\n"."""
    if not origin or "\n" in origin:
        raise ValueError("checkpoint origin must be a non-empty single line")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"checkpoint size must be a non-negative int, got {size!r}")
    if len(root) != 32:
        raise ValueError(f"checkpoint root must be 32 bytes, got {len(root)}")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


def parse_checkpoint(text: str) -> Checkpoint:
    """Return the Checkpoint in a checkpoint body text; extension lines are ignored."""
    if not text.endswith("\n"):
        raise InputError("malformed checkpoint: text must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise InputError(f"malformed checkpoint: expected at least 3 lines, got {len(lines)}")
    origin, size_s, root_s, *extensions = lines
    if not origin:
        raise InputError("malformed checkpoint: empty origin line")
    if not _DECIMAL.fullmatch(size_s):
        raise InputError(f"malformed checkpoint: tree size {size_s!r} is not a decimal number")
    root = _b64decode(root_s)
    if root is None or len(root) != 32:
        raise InputError("malformed checkpoint: root hash is not base64 of 32 bytes")
    if any(not line for line in extensions):
        raise InputError("malformed checkpoint: blank line (pass the note text, not the signed note)")
    return Checkpoint(origin, int(size_s), root)


# --- keys ------------------------------------------------------------------


def _b64decode(s: str) -> bytes | None:
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _valid_name(name: str) -> bool:
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def _key_id(name: str, encoded_pubkey: bytes) -> int:
    digest = hashlib.sha256(name.encode() + b"\n" + encoded_pubkey).digest()
    return struct.unpack(">I", digest[:4])[0]


def key_id(name: str, key_type: int, public_key: bytes) -> int:
    """Return the signed-note key id: SHA-256(name || 0x0A || key_type || public_key)[:4] as a big-endian uint32."""
    return _key_id(name, bytes([key_type]) + public_key)


def valid_key_name(name: str) -> bool:
    """Return True iff name is a valid signed-note key name (non-empty, no spaces, no '+')."""
    return _valid_name(name)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """Return the 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def parse_key_parts(name: str, hash16: str, key64: str, what: str, key_type: int = ALG_ED25519) -> tuple[int, bytes]:
    """Return (key id, key bytes after the type byte) of a signer or verifier key's parts; raise ValueError."""
    key = _b64decode(key64)
    if not (_valid_name(name) and _HEX8.fullmatch(hash16) and key):
        raise InputError(f"malformed {what} key")
    if key[0] != key_type:
        raise InputError(f"{what} key has type 0x{key[0]:02x}, not 0x{key_type:02x}")
    if len(key) != 33:
        raise InputError(f"malformed {what} key: wrong key length")
    return int(hash16, 16), key[1:]


def encode_verifier_key(name: str, key_type: int, public: bytes) -> str:
    """Return the signed-note verifier key "name+keyid+base64(type||public key)"."""
    return f"{name}+{key_id(name, key_type, public):08x}+{base64.b64encode(bytes([key_type]) + public).decode()}"


def encode_signer_key(name: str, key_type: int, private_key: Ed25519PrivateKey) -> str:
    """Return the PRIVATE signer key "PRIVATE+KEY+name+keyid+base64(type||seed)" (secret: never log it)."""
    seed = private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
    kid = key_id(name, key_type, raw_public_key(private_key.public_key()))
    return f"PRIVATE+KEY+{name}+{kid:08x}+{base64.b64encode(bytes([key_type]) + seed).decode()}"


class Verifier:
    """An Ed25519 note verifier key: name, key id and public key."""

    __slots__ = ("name", "key_id", "_public")

    def __init__(self, name: str, public_key: Ed25519PublicKey):
        if not _valid_name(name):
            raise InputError(f"invalid key name {name!r}")
        self.name = name
        self._public = public_key
        self.key_id = _key_id(name, bytes([ALG_ED25519]) + raw_public_key(public_key))

    @property
    def verifier_key(self) -> str:
        """Return the encoded verifier key "name+keyid+base64(0x01||pubkey)"."""
        return encode_verifier_key(self.name, ALG_ED25519, raw_public_key(self._public))

    def verify(self, text: str | bytes, sig: bytes) -> bool:
        """Return True iff sig is a valid Ed25519 signature of text (UTF-8) by this key."""
        msg = text.encode() if isinstance(text, str) else text
        try:
            self._public.verify(sig, msg)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def __repr__(self) -> str:
        return f"Verifier({self.verifier_key!r})"


def parse_verifier_key(vkey: str) -> Verifier:
    """Return the Verifier for an encoded verifier key string; raises ValueError if malformed."""
    name, _, rest = vkey.partition("+")
    hash16, _, key64 = rest.partition("+")
    key_id, raw = parse_key_parts(name, hash16, key64, "verifier")
    if key_id != _key_id(name, bytes([ALG_ED25519]) + raw):
        raise InputError("invalid verifier key: key id does not match the key")
    return Verifier(name, Ed25519PublicKey.from_public_bytes(raw))


class Signer:
    """An Ed25519 note signer; repr/str show only the name and key id."""

    __slots__ = ("name", "_private", "_verifier")

    def __init__(self, name: str, private_key: Ed25519PrivateKey):
        self.name = name
        self._private = private_key
        self._verifier = Verifier(name, private_key.public_key())

    @property
    def key_id(self) -> int:
        """Return the 32-bit key id shared with the matching verifier."""
        return self._verifier.key_id

    @property
    def verifier(self) -> Verifier:
        """Return the Verifier for this signer's public key."""
        return self._verifier

    @property
    def verifier_key(self) -> str:
        """Return the encoded (public) verifier key string."""
        return self._verifier.verifier_key

    @property
    def signer_key(self) -> str:
        """Return the encoded PRIVATE signer key string (secret: store it, never log it)."""
        return encode_signer_key(self.name, ALG_ED25519, self._private)

    def sign(self, text: str) -> str:
        """Return the signed note: text, a blank line and this signer's signature line."""
        if not text.endswith("\n"):
            raise ValueError("note text must end with a newline")
        if any(c < " " and c != "\n" for c in text):
            raise ValueError("note text must not contain control characters other than newline")
        sig = self._private.sign(text.encode())
        blob = base64.b64encode(struct.pack(">I", self.key_id) + sig).decode()
        return f"{text}\n{_SIG_PREFIX}{self.name} {blob}\n"

    def __repr__(self) -> str:
        return f"Signer(name={self.name!r}, key_id={self.key_id:08x})"


def generate_signer(name: str) -> Signer:
    """Return a new Signer with a fresh random Ed25519 key."""
    return Signer(name, Ed25519PrivateKey.generate())


def signer_from_key(skey: str) -> Signer:
    """Return the Signer for an encoded signer key string; raises ValueError if malformed."""
    parts = skey.split("+", 4)
    if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
        raise InputError("malformed signer key")
    name, hash16, key64 = parts[2:]
    key_id, seed = parse_key_parts(name, hash16, key64, "signer")
    signer = Signer(name, Ed25519PrivateKey.from_private_bytes(seed))
    if signer.key_id != key_id:
        raise InputError("invalid signer key: key id does not match the key")
    return signer


# --- signed notes ----------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a signed note: key name, key id, signature bytes and the line itself."""

    name: str
    key_id: int
    signature: bytes
    line: str


def split_note(note: str | bytes) -> tuple[str, list[NoteSignature]]:
    """Return (text, signature lines) of a signed note, checking only its syntax; raise NoteError if malformed."""
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("malformed note: not valid UTF-8") from None
    try:
        note.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteError("malformed note: not valid UTF-8") from None
    if _CONTROL.search(note):
        raise NoteError("malformed note: control character")
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line before signatures")
    text, sig_block = note[: split + 1], note[split + 2 :]
    if not sig_block.endswith("\n"):
        raise NoteError("malformed note: missing signature lines or final newline")
    lines = sig_block[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise NoteError("malformed note: too many signatures")
    signatures = []
    for line in lines:
        if not line.startswith(_SIG_PREFIX):
            raise NoteError("malformed note: signature line does not start with an em dash")
        name, _, b64 = line[len(_SIG_PREFIX) :].partition(" ")
        blob = _b64decode(b64)
        if not _valid_name(name) or not blob or len(blob) < 5:
            raise NoteError("malformed note: bad signature line")
        signatures.append(NoteSignature(name, struct.unpack(">I", blob[:4])[0], blob[4:], line + "\n"))
    return text, signatures


def open_note(note: str | bytes, verifiers: Sequence[Verifier]) -> str:
    """Return the note text if a known verifier's signature verifies; raise NoteError otherwise."""
    text, signatures = split_note(note)

    known: dict[tuple[str, int], Verifier] = {}
    for v in verifiers:
        other = known.setdefault((v.name, v.key_id), v)
        if other.verifier_key != v.verifier_key:
            raise NoteError(f"ambiguous key {v.name}+{v.key_id:08x}")

    verified, unknown = set(), []
    for sig in signatures:
        key = (sig.name, sig.key_id)
        verifier = known.get(key)
        if verifier is None:
            unknown.append(f"{sig.name}+{sig.key_id:08x}")
            continue
        if key in verified:
            continue
        if not verifier.verify(text, sig.signature):
            raise NoteError(f"invalid signature for key {sig.name}+{sig.key_id:08x}")
        verified.add(key)
    if not verified:
        detail = f" (unknown keys: {', '.join(unknown)})" if unknown else ""
        raise NoteError(f"note has no verifiable signatures{detail}")
    return text


# --- key storage -----------------------------------------------------------


class LogSigner(Protocol):
    """What signs tree heads: a local Ed25519 Signer today; a KMS or HSM client can take its place."""

    name: str

    @property
    def verifier_key(self) -> str: ...

    def sign(self, text: str) -> str: ...


class KeyStore:
    """Signer keys as <dir>/<name>.key (mode 0600) with public <dir>/<name>.vkey files.

    With key_file (FGTRAC_SIGNING_KEY), the current key is that one file, kept wherever the deployment
    wants it (another volume); it must not be readable by group or others. Its public key and any
    retired keys lie beside it.
    """

    def __init__(self, directory: Path, key_file: Path | None = None):
        self.key_file = Path(key_file).expanduser() if key_file else None
        self.directory = self.key_file.parent if self.key_file else Path(directory)

    def _paths(self, name: str) -> tuple[Path, Path]:
        if not _valid_name(name) or "\\" in name or "\0" in name or name.startswith("."):
            raise InputError(f"invalid key name {name!r}")
        if self.key_file is not None:
            return self.key_file, self.key_file.with_name(self.key_file.stem + ".vkey")
        stem = name.replace("/", "_")  # origins look like "example.com/log"
        return self.directory / f"{stem}.key", self.directory / f"{stem}.vkey"

    def load_or_create(self, name: str) -> Signer:
        """Return the signer stored under name, generating and storing a new key if none exists."""
        key_path, vkey_path = self._paths(name)
        if not key_path.exists():
            signer = generate_signer(name)
            # Write a private temp file, then link it into place: another process never sees a half-written key.
            tmp = key_path.with_name(f".{key_path.name}.{os.getpid()}.tmp")
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                _write_private(tmp, signer.signer_key + "\n", exclusive=True)
                try:
                    os.link(tmp, key_path)
                except FileExistsError:
                    pass  # created concurrently; load that one below
                finally:
                    tmp.unlink()
            except OSError as exc:
                raise StorageError(f"{key_path}: cannot create the signing key ({exc.strerror or exc})") from None
        signer = self._load(name, key_path)
        self._ensure_vkey(signer, vkey_path)
        return signer

    def _load(self, name: str, key_path: Path) -> Signer:
        if self.key_file is not None and key_path.exists() and key_path.stat().st_mode & 0o077:
            raise InputError(f"signing key {key_path} has mode {key_path.stat().st_mode & 0o777:04o}: others could "
                             f"read it; `chmod 600 {key_path}`")
        try:
            skey = key_path.read_text(encoding="ascii").strip()
        except OSError as e:
            raise InputError(f"cannot read signer key file {key_path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise InputError(f"malformed signer key file {key_path}: not ASCII") from None
        try:
            signer = signer_from_key(skey)
        except ValueError as e:
            raise InputError(f"malformed signer key file {key_path}: {e}") from None
        if signer.name != name:
            raise InputError(f"signer key file {key_path} holds a key named {signer.name!r}, not {name!r}")
        return signer

    def _ensure_vkey(self, signer: Signer, vkey_path: Path) -> None:
        if vkey_path.exists():
            if vkey_path.read_text(encoding="utf-8").strip() != signer.verifier_key:
                raise InputError(f"verifier key file {vkey_path} does not match its signer key file")
        else:
            tmp = vkey_path.with_name(f".{vkey_path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(signer.verifier_key + "\n", encoding="utf-8")
                os.replace(tmp, vkey_path)
            except OSError as exc:
                raise StorageError(f"{vkey_path}: cannot write the verifier key ({exc.strerror or exc})") from None

    def rotate(self, name: str) -> Signer:
        """Retire the current key (its verifier key stays, so old tree heads still verify); return a new signer."""
        self._retire(name)
        return self.load_or_create(name)

    def _retire(self, name: str) -> None:
        """Move the current key aside as <stem>.<keyid>.key.retired, keeping its verifier key as <stem>.<keyid>.vkey."""
        key_path, vkey_path = self._paths(name)
        if key_path.exists():
            old = self._load(name, key_path)
            retired_vkey = self.directory / f"{key_path.stem}.{old.key_id:08x}.vkey"
            retired_vkey.write_text(old.verifier_key + "\n", encoding="utf-8")
            os.replace(key_path, self.directory / f"{key_path.stem}.{old.key_id:08x}.key.retired")
        vkey_path.unlink(missing_ok=True)

    def stage(self, signer: Signer) -> None:
        """Store a successor key beside the current one (<name>.key.pending, mode 0600) until promote()."""
        key_path, _ = self._paths(signer.name)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pending = key_path.with_name(key_path.name + ".pending")
        tmp = pending.with_name(f".{pending.name}.{os.getpid()}.tmp")
        _write_private(tmp, signer.signer_key + "\n", exclusive=False)
        os.replace(tmp, pending)

    def pending_verifier_key(self, name: str) -> str | None:
        """Return the verifier key of the staged successor of name, or None if none is staged."""
        key_path, _ = self._paths(name)
        pending = key_path.with_name(key_path.name + ".pending")
        return self._load(name, pending).verifier_key if pending.exists() else None

    def promote(self, name: str) -> Signer:
        """Retire the current key and make the staged successor current; return it."""
        key_path, _ = self._paths(name)
        pending = key_path.with_name(key_path.name + ".pending")
        self._load(name, pending)  # refuse a damaged successor before retiring anything
        self._retire(name)
        os.replace(pending, key_path)
        return self.load_or_create(name)

    def current_verifier_key(self, name: str) -> str | None:
        """Return the verifier key of the current signer of name, or None if there is none yet."""
        _, vkey_path = self._paths(name)
        return vkey_path.read_text(encoding="utf-8").strip() if vkey_path.exists() else None

    def verifier_keys(self) -> list[str]:
        """Return every stored verifier key string (all *.vkey files, rotated keys included)."""
        if not self.directory.is_dir():
            return []
        return [p.read_text(encoding="utf-8").strip() for p in sorted(self.directory.glob("*.vkey"))]

    def verifiers(self) -> list[Verifier]:
        """Return a Verifier for every stored verifier key."""
        return [parse_verifier_key(v) for v in self.verifier_keys()]


def _write_private(path: Path, text: str, exclusive: bool) -> None:
    """Write a file only its owner can read (mode 0600), flushed to disk; exclusive: fail if it exists."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    with os.fdopen(os.open(path, flags, 0o600), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
