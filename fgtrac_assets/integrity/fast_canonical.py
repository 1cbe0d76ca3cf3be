"""Column-wise RFC 8785 (JCS) encoding of flat ledger rows, byte-identical to ``rfc8785.dumps``.

A ledger leaf is ``rfc8785.dumps({"table": table, **row})`` where every value is a
``str``, ``int``, ``float``, ``bool`` or ``None``.  ``rfc8785.dumps`` walks each row in
Python; :func:`encode_rows` instead works a column at a time:

* the object keys (``"table"`` plus the columns) are sorted once, by UTF-16 code units,
  into fixed text pieces (``{"asset":``, ``,"epoch":`` ...);
* each column becomes, once, either its raw values (an all-``str`` column whose text
  needs no escaping, checked in bulk with numpy; an all-``int`` column, range-checked
  with ``min``/``max``), a constant (an all-``None`` column), or a list of JSON fragments
  (escaped strings, formatted floats, ``true``/``false``/``null``), repeated values
  being formatted only once (a caller that already knows a column's distinct values, e.g.
  from an Arrow dictionary, hands it over as :func:`dictionary_column`);
* one generated f-string comprehension glues the pieces and the column values of each
  row together and encodes it to UTF-8.

The output equals ``rfc8785.dumps`` exactly, including its particular choices:

* strings: ``"`` and ``\\`` escaped, U+0000..U+001F as ``\\b \\t \\n \\f \\r`` or
  ``\\u00xx`` (lowercase hex); everything else (``/``, DEL, U+2028/9, non-BMP) literal
  UTF-8.  That is exactly what ``json.encoder.encode_basestring`` (the C escaper behind
  ``json.dumps(..., ensure_ascii=False)``) produces.  Lone surrogates are rejected.
* ints: only ``-(2**53 - 1) <= n <= 2**53 - 1`` (rfc8785 raises ``IntegerDomainError``
  beyond, and so do we).  ``bool`` is ``true``/``false``, never ``1``/``0``.
* floats: ECMAScript ``Number::toString`` as rfc8785 derives it from Python's shortest
  round-trip ``repr``: ``3.0 -> 3``, ``-0.0 -> 0``, ``1e20 -> 100000000000000000000``,
  ``1e21 -> 1e+21``, ``1e-6 -> 0.000001``, ``1e-7 -> 1e-7``.  NaN and infinities raise.
* ``int``/``float``/``str`` subclasses are formatted as their base values (``IntEnum``,
  ``numpy.float64``), like rfc8785; other types (``numpy.int64``, ``numpy.bool_``,
  ``bytes``, lists, dicts, ...) raise :class:`CanonicalEncodingError`.  (rfc8785 would
  serialise a list or dict value; ledger columns are scalars, so one is a bug here.)

Errors are :class:`CanonicalEncodingError`, a ``rfc8785.CanonicalizationError`` and so
a ``ValueError``, naming the column and, where known, the row.
"""

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from json.encoder import encode_basestring as _json_escape  # the C escaper (ensure_ascii=False)

import numpy as np
import rfc8785

__all__ = ["CanonicalEncodingError", "EncodedColumn", "dictionary_column", "encode_rows", "float_text",
           "key_layout"]

_INT_MAX = 2**53 - 1
_INT_MIN = -(2**53) + 1
_CHUNK = 1 << 16  # rows per pass: bounds temporaries, keeps the escape check cache-friendly
_NoneType = type(None)
_BOOL_TEXT = {True: "true", False: "false", None: "null"}
_SCALAR_TYPES = frozenset({str, int, float, bool, _NoneType})
_SURROGATES = "string contains non-UTF-8 code points (lone surrogates)"
_float_repr = float.__repr__
_int_repr = int.__repr__


class CanonicalEncodingError(rfc8785.CanonicalizationError):
    """A value that RFC 8785 (as rfc8785 implements it) cannot encode; names column and row."""

    def __init__(self, message: str, column: str | None = None, row: int | None = None) -> None:
        where = "" if column is None else f"column {column!r}" + ("" if row is None else f" row {row}") + ": "
        super().__init__(where + message)
        self.column = column
        self.row = row


# --------------------------------------------------------------------------- scalars


def float_text(f: float) -> str:
    """Return rfc8785's text for a finite float (ECMAScript Number::toString)."""
    if f != f or f in (math.inf, -math.inf):
        raise CanonicalEncodingError(f"{f} is not representable in JCS")
    return _fix_float_repr(_float_repr(f))


