"""Top-level entry point for Dagster tools: re-exports fgtrac's Definitions."""

from fgtrac_assets.definitions import defs

__all__ = ["defs"]
