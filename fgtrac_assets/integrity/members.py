"""The members bytes of an event group (format fgtrac/members/v1): encoded for the log, decoded by a receipt's verifier.

    b"fgtrac/members/v1\n" || u32 n
    || n x u32 byte length of sample_id                || the n sample ids' UTF-8, concatenated
    || n x u32 byte length of detail (0xFFFFFFFF: null) || the non-null details' UTF-8, concatenated

u32 is 4-byte big-endian.  Member i has position first_position + i in its group.  The
encoder works column-wise on plain buffers (:class:`StringColumn`: offsets, UTF-8 data,
null mask), so a caller holding Arrow string arrays hands over slices of their buffers
and a group's digest is one hash pass over them (ledger/groups.py does that).
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = b"fgtrac/members/v1\n"
NULL_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class StringColumn:
    """n strings as buffers: n + 1 int64 offsets into the UTF-8 data (string i is data[offsets[i]:offsets[i+1]]),
    and a boolean null mask (None: no nulls)."""

    offsets: np.ndarray
    data: bytes | memoryview
    nulls: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def of(cls, values: Sequence[str | None]) -> "StringColumn":
        """Return the column holding these strings (None: null)."""
        encoded = [b"" if v is None else v.encode("utf-8") for v in values]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        nulls = np.array([v is None for v in values], dtype=bool)
        return cls(offsets, b"".join(encoded), nulls if nulls.any() else None)


def _lengths(column: StringColumn) -> memoryview:
    """Return the column's u32 big-endian byte lengths (NULL_LENGTH for nulls), concatenated."""
    if column.nulls is not None and column.nulls.all():  # e.g. the details of steps, which have none
        return memoryview(np.full(len(column), NULL_LENGTH, dtype=">u4").tobytes())
    lengths = np.diff(column.offsets).astype(">u4")
    if column.nulls is not None:
        lengths[column.nulls] = NULL_LENGTH
    return memoryview(lengths.tobytes())


def members_digests(sample_ids: StringColumn, details: StringColumn, bounds: Sequence[int]) -> list[str]:
    """Return the hex SHA-256 of the members bytes of each run [bounds[g], bounds[g+1]) of these columns."""
    columns = [(_lengths(c), c.offsets, memoryview(c.data)) for c in (sample_ids, details)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        h = hashlib.sha256(MAGIC + (b - a).to_bytes(4, "big"))
        for lengths, off, data in columns:
            h.update(lengths[4 * a:4 * b])
            h.update(data[off[a]:off[b]])
        out.append(h.hexdigest())
    return out


def members_bytes(sample_ids: StringColumn, details: StringColumn) -> bytes:
    """Return the members bytes (fgtrac/members/v1) of these (sample_id, detail) columns."""
    parts = [MAGIC, len(sample_ids).to_bytes(4, "big")]
    for c in (sample_ids, details):
        parts += [bytes(_lengths(c)), bytes(memoryview(c.data)[c.offsets[0]:c.offsets[-1]])]
    return b"".join(parts)


def parse_members(data: bytes) -> list[tuple[str, str | None]]:
    """Return the (sample_id, detail) pairs of members bytes; raise ValueError naming what is malformed."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ValueError("members bytes do not start with fgtrac/members/v1")
    pos = len(MAGIC)
    n = int.from_bytes(data[pos:pos + 4], "big")
    pos += 4
    columns = []
    for what in ("sample_id", "detail"):
        lengths = [int.from_bytes(data[pos + 4 * i:pos + 4 * i + 4], "big") for i in range(n)]
        pos += 4 * n
        values = []
        for length in lengths:
            if length == NULL_LENGTH and what == "detail":
                values.append(None)
                continue
            if pos + length > len(data):
                raise ValueError(f"members bytes end inside a {what}")
            values.append(data[pos:pos + length].decode("utf-8"))
            pos += length
        columns.append(values)
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the last member")
    return list(zip(*columns)) if n else []
