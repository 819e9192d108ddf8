"""CIFAR-10 from any source as uint8 arrays, a seeded stratified split, and tf.data pipelines.

Sources (the ``data`` setting, or the ``CIFAR10_DATA`` environment variable):

- ``keras``: ``keras.datasets.cifar10.load_data()`` (downloads; the default on a cloud machine);
- a directory in CIFAR-10's python-batch format (``data_batch_1..5`` + ``test_batch``, or its
  parent holding ``cifar-10-batches-py``);
- an image-folder directory ``<root>/{train,test}/<class>/*`` of PNG/JPEG files (or its parent
  holding a single such folder, as the shared archive unpacks to ``<dir>/cifar10/...``);
- ``s3://bucket/prefix`` holding either directory form (mirrored into the local cache);
- a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of either form (e.g. the official
  ``cifar-10-python.tar.gz``), unpacked once into the local cache.

Decoded image folders are cached as ``.npz`` under the user's cache folder (60,000 JPEGs take
~15 s to decode on one core; the cached arrays load in well under a second). The cache key
covers every file's name, size and modification time, so an edited folder is decoded again.

The test split is returned separately and is only ever used for the final evaluation.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_core.images import DECODER_VERSION, ImageError, decode_image
from cifar_core.settings import CLASS_NAMES, Settings
from cifar_core.storage import atomic_write_bytes, cache_dir, download_s3_prefix, is_s3

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class DataError(ValueError):
    """The data source is missing, malformed or empty."""


@dataclass
class Cifar10:
    """CIFAR-10 as uint8 images (N, 32, 32, 3) and int labels (N,), split three ways."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def summary(self) -> dict:
        return {"source": self.source, "train": len(self.y_train), "val": len(self.y_val),
                "test": len(self.y_test)}


