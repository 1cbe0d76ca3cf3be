"""The digits_cnn pipeline: 8x8 digit images (or a user's images) and a small CNN."""

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import InputError, MissingInput
from ..tracing.ids import bytes_digest
from ..tracing.recorder import Recorder
from .base import EpochResult, Ingested, Pipeline, Preprocessed, TrainSettings
from .ingest import bundled_digits, collect_images, image_folder, table_images
from .splits import split_of
from .tables import TABLE_FORMATS, name_text

PREPARED_SCHEMA = pa.schema([("sample_id", pa.string()), ("split", pa.string()), ("label", pa.int64()),
                             ("x", pa.binary()), ("height", pa.int64()), ("width", pa.int64())])


def build_cnn(num_classes: int):
    """Return the digits CNN: a convolution, max-pooling to 4x4, a hidden linear layer and the final `fc` layer."""
    import torch.nn as nn

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(4), nn.Flatten())
            self.hidden = nn.Sequential(nn.Linear(16 * 4 * 4, 64), nn.ReLU())
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            return self.fc(self.hidden(self.features(x)))

    return DigitsCNN()


class DigitsPipeline(Pipeline):
    """Images -> normalised tensors -> CNN, with the final linear layer `fc` used for influence."""

    name = "digits_cnn"
    description = "A CNN on 8x8 digit images (scikit-learn's bundled digits by default)."
    influence_layer = "fc"
    num_classes = 10
    image_shape = (8, 8)  # the input size (height, width) every image must have; `image_size` in the config sets it

    def with_image_size(self, size: str) -> "DigitsPipeline":
        """Return this pipeline expecting images of size 'HxW' (the CNN pools adaptively, so any size trains)."""
        h, _, w = size.lower().partition("x")
        if not (h.isdigit() and w.isdigit() and 1 <= int(h) <= 4096 and 1 <= int(w) <= 4096):
            raise InputError(f"image_size {size!r}: expected HEIGHTxWIDTH, e.g. 28x28 (each 1..4096)")
        other = copy.copy(self)
        other.image_shape = (int(h), int(w))
        return other

    def ingest(self, source: str, limit: int) -> Ingested:
        if not source:
            return self._collect(bundled_digits(limit), None)
        path = Path(source)
        if not path.exists():
            raise MissingInput(f"source {source}: no such file or directory")
        if path.is_dir():
            return self._collect(_folder_items(path, limit, self.num_classes), 255.0)
        return self._collect(table_images(path, limit), 255.0)

    def _collect(self, items, value_max: float | None) -> Ingested:
        """Return the Ingested set of (source, image, label, error) items, checked against this model's input."""
        return collect_images(items, value_max, self.num_classes, self.image_shape)

    def preprocess(self, raw: pa.Table) -> Preprocessed:
        rows = _unique_by_id(raw.to_pylist())
        splits = [split_of(r["sample_id"]) for r in rows]
        scaled = [np.frombuffer(r["pixels"], np.uint8).astype(np.float32) / np.float32(r["value_max"]) for r in rows]
        train = [x for x, s in zip(scaled, splits) if s == "train"] or scaled
        mean = float(np.mean(np.concatenate(train))) if train else 0.0
        std = float(np.std(np.concatenate(train))) if train else 1.0
        std = std if std > 0 else 1.0
        out, details = [], []
        for r, s, x in zip(rows, splits, scaled):
            xb = ((x - np.float32(mean)) / np.float32(std)).astype(np.float32).tobytes()
            out.append({"sample_id": r["sample_id"], "split": s, "label": r["label"], "x": xb,
                        "height": r["height"], "width": r["width"]})
            details.append({"input": r["sample_id"], "output": bytes_digest(xb), "split": s})
        params = {"scale": "pixels / value_max", "mean": mean, "std": std}
        return Preprocessed(pa.Table.from_pylist(out, schema=PREPARED_SCHEMA), details, params)

    def build_model(self, prepared: pa.Table):
        return build_cnn(self.num_classes)

    def tensors(self, prepared: pa.Table, split: str):
        import torch

        rows = [r for r in prepared.to_pylist() if r["split"] == split]
        if not rows:
            return [], torch.zeros((0, 1, 8, 8)), torch.zeros((0,), dtype=torch.long)
        h, w = rows[0]["height"], rows[0]["width"]
        x = np.stack([np.frombuffer(r["x"], np.float32) for r in rows]).reshape(-1, 1, h, w)
        y = np.array([r["label"] for r in rows], dtype=np.int64)
        return [r["sample_id"] for r in rows], torch.from_numpy(x.copy()), torch.from_numpy(y)

    def loss_fn(self):
        import torch

        return torch.nn.CrossEntropyLoss(reduction="none")

    def pictures(self, prepared: pa.Table, sample_ids: list[str]) -> dict[str, tuple]:
        wanted = set(sample_ids)
        out = {}
        for r in prepared.to_pylist():
            if r["sample_id"] in wanted:
                img = np.frombuffer(r["x"], np.float32).reshape(r["height"], r["width"])
                out[r["sample_id"]] = (img, str(r["label"]))
        return out

    def evaluate(self, model, prepared: pa.Table) -> dict:
        import torch

        from ..attribution.model_calls import model_device

        ids, x, y = self.tensors(prepared, "test")
        if not ids:
            return {}
        device = model_device(model)
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            model.eval()
            logits = model(x)
        return {"test_accuracy": float((logits.argmax(1) == y).float().mean()),
                "test_loss": float(self.loss_fn()(logits, y).mean())}

    def train(self, prepared: pa.Table, settings: TrainSettings, recorder: Recorder) -> Iterator[EpochResult]:
        from .training import train_supervised

        model = self.initial_model(prepared, settings.seed)
        _, xt, yt = self.tensors(prepared, "train")
        _, xv, yv = self.tensors(prepared, "val")
        yield from train_supervised(model, self.loss_fn(), (xt, yt), (xv, yv), settings, recorder,
                                    self.make_optimizer)


def _folder_items(path: Path, limit: int, num_classes: int) -> list:
    """Return the items of a folder: class folders of images and the Parquet or CSV tables at its top (as the inbox)."""
    top = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    items = list(image_folder(path, limit, num_classes)) if any(p.is_dir() for p in top) else []
    for f in top:
        if f.suffix.lower() not in TABLE_FORMATS or f.is_dir():
            continue
        if f.is_symlink():
            items.append((f"{f.suffix.lower()[1:]}:{name_text(f.name)}", None, None,
                          "symbolic link: not followed (files must lie inside the source folder)"))
        elif f.is_file():
            items.extend(table_images(f, limit))
    return items or list(image_folder(path, limit, num_classes))  # reports "no class folders"


def _unique_by_id(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        if r["sample_id"] not in seen:
            seen.add(r["sample_id"])
            out.append(r)
    return out
