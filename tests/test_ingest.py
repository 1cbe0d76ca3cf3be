"""Ingesting a user's ImageFolder or Parquet: bad items are rejected with a reason, good ones kept."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

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
    r = stages.ingest(ledger, DigitsPipeline(), "run", source=str(tmp_path / "imgs"))
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
    r = stages.ingest(ledger, DigitsPipeline(), "run", source=str(path))
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
        stages.ingest(ledger, DigitsPipeline(), "run", source=str(tmp_path / "imgs"))
    except stages.NothingToTrain as exc:
        assert "every item was rejected" in str(exc)
    else:
        raise AssertionError("a source with no good sample must fail")
    assert ledger.query("SELECT count(*) AS n FROM events WHERE kind='rejected'").to_pylist()[0]["n"] == 1
