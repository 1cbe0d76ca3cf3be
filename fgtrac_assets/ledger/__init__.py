"""The DuckDB ledger: append-only tables, the Merkle log beside them, audits and verification (no torch, no Dagster).

The library surface is ``Ledger`` and ``Commit`` (``from fgtrac_assets.ledger import Ledger, Commit``); they are
loaded on first use, so importing one of the package's modules (``ledger.lock``, ``ledger.groups``) stays light.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Commit, Ledger

__all__ = ["Commit", "Ledger"]


def __getattr__(name: str):
    """Return Ledger or Commit from ledger.store, imported on first use."""
    if name in __all__:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
