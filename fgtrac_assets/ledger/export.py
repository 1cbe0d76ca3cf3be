"""Publish the log as a C2SP tlog-tiles directory: checkpoint, hash tiles and entry bundles.

The stored tiles (ledger/nodes.py) are the C2SP tiles: stored tile level t is C2SP level t, and
a tile of a tree of size s is the stored tile cut to the width s needs, since a hash in it never
changes once written. The export copies them; only the entry bundles are built: DuckDB encodes the
leaf tables' rows in bundle form (ledger/leaves.py, leaf_sql, each leaf behind its uint16 length), so
a chunk's bundles are slices of one Arrow buffer written as they are (integrity/tiles.py, EntryRun);
every entry is checked against its level-0 hash, and the rare row the SQL encoding gets wrong is
encoded again the exact way.

A re-export continues from the directory's own checkpoint once its root is the log's root at
that size (so the directory holds a prefix of this log), and writes only the tiles and bundles
that are new or grew, plus the partial tiles of every tree head signed since (C2SP: a log MUST
serve the partial tiles of each tree size it made a checkpoint for, until the full tile exists).
Tiles and bundles are written in place; the checkpoint, which alone says what is published, is written
last, to a temporary name then renamed (_Writer).

Bundles are built a chunk of 1,024 at a time. A large export spreads the chunks over worker
processes (`python -m fgtrac_assets.ledger.export`, fed a JSON job on stdin), each reading a few
chunks per short read session with one DuckDB thread, so a long export does not hold off commits.
"""

import ctypes
import fcntl
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from ..errors import FgtracError, StorageError
from ..integrity import merkle, notes
from ..integrity.tiles import (HASH_SIZE, MAX_ENTRY_SIZE, TILE_WIDTH, EntryRun, EntryTooLarge, Tile, new_tiles,
                               tiles_between)
from .leaves import leaf_sql, table_leaves
from .nodes import KEY_SHIFT, StoredNodes, tile_key, tile_of
from .schema import LEAF_ORDER, LEAF_TABLES, physical
from .store import Ledger

CHECKPOINT = "checkpoint"
CHUNK_BUNDLES = 1024  # entry bundles per chunk, the unit of work: 262,144 leaves
SESSION_CHUNKS = 4  # chunks a worker builds per read session: long enough to reuse its memory, short for commits
PARALLEL_CHUNKS = 4  # from this many chunks on, worker processes build them (each starts in about a second)
MAX_WORKERS = 4
EXACT_LEAVES = 4096  # up to this many entries, encoding them in Python beats planning the SQL encoder
SMALL_EXPORT = 65_536  # new leaves up to which one single-threaded connection does the whole export
WRITE_THREADS = 4  # the kernel's file creation is most of a file's cost: let several run at once
DROP_BEHIND = 128  # files written and not yet dropped from the page cache (each holds a descriptor till then)
_SYNC_FILE_RANGE_WRITE = 2
_LOCK = ".fgtrac-export.lock"


class ExportError(FgtracError, ValueError):
    """The log cannot be exported (empty, damaged, or the directory holds another log)."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the published size, the size the directory held before, and file counts."""

    out_dir: Path
    size: int
    previous_size: int
    tiles: int
    bundles: int
    bytes: int
    checkpoint_changed: bool
    seconds: float


@dataclass(frozen=True)
class _Head:
    size: int
    root: bytes
    note: str
    origin: str


