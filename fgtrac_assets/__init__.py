"""fgtrac: sample-level traceability for ML pipelines.

From your own training code: ``import fgtrac_assets as fg`` then ``with fg.track(sample_ids, run="run-1",
home="./data") as run: ...`` (session/run.py), and ``fg.influence(...)`` for TracInCP over the run's recorded
checkpoints (session/influence.py). Loaded on first use, so ``import fgtrac_assets`` stays light.
"""

__all__ = ["influence", "sample_id", "track"]


def __getattr__(name: str):
    """Return the session API (fg.track, fg.influence, fg.sample_id), imported on first use."""
    if name in ("track", "sample_id"):
        from . import session

        return getattr(session, name)
    if name == "influence":
        from .session.influence import influence

        return influence
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
