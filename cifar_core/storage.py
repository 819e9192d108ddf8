"""Storage paths and object-store access, local and ``s3://`` alike.

One module owns how URIs are parsed, where the local cache lives and how S3 is reached, so the
rest of the code never builds a boto3 client or a pyarrow filesystem of its own.

S3-compatible stores (MinIO, moto in the tests) are reached through an endpoint override: the
``--s3-endpoint`` option of the jobs, or the standard ``AWS_ENDPOINT_URL`` environment variable,
which boto3 honours by itself. Credentials come only from the usual AWS sources (environment,
shared config, instance profile); nothing here reads or writes them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

#: Bounded retries with back-off for every boto3 call ("standard" mode: throttling and
#: transient 5xx errors are retried, at most this many attempts in all).
S3_MAX_ATTEMPTS = 5


class StorageError(RuntimeError):
    """An object-store location is malformed, missing or unreachable."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (no trailing slash)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.strip("/")


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def s3_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint: str | None = None):
    """A boto3 S3 client with standard bounded retries and the optional endpoint override."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
                    connect_timeout=10, read_timeout=60)
    return boto3.client("s3", endpoint_url=s3_endpoint(endpoint), config=config)


def pyarrow_filesystem(uri: str, endpoint: str | None = None):
    """The (filesystem, path) pair Ray's ``RunConfig(storage_filesystem=...)`` wants.

    Local paths return ``(None, absolute path)``, letting Ray use its default.
    """
    if not is_s3(uri):
        return None, str(Path(uri).resolve())
    import pyarrow.fs

    bucket, key = split_s3(uri)
    kwargs = {}
    if s3_endpoint(endpoint):
        parsed = urlparse(s3_endpoint(endpoint))
        kwargs = dict(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pyarrow.fs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def cache_dir(*parts: str) -> Path:
    """A per-user cache folder (``CIFAR_FLEET_CACHE``, default ~/.cache/cifar-fleet)."""
    root = Path(os.environ.get("CIFAR_FLEET_CACHE") or Path.home() / ".cache" / "cifar-fleet")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def list_s3(uri: str, endpoint: str | None = None) -> list[dict]:
    """Every object under an s3:// prefix: dicts with Key, Size, ETag."""
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint)
    paginator = client.get_paginator("list_objects_v2")
    objects = []
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            objects.extend(page.get("Contents", []))
    except client.exceptions.NoSuchBucket as error:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from error
    return objects


def download_s3_prefix(uri: str, endpoint: str | None = None, workers: int = 16) -> Path:
    """Mirror an s3:// prefix into the local cache and return the local folder.

    The cache entry is keyed by the URI and the objects' ETags, so a changed object is fetched
    again, and completed with a marker file so an interrupted download is never mistaken for a
    whole one.
    """
    objects = list_s3(uri, endpoint)
    if not objects:
        raise StorageError(f"{uri}: no objects under this prefix")
    digest = hashlib.sha256(uri.encode())
    for obj in sorted(objects, key=lambda o: o["Key"]):
        digest.update(f"{obj['Key']}\0{obj.get('ETag', '')}\0".encode())
    target = cache_dir("s3") / digest.hexdigest()[:24]
    if (target / ".complete").exists():
        return target
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))

    def fetch(obj: dict) -> None:
        relative = obj["Key"][len(prefix):].lstrip("/") if prefix else obj["Key"]
        local = (staging / relative).resolve()
        if staging.resolve() not in local.parents:  # a key like "../x" must not escape
            raise StorageError(f"{uri}: object key {obj['Key']!r} escapes the prefix")
        local.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj["Key"], str(local))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fetch, [o for o in objects if not o["Key"].endswith("/")]))
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def download_s3_file(uri: str, endpoint: str | None = None) -> Path:
    """Fetch one s3:// object into the local cache (keyed by URI and ETag); return its path."""
    bucket, key = split_s3(uri)
    client = s3_client(endpoint)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as error:  # botocore raises a generic ClientError for 403/404
        raise StorageError(f"{uri}: cannot read this object ({error})") from error
    digest = hashlib.sha256(f"{uri}\0{head.get('ETag', '')}".encode()).hexdigest()[:24]
    target = cache_dir("s3-files", digest) / Path(key).name
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        client.download_file(bucket, key, str(partial))
        os.replace(partial, target)
    return target


