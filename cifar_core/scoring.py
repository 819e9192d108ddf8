"""Batch scoring: classify every file under a folder (local or ``s3://``) with a trained model.

The pipeline is one Ray Data dataset, streamed:

    list files (driver) -> read bytes -> decode + resize to 32x32 (per file, tasks)
        -> batch -> ``Predictor`` (callable class: the model loaded once per actor)
        -> write (driver: one CSV and/or Parquet file, replaced atomically) + summary JSON

Rules the pipeline keeps, whatever the input:

- **N files in, N rows out.** Every listed file gets exactly one row with ``status`` ``ok`` or
  ``error`` and an ``error`` message (``"<kind>: <detail>"``). No per-file problem raises; the
  driver checks the row count before it replaces the output.
- **Safe reading.** Only regular files are opened (a FIFO or device under SRC would block or
  never end). Symlinks are resolved when listed and again when read; one that points outside
  SRC is never followed (error row ``symlink outside SRC``). Symlinked folders are not
  descended into (their files are listed where they really are, if inside SRC). Files larger
  than ``max_file_bytes`` are not read.
- **Safe decoding.** The pixel count is checked from the image header (``Image.open`` reads only
  the header) before anything is decoded: a small PNG can declare 40,000 x 40,000 pixels and
  expand to gigabytes. Pillow's own ``MAX_IMAGE_PIXELS`` guard is set to the same cap.
- **Training's preprocessing.** Each image becomes 32x32 RGB uint8, as the training data
  (``data._decode_32``): ``convert("RGB")`` for 1/L/P/CMYK/YCbCr, alpha channels (RGBA, LA, PA)
  dropped rather than composited, exactly as ``convert("RGB")`` does for training images;
  16-bit images scaled by 255/65535 (Pillow would clip 16-bit grayscale at 255); EXIF
  orientation applied; any other size resized (not cropped) with bilinear filtering. JPEGs
  larger than 32 px are decoded at a reduced DCT scale first (never below 32 px), as Pillow's
  ``thumbnail`` does. The predictor then applies ``data.preprocess_images`` with the
  checkpoint's ``input_size``, the same function training used.
- **Safe models.** Only a ``model.keras`` with its ``settings.json`` is loaded, with
  ``safe_mode=True`` (``models.load_checkpoint_model``): a model that needs arbitrary code
  (Lambda layers, unregistered custom objects) is refused.

Output columns, one row per file: ``path``, ``label`` (only when SRC has CIFAR-10 class
folders or ``<class>_*`` file names), ``predicted_class``, ``confidence``, ``top2_class``,
``top2_confidence``, ``top3_class``, ``top3_confidence``, ``status``, ``error``.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar_core.settings import CLASS_NAMES, Settings
from cifar_core.storage import (StorageError, exists, find_files, is_s3, join_uri, list_s3,
                                read_s3_object, read_text, s3_endpoint, upload_file,
                                write_text)

OK, ERROR = "ok", "error"
#: Side of the images the decoder produces: CIFAR-10's native size, what training stored.
DECODE_SIZE = 32
#: Refuse images whose header declares more pixels than this (50 MP = 150 MB as RGB).
DEFAULT_MAX_PIXELS = 50_000_000
#: Refuse files larger than this without reading them (64 MiB).
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
#: Files per listing block: the unit of work of the read/decode tasks.
FILES_PER_TASK = 256
#: Threads per read task for s3:// objects (each GET waits ~10-50 ms on the network).
S3_READ_THREADS = 16
MODEL_FILE, SETTINGS_FILE = "model.keras", "settings.json"
OUTPUT_FORMATS = ("csv", "parquet")
EXIF_ORIENTATION = 0x0112

#: Columns written, in order (``label`` only when labels are known).
PREDICTION_COLUMNS = ["predicted_class", "confidence", "top2_class", "top2_confidence",
                      "top3_class", "top3_confidence"]
#: Per-row seconds each stage spent (worker time); summed into the summary, never written.
TIMING_COLUMNS = ["read_s", "decode_s", "predict_s"]


class ScoringError(ValueError):
    """A whole-job problem: missing or empty SRC, bad output path, unusable model."""


class ImageError(Exception):
    """One file cannot be scored; ``kind`` is a short fixed phrase counted in the summary."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class ScoreOptions:
    """Knobs of one scoring job (the CLI flags of ``cifar score``)."""

    batch_size: int = 256            # images per model call
    concurrency: int = 1             # predictor actors (each loads the model once)
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0      # logical CPUs Ray reserves per actor
    decode_cpus: float = 0.5         # logical CPUs per read/decode task (must differ from
                                     # cpus_per_actor, or Ray runs decoding inside the actors)
    model_threads: int = 0           # TensorFlow intra-op threads per actor; 0 = all cores
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    limit: int | None = None         # score only the first N files (sorted by path)
    formats: tuple[str, ...] = ("csv",)
    progress_interval_s: float = 5.0  # 0 = no progress lines
    endpoint: str | None = None      # S3 endpoint override (else AWS_ENDPOINT_URL)

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "max_pixels", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ScoringError(f"{name}={getattr(self, name)!r} must be >= 1")
        if min(self.gpus_per_actor, self.cpus_per_actor, self.model_threads) < 0:
            raise ScoringError("gpus_per_actor, cpus_per_actor and model_threads must be >= 0")
        if self.decode_cpus <= 0:
            raise ScoringError(f"decode_cpus={self.decode_cpus!r} must be > 0")
        if self.limit is not None and self.limit < 1:
            raise ScoringError(f"limit={self.limit!r} must be >= 1")
        unknown = set(self.formats) - set(OUTPUT_FORMATS)
        if not self.formats or unknown:
            raise ScoringError(f"formats={self.formats!r}: choose from {OUTPUT_FORMATS}")


