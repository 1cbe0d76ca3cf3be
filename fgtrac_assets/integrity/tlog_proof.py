"""C2SP tlog-proof@v1: an offline-verifiable proof that an entry is in a log, as text.

    c2sp.org/tlog-proof@v1
    [extra <base64 opaque data>]
    index <decimal, no leading zeros>
    <base64 hash>            zero or more: the RFC 6962 inclusion proof, leaf's sibling first
    <empty line>
    <the checkpoint: a signed note, verbatim, with its signatures and cosignatures>

Verification follows the spec's steps: the leaf hash SHA-256(0x00 || leaf); the checkpoint's
origin and its signature by a log key configured for that origin (a verifier key whose name is
the origin, as C2SP tlog-checkpoint recommends, optionally pinned to one origin); the witness
policy (a hook); the inclusion proof against the signed root.
"""

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FgtracError
from . import merkle, notes

HEADER = "c2sp.org/tlog-proof@v1"
FILE_SUFFIX = ".tlog-proof"
_INDEX = re.compile(r"index (0|[1-9][0-9]*)")
_MAX_PROOF = 64  # an inclusion proof in a tree of fewer than 2**64 leaves


class TlogProofError(FgtracError, ValueError):
    """A tlog-proof that is malformed or does not verify, with the reason."""


@dataclass(frozen=True)
class TlogProof:
    """A parsed tlog-proof: entry index, inclusion proof (leaf upward), signed checkpoint note, extra data."""

    index: int
    proof: tuple[bytes, ...]
    checkpoint: str
    extra: bytes | None = None


def format_tlog_proof(index: int, proof: Sequence[bytes], checkpoint: str, extra: bytes | None = None) -> str:
    """Return the tlog-proof@v1 text for an entry index, its inclusion proof and the signed checkpoint note."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise TlogProofError(f"index must be a non-negative int, got {index!r}")
    if any(len(h) != merkle.HASH_SIZE for h in proof):
        raise TlogProofError("every inclusion proof element must be a 32-byte hash")
    notes.split_note(checkpoint)  # raises NoteError (a ValueError) if it is not a signed note
    lines = [HEADER]
    if extra:
        lines.append("extra " + base64.b64encode(extra).decode("ascii"))
    lines.append(f"index {index}")
    lines += [base64.b64encode(h).decode("ascii") for h in proof]
    return "\n".join(lines) + "\n\n" + checkpoint


def _b64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise TlogProofError(f"malformed tlog-proof: {what} is not base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise TlogProofError(f"malformed tlog-proof: {what} is not canonical base64")
    return raw


def parse_tlog_proof(text: str | bytes) -> TlogProof:
    """Return the TlogProof in a tlog-proof@v1 text, checking its syntax only; raise TlogProofError if malformed."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise TlogProofError("malformed tlog-proof: not valid UTF-8") from None
    head, sep, checkpoint = text.partition("\n\n")
    if not sep:
        raise TlogProofError("malformed tlog-proof: no empty line before the checkpoint")
    lines = head.split("\n")
    if lines[0] != HEADER:
        raise TlogProofError(f"malformed tlog-proof: the first line is not {HEADER}")
    pos, extra = 1, None
    if pos < len(lines) and lines[pos].startswith("extra "):
        extra = _b64(lines[pos][len("extra "):], "extra data")
        pos += 1
    match = _INDEX.fullmatch(lines[pos]) if pos < len(lines) else None
    if match is None:
        raise TlogProofError("malformed tlog-proof: expected an `index N` line (decimal, no leading zeros)")
    hashes = lines[pos + 1:]
    if len(hashes) > _MAX_PROOF:
        raise TlogProofError(f"malformed tlog-proof: {len(hashes)} proof hashes is more than any tree needs")
    proof = []
    for i, line in enumerate(hashes):
        h = _b64(line, f"proof hash {i}")
        if len(h) != merkle.HASH_SIZE:
            raise TlogProofError(f"malformed tlog-proof: proof hash {i} is {len(h)} bytes, not {merkle.HASH_SIZE}")
        proof.append(h)
    try:
        notes.split_note(checkpoint)
    except notes.NoteError as exc:
        raise TlogProofError(f"malformed tlog-proof checkpoint: {exc}") from None
    return TlogProof(int(match.group(1)), tuple(proof), checkpoint, extra)


