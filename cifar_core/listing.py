"""Listing and reading the files a scoring job scores, safely (local folders and ``s3://``).

- **N files in, N rows out.** Every listed file gets one row: ``pending``, or already
  ``error`` when it must not be read (an escaping symlink, a special file, a folder that
  cannot be listed), so no file is silently missing from the output.
- **Safe reading.** Only regular files are opened (a FIFO or device under SRC would block or
  never end). Symlinks are resolved when listed and again when read; one that points outside
  SRC is never followed (error ``symlink outside SRC``). Symlinked folders are not descended
  into (their files are listed where they really are, if inside SRC). Files larger than
  ``max_file_bytes`` are not read, and reads stop at the cap whatever the listing said.
- **Labels.** A file's CIFAR-10 label comes from the nearest folder named like a class, else
  from a ``<class>_*`` file name (as ``cifar export-samples`` writes).
"""

from __future__ import annotations

import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cifar_core import storage
from cifar_core.images import ImageError, one_line
from cifar_core.settings import CLASS_NAMES

OK, ERROR, PENDING = "ok", "error", "pending"
#: Refuse files larger than this without reading them (64 MiB).
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
#: Threads per read task for s3:// objects (each GET waits ~10-50 ms on the network).
S3_READ_THREADS = 16


class ListingError(ValueError):
    """SRC is missing, not a folder, empty or cannot be listed."""


#: Columns of a listing: ``path`` is printable text (for the output), ``source`` the exact
#: bytes of the file's name (to open it: a name need not be UTF-8).
COLUMNS = ["path", "source", "size", "label", "status", "error"]


def list_source(src: str, limit: int | None = None, endpoint: str | None = None):
    """A DataFrame with one row per file under SRC (``COLUMNS``).

    Files that must not be read (escaping symlinks, special files, unlistable folders) are
    already ``error`` here; the rest are ``pending``. Sorted by path; ``limit`` keeps the first N.
    """
    import pandas as pd

    if storage.is_s3(src):
        rows = _list_s3(src, endpoint)
    else:
        root = Path(src)
        if not root.exists():
            raise ListingError(f"SRC {src!r} does not exist")
        if not root.is_dir():
            raise ListingError(f"SRC {src!r} is not a folder")
        rows = _list_local(root)
    if not rows:
        raise ListingError(f"SRC {src!r} holds no files")
    rows.sort(key=lambda row: row["path"])
    if limit is not None:
        rows = rows[:limit]
    listing = pd.DataFrame(rows, columns=COLUMNS)
    listing["size"] = listing["size"].astype("int64")
    return listing


def _row(path: str, relative: str, size: int = 0, error: str = "") -> dict:
    return {"path": printable(path), "source": os.fsencode(path), "size": size,
            "label": label_of(relative) or "", "status": ERROR if error else PENDING,
            "error": error}


def printable(path: str) -> str:
    """A file name as text any writer can store: bytes that are not UTF-8 (which ``os.walk``
    hands back as surrogates) become ``\\xNN`` escapes, so such a file is a row like any other."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def label_of(relative: str) -> str | None:
    """The CIFAR-10 class a file's place names: the nearest folder named like a class, else a
    file name ``<class>_...`` (as ``cifar export-samples`` writes); None when neither."""
    parts = relative.replace("\\", "/").split("/")
    for folder in reversed(parts[:-1]):
        if folder.lower() in CLASS_NAMES:
            return folder.lower()
    prefix = parts[-1].split("_", 1)[0].split(".", 1)[0].lower()
    return prefix if prefix in CLASS_NAMES else None


def inside(path: str, root: str) -> bool:
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
            if os.path.islink(path) and not inside(os.path.realpath(path), root_real):
                rows.append(_row(path, os.path.relpath(path, root),
                                 error="symlink outside SRC: not followed"))
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not inside(target, root_real):
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
        objects = list(storage.iter_s3(src.rstrip("/"), endpoint))
    except storage.StorageError as error:
        raise ListingError(f"SRC {src!r}: {error}") from error
    except storage.s3_errors() as error:  # access denied, endpoint unreachable, ...
        raise ListingError(f"SRC {src!r}: cannot list ({error})") from error
    bucket, prefix = storage.split_s3(src)
    rows = []
    for obj in objects:
        key = obj["Key"]
        if key.endswith("/"):
            continue  # a "folder" marker object, not a file
        relative = key[len(prefix):].lstrip("/") if prefix else key
        rows.append(_row(f"s3://{bucket}/{key}", relative, size=int(obj.get("Size", 0))))
    return rows


def read_files(batch: dict[str, np.ndarray], root: str, max_file_bytes: int,
               endpoint: str | None = None) -> dict[str, np.ndarray]:
    """Ray Data stage: add ``bytes`` (and ``read_s``) for every pending row; never raises."""
    paths, sizes = [os.fsdecode(bytes(s)) for s in batch["source"]], batch["size"]
    status = np.array(batch["status"], dtype=object)
    errors = np.array(batch["error"], dtype=object)
    contents = np.empty(len(paths), dtype=object)
    contents[:] = [b""] * len(paths)
    seconds = np.zeros(len(paths), dtype=np.float64)
    root_real = os.path.realpath(root) if root and not storage.is_s3(root) else None

    down: list[BaseException] = []  # once the store is down, the other reads are not tried

    def read_one(index: int) -> None:
        if down:
            return
        start = time.perf_counter()
        try:
            if int(sizes[index]) > max_file_bytes:
                raise ImageError("too large", f"{int(sizes[index])} bytes exceeds the cap of "
                                 f"{max_file_bytes} bytes: not read")
            contents[index] = _read_one(str(paths[index]), root_real, max_file_bytes, endpoint)
        except ImageError as error:
            status[index], errors[index] = ERROR, str(error)
        except Exception as error:  # any read failure is this file's problem only...
            if storage.unreachable(error):  # ...unless the store itself is down: the job's
                down.append(error)
                raise storage.Unreachable(one_line(error)) from error
            status[index], errors[index] = ERROR, f"unreadable: {one_line(error)}"
        seconds[index] = time.perf_counter() - start

    pending = [i for i in range(len(paths)) if status[i] != ERROR]
    if pending and storage.is_s3(str(paths[pending[0]])):
        with ThreadPoolExecutor(S3_READ_THREADS) as pool:
            list(pool.map(read_one, pending))
    else:
        for index in pending:
            read_one(index)
    return {**batch, "status": status, "error": errors, "bytes": contents, "read_s": seconds}


def _read_one(path: str, root_real: str | None, max_file_bytes: int,
              endpoint: str | None) -> bytes:
    if storage.is_s3(path):
        try:
            return storage.read_bytes(path, endpoint, max_bytes=max_file_bytes)
        except storage.StorageError:
            raise ImageError("too large", f"more than {max_file_bytes} bytes: not read")
    # Resolve again at read time: a symlink swapped in after listing must not escape either.
    real = os.path.realpath(path)
    if root_real is not None and not inside(real, root_real):
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