def upload_dir(local: str | Path, uri: str, endpoint: str | None = None) -> None:
    """Copy a local folder to an s3:// prefix (used for test fixtures and staging)."""
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint)
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            key = "/".join(filter(None, [prefix, path.relative_to(local).as_posix()]))
            client.upload_file(str(path), bucket, key)


# ---------------------------------------------------------------------------- uniform file access
# Local paths and s3:// URIs through one pyarrow filesystem, the same kind Ray Tune writes with.
def filesystem(uri: str, endpoint: str | None = None):
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    import pyarrow.fs

    fs, path = pyarrow_filesystem(uri, endpoint)
    return (fs or pyarrow.fs.LocalFileSystem()), path


def write_text(uri: str, text: str, endpoint: str | None = None) -> None:
    fs, path = filesystem(uri, endpoint)
    if not is_s3(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def read_text(uri: str, endpoint: str | None = None) -> str:
    fs, path = filesystem(uri, endpoint)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def exists(uri: str, endpoint: str | None = None) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri, endpoint)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def find_files(uri: str, name: str, endpoint: str | None = None) -> list[str]:
    """Every file called ``name`` anywhere below ``uri``, as URIs of the same kind."""
    import pyarrow.fs

    fs, path = filesystem(uri, endpoint)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return []
    found = sorted(i.path for i in infos
                   if i.type == pyarrow.fs.FileType.File and i.base_name == name)
    if is_s3(uri):
        return ["s3://" + p for p in found]
    return found


def upload_tree(local: str | Path, uri: str, endpoint: str | None = None) -> None:
    """Copy a local folder to ``uri`` (local or s3://), replacing files of the same name."""
    import pyarrow.fs

    fs, path = filesystem(uri, endpoint)
    if not is_s3(uri):
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(local, path)
        return
    pyarrow.fs.copy_files(str(Path(local).resolve()), path,
                          source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)


def download_tree(uri: str, local: str | Path, endpoint: str | None = None) -> Path:
    """Copy a folder at ``uri`` (local or s3://) into the local folder ``local``."""
    import pyarrow.fs

    fs, path = filesystem(uri, endpoint)
    Path(local).mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(Path(local).resolve()), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return Path(local)


def upload_file(local: str | Path, uri: str, endpoint: str | None = None) -> None:
    """Copy one local file to an s3:// URI. S3 makes the object visible only once the upload
    (multipart for large files) completes, so readers never see half a file."""
    bucket, key = split_s3_object(uri)
    s3_client(endpoint).upload_file(str(local), bucket, key)


def split_s3_object(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``("bucket", "key")`` keeping the key byte for byte.

    ``split_s3`` parses with urlparse, which would cut a key at '#' or '?'; both are legal in
    object keys (and common in users' file names).
    """
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    bucket, key = uri[5:].split("/", 1)
    if not bucket or not key:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


def read_s3_object(uri: str, endpoint: str | None = None) -> bytes:
    """The bytes of one s3:// object (a cached client per process and endpoint)."""
    bucket, key = split_s3_object(uri)
    return _cached_s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()


_S3_CLIENTS: dict[str | None, object] = {}


def _cached_s3_client(endpoint: str | None = None):
    # boto3 clients are thread-safe; building one costs ~50 ms, too much per object.
    key = s3_endpoint(endpoint)
    if key not in _S3_CLIENTS:
        _S3_CLIENTS[key] = s3_client(endpoint)
    return _S3_CLIENTS[key]
