"""Sample identity: the SHA-256 of a sample's canonical content."""

import base64
import hashlib

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
