"""Reading a user's table (Parquet or CSV) into one Arrow table, with the rows and cells that could not be read.

Both formats come out the same way, so that one validator per pipeline serves both:

* Parquet is read with ``pyarrow.parquet``; a text column holding bytes that are not
  UTF-8 (a binary column, or a string column written without validation) has those
  cells nulled and reported instead of raising on the first access.
* CSV is read with ``pyarrow.csv``: the first row is the header, fields separated by
  commas, double-quoted fields allowed, empty fields are null.  Every cell is read as
  bytes and decoded as UTF-8 (a UTF-8 byte-order mark is skipped); a cell that is not
  UTF-8 is nulled and reported.  A row with the wrong number of fields is skipped and
  reported.  Then each column not named in ``text_columns`` becomes ``int64`` if every
  value parses as an integer, else ``float64`` if every value parses as a number
  (``nan`` and ``inf`` included), else stays text, so that a validator can reject the
  rows whose value does not parse.

Rows are numbered from 0 in file order, the CSV header not counted (the numbering of
``#row=<i>`` in rejection sources, the same for both formats).
"""

import os
import sys
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import FgtracError

TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv"}


class TableUnreadable(FgtracError, ValueError):
    """The file as a whole cannot be read as a table (the reason is the message)."""


@dataclass
class UserTable:
    """A table read from a user's file and where its rows came from."""

    table: pa.Table
    rows: list[int]  # the file's row number of each table row
    skipped: dict[int, str] = field(default_factory=dict)  # rows not in the table -> why
    bad_cells: dict[int, dict[str, str]] = field(default_factory=dict)  # row -> {column: why it was nulled}

    def problems(self, row: int, columns=None) -> list[str]:
        """Return the reasons recorded for a row's cells (only those of `columns`, if given)."""
        cells = self.bad_cells.get(row, {})
        return [why for col, why in cells.items() if columns is None or col in columns]


def name_text(name: str) -> str:
    """Return a file name or path as one line of UTF-8 text: undecodable bytes as \\xNN, control characters escaped."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) == "Cc" else c for c in text)


def name_problem(name: str) -> str | None:
    """Return why a file name (as os.listdir gives it) cannot name a sample, or None: not UTF-8, or control characters."""
    if not _is_utf8(name):
        return "name is not UTF-8 text (shown with its bytes escaped as \\xNN): rename it"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "name has control characters (shown escaped): rename it"
    return None


def _is_utf8(name: str) -> bool:
    """Return whether a name has no undecodable bytes (surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextmanager
def _readable(path: Path):
    """Yield what pyarrow can open: the path itself, or an open file when the path is not UTF-8 (pyarrow cannot encode it)."""
    if _is_utf8(str(path)):
        yield str(path)
        return
    with open(path, "rb") as f:
        yield f


def table_format(path: Path) -> str | None:
    """Return 'parquet' or 'csv' by the file's suffix, or None for any other file."""
    return TABLE_FORMATS.get(path.suffix.lower())


def read_user_table(path: Path, text_columns=(), fmt: str | None = None) -> UserTable:
    """Return a .parquet or .csv file (or `fmt`) as a UserTable; raise TableUnreadable saying why it cannot be read."""
    fmt = fmt or table_format(path)
    if fmt == "parquet":
        return _read_parquet(path, set(text_columns))
    if fmt == "csv":
        return _read_csv(path, set(text_columns))
    raise TableUnreadable(f"not a table file (suffix {path.suffix or 'none'}; expected .parquet or .csv)")


def _read_parquet(path: Path, text_columns: set[str]) -> UserTable:
    import pyarrow.parquet as pq

    try:
        with _readable(path) as src:
            table = pq.read_table(src)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise TableUnreadable(f"not a readable Parquet file ({one_line(exc)})") from None
    bad: dict[int, dict[str, str]] = {}
    for i, name in enumerate(table.column_names):
        col = table.column(i)
        text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        if not text and not (name in text_columns and (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type))):
            continue
        if text:
            try:
                col.validate(full=True)
                continue
            except pa.ArrowInvalid:
                as_bytes = pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()
                col = pa.chunked_array([c.view(as_bytes) for c in col.chunks], as_bytes)
        table = table.set_column(i, name, _decode(col, name, bad))
    return UserTable(table, list(range(table.num_rows)), {}, bad)


