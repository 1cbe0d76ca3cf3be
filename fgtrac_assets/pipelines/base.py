"""What a pipeline provides to the chain (data in, model, training loop) and the settings its stages take."""

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from ..attribution.methods import DEFAULT_METHOD
from ..attribution.methods import method as influence_method
from ..errors import InputError
from ..tracing.recorder import Recorder


@dataclass(frozen=True)
class Rejection:
    """An input item that was not ingested, with where it came from and why."""

    source: str
    reason: str
    sample_id: str | None = None

    def message(self) -> str:
        """Return the one-line message a user sees."""
        return f"{self.source}: rejected: {self.reason}"


@dataclass
class Ingested:
    """Accepted samples (sample_id, source, label, payload columns) and rejections."""

    table: pa.Table
    rejected: list[Rejection] = field(default_factory=list)


@dataclass
class Preprocessed:
    """Preprocessed samples (sample_id, split, label, payload) and one detail dict per row.

    A detail holds input, output and split, and optionally ``about``: facts about the sample
    recorded with its `split` event (a rating's user, movie and the movie's title), shown
    beside the sample in audits and the report."""

    table: pa.Table
    details: list[dict]
    params: dict


#: the values a `device` setting takes, as its messages and the launchpad describe them
DEVICE_CHOICES = "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(device: str, setting: str = "device") -> str:
    """Return the torch device a `device` setting names: 'auto' is 'cuda:<current>' if CUDA is available, else 'cpu'.

    Raise InputError naming the setting for a string torch cannot parse, or a device this machine does not have
    (CUDA when torch.cuda.is_available() is False, a CUDA index past the last device, a device type fgtrac does
    not run on).
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{setting}={device!r} is not a torch device: use {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{setting}={device!r}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False): use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise InputError(f"{setting}={device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return f"cuda:{index}"
    if dev.type == "mps" and torch.backends.mps.is_available():
        return "mps"
    raise InputError(f"{setting}={device!r} is not a device fgtrac runs on here: use {DEVICE_CHOICES}")


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one training run, and the device it runs on."""

    epochs: int = 12
    lr: float = 0.1
    batch_size: int = 32
    seed: int = 0
    schedule: str = "cosine"
    device: str = "auto"  # see resolve_device; checkpoints are saved on the CPU whatever it is

    def validate(self) -> None:
        """Raise InputError (a ValueError) naming the first setting out of range."""
        if not 1 <= self.epochs <= 10_000:
            raise InputError(f"epochs={self.epochs} is out of range (1..10000)")
        if not 0 < self.lr <= 10:
            raise InputError(f"lr={self.lr} is out of range (0, 10]")
        if not 1 <= self.batch_size <= 1_000_000:
            raise InputError(f"batch_size={self.batch_size} is out of range (1..1000000)")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"schedule={self.schedule!r} must be 'cosine' or 'constant'")
        resolve_device(self.device)


@dataclass(frozen=True)
class IngestSettings:
    """Where the raw samples of one ingestion come from and how strictly they are taken."""

    source: str = ""  # '' = the pipeline's bundled data; else an ImageFolder directory, a Parquet/CSV file, ...
    limit: int = 0  # read at most this many items (0 = all)
    strict: bool = False  # fail the run if any item is rejected
    inbox: bool = False  # also ingest everything in $FGTRAC_HOME/inbox/<pipeline>/
    image_size: str = ""  # images: the size every image must have, HEIGHTxWIDTH; '' = the pipeline's


@dataclass(frozen=True)
class GradientSettings:
    """Where the gradient-cache stage takes the influence layer's per-sample gradient factors."""

    device: str = "auto"  # see resolve_device; the cache is written from CPU copies

    def validate(self) -> None:
        """Raise InputError naming the device setting when this machine cannot run it."""
        resolve_device(self.device)


@dataclass(frozen=True)
class InfluenceSettings:
    """How many proponents and opponents the influence stage keeps per test sample, by which method, and where."""

    top_k: int = 10
    device: str = "auto"  # see resolve_device; the scores are written from CPU copies
    method: str = DEFAULT_METHOD  # a name in attribution.methods.METHODS

    def validate(self) -> None:
        """Raise InputError naming the setting that is wrong: a device this machine lacks, an unknown method."""
        resolve_device(self.device)
        influence_method(self.method)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {self.top_k!r}")


@dataclass
class EpochResult:
    """One finished epoch: where training stood and the weights to checkpoint."""

    epoch: int
    step: int
    lr: float
    train_loss: float
    val_loss: float
    state_dict: dict


class Pipeline(ABC):
    """A concrete data + model + training loop; the asset factory builds the chain from it."""

    name: str
    description: str
    influence_layer: str = "fc"

    @abstractmethod
    def ingest(self, source: str, limit: int) -> Ingested:
        """Return the accepted raw samples and the rejected items of a source ('' = bundled default)."""

    def with_image_size(self, size: str) -> "Pipeline":
        """Return this pipeline expecting images of size 'HxW'; a pipeline that reads no images refuses."""
        raise InputError(f"{self.name} reads no images: image_size does not apply to it")

    @abstractmethod
    def preprocess(self, raw: pa.Table) -> Preprocessed:
        """Return the preprocessed samples with their split, deterministic in the input."""

    @abstractmethod
    def build_model(self, prepared: pa.Table):
        """Return a freshly initialised torch model for this data."""

    @abstractmethod
    def tensors(self, prepared: pa.Table, split: str):
        """Return (sample_ids, inputs, targets) of one split as torch tensors."""

    @abstractmethod
    def loss_fn(self):
        """Return the per-sample loss (reduction='none')."""

    @abstractmethod
    def train(self, prepared: pa.Table, settings: TrainSettings, recorder: Recorder) -> Iterator[EpochResult]:
        """Train a model, reporting epochs, batches and roles to the recorder; yield each finished epoch."""

    def initial_model(self, prepared: pa.Table, seed: int):
        """Return the model a run with this seed starts from: the global torch RNG seeded, then built."""
        import torch

        torch.manual_seed(seed)
        return self.build_model(prepared)

    def make_optimizer(self, parameters, lr: float):
        """Return the optimiser the training loop steps (plain SGD unless the pipeline says otherwise)."""
        import torch

        return torch.optim.SGD(parameters, lr=lr)

    def gradient_factors(self, model, prepared: pa.Table, split: str):
        """Return (sample_ids, Factors) of the influence layer for one split: output error and input activation per sample."""
        from ..attribution.ghost import linear_factors

        ids, x, y = self.tensors(prepared, split)
        if not ids:
            return [], None
        return ids, linear_factors(model, [self.influence_layer], x, y, self.loss_fn())[0]

    def evaluate(self, model, prepared: pa.Table) -> dict:
        """Return test-split metrics of a trained model for the asset metadata (none by default)."""
        return {}

    def pictures(self, prepared: pa.Table, sample_ids: list[str]) -> dict[str, tuple]:
        """Return {sample_id: (picture, caption)} for plots: a 2-D array (image) or a short text."""
        labels = dict(zip(prepared.column("sample_id").to_pylist(), prepared.column("label").to_pylist()))
        return {s: (f"{s[:10]}…", f"label {labels.get(s)}") for s in sample_ids}

    def describe_samples(self, prepared: pa.Table, sample_ids: list[str]) -> dict[str, dict[str, str]]:
        """Return {sample_id: {column: text}} shown beside influence scores (default: the label)."""
        labels = dict(zip(prepared.column("sample_id").to_pylist(), prepared.column("label").to_pylist()))
        return {s: {"label": str(labels.get(s))} for s in sample_ids}