def _as_verifiers(keys: Sequence[notes.Verifier | str]) -> list[notes.Verifier]:
    try:
        return [notes.parse_verifier_key(k) if isinstance(k, str) else k for k in keys]
    except ValueError as exc:
        raise TlogProofError(f"log verifier key: {exc}") from None


def verify_tlog_proof(proof_text: str | bytes, leaf_bytes: bytes, log_verifiers: Sequence[notes.Verifier | str],
                      witness_check: Callable[[str], object] | None = None,
                      origin: str | None = None) -> tuple[int, notes.Checkpoint]:
    """Return (index, checkpoint) once the proof shows leaf_bytes in a log signed by one of log_verifiers.

    A log verifier counts for the checkpoint whose origin is its key name; origin, if given, is the
    only origin accepted. witness_check(signed note) is called after the log signature verified: it
    rejects by raising (or by returning False). Raises TlogProofError saying what failed.
    """
    parsed = parse_tlog_proof(proof_text)
    if not isinstance(leaf_bytes, (bytes, bytearray)):
        raise TlogProofError("the leaf must be bytes")
    leaf = merkle.leaf_hash(bytes(leaf_bytes))
    claimed = parsed.checkpoint.partition("\n")[0]
    if origin is not None and claimed != origin:
        raise TlogProofError(f"checkpoint origin {claimed!r} is not the expected {origin!r}")
    keys = [v for v in _as_verifiers(log_verifiers) if v.name == claimed]
    if not keys:
        raise TlogProofError(f"no log key is configured for the checkpoint origin {claimed!r}")
    try:
        checkpoint = notes.parse_checkpoint(notes.open_note(parsed.checkpoint, keys))
    except ValueError as exc:
        raise TlogProofError(f"checkpoint: {exc}") from None
    if witness_check is not None and witness_check(parsed.checkpoint) is False:
        raise TlogProofError("the checkpoint's cosignatures do not satisfy the witness policy")
    if not parsed.index < checkpoint.size:
        raise TlogProofError(f"index {parsed.index} is not below the checkpoint's tree size {checkpoint.size}")
    verdict = merkle.verify_inclusion_hash(leaf, parsed.index, checkpoint.size, list(parsed.proof), checkpoint.root)
    if not verdict:
        raise TlogProofError(f"the inclusion proof does not bind this leaf at index {parsed.index} to the signed "
                             f"root of tree size {checkpoint.size} ({verdict.reason})")
    return parsed.index, checkpoint


def check_proof_file(path: Path, log_keys: Sequence[str], policy=None) -> str:
    """Return what a DIR/<index>.tlog-proof file proves, checked with its .leaf (and .members) beside it.

    With a policy (integrity/policy.py), its log keys are the ones trusted and the checkpoint's cosignatures
    must meet its quorum. Raises TlogProofError saying what failed.
    """
    import hashlib
    import json

    stem = path.with_suffix("")
    try:
        text, leaf = path.read_bytes(), stem.with_suffix(".leaf").read_bytes()
    except OSError as exc:
        raise TlogProofError(f"cannot read the proof or its .leaf file beside it ({exc.strerror or exc})") from None
    keys = list(policy.log_keys) if policy is not None else list(log_keys)
    if not keys:
        raise TlogProofError("a tlog-proof carries no key: give --key VKEY or --policy FILE")
    check = None if policy is None else (lambda note: policy.satisfied(policy.cosigners(note)))
    index, checkpoint = verify_tlog_proof(text, leaf, keys, witness_check=check)
    try:
        entry = json.loads(leaf)
    except ValueError:
        entry = {}
    if not isinstance(entry, dict):  # a log entry is a JSON object; anything else names no table
        entry = {}
    what = f"entry {index} ({entry.get('table', 'an entry')}) is in the log of size {checkpoint.size}"
    members = stem.with_suffix(".members")
    if members.exists():
        try:
            digest = hashlib.sha256(members.read_bytes()).hexdigest()
        except OSError as exc:
            raise TlogProofError(f"cannot read {members.name} beside the proof ({exc.strerror or exc})") from None
        if digest != entry.get("members"):
            raise TlogProofError(f"{members.name} does not hash to the entry's members digest")
        what += f", with its {entry.get('size')} members"
    if policy is not None:
        what += f", cosigned by {', '.join(sorted(policy.cosigners(parse_tlog_proof(text).checkpoint)))}"
    return what
