"""The multimodal_graph chain on a small MovieLens subgraph: role events, k-hop commitments, verify, influence, prove."""

import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fgtrac_assets.pipelines.base import IngestSettings
from fgtrac_assets.cli import main as fgtrac
from fgtrac_assets.pipelines import movielens
from fgtrac_assets.pipelines.movielens import MovieLensPipeline

from .conftest import small_run_config

# "Which steps did rating $sample_id feed, as a target or as a neighbour?" (DuckDB, named parameter).
ROLE_STEPS_SQL = """
WITH nodes AS (
    SELECT DISTINCT sample_id, json_extract_string(detail, '$.user') AS usr, json_extract_string(detail, '$.movie') AS mov
    FROM events WHERE kind = 'split'),
mp AS (SELECT m.training_run, m.sample_id, n.usr, n.mov
       FROM events m JOIN nodes n USING (sample_id) WHERE m.kind = 'message_passing'),
x AS (SELECT * FROM mp WHERE sample_id = $sample_id),
raters_of_x_movie AS (SELECT mp.training_run, mp.usr FROM mp JOIN x USING (training_run) WHERE mp.mov = x.mov),
movies_of_x_user AS (SELECT mp.training_run, mp.mov FROM mp JOIN x USING (training_run) WHERE mp.usr = x.usr),
targets AS (SELECT b.training_run, b.epoch, b.step, b.sample_id, mp.usr, mp.mov
            FROM events b JOIN mp USING (training_run, sample_id) WHERE b.kind = 'batched')
SELECT training_run, epoch, step, 'target' AS role, 1 AS predictions
FROM targets WHERE sample_id = $sample_id
UNION ALL
SELECT t.training_run, t.epoch, t.step, 'neighbour' AS role, count(*) AS predictions
FROM targets t
WHERE EXISTS (SELECT 1 FROM raters_of_x_movie r WHERE r.training_run = t.training_run AND r.usr = t.usr)
   OR EXISTS (SELECT 1 FROM movies_of_x_user v WHERE v.training_run = t.training_run AND v.mov = t.mov)
GROUP BY ALL
ORDER BY training_run, step, role
"""

PIPELINE = "multimodal_graph"
LIMIT = 3000   # whole users in id order: the first 20 users, 2,691 ratings
EPOCHS = 2


def rows(home, sql, params=None):
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    try:
        rel = con.execute(sql, params or [])
        cols = [d[0] for d in rel.description]
        return [dict(zip(cols, r)) for r in rel.fetchall()]
    finally:
        con.close()


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    """A home holding one materialised multimodal_graph chain, and the materialisation metadata by asset."""
    from dagster import materialize

    from fgtrac_assets.pipelines.chain import CHAIN_NAMES
    from fgtrac_assets.assets.resources import FgtracResource
    from fgtrac_assets.definitions import all_assets

    home = tmp_path_factory.mktemp("graph-home")
    assets = [a for a in all_assets if a.key.path[0] == PIPELINE and a.key.path[-1] in CHAIN_NAMES]
    result = materialize(assets, resources={"fgtrac": FgtracResource(home=str(home))},
                         run_config=small_run_config(LIMIT, EPOCHS, pipeline=PIPELINE))
    assert result.success
    meta = {ev.event_specific_data.materialization.asset_key.path[-1]: ev.event_specific_data.materialization.metadata
            for ev in result.get_asset_materialization_events()}
    return home, meta


def split_ids(home, split):
    return {r["sample_id"] for r in rows(home, "SELECT sample_id FROM events WHERE kind='split' "
                                               "AND json_extract_string(detail, '$.split') = ?", [split])}


def message_passing(home):
    """The run's message-passing ratings with their two nodes (from each rating's `split` event)."""
    got = rows(home, """SELECT m.sample_id, json_extract_string(s.detail, '$.user') u, json_extract_string(s.detail, '$.movie') m
                        FROM events m JOIN events s ON s.kind = 'split' AND s.sample_id = m.sample_id
                        WHERE m.kind='message_passing' ORDER BY m.leaf_index, m.position""")
    return [r["sample_id"] for r in got], np.array([r["u"] for r in got]), np.array([r["m"] for r in got])


