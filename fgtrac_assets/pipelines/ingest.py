"""Reading image samples from the bundled digits, an ImageFolder tree or a Parquet/CSV table."""

import io
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..tracing.ids import array_sample_id
from .base import Ingested, Rejection
from .tables import TableUnreadable, read_user_table, table_format

PIXEL_COLUMN = re.compile(r"p\d+")
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


def table_images(path: Path, limit: int = 0) -> Iterator[tuple[str, np.ndarray | None, int | None, str | None]]:
    """Yield (source, image, label, error) per row of a Parquet or CSV table of labelled images (layouts: README)."""
    fmt = table_format(path) or "parquet"
    name = f"{fmt}:{path.name}"
    try:
        got = read_user_table(path, fmt=fmt)
    except TableUnreadable as exc:
        yield name, None, None, str(exc)
        return
    cols = got.table.column_names
    layout = _image_layout(cols)
    if isinstance(layout, str):
        yield name, None, None, layout
        return
    if got.table.num_rows == 0 and not got.skipped:
        yield name, None, None, "empty file (no rows)"
        return
    table_rows = dict(zip(got.rows, got.table.to_pylist()))
    n = len(got.rows) + len(got.skipped)
    for i in range(min(n, limit) if limit else n):
        source = f"{name}#row={i}"
        if i in got.skipped:
            yield source, None, None, got.skipped[i]
            continue
        unreadable = got.problems(i)
        if unreadable:
            yield source, None, None, "; ".join(unreadable)
            continue
        try:
            img, label = _row_image(table_rows[i], layout)
            yield source, img, label, None
        except (ValueError, TypeError) as exc:
            yield source, None, None, str(exc)


def _image_layout(cols: list[str]) -> tuple[str, int] | str:
    """Return the table's image layout ('image' | 'pixels' | 'columns', pixel count) or why none fits."""
    have = set(cols)
    pixel_cols = sorted(int(c[1:]) for c in cols if PIXEL_COLUMN.fullmatch(c))
    if "label" in have:
        if "image" in have:
            return "image", 0
        if {"pixels", "height", "width"} <= have:
            return "pixels", 0
        if pixel_cols and pixel_cols == list(range(len(pixel_cols))):
            n = len(pixel_cols)
            if {"height", "width"} <= have or math.isqrt(n) ** 2 == n:
                return "columns", n
            return (f"missing columns: {n} pixel columns p0..p{n - 1} are not a square image: "
                    "add 'height' and 'width' columns")
        if pixel_cols:
            gap = next(k for k in range(len(pixel_cols) + 1) if k not in set(pixel_cols))
            return f"missing columns: pixel columns must be p0..pN-1 without gaps (no 'p{gap}')"
    return ("missing columns: need 'label' and 'image', or 'pixels'+'height'+'width', or pixel columns 'p0'..'pN-1' "
            f"(has {sorted(have)[:12]}{' ...' if len(have) > 12 else ''})")


def _row_image(row: dict, layout: tuple[str, int]) -> tuple[np.ndarray, int]:
    """Return (uint8 image, label) of one table row; raise ValueError saying what is wrong with it."""
    kind, n = layout
    label = _integer(row["label"], "label")
    if kind == "image" and row["image"] is not None:
        if not isinstance(row["image"], bytes):
            raise ValueError(f"image must be encoded image bytes, not {type(row['image']).__name__}")
        return decode_image(row["image"]), label
    if kind == "columns":
        values = [row[f"p{k}"] for k in range(n)]
        if "height" in row and "width" in row:
            h, w = _integer(row["height"], "height"), _integer(row["width"], "width")
        else:
            h = w = math.isqrt(n)
        names = [f"p{k}" for k in range(n)]
    else:
        h, w = _integer(row["height"], "height"), _integer(row["width"], "width")
        values = row["pixels"]
        if values is None or isinstance(values, (str, bytes)):
            raise ValueError(f"pixels must be {h}x{w} finite values in 0..255 (pixels is {type(values).__name__})")
        names = [f"pixel {k}" for k in range(len(values))]
    if h < 1 or w < 1 or len(values) != h * w:
        raise ValueError(f"pixels must be {h}x{w} finite values in 0..255 (has {len(values)} values)")
    img = np.empty(len(values), dtype=np.float64)
    for k, v in enumerate(values):
        try:
            img[k] = float(v) if v is not None and not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            raise ValueError(f"pixels must be {h}x{w} finite values in 0..255 ({names[k]} {v!r} is not a number)") from None
        if not (math.isfinite(img[k]) and 0 <= img[k] <= 255):
            what = "is missing" if v is None else f"is {img[k]:g}"
            raise ValueError(f"pixels must be {h}x{w} finite values in 0..255 ({names[k]} {what})")
    return img.reshape(h, w).astype(np.uint8), label


def _integer(value, what: str) -> int:
    """Return value as an int; raise ValueError naming `what` unless it is a whole number."""
    try:
        if value is None or isinstance(value, bool) or not float(value).is_integer():
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} {value!r} is not an integer") from None


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
