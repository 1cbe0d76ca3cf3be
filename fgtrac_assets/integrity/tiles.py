"""C2SP tlog-tiles: tile and entry-bundle paths, their encodings, and which tiles a tree publishes.

A tile at level L holds up to 256 consecutive Merkle tree hashes of tree level 8L (level 0:
leaf hashes), concatenated; it is served at ``tile/<L>/<N>`` when full and at
``tile/<L>/<N>.p/<W>`` with its W < 256 hashes when partial. N is written in 3-digit groups,
all but the last prefixed with ``x`` (1234067 -> ``x001/x234/067``). Entry bundles follow the
level-0 tiles at ``tile/entries/<N>[.p/<W>]``: each entry is a big-endian uint16 length and the
entry's bytes, so an entry longer than 65,535 bytes cannot be published (the spec has no
larger form). A tree of size s has, at each level l with s >> 8l > 0, the full tiles
0 .. (s >> 8l) // 256 - 1 and, if (s >> 8l) % 256 > 0, one partial tile of that width.
"""

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from ..errors import FgtracError
from . import merkle

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
HASH_SIZE = 32
MAX_LEVEL = 63
MAX_ENTRY_SIZE = 0xFFFF
ENTRIES = "entries"


class TileError(FgtracError, ValueError):
    """A malformed tile path, tile or entry bundle."""


class EntryTooLarge(TileError):
    """An entry longer than the 65,535 bytes an entry bundle's uint16 length can describe."""


class Tile(NamedTuple):
    """A tile coordinate: level (None for an entry bundle), index within the level, width 1..256."""

    level: int | None
    index: int
    width: int = TILE_WIDTH

    @property
    def path(self) -> str:
        """Return the tile's C2SP path relative to the log prefix."""
        if self.level is None:
            return entries_path(self.index, self.width)
        return tile_path(self.level, self.index, self.width)


def format_index(n: int) -> str:
    """Return the C2SP encoding of a tile index: 3-digit groups, all but the last prefixed with x."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TileError(f"tile index must be a non-negative int, got {n!r}")
    groups = [f"{n % 1000:03d}"]
    n //= 1000
    while n:
        groups.append(f"x{n % 1000:03d}")
        n //= 1000
    return "/".join(reversed(groups))


def _suffix(width: int) -> str:
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= TILE_WIDTH:
        raise TileError(f"tile width must be 1..{TILE_WIDTH}, got {width!r}")
    return "" if width == TILE_WIDTH else f".p/{width}"


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """Return ``tile/<L>/<N>[.p/<W>]`` for a hash tile (width 256 is a full tile)."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
        raise TileError(f"tile level must be 0..{MAX_LEVEL}, got {level!r}")
    return f"tile/{level}/{format_index(index)}{_suffix(width)}"


def entries_path(index: int, width: int = TILE_WIDTH) -> str:
    """Return ``tile/entries/<N>[.p/<W>]`` for an entry bundle (width 256 is a full bundle)."""
    return f"tile/{ENTRIES}/{format_index(index)}{_suffix(width)}"


def _parse_decimal(text: str, what: str, path: str) -> int:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise TileError(f"malformed tile path {path!r}: bad {what} {text!r}")
    return int(text)


