"""The members bytes of an event group (format fgtrac/members/v1), read back by a receipt's verifier.

    b"fgtrac/members/v1\n" || u32 n
    || n x u32 byte length of sample_id                || the n sample ids' UTF-8, concatenated
    || n x u32 byte length of detail (0xFFFFFFFF: null) || the non-null details' UTF-8, concatenated

u32 is 4-byte big-endian.  Member i has position first_position + i in its group.  The
ledger writes these bytes column-wise from Arrow buffers (ledger/groups.py).
"""

MAGIC = b"fgtrac/members/v1\n"
NULL_LENGTH = 0xFFFFFFFF


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
