"""Issue #15 (outside testing): a rejected item never stops the good samples, and bad input never crashes or corrupts."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from dagster import RunConfig, materialize
from PIL import Image

from fgtrac_assets.pipelines.base import IngestSettings
from fgtrac_assets.assets.configs import RawSamplesConfig, TrainingConfig
from fgtrac_assets.pipelines.chain import CHAIN_NAMES
from fgtrac_assets.assets.resources import FgtracResource
from fgtrac_assets.definitions import all_assets
from fgtrac_assets.ledger.checks import run_checks
from fgtrac_assets.pipelines.chain import stage
from fgtrac_assets.ledger.store import Ledger
from fgtrac_assets.ledger.verify import verify_ledger
from fgtrac_assets.pipelines import stages
from fgtrac_assets.pipelines.digits import DigitsPipeline
from fgtrac_assets.pipelines.inbox import scan_inbox
from fgtrac_assets.pipelines.movielens import MovieLensPipeline

from test_bad_input import failure_message, png, run_chain

GRAPH = [a for a in all_assets if a.key.path[0] == "multimodal_graph" and a.key.path[-1] in CHAIN_NAMES]


# ------------------------------------------------------------------------------------------ helpers


def rejections(home) -> list[dict]:
    """Every `rejected` event of a home: its sample id and its detail (source, reason)."""
    got = Ledger(home).query("SELECT sample_id, detail FROM events WHERE kind = 'rejected' ORDER BY leaf_index")
    return [{"sample_id": r["sample_id"], **json.loads(r["detail"])} for r in got.to_pylist()]


def by_source(home) -> dict[str, str]:
    """{source: reason} of the rejections; fails if one source was rejected twice."""
    got = rejections(home)
    out = {r["source"]: r["reason"] for r in got}
    assert len(out) == len(got), got
    return out


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height 8-bit grey pixels (a decompression bomb when huge)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def gradient16() -> np.ndarray:
    """An 8x8 16-bit grey gradient: 64 distinct levels over the whole 0..65535 range."""
    return np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)


def good_images(root, per_class: int, seed: int = 0, classes=range(10)):
    """Write per_class distinct random 8x8 grey PNGs into each integer class folder."""
    rng = np.random.default_rng(seed)
    for label in classes:
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / str(label) / f"img{i:03d}.png").write_bytes(png(rng.integers(0, 256, (8, 8))))


def write_bytes_named(folder, name: bytes, data: bytes):
    """Write a file whose name is raw bytes (not necessarily UTF-8)."""
    with open(os.path.join(os.fsencode(str(folder)), name), "wb") as f:
        f.write(data)


def ingest(tmp_path, source, **kw):
    """stages.ingest of the digits pipeline into a fresh home; return (result, home)."""
    home = tmp_path / "home"
    return stages.ingest(Ledger(home), DigitsPipeline(), "run", IngestSettings(source=str(source), **kw)), home


def raw_rows(home, result) -> dict[str, dict]:
    """{source: row} of the raw artifact an ingestion wrote."""
    table = result.handle.artifacts["raw"].read_parquet(Ledger(home).home.root)
    return {r["source"]: r for r in table.to_pylist()}


def materialized(result) -> set[str]:
    return {e.event_specific_data.materialization.asset_key.path[-1] for e in result.get_asset_materialization_events()}


def failed_checks(result) -> list:
    return [(e.asset_key.path[-1], e.check_name, e.description) for e in result.get_asset_check_evaluations()
            if not e.passed]


# ------------------------------------------------------------------ §4: rejected items never stop the good ones


def bad_image_folder(root, outside):
    """An ImageFolder of 200 good 8x8 images plus one item of every bad kind; return the bad items' sources."""
    good_images(root, per_class=20)
    rng = np.random.default_rng(99)
    jpeg = encoded(Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)), "JPEG")
    (root / "0" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "0" / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    write_bytes_named(root / "0", b"\xff\xfe.png", png(rng.integers(0, 256, (8, 8))))
    (root / "0" / "000-tiny.png").write_bytes(png(np.full((1, 1), 7)))  # sorts first among the images
    rgba = np.dstack([rng.integers(0, 256, (8, 8, 3)), np.full((8, 8), 128)]).astype(np.uint8)
    (root / "1" / "transparent.png").write_bytes(encoded(Image.fromarray(rgba, "RGBA")))
    (root / "2" / "deep.png").write_bytes(encoded(Image.fromarray(gradient16())))  # 16-bit: converted, kept
    for name in ("²", "-1", "abc"):
        (root / name).mkdir()
        (root / name / "x.png").write_bytes(png(rng.integers(0, 256, (8, 8))))
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(rng.integers(0, 256, (8, 8))))
    (root / "outside").symlink_to(outside, target_is_directory=True)
    return {"imagefolder:0/truncated.jpg", "imagefolder:0/bomb.png", "imagefolder:0/\\xff\\xfe.png",
            "imagefolder:0/000-tiny.png", "imagefolder:1/transparent.png", "imagefolder:²/", "imagefolder:-1/",
            "imagefolder:abc/", "imagefolder:outside/"}