def parse_tile_path(path: str) -> Tile:
    """Return the Tile a C2SP tile or entry-bundle path names; raise TileError if it is not canonical."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise TileError(f"malformed tile path {path!r}")
    level = None if parts[1] == ENTRIES else _parse_decimal(parts[1], "level", path)
    if level is not None and level > MAX_LEVEL:
        raise TileError(f"malformed tile path {path!r}: level above {MAX_LEVEL}")
    rest, width = parts[2:], TILE_WIDTH
    if rest[-1] != "" and len(rest) >= 2 and rest[-2].endswith(".p"):
        width = _parse_decimal(rest[-1], "width", path)
        if not 1 <= width < TILE_WIDTH:
            raise TileError(f"malformed tile path {path!r}: partial width must be 1..{TILE_WIDTH - 1}")
        rest = rest[:-2] + [rest[-2][:-2]]
    index = 0
    for i, group in enumerate(rest):
        last = i == len(rest) - 1
        digits = group if last else group[1:]
        if (not last and not group.startswith("x")) or len(digits) != 3 or not digits.isascii() or not digits.isdigit():
            raise TileError(f"malformed tile path {path!r}: bad index element {group!r}")
        index = index * 1000 + int(digits)
    if len(rest) > 1 and rest[0] == "x000":
        raise TileError(f"malformed tile path {path!r}: index has a leading zero group")
    return Tile(level, index, width)


def level_size(size: int, level: int) -> int:
    """Return how many hashes of tile level `level` a tree of `size` leaves has (size >> 8*level)."""
    return size >> (TILE_HEIGHT * level)


def tile_levels(size: int) -> int:
    """Return the number of tile levels a tree of this size publishes (0 for the empty tree)."""
    levels = 0
    while level_size(size, levels):
        levels += 1
    return levels


def level_tiles(size: int, level: int, first: int = 0) -> list[Tile]:
    """Return the hash tiles of one level of a tree of this size from index `first` on: full ones, then the partial one."""
    n = level_size(size, level)
    out = [Tile(level, k) for k in range(first, n // TILE_WIDTH)]
    if n % TILE_WIDTH and n // TILE_WIDTH >= first:
        out.append(Tile(level, n // TILE_WIDTH, n % TILE_WIDTH))
    return out


def published_tiles(size: int) -> list[Tile]:
    """Return every hash tile a tree of this size publishes, level by level (lowest first)."""
    return [t for level in range(tile_levels(size)) for t in level_tiles(size, level)]


def published_bundles(size: int) -> list[Tile]:
    """Return every entry bundle a tree of this size publishes (full ones, then the partial one if any)."""
    return [Tile(None, t.index, t.width) for t in level_tiles(size, 0)]


def _grown(old: list[Tile], new: list[Tile]) -> list[Tile]:
    have = set(old)
    return [t for t in new if t not in have]


def new_tiles(old_size: int, new_size: int) -> list[Tile]:
    """Return the hash tiles a tree of new_size publishes that one of old_size did not (new, or grown)."""
    if not 0 <= old_size <= new_size:
        raise TileError(f"invalid tree sizes {old_size} -> {new_size}")
    out = []
    for level in range(tile_levels(new_size)):
        first = level_size(old_size, level) // TILE_WIDTH  # tiles before it are full in both trees
        out += _grown(level_tiles(old_size, level, first), level_tiles(new_size, level, first))
    return out


def encode_tile(hashes: Sequence[bytes]) -> bytes:
    """Return a tile's bytes: its 1..256 hashes concatenated."""
    if not 1 <= len(hashes) <= TILE_WIDTH or any(len(h) != HASH_SIZE for h in hashes):
        raise TileError(f"a tile holds 1..{TILE_WIDTH} hashes of {HASH_SIZE} bytes")
    return b"".join(hashes)


def decode_tile(data: bytes, width: int | None = None) -> list[bytes]:
    """Return the hashes of a tile's bytes, checking the width if given; raise TileError if malformed."""
    if not data or len(data) % HASH_SIZE or len(data) > TILE_WIDTH * HASH_SIZE:
        raise TileError(f"a tile is 1..{TILE_WIDTH} hashes of {HASH_SIZE} bytes, got {len(data)} bytes")
    if width is not None and len(data) != width * HASH_SIZE:
        raise TileError(f"tile holds {len(data) // HASH_SIZE} hashes, expected {width}")
    return [bytes(data[i:i + HASH_SIZE]) for i in range(0, len(data), HASH_SIZE)]


def encode_bundle(entries: Sequence[bytes]) -> bytes:
    """Return an entry bundle: each entry as a big-endian uint16 length and its bytes."""
    if not 1 <= len(entries) <= TILE_WIDTH:
        raise TileError(f"an entry bundle holds 1..{TILE_WIDTH} entries, got {len(entries)}")
    return encode_bundles(entries)[0]


def encode_bundles(entries: Sequence[bytes], first_index: int = 0) -> list[bytes]:
    """Return the entry bundles of consecutive entries, 256 per bundle, the last possibly partial.

    first_index is the log index of entries[0], used only to name an entry that is too large.
    """
    lengths = list(map(len, entries))
    if lengths and max(lengths) > MAX_ENTRY_SIZE:
        i = next(i for i, n in enumerate(lengths) if n > MAX_ENTRY_SIZE)
        raise EntryTooLarge(f"entry {first_index + i} is {lengths[i]} bytes: a C2SP entry bundle stores "
                            f"at most {MAX_ENTRY_SIZE} bytes per entry (uint16 length)")
    if len(lengths) > 16_384:  # a table of all 65,536 prefixes pays for itself
        prefixes = list(map(_length_prefixes().__getitem__, lengths))
    else:
        prefixes = [n.to_bytes(2, "big") for n in lengths]
    out = []
    entries = entries if isinstance(entries, list) else list(entries)
    for start in range(0, len(entries), TILE_WIDTH):
        parts = [b""] * (2 * min(TILE_WIDTH, len(entries) - start))
        parts[0::2] = prefixes[start:start + TILE_WIDTH]
        parts[1::2] = entries[start:start + TILE_WIDTH]
        out.append(b"".join(parts))
    return out


