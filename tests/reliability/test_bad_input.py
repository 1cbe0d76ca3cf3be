"""Bad input and bad configuration: a clear one-line message, a recorded `rejected` event, nothing lost."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import materialize
from PIL import Image

from fgtrac_assets.pipelines.base import IngestSettings
from fgtrac_assets.assets.configs import RawSamplesConfig, TrainingConfig
from fgtrac_assets.assets.resources import FgtracResource
from fgtrac_assets.pipelines.chain import CHAIN_NAMES
from fgtrac_assets.definitions import all_assets
from fgtrac_assets.ledger.store import Ledger, LedgerDamaged
from fgtrac_assets.ledger.verify import verify_ledger
from fgtrac_assets.pipelines import stages
from fgtrac_assets.pipelines.digits import DigitsPipeline

DIGITS = [a for a in all_assets if a.key.path[0] == "digits_cnn" and a.key.path[-1] in CHAIN_NAMES]


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rejected_reasons(home) -> list[str]:
    return [r["detail"] for r in Ledger(home).query("SELECT detail FROM events WHERE kind='rejected'").to_pylist()]


def run_chain(home, **ops):
    from dagster import RunConfig

    cfg = {"digits_cnn__raw_samples": RawSamplesConfig(**ops.pop("raw", {"limit": 200})),
           "digits_cnn__training_checkpoints": TrainingConfig(**ops.pop("train", {"epochs": 1}))}
    return materialize(DIGITS, resources={"fgtrac": FgtracResource(home=str(home))},
                       run_config=RunConfig(ops=cfg), raise_on_error=False)


def failure_message(result) -> str:
    return " ".join(str(e.event_specific_data.error.message) for e in result.all_events
                    if e.event_type_value == "STEP_FAILURE")


@pytest.mark.parametrize("rows,reason", [
    ([{"pixels": [0.0] * 63 + [float("nan")], "height": 8, "width": 8, "label": 1}], "finite values"),
    ([{"pixels": [1.0] * 64, "height": 8, "width": 8, "label": 42}], "label 42 is out of range"),
    ([{"pixels": [1.0] * 64, "height": 8, "width": 8, "label": None}], "is not an integer"),
    ([{"pixels": [1.0] * 64, "height": 8, "width": 8, "label": 2.5}], "is not an integer"),
    ([{"pixels": [1.0] * 60, "height": 8, "width": 8, "label": 1}], "must be 8x8"),
])
def test_bad_table_rows_are_rejected_with_row_and_reason(tmp_path, rows, reason):
    good = [{"pixels": list(map(float, np.random.default_rng(i).integers(0, 255, 64))), "height": 8, "width": 8,
             "label": i % 10} for i in range(5)]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(good + rows), path)
    r = stages.ingest(Ledger(tmp_path / "h"), DigitsPipeline(), "run", IngestSettings(source=str(path)))
    assert r.metadata["samples"] == 5
    reasons = rejected_reasons(tmp_path / "h")
    assert len(reasons) == 1 and "row=5" in reasons[0] and reason in reasons[0], reasons


def test_missing_columns_and_empty_file(tmp_path):
    pq.write_table(pa.table({"foo": [1]}), tmp_path / "cols.parquet")
    pq.write_table(pa.table({"label": pa.array([], pa.int64()), "image": pa.array([], pa.binary())}),
                   tmp_path / "empty.parquet")
    for name, reason in (("cols.parquet", "missing columns"), ("empty.parquet", "empty file")):
        with pytest.raises(stages.NothingToTrain, match="every item was rejected"):
            stages.ingest(Ledger(tmp_path / f"home-{name}"), DigitsPipeline(), "run", IngestSettings(source=str(tmp_path / name)))
        assert any(reason in r and name in r for r in rejected_reasons(tmp_path / f"home-{name}"))


def test_unreadable_and_linked_files(tmp_path):
    root = tmp_path / "imgs" / "1"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"{i}.png").write_bytes(png(np.random.default_rng(i).integers(0, 255, (8, 8))))
    (tmp_path / "secret.png").write_bytes(png(np.zeros((8, 8))))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "dir.png").mkdir()  # a folder named like an image: not a file
    r = stages.ingest(Ledger(tmp_path / "h"), DigitsPipeline(), "run", IngestSettings(source=str(tmp_path / "imgs")))
    assert r.metadata["samples"] == 3
    assert any("symbolic link" in x for x in rejected_reasons(tmp_path / "h"))


def test_rgb_images_are_converted_and_wrong_channel_counts_rejected(tmp_path):
    root = tmp_path / "imgs" / "0"
    root.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3)).astype(np.uint8)
    (root / "rgb.png").write_bytes(png(rgb))
    (root / "gray.png").write_bytes(png(rgb[..., 0]))
    r = stages.ingest(Ledger(tmp_path / "h"), DigitsPipeline(), "run", IngestSettings(source=str(tmp_path / "imgs")))
    assert r.metadata["samples"] == 2  # colour is converted to one channel, as documented


def test_missing_source_path_fails_with_one_line(tmp_path):
    result = run_chain(tmp_path / "h", raw={"source": str(tmp_path / "nope")})
    assert not result.success
    msg = failure_message(result)
    assert "no such file or directory" in msg and "nope" in msg and "Traceback" not in msg


@pytest.mark.parametrize("train,needle", [({"lr": -1.0}, "lr=-1.0 is out of range"),
                                          ({"batch_size": 0}, "batch_size=0 is out of range"),
                                          ({"epochs": 0}, "epochs=0 is out of range"),
                                          ({"schedule": "weird"}, "schedule='weird'")])
def test_training_settings_out_of_range(tmp_path, train, needle):
    result = run_chain(tmp_path / "h", train=train)
    assert not result.success and needle in failure_message(result)
    # what the upstream assets committed before the failure is kept and verifies
    assert verify_ledger(Ledger(tmp_path / "h")).ok


def test_home_that_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LedgerDamaged, match="not a usable directory"):
        stages.ingest(Ledger(tmp_path / "file" / "home"), DigitsPipeline(), "run", IngestSettings(limit=10))


def test_all_rejected_run_does_not_train(tmp_path):
    (tmp_path / "imgs" / "0").mkdir(parents=True)
    (tmp_path / "imgs" / "0" / "a.png").write_bytes(b"not a png")
    result = run_chain(tmp_path / "h", raw={"source": str(tmp_path / "imgs")})
    assert not result.success and "every item was rejected" in failure_message(result)
    assert Ledger(tmp_path / "h").query("SELECT count(*) AS n FROM checkpoints").to_pylist()[0]["n"] == 0
