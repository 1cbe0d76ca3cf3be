"""Event groups: one leaf per training step, members verified against it, old ledgers upgraded in place."""

import duckdb
import pyarrow as pa

from fgtrac_assets.integrity.members import StringColumn, members_bytes, members_digests, parse_members
from fgtrac_assets.ledger.groups import arrow_strings
from fgtrac_assets.ledger.store import Commit, Ledger
from fgtrac_assets.ledger.verify import verify_ledger
from fgtrac_assets.tracing.tracer import Tracer

IDS = [f"s{i:03d}" for i in range(300)] + ["ünïcode \"quoted\"\n", ""]


def test_arrow_buffers_give_the_members_bytes_of_their_strings():
    details = [None if i % 3 else f'{{"i": {i}}}' for i in range(len(IDS))]
    ids, dets = pa.array(IDS), pa.array(details)
    assert parse_members(members_bytes(arrow_strings(ids), arrow_strings(dets))) == list(zip(IDS, details))
    bounds = [0, 7, 7, 150, len(IDS)]
    want = members_digests(StringColumn.of(IDS), StringColumn.of(details), bounds)
    assert members_digests(arrow_strings(ids), arrow_strings(dets), bounds) == want
    chunked = pa.chunked_array([ids.slice(0, 10), ids.slice(10)]), pa.chunked_array([dets.slice(0, 10), dets.slice(10)])
    assert members_digests(*map(arrow_strings, chunked), bounds) == want
    sliced = ids.cast(pa.large_string()).slice(5, 20), dets.slice(5, 20)  # a non-zero offset into shared buffers
    assert members_bytes(*map(arrow_strings, sliced)) == members_bytes(StringColumn.of(IDS[5:25]),
                                                                       StringColumn.of(details[5:25]))
    assert members_bytes(arrow_strings(ids), arrow_strings(pa.nulls(len(IDS), pa.string()))) == \
        members_bytes(StringColumn.of(IDS), StringColumn.of([None] * len(IDS)))
    assert members_bytes(arrow_strings(pa.array(["", ""])), arrow_strings(pa.array(["", None]))) == \
        members_bytes(StringColumn.of(["", ""]), StringColumn.of(["", None]))


def old_layout(home):
    """Turn a ledger into the layout written before event groups: a plain `events` table, no group tables."""
    con = duckdb.connect(str(home / "ledger.duckdb"))
    assert con.execute("SELECT count(*) FROM event_groups").fetchall() == [(0,)]
    con.execute("CREATE TABLE old_events AS SELECT * FROM event_rows")
    for sql in ("DROP VIEW events", "DROP TABLE event_rows", "ALTER TABLE old_events RENAME TO events",
                "CREATE INDEX events_sample_idx ON events (sample_id)", "DROP TABLE group_members",
                "DROP TABLE sample_keys", "DROP TABLE event_groups", "DROP TABLE fgtrac_schema"):
        con.execute(sql)
    con.close()


def test_a_ledger_from_before_groups_verifies_and_upgrades_on_its_next_write(tmp_path):
    ledger = Ledger(tmp_path / "home")
    events = pa.table({"sample_id": IDS[:3], "kind": ["ingested"] * 3, "pipeline": ["p"] * 3})
    ledger.commit(Commit(pipeline="p", asset="raw", run_id="r1", rows={"events": events}))
    old_layout(ledger.home.root)
    assert verify_ledger(ledger).ok  # read-only: the old layout as it is

    tracer = Tracer(IDS[:10], "run-1")
    tracer.start_epoch(0)
    tracer.record_batch([3, 1, 4], 0.5)
    tracer.record_batch([1, 5], 0.25)
    result = ledger.commit(Commit(pipeline="p", asset="train", run_id="r2", groups=tracer.groups()))
    assert result.rows == {"event_groups": 2, "events": 5} and result.leaf_count == 3  # 2 steps + materialisation
    report = verify_ledger(ledger)
    assert report.ok, [f.line() for f in report.findings]
    rows = ledger.query("SELECT kind, sample_id, step, position, lr FROM events ORDER BY leaf_index, position")
    assert rows.to_pylist()[:3] == [{"kind": "ingested", "sample_id": s, "step": None, "position": None, "lr": None}
                                    for s in IDS[:3]]
    assert [(r["sample_id"], r["step"], r["position"], r["lr"]) for r in rows.to_pylist()[3:]] == [
        ("s003", 0, 0, 0.5), ("s001", 0, 1, 0.5), ("s004", 0, 2, 0.5), ("s001", 1, 0, 0.25), ("s005", 1, 1, 0.25)]
    def keys():
        return ledger.query("SELECT count(*) AS n FROM sample_keys").column(0)[0].as_py()

    assert keys() == 10  # one per sample of the run
    again = Tracer(IDS[5:12], "run-2")
    again.record_batch([0, 6], 0.1)
    ledger.commit(Commit(pipeline="p", asset="train", run_id="r3", groups=again.groups()))
    assert keys() == 12 and verify_ledger(ledger).ok  # ids seen before keep their key
