"""Receipts a third party checks offline with the public verifier key alone.

An inclusion receipt proves that one ledger row (its leaf) is in the log
under a signed tree head. An absence receipt proves that a sample id is not
in a training run's committed training set: the set is a Merkle tree over the
sorted sample ids, and the receipt carries the two adjacent ids around where
the sample would sort, each with an inclusion proof, plus an inclusion
receipt of the row that committed the set's root to the log.
"""

import base64
import hashlib
import json
from collections.abc import Sequence

from ..errors import FgtracError
from . import merkle, notes
from .members import parse_members


class ReceiptError(FgtracError, ValueError):
    """A receipt that does not verify, with the reason."""


def b64(data: bytes) -> str:
    """Return standard base64 text of bytes."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    """Return the bytes of base64 text; raise ReceiptError naming the field otherwise."""
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ReceiptError(f"{what} is not valid base64") from None


def inclusion_receipt(leaf: bytes, index: int, size: int, proof: Sequence[bytes], checkpoint: str,
                      verifier_key: str) -> dict:
    """Return an inclusion receipt in fgtrac's JSON form."""
    return {"leaf": b64(leaf), "leaf_index": index, "tree_size": size,
            "inclusion_proof": [b64(h) for h in proof], "checkpoint": checkpoint, "verifier_key": verifier_key}


def _verifiers(receipt_key: str, trusted_keys: Sequence[str] | None) -> list[notes.Verifier]:
    keys = list(trusted_keys) if trusted_keys else [receipt_key]
    try:
        return [notes.parse_verifier_key(k) for k in keys]
    except ValueError as exc:
        raise ReceiptError(f"verifier key: {exc}") from None


def open_checkpoint(note: str, verifier_key: str, trusted_keys: Sequence[str] | None = None) -> notes.Checkpoint:
    """Return the checkpoint of a signed note after checking its signature."""
    try:
        return notes.parse_checkpoint(notes.open_note(note, _verifiers(verifier_key, trusted_keys)))
    except ValueError as exc:
        raise ReceiptError(f"checkpoint: {exc}") from None


def verify_inclusion_receipt(receipt: dict, trusted_keys: Sequence[str] | None = None) -> dict:
    """Return the receipt's leaf as parsed JSON once signature and inclusion proof hold; raise ReceiptError otherwise."""
    try:
        leaf = unb64(receipt["leaf"], "leaf")
        index, size = receipt["leaf_index"], receipt["tree_size"]
        proof = [unb64(h, "inclusion_proof element") for h in receipt["inclusion_proof"]]
        cp = open_checkpoint(receipt["checkpoint"], receipt.get("verifier_key", ""), trusted_keys)
    except KeyError as exc:
        raise ReceiptError(f"missing field {exc}") from None
    if cp.size != size:
        raise ReceiptError(f"tree_size {size} differs from the signed checkpoint's size {cp.size}")
    if not (verdict := merkle.verify_inclusion(leaf, index, size, proof, cp.root)):
        raise ReceiptError(f"inclusion proof for leaf {index} does not match the signed root of tree size {size} "
                           f"({verdict.reason})")
    try:
        return json.loads(leaf)
    except ValueError:
        raise ReceiptError("leaf is not JSON") from None


def member_receipt(group_receipt: dict, index: int, members: bytes) -> dict:
    """Return a member receipt: a group leaf's inclusion receipt plus the group's members bytes and the member's index."""
    return {**group_receipt, "member": {"index": index, "members": b64(members)}}


