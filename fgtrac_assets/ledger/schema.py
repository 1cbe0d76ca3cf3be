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
    # One leaf for a group of events that share every column but sample_id, position and detail (a training
    # step's batch, a run's message-passing edges): see ledger/groups.py. Its members are `group_members` rows;
    # `members` is the hex SHA-256 of their members bytes. The `events` view lists them with the other events.
    "event_groups": [
        ("kind", "VARCHAR"),
        ("pipeline", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("asset", "VARCHAR"),
        ("training_run", "VARCHAR"),
        ("epoch", "BIGINT"),
        ("step", "BIGINT"),
        ("lr", "DOUBLE"),
        ("checkpoint_id", "VARCHAR"),
        ("first_position", "BIGINT"),
        ("size", "BIGINT"),
        ("members", "VARCHAR"),
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
    # A training run recorded through the session API (fgtrac_assets/session): its world size, its data
    # sampler (DistributedSampler's seed, shuffle, drop_last and the epochs it was set to, so a verifier can
    # recompute each rank's share) and its optimizers' parameter groups (parameter names and hyperparameters).
    "training_runs": [
        ("training_run", "VARCHAR"),
        ("pipeline", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("asset", "VARCHAR"),
        ("world_size", "BIGINT"),
        ("sampler", "VARCHAR"),
        ("optimizers", "VARCHAR"),
    ],
    # Every optimizer step of a session-recorded run: applied, or skipped (a GradScaler found inf/NaN gradients);
    # `lrs` is JSON {optimizer number: [lr of each parameter group]}, what the step applied.
    "optimizer_steps": [
        ("training_run", "VARCHAR"),
        ("pipeline", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("asset", "VARCHAR"),
        ("step", "BIGINT"),
        ("epoch", "BIGINT"),
        ("applied", "BOOLEAN"),
        ("lrs", "VARCHAR"),
        ("samples", "BIGINT"),
        ("micro_batches", "BIGINT"),
    ],
    # The log's key history: the first signing key, and each rotation, endorsed by the key it replaces
    # (`endorsement` is a signed note by the previous key naming the new one; empty for the first key).
    "log_keys": [
        ("origin", "VARCHAR"),
        ("verifier_key", "VARCHAR"),
        ("previous_key", "VARCHAR"),
        ("endorsement", "VARCHAR"),
        ("created_at", "VARCHAR"),
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

# Where a leaf table's rows are stored when that is not its name: `events` is a view over the events that are
# leaves themselves (`event_rows`) and the members of event groups.
PHYSICAL = {"events": "event_rows"}


def physical(table: str) -> str:
    """Return the stored table holding a leaf table's own rows."""
    return PHYSICAL.get(table, table)


INDEX_DDL = [
    "CREATE INDEX IF NOT EXISTS event_rows_sample_idx ON event_rows (sample_id)",
]

GROUP_DDL = [
    # One row per sample id ever grouped: members store the 8-byte key, not the id (ledger/groups.py).
    "CREATE TABLE IF NOT EXISTS sample_keys (sample_key BIGINT NOT NULL, sample_id VARCHAR NOT NULL UNIQUE)",
    # The members of event groups: not leaves; their group's members digest commits to them.
    "CREATE TABLE IF NOT EXISTS group_members (leaf_index BIGINT NOT NULL, position BIGINT NOT NULL, "
    "sample_key BIGINT NOT NULL, detail VARCHAR)",
]

LOG_DDL = [
    # Results of `fgtrac verify`: not log leaves (they describe the log), kept for integrity_status.
    "CREATE TABLE IF NOT EXISTS verifications (verified_at VARCHAR NOT NULL, tree_size BIGINT NOT NULL, ok BOOLEAN NOT NULL, findings BIGINT NOT NULL, summary VARCHAR)",
    # The Merkle tree as tiles (see ledger/nodes.py): tile = tile level << 48 | tile index; 256 hashes of the
    # perfect subtrees at level 8 * tile level per full tile, concatenated. One row per 256 hashes keeps appends cheap.
    "CREATE TABLE IF NOT EXISTS log_tiles (tile BIGINT PRIMARY KEY, width INTEGER NOT NULL, hashes BLOB NOT NULL)",
    # Witness cosignatures of tree heads (C2SP tlog-cosignature lines): not leaves; each verifies on its own.
    "CREATE TABLE IF NOT EXISTS cosignatures (size BIGINT NOT NULL, witness VARCHAR NOT NULL, vkey VARCHAR NOT NULL, "
    "line VARCHAR NOT NULL, received_at VARCHAR NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tree_heads (size BIGINT NOT NULL, root BLOB NOT NULL, note VARCHAR NOT NULL, verifier_key VARCHAR NOT NULL, pipeline VARCHAR, asset VARCHAR, run_id VARCHAR, created_at VARCHAR NOT NULL)",
]

VIEW_DDL = [
    """CREATE OR REPLACE VIEW events AS
       SELECT leaf_index, sample_id, pipeline, run_id, asset, kind, training_run, epoch, step, position, lr,
              checkpoint_id, detail
       FROM event_rows
       UNION ALL
       SELECT m.leaf_index, k.sample_id, g.pipeline, g.run_id, g.asset, g.kind, g.training_run, g.epoch, g.step,
              m.position, g.lr, g.checkpoint_id, m.detail
       FROM group_members m JOIN event_groups g USING (leaf_index) JOIN sample_keys k USING (sample_key)""",
    # Every stored hash as (level, idx, hash): the leaf hashes (level 0) and the tile roots (levels 8, 16, ...).
    """CREATE OR REPLACE VIEW log_tree AS
       SELECT (tile >> 48) * 8 AS level, (tile & ((1::BIGINT << 48) - 1)) * 256 + i AS idx,
              hashes[i * 32 + 1 : i * 32 + 32] AS hash
       FROM (SELECT tile, hashes, unnest(range(width)) AS i FROM log_tiles)""",
    """CREATE OR REPLACE VIEW checkpoint_summary AS
       SELECT c.checkpoint_id, c.pipeline, c.training_run, c.epoch, c.step, c.lr, c.train_loss, c.val_loss,
              coalesce(s.selected, false) AS selected, s.rank AS selection_rank, s.reason, c.path, c.sha256
       FROM checkpoints c
       LEFT JOIN (SELECT * FROM checkpoint_selections
                  QUALIFY row_number() OVER (PARTITION BY checkpoint_id ORDER BY leaf_index DESC) = 1) s
         USING (checkpoint_id)""",
    """CREATE OR REPLACE VIEW sample_history AS
       SELECT e.sample_id, e.leaf_index, e.kind, e.pipeline, e.asset, e.run_id, e.training_run, e.epoch, e.step,
              e.position, e.lr, e.checkpoint_id, e.detail
       FROM events e WHERE e.sample_id IS NOT NULL""",
    """CREATE OR REPLACE VIEW sample_usage AS
       WITH used AS (
           SELECT sample_id, training_run, count(DISTINCT epoch) AS epochs, count(*) AS steps,
                  min(step) AS first_step, max(step) AS last_step, min(epoch) AS first_epoch,
                  max(epoch) AS last_epoch, min(lr) AS min_lr, max(lr) AS max_lr
           FROM events WHERE kind = 'batched' GROUP BY ALL),
       runs AS (SELECT DISTINCT pipeline, training_run FROM training_sets),
       samples_of AS (SELECT DISTINCT pipeline, sample_id FROM samples)
       SELECT s.sample_id, r.pipeline, r.training_run, u.sample_id IS NOT NULL AS used,
              coalesce(u.epochs, 0) AS epochs, coalesce(u.steps, 0) AS steps, u.first_step, u.last_step,
              u.first_epoch, u.last_epoch, u.min_lr, u.max_lr
       FROM samples_of s JOIN runs r USING (pipeline)
       LEFT JOIN used u ON u.sample_id = s.sample_id AND u.training_run = r.training_run""",
    # Parameterised forms of the two views above: the filter sits on the base table, so DuckDB answers
    # from the events(sample_id) index instead of scanning every event.
    """CREATE OR REPLACE MACRO sample_history_of(sid) AS TABLE
       SELECT sample_id, leaf_index, kind, pipeline, asset, run_id, training_run, epoch, step, position, lr,
              checkpoint_id, detail
       FROM events WHERE sample_id = sid ORDER BY leaf_index""",
    """CREATE OR REPLACE MACRO sample_usage_of(sid, run) AS TABLE
       WITH s AS MATERIALIZED (SELECT * FROM events WHERE sample_id = sid)  -- the index lookup, alone
       SELECT sid AS sample_id, run AS training_run, count(*) > 0 AS used, count(DISTINCT epoch) AS epochs,
              count(*) AS steps, min(step) AS first_step, max(step) AS last_step, min(lr) AS min_lr, max(lr) AS max_lr
       FROM s WHERE kind = 'batched' AND training_run = run""",
    """CREATE OR REPLACE VIEW model_training_set AS
       SELECT t.pipeline, t.training_run, t.size AS committed_size, t.root AS committed_root, e.sample_id
       FROM training_sets t
       JOIN (SELECT DISTINCT training_run, sample_id FROM events WHERE kind = 'batched') e USING (training_run)""",
    """CREATE OR REPLACE VIEW influence_top AS
       SELECT pipeline, training_run, method, test_sample_id, kind, rank, train_sample_id, score, leaf_index
       FROM influence WHERE kind IN ('proponent', 'opponent')""",
    # Advisory: `verifications` rows are written by `fgtrac verify` on this machine and are not log leaves, so
    # anyone who can write the file can add one. The latest row by insertion order counts (a row dated in the
    # future does not outrank a later verify), and `advisory` says what the status is worth.
    """CREATE OR REPLACE VIEW integrity_status AS
       WITH last AS (SELECT * FROM verifications ORDER BY rowid DESC LIMIT 1)
       SELECT m.pipeline, m.asset, max(m.leaf_start + m.leaf_count) AS committed_through,
              (SELECT max(size) FROM tree_heads) AS latest_tree_head,
              any_value(last.verified_at) AS last_verified_at, any_value(last.tree_size) AS verified_tree_size,
              CASE WHEN any_value(last.ok) IS NULL THEN 'never verified'
                   WHEN max(m.leaf_start + m.leaf_count) > any_value(last.tree_size) THEN 'not yet verified'
                   WHEN any_value(last.ok) THEN 'ok' ELSE 'FAILED' END AS status,
              'advisory: the last local `fgtrac verify`; anyone who can write the file can add a row, so run '
              || '`fgtrac verify` to know' AS advisory
       FROM materializations m LEFT JOIN last ON true GROUP BY m.pipeline, m.asset""",
    """CREATE OR REPLACE VIEW asset_lineage AS
       SELECT DISTINCT m.pipeline, u.key AS upstream_asset, m.asset
       FROM materializations m, json_each(m.upstream) u""",
]


def leaf_table_ddl(name: str) -> str:
    """Return the CREATE TABLE statement of a leaf table."""
    cols = ", ".join(f"{col} {typ}" for col, typ in LEAF_TABLES[name])
    return f"CREATE TABLE IF NOT EXISTS {physical(name)} (leaf_index BIGINT NOT NULL, {cols})"


def view_ddl() -> list[str]:
    """Return the statements that create the ledger's views and macros (re-created as TEMP on every read)."""
    return list(VIEW_DDL)


def all_ddl() -> list[str]:
    """Return every statement that creates the ledger's tables and views."""
    return [leaf_table_ddl(t) for t in LEAF_ORDER] + INDEX_DDL + GROUP_DDL + LOG_DDL + VIEW_DDL


def migrate_events_table(con) -> None:
    """Move a ledger written before event groups (a plain `events` table) to `event_rows`, in the caller's transaction."""
    kind = con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'events'").fetchall()
    if kind and kind[0][0] == "BASE TABLE":
        con.execute(leaf_table_ddl("events"))  # the code's definition, constraints included (verify compares it)
        con.execute("INSERT INTO event_rows BY NAME SELECT * FROM events")
        con.execute("DROP TABLE events")  # and its index; INDEX_DDL makes event_rows' own