# ---------------------------------------------------------------------------- model
@dataclass
class Checkpoint:
    """A resolved checkpoint: where it came from, its local folder and its settings."""

    uri: str                         # the checkpoint folder (local path or s3:// URI)
    local_dir: Path
    settings: Settings
    selected_trial: dict | None = None  # when MODEL was a sweep: the trial picked and why

    def describe(self) -> dict:
        return {"checkpoint": self.uri, "model": self.settings.model,
                "input_size": self.settings.input_size, "selected_trial": self.selected_trial}


def resolve_checkpoint(model: str, endpoint: str | None = None) -> Checkpoint:
    """The checkpoint MODEL names: a checkpoint folder (``model.keras`` + ``settings.json``),
    a run folder (``checkpoints/best``), a sweep folder (best completed trial by
    ``best_val_accuracy``, never by test accuracy), or a ``model.keras`` file beside its
    ``settings.json``. Local or ``s3://``; s3 checkpoints are mirrored into the local cache.
    """
    model = str(model).rstrip("/") if is_s3(model) else str(model)
    try:
        if model.endswith(".keras"):
            model = model.rsplit("/", 1)[0] if is_s3(model) else str(Path(model).parent)
        if _is_checkpoint(model, endpoint):
            return _load_checkpoint(model, endpoint)
        best = join_uri(model, "checkpoints", "best")
        if _is_checkpoint(best, endpoint):
            return _load_checkpoint(best, endpoint)
        records = find_files(join_uri(model, "trials"), "trial.json", endpoint)
    except (OSError, ValueError) as error:
        raise ScoringError(f"MODEL {model!r}: cannot read it ({error})") from error
    if records:
        return _best_trial_checkpoint(model, records, endpoint)
    raise ScoringError(
        f"MODEL {model!r} is not a checkpoint folder (model.keras + settings.json), a run "
        "folder (checkpoints/best) or a sweep folder (trials/*/trial.json)")


def _is_checkpoint(uri: str, endpoint: str | None) -> bool:
    return exists(join_uri(uri, MODEL_FILE), endpoint) and exists(
        join_uri(uri, SETTINGS_FILE), endpoint)


def _load_checkpoint(uri: str, endpoint: str | None, selected: dict | None = None
                     ) -> Checkpoint:
    from cifar_core.settings import SettingsError
    from cifar_core.storage import download_s3_prefix

    local = download_s3_prefix(uri, endpoint) if is_s3(uri) else Path(uri)
    try:
        settings = Settings.from_json((local / SETTINGS_FILE).read_text())
    except (SettingsError, ValueError) as error:
        raise ScoringError(f"{uri}/{SETTINGS_FILE}: not valid settings ({error})") from error
    return Checkpoint(uri, local, settings, selected)


def _best_trial_checkpoint(sweep: str, record_uris: list[str], endpoint: str | None
                           ) -> Checkpoint:
    """The completed trial with the highest validation accuracy (ties: smallest trial_id)."""
    from cifar_core.records import COMPLETED, TrialRecord

    candidates = []
    for uri in record_uris:
        try:
            record = TrialRecord.from_json(read_text(uri, endpoint))
        except (ValueError, TypeError, OSError):
            continue  # a half-written or foreign trial.json is not a candidate
        if (record.status == COMPLETED and record.checkpoint_uri
                and record.best_val_accuracy is not None):
            candidates.append(record)
    if not candidates:
        raise ScoringError(f"MODEL {sweep!r}: sweep folder has {len(record_uris)} trial "
                           "record(s) but no completed trial with a checkpoint")
    # Selection by validation accuracy only; ties go to the smallest trial_id (max keeps the
    # first of equals), so the choice is reproducible.
    best = max(sorted(candidates, key=lambda r: r.trial_id), key=lambda r: r.best_val_accuracy)
    selected = {"trial_id": best.trial_id, "best_val_accuracy": best.best_val_accuracy,
                "selected_by": "best_val_accuracy", "candidates": len(candidates)}
    if not _is_checkpoint(best.checkpoint_uri, endpoint):
        raise ScoringError(f"MODEL {sweep!r}: best trial {best.trial_id}'s checkpoint "
                           f"{best.checkpoint_uri!r} has no model.keras + settings.json")
    return _load_checkpoint(best.checkpoint_uri, endpoint, selected)


