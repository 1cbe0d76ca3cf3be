"""fgtrac as a library inside your own training loop: ``with fg.track(ids, run=..., home=...) as run``.

See session/run.py for what a session records and commits, and session/influence.py for TracInCP over a
recorded run's checkpoints at the learning rates the run recorded.
"""

from .ids import SampleIdError, sample_id
from .run import Run, SessionError, track

__all__ = ["Run", "SampleIdError", "SessionError", "sample_id", "track"]