# ---------------------------------------------------------------------------- raw loading
def load_raw(source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full train and test arrays (x_train, y_train, x_test, y_test) from any source."""
    if source == "keras":
        from tf_keras.datasets import cifar10

        (x_train, y_train), (x_test, y_test) = cifar10.load_data()
        return x_train, y_train.reshape(-1), x_test, y_test.reshape(-1)
    if is_s3(source):
        return load_raw(str(download_s3_prefix(source)))
    root = Path(source)
    if root.is_file() and root.name.endswith(ARCHIVE_SUFFIXES):
        return load_raw(str(_unpack_archive(root)))
    if not root.exists():
        raise DataError(f"data source {source!r} does not exist (expected 'keras', a "
                        "directory or an s3:// URI)")
    if not root.is_dir():
        raise DataError(f"data source {source!r} is not a directory")
    batches = _find_batches_dir(root)
    if batches is not None:
        return _load_batches(batches)
    folder = _find_image_folder(root)
    if folder is not None:
        return _load_image_folder_cached(folder)
    raise DataError(
        f"data source {source!r} has neither CIFAR-10 python batches (data_batch_1..5, "
        "test_batch) nor an image folder (train/<class>/*, test/<class>/*)")


def _unpack_archive(archive: Path) -> Path:
    """Unpack an archive once into the cache (keyed by path, size and mtime); return the folder."""
    import tarfile

    stat = archive.stat()
    key = f"{archive.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    target = cache_dir("archives") / hashlib.sha256(key.encode()).hexdigest()[:24]
    if (target / ".complete").exists():
        return target
    staging = target.with_name(target.name + ".partial")
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")  # "data": no absolute paths, links or ../
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"{archive}: unreadable archive ({error})") from error
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _find_batches_dir(root: Path) -> Path | None:
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "test_batch").exists() or (candidate / "data_batch_1").exists():
            return candidate
    return None


def _find_image_folder(root: Path) -> Path | None:
    if (root / "train").is_dir() or (root / "test").is_dir():
        return root
    children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1 and ((children[0] / "train").is_dir()
                               or (children[0] / "test").is_dir()):
        return children[0]
    return None


def _load_batches(folder: Path):
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    arrays = []
    for split in SPLITS:
        xs, ys = [], []
        for name in names[split]:
            path = folder / name
            if not path.exists():
                raise DataError(f"{folder}: CIFAR-10 batch file {name!r} is missing")
            try:
                with open(path, "rb") as handle:
                    batch = _BatchUnpickler(handle, encoding="bytes").load()
                data, labels = _batch_arrays(batch)
                # Rows are 3072 bytes: 1024 red, then green, then blue, each row-major 32x32.
                xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(labels)
            except Exception as error:
                raise DataError(f"{path}: unreadable CIFAR-10 batch file ({error})") from error
        arrays += [np.concatenate(xs), np.concatenate(ys)]
    x_train, y_train, x_test, y_test = arrays
    _check_labels(y_train, folder)
    return x_train, y_train, x_test, y_test


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batch files and nothing else.

    A batch is a dict of bytes, lists of ints/bytes and one uint8 numpy array; pickle would
    otherwise import and call whatever the file names, so whoever can write the data folder or
    prefix could run code here. Only numpy's array reconstruction (the names numpy 1 and 2
    pickle under, and ``_codecs.encode``, which protocol 2 uses for bytes) may be looked up
    (Python docs, pickle: "Restricting Globals").
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"it references {module}.{name}, which a CIFAR-10 batch never contains "
                "(refused: unpickling it could run code)")
        return super().find_class(module, name)


def _batch_arrays(batch: object) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels int64 (N,)) of an unpickled batch, checked."""
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError("not a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise DataError("b'data' is not a uint8 array of rows of 3072 values")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise DataError(f"b'labels' is not a list of {len(data)} integers")
    return data, np.asarray(labels, dtype=np.int64)


def _image_files(folder: Path, split: str) -> list[tuple[Path, int]]:
    split_dir = folder / split
    if not split_dir.is_dir():
        raise DataError(f"{folder}: image folder has no {split!r} split directory")
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    unknown = sorted(set(present) - set(CLASS_NAMES))
    if unknown:
        raise DataError(f"{split_dir}: unknown class folder(s) {unknown}; CIFAR-10 classes are "
                        f"{list(CLASS_NAMES)}")
    missing = [c for c in CLASS_NAMES if c not in present]
    if missing:
        raise DataError(f"{split_dir}: missing class folder(s) {missing}")
    files = []
    for label, name in enumerate(CLASS_NAMES):
        for path in sorted((split_dir / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                files.append((path, label))
    if not files:
        raise DataError(f"{split_dir}: the {split!r} split holds no .png/.jpg images")
    return files


def _load_image_folder_cached(folder: Path):
    listing = {split: _image_files(folder, split) for split in SPLITS}
    digest = hashlib.sha256(f"{folder.resolve()}\0decoder {DECODER_VERSION}".encode())
    for split in SPLITS:
        for path, label in listing[split]:
            stat = path.stat()
            digest.update(f"{path.name}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    cached = cache_dir("arrays") / f"{digest.hexdigest()[:24]}.npz"
    if cached.exists():
        with np.load(cached) as arrays:
            return (arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])
    arrays = {}
    for split in SPLITS:
        arrays[f"x_{split}"] = np.stack([_read_image(path) for path, _ in listing[split]])
        arrays[f"y_{split}"] = np.array([label for _, label in listing[split]], dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(cached, buffer.getvalue())
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def _read_image(path: Path) -> np.ndarray:
    """One training image file as 32x32 RGB uint8, by the project's one decoder."""
    try:
        return decode_image(path.read_bytes())
    except (ImageError, OSError) as error:
        raise DataError(f"{path}: unreadable image ({error})") from error


def _check_labels(labels: np.ndarray, where: object) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{where}: labels outside 0..9")


# ---------------------------------------------------------------------------- splitting
def stratified_subset(x: np.ndarray, y: np.ndarray, size: int, seed: int):
    """A class-balanced random subset of ``size`` examples (all of them if size >= len)."""
    if size >= len(y):
        return x, y
    from sklearn.model_selection import train_test_split

    x_subset, _, y_subset, _ = train_test_split(x, y, train_size=size, stratify=y,
                                                random_state=seed)
    return x_subset, y_subset


def load_cifar10(settings: Settings) -> Cifar10:
    """Load ``settings.data``, apply ``limit`` and carve the stratified validation split."""
    from sklearn.model_selection import train_test_split

    x_train, y_train, x_test, y_test = load_raw(settings.data)
    for split, labels in (("train", y_train), ("test", y_test)):
        if len(labels) == 0:
            raise DataError(f"data source {settings.data!r}: the {split!r} split is empty")
    if settings.limit is not None:
        x_train, y_train = stratified_subset(x_train, y_train, settings.limit,
                                             settings.split_seed)
        x_test, y_test = stratified_subset(
            x_test, y_test, max(settings.limit // 5, len(CLASS_NAMES)), settings.split_seed)
    num_classes = len(np.unique(y_train))
    val_size = max(int(round(len(y_train) * settings.validation_fraction)), num_classes)
    if val_size >= len(y_train):
        raise DataError(f"{len(y_train)} training images are too few to hold out a validation "
                        f"split of {settings.validation_fraction:.0%} with every class in it")
    x_train, x_val, y_train, y_val = train_test_split(
        x_train, y_train, test_size=val_size, stratify=y_train,
        random_state=settings.split_seed)
    return Cifar10(x_train, y_train, x_val, y_val, x_test, y_test, source=settings.data)


# ---------------------------------------------------------------------------- tf.data
def preprocess_images(images, input_size: int):
    """uint8 batch (N, H, W, 3) -> float32 in [0, 1] at the model's input size.

    Training, evaluation and batch scoring all call this, so images are prepared alike.
    Resizing happens per batch, so no resized copy of the whole set is ever materialised.
    """
    import tensorflow as tf

    images = tf.cast(images, tf.float32) / 255.0
    if images.shape[1] != input_size or images.shape[2] != input_size:
        images = tf.image.resize(images, (input_size, input_size), method="bilinear")
    return images


def make_dataset(x: np.ndarray, y: np.ndarray, settings: Settings, *, training: bool,
                 batch_size: int | None = None):
    """A batched, prefetched tf.data pipeline of (images in [0, 1], one-hot labels).

    Training pipelines reshuffle every epoch from ``settings.seed``. Augmentation runs in the
    model's own preprocessing layers (active only while training), so it runs on the GPU.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
    if training:
        dataset = dataset.shuffle(len(y), seed=settings.seed, reshuffle_each_iteration=True)
    input_size = settings.input_size
    num_classes = len(CLASS_NAMES)
    dataset = dataset.batch(batch_size or settings.batch_size)
    dataset = dataset.map(
        lambda images, labels: (preprocess_images(images, input_size),
                                tf.one_hot(labels, num_classes)),
        num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def export_samples(source: str, count: int, out: str | Path, seed: int = 0) -> list[Path]:
    """Write ``count`` test-split images of the user's CIFAR-10 copy as PNGs named
    ``<class>_<test index>.png`` (classes in turn, so every class appears; lossless, so each
    file is exactly the test image). Test images only: samples are for trying the scorer."""
    from cifar_core.images import encode_png

    if count < 1:
        raise DataError(f"n={count!r} must be >= 1")
    _, _, x_test, y_test = load_raw(source)
    rng = np.random.default_rng(seed)
    per_class = [list(rng.permutation(np.flatnonzero(y_test == label)))
                 for label in range(len(CLASS_NAMES))]
    available = sum(len(indices) for indices in per_class)
    if count > available:
        raise DataError(f"n={count} but the test split of {source!r} has {available} images")
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