def check_model(checkpoint: Checkpoint) -> bytes:
    """Load the model once, safely, and check it matches its settings; return the file's bytes.

    Done on the driver before any Ray work, so an unsafe or broken checkpoint is a clear error
    (exit 2) instead of an actor crash. The bytes travel to the actors through Ray's object
    store, so actors on other nodes need no access to the driver's disk.
    """
    from cifar_core.models import ModelError, load_checkpoint_model

    path = checkpoint.local_dir / MODEL_FILE
    try:
        model = load_checkpoint_model(str(path))
    except ModelError as error:
        raise ScoringError(
            f"MODEL {checkpoint.uri}: refused or unreadable: {error}. cifar score loads models "
            "with safe_mode=True only (no Lambda layers, no custom code) and has no option to "
            "lower that.") from error
    size = checkpoint.settings.input_size
    expected = (None, size, size, 3)
    if tuple(model.input_shape) != expected or tuple(model.output_shape) != (
            None, len(CLASS_NAMES)):
        raise ScoringError(
            f"MODEL {checkpoint.uri}: model takes {model.input_shape} -> {model.output_shape}, "
            f"but its settings say {expected} -> (None, {len(CLASS_NAMES)})")
    return path.read_bytes()


# ---------------------------------------------------------------------------- listing
def list_source(src: str, limit: int | None = None, endpoint: str | None = None):
    """A DataFrame with one row per file under SRC: path, size, label, status, error.

    Files that must not be read (escaping symlinks, special files, unlistable folders) are
    already ``error`` here; the rest are ``pending``. Sorted by path; ``limit`` keeps the first N.
    """
    import pandas as pd

    if is_s3(src):
        rows = _list_s3(src, endpoint)
    else:
        root = Path(src)
        if not root.exists():
            raise ScoringError(f"SRC {src!r} does not exist")
        if not root.is_dir():
            raise ScoringError(f"SRC {src!r} is not a folder")
        rows = _list_local(root)
    if not rows:
        raise ScoringError(f"SRC {src!r} holds no files")
    rows.sort(key=lambda row: row["path"])
    if limit is not None:
        rows = rows[:limit]
    listing = pd.DataFrame(rows, columns=["path", "size", "label", "status", "error"])
    listing["size"] = listing["size"].astype("int64")
    return listing


def _row(path: str, relative: str, size: int = 0, error: str = "") -> dict:
    return {"path": path, "size": size, "label": label_of(relative) or "",
            "status": ERROR if error else "pending", "error": error}


def label_of(relative: str) -> str | None:
    """The CIFAR-10 class a file's place names: the nearest folder named like a class, else a
    file name ``<class>_...`` (as ``cifar export-samples`` writes); None when neither."""
    parts = relative.replace("\\", "/").split("/")
    for folder in reversed(parts[:-1]):
        if folder.lower() in CLASS_NAMES:
            return folder.lower()
    prefix = parts[-1].split("_", 1)[0].split(".", 1)[0].lower()
    return prefix if prefix in CLASS_NAMES else None


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _list_local(root: Path) -> list[dict]:
    root_real = os.path.realpath(root)
    rows: list[dict] = []

    def unlistable(error: OSError) -> None:
        # A folder we cannot list still gets a row, so its files are not silently missing.
        path = error.filename or "?"
        rows.append(_row(str(path), os.path.relpath(path, root),
                         error=f"unreadable folder: {error.strerror or error}"))

    # followlinks=False: a symlinked folder is never descended into (no loops, no escapes).
    for folder, folders, files in os.walk(root, followlinks=False, onerror=unlistable):
        for name in folders:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not _inside(os.path.realpath(path), root_real):
                rows.append(_row(path, os.path.relpath(path, root),
                                 error="symlink outside SRC: not followed"))
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not _inside(target, root_real):
                    rows.append(_row(path, relative, error="symlink outside SRC: not followed"))
                    continue
            try:
                info = os.stat(path)  # follows a symlink that stays inside SRC
            except OSError as error:
                rows.append(_row(path, relative, error=f"unreadable: {error.strerror}"))
                continue
            if not stat.S_ISREG(info.st_mode):
                rows.append(_row(path, relative, error="not a regular file: not opened"))
                continue
            rows.append(_row(path, relative, size=info.st_size))
    return rows


