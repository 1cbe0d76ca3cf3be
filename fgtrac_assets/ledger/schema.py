"""The ledger's tables: every committed table row is one leaf of the log."""

# Column order matters only for display; a row's leaf is its canonical JSON,
# where keys are sorted. Every leaf table also has `leaf_index`, which is the
# row's position in the log and so not part of its content.
LEAF_TABLES: dict[str, list[tuple[str, str]]] = {
    "samples": [
        ("sample_id", "VARCHAR"),
        ("pipeline", "VARCHAR"),
        ("source", "VARCHAR"),
        ("label", "BIGINT"),
        ("run_id", "VARCHAR"),
        ("asset", "VARCHAR"),
    ],
    "events": [
        ("sample_id", "VARCHAR"),
        ("pipeline", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("asset", "VARCHAR"),
        ("kind", "VARCHAR"),
        ("training_run", "VARCHAR"),
        ("epoch", "BIGINT"),
        ("step", "BIGINT"),
        ("position", "BIGINT"),
        ("lr", "DOUBLE"),
        ("checkpoint_id", "VARCHAR"),
        ("detail", "VARCHAR"),
    ],
    "artifacts": [
        ("path", "VARCHAR"),
        ("sha256", "VARCHAR"),
        ("bytes", "BIGINT"),
        ("kind", "VARCHAR"),
        ("pipeline", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("asset", "VARCHAR"),
        ("training_run", "VARCHAR"),
    ],
    "checkpoints": [
        ("checkpoint_id", "VARCHAR"),
        ("pipeline", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("training_run", "VARCHAR"),
        ("epoch", "BIGINT"),
        ("step", "BIGINT"),
        ("lr", "DOUBLE"),
        ("train_loss", "DOUBLE"),
        ("val_loss", "DOUBLE"),
        ("path", "VARCHAR"),
        ("sha256", "VARCHAR"),
    ],
    "checkpoint_selections": [
        ("checkpoint_id", "VARCHAR"),
        ("pipeline", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("training_run", "VARCHAR"),
        ("selected", "BOOLEAN"),
        ("rank", "BIGINT"),
        ("reason", "VARCHAR"),
    ],
    "influence": [
        ("pipeline", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("training_run", "VARCHAR"),
        ("method", "VARCHAR"),
        ("test_sample_id", "VARCHAR"),
        ("train_sample_id", "VARCHAR"),
        ("kind", "VARCHAR"),
        ("rank", "BIGINT"),
        ("score", "DOUBLE"),
    ],
    "training_sets": [
        ("training_run", "VARCHAR"),
        ("pipeline", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("asset", "VARCHAR"),
        ("size", "BIGINT"),
        ("root", "VARCHAR"),
    ],
    "materializations": [
        ("pipeline", "VARCHAR"),
        ("asset", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("training_run", "VARCHAR"),
        ("code_version", "VARCHAR"),
        ("leaf_start", "BIGINT"),
        ("leaf_count", "BIGINT"),
        ("upstream", "VARCHAR"),
        ("created_at", "VARCHAR"),
    ],
}

# Tables committed by a materialisation, in the order their leaves are appended.
# `materializations` comes last: its row names the range of the others.
LEAF_ORDER = list(LEAF_TABLES)

LOG_DDL = [
    # pos = level << 48 | index: level 0 holds the leaf hashes, level k the perfect subtree hashes over 2**k
    # leaves. One BIGINT key lets a proof fetch all its O(log n) nodes with one indexed IN-list query.
    "CREATE TABLE IF NOT EXISTS log_nodes (pos BIGINT PRIMARY KEY, hash BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tree_heads (size BIGINT NOT NULL, root BLOB NOT NULL, note VARCHAR NOT NULL, verifier_key VARCHAR NOT NULL, pipeline VARCHAR, asset VARCHAR, run_id VARCHAR, created_at VARCHAR NOT NULL)",
]

VIEW_DDL = [
    """CREATE OR REPLACE VIEW log_tree AS
       SELECT pos >> 48 AS level, pos & ((1::BIGINT << 48) - 1) AS idx, hash FROM log_nodes""",
    """CREATE OR REPLACE VIEW checkpoint_summary AS
       SELECT c.checkpoint_id, c.pipeline, c.training_run, c.epoch, c.step, c.lr, c.train_loss, c.val_loss,
              coalesce(s.selected, false) AS selected, s.rank AS selection_rank, s.reason, c.path, c.sha256
       FROM checkpoints c
       LEFT JOIN (SELECT * FROM checkpoint_selections
                  QUALIFY row_number() OVER (PARTITION BY checkpoint_id ORDER BY leaf_index DESC) = 1) s
         USING (checkpoint_id)""",
    """CREATE OR REPLACE VIEW asset_lineage AS
       SELECT DISTINCT m.pipeline, u.key AS upstream_asset, m.asset
       FROM materializations m, json_each(m.upstream) u""",
]


def leaf_table_ddl(name: str) -> str:
    """Return the CREATE TABLE statement of a leaf table."""
    cols = ", ".join(f"{col} {typ}" for col, typ in LEAF_TABLES[name])
    return f"CREATE TABLE IF NOT EXISTS {name} (leaf_index BIGINT NOT NULL, {cols})"


def all_ddl() -> list[str]:
    """Return every statement that creates the ledger's tables and views."""
    return [leaf_table_ddl(t) for t in LEAF_ORDER] + LOG_DDL + VIEW_DDL
