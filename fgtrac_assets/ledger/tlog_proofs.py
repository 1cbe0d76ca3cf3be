"""C2SP tlog-proof files for a sample: one per log entry about it, with the entry's bytes beside it.

The rows are those `fgtrac prove` finds (proofs.sample_receipts): the sample's own rows, its
events, its influence rows. A grouped event's log entry is its event_groups row; the group's
members bytes (fgtrac/members/v1, whose SHA-256 is the row's `members`) are written beside it,
since the tlog-proof covers the group's entry and the members bytes show the sample is in it.
"""

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import StorageError
from ..integrity.tlog_proof import FILE_SUFFIX, format_tlog_proof
from .proofs import sample_receipts
from .store import Ledger
from .witnessing import cosigned_note

LEAF_SUFFIX = ".leaf"
MEMBERS_SUFFIX = ".members"


@dataclass(frozen=True)
class ProofFile:
    """One written proof: the entry's log index, and the paths of its proof, entry and (for a group) members files."""

    index: int
    proof: Path
    leaf: Path
    members: Path | None = None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{path}: cannot write the proof file ({exc.strerror or exc})") from None


def tlog_proofs_for_sample(ledger: Ledger, sample_id: str, out_dir: str | os.PathLike,
                           asset: str | None = None) -> list[ProofFile]:
    """Write DIR/<index>.tlog-proof and DIR/<index>.leaf for every log entry about the sample; return them in log order.

    Raises proofs.ProofError (a ValueError) if the sample has no ledger row, StorageError if DIR cannot be written.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{out}: cannot make the output folder ({exc.strerror or exc})") from None
    written: dict[int, ProofFile] = {}
    receipts = sample_receipts(ledger, sample_id, asset)
    with ledger.reader(code_views=False) as con:  # the head with the witnesses' cosignatures stored beside it
        checkpoint = cosigned_note(con, receipts[0]["tree_size"]) or receipts[0]["checkpoint"]
    for receipt in receipts:
        index = receipt["leaf_index"]
        if index in written:  # several events of the sample in one group share the group's entry
            continue
        proof = [base64.b64decode(h) for h in receipt["inclusion_proof"]]
        files = ProofFile(index, out / f"{index}{FILE_SUFFIX}", out / f"{index}{LEAF_SUFFIX}",
                          out / f"{index}{MEMBERS_SUFFIX}" if "member" in receipt else None)
        _write(files.leaf, base64.b64decode(receipt["leaf"]))
        if files.members is not None:
            _write(files.members, base64.b64decode(receipt["member"]["members"]))
        _write(files.proof, format_tlog_proof(index, proof, checkpoint).encode("utf-8"))
        written[index] = files
    return [written[i] for i in sorted(written)]
