"""Canonical JSON (RFC 8785) and content identifiers."""

import hashlib
from typing import Any

import rfc8785


def canonical_json(obj: Any) -> bytes:
    """Return the RFC 8785 (JCS) canonical UTF-8 JSON encoding of obj."""
    return rfc8785.dumps(obj)


def sha256_hex(data: bytes) -> str:
    """Return the lowercase hex SHA-256 digest of data."""
    return hashlib.sha256(data).hexdigest()


def content_id(obj: Any) -> str:
    """Return the hex SHA-256 of the canonical JSON encoding of obj."""
    return sha256_hex(canonical_json(obj))
