"""Sample ids of a session: the user's names for samples, and the ledger ids they become."""

from collections.abc import Sequence

from ..errors import InputError
from ..tracing.ids import name_sample_id as sample_id


__all__ = ["SampleIdError", "check_names", "sample_id"]


class SampleIdError(InputError):
    """Sample ids that cannot name a dataset's items (count, type or duplicates)."""


def check_names(names: Sequence, dataset_size: int | None) -> list[str]:
    """Return the names as a list after checking there is one per dataset item, each text and unique."""
    names = list(names)
    if dataset_size is not None and len(names) != dataset_size:
        raise SampleIdError(f"sample ids: {len(names)} given for a dataset of {dataset_size} items (one per item)")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n:
            raise SampleIdError(f"sample ids: item {i} is {n!r}, not a non-empty text")
    if len(set(names)) != len(names):
        seen, dup = set(), None
        for n in names:
            if n in seen:
                dup = n
                break
            seen.add(n)
        raise SampleIdError(f"sample ids: {dup!r} names more than one item (ids must be unique)")
    return names
