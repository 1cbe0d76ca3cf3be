"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and verification (SHA-256).

Proof generation works against a ``PerfectHash`` reader, so a storage layer can
serve proofs for huge logs from stored interior nodes with O(log n) reads; the
list-based helpers build every level in memory and use the same algorithms.
"""

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

# perfect(level, index): hash of the perfect subtree of height `level` covering
# leaves [index * 2**level, (index + 1) * 2**level); level 0 is the leaf hash.
PerfectHash = Callable[[int, int], bytes]

_sha256 = hashlib.sha256


def leaf_hash(leaf: bytes) -> bytes:
    """Return the RFC 6962 leaf hash SHA-256(0x00 || leaf)."""
    return _sha256(b"\x00" + leaf).digest()


def leaf_hashes(leaves: Sequence[bytes]) -> list[bytes]:
    """Return the RFC 6962 leaf hash of every leaf, in order."""
    sha = _sha256
    return [sha(b"\x00" + x).digest() for x in leaves]


def leaf_hashes_in(buffer: bytes | memoryview, offsets: Sequence[int], header: int = 0) -> bytes:
    """Return the RFC 6962 leaf hashes of leaves laid out back to back, concatenated.

    Leaf i is buffer[offsets[i] + header : offsets[i + 1]]: each record starts with `header` bytes that are not
    part of the leaf (2 for an entry bundle's length prefix).
    """
    view, prefix, out = memoryview(buffer), _sha256(b"\x00"), bytearray()
    bounds = iter(offsets)
    a = next(bounds, None)
    for b in bounds:  # copying the 0x00-fed state beats concatenating 0x00 to each leaf; no per-leaf objects kept
        h = prefix.copy()
        h.update(view[a + header:b])
        out += h.digest()
        a = b
    return bytes(out)


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 interior node hash SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Return the largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_hash(perfect: PerfectHash, start: int, end: int) -> bytes:
    """Return MTH of leaves [start, end), a range aligned as RFC 6962's recursion makes them."""
    n = end - start
    if n < 0:
        raise ValueError(f"invalid range [{start}, {end})")
    if n == 0:
        return EMPTY_ROOT
    if start % (1 << (n.bit_length() - 1)):
        raise ValueError(f"range [{start}, {end}) is not aligned to a Merkle subtree")
    # The range is a run of aligned perfect subtrees, largest first; MTH folds them right to left.
    parts = []
    pos = start
    for level in range(n.bit_length() - 1, -1, -1):
        if n >> level & 1:
            parts.append(perfect(level, pos >> level))
            pos += 1 << level
    acc = parts.pop()
    while parts:
        acc = node_hash(parts.pop(), acc)
    return acc


def root_from(perfect: PerfectHash, size: int) -> bytes:
    """Return the Merkle tree hash of the first size leaves."""
    return range_hash(perfect, 0, size)


def inclusion_proof_from(perfect: PerfectHash, index: int, size: int) -> list[bytes]:
    """Return the RFC 6962 audit path for leaf index in a tree of size leaves, leaf upward."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} out of range for tree size {size}")
    path = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(range_hash(perfect, lo + k, hi))
            hi = lo + k
        else:
            path.append(range_hash(perfect, lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_proof_from(perfect: PerfectHash, old_size: int, new_size: int) -> list[bytes]:
    """Return the RFC 6962 consistency proof PROOF(old_size, D[new_size])."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"invalid consistency sizes {old_size} -> {new_size}")
    if old_size in (0, new_size):
        return []
    proof = []
    lo, hi = 0, new_size
    complete = True  # RFC 6962's SUBPROOF flag b: the old tree is a whole subtree seen so far.
    while old_size - lo != hi - lo:
        k = _split(hi - lo)
        if old_size - lo <= k:
            proof.append(range_hash(perfect, lo + k, hi))
            hi = lo + k
        else:
            proof.append(range_hash(perfect, lo, lo + k))
            lo += k
            complete = False
    if not complete:
        proof.append(range_hash(perfect, lo, hi))
    proof.reverse()
    return proof


def build_levels(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """Return all complete perfect levels: levels[0] are the leaf hashes, levels[k][i] joins levels[k-1][2i:2i+2]."""
    levels = [list(leaf_hashes)]
    while len(levels[-1]) >= 2:
        cur = levels[-1]
        levels.append([_sha256(b"\x01" + a + b).digest() for a, b in zip(cur[0::2], cur[1::2])])
    return levels


def _levels_reader(levels: list[list[bytes]]) -> PerfectHash:
    return lambda level, index: levels[level][index]


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Return the RFC 6962 Merkle tree hash of the raw leaves."""
    levels = build_levels([leaf_hash(x) for x in leaves])
    return root_from(_levels_reader(levels), len(leaves))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Return the RFC 6962 audit path for leaves[index], ordered from the leaf upward."""
    levels = build_levels([leaf_hash(x) for x in leaves])
    return inclusion_proof_from(_levels_reader(levels), index, len(leaves))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Return the RFC 6962 consistency proof from the first old_size leaves to all of them."""
    levels = build_levels([leaf_hash(x) for x in leaves])
    return consistency_proof_from(_levels_reader(levels), old_size, len(leaves))


def _is_size(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_hash(x: object) -> bool:
    return isinstance(x, (bytes, bytearray)) and len(x) == HASH_SIZE


class Verdict:
    """The outcome of checking a proof: true when it holds, false with `reason` saying which check failed."""

    __slots__ = ("reason",)

    def __init__(self, reason: str | None = None):
        self.reason = reason

    def __bool__(self) -> bool:
        return self.reason is None

    def __repr__(self) -> str:
        return "Verdict(ok)" if self.reason is None else f"Verdict({self.reason!r})"


_HOLDS = Verdict()


def _short(h: bytes) -> str:
    return bytes(h).hex()[:16] + "…"


def _size_problem(what: str, x: object) -> str | None:
    return None if _is_size(x) else f"{what} must be a non-negative int, got {x!r}"


def _hash_problem(what: str, x: object) -> str | None:
    if not isinstance(x, (bytes, bytearray)):
        return f"{what} must be bytes, got {type(x).__name__}"
    return None if len(x) == HASH_SIZE else f"{what} is {len(x)} bytes, not {HASH_SIZE}"


def _proof_problem(proof: object) -> str | None:
    if not isinstance(proof, (list, tuple)):
        return f"the proof must be a list of hashes, got {type(proof).__name__}"
    return next(filter(None, (_hash_problem(f"proof hash {i}", p) for i, p in enumerate(proof))), None)


def inclusion_proof_size(index: int, size: int) -> int:
    """Return how many hashes the RFC 6962 inclusion proof of leaf index in a tree of size leaves has (index < size)."""
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def consistency_proof_size(old_size: int, new_size: int) -> int:
    """Return how many hashes the RFC 6962 consistency proof from old_size to new_size has (0 < old_size < new_size)."""
    shift = (old_size & -old_size).bit_length() - 1  # trailing zeros: the old tree's largest complete subtree
    return inclusion_proof_size(old_size - 1, new_size) - shift + (old_size != 1 << shift)


def verify_inclusion_hash(
    leaf_digest: bytes, index: int, tree_size: int, proof: list[bytes], root: bytes
) -> Verdict:
    """Return a Verdict, true iff proof shows the leaf hash at index in the tree with this root (RFC 9162 2.1.3.2)."""
    why = _size_problem("the leaf index", index) or _size_problem("the tree size", tree_size)
    if why is None and index >= tree_size:
        why = f"leaf index {index} is not below the tree size {tree_size}"
    why = why or _hash_problem("the leaf hash", leaf_digest) or _hash_problem("the root", root) or _proof_problem(proof)
    if why is None and len(proof) != (want := inclusion_proof_size(index, tree_size)):
        why = f"the proof has {len(proof)} hashes, expected {want} for index {index} in a tree of {tree_size}"
    if why:
        return Verdict(why)
    fn, sn = index, tree_size - 1
    r = bytes(leaf_digest)
    for p in proof:
        if sn == 0:  # not reached: the length was checked above
            return Verdict(f"the proof is too long for index {index} in a tree of {tree_size}")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # not reached: the length was checked above
        return Verdict(f"the proof is too short for index {index} in a tree of {tree_size}")
    if r != root:
        return Verdict(f"the proof gives the root {_short(r)}, not the expected {_short(root)}")
    return _HOLDS


def verify_inclusion(leaf: bytes, index: int, tree_size: int, proof: list[bytes], root: bytes) -> Verdict:
    """Return a Verdict, true iff proof shows the raw leaf at index in the tree of tree_size leaves with this root."""
    if not isinstance(leaf, (bytes, bytearray)):
        return Verdict(f"the leaf must be bytes, got {type(leaf).__name__}")
    return verify_inclusion_hash(leaf_hash(leaf), index, tree_size, proof, root)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> Verdict:
    """Return a Verdict, true iff proof shows the old_size tree is a prefix of the new_size tree (RFC 9162 2.1.4.2)."""
    why = _size_problem("the old size", old_size) or _size_problem("the new size", new_size)
    if why is None and old_size > new_size:
        why = f"the old size {old_size} is larger than the new size {new_size}"
    why = why or _hash_problem("the old root", old_root) or _hash_problem("the new root", new_root) \
        or _proof_problem(proof)
    if why:
        return Verdict(why)
    if old_size in (0, new_size):
        if proof:
            return Verdict(f"the proof from size {old_size} to {new_size} must be empty, it has {len(proof)} hashes")
        if old_size == new_size and old_root != new_root:
            return Verdict(f"the trees have the same size {old_size} but different roots "
                           f"({_short(old_root)}, {_short(new_root)})")
        if old_size != new_size and old_root != EMPTY_ROOT:
            return Verdict(f"the old root {_short(old_root)} is not the root of the empty tree")
        return _HOLDS
    if len(proof) != (want := consistency_proof_size(old_size, new_size)):
        return Verdict(f"the proof has {len(proof)} hashes, expected {want} from size {old_size} to {new_size}")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:  # not reached: the length was checked above
            return Verdict(f"the proof is too long from size {old_size} to {new_size}")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # not reached: the length was checked above
        return Verdict(f"the proof is too short from size {old_size} to {new_size}")
    if fr != old_root:
        return Verdict(f"the proof gives the old root {_short(fr)}, not the given {_short(old_root)}")
    if sr != new_root:
        return Verdict(f"the proof gives the new root {_short(sr)}, not the given {_short(new_root)}")
    return _HOLDS
