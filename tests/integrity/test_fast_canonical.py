"""fast_canonical.encode_rows (and the ledger's Arrow input to it) is byte-identical to rfc8785.dumps, errors too."""

import enum
import math
import random
import struct

import numpy as np
import pyarrow as pa
import pytest
import rfc8785

import fgtrac_assets.integrity.fast_canonical as fc
from fgtrac_assets.integrity.fast_canonical import CanonicalEncodingError, encode_rows, float_text
from fgtrac_assets.ledger.leaves import encode_arrow_rows, row_leaf, to_arrow
from fgtrac_assets.ledger.schema import LEAF_TABLES


def reference(table, columns, data):
    n = len(data[columns[0]])
    return [rfc8785.dumps({"table": table, **{c: data[c][i] for c in columns}}) for i in range(n)]


def encode_row(table, row, columns=None):
    """Return one row's leaf through encode_rows' single-row path (every column folds into the template)."""
    columns = list(row) if columns is None else columns
    return encode_rows(table, columns, {c: [row[c]] for c in columns})[0]


def assert_same(table, columns, data):
    got = encode_rows(table, columns, data)
    want = reference(table, columns, data)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"row {i}: {g!r} != {w!r}"
    return got


# ----------------------------------------------------------------------------- generators

_SPECIAL_CHARS = [chr(c) for c in range(0x20)] + [
    '"', "\\", "/", "\x7f", "\x80", "\x9f", "\xa0", "\xff", "\u2028", "\u2029", "\ufeff", "\ufffd", "\uffff",
    "\U00010000", "\U0001f600", "\U0010ffff", "é", "€", "\u0300", "<", ">", "&", "'", "%", "{", "}"]


def rand_char(rnd: random.Random) -> str:
    r = rnd.random()
    if r < 0.35:
        return chr(rnd.randrange(0x20, 0x7F))
    if r < 0.55:
        return rnd.choice(_SPECIAL_CHARS)
    if r < 0.75:
        c = rnd.randrange(0x80, 0x10000)
        return chr(c) if not 0xD800 <= c <= 0xDFFF else "x"
    if r < 0.9:
        return chr(rnd.randrange(0x10000, 0x110000))  # every supplementary plane
    return chr(rnd.randrange(0x20))


def rand_str(rnd: random.Random) -> str:
    return "".join(rand_char(rnd) for _ in range(rnd.choice([0, 1, 2, 5, 10, 30])))


def clean_str(rnd: random.Random) -> str:
    """A string that needs no escaping (ids, names, unicode text)."""
    s = rand_str(rnd)
    return "".join(ch for ch in s if ch >= " " and ch not in '"\\')


def rand_int(rnd: random.Random) -> int:
    r = rnd.random()
    if r < 0.4:
        return rnd.randrange(-1000, 1000)
    if r < 0.7:
        return rnd.randrange(-(2**53) + 1, 2**53)
    return rnd.choice([0, 1, -1, 2**31, -(2**31), 2**32, 2**53 - 1, -(2**53) + 1, 2**53 - 2, 10**15, 9 * 10**15])


def _bits_float(rnd: random.Random) -> float:
    while True:
        f = struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(f):
            return f


SPECIAL_FLOATS = (
    [0.0, -0.0, 1.0, -1.0, 0.1, 0.2, 0.3, 1 / 3, 2 / 3, 3.0, 100.0, 0.5, 1.5, 123456789.125, 333333333.3333333,
     5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, 1.7976931348623157e308, -1.7976931348623157e308,
     4.35, 0.0933, 0.09330127018922194, 9007199254740991.0, 9007199254740992.0, 9007199254740993.0, 1e16, 1e17,
     9999999999999998.0, 12345678901234567890.0, 123456789012345680000.0, 0.000123, 0.0000123, 0.00000123,
     1.2345e-7, 295147905179352830000.0, 4.5e15, 1e23, 5e-7, 1e-5, 1e-4, 0.001]
    + [10.0**k for k in range(-30, 31)] + [-(10.0**k) for k in range(-30, 31)]
    + [float(f"1e{k}") for k in range(-325, 309)]
    + [2.0**k for k in range(-1074, 1024, 7)]
)
for _x in [1e21, 1e-7, 1e-6, 1e16, 1e-4, 1e-5, 1e20, 2.0**53]:
    for _d in (-math.inf, math.inf):
        _y = _x
        for _ in range(3):
            _y = math.nextafter(_y, _d)
            SPECIAL_FLOATS += [_y, -_y]
    SPECIAL_FLOATS += [_x, -_x]


