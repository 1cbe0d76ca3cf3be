"""Record lifecycle events from any torch loop; no Dagster here.

``from fgtrac_assets.tracing import Tracer`` is the entry point; it is loaded on first use, so the event
buffers, ids and the Recorder contract (``Recorder``, ``NullRecorder``) below import without torch.
"""

from typing import TYPE_CHECKING

from .events import EVENT_COLUMNS, EventBuffer
from .ids import array_sample_id, bytes_digest
from .recorder import NullRecorder, Recorder

if TYPE_CHECKING:
    from .tracer import Tracer

__all__ = ["EVENT_COLUMNS", "EventBuffer", "NullRecorder", "Recorder", "Tracer", "array_sample_id", "bytes_digest"]


def __getattr__(name: str):
    """Return Tracer from tracing.tracer (which imports torch), imported on first use."""
    if name == "Tracer":
        from .tracer import Tracer

        return Tracer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