def _list_s3(src: str, endpoint: str | None) -> list[dict]:
    try:
        objects = list_s3(src.rstrip("/"), endpoint)
    except StorageError as error:
        raise ScoringError(f"SRC {src!r}: {error}") from error
    except Exception as error:  # botocore: access denied, endpoint unreachable, ...
        raise ScoringError(f"SRC {src!r}: cannot list ({error})") from error
    bucket = src[5:].split("/", 1)[0]
    prefix = src[5 + len(bucket):].strip("/")
    rows = []
    for obj in objects:
        key = obj["Key"]
        if key.endswith("/"):
            continue  # a "folder" marker object, not a file
        relative = key[len(prefix):].lstrip("/") if prefix else key
        rows.append(_row(f"s3://{bucket}/{key}", relative, size=int(obj.get("Size", 0))))
    return rows


# ---------------------------------------------------------------------------- per-file stages
def read_files(batch: dict[str, np.ndarray], root: str, max_file_bytes: int,
               endpoint: str | None = None) -> dict[str, np.ndarray]:
    """Ray Data stage: add ``bytes`` (and ``read_s``) for every pending row; never raises."""
    paths, sizes = batch["path"], batch["size"]
    status = np.array(batch["status"], dtype=object)
    errors = np.array(batch["error"], dtype=object)
    contents = np.empty(len(paths), dtype=object)
    contents[:] = [b""] * len(paths)
    seconds = np.zeros(len(paths), dtype=np.float64)
    root_real = os.path.realpath(root) if root and not is_s3(root) else None

    def read_one(index: int) -> None:
        start = time.perf_counter()
        try:
            if int(sizes[index]) > max_file_bytes:
                raise ImageError("too large", f"{int(sizes[index])} bytes exceeds the cap of "
                                 f"{max_file_bytes} bytes: not read")
            contents[index] = _read_one(str(paths[index]), root_real, max_file_bytes, endpoint)
        except ImageError as error:
            status[index], errors[index] = ERROR, str(error)
        except Exception as error:  # any read failure is this file's problem only
            status[index], errors[index] = ERROR, f"unreadable: {_one_line(error)}"
        seconds[index] = time.perf_counter() - start

    pending = [i for i in range(len(paths)) if status[i] != ERROR]
    if pending and is_s3(str(paths[pending[0]])):
        with ThreadPoolExecutor(S3_READ_THREADS) as pool:
            list(pool.map(read_one, pending))
    else:
        for index in pending:
            read_one(index)
    return {**batch, "status": status, "error": errors, "bytes": contents, "read_s": seconds}


def _read_one(path: str, root_real: str | None, max_file_bytes: int,
              endpoint: str | None) -> bytes:
    if is_s3(path):
        return read_s3_object(path, endpoint)
    # Resolve again at read time: a symlink swapped in after listing must not escape either.
    real = os.path.realpath(path)
    if root_real is not None and not _inside(real, root_real):
        raise ImageError("symlink outside SRC", "not followed")
    # O_NONBLOCK: opening a FIFO swapped in since listing returns at once instead of blocking.
    descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not a regular file", "not opened")
        data = handle.read(max_file_bytes + 1)
    if len(data) > max_file_bytes:
        raise ImageError("too large", f"more than {max_file_bytes} bytes: not read")
    return data