def rand_float(rnd: random.Random) -> float:
    r = rnd.random()
    if r < 0.25:
        return _bits_float(rnd)
    if r < 0.4:
        return rnd.choice(SPECIAL_FLOATS)
    if r < 0.5:  # subnormal
        f = struct.unpack("<d", rnd.getrandbits(52).to_bytes(8, "little"))[0]
        return -f if rnd.random() < 0.5 else f
    if r < 0.65:
        return round(rnd.uniform(-1000, 1000), rnd.randrange(0, 8))
    if r < 0.8:
        return float(rand_int(rnd))
    if r < 0.9:
        return rnd.uniform(-1, 1) * 10.0 ** rnd.randrange(-30, 30)
    return rnd.random()


def rand_scalar(rnd: random.Random):
    return rnd.choice([rand_str, rand_int, rand_float, lambda r: r.random() < 0.5, lambda r: None])(rnd)


def _nullable(gen, p):
    return lambda rnd: None if rnd.random() < p else gen(rnd)


def _low_card(gen, k):
    def make(rnd):
        pool = [gen(rnd) for _ in range(k)]
        return lambda r: r.choice(pool)
    return make


# Column profiles: how one column of a batch is filled.  Homogeneous ones drive the fast paths.
PROFILES = {
    "clean_str": lambda rnd: clean_str,
    "str": lambda rnd: rand_str,
    "str_or_none": lambda rnd: _nullable(rand_str, 0.3),
    "clean_str_or_none": lambda rnd: _nullable(clean_str, 0.5),
    "hex": lambda rnd: lambda r: r.randbytes(32).hex(),
    "int": lambda rnd: rand_int,
    "int_or_none": lambda rnd: _nullable(rand_int, 0.3),
    "float": lambda rnd: rand_float,
    "float_or_none": lambda rnd: _nullable(rand_float, 0.3),
    "bool": lambda rnd: lambda r: r.random() < 0.5,
    "bool_or_none": lambda rnd: _nullable(lambda r: r.random() < 0.5, 0.3),
    "none": lambda rnd: lambda r: None,
    "mixed": lambda rnd: rand_scalar,
    "low_card_str": lambda rnd: _low_card(rand_str, 5)(rnd),
    "low_card_str_or_none": lambda rnd: _nullable(_low_card(rand_str, 3)(rnd), 0.4),
    "low_card_float": lambda rnd: _low_card(rand_float, 7)(rnd),
    "low_card_float_or_none": lambda rnd: _nullable(_low_card(rand_float, 4)(rnd), 0.2),
    "low_card_mixed": lambda rnd: _low_card(rand_scalar, 6)(rnd),
    "const": lambda rnd: (lambda v: lambda r: v)(rand_scalar(rnd)),
    "const_float": lambda rnd: (lambda v: lambda r: v)(rand_float(rnd)),
}


def random_batch(rnd: random.Random, n: int):
    ncols = rnd.randrange(1, 9)
    columns = []
    while len(columns) < ncols:
        name = rnd.choice(["a", "b", "z", "sample_id", "step", "lr", "Z", "_x", "a1", "a_b", "é", "\u20ac",
                           "\U0001f600", "\ufffd", "k" + str(rnd.randrange(100)), rand_str(rnd)])
        if name not in columns and name != "table":
            columns.append(name)
    data = {}
    for c in columns:
        gen = PROFILES[rnd.choice(list(PROFILES))](rnd)
        data[c] = [gen(rnd) for _ in range(n)]
    return columns, data


# ----------------------------------------------------------------------------- schema tables


