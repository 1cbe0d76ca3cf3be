import hashlib

import pytest

from fgtrac_assets.integrity.merkle import (
    EMPTY_ROOT,
    build_levels,
    consistency_proof,
    consistency_proof_from,
    inclusion_proof,
    inclusion_proof_from,
    leaf_hash,
    merkle_root,
    node_hash,
    range_hash,
    root_from,
    verify_consistency,
    verify_inclusion,
    verify_inclusion_hash,
)

# RFC 6962 test vectors, verbatim from transparency-dev/merkle:
# testonly/constants.go (LeafInputs, NodeHashes, RootHashes) and
# proof/verify_test.go (inclusionProofs, consistencyProofs).
LEAVES = [bytes.fromhex(h) for h in [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]]

NODE_HASHES = [[bytes.fromhex(h) for h in level] for level in [
    [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    [
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ],
]]

# Indexed by tree size, starting from the empty tree.
ROOT_HASHES = [bytes.fromhex(h) for h in [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]]

# (leaf, size, proof); leaf is 1-based as in the Go source (index = leaf - 1).
INCLUSION_PROOFS = [
    (1, 1, []),
    (1, 8, [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]),
    (6, 8, [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]),
    (3, 3, [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    ]),
    (2, 5, [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ]),
]

# (size1, size2, proof)
CONSISTENCY_PROOFS = [
    (1, 1, []),
    (1, 8, [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]),
    (6, 8, [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]),
    (2, 5, [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ]),
    (6, 7, [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]),
]

SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def _hx(proof):
    return [bytes.fromhex(h) for h in proof]


# Straight transcription of RFC 6962 section 2.1 recursions, used as an oracle.
def _split(n):
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d):
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return leaf_hash(d[0])
    k = _split(len(d))
    return node_hash(ref_mth(d[:k]), ref_mth(d[k:]))


def ref_path(m, d):
    if len(d) == 1:
        return []
    k = _split(len(d))
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m, d, b):
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _split(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def entries(n):
    return [b"entry-%d" % i for i in range(n)]


# --- published vectors -------------------------------------------------------


def test_hash_primitives_match_vectors():
    assert [leaf_hash(x) for x in LEAVES] == NODE_HASHES[0]
    assert node_hash(NODE_HASHES[0][0], NODE_HASHES[0][1]) == NODE_HASHES[1][0]


@pytest.mark.parametrize("size", range(0, 9))
def test_roots_match_vectors(size):
    assert merkle_root(LEAVES[:size]) == ROOT_HASHES[size]


def test_empty_root():
    assert merkle_root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()


def test_build_levels_matches_node_hashes():
    assert build_levels([leaf_hash(x) for x in LEAVES]) == NODE_HASHES


@pytest.mark.parametrize("leaf,size,proof", INCLUSION_PROOFS)
def test_inclusion_vectors(leaf, size, proof):
    proof = _hx(proof)
    index = leaf - 1
    assert inclusion_proof(LEAVES[:size], index) == proof
    assert verify_inclusion(LEAVES[index], index, size, proof, ROOT_HASHES[size])


@pytest.mark.parametrize("size1,size2,proof", CONSISTENCY_PROOFS)
def test_consistency_vectors(size1, size2, proof):
    proof = _hx(proof)
    assert consistency_proof(LEAVES[:size2], size1) == proof
    assert verify_consistency(size1, size2, ROOT_HASHES[size1], ROOT_HASHES[size2], proof)


# --- exhaustive round trips ----------------------------------------------------


def test_inclusion_round_trip_all_sizes_up_to_40():
    data = entries(40)
    for n in range(1, 41):
        root = merkle_root(data[:n])
        assert root == ref_mth(data[:n])
        for i in range(n):
            proof = inclusion_proof(data[:n], i)
            assert proof == ref_path(i, data[:n])
            assert verify_inclusion(data[i], i, n, proof, root)
            assert not verify_inclusion(data[i] + b"x", i, n, proof, root)
            if n > 1:
                assert not verify_inclusion(data[i], (i + 1) % n, n, proof, root)


def test_consistency_round_trip_all_pairs_up_to_40():
    data = entries(40)
    roots = [merkle_root(data[:n]) for n in range(41)]
    for n in range(0, 41):
        for m in range(0, n + 1):
            proof = consistency_proof(data[:n], m)
            if 0 < m < n:
                assert proof == ref_subproof(m, data[:n], True)
                assert not verify_consistency(m, n, roots[m], SOME_HASH, proof)
                assert not verify_consistency(m, n, SOME_HASH, roots[n], proof)
            else:
                assert proof == []
            assert verify_consistency(m, n, roots[m], roots[n], proof)


# --- tampering and malformed input -----------------------------------------------


def _inclusion_probes(index, size, proof, root, lh):
    probes = [
        (index - 1, size, root, lh, proof),
        (index + 1, size, root, lh, proof),
        (index ^ 2, size, root, lh, proof),
        (index, size * 2, root, lh, proof),
        (index, size // 2, root, lh, proof),
        (index, size, root, leaf_hash(b"WrongLeaf"), proof),
        (index, size, EMPTY_ROOT, lh, proof),
        (index, size, SOME_HASH, lh, proof),
        (index, size, root, lh, proof + [b""]),
        (index, size, root, lh, proof + [root]),
        (index, size, root, lh, [b""] + proof),
        (index, size, root, lh, [root] + proof),
    ]
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 8]) + bad[i][1:]
        probes.append((index, size, root, lh, bad))
    if proof:
        probes.append((index, size, root, lh, proof[:-1]))
    if len(proof) > 1:
        probes.append((index, size, root, lh, [proof[0], SOME_HASH] + proof[1:]))
    return probes


