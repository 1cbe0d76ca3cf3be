"""A ledger row's leaf: the RFC 8785 canonical JSON of its table name and columns."""

import math
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa
import rfc8785

from ..integrity.fast_canonical import EncodedColumn, dictionary_column, encode_rows, key_layout
from .schema import LEAF_TABLES


def row_leaf(table: str, row: Mapping) -> bytes:
    """Return the leaf bytes of one row of a leaf table (leaf_index excluded)."""
    content = {"table": table}
    for col, _ in LEAF_TABLES[table]:
        value = row.get(col)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{table}.{col} is {value}: the ledger stores finite numbers only")
        content[col] = value
    return rfc8785.dumps(content)


def table_leaves(table: str, rows: pa.Table | Iterable[Mapping]) -> list[bytes]:
    """Return the leaf bytes of every row, in order (column-wise encoder, byte-identical to rfc8785)."""
    if not isinstance(rows, pa.Table):
        rows = to_arrow(table, list(rows))
    return encode_arrow_rows(table, [c for c, _ in LEAF_TABLES[table]], rows)


def encode_arrow_rows(table: str, columns: Sequence[str], data: pa.Table | Mapping[str, pa.Array | pa.ChunkedArray]
                      ) -> list[bytes]:
    """Return each row's leaf bytes from Arrow columns (encode_rows; few-valued strings through their dictionary)."""
    names = data.column_names if isinstance(data, pa.Table) else data
    return encode_rows(table, columns, {c: _arrow_values(data[c], c) for c in dict.fromkeys(columns) if c in names})


def _arrow_values(a: pa.Array | pa.ChunkedArray, column: str) -> list | EncodedColumn:
    """Return an Arrow column's values; a string column of few distinct values is encoded via its dictionary."""
    if isinstance(a, pa.ChunkedArray):
        a = a.chunk(0) if a.num_chunks == 1 else a.combine_chunks()
    n = len(a)
    if not (n >= 256 and (pa.types.is_string(a.type) or pa.types.is_large_string(a.type))):
        return a.to_pylist()
    if a.null_count == n:
        return dictionary_column([], [-1] * n, column)
    probe = a.slice(0, 1024).dictionary_encode()
    if len(probe.dictionary) * 4 > len(probe):  # looks high-cardinality (ids): plain values
        return a.to_pylist()
    d = a.dictionary_encode()
    if len(d.dictionary) * 2 > n:
        return a.to_pylist()
    return dictionary_column(d.dictionary.to_pylist(), d.indices.fill_null(-1).to_numpy(zero_copy_only=False), column)


def to_arrow(table: str, rows: pa.Table | list[Mapping] | Mapping[str, list]) -> pa.Table:
    """Return rows as an Arrow table with exactly the table's columns, in order, typed."""
    if isinstance(rows, pa.Table):
        data = {c: rows.column(c) if c in rows.column_names else pa.nulls(rows.num_rows) for c, _ in LEAF_TABLES[table]}
        n = rows.num_rows
    elif isinstance(rows, Mapping):
        n = len(next(iter(rows.values()))) if rows else 0
        data = {c: rows.get(c, [None] * n) for c, _ in LEAF_TABLES[table]}
    else:
        n = len(rows)
        data = {c: [r.get(c) for r in rows] for c, _ in LEAF_TABLES[table]}
    schema = pa.schema([(c, _ARROW[t]) for c, t in LEAF_TABLES[table]])
    arrays = [pa.array(data[c], type=schema.field(c).type) if not isinstance(data[c], (pa.Array, pa.ChunkedArray))
              else data[c].cast(schema.field(c).type) for c in schema.names]
    out = pa.Table.from_arrays(arrays, schema=schema)
    assert out.num_rows == n
    return out


_ARROW = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(), "BOOLEAN": pa.bool_()}


def leaf_sql(table: str) -> str:
    """Return a DuckDB expression giving a row's leaf bytes (a BLOB): a fast path, not always exact.

    It agrees with table_leaves on the rows ledgers hold (ids, names, integers, most doubles) and differs on
    rare values (control characters in strings, some doubles' exponent notation). Its output must therefore be
    checked against the logged leaf hash, and a row that does not match re-encoded with table_leaves.
    """
    types = dict(LEAF_TABLES[table])
    keys, sources = key_layout(table, [c for c, _ in LEAF_TABLES[table]])
    parts = []
    for j, (key, col) in enumerate(zip(keys, sources)):
        parts.append(_sql_text(("{" if j == 0 else ",") + key + ":"))
        parts.append(_sql_text(rfc8785.dumps(table).decode()) if col is None else _sql_value(col, types[col]))
    return f"encode(concat({', '.join(parts)}, '}}'))"


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_DIGITS = "'^(-?)([0-9])[.]?([0-9]*)e-"  # DuckDB's d.ddde-0N, as sign, first digit, the others


def _sql_value(col: str, sql_type: str) -> str:
    """Return the SQL text of one column's JSON value (null for NULL)."""
    c = f'"{col}"'
    if sql_type == "VARCHAR":
        value = f"to_json({c})::VARCHAR"
    elif sql_type == "BIGINT":
        value = f"{c}::VARCHAR"
    elif sql_type == "BOOLEAN":
        value = f"CASE WHEN {c} THEN 'true' WHEN NOT {c} THEN 'false' END"  # NULL stays NULL
    elif sql_type == "DOUBLE":
        # ECMAScript: integers below 2**53 without ".0", 1e-6 <= |x| < 1e-4 written out, exponents unpadded
        text = f"{c}::VARCHAR"
        value = (f"CASE WHEN {c} = trunc({c}) AND abs({c}) < 9007199254740992 THEN {c}::BIGINT::VARCHAR "
                 f"WHEN abs({c}) >= 1e-5 AND abs({c}) < 1e-4 "
                 f"THEN regexp_replace({text}, {_DIGITS}05$', '\\10.0000\\2\\3') "
                 f"WHEN abs({c}) >= 1e-6 AND abs({c}) < 1e-5 "
                 f"THEN regexp_replace({text}, {_DIGITS}06$', '\\10.00000\\2\\3') "
                 f"ELSE regexp_replace({text}, 'e([+-])0*', 'e\\1') END")
    else:
        raise ValueError(f"{col}: no SQL leaf encoding for {sql_type}")
    return f"coalesce({value}, 'null')"