def test_digits_chain_completes_with_one_rejection_per_bad_item(tmp_path, one_torch_thread):
    """§4 + §5: one of every bad kind in an ImageFolder; the whole chain still trains and scores the good samples."""
    bad = bad_image_folder(tmp_path / "imgs", tmp_path / "elsewhere")
    result = run_chain(tmp_path / "h", raw={"source": str(tmp_path / "imgs")})
    assert result.success, failure_message(result)
    assert materialized(result) == set(CHAIN_NAMES) and failed_checks(result) == []
    reasons = by_source(tmp_path / "h")
    assert set(reasons) == bad, reasons
    assert "corrupt or truncated" in reasons["imagefolder:0/truncated.jpg"]
    assert "decompression bomb" in reasons["imagefolder:0/bomb.png"]
    assert "not UTF-8" in reasons["imagefolder:0/\\xff\\xfe.png"]
    assert "wrong size 1x1, expected 8x8" in reasons["imagefolder:0/000-tiny.png"]
    assert "transparent" in reasons["imagefolder:1/transparent.png"]
    assert all("is not a label" in reasons[f"imagefolder:{n}/"] for n in ("²", "-1", "abc"))
    assert "symbolic link" in reasons["imagefolder:outside/"]
    ledger = Ledger(tmp_path / "h")
    ingested = ledger.query("SELECT detail FROM events WHERE kind = 'ingested'").to_pylist()
    assert len(ingested) == 201  # 200 good images and the 16-bit one
    sources = {json.loads(r["detail"])["source"] for r in ingested}
    assert not any("elsewhere" in s or "secret" in s or s.startswith("imagefolder:outside") for s in sources)
    assert verify_ledger(ledger).ok


def write_csv(path, header: list[str], rows: list[list]):
    """Write CSV bytes the way a user's tool would: cells are str or raw bytes, None is an empty field."""
    def cell(v):
        return b"" if v is None else (v if isinstance(v, bytes) else str(v).encode())
    path.write_bytes(b"\n".join([",".join(header).encode()] + [b",".join(cell(v) for v in r) for r in rows]) + b"\n")


def bad_graph(root):
    """A small user-movie graph (8 users x 6 movies, CSV) with one row of every bad kind; return the bad rows."""
    root.mkdir()
    users, movies = [f"u{i}" for i in range(8)], [f"m{j}" for j in range(6)]
    nodes = [[u, "user", None] for u in users] + [[m, "movie", f"Movie {m}"] for m in movies]
    nodes[8 + 2][2] = "Léon".encode("latin-1")                        # nodes row 10: title is not UTF-8 (kept)
    write_csv(root / "nodes.csv", ["node_id", "type", "title"], nodes)
    rng = np.random.default_rng(0)
    edges = [[u, m, float(rng.integers(1, 11)) / 2, 1000 + 10 * i + j] for i, u in enumerate(users)
             for j, m in enumerate(movies)][:-1]                      # rows 0..46: all pairs but (u7, m5)
    n = len(edges)
    edges += [["u0", "m0", 9.0, 5000],                                  # n: rating out of range
              ["u1", "m0", 3.0, "x"],                                  # n+1: timestamp not a number
              ["u2", "m99", 3.0, 5001],                                # n+2: unknown movie
              ["u3", "m1", 1.0 if edges[19][2] != 1.0 else 2.0, 9999],  # n+3: u3 rates m1 again: row 19 superseded
              [b"\xffu4", "m1", 3.0, 5002],                            # n+4: user_id not UTF-8
              ["u7", "m5", 4.0, "2e3"]]                                # n+5: a timestamp in exponent form: kept
    write_csv(root / "edges.csv", ["user_id", "movie_id", "rating", "timestamp"], edges)
    with open(root / "edges.csv", "ab") as f:
        f.write(b"u6,m3\n")                                            # n+6: too few fields
    e = "g/edges.csv#row="
    return {"g/nodes.csv#row=10": "not UTF-8", f"{e}{n}": "outside 0.5..5.0", f"{e}{n + 1}": "is not a number",
            f"{e}{n + 2}": "'m99' is not a node", f"{e}19": "only the latest rating",
            f"{e}{n + 4}": "user_id is not UTF-8", f"{e}{n + 6}": "malformed CSV row"}