def _fix_float_repr(r: str) -> str:
    """Turn Python's repr of a finite float into rfc8785's text (same digits, JS layout)."""
    if r[-2:] == ".0":  # integral value below 1e16 (repr never writes "x.0e..")
        return "0" if r == "-0.0" else r[:-2]
    if "e" not in r:
        return r  # 1e-4 <= |f| < 1e16 with a fraction: identical
    sign = ""
    if r[0] == "-":
        sign, r = "-", r[1:]
    mantissa, exp_text = r.split("e")
    exp = int(exp_text)
    digits = mantissa.replace(".", "")
    if 0 < exp < 21:  # plain integer, up to 21 digits (repr gives <= 17 digits, exp >= 16)
        return sign + digits + "0" * (exp - len(digits) + 1)
    if -7 < exp < 0:  # 0.00000ddd down to 1e-6 (repr uses exponents below 1e-4)
        return sign + "0." + "0" * (-exp - 1) + digits
    return f"{sign}{mantissa}e{'+' if exp > 0 else '-'}{abs(exp)}"  # exponent without leading zeros


def _scalar_text(v: object, column: str | None = None, row: int | None = None) -> str:
    """Return the JSON text of one value exactly as rfc8785.dump would write it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        v = int(v)
        if v < _INT_MIN or v > _INT_MAX:
            raise CanonicalEncodingError(f"{v} exceeds safe integer domain for JSON floats", column, row)
        return _int_repr(v)
    if isinstance(v, str):
        if not _is_utf8(v):
            raise CanonicalEncodingError(_SURROGATES, column, row)
        return _json_escape(v)
    if isinstance(v, float):
        v = float(v)
        if v != v or v in (math.inf, -math.inf):
            raise CanonicalEncodingError(f"{v} is not representable in JCS (finite numbers only)", column, row)
        return _fix_float_repr(_float_repr(v))
    raise CanonicalEncodingError(f"unsupported type: {type(v).__name__}", column, row)


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- columns

# A column, for one chunk of rows, becomes one of:
_RAW_STR = 0  # values are clean str: emitted as "<value>"
_RAW = 1  # values are exact ints (or finished fragments): emitted as <value>
_CONST = 2  # every row has the same text, folded into the pieces


def _needs_escape(col: list, column: str, offset: int) -> bool:
    """True if some str of col contains a character that JSON escapes; rejects lone surrogates."""
    try:
        data = "".join(col).encode("utf-8")
    except UnicodeEncodeError:
        for i, v in enumerate(col):
            if not _is_utf8(v):
                raise CanonicalEncodingError(_SURROGATES, column, offset + i)
        raise  # pragma: no cover
    # UTF-8 continuation/lead bytes are >= 0x80, so a byte scan finds exactly " \ and C0 controls.
    a = np.frombuffer(data, np.uint8)
    for i in range(0, len(a), 1 << 20):
        c = a[i : i + (1 << 20)]
        if (c < 0x20).any() or (c == 0x22).any() or (c == 0x5C).any():
            return True
    return False


def _map_cached(col: list, one, many, column: str, offset: int) -> list:
    """Return many(col) == [one(v) for v in col], formatting each distinct value once when that pays.

    Only used where equal values have equal text (one of str/float/bool plus None),
    so dict key equality (1 == 1.0 == True, 0.0 == -0.0) can never mix texts up.
    """
    distinct = set(col)  # ~30 ns a value: cheap next to escaping or float repr
    if len(distinct) * 2 <= len(col):
        texts = {v: one(v, col, column, offset) for v in distinct}
        return list(map(texts.__getitem__, col))
    return many(col)


def _str_text(v, col, column, offset):
    if v is None:
        return "null"
    if not _is_utf8(v):
        raise CanonicalEncodingError(_SURROGATES, column, offset + col.index(v))
    return _json_escape(v)


def _str_texts(col):
    # Lone surrogates pass the escaper; the final UTF-8 encode of the row catches them.
    return [_json_escape(v) if v is not None else "null" for v in col]


def _float_text(v, col, column, offset):
    return "null" if v is None else _fix_float_repr(_float_repr(v))


def _float_texts(col):
    texts = [_float_repr(v) if v is not None else "null" for v in col]
    joined = ",".join(texts) + ","
    if ".0," in joined or "e" in joined:  # integral values or exponent forms to rewrite
        texts = [_fix_float_repr(t) if t != "null" else t for t in texts]
    return texts


def _check_finite(col: list, column: str, offset: int, nullable: bool) -> None:
    total = sum([v for v in col if v is not None] if nullable else col)
    if not math.isfinite(total):  # a NaN/inf, or just an overflowing sum: find out
        for i, v in enumerate(col):
            if v is not None and not math.isfinite(v):
                raise CanonicalEncodingError(f"{v} is not representable in JCS (finite numbers only)", column,
                                             offset + i)


def _check_int_range(col: list, column: str, offset: int, nullable: bool) -> None:
    ints = [v for v in col if v is not None] if nullable else col
    if ints and (min(ints) < _INT_MIN or max(ints) > _INT_MAX):
        for i, v in enumerate(col):
            if v is not None and not _INT_MIN <= v <= _INT_MAX:
                raise CanonicalEncodingError(f"{v} exceeds safe integer domain for JSON floats", column, offset + i)


def _encode_column(col: list, column: str, offset: int) -> tuple[int, object]:
    """Return (how, payload) for one column chunk (see _RAW_STR/_RAW/_CONST)."""
    types = set(map(type, col))
    if len(types) == 1 and col.count(col[0]) == len(col) and type(col[0]) in _SCALAR_TYPES:
        # One value throughout (a run_id, a pipeline...): fold its text into the row template.
        # (count compares with ==, hence the single-type guard: 1 == 1.0 == True.)
        return _CONST, _scalar_text(col[0], column, offset)
    if types == {str}:
        if not _needs_escape(col, column, offset):
            return _RAW_STR, col
        return _RAW, _map_cached(col, _str_text, _str_texts, column, offset)
    if types == {int}:
        _check_int_range(col, column, offset, False)
        return _RAW, col
    if types <= {_NoneType}:
        return _CONST, "null"
    if types == {float} or types == {float, _NoneType}:
        _check_finite(col, column, offset, len(types) > 1)
        return _RAW, _map_cached(col, _float_text, _float_texts, column, offset)
    if types == {str, _NoneType}:
        return _RAW, _map_cached(col, _str_text, _str_texts, column, offset)
    if types <= {bool, _NoneType}:
        return _RAW, list(map(_BOOL_TEXT.__getitem__, col))
    if types == {int, _NoneType}:
        _check_int_range(col, column, offset, True)
        return _RAW, [_int_repr(v) if v is not None else "null" for v in col]
    # Mixed or subclassed types: value by value, exactly as rfc8785.dump decides.
    return _RAW, [_scalar_text(v, column, offset + i) for i, v in enumerate(col)]


# --------------------------------------------------------------------------- rows


@lru_cache(maxsize=256)
def _assembler(pieces: tuple[str, ...]):
    """Compile ``assemble(cols) -> [f"{p0}{v0}{p1}...{vk-1}{pk}".encode() for v0, ... in zip(*cols)]``.

    The pieces are compiled in as literals (adjacent literals join into one f-string;
    ``repr`` makes any piece a valid literal), so a row costs one BUILD_STRING and one encode.
    """
    k = len(pieces) - 1
    names = [f"v{i}" for i in range(k)]
    parts = [repr(pieces[0])]
    for i in range(k):
        parts.append(f"f'{{{names[i]}}}'")
        parts.append(repr(pieces[i + 1]))
    body = " ".join(parts)
    src = f"def assemble(cols):\n    return [({body}).encode() for {', '.join(names)}, in zip(*cols)]\n"
    namespace: dict = {}
    exec(compile(src, "<fast_canonical>", "exec"), namespace)
    return namespace["assemble"]


def key_layout(table: str, columns: Sequence[str]) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """Return a leaf's (escaped key texts, column per key, None for the table name) in RFC 8785 key order."""
    return _layout(table, tuple(columns))


