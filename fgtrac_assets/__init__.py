"""fgtrac: sample-level traceability for ML pipelines.

From your own training code: ``import fgtrac_assets as fg`` then ``with fg.track(sample_ids, run="run-1",
home="./data") as run: ...`` (session/run.py); ``fg.influence(...)`` for TracInCP over the run's recorded
checkpoints and ``fg.checkpoints(run)`` for them as TracInCP's (state_dict, lr) pairs (session/scoring.py).
Loaded on first use, so ``import fgtrac_assets`` stays light.
"""

__all__ = ["checkpoints", "influence", "sample_id", "track"]


def __getattr__(name: str):
    """Return the session API (fg.track, fg.influence, fg.sample_id), imported on first use."""
    if name in ("track", "sample_id"):
        from . import session

        return getattr(session, name)
    if name in ("influence", "checkpoints"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.session.scoring"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
