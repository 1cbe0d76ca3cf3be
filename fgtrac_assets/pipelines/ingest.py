"""Reading image samples from the bundled digits, an ImageFolder tree or a Parquet/CSV table."""

import io
import math
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..tracing.ids import array_sample_id
from .base import Ingested, Rejection
from .tables import TableUnreadable, name_problem, name_text, one_line, read_user_table, table_format

PIXEL_COLUMN = re.compile(r"p\d+")
ASCII_INTEGER = re.compile(r"[0-9]+")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}
MAX_DECODED_PIXELS = 1 << 24  # 4096 x 4096: an image declaring more is not decoded
ALPHA_MODES = ("RGBA", "LA", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
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
    """Return a grayscale uint8 array from encoded image bytes; raise ValueError saying why they cannot be used."""
    img = _open_image(data)
    try:
        return _grey(img)
    finally:
        img.close()


def _open_image(data: bytes):
    """Return the loaded PIL image of encoded bytes (declared size checked first); raise ValueError if unusable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"a possible decompression bomb, not decoded ({one_line(exc)})") from None
    except UnidentifiedImageError:
        raise ValueError("not a decodable image") from None
    except Exception as exc:  # a decoder fails on bad bytes in many ways (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"corrupt or truncated image ({one_line(exc)})") from None
    w, h = img.size
    if w * h > MAX_DECODED_PIXELS:
        img.close()
        raise ValueError(f"declares {w}x{h} pixels, more than {MAX_DECODED_PIXELS:,} "
                         "(a possible decompression bomb): not decoded")
    try:
        frames = getattr(img, "n_frames", 1)
        img.load()
    except Exception as exc:
        img.close()
        raise ValueError(f"corrupt or truncated image ({one_line(exc)})") from None
    if frames > 1:
        img.close()
        raise ValueError(f"has {frames} frames: one image per file")
    return img


def _grey(img) -> np.ndarray:
    """Return a loaded image as 8-bit grey (16-bit >> 8, colour weighted); raise ValueError rather than lose meaning."""
    mode = "I;16" if img.mode == "I" and img.format == "PNG" else img.mode  # older Pillow opens 16-bit PNG as I
    if mode in ALPHA_MODES or "transparency" in img.info:
        _require_opaque(img)
        img = img.convert("RGBA").convert("RGB")
    elif mode in SIXTEEN_BIT_MODES:
        return (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
    elif mode == "I":
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"32-bit integer pixels in {a.min()}..{a.max()}, outside 0..255: "
                             "save it as 8-bit or 16-bit grey")
        return a.astype(np.uint8)
    elif mode not in ("L", "1", "P", "RGB"):
        raise ValueError(f"unsupported image mode {mode}")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _require_opaque(img) -> None:
    """Raise ValueError if an image with an alpha channel or a transparent colour has any pixel that is not opaque."""
    if img.mode not in ALPHA_MODES and img.mode not in ("L", "1", "P", "RGB"):
        raise ValueError(f"image mode {img.mode} with a transparent colour: save it without transparency")
    alpha = np.asarray(img.convert("RGBA"))[..., 3]
    see_through = int((alpha < 255).sum())
    if see_through:
        raise ValueError(f"has transparent pixels ({see_through} of {alpha.size} with alpha < 255): "
                         "flatten it onto its background (no alpha channel) before ingesting")


def image_folder(root: Path, limit: int = 0, num_classes: int | None = None
                 ) -> Iterator[tuple[str, np.ndarray | None, int | None, str | None]]:
    """Yield (source, image or None, label or None, error or None) for an ImageFolder tree (integer class folders)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        yield f"imagefolder:{name_text(root.name)}", None, None, "no class folders (expected ROOT/<label>/<image>)"
        return
    count = 0
    for cls in folders:
        folder = f"imagefolder:{name_text(cls.name)}/"
        if cls.is_symlink():
            yield folder, None, None, ("symbolic link to a folder: not followed "
                                       "(class folders must lie inside the source folder)")
            continue
        files = folder_files(cls)
        label, why = class_label(cls.name, num_classes, len(files))
        if why:
            yield folder, None, None, why
            continue
        if not files:
            yield folder, None, None, "empty class folder"
            continue
        for f in files:
            if limit and count >= limit:
                return
            count += 1
            yield _image_item(root, f, label)


def _count(n: int, what: str) -> str:
    """Return 'n what' with the plural when n is not 1."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def folder_files(folder: Path) -> list[Path]:
    """Return every non-hidden entry under a folder except folders, sorted; links are listed, never followed."""
    out: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return [folder]  # reported as unreadable by _image_item
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir(follow_symlinks=False):
            out.extend(folder_files(Path(e.path)))
        else:
            out.append(Path(e.path))
    return sorted(out)


def _image_item(root: Path, f: Path, label: int) -> tuple[str, np.ndarray | None, int | None, str | None]:
    """Return (source, image, label, error) of one entry of a class folder."""
    rel = f.relative_to(root).as_posix()
    source = f"imagefolder:{name_text(rel)}"
    bad_name = name_problem(rel)
    if bad_name:
        return source, None, None, bad_name
    if f.is_symlink():
        return source, None, None, "symbolic link: not followed (files must lie inside the source folder)"
    if f.is_dir():
        return source, None, None, "unreadable folder (permission denied?)"
    if not f.is_file():
        return source, None, None, "not a regular file"
    if f.suffix.lower() not in IMAGE_SUFFIXES:
        return source, None, None, f"not an image file (suffix {f.suffix or 'none'})"
    try:
        data = f.read_bytes()
    except OSError as exc:
        return source, None, None, f"unreadable ({exc.strerror or exc})"
    try:
        return source, decode_image(data), label, None
    except ValueError as exc:
        return source, None, None, str(exc)


def class_label(name: str, num_classes: int | None, files: int) -> tuple[int | None, str | None]:
    """Return (label, None) for a class folder named by its integer label in ASCII digits, else (None, why not)."""
    unread = f"{_count(files, 'file')} not read"
    bad_name = name_problem(name)
    if bad_name:
        return None, f"class folder {bad_name} ({unread})"
    if not ASCII_INTEGER.fullmatch(name):
        return None, (f"class folder {name!r} is not a label ({_why_not_label(name)}{unread}): name each class "
                      f"folder by its integer label{_range(num_classes)} in ASCII digits (ROOT/0/, ROOT/1/, ...); "
                      "class names such as cat/ are not mapped to numbers")
    label = int(name)
    if num_classes is not None and label >= num_classes:
        return None, f"class folder {name!r}: label {label} is out of range{_range(num_classes)} ({unread})"
    return label, None


def _range(num_classes: int | None) -> str:
    """Return ' 0..N-1' for a known number of classes, else ''."""
    return "" if num_classes is None else f" 0..{num_classes - 1}"


def _why_not_label(name: str) -> str:
    """Return why a folder name that looks like a number is still not a label, then '; ' ('' for a plain name)."""
    text = name.strip()
    if re.fullmatch(r"-[0-9]+", text):
        return "a negative number; "
    if re.fullmatch(r"\+?[0-9]+", text):
        return "a sign or spaces around the digits; "
    if any(ch.isnumeric() for ch in text) and all(ch.isnumeric() or ch in "+-.,eE" for ch in text):
        return "not a whole number in ASCII digits 0-9; "
    return ""


def table_images(path: Path, limit: int = 0) -> Iterator[tuple[str, np.ndarray | None, int | None, str | None]]:
    """Yield (source, image, label, error) per row of a Parquet or CSV table of labelled images (layouts: README)."""
    fmt = table_format(path) or "parquet"
    name = f"{fmt}:{name_text(path.name)}"
    bad_name = name_problem(path.name)
    if bad_name:
        yield name, None, None, bad_name
        return
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


def collect_images(items, value_max: float | None, num_classes: int | None, shape: tuple[int, int]) -> Ingested:
    """Return the Ingested set from (source, image, label, error) items: size (the pipeline's) checked, duplicates resolved."""
    rows: list[dict] = []
    rejected: list[Rejection] = []
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
        if img.shape != tuple(shape):
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
