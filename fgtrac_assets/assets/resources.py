"""The Dagster resource that gives assets the ledger under FGTRAC_HOME."""

from dagster import ConfigurableResource

from ..ledger.store import Ledger


class FgtracResource(ConfigurableResource):
    """Where the ledger, artifacts and keys live ('' = $FGTRAC_HOME, else ./data)."""

    home: str = ""

    def ledger(self) -> Ledger:
        """Return the Ledger of this home."""
        return Ledger(self.home or None)