def _read_csv(path: Path, text_columns: set[str]) -> UserTable:
    import pyarrow.csv as pcsv

    skipped: dict[int, str] = {}

    def malformed(row) -> str:
        if row.number is not None:  # physical row number from 1, the header being row 1
            skipped[row.number - 2] = f"malformed CSV row: {row.actual_columns} fields, the header has {row.expected_columns}"
        return "skip"

    try:
        with _quiet_row_handler_failures():
            width = _csv_width(path)
            with _readable(path) as src:
                raw = pcsv.read_csv(src, read_options=pcsv.ReadOptions(autogenerate_column_names=True, use_threads=False),
                                    parse_options=pcsv.ParseOptions(invalid_row_handler=malformed),
                                    convert_options=pcsv.ConvertOptions(
                                        column_types={f"f{i}": pa.binary() for i in range(width)},
                                        null_values=[""], strings_can_be_null=True))
    except TableUnreadable:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid for parse errors, OSError for I/O
        raise TableUnreadable(f"not a readable CSV file ({one_line(exc)})") from None
    header = raw.slice(0, 1).to_pylist()[0] if raw.num_rows else {}
    names = []
    for key in raw.column_names:
        value = header[key]
        try:
            names.append((value or b"").decode("utf-8").strip())
        except UnicodeDecodeError:
            raise TableUnreadable("malformed CSV header: a column name is not UTF-8 text") from None
    if not names or any(not n for n in names):
        raise TableUnreadable(f"malformed CSV header: empty column name (header {names})")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TableUnreadable(f"malformed CSV header: duplicate column names {dupes}")
    data = raw.slice(1)
    n_rows = data.num_rows + len(skipped)
    rows = [r for r in range(n_rows) if r not in skipped]
    bad_by_position: dict[int, dict[str, str]] = {}
    columns = []
    for name, col in zip(names, data.columns):
        col = _decode(col, name, bad_by_position)
        columns.append(col if name in text_columns else _as_numbers(col))
    table = pa.Table.from_arrays(columns, names=names)
    bad = {rows[pos]: cells for pos, cells in bad_by_position.items()}
    return UserTable(table, rows, skipped, bad)


@contextmanager
def _quiet_row_handler_failures():
    """Silence pyarrow's "Exception ignored" report when it cannot decode a malformed row for the handler.

    pyarrow decodes a malformed row's text as UTF-8 before calling ``invalid_row_handler``;
    for a row that is also not UTF-8 that fails inside pyarrow, which then stops with a
    parse error (reported as an unreadable file) and prints the decode error as an
    unraisable exception.  The parse error is the message; the print is noise.
    """
    previous = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _csv_width(path: Path) -> int:
    """Return the number of fields of the CSV header (1 for an empty first line); raise TableUnreadable for an empty file."""
    import pyarrow.csv as pcsv

    try:
        with _readable(path) as src:
            reader = pcsv.open_csv(src, read_options=pcsv.ReadOptions(autogenerate_column_names=True,
                                                                      use_threads=False, block_size=1 << 20),
                                   parse_options=pcsv.ParseOptions(invalid_row_handler=lambda _: "skip"),
                                   convert_options=pcsv.ConvertOptions(check_utf8=False))
            return len(reader.schema) or 1
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise TableUnreadable("empty file (no header, no rows)") from None
        raise


def _decode(col: pa.ChunkedArray, name: str, bad: dict[int, dict[str, str]]) -> pa.ChunkedArray:
    """Return a binary column as UTF-8 text; cells that are not UTF-8 become null and are noted in `bad` by position."""
    try:
        return col.cast(pa.string())
    except pa.ArrowInvalid:
        pass
    out = []
    for pos, value in enumerate(col.to_pylist()):
        try:
            out.append(None if value is None else value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad.setdefault(pos, {})[name] = f"{name} is not UTF-8 text (byte 0x{value[exc.start]:02x} at {exc.start})"
            out.append(None)
    return pa.chunked_array([pa.array(out, pa.string())])


def _as_numbers(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Return a text column as int64 or float64 if every value parses as one, else unchanged."""
    trimmed = pc.utf8_trim_whitespace(col)
    for kind in (pa.int64(), pa.float64()):
        try:
            return pc.cast(trimmed, kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return col


def one_line(exc: Exception, width: int = 200) -> str:
    """Return an exception's message on one line, non-printable characters escaped, at most `width` characters."""
    text = " ".join(str(exc).split())
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= width else text[: width - 1] + "…"