def test_graph_chain_completes_with_one_rejection_per_bad_row(tmp_path, one_torch_thread):
    """§4: bad rows in a user's nodes/edges get one `rejected` event each and the graph chain runs to influence_scores."""
    bad = bad_graph(tmp_path / "g")
    cfg = {"multimodal_graph__raw_samples": RawSamplesConfig(source=str(tmp_path / "g")),
           "multimodal_graph__training_checkpoints": TrainingConfig(epochs=1)}
    result = materialize(GRAPH, resources={"fgtrac": FgtracResource(home=str(tmp_path / "h"))},
                         run_config=RunConfig(ops=cfg), raise_on_error=False)
    assert result.success, failure_message(result)
    assert materialized(result) == set(CHAIN_NAMES) and failed_checks(result) == []
    reasons = by_source(tmp_path / "h")
    assert set(reasons) == set(bad), reasons
    for source, needle in bad.items():
        assert needle in reasons[source], (source, reasons[source])
    ledger = Ledger(tmp_path / "h")
    assert ledger.query("SELECT count(*) AS n FROM events WHERE kind = 'ingested'").to_pylist()[0]["n"] == 48
    assert verify_ledger(ledger).ok


class _DropsOne(DigitsPipeline):
    """A digits pipeline whose preprocessing loses one ingested sample (the bug the lineage check must see)."""

    def preprocess(self, raw: pa.Table):
        return super().preprocess(raw.slice(1))


def test_lineage_check_ignores_rejected_items_but_catches_a_lost_good_sample(tmp_path):
    """Rejected items need no `preprocessed` event; an ingested sample without one still fails the check."""
    good_images(tmp_path / "imgs", per_class=3, classes=range(2))
    (tmp_path / "imgs" / "0" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "imgs" / "1" / "big.png").write_bytes(png(np.zeros((9, 9))))  # rejected with its sample id
    for pipeline, passes in ((DigitsPipeline(), True), (_DropsOne(), False)):
        home = tmp_path / f"home-{passes}"
        ledger = Ledger(home)
        raw = stages.ingest(ledger, pipeline, "run", IngestSettings(source=str(tmp_path / "imgs")))
        assert len(by_source(home)) == 2
        prep = stages.preprocess(ledger, pipeline, "run", raw.handle)
        outcome = {c.name: c for c in prep.checks}["lineage_complete"]
        assert outcome.passed is passes, outcome.description
        if not passes:
            assert outcome.description.startswith("1 samples without exactly one `preprocessed`")
        again = {c.name: c for c in run_checks(ledger, stage("preprocessed_samples").checks, "run", None, prep.checkpoint)}
        assert again["lineage_complete"].passed is passes


# -------------------------------------------------------------------------- §5: bad input that crashed or corrupted