def realistic_rows(table: str, n: int, rnd: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        row = {}
        for col, typ in LEAF_TABLES[table]:
            if rnd.random() < 0.1:
                row[col] = None
            elif typ == "BIGINT":
                row[col] = rnd.choice([i, rnd.randrange(10**6), rnd.randrange(2**53), -rnd.randrange(100), 0])
            elif typ == "DOUBLE":
                row[col] = rnd.choice([0.1 * 0.5 * (1 + math.cos(math.pi * i / n)), rnd.random(), rnd.uniform(-3, 3),
                                       1e-8 * rnd.random(), 2.5, 0.0, -0.0, 1e22, rnd.choice(SPECIAL_FLOATS)])
            elif typ == "BOOLEAN":
                row[col] = rnd.random() < 0.5
            elif col in ("detail", "upstream", "reason"):
                row[col] = rnd.choice(['{"loss": 0.25, "note": "ok"}', '{"mnist/raw": "a\\\\b"}', "line1\nline2\ttab",
                                       "naïve — “quoted” 😀", "", "</script>"])
            elif col in ("sample_id", "sha256", "root", "test_sample_id", "train_sample_id"):
                row[col] = rnd.randbytes(32).hex()
            elif col == "created_at":
                row[col] = "2026-11-24T14:25:39.123456+00:00"
            elif col == "path":
                row[col] = f"/data/runs/{rnd.randrange(100)}/ckpt épоch {i}.pt"
            else:
                row[col] = rnd.choice(["mnist", "cora", "run-" + rnd.randbytes(4).hex(), "batched", "proponent"])
        rows.append(row)
    return rows


@pytest.mark.parametrize("table", list(LEAF_TABLES))
def test_schema_tables_match_rfc8785_and_row_leaf(table):
    rnd = random.Random(table)
    rows = realistic_rows(table, 400, rnd)
    columns = [c for c, _ in LEAF_TABLES[table]]
    data = {c: [r[c] for r in rows] for c in columns}
    got = assert_same(table, columns, data)
    assert got == [row_leaf(table, r) for r in rows]
    assert got == [encode_row(table, r) for r in rows]
    # From Arrow, as the store hands tables over (typed columns, to_pylist inside).
    arrow = to_arrow(table, rows)
    assert encode_rows(table, columns, {c: arrow[c] for c in columns}) == got
    assert encode_rows(table, columns, {c: arrow[c].combine_chunks() for c in columns}) == got
    assert encode_arrow_rows(table, columns, arrow) == got


def test_events_batch_with_constant_and_low_cardinality_columns():
    rnd = random.Random(7)
    n = 3000
    data = {
        "sample_id": [rnd.randbytes(32).hex() for _ in range(n)],
        "pipeline": ["mnist"] * n,
        "run_id": ["9c1d4b1e-5a7f-4a8e-9d35-0a4c3f7e1b22"] * n,
        "asset": ["training_events"] * n,
        "kind": [rnd.choice(["batched", "ingested", "split"]) for _ in range(n)],
        "training_run": ["train-1"] * n,
        "epoch": [i // 1000 for i in range(n)],
        "step": [i // 64 for i in range(n)],
        "position": [i % 64 for i in range(n)],
        "lr": [0.1 * 0.5 * (1 + math.cos(math.pi * (i // 64) / 50)) for i in range(n)],
        "checkpoint_id": [None if i % 7 else f"ckpt-{i // 64}" for i in range(n)],
        "detail": [None if i % 5 else '{"loss": %.4f}' % (i / n) for i in range(n)],
    }
    columns = [c for c, _ in LEAF_TABLES["events"]]
    assert_same("events", columns, data)


# ----------------------------------------------------------------------------- randomized


def test_random_rows_match_rfc8785():
    rnd = random.Random(8785)
    rows = 0
    while rows < 24_000:
        n = rnd.choice([1, 2, 3, 5, 17, 40, 100, 250, 600])
        columns, data = random_batch(rnd, n)
        table = rnd.choice(["events", "samples", "t", "é", "a\"b", "\U0001f600", "x\n"])
        assert_same(table, columns, data)
        rows += n


def test_random_rows_across_chunks(monkeypatch):
    monkeypatch.setattr(fc, "_CHUNK", 97)  # many chunks; a column may be constant in one and not the next
    rnd = random.Random(1)
    for _ in range(6):
        n = rnd.randrange(150, 700)
        columns, data = random_batch(rnd, n)
        for c in columns[:1]:  # a run of equal values spanning chunk borders
            data[c][:200] = [data[c][0]] * len(data[c][:200])
        assert_same("events", columns, data)


def test_float_text_matches_rfc8785():
    rnd = random.Random(0)
    floats = list(SPECIAL_FLOATS) + [rand_float(rnd) for _ in range(60_000)]
    for f in floats:
        assert float_text(f).encode() == rfc8785.dumps(f), repr(f)
    # The same values as one float column (cached and uncached paths).
    data = {"x": floats}
    assert encode_rows("t", ["x"], data) == [b'{"table":"t","x":' + rfc8785.dumps(f) + b"}" for f in floats]


def test_number_formatting_examples():
    cases = [(1e-7, "1e-7"), (1e21, "1e+21"), (1e20, "100000000000000000000"), (0.1, "0.1"), (-0.0, "0"),
             (0.0, "0"), (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
             (123456789.125, "123456789.125"), (3.0, "3"), (-3.0, "-3"), (1e-6, "0.000001"), (1.5e-6, "0.0000015"),
             (-1e-7, "-1e-7"), (1e16, "10000000000000000"), (math.nextafter(1e-7, 0), "9.999999999999998e-8"),
             (math.nextafter(1e21, 0), "999999999999999900000"), (1e300, "1e+300"), (2.5e-5, "0.000025"),
             (333333333.3333333, "333333333.3333333"), (2.0**53, "9007199254740992"), (-1e21, "-1e+21")]
    for f, text in cases:
        assert float_text(f) == text
        assert rfc8785.dumps(f).decode() == text


def test_int_bounds_match_rfc8785():
    ok = [2**53 - 1, -(2**53) + 1, 0, -1]
    assert encode_rows("t", ["n"], {"n": ok}) == [rfc8785.dumps({"table": "t", "n": v}) for v in ok]
    for bad in [2**53, -(2**53), 2**64, -(10**30)]:
        with pytest.raises(rfc8785.IntegerDomainError):
            rfc8785.dumps(bad)
        for col in ([1, bad], [bad], [None, bad], [bad, "x"], [bad] * 5):
            with pytest.raises(CanonicalEncodingError, match="'n'.*exceeds safe integer"):
                encode_rows("t", ["n"], {"n": col})


def test_string_escaping_matches_rfc8785():
    every_control = "".join(chr(c) for c in range(0x20))
    strings = [every_control, '"', "\\", '\\"', "/", "\x7f", "\u2028\u2029", "😀", "\U0010ffff", "a\x00b", "\x1f",
               "é€\ufeff\ufffd\uffff", "", " ", "'", "%s%d{0}{}", "\\u0000"] + [chr(c) for c in range(0x80)]
    got = encode_rows("t", ["s"], {"s": strings})
    assert got == [rfc8785.dumps({"table": "t", "s": s}) for s in strings]
    assert got[0] == (b'{"s":"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r\\u000e'
                      b'\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018\\u0019\\u001a\\u001b'
                      b'\\u001c\\u001d\\u001e\\u001f","table":"t"}')
    assert got[6] == '{"s":"\u2028\u2029","table":"t"}'.encode()  # literal, unlike JSON-in-JS escapers
    # Clean strings take the unescaped fast path; same bytes.
    clean = ["abc", "été", "😀/x", "\x7f", "\u2028"]
    assert encode_rows("t", ["s"], {"s": clean}) == [rfc8785.dumps({"table": "t", "s": s}) for s in clean]


def test_key_order_is_utf16():
    # U+1F600 is D83D DE00 in UTF-16, so it sorts before U+FFFD (but after it by code point).
    columns = ["\ufffd", "\U0001f600", "Z", "a", "é", "table_", "tablf", "tabl", "_"]
    data = {c: [i, None] for i, c in enumerate(columns)}
    got = assert_same("t", columns, data)
    assert got[0].decode().index("\U0001f600") < got[0].decode().index("\ufffd")


def test_table_column_and_duplicates_follow_dict_semantics():
    data = {"table": ["override", None], "a": [1, 2]}
    assert assert_same("events", ["a", "table", "a"], data)[0] == b'{"a":1,"table":"override"}'


def test_subclasses_and_numpy_scalars_like_rfc8785():
    class Color(enum.IntEnum):
        RED = 3

    class Name(str, enum.Enum):
        A = "a\nb"

    class MyFloat(float):
        pass

    values = [Color.RED, Name.A, MyFloat(2.0), np.float64(0.1), np.float64(1e21), True, None, "x"]
    for v in values:
        assert encode_rows("t", ["v"], {"v": [v]}) == [rfc8785.dumps({"table": "t", "v": v})]
        assert encode_rows("t", ["v"], {"v": [v, v, v]}) == [rfc8785.dumps({"table": "t", "v": v})] * 3
    assert encode_rows("t", ["v"], {"v": values}) == [rfc8785.dumps({"table": "t", "v": v}) for v in values]


def test_booleans_are_not_ints():
    for col in ([True, 1, 1.0], [1, True], [1.0, True, None], [True] * 4, [1] * 3 + [True], [0, False, 0.0, -0.0]):
        assert_same("t", ["v"], {"v": col})


def test_inputs_arrow_numpy_tuple():
    ints = [1, 2, None, 4]
    floats = [0.5, None, 3.0, 1e-7]
    strs = ["a", None, "b\n", "c"]
    want = reference("t", ["i", "f", "s"], {"i": ints, "f": floats, "s": strs})
    chunked = {"i": pa.chunked_array([[1, 2], [None, 4]]), "f": pa.chunked_array([[0.5], [None, 3.0, 1e-7]]),
               "s": pa.chunked_array([["a", None], ["b\n", "c"]])}
    assert encode_rows("t", ["i", "f", "s"], chunked) == want
    assert encode_rows("t", ["i", "f", "s"], {"i": pa.array(ints), "f": pa.array(floats), "s": pa.array(strs)}) == want
    assert encode_rows("t", ["i", "f", "s"], {"i": tuple(ints), "f": tuple(floats), "s": tuple(strs)}) == want
    arr = {"i": np.array([1, 2, 3]), "f": np.array([0.5, 2.0, -0.0]), "b": np.array([True, False, True])}
    assert encode_rows("t", list(arr), arr) == reference("t", list(arr), {k: v.tolist() for k, v in arr.items()})


@pytest.mark.parametrize("chunk", [None, 333])
def test_arrow_dictionary_path(monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(fc, "_CHUNK", chunk)
    rnd = random.Random(3)
    n = 2000
    data = {
        "const": ["mnist"] * n,
        "const_escaped": ['a"b\n\u2028'] * n,
        "low": [rnd.choice(["batched", "x\ny", "é😀", "", "\x7f"]) for _ in range(n)],
        "low_null": [rnd.choice([None, None, "ckpt-1", "q\"uote"]) for _ in range(n)],
        "all_null": [None] * n,
        "mostly_const": ["a"] * (n - 1) + [None],
        "high": [rnd.randbytes(8).hex() + rnd.choice(["", "\t"]) for _ in range(n)],
        "late_variety": ["same"] * 1500 + [rand_str(rnd) for _ in range(500)],
        "i": [rnd.randrange(5) for _ in range(n)],
        "f": [rnd.choice([0.5, 1e21, None]) for _ in range(n)],
    }
    columns = list(data)
    want = reference("t", columns, data)
    types = {c: pa.large_string() if c == "low" else None for c in columns}
    arrays = {c: pa.array(v, type=types[c]) for c, v in data.items()}
    assert encode_arrow_rows("t", columns, arrays) == want
    chunked = {c: pa.chunked_array([a.slice(0, 700), a.slice(700, 5), a.slice(705)]) for c, a in arrays.items()}
    assert encode_arrow_rows("t", columns, chunked) == want
    assert encode_arrow_rows("t", columns, pa.table(arrays)) == want
    assert encode_rows("t", columns, arrays) == want  # Arrow arrays in a plain mapping: their values
    with pytest.raises(KeyError, match="'missing'"):
        encode_arrow_rows("t", [*columns, "missing"], pa.table(arrays))


def test_dictionary_column_matches_its_values():
    values, codes = ["a", 'q"uote\n', "é😀"], np.array([0, 1, -1, 2, 0, -1])
    rows = [None if c < 0 else values[c] for c in codes]
    want = [rfc8785.dumps({"table": "t", "s": v}) for v in rows]
    assert encode_rows("t", ["s"], {"s": fc.dictionary_column(values, codes, "s")}) == want
    one = fc.dictionary_column(["x"], np.zeros(3, int))
    assert encode_rows("t", ["s"], {"s": one}) == [b'{"s":"x","table":"t"}'] * 3
    assert encode_rows("t", ["s"], {"s": fc.dictionary_column([], np.full(2, -1))}) == [b'{"s":null,"table":"t"}'] * 2
    with pytest.raises(CanonicalEncodingError, match="'s'.*non-UTF-8"):
        fc.dictionary_column(["ok", "x\ud800"], np.array([0, 1]), "s")


def test_empty_and_single_row():
    assert encode_rows("t", ["a"], {"a": []}) == []
    assert encode_rows("t", ["a"], {"a": [None]}) == [b'{"a":null,"table":"t"}']
    assert encode_row("t", {"b": 1.0, "a": "x"}, columns=["a"]) == b'{"a":"x","table":"t"}'


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("shape", ["float", "nullable", "mixed", "alone", "const", "low_card"])
def test_non_finite_floats_raise(bad, shape):
    with pytest.raises(rfc8785.FloatDomainError):
        rfc8785.dumps(bad)
    col = {"float": [0.5, bad, 1.5], "nullable": [None, 0.5, bad], "mixed": ["x", 1, bad], "alone": [bad],
           "const": [bad] * 3, "low_card": [0.5] * 50 + [bad]}[shape]
    with pytest.raises(CanonicalEncodingError, match="'lr'.*not representable") as exc:
        encode_rows("events", ["step", "lr"], {"step": [1] * len(col), "lr": col})
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, rfc8785.CanonicalizationError)
    assert exc.value.column == "lr" and exc.value.row == col.index(bad)
    with pytest.raises(ValueError, match="'lr'"):
        encode_row("events", {"lr": bad})


@pytest.mark.parametrize("bad", [b"bytes", [1, 2], {"a": 1}, (1,), np.int64(3), np.bool_(True), 1j, object(),
                                 __import__("decimal").Decimal("1.5"), __import__("datetime").date(2026, 1, 1)])
def test_unsupported_types_raise(bad):
    with pytest.raises(CanonicalEncodingError, match="'detail' row 1: unsupported type"):
        encode_rows("events", ["detail"], {"detail": [None, bad, "x"]})
    with pytest.raises(CanonicalEncodingError, match="'detail'"):
        encode_rows("events", ["detail"], {"detail": [bad] * 3})
    with pytest.raises(CanonicalEncodingError, match="'detail'"):
        encode_row("events", {"detail": bad})


@pytest.mark.parametrize("shape", ["clean", "escaped", "nullable", "low_card", "mixed", "const"])
def test_lone_surrogates_raise_like_rfc8785(shape):
    bad = "ab\ud800c"
    with pytest.raises(rfc8785.CanonicalizationError, match="non-UTF-8"):
        rfc8785.dumps({"s": bad})
    col = {"clean": ["x", bad, "y"], "escaped": ["x\n", bad, "y"], "nullable": [None, bad, "y"],
           "low_card": ["x"] * 40 + [bad], "mixed": [1, bad, 2.0], "const": [bad] * 3}[shape]
    with pytest.raises(CanonicalEncodingError, match="'s'.*non-UTF-8") as exc:
        encode_rows("t", ["n", "s"], {"n": list(range(len(col))), "s": col})
    assert exc.value.column == "s"
    assert exc.value.row == col.index(bad)
    with pytest.raises(CanonicalEncodingError):
        encode_rows("t\udfff", ["n"], {"n": [1]})
    with pytest.raises(CanonicalEncodingError):
        encode_rows("t", ["n\udfff"], {"n\udfff": [1]})


def test_error_rows_count_from_the_start_across_chunks(monkeypatch):
    monkeypatch.setattr(fc, "_CHUNK", 10)
    for col in (["ok"] * 25 + ["x\udc00"], ["ok\n"] * 25 + ["x\udc00"], [None] * 25 + ["x\udc00"],
                [0.5] * 25 + [math.nan], [1] * 25 + [2**60], [1] * 25 + [b"x"]):
        with pytest.raises(CanonicalEncodingError) as exc:
            encode_rows("t", ["c"], {"c": col + [col[0]] * 3})
        assert (exc.value.column, exc.value.row) == ("c", 25)


def test_shape_errors():
    with pytest.raises(CanonicalEncodingError, match="differ in length"):
        encode_rows("t", ["a", "b"], {"a": [1, 2], "b": [1]})
    with pytest.raises(KeyError, match="'b'"):
        encode_rows("t", ["a", "b"], {"a": [1]})
    with pytest.raises(CanonicalEncodingError):
        encode_rows("t", [], {})
    with pytest.raises(CanonicalEncodingError):
        encode_rows("t", ["a"], {"a": "abc"})


def test_assembler_cache_handles_odd_pieces():
    # Key texts with quotes, backslashes, braces and percent signs end up inside generated source.
    columns = ["'''", '"', "\\", "{x}", "%s", "\n", "f'{1}'"]
    data = {c: [i, "v"] for i, c in enumerate(columns)}
    assert_same("t'\"{}", columns, data)
