"""Sample identity: the SHA-256 of a sample's canonical content."""

import base64
import hashlib
import re

import numpy as np

from ..integrity.canonical import content_id


def array_sample_id(array: np.ndarray) -> str:
    """Return the id of an array sample: SHA-256 of canonical JSON of its dtype, shape and bytes."""
    arr = np.ascontiguousarray(array)
    return content_id({"dtype": arr.dtype.str, "shape": list(arr.shape),
                       "data": base64.b64encode(arr.tobytes()).decode("ascii")})


def bytes_digest(data: bytes) -> str:
    """Return the hex SHA-256 of raw bytes (used for derived, non-sample content)."""
    return hashlib.sha256(data).hexdigest()


_CONTENT_ID = re.compile(r"[0-9a-f]{64}")


def name_sample_id(name: str) -> str:
    """Return the id of a sample a user names: a 64-hex content id as it is, else SHA-256 of canonical {"name": name}."""
    return name if _CONTENT_ID.fullmatch(name) else content_id({"name": name})
