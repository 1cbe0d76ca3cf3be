"""fgtrac as a library inside your own training loop: ``with fg.track(ids, run=..., home=...) as run``.

See session/run.py for what a session records and commits, session/scoring.py for TracInCP over a
recorded run's checkpoints at the learning rates the run recorded, session/distributed.py for DDP.
Names load on first use, so the `fgtrac` command starts without torch.
"""

from .ids import SampleIdError, sample_id

__all__ = ["Run", "SampleIdError", "SessionError", "checkpoints", "influence", "sample_id", "track"]


def __getattr__(name: str):
    """Return Run, SessionError, track (session/run.py) or influence (session/scoring.py) on first use."""
    if name in ("Run", "SessionError", "track"):
        from . import run

        return getattr(run, name)
    if name in ("influence", "checkpoints"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.scoring"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
