"""Shared fixtures: a real FGTRAC_HOME with the digits chain materialised once per session."""

import shutil
from pathlib import Path

import pytest

SMALL_LIMIT = 400
SMALL_EPOCHS = 3


def small_run_config(limit: int = SMALL_LIMIT, epochs: int = SMALL_EPOCHS, pipeline: str = "digits_cnn"):
    """Return a RunConfig that materialises a pipeline quickly on a subset."""
    from dagster import RunConfig

    from fgtrac_assets.assets.configs import RawSamplesConfig, TrainingConfig

    return RunConfig(ops={f"{pipeline}__raw_samples": RawSamplesConfig(limit=limit),
                          f"{pipeline}__training_checkpoints": TrainingConfig(epochs=epochs)})


def materialize_digits(home: Path, **kwargs):
    """Materialise the whole digits chain (not its studies) into home with Dagster's materialize(); return the result."""
    from dagster import materialize

    from fgtrac_assets.pipelines.chain import CHAIN_NAMES
    from fgtrac_assets.assets.resources import FgtracResource
    from fgtrac_assets.definitions import all_assets

    assets = [a for a in all_assets if a.key.path[0] == "digits_cnn" and a.key.path[-1] in CHAIN_NAMES]
    return materialize(assets, resources={"fgtrac": FgtracResource(home=str(home))},
                       run_config=small_run_config(**kwargs))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models: one intra-op thread is faster on a shared 2-core machine (restored afterwards)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test ever writes to the repository's ./data."""
    monkeypatch.setenv("FGTRAC_HOME", str(tmp_path / "default-home"))
    monkeypatch.setenv("FGTRAC_TRUST_STORE", str(tmp_path / "known_logs"))  # never the user's ~/.config
    monkeypatch.delenv("FGTRAC_POLICY", raising=False)


@pytest.fixture(scope="session")
def digits_home(tmp_path_factory) -> Path:
    """A home holding one materialised digits chain (read it, or copy it before changing it)."""
    home = tmp_path_factory.mktemp("digits-home")
    result = materialize_digits(home)
    assert result.success
    return home


@pytest.fixture
def digits_copy(digits_home, tmp_path) -> Path:
    """A private copy of the materialised home, safe to tamper with."""
    dest = tmp_path / "home"
    shutil.copytree(digits_home, dest)
    return dest


def chain_selection(pipeline: str) -> str:
    """Return the `dagster asset materialize --select` of a pipeline's six chain assets (not its studies or shards)."""
    from fgtrac_assets.pipelines.chain import CHAIN_NAMES

    return ",".join(f"{pipeline}/{name}" for name in CHAIN_NAMES)