def decode_images(batch: dict[str, np.ndarray], max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data stage: ``bytes`` -> ``image`` (N, 32, 32, 3) uint8; never raises."""
    count = len(batch["path"])
    status = np.array(batch["status"], dtype=object)
    errors = np.array(batch["error"], dtype=object)
    images = np.zeros((count, DECODE_SIZE, DECODE_SIZE, 3), dtype=np.uint8)
    seconds = np.zeros(count, dtype=np.float64)
    for index in range(count):
        if status[index] == ERROR:
            continue
        start = time.perf_counter()
        try:
            images[index] = decode_image(batch["bytes"][index], max_pixels)
            status[index] = OK
        except ImageError as error:
            status[index], errors[index] = ERROR, str(error)
        except Exception as error:  # a decoder bug on one file must not end the job
            status[index], errors[index] = ERROR, f"corrupt image: {_one_line(error)}"
        seconds[index] = time.perf_counter() - start
    output = {name: values for name, values in batch.items() if name != "bytes"}
    return {**output, "status": status, "error": errors, "image": images, "decode_s": seconds}


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One encoded image -> (32, 32, 3) uint8 RGB, as training saw its images.

    Raises ``ImageError`` (empty, not an image, too large, corrupt, unsupported). The pixel cap
    is checked from the header, before any pixel data is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty file", "0 bytes")
    # Pillow's own guard, at our cap: open() raises DecompressionBombError above twice the cap
    # and warns above it; our explicit check below turns "above" into an error.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError("not an image", "no image format recognised") from None
    except Image.DecompressionBombError as error:
        raise ImageError("too large", f"{_one_line(error)}: not decoded") from None
    except Exception as error:
        raise ImageError("corrupt image", _one_line(error)) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError("too large", f"{width}x{height} = {width * height} pixels exceeds "
                             f"the cap of {max_pixels}: not decoded")
        try:
            image.draft("RGB", (DECODE_SIZE, DECODE_SIZE))  # JPEG: DCT downscale, >= 32 px
            image.load()  # first: a failed load must surface here, not inside getexif()
            rgb = _to_rgb(image)
        except ImageError:
            raise
        except Exception as error:  # truncated data, bad checksums, decoder errors
            raise ImageError("corrupt image", _one_line(error)) from None
        try:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # a damaged EXIF block does not make the pixels unusable
            orientation = 1
    if rgb.size != (DECODE_SIZE, DECODE_SIZE):
        rgb = rgb.resize((DECODE_SIZE, DECODE_SIZE), Image.Resampling.BILINEAR)
    transpose = _orientation_transpose(orientation)
    if transpose is not None:
        # Transposing after the square resize equals transposing first: cheap, same pixels.
        rgb = rgb.transpose(transpose)
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(image):
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale: scale 0..65535 onto 0..255 (Pillow's convert would clip at 255).
        # Mode "I" (32-bit) is what older Pillows give 16-bit PNGs; it is treated as 16-bit.
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        raise ImageError("unsupported image", "32-bit float pixels have no agreed range")
    # 1, L, P, CMYK, YCbCr -> RGB; RGBA/LA/PA: alpha dropped, as training's convert("RGB").
    # 16-bit RGB(A) PNGs already arrive as 8-bit RGB(A): Pillow keeps each value's high byte.
    return image.convert("RGB")


def _orientation_transpose(orientation: int):
    """The transpose that undoes an EXIF orientation tag (None for 1, "normal")."""
    from PIL import Image

    t = Image.Transpose
    return {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE,
            6: t.ROTATE_270, 7: t.TRANSVERSE, 8: t.ROTATE_90}.get(orientation)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


# ---------------------------------------------------------------------------- model stage
def make_predict_function(model, input_size: int):
    """uint8 (N, 32, 32, 3) -> class probabilities (N, 10): preprocessing + model, compiled once.

    ``data.preprocess_images`` is the function training used, so scaling and resizing match.
    """
    import tensorflow as tf

    from cifar_core.data import preprocess_images

    @tf.function(input_signature=[tf.TensorSpec([None, DECODE_SIZE, DECODE_SIZE, 3], tf.uint8)])
    def predict(images):
        return model(preprocess_images(images, input_size), training=False)

    return lambda images: predict(images).numpy()


def load_model_from_bytes(model_bytes: bytes):
    """An inference-only Keras model from the bytes of a ``model.keras`` file, through the
    project's one loader (``models.load_checkpoint_model``: archive checked, safe_mode on)."""
    from cifar_core.models import load_checkpoint_model

    with tempfile.TemporaryDirectory(prefix="cifar-score-") as folder:
        path = Path(folder, MODEL_FILE)
        path.write_bytes(model_bytes)
        return load_checkpoint_model(path, compile=False)


class Predictor:
    """Ray Data callable class: loads the model once per actor, then scores batches."""

    def __init__(self, model_ref: Any, input_size: int, model_threads: int = 0):
        import ray

        import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
        import tensorflow as tf

        if model_threads:
            tf.config.threading.set_intra_op_parallelism_threads(model_threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)  # actors may share a GPU
        model_bytes = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        self.predict = make_predict_function(load_model_from_bytes(model_bytes), input_size)
        # Trace the function now, so start-up cost is not billed to the first batch.
        self.predict(np.zeros((1, DECODE_SIZE, DECODE_SIZE, 3), np.uint8))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["path"])
        status = np.array(batch["status"], dtype=object)
        errors = np.array(batch["error"], dtype=object)
        classes = np.full((count, 3), "", dtype=object)
        confidences = np.full((count, 3), np.nan, dtype=np.float64)
        seconds = np.zeros(count, dtype=np.float64)
        ok = np.flatnonzero(status == OK)
        if len(ok):
            start = time.perf_counter()
            try:
                probabilities = self.predict(np.ascontiguousarray(batch["image"][ok]))
                top = np.argsort(-probabilities, axis=1, kind="stable")[:, :3]
                classes[ok] = np.asarray(CLASS_NAMES, dtype=object)[top]
                confidences[ok] = np.take_along_axis(probabilities, top, axis=1)
            except Exception as error:  # keep the rows; the summary's error rate shows it
                status[ok], errors[ok] = ERROR, f"prediction failed: {_one_line(error)}"
            seconds[ok] = (time.perf_counter() - start) / len(ok)
        output = {name: values for name, values in batch.items() if name != "image"}
        output.update(status=status, error=errors, predict_s=seconds,
                      predicted_class=classes[:, 0], confidence=confidences[:, 0],
                      top2_class=classes[:, 1], top2_confidence=confidences[:, 1],
                      top3_class=classes[:, 2], top3_confidence=confidences[:, 2])
        return output


