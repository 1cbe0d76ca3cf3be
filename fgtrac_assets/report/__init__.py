"""Pictures and the static HTML audit report (matplotlib; no Dagster)."""