class _Writer:
    """File writes under one directory, batches in background threads.

    Tiles and entry bundles are written in place: every one beyond the directory's checkpoint is written again
    by the next export, and the checkpoint, which alone says what is published, is written last and atomically
    (temporary name, then rename). A crash therefore never publishes a half-written file; skipping the rename
    for the tens of thousands of tile files saves a third of the kernel's work.
    """

    def __init__(self, root: Path):
        self.root = root
        self.dirs: set[Path] = set()
        self.files = 0
        self.bytes = 0
        self.tag = f".{os.getpid()}.tmp"
        self._threads = ThreadPoolExecutor(max_workers=WRITE_THREADS)  # file I/O overlaps with encoding
        self._pending: list[list[Future]] = []
        self._count = threading.Lock()
        self._behind = _DropBehind() if _DropBehind.available() else None

    def write(self, rel: str, data: bytes | memoryview, atomic: bool = False) -> None:
        """Write one file now (atomic: under a temporary name, then renamed); raise StorageError if it fails."""
        path = self.root / rel
        parent = path.parent
        try:
            if parent not in self.dirs:
                parent.mkdir(parents=True, exist_ok=True)
                self.dirs.add(parent)
            target = parent / f".{path.name}{self.tag}" if atomic else path
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                if self._behind is not None and not atomic:
                    held, fd = fd, -1  # the drop-behind queue owns it now, whatever add raises
                    self._behind.add(held)
            finally:
                if fd >= 0:
                    os.close(fd)
            if atomic:
                os.replace(target, path)
        except OSError as exc:
            raise StorageError(f"{path}: cannot write ({exc.strerror or exc})") from None
        with self._count:
            self.files += 1
            self.bytes += len(data)

    def write_later(self, items: list[tuple[str, bytes | memoryview]]) -> None:
        """Queue files for the writer threads (at most two batches wait, bounding memory)."""
        while len(self._pending) >= 2:
            for job in self._pending.pop(0):
                job.result()
        # folders first, here: the threads then never race to create the same one
        for parent in {(self.root / rel).parent for rel, _ in items} - self.dirs:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"{parent}: cannot make the folder ({exc.strerror or exc})") from None
            self.dirs.add(parent)
        parts = [items[i::WRITE_THREADS] for i in range(min(WRITE_THREADS, len(items)))]
        self._pending.append([self._threads.submit(lambda part=part: [self.write(r, d) for r, d in part])
                              for part in parts])

    def flush(self) -> None:
        """Wait for the queued files, raising the first error."""
        try:
            while self._pending:
                for job in self._pending.pop(0):
                    job.result()
        finally:
            self._threads.shutdown(wait=True)
            if self._behind is not None:
                try:
                    self._behind.drain()
                except OSError as exc:
                    raise StorageError(f"{self.root}: cannot close a written file ({exc.strerror or exc})") from None


class _DropBehind:
    """Written files' page cache, handed back to the kernel a few files later (Linux).

    Each file's writeback starts as soon as it is written (sync_file_range); DROP_BEHIND files later, when it is
    on disk, its pages are dropped (posix_fadvise DONTNEED) and its descriptor closed. The next files then reuse
    those pages instead of taking fresh ones, which costs a large export most of its kernel time, and a
    multi-gigabyte export does not push the user's working set out of the page cache.
    """

    _sync_file_range = None

    def __init__(self):
        self._open: deque[int] = deque()
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> bool:
        """Return whether this system has sync_file_range and posix_fadvise (Linux)."""
        if cls._sync_file_range is None:
            try:
                call = ctypes.CDLL(None, use_errno=True).sync_file_range
                call.argtypes, call.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint], ctypes.c_int
                cls._sync_file_range = call if hasattr(os, "posix_fadvise") else False
            except (AttributeError, OSError):
                cls._sync_file_range = False
        return bool(cls._sync_file_range)

    def add(self, fd: int) -> None:
        """Start writing this file's pages to disk and take its descriptor; drop and close the oldest one due."""
        self._sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        with self._lock:
            self._open.append(fd)
            due = self._open.popleft() if len(self._open) > DROP_BEHIND else -1
        if due >= 0:
            self._drop(due)

    def drain(self) -> None:
        """Drop and close every descriptor still held."""
        with self._lock:
            held, self._open = list(self._open), deque()
        for fd in held:
            self._drop(fd)

    @staticmethod
    def _drop(fd: int) -> None:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only: the file is written either way
        os.close(fd)


