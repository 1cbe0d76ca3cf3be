"""Record lifecycle events from any torch loop; no Dagster here. (Tracer imports torch lazily.)"""

from .events import EVENT_COLUMNS, EventBuffer
from .ids import array_sample_id, bytes_digest

__all__ = ["EVENT_COLUMNS", "EventBuffer", "array_sample_id", "bytes_digest"]
