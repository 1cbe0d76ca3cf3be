"""Reading image samples from the bundled digits, an ImageFolder tree or a Parquet file."""

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..tracing.ids import array_sample_id
from .base import Ingested, Rejection

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}
RAW_SCHEMA = pa.schema([("sample_id", pa.string()), ("source", pa.string()), ("label", pa.int64()),
                        ("pixels", pa.binary()), ("height", pa.int64()), ("width", pa.int64()),
                        ("value_max", pa.float64())])


def bundled_digits(limit: int = 0) -> Iterator[tuple[str, np.ndarray, int, None, float]]:
    """Yield (source, uint8 image, label, no error, value_max) for scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    n = len(data.target) if limit <= 0 else min(limit, len(data.target))
    for i in range(n):
        yield f"sklearn:digits#{i}", data.images[i].astype(np.uint8), int(data.target[i]), None, 16.0


def decode_image(data: bytes) -> np.ndarray:
    """Return a grayscale uint8 array from encoded image bytes; raise ValueError if undecodable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("L", "1", "P", "RGB", "RGBA", "I;16", "I"):
                raise ValueError(f"unsupported image mode {img.mode}")
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("not a decodable image") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"corrupt or truncated image ({exc})") from None


def image_folder(root: Path, limit: int = 0) -> Iterator[tuple[str, np.ndarray | None, int | None, str | None]]:
    """Yield (source, image or None, label or None, error or None) for an ImageFolder tree (class folders)."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        yield f"imagefolder:{root.name}", None, None, "no class folders (expected ROOT/<label>/<image>)"
        return
    labels = _class_labels([c.name for c in classes])
    count = 0
    for cls in classes:
        files = sorted(p for p in cls.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
        if not files:
            yield f"imagefolder:{cls.name}/", None, None, "empty class folder"
            continue
        for f in files:
            if limit and count >= limit:
                return
            count += 1
            source = f"imagefolder:{f.relative_to(root).as_posix()}"
            if f.is_symlink():
                yield source, None, None, "symbolic link: not followed (files must lie inside the source folder)"
                continue
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                yield source, None, None, f"not an image file (suffix {f.suffix or 'none'})"
                continue
            try:
                data = f.read_bytes()
            except OSError as exc:
                yield source, None, None, f"unreadable ({exc.strerror or exc})"
                continue
            try:
                yield source, decode_image(data), labels[cls.name], None
            except ValueError as exc:
                yield source, None, None, str(exc)


def parquet_images(path: Path, limit: int = 0) -> Iterator[tuple[str, np.ndarray | None, int | None, str | None]]:
    """Yield (source, image, label, error) for a Parquet file with `label` and `image` (encoded) or `pixels`+`height`+`width`."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        yield f"parquet:{path.name}", None, None, f"not a readable Parquet file ({exc})"
        return
    cols = set(table.column_names)
    if "label" not in cols or not ({"image"} <= cols or {"pixels", "height", "width"} <= cols):
        yield (f"parquet:{path.name}", None, None,
               f"missing columns: need 'label' and 'image' or 'pixels'+'height'+'width' (has {sorted(cols)})")
        return
    if table.num_rows == 0:
        yield f"parquet:{path.name}", None, None, "empty file (no rows)"
        return
    rows = table.to_pylist()
    for i, row in enumerate(rows[:limit] if limit else rows):
        source = f"parquet:{path.name}#row={i}"
        try:
            label = row["label"]
            if label is None or isinstance(label, bool) or not float(label).is_integer():
                raise ValueError(f"label {label!r} is not an integer")
            if "image" in row and row["image"] is not None:
                img = decode_image(row["image"])
            else:
                h, w = int(row["height"]), int(row["width"])
                img = np.asarray(row["pixels"], dtype=np.float64)
                if img.size != h * w or not np.isfinite(img).all() or img.min() < 0 or img.max() > 255:
                    raise ValueError(f"pixels must be {h}x{w} finite values in 0..255")
                img = img.reshape(h, w).astype(np.uint8)
            yield source, img, int(label), None
        except (ValueError, TypeError) as exc:
            yield source, None, None, str(exc)


def _class_labels(names: list[str]) -> dict[str, int]:
    """Folder names that are all integers are their own labels; otherwise their sorted position."""
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}


def collect_images(items, value_max: float | None, num_classes: int | None) -> Ingested:
    """Return the Ingested set from (source, image, label, error) items: size checks and duplicates resolved."""
    rows: list[dict] = []
    rejected: list[Rejection] = []
    shape = None
    for item in items:
        source, img, label, error = item[:4]
        vmax = item[4] if len(item) > 4 else value_max
        if error is not None:
            rejected.append(Rejection(source, error))
            continue
        if img.ndim != 2:
            rejected.append(Rejection(source, f"expected a single-channel image, got shape {img.shape}"))
            continue
        sid = array_sample_id(img)
        if shape is None:
            shape = img.shape
        if img.shape != shape:
            rejected.append(Rejection(source, f"wrong size {img.shape[0]}x{img.shape[1]}, expected {shape[0]}x{shape[1]}", sid))
            continue
        if num_classes is not None and not 0 <= label < num_classes:
            rejected.append(Rejection(source, f"label {label} is out of range 0..{num_classes - 1}", sid))
            continue
        rows.append({"sample_id": sid, "source": source, "label": label, "pixels": img.tobytes(),
                     "height": img.shape[0], "width": img.shape[1], "value_max": float(vmax)})
    rows, dup_rejections = resolve_duplicates(rows)
    return Ingested(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), rejected + dup_rejections)


def resolve_duplicates(rows: list[dict]) -> tuple[list[dict], list[Rejection]]:
    """Return rows without conflicting duplicates: same content + same label kept (every source), conflicting labels rejected."""
    labels: dict[str, set] = {}
    for r in rows:
        labels.setdefault(r["sample_id"], set()).add(r["label"])
    kept, rejected = [], []
    for r in rows:
        seen = labels[r["sample_id"]]
        if len(seen) > 1:
            rejected.append(Rejection(r["source"], f"same content as another item with conflicting labels {sorted(seen)}",
                                      r["sample_id"]))
        else:
            kept.append(r)
    return kept, rejected