def export_log(ledger: Ledger, out_dir: str | os.PathLike, *, full: bool = False,
               workers: int | None = None) -> ExportResult:
    """Write the C2SP tlog-tiles directory of the latest signed tree head into out_dir; return what was written.

    full: rewrite the directory from scratch (its checkpoint and tile/ are removed first), instead of
    continuing from the checkpoint it holds. workers: processes building entry bundles (default: one per
    CPU, up to 4, when there are PARALLEL_CHUNKS chunks or more to build; 1 builds them in this process).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{out}: cannot make the export folder ({exc.strerror or exc})") from None
    with _exclusive(out):
        before = None if full else _read_checkpoint(out)
        previous = before.size if before else 0
        with ledger.reader(code_views=False, threads=1) as con:  # DuckDB's thread pool costs a small export 8 ms
            head, signed = _heads(con, previous)
            if before is not None and (before.origin != head.origin or before.size > head.size):
                raise ExportError(_conflict(out, before, head))
            written = set(tiles_between([previous], previous))  # the previous export's partial tiles exist
            wanted = sorted(set(new_tiles(previous, head.size)) | (set(tiles_between(signed, head.size)) - written))
            upper = [t for t in wanted if t.level > 0]
            level0 = _Level0([t for t in wanted if t.level == 0], head.size)
            # a re-export: one connection and one tile query for all; a bigger job reads with DuckDB's threads
            small = len(level0.chunks) == 1 and workers in (None, 1) and head.size - previous <= SMALL_EXPORT
            nodes = _prefetch(con, [head.size, previous], upper + (level0.tiles if small else []))
            if _stored_root(nodes, head.size) != head.root:
                raise ExportError(f"the stored tiles do not give the signed root of tree size {head.size}: "
                                  "run `fgtrac verify`")
            if before is not None and _stored_root(nodes, previous) != before.root:
                raise ExportError(_conflict(out, before, head))
            if previous == head.size and _holds(out / CHECKPOINT, head.note.encode("utf-8")):
                return ExportResult(out, head.size, previous, 0, 0, 0, False, time.perf_counter() - t0)
            upper_blobs = {(t.level, t.index): _stored_tile(nodes, t.level, t.index) for t in upper}
            if workers is None:
                workers = min(MAX_WORKERS, os.cpu_count() or 1) if len(level0.chunks) >= PARALLEL_CHUNKS else 1
            workers = max(1, min(workers, len(level0.chunks)))
            first = None
            if small:
                first = level0.read(con, 0, {k: _stored_tile(nodes, 0, k) for k in level0.chunks[0]})
        if full:
            (out / CHECKPOINT).unlink(missing_ok=True)
            shutil.rmtree(out / "tile", ignore_errors=True)
        writer = _Writer(out)
        try:
            if workers > 1:
                files, size = _run_workers(ledger, out, level0, workers)
                writer.files, writer.bytes = writer.files + files, writer.bytes + size
            else:
                for i in range(len(level0.chunks)):
                    if first is None:
                        with ledger.reader(code_views=False) as con:
                            first = level0.read(con, i)
                    level0.write(writer, i, first)
                    first = None
            writer.write_later([(t.path, _cut({t.index: upper_blobs[(t.level, t.index)]}, t)) for t in upper])
        finally:
            writer.flush()
        writer.write(CHECKPOINT, head.note.encode("utf-8"), atomic=True)
        n0 = len(level0.tiles)
        return ExportResult(out, head.size, previous, n0 + len(upper), n0, writer.bytes, True, time.perf_counter() - t0)


def _heads(con: duckdb.DuckDBPyConnection, previous: int) -> tuple[_Head, list[int]]:
    """Return the latest signed tree head and the sizes of those signed after `previous` (one query)."""
    rows = con.execute("SELECT size, CASE WHEN row_number() OVER (ORDER BY size DESC) = 1 THEN note END "
                       "FROM tree_heads WHERE size >= ? OR size = (SELECT max(size) FROM tree_heads)",
                       [previous]).fetchall()
    latest = next((r for r in rows if r[1] is not None), None)
    if latest is None:
        raise ExportError("the log is empty: nothing to export yet")
    size, note = latest
    try:
        cp = notes.parse_checkpoint(notes.split_note(note)[0])
    except ValueError as exc:
        raise ExportError(f"the signed tree head of size {size} is not a checkpoint ({exc}): run `fgtrac verify`") from None
    if cp.size != size:
        raise ExportError(f"the signed tree head stored for size {size} is a checkpoint of size {cp.size}: "
                          "run `fgtrac verify`")
    return _Head(size, cp.root, note, cp.origin), sorted({r[0] for r in rows if previous < r[0] <= size})


def _prefetch(con: duckdb.DuckDBPyConnection, sizes: list[int], tiles: list[Tile]) -> StoredNodes:
    """Return StoredNodes holding, from one query, the tiles the roots at these sizes read and the given tiles."""
    nodes = StoredNodes(con)
    coords: list[tuple[int, int]] = []

    def record(level: int, index: int) -> bytes:
        coords.append((level, index))
        return bytes(HASH_SIZE)

    for size in sizes:
        merkle.root_from(record, size)
    nodes.prefetch_tiles([tile_of(lv, ix)[:2] for lv, ix in coords] + [(t.level, t.index) for t in tiles])
    return nodes


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold the directory's export lock for the block (one exporter per directory)."""
    try:
        fd = os.open(out / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"{out}: cannot write the export folder ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another export into {out} is running") from None
        yield
    finally:
        os.close(fd)