def test_decompression_bomb_is_rejected_by_name_without_decoding(tmp_path):
    good_images(tmp_path / "imgs", per_class=3, classes=range(2))
    (tmp_path / "imgs" / "1" / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    (tmp_path / "imgs" / "1" / "big.png").write_bytes(png_declaring(5_000, 5_000))  # below PIL's limit, still huge
    r, home = ingest(tmp_path, tmp_path / "imgs")
    assert r.metadata["samples"] == 6
    reasons = by_source(home)
    assert set(reasons) == {"imagefolder:1/bomb.png", "imagefolder:1/big.png"}
    assert all("decompression bomb" in why and "not decoded" in why for why in reasons.values()), reasons
    assert "declares 5000x5000 pixels" in reasons["imagefolder:1/big.png"]


def test_names_that_are_not_utf8_are_rejected_with_escaped_bytes(tmp_path):
    root = tmp_path / "imgs"
    good_images(root, per_class=3, classes=range(2))
    write_bytes_named(root / "1", b"\xff\xfe.png", png(np.ones((8, 8))))
    (root / "1" / "two\nlines.png").write_bytes(png(np.ones((8, 8)) * 3))  # valid UTF-8, but not one line
    os.mkdir(os.path.join(os.fsencode(str(root)), b"c\xe9"))  # a class folder whose name is not UTF-8
    write_bytes_named(os.fsdecode(os.path.join(os.fsencode(str(root)), b"c\xe9")), b"a.png", png(np.ones((8, 8)) * 2))
    write_bytes_named(root, b"t\xff.csv", b"label,p0\n1,2\n")  # a table at the top with such a name
    r, home = ingest(tmp_path, root)
    assert r.metadata["samples"] == 6
    reasons = by_source(home)
    assert set(reasons) == {"imagefolder:1/\\xff\\xfe.png", "imagefolder:c\\xe9/", "csv:t\\xff.csv",
                            "imagefolder:1/two\\nlines.png"}, reasons
    assert "name has control characters" in reasons.pop("imagefolder:1/two\\nlines.png")
    assert all("name is not UTF-8" in why for why in reasons.values())
    assert all(m.isprintable() for m in r.metadata["rejections"])
    assert verify_ledger(Ledger(home)).ok


HOW_TO_NAME = "name each class folder by its integer label 0..9 in ASCII digits"


@pytest.mark.parametrize("folders,bad,needle", [
    (["0", "1", "-1"], ["-1"], "(a negative number; 2 files not read)"),  # today: every label shifts by one
    (["0", "1", "²"], ["²"], "not a whole number in ASCII digits"),      # today: int('²') crashes
    (["0", "1", "abc"], ["abc"], HOW_TO_NAME),  # the other folders are labels: a name among them is not one
    (["3", "7"], [], ""),                       # integer folders keep their own labels, not their position
    (["cat", "dog"], ["cat", "dog"], HOW_TO_NAME),  # class names are not mapped to numbers
    (["0", "12"], ["12"], "label 12 is out of range 0..9 (2 files not read)"),  # one rejection for the folder
], ids=["minus-one", "superscript-two", "name-among-labels", "integers", "class-names", "out-of-range"])
def test_class_folder_names_never_shift_labels(tmp_path, folders, bad, needle):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for name in folders:
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.png").write_bytes(png(rng.integers(0, 256, (8, 8))))
    if len(bad) == len(folders):
        with pytest.raises(stages.NothingToTrain, match="every item was rejected"):
            ingest(tmp_path, root)
        home = tmp_path / "home"
    else:
        r, home = ingest(tmp_path, root)
        labels = {s.split(":")[1].split("/")[0]: row["label"] for s, row in raw_rows(home, r).items()}
        assert labels == {n: int(n) for n in folders if n not in bad}
    reasons = by_source(home)
    assert set(reasons) == {f"imagefolder:{n}/" for n in bad}, reasons
    for n in bad:
        why = reasons[f"imagefolder:{n}/"]
        assert why.startswith(f"class folder {n!r}") and needle in why, why


def test_expected_size_comes_from_the_pipeline_not_the_first_image(tmp_path):
    good_images(tmp_path / "imgs", per_class=3, classes=range(2))
    (tmp_path / "imgs" / "0" / "000.png").write_bytes(png(np.full((1, 1), 5)))  # sorts first
    r, home = ingest(tmp_path, tmp_path / "imgs")
    assert r.metadata["samples"] == 6
    reasons = by_source(home)
    assert list(reasons) == ["imagefolder:0/000.png"] and "wrong size 1x1, expected 8x8" in reasons["imagefolder:0/000.png"]


def test_other_image_sizes_are_taken_when_the_config_says_so(tmp_path):
    root = tmp_path / "imgs"
    for label in range(2):
        (root / str(label)).mkdir(parents=True)
        for i in range(3):
            (root / str(label) / f"{i}.png").write_bytes(png(np.full((28, 28), 40 * i + label)))
    (root / "0" / "small.png").write_bytes(png(np.full((8, 8), 7)))
    r, home = ingest(tmp_path, root, image_size="28x28")
    assert r.metadata["samples"] == 6
    assert list(by_source(home)) == ["imagefolder:0/small.png"]
    with pytest.raises(ValueError, match="expected HEIGHTxWIDTH"):
        ingest(tmp_path, root, image_size="big")


def test_16_bit_and_transparent_images_are_never_corrupted_silently(tmp_path):
    root = tmp_path / "imgs"
    good_images(root, per_class=2, classes=range(1))
    (root / "0" / "deep.png").write_bytes(encoded(Image.fromarray(gradient16())))
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    opaque = np.dstack([rgb, np.full((8, 8), 255, np.uint8)])
    (root / "0" / "opaque.png").write_bytes(encoded(Image.fromarray(opaque, "RGBA")))
    see_through = opaque.copy()
    see_through[0, 0, 3] = 0
    (root / "0" / "see-through.png").write_bytes(encoded(Image.fromarray(see_through, "RGBA")))
    grey_alpha = np.dstack([rgb[..., 0], np.full((8, 8), 100, np.uint8)])
    (root / "0" / "grey-alpha.png").write_bytes(encoded(Image.fromarray(grey_alpha, "LA")))
    r, home = ingest(tmp_path, root)
    rows = raw_rows(home, r)
    deep = np.frombuffer(rows["imagefolder:0/deep.png"]["pixels"], np.uint8)
    assert len(np.unique(deep)) == 64 and deep.min() == 0 and deep.max() == 255
    assert np.array_equal(deep.reshape(8, 8), (gradient16() >> 8).astype(np.uint8))
    opaque_px = np.frombuffer(rows["imagefolder:0/opaque.png"]["pixels"], np.uint8).reshape(8, 8)
    assert np.array_equal(opaque_px, np.asarray(Image.fromarray(rgb).convert("L")))  # opaque RGBA = its RGB
    reasons = by_source(home)
    assert set(reasons) == {"imagefolder:0/see-through.png", "imagefolder:0/grey-alpha.png"}
    assert all("transparent" in why for why in reasons.values())


def test_linked_class_folders_are_refused_and_never_read(tmp_path):
    root, outside = tmp_path / "imgs", tmp_path / "elsewhere"
    good_images(root, per_class=3, classes=range(2))
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(np.full((8, 8), 9)))
    (root / "5").symlink_to(outside, target_is_directory=True)         # a class folder that is a link
    (root / "1" / "sub").symlink_to(outside, target_is_directory=True)  # a link to a folder inside a class folder
    r, home = ingest(tmp_path, root)
    assert r.metadata["samples"] == 6
    reasons = by_source(home)
    assert set(reasons) == {"imagefolder:5/", "imagefolder:1/sub"}, reasons
    assert all("symbolic link" in why and "not followed" in why for why in reasons.values())
    assert not any("secret" in s for s in raw_rows(home, r))


