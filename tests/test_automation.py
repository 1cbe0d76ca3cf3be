"""The inbox sensor and the daily schedule: new content triggers one retraining, seen content none."""

import io

import numpy as np
from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context
from PIL import Image

from fgtrac_assets.pipelines.base import IngestSettings
from fgtrac_assets.definitions import defs
from fgtrac_assets.ledger.store import Ledger
from fgtrac_assets.pipelines import stages
from fgtrac_assets.pipelines.digits import DigitsPipeline


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8)).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def evaluate(sensor, cursor):
    with DagsterInstance.ephemeral() as instance:
        ctx = build_sensor_context(instance=instance, cursor=cursor)
        result = sensor.evaluate_tick(ctx)
        return result.run_requests, result.skip_message, result.cursor


def test_inbox_sensor_triggers_once_per_new_content(tmp_path, monkeypatch):
    monkeypatch.setenv("FGTRAC_HOME", str(tmp_path))
    sensor = defs.resolve_sensor_def("digits_cnn_inbox")
    inbox = tmp_path / "inbox" / "digits_cnn" / "3"
    inbox.mkdir(parents=True)
    requests, skip, cursor = evaluate(sensor, None)
    assert not requests and "no new content" in skip
    (inbox / "a.png").write_bytes(png(1))
    requests, _, cursor = evaluate(sensor, cursor)
    assert len(requests) == 1 and isinstance(requests[0], RunRequest)
    assert requests[0].run_config["ops"]["digits_cnn__raw_samples"]["config"]["inbox"] is True
    requests, skip, cursor = evaluate(sensor, cursor)
    assert not requests  # nothing new
    (inbox / "a-copy.png").write_bytes(png(1))  # same content, another name
    requests, skip, cursor = evaluate(sensor, cursor)
    assert not requests
    (inbox / "b.png").write_bytes(png(2))
    requests, _, cursor = evaluate(sensor, cursor)
    assert len(requests) == 1
    (tmp_path / "outside.png").write_bytes(png(3))
    (inbox / "link.png").symlink_to(tmp_path / "outside.png")  # links are never followed
    requests, _, cursor = evaluate(sensor, cursor)
    assert not requests


def test_retraining_ingests_the_inbox_and_new_content_only_once(tmp_path):
    ledger, p = Ledger(tmp_path), DigitsPipeline()
    first = stages.ingest(ledger, p, "r1", IngestSettings(limit=50))
    assert first.metadata["new_samples"] == 50
    inbox = tmp_path / "inbox" / "digits_cnn" / "7"
    inbox.mkdir(parents=True)
    (inbox / "x.png").write_bytes(png(5))
    (inbox / "broken.png").write_bytes(png(6)[:30])
    second = stages.ingest(ledger, p, "r2", IngestSettings(limit=50, inbox=True))
    assert second.metadata["samples"] == 51 and second.metadata["new_samples"] == 1
    assert second.metadata["already_ingested"] == 50 and second.metadata["rejected"] == 1
    third = stages.ingest(ledger, p, "r3", IngestSettings(limit=50, inbox=True))
    assert third.metadata["new_samples"] == 0
    n = ledger.query("SELECT count(*) AS n FROM events WHERE kind = 'ingested'").to_pylist()[0]["n"]
    assert n == 51  # every content ingested exactly once across the three runs


def test_ingest_metadata_names_the_source_and_the_inbox(tmp_path):
    """`source` in raw_samples' metadata says where the samples came from, a given source and the inbox alike."""
    ledger, p = Ledger(tmp_path / "home"), DigitsPipeline()
    folder = tmp_path / "mine" / "4"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(png(7))
    inbox = ledger.home.inbox / "digits_cnn" / "2"
    inbox.mkdir(parents=True)
    (inbox / "b.png").write_bytes(png(8))
    mine = str(tmp_path / "mine")
    both = stages.ingest(ledger, p, "r1", IngestSettings(source=mine, inbox=True))
    assert both.metadata["source"] == f"{mine} + inbox" and both.metadata["samples"] == 2
    assert stages.ingest(ledger, p, "r2", IngestSettings(source=mine)).metadata["source"] == mine
    assert stages.ingest(ledger, p, "r3", IngestSettings(limit=5, inbox=True)).metadata["source"] == "(bundled default) + inbox"


def test_daily_schedule_targets_the_pipeline_job():
    schedule = defs.resolve_schedule_def("digits_cnn_daily_retraining")
    assert schedule.cron_schedule == "0 3 * * *" and schedule.job_name == "digits_cnn_job"