def _stored_root(nodes: StoredNodes, size: int) -> bytes:
    """Return the root of the first size leaves from the stored tiles; raise ExportError if a tile is missing."""
    try:
        return nodes.run(merkle.root_from, size)
    except KeyError as exc:
        raise ExportError(f"{exc.args[0]}: run `fgtrac verify`") from None


def _stored_tile(nodes: StoredNodes, level: int, index: int) -> bytes:
    """Return a stored tile's hashes, concatenated; raise ExportError if it is missing."""
    try:
        return b"".join(nodes.tile(level, index))
    except KeyError as exc:
        raise ExportError(f"{exc.args[0]}: run `fgtrac verify`") from None


def _read_checkpoint(out: Path) -> notes.Checkpoint | None:
    """Return the checkpoint out holds (None if none); raise ExportError if it holds something else."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        return notes.parse_checkpoint(notes.split_note(path.read_text(encoding="utf-8"))[0])
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{path} is not a checkpoint ({exc}); pass --full to rewrite {out} from scratch") from None


def _conflict(out: Path, before: notes.Checkpoint, head: _Head) -> str:
    """Return why out's checkpoint is not a prefix of this log, as a one-line message."""
    path, advice = out / CHECKPOINT, f"pass --full to rewrite {out} from scratch"
    if before.origin != head.origin:
        return f"{path} is a checkpoint of log {before.origin!r}, not {head.origin!r}; {advice}"
    if before.size > head.size:
        return f"{path} has tree size {before.size}, larger than this log's {head.size}; {advice}"
    return f"{path} (tree size {before.size}) is not consistent with this log: its root differs; {advice}"


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def _fetch(con: duckdb.DuckDBPyConnection, level: int, first: int, last: int) -> dict[int, bytes]:
    """Return the stored hash blobs of tiles first..last of a tile level, by index."""
    rows = con.execute("SELECT tile, hashes FROM log_tiles WHERE tile BETWEEN ? AND ?",
                       [tile_key(level, first), tile_key(level, last)]).fetchall()
    mask = (1 << KEY_SHIFT) - 1
    return {key & mask: bytes(blob) for key, blob in rows}


def _cut(stored: dict[int, bytes], t: Tile) -> bytes:
    blob = stored.get(t.index, b"")
    if len(blob) < t.width * HASH_SIZE:
        raise ExportError(f"log tile (level {t.level * 8}, index {t.index}) holds {len(blob) // HASH_SIZE} hashes "
                          f"where the log needs {t.width}: run `fgtrac verify`")
    return blob[:t.width * HASH_SIZE]


