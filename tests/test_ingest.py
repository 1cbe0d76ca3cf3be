"""Ingesting a user's ImageFolder, Parquet or CSV: bad items are rejected with a reason, good ones kept."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fgtrac_assets.pipelines.base import IngestSettings
from fgtrac_assets.ledger.store import Ledger
from fgtrac_assets.pipelines import stages
from fgtrac_assets.pipelines.digits import DigitsPipeline


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root):
    rng = np.random.default_rng(0)
    for label in range(3):
        d = root / str(label)
        d.mkdir(parents=True)
        for i in range(4):
            (d / f"img{i}.png").write_bytes(png(rng.integers(0, 255, (8, 8))))
    (root / "0" / "broken.png").write_bytes(png(np.zeros((8, 8)))[:20])
    (root / "1" / "notes.txt").write_text("not an image")
    (root / "2" / "big.png").write_bytes(png(np.zeros((16, 16))))
    (root / "3").mkdir()


def test_image_folder_rejections_are_recorded_with_reasons(tmp_path):
    make_folder(tmp_path / "imgs")
    ledger = Ledger(tmp_path / "home")
    r = stages.ingest(ledger, DigitsPipeline(), "run", IngestSettings(source=str(tmp_path / "imgs")))
    assert r.metadata["samples"] == 12
    rejected = ledger.query("SELECT detail FROM events WHERE kind = 'rejected'").to_pylist()
    reasons = " | ".join(x["detail"] for x in rejected)
    assert len(rejected) == 4, reasons
    assert "broken.png" in reasons and "corrupt or truncated" in reasons
    assert "notes.txt" in reasons and "not an image file" in reasons
    assert "big.png" in reasons and "wrong size 16x16" in reasons
    assert "empty class folder" in reasons


def test_parquet_source_and_duplicates(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (8, 8)) for _ in range(6)]
    rows = [{"image": png(a), "label": i % 3} for i, a in enumerate(imgs)]
    rows.append({"image": png(imgs[0]), "label": 0})   # same content, same label: one sample, two sources
    rows.append({"image": png(imgs[1]), "label": 2})   # same content, conflicting label: both rejected
    rows.append({"image": b"garbage", "label": 1})
    path = tmp_path / "digits.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ledger = Ledger(tmp_path / "home")
    r = stages.ingest(ledger, DigitsPipeline(), "run", IngestSettings(source=str(path)))
    assert r.metadata["unique_samples"] == 5  # images 0, 2, 3, 4, 5
    assert r.metadata["samples"] == 6          # image 0 from two sources
    reasons = [x["detail"] for x in ledger.query("SELECT detail FROM events WHERE kind='rejected'").to_pylist()]
    assert sum("conflicting labels" in x for x in reasons) == 2
    assert any("row=8" in x and "not a decodable image" in x for x in reasons)


def test_all_rejected_fails_clearly_and_records_why(tmp_path):
    (tmp_path / "imgs" / "0").mkdir(parents=True)
    (tmp_path / "imgs" / "0" / "a.txt").write_text("x")
    ledger = Ledger(tmp_path / "home")
    try:
        stages.ingest(ledger, DigitsPipeline(), "run", IngestSettings(source=str(tmp_path / "imgs")))
    except stages.NothingToTrain as exc:
        assert "every item was rejected" in str(exc)
    else:
        raise AssertionError("a source with no good sample must fail")
    assert ledger.query("SELECT count(*) AS n FROM events WHERE kind='rejected'").to_pylist()[0]["n"] == 1


# ------------------------------------------------------------ tables: Parquet and CSV, one validator

FORMATS = ["parquet", "csv"]


def pixel_rows(n: int, seed: int = 0) -> list[dict]:
    """n distinct labelled 8x8 images as `label` + pixel columns p0..p63."""
    rng = np.random.default_rng(seed)
    return [{"label": i % 10, **{f"p{k}": int(v) for k, v in enumerate(rng.integers(0, 256, 64))}} for i in range(n)]


def _cell(v) -> str:
    return "" if v is None else str(v)


def write_table(path, rows: list[dict], fmt: str):
    """Write the same logical table as Parquet (mixed-type columns become text) or as CSV text; return the path."""
    path = path.with_suffix(f".{fmt}")
    cols = list(rows[0])
    if fmt == "csv":
        lines = [",".join(cols)] + [",".join(_cell(r.get(c)) for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path
    arrays = {}
    for c in cols:
        values = [r.get(c) for r in rows]
        try:
            arrays[c] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[c] = pa.array([None if v is None else str(v) for v in values], pa.string())
    pq.write_table(pa.table(arrays), path)
    return path


def rejections(home) -> list[dict]:
    import json

    return [json.loads(r["detail"]) for r in
            Ledger(home).query("SELECT detail FROM events WHERE kind = 'rejected' ORDER BY leaf_index").to_pylist()]


BAD_ROWS = [  # (what is changed in a good row, the reason that must be given)
    ({"p63": float("nan")}, "finite values in 0..255 (p63 is nan)"),
    ({"p0": float("inf")}, "(p0 is inf)"),
    ({"p5": 300}, "(p5 is 300)"),
    ({"p10": None}, "(p10 is missing)"),
    ({"p3": "abc"}, "(p3 'abc' is not a number)"),
    ({"label": 42}, "label 42 is out of range 0..9"),
    ({"label": None}, "label None is not an integer"),
    ({"label": 2.5}, "label 2.5 is not an integer"),
    ({"label": "cat"}, "label 'cat' is not an integer"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("change,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_table_row_is_rejected_with_file_row_and_reason(tmp_path, fmt, change, reason):
    rows = pixel_rows(6)
    rows[5].update(change)
    path = write_table(tmp_path / "t", rows, fmt)
    r = stages.ingest(Ledger(tmp_path / "h"), DigitsPipeline(), "run", IngestSettings(source=str(path)))
    assert r.metadata["samples"] == 5
    got = rejections(tmp_path / "h")
    assert [x["source"] for x in got] == [f"{fmt}:t.{fmt}#row=5"]
    assert reason in got[0]["reason"], got
    assert r.metadata["rejections"] == [f"{fmt}:t.{fmt}#row=5: rejected: {got[0]['reason']}"]  # the one line shown


@pytest.mark.parametrize("fmt", FORMATS)
def test_table_missing_columns_and_empty_file_reject_the_file(tmp_path, fmt):
    cases = {"cols": ([{"label": 1, "foo": 2}], "missing columns: need 'label'"),
             "gap": ([{"label": 1, "p0": 1, "p2": 3}], "no 'p1'"),
             "oblong": ([{"label": 1, "p0": 1, "p1": 2, "p2": 3}], "not a square image")}
    for stem, (rows, reason) in cases.items():
        path = write_table(tmp_path / stem, rows, fmt)
        home = tmp_path / f"h-{stem}"
        with pytest.raises(stages.NothingToTrain, match="every item was rejected"):
            stages.ingest(Ledger(home), DigitsPipeline(), "run", IngestSettings(source=str(path)))
        got = rejections(home)
        assert len(got) == 1 and got[0]["source"] == f"{fmt}:{path.name}" and reason in got[0]["reason"], got
    empty = tmp_path / f"empty.{fmt}"
    if fmt == "csv":
        empty.write_text("label," + ",".join(f"p{k}" for k in range(64)) + "\n")
    else:
        pq.write_table(pa.table({"label": pa.array([], pa.int64()), **{f"p{k}": pa.array([], pa.int64()) for k in range(64)}}),
                       empty)
    with pytest.raises(stages.NothingToTrain):
        stages.ingest(Ledger(tmp_path / "h-empty"), DigitsPipeline(), "run", IngestSettings(source=str(empty)))
    assert [x["reason"] for x in rejections(tmp_path / "h-empty")] == ["empty file (no rows)"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_table_duplicates_same_rule_as_images(tmp_path, fmt):
    rows = pixel_rows(6, seed=3)
    rows.append(dict(rows[0]))                    # same content, same label: one sample, two sources
    rows.append({**rows[1], "label": 7})          # same content as row 1, another label: both rejected
    path = write_table(tmp_path / "dups", rows, fmt)
    r = stages.ingest(Ledger(tmp_path / "h"), DigitsPipeline(), "run", IngestSettings(source=str(path)))
    assert r.metadata["unique_samples"] == 5 and r.metadata["samples"] == 6
    got = {x["source"]: x["reason"] for x in rejections(tmp_path / "h")}
    assert set(got) == {f"{fmt}:dups.{fmt}#row=1", f"{fmt}:dups.{fmt}#row=7"}
    assert all("conflicting labels [1, 7]" in reason for reason in got.values())


def test_csv_and_parquet_of_the_same_images_give_the_same_samples(tmp_path):
    rows = pixel_rows(8, seed=5)
    ids = {}
    for fmt in FORMATS:
        got = DigitsPipeline().ingest(str(write_table(tmp_path / "same", rows, fmt)), 0)
        assert not got.rejected
        ids[fmt] = got.table.column("sample_id").to_pylist()
    assert ids["csv"] == ids["parquet"] and len(set(ids["csv"])) == 8
    # and the Parquet `pixels` list layout holds the same content too
    listed = [{"label": r["label"], "pixels": [float(r[f"p{k}"]) for k in range(64)], "height": 8, "width": 8} for r in rows]
    pq.write_table(pa.Table.from_pylist(listed), tmp_path / "listed.parquet")
    assert DigitsPipeline().ingest(str(tmp_path / "listed.parquet"), 0).table.column("sample_id").to_pylist() == ids["csv"]


def test_csv_that_is_not_utf8_or_malformed(tmp_path):
    header = "label," + ",".join(f"p{k}" for k in range(64))
    good = [",".join(str(v) for v in r.values()) for r in pixel_rows(5, seed=7)]
    body = "\n".join([header, *good[:4]]).encode()
    bad = {
        "latin1.csv": body + b"\n1," + b",".join(b"9" for _ in range(63)) + b",\xe9\n",  # row 4: a Latin-1 byte
        "short.csv": body + b"\n1,2,3\n" + good[4].encode() + b"\n",  # row 4: 3 fields, then a good row 5
        "long.csv": body + b"\n" + good[4].encode() + b",5\n",  # row 4: one field too many
    }
    expected = {"latin1.csv": "p63 is not UTF-8 text (byte 0xe9",
                "short.csv": "malformed CSV row: 3 fields, the header has 65",
                "long.csv": "malformed CSV row: 66 fields, the header has 65"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        r = stages.ingest(Ledger(tmp_path / f"h-{name}"), DigitsPipeline(), "run", IngestSettings(source=str(tmp_path / name)))
        assert r.metadata["samples"] == (5 if name == "short.csv" else 4), name  # the good rows are kept
        got = rejections(tmp_path / f"h-{name}")
        assert len(got) == 1 and got[0]["source"] == f"csv:{name}#row=4" and expected[name] in got[0]["reason"], got
    # the row after a skipped malformed row keeps its own number
    assert DigitsPipeline().ingest(str(tmp_path / "short.csv"), 0).table.column("source").to_pylist()[-1] == "csv:short.csv#row=5"
    # a file that cannot be read at all: one rejection naming the file and why
    for name, data, reason in (("empty.csv", b"", "empty file (no header, no rows)"),
                               ("header.csv", b"label,\xff\n1,2\n", "malformed CSV header: a column name is not UTF-8"),
                               ("twice.csv", b"label,label\n1,2\n", "duplicate column names ['label']")):
        (tmp_path / name).write_bytes(data)
        got = DigitsPipeline().ingest(str(tmp_path / name), 0)
        assert got.table.num_rows == 0 and len(got.rejected) == 1, got.rejected
        assert got.rejected[0].source == f"csv:{name}" and reason in got.rejected[0].reason, got.rejected


def test_folder_with_csv_and_parquet_tables(tmp_path):
    root = tmp_path / "inbox"
    root.mkdir()
    write_table(root / "a", pixel_rows(4, seed=11), "csv")
    write_table(root / "b", pixel_rows(3, seed=12), "parquet")
    (root / "notes.txt").write_text("ignored: not a table")
    got = DigitsPipeline().ingest(str(root), 0)
    sources = got.table.column("source").to_pylist()
    assert sorted(s.split("#")[0] for s in sources) == ["csv:a.csv"] * 4 + ["parquet:b.parquet"] * 3
    assert not got.rejected
