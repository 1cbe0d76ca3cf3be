import hashlib

from fgtrac_assets.integrity.canonical import canonical_json, content_id, sha256_hex


def test_canonical_json_sorts_keys_and_strips_whitespace():
    assert canonical_json({"b": 1, "a": [1.0, "é", None, True]}) == '{"a":[1,"é",null,true],"b":1}'.encode()


def test_canonical_json_is_order_independent():
    assert canonical_json({"x": {"d": 4, "c": 3}, "y": 2}) == canonical_json({"y": 2, "x": {"c": 3, "d": 4}})


def test_rfc8785_number_serialisation():
    # Values from RFC 8785 appendix B (ECMAScript number formatting).
    assert canonical_json([1e21, 1e-7, 0.000001, -0.0, 333333333.3333333]) == b"[1e+21,1e-7,0.000001,0,333333333.3333333]"


def test_sha256_hex_and_content_id():
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    obj = {"sample": "s-1", "step": 3}
    assert content_id(obj) == hashlib.sha256(b'{"sample":"s-1","step":3}').hexdigest()
    assert content_id({"step": 3, "sample": "s-1"}) == content_id(obj)
