"""The members bytes (fgtrac/members/v1): encoded from plain buffers, decoded back, hashed per run of members."""

import hashlib

import numpy as np
import pytest

from fgtrac_assets.integrity.members import (MAGIC, NULL_LENGTH, StringColumn, members_bytes, members_digests,
                                             parse_members)

IDS = [f"s{i:03d}" for i in range(300)] + ["ünïcode \"quoted\"\n", ""]
DETAILS = [None if i % 3 else f'{{"i": {i}}}' for i in range(len(IDS))]


def test_members_bytes_round_trip_and_digest_per_run():
    ids, details = StringColumn.of(IDS), StringColumn.of(DETAILS)
    data = members_bytes(ids, details)
    assert parse_members(data) == list(zip(IDS, DETAILS))
    bounds = [0, 7, 7, 150, len(IDS)]  # an empty run too
    expect = [hashlib.sha256(members_bytes(StringColumn.of(IDS[a:b]), StringColumn.of(DETAILS[a:b]))).hexdigest()
              for a, b in zip(bounds[:-1], bounds[1:])]
    assert members_digests(ids, details, bounds) == expect
    for bad in (data[:-1], data + b"x", b"fgtrac/members/v2\n" + data[18:]):
        with pytest.raises(ValueError):
            parse_members(bad)


def test_the_layout_is_the_documented_one():
    data = members_bytes(StringColumn.of(["ab", "é"]), StringColumn.of([None, "x"]))
    assert data == (MAGIC + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + "abé".encode()
                    + NULL_LENGTH.to_bytes(4, "big") + (1).to_bytes(4, "big") + b"x")
    assert parse_members(members_bytes(StringColumn.of([]), StringColumn.of([]))) == []


def test_a_column_is_any_slice_of_shared_buffers():
    data = "".join(IDS).encode()
    offsets = np.cumsum([0] + [len(s.encode()) for s in IDS]).astype(np.int64)
    whole = StringColumn(offsets, memoryview(data))
    assert len(whole) == len(IDS)
    part = StringColumn(offsets[10:21], data)  # offsets into the whole buffer, as an Arrow slice has them
    assert members_bytes(part, StringColumn.of([None] * 10)) == members_bytes(StringColumn.of(IDS[10:20]),
                                                                             StringColumn.of([None] * 10))
    assert members_digests(whole, StringColumn.of(DETAILS), [0, 10, 20])[1] == \
        members_digests(part, StringColumn.of(DETAILS[10:20]), [0, 10])[0]