# ---------------------------------------------------------------------------- output
def output_uris(out: str, formats: tuple[str, ...]) -> tuple[list[str], str]:
    """(output file URIs, summary URI) for OUT: ``scores.csv`` -> scores.csv and
    scores.summary.json; with both formats, ``scores.csv`` and ``scores.parquet``."""
    stem = out
    for fmt in OUTPUT_FORMATS:
        if out.lower().endswith("." + fmt):
            stem = out[: -len(fmt) - 1]
    if not stem or stem.endswith("/"):
        raise ScoringError(f"OUT {out!r} must name a file, e.g. scores.csv")
    return [f"{stem}.{fmt}" for fmt in formats], f"{stem}.summary.json"


def formats_for(out: str, requested: str | None) -> tuple[str, ...]:
    """Formats from ``--format`` (csv, parquet, both) or else OUT's suffix."""
    if requested == "both":
        return OUTPUT_FORMATS
    if requested:
        return (requested,)
    for fmt in OUTPUT_FORMATS:
        if out.lower().endswith("." + fmt):
            return (fmt,)
    raise ScoringError(f"OUT {out!r} must end in .csv or .parquet (or pass --format)")


class OutputWriter:
    """Streams row batches into temporary files; ``commit`` replaces the outputs atomically.

    A re-run into the same OUT therefore replaces the file (never appends), and a crash leaves
    the previous output intact. s3:// outputs are uploaded in one piece at commit.
    """

    def __init__(self, uris: list[str], columns: list[str], endpoint: str | None = None):
        import pyarrow as pa

        self.uris, self.columns, self.endpoint = uris, columns, endpoint
        self.schema = pa.schema([(name, pa.float64() if name.endswith("confidence")
                                  else pa.string()) for name in columns])
        self.temporary: list[Path] = []
        for uri in uris:
            folder = tempfile.gettempdir() if is_s3(uri) else os.path.dirname(
                os.path.abspath(uri))
            os.makedirs(folder, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(uri),
                                            suffix=".partial")
            os.close(handle)
            self.temporary.append(Path(name))
        self._csv = None
        self._parquet = None
        self.rows = 0

    def write(self, frame) -> None:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        table = pa.Table.from_pandas(frame[self.columns], schema=self.schema,
                                     preserve_index=False)
        for uri, path in zip(self.uris, self.temporary):
            if uri.endswith(".csv"):
                if self._csv is None:
                    self._csv = pyarrow.csv.CSVWriter(str(path), self.schema)
                self._csv.write_table(table)
            else:
                if self._parquet is None:
                    self._parquet = pyarrow.parquet.ParquetWriter(str(path), self.schema)
                self._parquet.write_table(table)
        self.rows += len(frame)

    def commit(self) -> None:
        for writer in (self._csv, self._parquet):
            if writer is not None:
                writer.close()
        for uri, path in zip(self.uris, self.temporary):
            if is_s3(uri):
                upload_file(path, uri, self.endpoint)
                path.unlink()
            else:
                os.replace(path, uri)
        self.temporary = []

    def abort(self) -> None:
        for writer in (self._csv, self._parquet):
            try:
                if writer is not None:
                    writer.close()
            except Exception:
                pass
        for path in self.temporary:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the job
@dataclass
class ScoreSummary:
    """What one scoring job did; written as JSON beside the output."""

    src: str
    outputs: list[str]
    summary_uri: str
    model: dict
    files: int = 0
    ok: int = 0
    errors: int = 0
    error_rate: float = 0.0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    images_per_s: float = 0.0         # files / pipeline seconds (read to last row written)
    pipeline_s: float = 0.0
    first_row_s: float = 0.0          # pipeline start to first row written (actor start-up)
    stage_s: dict[str, float] = field(default_factory=dict)
    labels: dict | None = None        # accuracy + confusion matrix when labels are known
    options: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.files} files, {self.ok} ok, {self.errors} errors "
                f"({self.error_rate:.2%}), {self.images_per_s:.0f} images/s; output in "
                f"{', '.join(self.outputs)} (summary {self.summary_uri})")


def check_output(src: str, out: str) -> None:
    """OUT must not lie inside SRC: a re-run would then score its own previous output."""
    if is_s3(src) != is_s3(out):
        return
    if is_s3(src):
        inside = out.startswith(src.rstrip("/") + "/")
    else:
        inside = _inside(os.path.realpath(os.path.dirname(os.path.abspath(out)) or "."),
                         os.path.realpath(src))
    if inside:
        raise ScoringError(f"OUT {out!r} lies inside SRC {src!r}; write it elsewhere")


