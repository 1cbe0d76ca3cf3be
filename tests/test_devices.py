"""The `device` setting: training, gradients and influence run where it says ('auto': CUDA if available), record
where they ran, refuse a device this machine does not have, and attribution returns scores on the model's device.

This machine may have no GPU: what needs one is benchmarks/gpu_check.py, whose CPU-vs-CPU run is tested here.
"""

import dataclasses
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from fgtrac_assets.errors import InputError
from fgtrac_assets.pipelines.base import GradientSettings, InfluenceSettings, TrainSettings, resolve_device

HERE = resolve_device("auto")  # what 'auto' means on this machine
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA where there is none")
REAL_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_auto_is_cuda_when_available_else_cpu():
    assert HERE == (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    for settings in (TrainSettings(), GradientSettings(), InfluenceSettings()):
        assert settings.device == "auto"


@pytest.mark.parametrize("settings_type", [TrainSettings, GradientSettings, InfluenceSettings])
@pytest.mark.parametrize("device,says", [
    ("nonsense", "is not a torch device"), ("CUDA", "is not a torch device"), ("", "is not a torch device"),
    ("cuda:x", "is not a torch device"), ("meta", "is not a device fgtrac runs on"),
    pytest.param("cuda", "CUDA is not available", marks=NO_CUDA),
    pytest.param("cuda:1", "CUDA is not available", marks=NO_CUDA),
])
def test_a_device_this_machine_cannot_run_is_a_one_line_input_error_naming_the_setting(settings_type, device, says):
    with pytest.raises(InputError) as info:
        settings_type(device=device).validate()
    message = str(info.value)
    assert message.startswith(f"device={device!r}") and says in message and "\n" not in message


# ----------------------------------------------------------------------------- the chain's stages


def _chain(home: Path, device: str | None, limit: int = 120, epochs: int = 2, handles: dict | None = None,
           names: tuple[str, ...] | None = None) -> tuple:
    """Run the digits chain's stages (all, or `names` on top of `handles`) with a device (None: the defaults)."""
    from fgtrac_assets.ledger.store import Ledger
    from fgtrac_assets.pipelines.base import IngestSettings
    from fgtrac_assets.pipelines.chain import CHAIN, default_settings
    from fgtrac_assets.pipelines.digits import DigitsPipeline

    pipeline, ledger = DigitsPipeline(), Ledger(home)
    train = TrainSettings(epochs=epochs, lr=0.1, batch_size=32, seed=0)
    handles, meta = dict(handles or {}), {}
    for stage in CHAIN:
        if names is not None and stage.name not in names:
            continue
        settings = {IngestSettings: IngestSettings(limit=limit), TrainSettings: train}.get(
            stage.settings, default_settings(stage, train))
        if device is not None and hasattr(settings, "device"):
            settings = dataclasses.replace(settings, device=device)
        result = stage.call(ledger, pipeline, f"run-{device}", handles, settings)
        assert all(c.passed for c in result.checks), (stage.name, result.checks)
        handles[stage.name], meta[stage.name] = result.handle, result.metadata
    return pipeline, ledger, handles, meta


@pytest.fixture(scope="module")
def chain_auto(tmp_path_factory, one_torch_thread):
    """The digits chain on a small subset with every `device` setting at its default, 'auto'."""
    return _chain(tmp_path_factory.mktemp("devices") / "home", None)


def _influence(ledger, handle) -> list:
    rows = handle.artifacts["influence"].read_parquet(ledger.home.root).to_pylist()
    return sorted((r["kind"], r["test_sample_id"] or "", r["rank"], r["train_sample_id"], r["score"]) for r in rows)


def test_auto_resolves_once_per_stage_and_is_recorded_in_the_metadata(chain_auto):
    _, _, _, meta = chain_auto
    for asset in ("training_checkpoints", "gradient_cache", "influence_scores"):
        assert meta[asset]["device"] == HERE, asset
    assert meta["training_checkpoints"]["settings"]["device"] == "auto"  # what was asked, beside what was used


def test_device_cpu_trains_and_scores_as_auto_does_here(chain_auto):
    """device='cpu' for training, gradients and influence: the same checkpoints and the same scores (on a CPU
    machine, byte for byte: 'auto' is the CPU there)."""
    _, ledger, handles, meta = chain_auto
    base = {"raw_samples": handles["raw_samples"], "preprocessed_samples": handles["preprocessed_samples"]}
    _, _, cpu, cpu_meta = _chain(ledger.home.root, "cpu", handles=base,
                                 names=("training_checkpoints", "selected_checkpoints", "gradient_cache",
                                        "influence_scores"))
    for asset in ("training_checkpoints", "gradient_cache", "influence_scores"):
        assert cpu_meta[asset]["device"] == "cpu", asset
    if HERE != "cpu":
        return
    assert cpu_meta["training_checkpoints"]["loss_history"] == meta["training_checkpoints"]["loss_history"]
    ckpts = ledger.query("SELECT training_run, epoch, sha256 FROM checkpoints ORDER BY epoch").to_pylist()
    by_run: dict = {}
    for c in ckpts:
        by_run.setdefault(c["training_run"], []).append(c["sha256"])
    assert len(by_run) == 2 and len(set(map(tuple, by_run.values()))) == 1  # the same checkpoint files
    assert _influence(ledger, cpu["influence_scores"]) == _influence(ledger, handles["influence_scores"])


@pytest.mark.parametrize("asset,settings", [
    ("training_checkpoints", TrainSettings(epochs=1, device="nonsense")),
    ("gradient_cache", GradientSettings(device="nonsense")),
    ("influence_scores", InfluenceSettings(device="nonsense")),
    pytest.param("training_checkpoints", TrainSettings(epochs=1, device="cuda"), marks=NO_CUDA),
    pytest.param("gradient_cache", GradientSettings(device="cuda"), marks=NO_CUDA),
    pytest.param("influence_scores", InfluenceSettings(device="cuda"), marks=NO_CUDA),
])
def test_a_stage_refuses_a_bad_device_before_committing_anything(chain_auto, asset, settings):
    from fgtrac_assets.pipelines.chain import stage

    pipeline, ledger, handles, _ = chain_auto
    before = ledger.query("SELECT count(*) AS n FROM materializations").to_pylist()[0]["n"]
    with pytest.raises(InputError, match=f"^device={settings.device!r}"):
        stage(asset).call(ledger, pipeline, "bad-device", handles, settings)
    assert ledger.query("SELECT count(*) AS n FROM materializations").to_pylist()[0]["n"] == before


def test_the_dagster_configs_mirror_the_device_settings():
    from fgtrac_assets.assets.configs import CONFIG_OF, GradientConfig, InfluenceConfig, TrainingConfig

    defaults = TrainSettings(epochs=3)
    assert CONFIG_OF[GradientSettings] is GradientConfig
    assert TrainingConfig().settings(defaults) == defaults  # unset: the pipeline's default, 'auto'
    assert TrainingConfig(device="cpu").settings(defaults) == dataclasses.replace(defaults, device="cpu")
    assert GradientConfig().settings(defaults) == GradientSettings()
    assert GradientConfig(device="cuda:0").settings(defaults) == GradientSettings(device="cuda:0")
    assert InfluenceConfig(top_k=3, device="cpu").settings(defaults) == InfluenceSettings(top_k=3, device="cpu")
    assert InfluenceConfig().settings(defaults) == InfluenceSettings()


def test_a_bad_device_in_the_launchpad_fails_the_training_step_with_one_line(tmp_path):
    from dagster import RunConfig, materialize

    from fgtrac_assets.assets.configs import RawSamplesConfig, TrainingConfig
    from fgtrac_assets.assets.resources import FgtracResource
    from fgtrac_assets.definitions import all_assets

    wanted = {"raw_samples", "preprocessed_samples", "training_checkpoints"}
    assets = [a for a in all_assets if a.key.path[0] == "digits_cnn" and a.key.path[-1] in wanted]
    config = RunConfig(ops={"digits_cnn__raw_samples": RawSamplesConfig(limit=120),
                            "digits_cnn__training_checkpoints": TrainingConfig(epochs=1, device="nonsense")})
    result = materialize(assets, resources={"fgtrac": FgtracResource(home=str(tmp_path / "h"))}, run_config=config,
                         raise_on_error=False)
    failures = [str(e.event_specific_data.error.message) for e in result.all_events
                if e.event_type_value == "STEP_FAILURE"]
    assert not result.success and len(failures) == 1
    assert "device='nonsense' is not a torch device" in failures[0] and "Traceback" not in failures[0]


# ----------------------------------------------------------------------------- training loop


class _Recorder:
    """A recorder that keeps the batches it is given."""

    step = 0

    def __init__(self):
        self.batches = []

    def start_epoch(self, epoch):
        pass

    def record_batch(self, indices, lr):
        self.batches.append(indices)
        self.step += 1


@pytest.mark.parametrize("device", REAL_DEVICES)
def test_training_moves_the_model_records_cpu_indices_and_saves_cpu_checkpoints(device):
    from fgtrac_assets.pipelines.training import train_supervised

    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    model = torch.nn.Linear(4, 3)
    recorder = _Recorder()
    epochs = list(train_supervised(model, torch.nn.CrossEntropyLoss(reduction="none"), (x, y), (x, y),
                                   TrainSettings(epochs=2, batch_size=16, device=device), recorder))
    assert model.weight.device.type == device
    assert recorder.batches and all(b.device.type == "cpu" for b in recorder.batches)
    assert all(v.device.type == "cpu" for e in epochs for v in e.state_dict.values())


# ----------------------------------------------------------------------------- attribution


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 4 * 4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _attributions(model, x, y, xt, yt, ckpts):
    """Yield (name, tensor) of every attribution output on model, given CPU data and CPU checkpoints."""
    from fgtrac_assets.attribution import GradDot, TracInCP
    from fgtrac_assets.attribution.ghost import linear_factors
    from fgtrac_assets.attribution.per_sample import per_sample_grads, selected_parameter_names

    loss = torch.nn.CrossEntropyLoss(reduction="none")
    for layer, path in (("5", "ghost"), (None, "per_sample")):
        tracin = TracInCP(model, ckpts, loss, layer=layer)
        assert tracin.path == path
        yield f"tracincp {path} influence", tracin.influence(x, y, xt, yt)
        yield f"tracincp {path} self", tracin.self_influence(x, y)
        top = tracin.top_k(x, y, xt, yt, k=2, chunk=5)
        yield f"tracincp {path} top_k", top.proponent_score
        yield f"tracincp {path} top_k idx", top.opponent_idx
    yield "tracincp projected", TracInCP(model, ckpts, loss, projection_dim=16).influence(x, y, xt, yt)
    yield "graddot", GradDot(model, loss, layer="5").influence(x, y, xt, yt)
    yield "ghost factors", linear_factors(model, ["5"], x, y, loss)[0].errors
    yield "per-sample grads", per_sample_grads(model, selected_parameter_names(model, None), x, y, loss)


@pytest.mark.parametrize("device", REAL_DEVICES + ["meta"])
def test_attribution_returns_scores_on_the_models_device(device):
    """TracInCP's rule: data (CPU here) is moved to the model's device and the scores stay there.

    'meta' stands in for a device that is not the CPU on a machine without a GPU: it computes no numbers, but
    any score copied back to the CPU (or computed there) would show up as a CPU tensor.
    """
    x, y = torch.randn(12, 1, 4, 4), torch.randint(0, 3, (12,))
    model = _net()
    ckpts = [({k: v.clone() for k, v in model.state_dict().items()}, 0.1), (model.state_dict(), 0.05)]
    model.to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")  # meta: loading is a no-op
        outputs = list(_attributions(model, x, y, x[:3], y[:3], ckpts))
    for name, out in outputs:
        assert out.device.type == device, name


@pytest.mark.parametrize("device", REAL_DEVICES)
@pytest.mark.parametrize("method", ["explicit", "cg", "lissa"])
def test_influence_functions_run_and_return_on_the_models_device(device, method):
    from fgtrac_assets.attribution import InfluenceFunction

    x, y = torch.randn(20, 1, 4, 4), torch.randint(0, 3, (20,))
    model = _net().to(device)
    f = InfluenceFunction(model, torch.nn.CrossEntropyLoss(reduction="none"), x, y, layer="5", method=method,
                          damping=0.1, max_iter=20)
    scores = f.influence(x[:6], y[:6], x[:2], y[:2])
    assert scores.device.type == device and scores.shape == (6, 2) and torch.isfinite(scores.cpu()).all()


# ----------------------------------------------------------------------------- benchmarks/gpu_check.py


def _gpu_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_cpu_against_cpu_agrees(capsys):
    assert _gpu_check().main(["--devices", "cpu,cpu", "--small"]) == 0
    out = capsys.readouterr().out
    assert "all agree" in out and " NO " not in out
    for check in ("digits: train and val loss per epoch", "digits: influence rows, B's checkpoints scored on A",
                  "resnet all parameters: TracInCP influence", "resnet last layer: TracInCP influence"):
        assert check in out


def test_gpu_check_reports_a_mismatch():
    check = _gpu_check()
    assert check.compare_scores("x", [1.0, 2.0], [1.0, 2.0 + 1e-3], 1e-4).ok is False
    assert check.compare_scores("x", [1.0, 2.0], [1.0, 2.0 + 1e-5], 1e-4).ok is True
    assert check.compare_losses("x", [1.0, 2.0], [1.0, 2.0 + 1e-3], 1e-4).ok is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip where there is no CUDA")
def test_gpu_check_skips_without_cuda(capsys):
    assert _gpu_check().main([]) == 0
    assert capsys.readouterr().out.strip() == "no CUDA device: skipped"