@lru_cache(maxsize=256)
def _layout(table: str, columns: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """Return (key texts, value source per key) in RFC 8785 key order.

    Mirrors ``{"table": table, **{c: ...}}``: a column named "table" overrides the name,
    repeated columns collapse.  Source None means the table name.
    """
    keys = {"table": None}
    for c in columns:
        if not isinstance(c, str):
            raise CanonicalEncodingError(f"object keys must be strings, got {type(c).__name__}")
        keys[c] = c
    for k in keys:
        if not _is_utf8(k):
            raise CanonicalEncodingError(f"key {k!r} contains non-UTF-8 code points")
    if not _is_utf8(table):
        raise CanonicalEncodingError(f"table name {table!r} contains non-UTF-8 code points")
    order = sorted(keys, key=lambda k: k.encode("utf-16-be"))
    return tuple(_json_escape(k) for k in order), tuple(keys[k] for k in order)


class EncodedColumn:
    """A whole column already turned into (how, payload): see :func:`dictionary_column`."""

    __slots__ = ("how", "payload", "n")

    def __init__(self, how: int, payload, n: int) -> None:
        self.how, self.payload, self.n = how, payload, n

    def __len__(self) -> int:
        return self.n

    def chunk(self, start: int, stop: int) -> tuple[int, object]:
        """Return (how, payload) of rows start:stop."""
        if self.how == _CONST or (start == 0 and stop == self.n):
            return self.how, self.payload
        return self.how, self.payload[start:stop]


def dictionary_column(values: Sequence[str], codes: np.ndarray, column: str | None = None) -> EncodedColumn:
    """Return a string column given as its distinct values and each row's code into them (-1: null) for encode_rows.

    Each distinct value is escaped once; a column of one value throughout folds into the row template.
    """
    texts = []
    for v in values:
        if not _is_utf8(v):
            raise CanonicalEncodingError(_SURROGATES, column)
        texts.append(_json_escape(v))
    texts.append("null")  # code -1
    codes = np.asarray(codes)
    n = len(codes)
    if n and codes.min() == codes.max():
        return EncodedColumn(_CONST, texts[int(codes[0])], n)
    return EncodedColumn(_RAW, np.array(texts, dtype=object)[codes].tolist(), n)


def _column_input(values, column: str) -> list | EncodedColumn:
    """Return a column as a list of Python values, or as given when already encoded."""
    if isinstance(values, (list, EncodedColumn)):
        return values
    if isinstance(values, np.ndarray):
        return values.tolist()  # Python scalars, as a DuckDB/Arrow fetch would give
    if isinstance(values, (str, bytes, Mapping)):
        raise CanonicalEncodingError("column data must be a sequence of values", column)
    to_pylist = getattr(values, "to_pylist", None)  # an Arrow array, without importing pyarrow here
    return to_pylist() if to_pylist is not None else list(values)


def encode_rows(table: str, columns: Sequence[str], data: Mapping[str, Sequence]) -> list[bytes]:
    """Return each row's leaf bytes, ``rfc8785.dumps({"table": table, **{c: data[c][i] for c in columns}})``.

    ``data`` maps each column name to a list (or numpy array, :class:`EncodedColumn`,
    anything with ``to_pylist``, other sequence) of the column's values, all of the same
    length.
    Raises :class:`CanonicalEncodingError` (a ValueError) naming the column and row of
    a value RFC 8785 cannot encode (NaN, infinities, ints beyond 2**53 - 1, lone
    surrogates, unsupported types).
    """
    key_texts, sources = _layout(table, tuple(columns))
    cols: dict[str, list | EncodedColumn] = {}
    for src in sources:
        if src is not None and src not in cols:
            if src not in data:
                raise KeyError(f"encode_rows: no data for column {src!r}")
            cols[src] = _column_input(data[src], src)
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1:
        raise CanonicalEncodingError(f"columns differ in length: { {c: len(v) for c, v in cols.items()} }")
    if not lengths:
        raise CanonicalEncodingError("encode_rows needs at least one column to know the row count")
    n = lengths.pop()
    table_text = _json_escape(table)

    out: list[bytes] = []
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        pieces = ["{"]
        payloads = []
        for j, (key_text, src) in enumerate(zip(key_texts, sources)):
            pieces[-1] += ("," if j else "") + key_text + ":"
            if src is None:
                how, payload = _CONST, table_text
            else:
                col = cols[src]
                if type(col) is EncodedColumn:
                    how, payload = col.chunk(start, stop)
                else:
                    if start or stop < len(col):
                        col = col[start:stop]
                    how, payload = _encode_column(col, src, start)
            if how == _CONST:
                pieces[-1] += payload
            elif how == _RAW_STR:
                pieces[-1] += '"'
                pieces.append('"')
                payloads.append(payload)
            else:
                pieces.append("")
                payloads.append(payload)
        pieces[-1] += "}"
        if not payloads:
            out.extend([pieces[0].encode("utf-8")] * (stop - start))
            continue
        try:
            out.extend(_assembler(tuple(pieces))(payloads))
        except UnicodeEncodeError:
            _raise_surrogate(key_texts, sources, cols, start, stop)
    return out


def _raise_surrogate(key_texts, sources, cols, start, stop):
    """Name the column and row whose string could not be encoded to UTF-8."""
    for src in sources:
        if src is None or type(cols[src]) is EncodedColumn:
            continue
        for i in range(start, stop):
            v = cols[src][i]
            if isinstance(v, str) and not _is_utf8(v):
                raise CanonicalEncodingError(_SURROGATES, src, i)
    raise CanonicalEncodingError("row text is not valid UTF-8")  # pragma: no cover