class _Level0:
    """The level-0 tiles to write with their entry bundles, in chunks of CHUNK_BUNDLES tile indexes."""

    def __init__(self, tiles: list[Tile], size: int, tables: list[tuple[str, str]] | None = None,
                 chunk: int | None = None):
        self.tiles, self.size, self.chunk = tiles, size, chunk or CHUNK_BUNDLES
        self.tables = tables or [(t, physical(t)) for t in LEAF_ORDER]
        self.by_index: dict[int, list[Tile]] = {}
        for t in tiles:
            self.by_index.setdefault(t.index, []).append(t)
        indexes = sorted(self.by_index)
        self.chunks = [indexes[c:c + self.chunk] for c in range(0, len(indexes), self.chunk)]

    def to_json(self) -> dict:
        """Return the plan as JSON data (for a worker process)."""
        return {"size": self.size, "tables": self.tables, "chunk": self.chunk,
                "tiles": [[t.index, t.width] for t in self.tiles]}

    @classmethod
    def from_json(cls, data: dict) -> "_Level0":
        """Return the plan to_json described."""
        return cls([Tile(0, k, w) for k, w in data["tiles"]], data["size"], [tuple(t) for t in data["tables"]],
                   data["chunk"])

    def _span(self, i: int) -> tuple[int, int]:
        chunk = self.chunks[i]
        return chunk[0] * TILE_WIDTH, min(self.size, (chunk[-1] + 1) * TILE_WIDTH)

    def read(self, con: duckdb.DuckDBPyConnection, i: int,
             stored: dict[int, bytes] | None = None) -> tuple[dict[int, bytes], EntryRun, bytes]:
        """Return the stored level-0 tiles (unless given), the entries chunk i needs and their leaf hashes.

        The entries come from the SQL encoder (leaves.leaf_sql) in bundle form; if any hash is not the logged one,
        those leaves are encoded again the exact way, so what is left mismatching is a row changed after it was
        logged (write says so).
        """
        chunk = self.chunks[i]
        lo, hi = self._span(i)
        stored = _fetch(con, 0, chunk[0], chunk[-1]) if stored is None else stored
        encode = _exact_entries if hi - lo <= EXACT_LEAVES else _entries
        try:
            try:
                entries = encode(con, self.tables, lo, hi)
            except duckdb.CatalogException:  # not the current layout: ask the catalog which leaf tables it has
                self.tables = _leaf_tables(con)
                entries = encode(con, self.tables, lo, hi)
            hashes = entries.leaf_hashes()
            logged = b"".join(stored.get(k, b"")[:HASH_SIZE * min(TILE_WIDTH, hi - k * TILE_WIDTH)] for k in chunk)
            if hashes != logged:
                leaves = entries.entries()
                hashes = _reencode_mismatches(con, self.tables, lo, leaves, hashes, logged)
                entries = EntryRun.encode(leaves, lo)
        except EntryTooLarge as exc:
            raise ExportError(f"cannot publish the log as C2SP tiles: {exc}") from None
        return stored, entries, hashes

    def write(self, writer: _Writer, i: int, data: tuple[dict[int, bytes], EntryRun, bytes]) -> None:
        """Queue chunk i's level-0 tiles and entry bundles, after checking every entry against its leaf hash."""
        stored, entries, hashes = data
        lo, _ = self._span(i)
        items = []
        for k in self.chunks[i]:
            start = k * TILE_WIDTH - lo
            for t in self.by_index[k]:  # the full or partial tile, and the partial ones of earlier signed heads
                blob = _cut(stored, t)
                _check_entries(hashes[start * HASH_SIZE:(start + t.width) * HASH_SIZE], blob, k * TILE_WIDTH)
                items += [(t.path, blob), (Tile(None, k, t.width).path, entries.bundle(start, t.width))]
        writer.write_later(items)


def _check_entries(computed: bytes, stored: bytes, first: int) -> None:
    """Raise ExportError unless the entries' leaf hashes are the stored level-0 hashes."""
    if computed == stored:
        return
    bad = next(i for i in range(0, len(stored), HASH_SIZE) if computed[i:i + HASH_SIZE] != stored[i:i + HASH_SIZE])
    raise ExportError(f"leaf {first + bad // HASH_SIZE}: its ledger row does not hash to the logged leaf hash "
                      "(the row was changed after it was logged): run `fgtrac verify`")