def test_inbox_with_undecodable_names_and_links(tmp_path):
    """The inbox sensor's scan and the inbox ingestion take the same names without crashing."""
    home = tmp_path / "home"
    inbox = home / "inbox" / "digits_cnn"
    good_images(inbox, per_class=3, classes=range(2))
    write_bytes_named(inbox / "0", b"\xff.png", png(np.ones((8, 8))))
    (tmp_path / "elsewhere").mkdir()
    (inbox / "4").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    files = scan_inbox(inbox)
    assert len(files) == 7 and all(k.encode("utf-8") for k in files)
    assert json.loads(json.dumps(files, ensure_ascii=False)) == files
    r = stages.ingest(Ledger(home), DigitsPipeline(), "run", IngestSettings(source="", limit=20, inbox=True))
    assert r.metadata["samples"] == 26
    assert set(by_source(home)) == {"imagefolder:0/\\xff.png", "imagefolder:4/"}


def test_graph_reader_does_not_crash_on_odd_numbers_or_names(tmp_path):
    """A text timestamp column with '2e3' in it, and a graph folder whose name is not UTF-8."""
    root_b = os.path.join(os.fsencode(str(tmp_path)), b"g\xff")
    os.mkdir(root_b)
    root = tmp_path / os.fsdecode(b"g\xff")
    write_csv(root / "nodes.csv", ["node_id", "type"], [["u1", "user"], ["m1", "movie"], ["m2", "movie"], ["m3", "movie"]])
    write_csv(root / "edges.csv", ["user_id", "movie_id", "rating", "timestamp"],
              [["u1", "m1", 4.0, "2e3"], ["u1", "m2", 3.0, "x"], ["u1", "m3", 3.0, "1e20"]])
    r = stages.ingest(Ledger(tmp_path / "home"), MovieLensPipeline(), "run", IngestSettings(source=str(root)))
    assert r.metadata["samples"] == 1
    table = r.handle.artifacts["raw"].read_parquet(Ledger(tmp_path / "home").home.root)
    assert table.column("timestamp").to_pylist() == [2000]
    assert table.column("source").to_pylist() == ["g\\xff/edges.csv#row=0"]
    assert by_source(tmp_path / "home") == {"g\\xff/edges.csv#row=1": "timestamp 'x' is not a number",
                                            "g\\xff/edges.csv#row=2": "timestamp '1e20' is out of range"}