@pytest.mark.parametrize("leaf,size,proof", INCLUSION_PROOFS)
def test_tampered_inclusion_fails(leaf, size, proof):
    proof, index = _hx(proof), leaf - 1
    lh = leaf_hash(LEAVES[index])
    assert verify_inclusion_hash(lh, index, size, proof, ROOT_HASHES[size])
    for probe in _inclusion_probes(index, size, proof, ROOT_HASHES[size], lh):
        assert not verify_inclusion_hash(*probe), probe


@pytest.mark.parametrize("size1,size2,proof", [v for v in CONSISTENCY_PROOFS if v[2]])
def test_tampered_consistency_fails(size1, size2, proof):
    proof = _hx(proof)
    r1, r2 = ROOT_HASHES[size1], ROOT_HASHES[size2]
    probes = [
        (size1 - 1, size2, r1, r2, proof),
        (size1 + 1, size2, r1, r2, proof),
        (size1 ^ 2, size2, r1, r2, proof),
        (size1, size2 * 2, r1, r2, proof),
        (size1, size2 // 2, r1, r2, proof),
        (size1, size2, b"WrongRoot", r2, proof),
        (size1, size2, r1, b"WrongRoot", proof),
        (size1, size2, r2, r1, proof),
        (size1, size2, r1, r2, []),
        (size1, size2, r1, r2, proof + [b""]),
        (size1, size2, r1, r2, proof + [r1]),
        (size1, size2, r1, r2, proof + [r2]),
        (size1, size2, r1, r2, [b""] + proof),
        (size1, size2, r1, r2, [r1] + proof),
        (size1, size2, r1, r2, [r2] + proof),
        (size1, size2, r1, r2, [proof[0]] + proof),
        (size1, size2, r1, r2, proof[:-1]),
    ]
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 16]) + bad[i][1:]
        probes.append((size1, size2, r1, r2, bad))
    for probe in probes:
        assert not verify_consistency(*probe), probe


def test_trivial_consistency_cases():
    r1, r2 = SOME_HASH, leaf_hash(b"other")
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 5, EMPTY_ROOT, r2, [])
    assert verify_consistency(1, 1, r2, r2, [])
    assert not verify_consistency(0, 0, r1, r2, [])
    assert not verify_consistency(1, 1, r1, r2, [])
    assert not verify_consistency(0, 5, r1, r2, [])  # an empty tree has the empty root
    assert not verify_consistency(1, 0, r1, r2, [])
    assert not verify_consistency(2, 1, r1, r2, [])
    assert not verify_consistency(1, 2, r1, r2, [])
    assert not verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])
    assert not verify_consistency(0, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])
    assert not verify_consistency(1, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])