def _leaf_tables(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """Return (leaf table, stored table) for every leaf table the file has (ledgers before event groups keep `events`)."""
    base = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                                      "AND schema_name = 'main' AND NOT temporary").fetchall()}
    out = []
    for t in LEAF_ORDER:
        stored = physical(t) if physical(t) in base else t
        if stored in base:
            out.append((t, stored))
    return out


def _holding(con: duckdb.DuckDBPyConnection, tables: list[tuple[str, str]], lo: int, hi: int) -> list[tuple[str, str]]:
    """Return the leaf tables holding rows of log entries lo..hi-1 (one count query)."""
    where = f"WHERE leaf_index >= {int(lo)} AND leaf_index < {int(hi)}"
    return [tables[i] for i, n in con.execute(" UNION ALL ".join(
        f"SELECT {i}, count(*) FROM {stored} {where}" for i, (_, stored) in enumerate(tables))).fetchall() if n]


def _exact_entries(con: duckdb.DuckDBPyConnection, tables: list[tuple[str, str]], lo: int, hi: int) -> EntryRun:
    """Return log entries lo..hi-1 in bundle form, encoded exactly (for a few leaves, faster than planning SQL)."""
    return EntryRun.encode(_exact_leaves(con, _holding(con, tables, lo, hi), lo, hi), lo)


def _entries(con: duckdb.DuckDBPyConnection, tables: list[tuple[str, str]], lo: int, hi: int) -> EntryRun:
    """Return log entries lo..hi-1 in bundle form, encoded in SQL (leaves.leaf_sql: fast, to be checked)."""
    where = f"WHERE leaf_index >= {int(lo)} AND leaf_index < {int(hi)}"
    tables = _holding(con, tables, lo, hi)  # planning a table's encoder costs more than the count
    if not tables:
        _check_leaf_indexes(np.zeros(0, dtype=np.int64), lo, hi)
    rows = " UNION ALL ".join(f"SELECT leaf_index, {leaf_sql(name)} AS leaf FROM {stored} {where}"
                              for name, stored in tables)
    # each entry as a bundle holds it: a big-endian uint16 length, then the leaf (a longer one is refused by EntryRun)
    tbl = con.sql(f"SELECT leaf_index, from_hex(printf('%04X', least(octet_length(leaf), {MAX_ENTRY_SIZE}))) || leaf "
                  f"AS entry FROM ({rows}) ORDER BY leaf_index").to_arrow_table()
    _check_leaf_indexes(tbl.column("leaf_index").to_numpy(), lo, hi)
    column = tbl.column("entry")
    column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    _, offsets, data = column.buffers()
    width = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(offsets, dtype=width, count=len(column) + 1, offset=column.offset * np.dtype(width).itemsize)
    return EntryRun(data if data is not None else b"", offsets, lo)


def _check_leaf_indexes(found: np.ndarray, lo: int, hi: int) -> None:
    """Raise ExportError unless the sorted leaf indexes found are exactly lo..hi-1."""
    if len(found) == hi - lo and (not len(found) or (found[0] == lo and found[-1] == hi - 1
                                                    and (np.diff(found) == 1).all())):
        return
    missing = np.setdiff1d(np.arange(lo, hi), found)
    why = f" (no row for leaf {int(missing[0])})" if missing.size else ""
    raise ExportError(f"the leaf tables hold {len(found)} rows for log entries {lo}..{hi - 1}, not {hi - lo}{why}: "
                      "run `fgtrac verify`")


def _exact_leaves(con: duckdb.DuckDBPyConnection, tables: list[tuple[str, str]], lo: int, hi: int) -> list[bytes]:
    """Return the leaf bytes of log entries lo..hi-1, encoded exactly from their rows (leaves.table_leaves)."""
    where = f"WHERE leaf_index >= {int(lo)} AND leaf_index < {int(hi)}"
    indexes, leaves = [], []
    for name, stored in tables:
        cols = ", ".join(c for c, _ in LEAF_TABLES[name])
        tbl = con.sql(f"SELECT leaf_index, {cols} FROM {stored} {where}").to_arrow_table()
        if tbl.num_rows:
            indexes.append(tbl.column("leaf_index").to_numpy())
            leaves += table_leaves(name, tbl)
    found = np.concatenate(indexes) if indexes else np.zeros(0, dtype=np.int64)
    order = np.argsort(found, kind="stable")
    _check_leaf_indexes(found[order], lo, hi)
    return [leaves[j] for j in order.tolist()]