def test_chain_materialises_with_rmse_next_to_baselines(graph_run):
    home, meta = graph_run
    assert set(meta) == {"raw_samples", "preprocessed_samples", "training_checkpoints", "selected_checkpoints",
                         "gradient_cache", "influence_scores"}
    assert meta["raw_samples"]["samples"].value == 2691
    train = meta["training_checkpoints"]
    for key in ("test_rmse", "baseline_movie_mean_rmse", "baseline_global_mean_rmse"):
        assert 0 < train[key].value < 5, key
    assert train["test_ratings"].value == len(split_ids(home, "test"))


def test_split_is_time_aware_per_user(graph_run):
    home, _ = graph_run
    ids, _, _ = message_passing(home)
    assert set(ids) == split_ids(home, "train")  # only training ratings pass messages
    p = MovieLensPipeline()
    prepared = p.preprocess(p.ingest("", LIMIT).table).table.to_pylist()
    by_user: dict = {}
    for r in prepared:
        by_user.setdefault(r["user"], {}).setdefault(r["split"], []).append(r["timestamp"])
    for user, s in by_user.items():
        assert max(s["train"]) <= min(s["val"]) <= max(s["val"]) <= min(s["test"]), user
        assert len(s["test"]) == max(1, round(0.1 * sum(map(len, s.values()))))


def test_role_events_targets_and_message_passing(graph_run):
    home, _ = graph_run
    n_train = len(split_ids(home, "train"))
    counts = {r["kind"]: r["n"] for r in rows(home, "SELECT kind, count(*) n FROM events GROUP BY kind")}
    assert counts["batched"] == n_train * EPOCHS
    assert counts["message_passing"] == counts["receptive_field"] == n_train
    # every supervised prediction has its 2-hop neighbourhood's size and hash (once per run: the graph is fixed)
    bad = rows(home, """SELECT count(*) n FROM events b LEFT JOIN events f ON f.kind = 'receptive_field'
                            AND f.training_run = b.training_run AND f.sample_id = b.sample_id
                        WHERE b.kind='batched' AND NOT coalesce(
                            json_extract_string(f.detail, '$.role') = 'target'
                            AND CAST(json_extract(f.detail, '$.khop_edges') AS BIGINT) > 0
                            AND length(json_extract_string(f.detail, '$.khop_hash')) = 64
                            AND CAST(json_extract(f.detail, '$.hops') AS BIGINT) = 2, false)""")
    assert bad[0]["n"] == 0
    # message passing: for the whole run (epoch and step NULL), one row per training rating
    mp = rows(home, """SELECT count(DISTINCT sample_id) n, count(step) with_step, count(epoch) with_epoch
                       FROM events WHERE kind='message_passing'""")[0]
    assert mp == {"n": n_train, "with_step": 0, "with_epoch": 0}
    # every rating's split event names the edge's two nodes
    named = rows(home, """SELECT count(*) FILTER (WHERE detail->>'$.user' LIKE 'user:%'
                                                  AND detail->>'$.movie' LIKE 'movie:%') ok, count(*) n
                          FROM events WHERE kind='split'""")[0]
    assert named["ok"] == named["n"] > n_train


def test_khop_size_and_hash_recompute_from_the_ledger(graph_run):
    home, _ = graph_run
    ids, users, movies = message_passing(home)
    pos = {s: i for i, s in enumerate(ids)}
    targets = rows(home, """SELECT sample_id, detail FROM events WHERE kind='receptive_field'
                            ORDER BY hash(sample_id) LIMIT 25""")
    for t in targets:
        d = json.loads(t["detail"])
        u, m = users[pos[t["sample_id"]]], movies[pos[t["sample_id"]]]
        field = movielens.khop_edges(users, movies, u, m)
        assert len(field) == d["khop_edges"]
        assert pos[t["sample_id"]] in set(field.tolist())  # a training rating is in its own receptive field
        assert movielens.khop_hash_of(ids, list(users), list(movies), u, m) == d["khop_hash"]