class EntryRun:
    """Consecutive log entries held in entry-bundle form in one buffer, so every bundle of them is a slice of it.

    data holds each entry as its big-endian uint16 length and its bytes, back to back; offsets[i] is where
    entry i starts and offsets[-1] the end. first_index is the log index of entry 0 (for error messages).
    """

    def __init__(self, data: bytes | memoryview, offsets: np.ndarray, first_index: int = 0):
        self.data, self.offsets, self.first_index = memoryview(data).cast("B"), offsets.astype(np.int64), first_index
        sizes = np.diff(self.offsets) - 2
        too_large = np.flatnonzero(sizes > MAX_ENTRY_SIZE)
        if too_large.size:
            i = int(too_large[0])
            raise EntryTooLarge(f"entry {first_index + i} is {int(sizes[i])} bytes: a C2SP entry bundle stores "
                                f"at most {MAX_ENTRY_SIZE} bytes per entry (uint16 length)")

    @classmethod
    def encode(cls, entries: Sequence[bytes], first_index: int = 0) -> "EntryRun":
        """Return the run of these entries (encode_bundles' encoding); raise EntryTooLarge for one over 65,535 bytes."""
        offsets = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum([len(e) + 2 for e in entries], out=offsets[1:])
        return cls(b"".join(encode_bundles(entries, first_index)), offsets, first_index)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def bundle(self, start: int, count: int) -> memoryview:
        """Return the entry bundle of entries start..start+count-1 (a view of the run's buffer)."""
        return self.data[int(self.offsets[start]):int(self.offsets[start + count])]

    def entries(self) -> list[bytes]:
        """Return every entry's bytes, in order."""
        o, data = self.offsets.tolist(), self.data
        return [bytes(data[a + 2:b]) for a, b in zip(o, o[1:])]

    def leaf_hashes(self) -> bytes:
        """Return the RFC 6962 leaf hash of every entry, concatenated."""
        return merkle.leaf_hashes_in(self.data, memoryview(self.offsets), header=2)


@functools.cache
def _length_prefixes() -> list[bytes]:
    """Return the 2-byte big-endian encoding of every entry length 0..65535 (built once)."""
    return [n.to_bytes(2, "big") for n in range(MAX_ENTRY_SIZE + 1)]


def decode_bundle(data: bytes, width: int | None = None) -> list[bytes]:
    """Return the entries of an entry bundle, checking the count if given; raise TileError if malformed."""
    entries, pos, view = [], 0, memoryview(data)
    while pos < len(data):
        if pos + 2 > len(data):
            raise TileError(f"entry bundle ends inside a length prefix at byte {pos}")
        size = int.from_bytes(view[pos:pos + 2], "big")
        if pos + 2 + size > len(data):
            raise TileError(f"entry bundle ends inside entry {len(entries)} ({size} bytes from byte {pos + 2})")
        entries.append(bytes(view[pos + 2:pos + 2 + size]))
        pos += 2 + size
    if len(entries) > TILE_WIDTH or (width is not None and len(entries) != width):
        raise TileError(f"entry bundle holds {len(entries)} entries, expected {width or f'at most {TILE_WIDTH}'}")
    return entries


def tiles_between(sizes: Sequence[int], new_size: int) -> Iterator[Tile]:
    """Yield the partial hash tiles that trees of the given sizes publish and that are still partial at new_size.

    C2SP: a log MUST serve the partial tiles of every tree size it produced a checkpoint for, and MAY
    drop one once the full tile exists; these are the ones that cannot be dropped yet.
    """
    seen = set()
    for size in sizes:
        if not 0 <= size <= new_size:
            raise TileError(f"tree size {size} is not within 0..{new_size}")
        for level in range(tile_levels(size)):
            n = level_size(size, level)
            t = Tile(level, n // TILE_WIDTH, n % TILE_WIDTH)
            if t.width and t.index == level_size(new_size, level) // TILE_WIDTH and t not in seen:
                seen.add(t)
                yield t