def run_pipeline(listing, checkpoint: Checkpoint, model_bytes: bytes, src: str,
                 writer: OutputWriter, options: ScoreOptions, log=print):
    """Run the Ray Data pipeline over ``listing``, streaming rows into ``writer``.

    Returns (stage seconds incl. ``first_row``, the label/prediction/status columns for the
    summary, pipeline seconds). Needs a running Ray (``ray.init``) in this process.
    """
    import pyarrow as pa
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False   # the driver prints one progress line instead
    context.execution_options.preserve_order = True  # output rows follow the sorted listing
    endpoint = s3_endpoint(options.endpoint)
    total = len(listing)
    table = pa.Table.from_pandas(listing, preserve_index=False)
    dataset = ray.data.from_arrow(
        [table.slice(offset, FILES_PER_TASK) for offset in range(0, total, FILES_PER_TASK)])
    # Read and decode run as tasks (Ray fuses the two into one task per block); they reserve
    # decode_cpus each, which also keeps them out of the predictor actors (Ray fuses stages
    # with equal resources), so decoding overlaps prediction and scales on its own.
    dataset = dataset.map_batches(
        read_files, batch_format="numpy", batch_size=None, num_cpus=options.decode_cpus,
        fn_kwargs=dict(root=src, max_file_bytes=options.max_file_bytes, endpoint=endpoint))
    dataset = dataset.map_batches(decode_images, batch_format="numpy", batch_size=None,
                                  num_cpus=options.decode_cpus,
                                  fn_kwargs=dict(max_pixels=options.max_pixels))
    dataset = dataset.map_batches(
        Predictor, batch_format="numpy", batch_size=options.batch_size,
        fn_constructor_kwargs=dict(model_ref=ray.put(model_bytes),
                                   input_size=checkpoint.settings.input_size,
                                   model_threads=options.model_threads),
        compute=ray.data.ActorPoolStrategy(size=options.concurrency),
        num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or None)

    stage = Counter()
    collected = {"label": [], "predicted_class": [], "status": [], "error": []}
    start = last_report = time.perf_counter()
    done = errors = 0
    first_row_s = None
    for frame in dataset.iter_batches(batch_size=None, batch_format="pandas"):
        write_start = time.perf_counter()
        if first_row_s is None:  # mostly the predictor actors' start-up (imports, model load)
            first_row_s = write_start - start
        for column in TIMING_COLUMNS:
            stage[column.removesuffix("_s")] += float(frame[column].sum())
        for column in collected:
            collected[column].extend(frame[column].tolist())
        for column in ["label", "error"] + PREDICTION_COLUMNS:
            if column in frame and not column.endswith("confidence"):
                frame[column] = frame[column].replace("", None)
        writer.write(frame)
        done += len(frame)
        errors += int((frame["status"] == ERROR).sum())
        now = time.perf_counter()
        stage["write"] += now - write_start
        if options.progress_interval_s and now - last_report >= options.progress_interval_s:
            last_report = now
            log(f"cifar score: {done}/{total} files ({done / total:.0%}), "
                f"{done / (now - start):.0f} images/s, {errors} errors")
    stage["first_row"] = first_row_s or 0.0
    return dict(stage), collected, time.perf_counter() - start


@dataclass
class ScoringPlan:
    """Everything checked before any Ray work: the files, the model, where output goes."""

    src: str
    listing: Any                     # DataFrame: path, size, label, status, error
    checkpoint: Checkpoint
    model_bytes: bytes
    outputs: list[str]
    summary_uri: str
    options: ScoreOptions
    list_s: float

    @property
    def has_labels(self) -> bool:
        return bool((self.listing["label"] != "").any())

    @property
    def columns(self) -> list[str]:
        return (["path"] + (["label"] if self.has_labels else []) + PREDICTION_COLUMNS
                + ["status", "error"])


def plan_scoring(src: str, model: str, out: str, options: ScoreOptions = ScoreOptions()
                 ) -> ScoringPlan:
    """List SRC, resolve and safely load MODEL, check OUT. No Ray; raises ``ScoringError``
    (or ``StorageError``) for every whole-job problem, before any output is touched."""
    src = src.rstrip("/") if is_s3(src) else src
    outputs, summary_uri = output_uris(out, options.formats)
    check_output(src, out)
    start = time.perf_counter()
    listing = list_source(src, options.limit, options.endpoint)
    list_s = time.perf_counter() - start
    checkpoint = resolve_checkpoint(model, options.endpoint)
    model_bytes = check_model(checkpoint)
    return ScoringPlan(src, listing, checkpoint, model_bytes, outputs, summary_uri, options,
                       list_s)