def _reencode_mismatches(con: duckdb.DuckDBPyConnection, tables: list[tuple[str, str]], lo: int,
                         leaves: list[bytes], hashes: bytes, logged: bytes) -> bytes:
    """Encode exactly, in place, the leaves whose hash is not the logged one; return the hashes of all of them."""
    got = np.frombuffer(hashes, dtype=np.uint8).reshape(-1, HASH_SIZE)
    want = np.frombuffer(logged.ljust(len(hashes), b"\0"), dtype=np.uint8).reshape(-1, HASH_SIZE)
    bad = np.flatnonzero((got != want).any(axis=1))
    breaks = (np.flatnonzero(np.diff(bad) != 1) + 1).tolist()
    fixed = bytearray(hashes)
    for a, b in zip([0] + breaks, breaks + [len(bad)]):  # one exact read per run of mismatching leaves
        start, stop = int(bad[a]), int(bad[b - 1]) + 1
        leaves[start:stop] = _exact_leaves(con, tables, lo + start, lo + stop)
        fixed[start * HASH_SIZE:stop * HASH_SIZE] = b"".join(merkle.leaf_hashes(leaves[start:stop]))
    return bytes(fixed)


# --- worker processes ------------------------------------------------------------------------


def _run_workers(ledger: Ledger, out: Path, level0: _Level0, workers: int) -> tuple[int, int]:
    """Build level0's chunks in worker processes (chunk i in worker i % workers); return (files, bytes) written."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    plan = level0.to_json()
    jobs = [json.dumps({"home": str(ledger.home.root), "lock_timeout_s": ledger.lock_timeout_s, "out": str(out),
                        "plan": plan, "chunks": list(range(w, len(level0.chunks), workers))}) for w in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True) for _ in jobs]
    files = size = 0
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            running = {pool.submit(proc.communicate, job): proc for proc, job in zip(procs, jobs)}
            for done in as_completed(running):
                (stdout, stderr), proc = done.result(), running[done]
                if proc.returncode != 0:
                    for other in procs:  # the first failure ends the export: stop the others now
                        if other.poll() is None:
                            other.kill()
                    if not stdout.startswith("error: "):  # a crash, not a refusal: keep the worker's traceback
                        raise RuntimeError(f"export worker failed (exit status {proc.returncode}):\n{stderr}")
                    raise ExportError(f"export worker: {stdout.strip().removeprefix('error: ')}")
                result = json.loads(stdout)
                files, size = files + result["files"], size + result["bytes"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return files, size


def _worker_main() -> int:
    """Run one worker's job (JSON on stdin); print {"files", "bytes"} or `error: <reason>`; return the exit status."""
    job = json.loads(sys.stdin.read())
    gc.freeze()  # the modules' objects: the collections the per-leaf loops trigger need not scan them
    ledger = Ledger(job["home"], lock_timeout_s=job["lock_timeout_s"])
    level0 = _Level0.from_json(job["plan"])
    writer = _Writer(Path(job["out"]))
    try:
        try:
            chunks = job["chunks"]
            for s in range(0, len(chunks), SESSION_CHUNKS):
                with ledger.reader(code_views=False, threads=1) as con:  # the workers are the parallelism
                    for i in chunks[s:s + SESSION_CHUNKS]:
                        level0.write(writer, i, level0.read(con, i))
        finally:
            writer.flush()
    except FgtracError as exc:  # a refusal the parent reports in one line; anything else is a crash with its traceback
        print(f"error: {exc}")
        return 1
    print(json.dumps({"files": writer.files, "bytes": writer.bytes}))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