@pytest.mark.parametrize("index,size", [(0, 0), (0, 1), (1, 0), (2, 1)])
def test_inclusion_rejects_bad_root_or_leaf(index, size):
    assert not verify_inclusion_hash(SOME_HASH, index, size, [], b"")
    assert not verify_inclusion_hash(b"", index, size, [], EMPTY_ROOT)
    assert not verify_inclusion_hash(SOME_HASH, index, size, [], EMPTY_ROOT)


@pytest.mark.parametrize("bad", [
    dict(index=-1), dict(index=1), dict(index=8), dict(index=0.0), dict(index="0"), dict(index=None), dict(index=False),
    dict(size=-8), dict(size=None), dict(root=b"short"), dict(root="0" * 32),
    dict(proof=None), dict(proof="abc"), dict(proof=[1, 2, 3]), dict(leaf=None), dict(leaf="str"),
])
def test_malformed_input_returns_false(bad):
    args = dict(leaf=LEAVES[0], index=0, size=8, proof=_hx(INCLUSION_PROOFS[1][2]), root=ROOT_HASHES[8])
    assert verify_inclusion(args["leaf"], args["index"], args["size"], args["proof"], args["root"])
    args.update(bad)
    assert not verify_inclusion(args["leaf"], args["index"], args["size"], args["proof"], args["root"])


@pytest.mark.parametrize("args", [
    (-1, 8, ROOT_HASHES[1], ROOT_HASHES[8], []),
    (1, 8, ROOT_HASHES[1], ROOT_HASHES[8], None),
    (1, 8, ROOT_HASHES[1], ROOT_HASHES[8], [b"x" * 31] * 3),
    (1, 8, None, ROOT_HASHES[8], _hx(CONSISTENCY_PROOFS[1][2])),
    (1, "8", ROOT_HASHES[1], ROOT_HASHES[8], _hx(CONSISTENCY_PROOFS[1][2])),
    (1.0, 8, ROOT_HASHES[1], ROOT_HASHES[8], _hx(CONSISTENCY_PROOFS[1][2])),
])
def test_malformed_consistency_returns_false(args):
    assert not verify_consistency(*args)


def test_generation_rejects_out_of_range():
    with pytest.raises(ValueError):
        inclusion_proof(LEAVES, 8)
    with pytest.raises(ValueError):
        inclusion_proof([], 0)
    with pytest.raises(ValueError):
        consistency_proof(LEAVES, 9)


# --- storage-facing API ------------------------------------------------------------


class CountingReader:
    def __init__(self, levels):
        self.levels = levels
        self.calls = 0

    def __call__(self, level, index):
        self.calls += 1
        return self.levels[level][index]


def test_from_functions_agree_with_list_versions():
    data = entries(40)
    levels = build_levels([leaf_hash(x) for x in data])
    perfect = CountingReader(levels)
    for n in range(0, 41):
        assert root_from(perfect, n) == merkle_root(data[:n])
        for i in range(n):
            assert inclusion_proof_from(perfect, i, n) == inclusion_proof(data[:n], i)
        for m in range(n + 1):
            assert consistency_proof_from(perfect, m, n) == consistency_proof(data[:n], m)


def test_range_hash_rejects_unaligned_range():
    levels = build_levels([leaf_hash(x) for x in LEAVES])
    perfect = CountingReader(levels)
    assert range_hash(perfect, 4, 7) == ref_mth(LEAVES[4:7])
    with pytest.raises(ValueError):
        range_hash(perfect, 2, 6)


def test_from_functions_use_logarithmic_reads():
    # A fake reader over a virtual 2**40-ish tree: only the call count matters.
    calls = []

    def perfect(level, index):
        calls.append((level, index))
        return hashlib.sha256(b"%d/%d" % (level, index)).digest()

    size = (1 << 40) + 12345
    for fn, args in [
        (root_from, (size,)),
        (inclusion_proof_from, (size - 1, size)),
        (inclusion_proof_from, (777_777_777, size)),
        (consistency_proof_from, ((1 << 39) + 99, size)),
        (consistency_proof_from, (size - 3, size)),
    ]:
        calls.clear()
        fn(perfect, *args)
        assert len(calls) <= 3 * 41, (fn.__name__, len(calls))
