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
#: A read task's block: at most this many files and this many bytes of them (a block of 256
#: files at the 64 MiB file cap would otherwise hold 16 GiB in one task).
FILES_PER_TASK = 256
BLOCK_BYTES = 64 * 2**20


class ListingError(ValueError):
    """SRC is missing, not a folder, empty or cannot be listed."""


#: Columns of a listing: ``path`` is printable text (for the output), ``source`` the exact
#: bytes of the file's name (to open it: a name need not be UTF-8).
COLUMNS = ["path", "source", "size", "label", "status", "error"]


def list_source(src: str, limit: int | None = None, endpoint: str | None = None):
    """A DataFrame with one row per file under SRC (``COLUMNS``), sorted by path; ``limit``
    keeps the first N. For small folders and tests: a scoring job streams ``iter_source``."""
    import pandas as pd

    check_source(src, endpoint)
    rows = sorted(iter_source(src, endpoint), key=lambda row: row["path"])[:limit]
    listing = pd.DataFrame(rows, columns=COLUMNS)
    listing["size"] = listing["size"].astype("int64")
    return listing


def check_source(src: str, endpoint: str | None = None) -> None:
    """``ListingError`` unless SRC exists, is a folder (or s3:// prefix) and holds a file.
    Stops at the first file, so it costs the same for ten files or a million."""
    if not storage.is_s3(src):
        root = Path(src)
        if not root.exists():
            raise ListingError(f"SRC {src!r} does not exist")
        if not root.is_dir():
            raise ListingError(f"SRC {src!r} is not a folder")
    if next(iter_source(src, endpoint), None) is None:
        raise ListingError(f"SRC {src!r} holds no files")


def iter_source(src: str, endpoint: str | None = None):
    """Row dicts (``COLUMNS``), one per file under SRC, streamed in a fixed order: a local
    folder walked with each folder's entries sorted by name, an s3:// prefix in key order,
    1,000 keys a request. Files that must not be read (escaping symlinks, special files,
    unlistable folders) are already ``error``; the rest are ``pending``. Nothing is held but
    the folder being walked, so memory does not grow with the number of files."""
    if storage.is_s3(src):
        yield from _iter_s3(src, endpoint)
    else:
        yield from _iter_local(Path(src))


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


def _iter_local(root: Path):
    root_real = os.path.realpath(root)
    unlistable_rows: list[dict] = []

    def unlistable(error: OSError) -> None:
        # A folder we cannot list still gets a row, so its files are not silently missing.
        path = error.filename or "?"
        unlistable_rows.append(_row(str(path), os.path.relpath(path, root),
                                    error=f"unreadable folder: {error.strerror or error}"))

    # followlinks=False: a symlinked folder is never descended into (no loops, no escapes).
    for folder, folders, files in os.walk(root, followlinks=False, onerror=unlistable):
        yield from unlistable_rows
        unlistable_rows.clear()
        folders.sort()  # walked in name order: the same run after run
        for name in folders:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not inside(os.path.realpath(path), root_real):
                yield _row(path, os.path.relpath(path, root),
                           error="symlink outside SRC: not followed")
        for name in sorted(files):
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not inside(target, root_real):
                    yield _row(path, relative, error="symlink outside SRC: not followed")
                    continue
            try:
                info = os.stat(path)  # follows a symlink that stays inside SRC
            except OSError as error:
                yield _row(path, relative, error=f"unreadable: {error.strerror}")
                continue
            if not stat.S_ISREG(info.st_mode):
                yield _row(path, relative, error="not a regular file: not opened")
                continue
            yield _row(path, relative, size=info.st_size)
    yield from unlistable_rows


def _iter_s3(src: str, endpoint: str | None):
    bucket, prefix = storage.split_s3(src)
    try:
        for obj in storage.iter_s3(src.rstrip("/"), endpoint):
            key = obj["Key"]
            if key.endswith("/"):
                continue  # a "folder" marker object, not a file
            relative = key[len(prefix):].lstrip("/") if prefix else key
            yield _row(f"s3://{bucket}/{key}", relative, size=int(obj.get("Size", 0)))
    except storage.StorageError as error:
        raise ListingError(f"SRC {src!r}: {error}") from error
    except storage.s3_errors() as error:  # access denied, endpoint unreachable, ...
        if storage.unreachable(error):  # the store is down: the job's problem, not SRC's
            raise storage.Unreachable(f"listing {src}: {one_line(error)}") from error
        raise ListingError(f"SRC {src!r}: cannot list ({error})") from error


def blocks(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, end) of consecutive blocks of files: <= FILES_PER_TASK files, and <= BLOCK_BYTES
    of them unless one file alone is larger."""
    found, start, held = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= FILES_PER_TASK or held + size > BLOCK_BYTES):
            found.append((start, index))
            start, held = index, 0
        held += size
    return found + [(start, len(sizes))] if sizes else found


def read_files(batch: dict[str, np.ndarray], root: str, max_file_bytes: int,
               endpoint: str | None = None):
    """Ray Data stage: add ``bytes`` (and ``read_s``) for every pending row; never raises.
    Yields one batch per ``blocks`` range, so a task holds at most BLOCK_BYTES of files
    beyond what Ray Data has already taken (it cuts blocks at ``target_max_block_size``)."""
    sizes = [s if s <= max_file_bytes else 0 for s in np.asarray(batch["size"]).tolist()]
    for start, end in blocks(sizes):
        yield _read_block({name: values[start:end] for name, values in batch.items()}, root,
                          max_file_bytes, endpoint)


def _read_block(batch: dict[str, np.ndarray], root: str, max_file_bytes: int,
                endpoint: str | None) -> dict[str, np.ndarray]:
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