def verify_member_receipt(receipt: dict, trusted_keys: Sequence[str] | None = None) -> dict:
    """Return the event row a member receipt proves (group columns plus sample_id, position, detail); raise ReceiptError otherwise."""
    group = verify_inclusion_receipt(receipt, trusted_keys)
    try:
        index, data = receipt["member"]["index"], unb64(receipt["member"]["members"], "member.members")
    except (KeyError, TypeError):
        raise ReceiptError("malformed member receipt: needs member.index and member.members") from None
    if group.get("table") != "event_groups":
        raise ReceiptError("a member receipt's leaf must be an event_groups row")
    if hashlib.sha256(data).hexdigest() != group.get("members"):
        raise ReceiptError("the members bytes do not hash to the group's committed members digest")
    try:
        members = parse_members(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReceiptError(f"members bytes: {exc}") from None
    if len(members) != group.get("size") or not isinstance(index, int) or not 0 <= index < len(members):
        raise ReceiptError(f"member index {index} is not within the group's {group.get('size')} members")
    sample_id, detail = members[index]
    shared = {k: v for k, v in group.items() if k not in ("table", "first_position", "size", "members")}
    return {**shared, "table": "events", "sample_id": sample_id, "position": group["first_position"] + index,
            "detail": detail}


def set_leaf(sample_id: str) -> bytes:
    """Return the training-set tree leaf of a sample id (its 32 raw bytes)."""
    return bytes.fromhex(sample_id)


def absence_receipt(sample_id: str, training_run: str, set_size: int, set_root: bytes,
                    left: tuple[str, int, Sequence[bytes]] | None, right: tuple[str, int, Sequence[bytes]] | None,
                    commitment: dict) -> dict:
    """Return an absence receipt: the neighbours of sample_id in the sorted set, and the set's committed root."""
    def side(x):
        return None if x is None else {"sample_id": x[0], "index": x[1], "proof": [b64(h) for h in x[2]]}

    return {"kind": "absent", "sample_id": sample_id, "training_run": training_run, "set_size": set_size,
            "set_root": b64(set_root), "left": side(left), "right": side(right), "commitment": commitment}


def verify_absence_receipt(receipt: dict, trusted_keys: Sequence[str] | None = None) -> None:
    """Return None if the receipt proves sample_id is absent from the run's committed set; raise ReceiptError otherwise."""
    try:
        target = set_leaf(receipt["sample_id"])
        size, root = receipt["set_size"], unb64(receipt["set_root"], "set_root")
        left, right, run = receipt["left"], receipt["right"], receipt["training_run"]
        commitment = receipt["commitment"]
    except (KeyError, ValueError) as exc:
        raise ReceiptError(f"malformed absence receipt ({exc})") from None
    row = verify_inclusion_receipt(commitment, trusted_keys)
    if row.get("table") != "training_sets" or row.get("training_run") != run:
        raise ReceiptError("the commitment is not the training-set row of this run")
    if row.get("size") != size or row.get("root") != root.hex():
        raise ReceiptError("set size/root differ from the committed training-set row")
    if size == 0:
        if left or right or root != merkle.EMPTY_ROOT:
            raise ReceiptError("an empty set has no neighbours and the empty root")
        return
    neighbours = []
    for name, side in (("left", left), ("right", right)):
        if side is None:
            neighbours.append(None)
            continue
        value = set_leaf(side["sample_id"])
        proof = [unb64(h, f"{name} proof element") for h in side["proof"]]
        if not (verdict := merkle.verify_inclusion(value, side["index"], size, proof, root)):
            raise ReceiptError(f"{name} neighbour's inclusion proof does not match the set root ({verdict.reason})")
        neighbours.append((value, side["index"]))
    lo, hi = neighbours
    if lo is None and hi is None:
        raise ReceiptError("no neighbour given")
    if lo is not None and not lo[0] < target:
        raise ReceiptError("left neighbour does not sort before the sample")
    if hi is not None and not target < hi[0]:
        raise ReceiptError("right neighbour does not sort after the sample")
    if lo is None and hi[1] != 0:
        raise ReceiptError("without a left neighbour the right one must be the first element")
    if hi is None and lo[1] != size - 1:
        raise ReceiptError("without a right neighbour the left one must be the last element")
    if lo is not None and hi is not None and hi[1] != lo[1] + 1:
        raise ReceiptError("neighbours are not adjacent in the set")


def verify_consistency_receipt(receipt: dict, trusted_keys: Sequence[str] | None = None) -> tuple[int, int]:
    """Return (old size, new size) if the proof shows the old signed tree is a prefix of the new; raise otherwise."""
    try:
        key = receipt["verifier_key"]
        old = open_checkpoint(receipt["old_checkpoint"], key, trusted_keys)
        new = open_checkpoint(receipt["new_checkpoint"], key, trusted_keys)
        proof = [unb64(h, "proof element") for h in receipt["proof"]]
    except (KeyError, TypeError) as exc:
        raise ReceiptError(f"malformed consistency proof (missing {exc})") from None
    if old.origin != new.origin:
        raise ReceiptError(f"the checkpoints are of different logs ({old.origin!r}, {new.origin!r})")
    if not (verdict := merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)):
        raise ReceiptError(f"the consistency proof does not verify ({verdict.reason})")
    return old.size, new.size


def verify_receipt(receipt: dict, trusted_keys: Sequence[str] | None = None) -> str:
    """Return a one-line description of what a receipt proves; raise ReceiptError if it does not verify."""
    if "old_checkpoint" in receipt:
        old, new = verify_consistency_receipt(receipt, trusted_keys)
        return f"consistent: the signed tree of size {old} is a prefix of the signed tree of size {new}"
    if receipt.get("kind") == "absent":
        verify_absence_receipt(receipt, trusted_keys)
        return f"absent: sample {receipt['sample_id'][:16]}… is not in training run {receipt['training_run']}'s set"
    if "member" in receipt:
        row = verify_member_receipt(receipt, trusted_keys)
        return (f"included: leaf {receipt['leaf_index']} of {receipt['tree_size']} (events {row.get('kind')}, sample "
                f"{str(row.get('sample_id'))[:16]}…, member {receipt['member']['index']} of the step's group)")
    row = verify_inclusion_receipt(receipt, trusted_keys)
    what = row.get("kind") or "row"
    subject = row.get("sample_id") or row.get("train_sample_id") or row.get("test_sample_id") or ""
    return f"included: leaf {receipt['leaf_index']} of {receipt['tree_size']} ({row.get('table')} {what}" + \
           (f", sample {subject[:16]}…" if subject else "") + ")"