def test_role_steps_sql_answers_target_and_neighbour(graph_run):
    home, _ = graph_run
    ids, users, movies = message_passing(home)
    x = ids[len(ids) // 2]
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    got = con.execute(ROLE_STEPS_SQL, {"sample_id": x}).fetchall()
    batched = con.execute("SELECT epoch, step, sample_id FROM events WHERE kind='batched'").fetchall()
    con.close()
    as_target = {(r[1], r[2]) for r in got if r[3] == "target"}
    assert as_target == {(e, s) for e, s, sid in batched if sid == x}
    # brute force: X fed the prediction of t when X lies in t's 2-hop receptive field
    pos = {s: i for i, s in enumerate(ids)}
    field_of = {}
    expected: dict = {}
    for epoch, step, sid in batched:
        if sid not in field_of:
            field_of[sid] = pos[x] in set(movielens.khop_edges(users, movies, users[pos[sid]], movies[pos[sid]]).tolist())
        if field_of[sid]:
            expected[(epoch, step)] = expected.get((epoch, step), 0) + 1
    as_neighbour = {(r[1], r[2]): r[4] for r in got if r[3] == "neighbour"}
    assert as_neighbour == expected and expected


def test_influence_for_every_test_rating_and_verify(graph_run, capsys):
    home, _ = graph_run
    test = split_ids(home, "test")
    prop = rows(home, "SELECT test_sample_id, count(*) n, min(score) lo FROM influence WHERE kind='proponent' GROUP BY 1")
    assert {r["test_sample_id"] for r in prop} == test
    assert all(r["n"] == 10 and r["lo"] > 0 for r in prop)
    assert rows(home, "SELECT max(score) s FROM influence WHERE kind='opponent'")[0]["s"] < 0
    n_self = rows(home, "SELECT count(*) n FROM influence WHERE kind='self'")[0]["n"]
    assert n_self == len(split_ids(home, "train"))
    assert fgtrac(["--home", str(home), "verify"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK")


def test_prove_a_rating(graph_run, tmp_path, capsys):
    home, _ = graph_run
    x = rows(home, "SELECT sample_id FROM events WHERE kind='batched' LIMIT 1")[0]["sample_id"]
    out = tmp_path / "receipts.json"
    assert fgtrac(["--home", str(home), "prove", x, "--out", str(out)]) == 0
    receipts = json.loads(out.read_text())
    import base64

    kinds = {json.loads(base64.b64decode(r["leaf"])).get("kind") for r in receipts}
    assert {"ingested", "preprocessed", "split", "message_passing", "receptive_field", "batched", "gradient"} <= kinds
    from fgtrac_assets.integrity.receipts import verify_member_receipt

    members = [verify_member_receipt(r) for r in receipts if "member" in r]  # steps, roles, gradients: a leaf per group
    assert {m["kind"] for m in members} == {"message_passing", "receptive_field", "batched", "gradient"}
    assert all(m["sample_id"] == x for m in members)
    capsys.readouterr()
    assert fgtrac(["verify-receipt", str(out)]) == 0
    assert capsys.readouterr().out.count("OK ") == len(receipts)


# ------------------------------------------------------------------ a user's graph


def write_graph(root, fmt="parquet"):
    nodes = [{"node_id": "u1", "type": "user", "title": None, "year": None, "genres": None},
             {"node_id": "u2", "type": "user", "title": None, "year": None, "genres": None},
             {"node_id": "m1", "type": "movie", "title": "Heat", "year": 1995, "genres": "Action|Crime"},
             {"node_id": "m2", "type": "movie", "title": None, "year": None, "genres": None},
             {"node_id": "m1", "type": "movie", "title": "Heat again", "year": 1995, "genres": "Action"},
             {"node_id": "x9", "type": "actor", "title": None, "year": None, "genres": None}]
    edges = [("u1", "m1", 4.0, 10), ("u1", "m2", 3.5, 20), ("u2", "m1", 5.0, 30),
             ("u2", "m9", 3.0, 40),          # unknown movie
             ("m1", "u1", 3.0, 50),          # endpoints swapped
             ("u2", "m2", 7.0, 60),          # out of range
             ("u2", "m2", float("nan"), 70),  # not finite
             ("u1", "m1", 2.0, 80),          # same pair rated again later: supersedes row 0
             ("u2", "m1", 5.0, 30),          # exact duplicate of row 2
             ("u2", "m2", 2.5, None)]        # no timestamp
    root.mkdir()
    edge_table = pa.table({"user_id": [e[0] for e in edges], "movie_id": [e[1] for e in edges],
                           "rating": [e[2] for e in edges], "timestamp": pa.array([e[3] for e in edges], pa.int64())})
    if fmt == "csv":
        write_csv(root / "nodes.csv", pa.Table.from_pylist(nodes))
        write_csv(root / "edges.csv", edge_table)
    else:
        pq.write_table(pa.Table.from_pylist(nodes), root / "nodes.parquet")
        pq.write_table(edge_table, root / "edges.parquet")


def write_csv(path, table: pa.Table, extra: bytes = b""):
    """Write a table as CSV text the way a user's tool would (header, commas, empty field = missing), plus raw lines."""
    def cell(v):
        return b"" if v is None else (v if isinstance(v, bytes) else str(v).encode())
    lines = [",".join(table.column_names).encode()]
    lines += [b",".join(cell(v) for v in r.values()) for r in table.to_pylist()]
    path.write_bytes(b"\n".join(lines) + b"\n" + extra)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_user_graph_rejections_have_reasons(tmp_path, fmt):
    write_graph(tmp_path / "g", fmt)
    got = MovieLensPipeline().ingest(str(tmp_path / "g"), 0)
    kept = got.table.to_pylist()
    assert sorted((r["user"], r["movie"], r["rating"]) for r in kept) == [("u1", "m1", 2.0), ("u1", "m2", 3.5),
                                                                          ("u2", "m1", 5.0)]
    assert {r["label"] for r in kept} == {4, 7, 10}
    assert all(r["source"].startswith(f"g/edges.{fmt}#row=") for r in kept)
    reasons = {r.source.replace(f".{fmt}#", ".X#"): r.reason for r in got.rejected}
    assert "duplicate node_id 'm1'" in reasons["g/nodes.X#row=4"]
    assert "neither 'user' nor 'movie'" in reasons["g/nodes.X#row=5"]
    assert f"'m9' is not a node in nodes.{fmt}" in reasons["g/edges.X#row=3"]
    assert "is a movie node, not a user" in reasons["g/edges.X#row=4"]
    assert "outside 0.5..5.0" in reasons["g/edges.X#row=5"]
    assert "not finite" in reasons["g/edges.X#row=6"]
    assert "only the latest rating" in reasons["g/edges.X#row=0"]
    assert f"duplicate of g/edges.{fmt}#row=2" in reasons["g/edges.X#row=8"]
    assert "timestamp is missing" in reasons["g/edges.X#row=9"]
    assert len(got.rejected) == 9


def test_user_graph_csv_keeps_ids_as_text_and_rejects_bad_rows(tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    write_csv(root / "nodes.csv", pa.table({"node_id": ["007", "7", "42"], "type": ["user", "user", "movie"]}))
    write_csv(root / "edges.csv", pa.table({"user_id": ["007", "7"], "movie_id": ["42", "42"], "rating": [4.0, 3.0],
                                            "timestamp": [1, 2]}),
              extra=b"7,42\n" + b"\xff7,42,2.0,3\n" + b"7,42,x,4\n")  # rows 2, 3, 4: short, not UTF-8, bad rating
    got = MovieLensPipeline().ingest(str(root), 0)
    assert sorted(got.table.column("user").to_pylist()) == ["007", "7"]  # '007' is not the number 7
    reasons = {r.source: r.reason for r in got.rejected}
    assert reasons == {"g/edges.csv#row=2": "malformed CSV row: 2 fields, the header has 4",
                       "g/edges.csv#row=3": "user_id is not UTF-8 text (byte 0xff at 0)",
                       "g/edges.csv#row=4": "rating 'x' is not a number"}
    (root / "edges.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="both edges.parquet and edges.csv: keep one"):
        MovieLensPipeline().ingest(str(root), 0)


def _bad_title_graph(root, how: str):
    """A graph whose movie m1 has a title that is not UTF-8 (Latin-1 'Léon'), stored `how`."""
    title = "Léon".encode("latin-1")
    root.mkdir()
    ids, kinds = ["u1", "u2", "m1", "m2"], ["user", "user", "movie", "movie"]
    titles = [None, None, title, b"Heat"]
    edges = pa.table({"user_id": ["u1", "u2", "u1", "u2"], "movie_id": ["m1", "m1", "m2", "m2"],
                      "rating": [4.0, 2.5, 3.0, 5.0], "timestamp": [1, 2, 3, 4]})
    if how == "csv":
        write_csv(root / "nodes.csv", pa.table({"node_id": ids, "type": kinds, "title": pa.array(titles, pa.binary())}))
        write_csv(root / "edges.csv", edges)
        return
    column = pa.array(titles, pa.binary())
    if how == "parquet-string":  # a string column holding invalid UTF-8, as some writers produce
        column = column.view(pa.string())
    pq.write_table(pa.table({"node_id": ids, "type": kinds, "title": column}), root / "nodes.parquet")
    pq.write_table(edges, root / "edges.parquet")


@pytest.mark.parametrize("how", ["parquet-binary", "parquet-string", "csv"])
def test_title_that_is_not_utf8_is_dropped_with_a_rejection_and_the_ratings_stay(tmp_path, how):
    from fgtrac_assets.ledger.store import Ledger
    from fgtrac_assets.pipelines import stages

    _bad_title_graph(tmp_path / "g", how)
    ledger = Ledger(tmp_path / "home")
    raw = stages.ingest(ledger, MovieLensPipeline(), "run", IngestSettings(source=str(tmp_path / "g")))
    assert raw.metadata["samples"] == 4  # every rating stays, those of m1 included
    suffix = "csv" if how == "csv" else "parquet"
    assert raw.metadata["rejections"] == [
        f"g/nodes.{suffix}#row=2: rejected: node 'm1': title is not UTF-8 text (byte 0xe9 at 1): dropped, "
        "the movie and its ratings are kept"]
    assert rows(tmp_path / "home", "SELECT count(*) n FROM events WHERE kind = 'rejected'")[0]["n"] == 1
    table = raw.handle.artifacts["raw"].read_parquet(ledger.home.root)
    titles = {m: t for m, t in zip(table.column("movie").to_pylist(), table.column("title").to_pylist())}
    assert titles == {"m1": None, "m2": "Heat"}  # a valid title in a binary column is read as text
    prep = stages.preprocess(ledger, MovieLensPipeline(), "run", raw.handle)
    assert prep.metadata["samples"] == 4


def test_limit_takes_whole_users_in_id_order():
    p = MovieLensPipeline()
    got = p.ingest("", 1000).table
    users = sorted({int(u.split(":")[1]) for u in got.column("user").to_pylist()})
    assert users == list(range(1, len(users) + 1))
    def per_user(table):
        counts: dict = {}
        for u in table.column("user").to_pylist():
            counts[u] = counts.get(u, 0) + 1
        return counts

    everything = per_user(p.ingest("", 0).table)
    assert sum(everything.values()) == 100_004
    taken = per_user(p.ingest("", 5000).table)
    # every rating of each taken user, and no more users than fit
    assert all(taken[u] == everything[u] for u in taken)
    assert sum(taken.values()) <= 5000 < sum(taken.values()) + everything[f"user:{len(taken) + 1}"]


# ------------------------------------------------------------ proponents and opponents, described


def md_rows(md: str) -> list[list[str]]:
    import re

    lines = [ln for ln in md.splitlines() if ln.startswith("|")][2:]  # past the header and the rule
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]


def test_influence_metadata_shows_user_title_and_rating_of_proponents_and_opponents(graph_run):
    home, meta = graph_run
    table = md_rows(meta["influence_scores"]["proponents_opponents_table"].md_str)
    p = MovieLensPipeline()
    truth = {r["sample_id"][:12]: r for r in p.ingest("", LIMIT).table.to_pylist()}
    tests = [r for r in table if r[1] == "**test**"]
    assert len(tests) == 4
    for row in table:  # columns: test, kind, rank, sample, user, movie, rating, score
        sid = row[3].strip("`")
        t = truth[sid]
        assert row[4:7] == [t["user"], t["title"] or t["movie"], f"{t['rating']:g}"], row
    # the proponents and opponents listed are the ledger's top 4 of that test rating, in rank order, with their scores
    test_id = tests[0][0].strip("`")
    full = next(s for s in split_ids(home, "test") if s.startswith(test_id))
    for kind in ("proponent", "opponent"):
        ledger_top = rows(home, "SELECT train_sample_id, score FROM influence WHERE test_sample_id = ? AND kind = ? "
                                "ORDER BY rank LIMIT 4", [full, kind])
        shown = [r for r in table if r[0].strip("`") == test_id and r[1] == kind]
        assert [r[3].strip("`") for r in shown] == [x["train_sample_id"][:12] for x in ledger_top]
        assert [float(r[7]) for r in shown] == pytest.approx([x["score"] for x in ledger_top], rel=1e-3)
        assert all((float(r[7]) > 0) == (kind == "proponent") for r in shown)
    assert any(r[5] != "" and not r[5].startswith("movie:") for r in table)  # titles, not node ids


def test_default_description_is_the_label():
    from fgtrac_assets.pipelines.digits import DigitsPipeline
    from fgtrac_assets.report.tables import proponents_opponents_md

    prepared = pa.table({"sample_id": ["a" * 64, "b" * 64, "c" * 64], "label": [3, 5, 3]})
    described = DigitsPipeline().describe_samples(prepared, ["a" * 64, "b" * 64])
    assert described == {"a" * 64: {"label": "3"}, "b" * 64: {"label": "5"}}
    md = proponents_opponents_md(described, [("a" * 64, [("b" * 64, 0.5)], [])])
    assert md_rows(md) == [["`aaaaaaaaaaaa`", "**test**", "", "`aaaaaaaaaaaa`", "3", ""],
                           ["`aaaaaaaaaaaa`", "proponent", "1", "`bbbbbbbbbbbb`", "5", "+0.5"]]


def test_audit_and_report_show_who_rated_which_movie(graph_run, tmp_path, capsys):
    home, _ = graph_run
    truth = {r["sample_id"]: r for r in MovieLensPipeline().ingest("", LIMIT).table.to_pylist()}
    test = sorted(split_ids(home, "test"))[0]
    capsys.readouterr()
    assert fgtrac(["--home", str(home), "audit", "influence", test, "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in shown} == {"proponent", "opponent"}
    for r in shown:  # the rating's user, movie and title, as preprocessing recorded them with its split
        t = truth[r["train_sample_id"]]
        want = {f"user={t['user']}", f"movie={t['movie']}"} | ({f"title={t['title']}"} if t["title"] else set())
        assert all(w in r["about"] for w in want) and len(r["about"]) == len(", ".join(want)), (r["about"], want)
    assert any("title=" in r["about"] for r in shown)
    assert fgtrac(["--home", str(home), "report", "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "about the train sample" in page and "title=" in page