def execute(plan: ScoringPlan, log=print) -> ScoreSummary:
    """Run the pipeline for a plan, replace the outputs, write the summary JSON beside them.

    Needs a running Ray (``ray.init`` or ``start_ray``).
    """
    from cifar_core.provenance import provenance

    options = plan.options
    log(f"cifar score: {len(plan.listing)} files under {plan.src}; model "
        f"{plan.checkpoint.settings.model} from {plan.checkpoint.uri}")
    writer = OutputWriter(plan.outputs, plan.columns, options.endpoint)
    try:
        stage, collected, pipeline_s = run_pipeline(plan.listing, plan.checkpoint,
                                                    plan.model_bytes, plan.src, writer,
                                                    options, log)
        if writer.rows != len(plan.listing):  # the promise: N files in, N rows out
            raise RuntimeError(f"internal error: {len(plan.listing)} files listed but "
                               f"{writer.rows} rows produced; output not replaced")
        writer.commit()
    except BaseException:
        writer.abort()
        raise

    status = np.array(collected["status"], dtype=object)
    errors = int((status == ERROR).sum())
    kinds = Counter(str(e).split(":", 1)[0] for e, s in zip(collected["error"], status)
                    if s == ERROR)
    summary = ScoreSummary(
        src=plan.src, outputs=plan.outputs, summary_uri=plan.summary_uri,
        model=plan.checkpoint.describe(), files=len(status), ok=len(status) - errors,
        errors=errors, error_rate=errors / len(status),
        errors_by_kind=dict(sorted(kinds.items())),
        images_per_s=len(status) / pipeline_s, pipeline_s=round(pipeline_s, 3),
        first_row_s=round(stage.pop("first_row"), 3),
        stage_s={"list": round(plan.list_s, 3),
                 **{name: round(value, 3) for name, value in stage.items()}},
        labels=label_summary(collected) if plan.has_labels else None,
        options=asdict(options), provenance=provenance())
    write_text(plan.summary_uri, json.dumps(asdict(summary), indent=1, default=str) + "\n",
               options.endpoint)
    return summary


def score(src: str, model: str, out: str, options: ScoreOptions = ScoreOptions(),
          log=print) -> ScoreSummary:
    """``plan_scoring`` then ``execute``: score every file under SRC with MODEL into OUT."""
    return execute(plan_scoring(src, model, out, options), log)


def label_summary(collected: dict[str, list]) -> dict:
    """Accuracy and confusion matrix over the files whose label is known and which scored ok."""
    from cifar_core.evaluate import classification_summary

    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    pairs = [(index[label], index[predicted]) for label, predicted, status in zip(
        collected["label"], collected["predicted_class"], collected["status"])
        if label and status == OK]
    labelled = sum(1 for label in collected["label"] if label)
    if not pairs:
        return {"labelled_files": labelled, "scored": 0, "accuracy": None}
    y_true, y_pred = (np.array(values) for values in zip(*pairs))
    return {"labelled_files": labelled, "scored": len(pairs),
            **classification_summary(y_true, y_pred)}


# ---------------------------------------------------------------------------- sample export
def export_samples(source: str, count: int, out: str | Path, seed: int = 0) -> list[Path]:
    """Write ``count`` test-split images of the user's CIFAR-10 copy as PNGs named
    ``<class>_<test index>.png`` (classes in turn, so every class appears; lossless, so each
    file is exactly the test image). Test images only: samples are for trying the scorer."""
    from cifar_core.data import encode_png, load_raw

    if count < 1:
        raise ScoringError(f"n={count!r} must be >= 1")
    _, _, x_test, y_test = load_raw(source)
    rng = np.random.default_rng(seed)
    per_class = [list(rng.permutation(np.flatnonzero(y_test == label)))
                 for label in range(len(CLASS_NAMES))]
    available = sum(len(indices) for indices in per_class)
    if count > available:
        raise ScoringError(f"n={count} but the test split of {source!r} has {available} images")
    chosen = []
    while len(chosen) < count:
        for indices in per_class:
            if indices and len(chosen) < count:
                chosen.append(int(indices.pop(0)))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in chosen:
        path = folder / f"{CLASS_NAMES[int(y_test[index])]}_{index:05d}.png"
        path.write_bytes(encode_png(x_test[index]))
        written.append(path)
    return written


def start_ray(address: str | None = None) -> bool:
    """Start (or join) Ray for a job; True if this call started it (the caller shuts it down).

    Without an address the job starts its own private local Ray: on a shared machine, joining
    whatever cluster happens to run would mix jobs.
    """
    import ray

    from cifar_core.provenance import runtime_env_vars

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = dict(address=address, runtime_env={"env_vars": runtime_env_vars()},
                                  log_to_driver=True)
    if address != "local":
        ray.init(**kwargs)
        return True
    kwargs["include_dashboard"] = False
    for attempt in (1, 2):
        try:
            ray.init(**kwargs)
            return True
        except Exception as error:
            # On a loaded machine the raylet can give up on its dashboard agent after a fixed
            # 15 s (ray-project/ray#65983); a fresh local start usually succeeds.
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"cifar: local Ray failed to start ({_one_line(error)}); retrying once",
                  file=sys.stderr, flush=True)
    return True
