"""Turn a stage's plain metadata into Dagster metadata values."""

from dagster import MetadataValue


def to_dagster(meta: dict) -> dict:
    """Return Dagster metadata: numbers and strings as they are, the tree head as text, the rest as JSON."""
    out = {}
    for key, value in meta.items():
        if key == "signed_tree_head":
            out[key] = MetadataValue.text(value)
        elif key == "root":
            out[key] = MetadataValue.text(value)
        elif key.endswith("_md"):
            out[key[:-3]] = MetadataValue.md(value)
        elif isinstance(value, bool) or value is None:
            out[key] = MetadataValue.text(str(value))
        elif isinstance(value, (int, float, str)):
            out[key] = value
        else:
            out[key] = MetadataValue.json(_jsonable(value))
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
