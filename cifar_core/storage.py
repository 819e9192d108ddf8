"""Storage: the layout of everything the jobs write, and every file and object-store call
(URIs, layout names, atomic writes, the local cache, boto3 with bounded retries, the pyarrow
filesystem Ray writes with). A sweep (or fine-tune run), local or ``s3://`` alike:

    <storage>/<name>/sweep.json                      what was asked for, with provenance
    <storage>/<name>/trials/<trial_id>/trial.json    the trial's record (records.py)
    <storage>/<name>/trials/<trial_id>/best/         its best checkpoint (model.keras, ...)
    <storage>/<name>/<ray folders>                   Ray Tune / Train's own state

A training workdir (``train.py``): ``checkpoints/{last,best}/``, ``metrics.jsonl``,
``evaluation.json``, ``settings.json``. Writes never leave a cut file: a local file is
written beside its target, fsynced and renamed; a local folder is staged and swapped; an S3
object is visible only once its upload completes. ``--s3-endpoint``/``AWS_ENDPOINT_URL`` reach
S3-compatible stores; credentials come only from the usual AWS sources.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

# ---------------------------------------------------------------------------- layout names
SWEEP_FILE = "sweep.json"
MLFLOW_DB = "mlflow.db"                 # --tracking mlflow: the default local store
MLFLOW_ARTIFACTS = "mlflow-artifacts"
TENSORBOARD_DIR = "tensorboard"         # cifar finetune --tracking tensorboard: event files
TRIALS_DIR = "trials"
RECORD_FILE = "trial.json"
CHECKPOINTS_DIR = "checkpoints"
BEST, LAST = "best", "last"
MODEL_FILE = "model.keras"
SETTINGS_FILE = "settings.json"
STATE_FILE = "state.json"
PROVENANCE_FILE = "provenance.json"
EVALUATION_FILE = "evaluation.json"
METRICS_FILE = "metrics.jsonl"

#: Bounded retries for every boto3 call ("standard" mode: throttling and transient 5xx).
S3_MAX_ATTEMPTS = 5


class StorageError(RuntimeError):
    """A location is malformed, missing or unreachable."""


#: A sweep or run name: one plain path component, the same as a local folder and an S3 key.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}")


def check_name(name: str, what: str = "name") -> str:
    """A sweep or run name must be one plain component: no '/', '..', '#', '?' or spaces, so
    it can neither leave its storage nor mean different keys to different tools."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise StorageError(f"{what} {name!r}: use letters, digits and . _ = + - only "
                           "(starting with a letter or digit, at most 128 characters)")
    return name


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def trial_uri(sweep_uri: str, trial_id: str, *names: str) -> str:
    """``<sweep>/trials/<trial_id>[/names...]``: where a trial's record and best/ live."""
    return join_uri(sweep_uri, TRIALS_DIR, trial_id, *names)


def parent_uri(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


# ---------------------------------------------------------------------------- URIs and S3
def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3_object(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``("bucket", "key")``, the key byte for byte.

    No URL parsing: ``#`` and ``?`` are ordinary characters in object keys (and in users'
    file and run names); ``urlparse`` would cut the key there.
    """
    bucket, _, key = str(uri).removeprefix("s3://").partition("/")
    if not is_s3(uri) or not bucket or not key:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")`` (no slash at either end)."""
    bucket, _, prefix = str(uri).removeprefix("s3://").partition("/")
    if not is_s3(uri) or not bucket:
        raise StorageError(f"{uri!r} is not an s3://bucket/prefix URI")
    return bucket, prefix.strip("/")


def s3_endpoint(endpoint: str | None = None) -> str | None:
    """The endpoint override in force (``endpoint``, else ``AWS_ENDPOINT_URL``), checked."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    return None if endpoint is None else check_endpoint(endpoint)


def check_endpoint(endpoint: str) -> str:
    """An S3 endpoint must be an http(s)://host[:port] URL: say so before anything connects."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StorageError(f"--s3-endpoint {endpoint!r} must be an http:// or https:// URL, "
                           "e.g. http://127.0.0.1:9000")
    return endpoint


_S3_CLIENTS: dict[str | None, object] = {}


def s3_client(endpoint: str | None = None):
    """A boto3 S3 client (one per process and endpoint: clients are thread-safe and cost
    ~50 ms to build) with standard bounded retries and the optional endpoint override."""
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint(endpoint)
    if endpoint not in _S3_CLIENTS:
        config = Config(retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
                        connect_timeout=10, read_timeout=60, max_pool_connections=32)
        _S3_CLIENTS[endpoint] = boto3.client("s3", endpoint_url=endpoint, config=config)
    return _S3_CLIENTS[endpoint]


def s3_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a boto3 call raises (so callers can catch them without importing it)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def error_code(error: BaseException) -> str | None:
    """S3's error code of a failed call ("NoSuchKey", "PreconditionFailed", "404", ...)."""
    # requests' exceptions (MLflow's client) carry response=None
    return (getattr(error, "response", None) or {}).get("Error", {}).get("Code")


class Unreachable(StorageError):
    """The store stopped answering (after boto3's retries): the job stops, nothing is lost."""

    MARK = "the object store stopped answering"

    def __init__(self, detail: str):
        super().__init__(f"{self.MARK}: {detail}")


def unreachable(error: object) -> bool:
    """Is ``error`` (or what caused it, through Ray's wrapping too) the store being down,
    rather than a problem with one object? (Connection refused or timed out, 5xx.)"""
    from botocore.exceptions import ConnectionError as Refused, HTTPClientError

    original = error
    while isinstance(error, BaseException) and not (isinstance(
            error, (Unreachable, Refused, HTTPClientError)) or error_code(error) in (
            "500", "502", "503", "504", "InternalError", "ServiceUnavailable") or (
            isinstance(error, OSError) and "NETWORK_CONNECTION" in str(error))):  # pyarrow's
        error = error.__cause__ or error.__context__ or getattr(error, "cause", None)
    # Ray hands a task's exception back as text (RayTaskError): the mark is what survives.
    return isinstance(error, BaseException) or Unreachable.MARK in str(original)


def pyarrow_filesystem(uri: str, endpoint: str | None = None):
    """The (filesystem, path) pair Ray's ``RunConfig(storage_filesystem=...)`` wants; local
    paths give ``(None, absolute path)``, letting Ray use its default."""
    if not is_s3(uri):
        return None, str(Path(uri).resolve())
    import pyarrow.fs

    bucket, key = split_s3(uri)
    kwargs = {}
    endpoint = s3_endpoint(endpoint)
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs = dict(endpoint_override=parts.netloc, scheme=parts.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pyarrow.fs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def filesystem(uri: str, endpoint: str | None = None):
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    import pyarrow.fs

    fs, path = pyarrow_filesystem(uri, endpoint)
    return (fs or pyarrow.fs.LocalFileSystem()), path


def as_uri(uri_like: str, storage: str) -> str:
    """A path Ray reports inside ``storage``'s filesystem (it strips "s3://") as a URI."""
    return ("s3://" + uri_like.removeprefix("s3://")) if is_s3(storage) else uri_like


def cache_dir(*parts: str) -> Path:
    """A per-user cache folder (``CIFAR_FLEET_CACHE``, default ~/.cache/cifar-fleet)."""
    root = Path(os.environ.get("CIFAR_FLEET_CACHE") or Path.home() / ".cache" / "cifar-fleet")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------- local atomicity
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` so that a reader (or a crash) sees the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written folder into place; a crash leaves the old or the new, never half."""
    old = target.with_name("." + target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def copy_dir(source: Path, target: Path) -> None:
    """Copy a folder onto ``target`` atomically (staged beside it, then swapped)."""
    staging = target.with_name("." + target.name + ".copy")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    replace_dir(staging, target)


# ---------------------------------------------------------------------------- uniform file access
def write_text(uri: str, text: str, endpoint: str | None = None) -> None:
    write_bytes(uri, text.encode(), endpoint)


def read_text(uri: str, endpoint: str | None = None) -> str:
    return read_bytes(uri, endpoint).decode()


def write_bytes(uri: str, data: bytes, endpoint: str | None = None) -> None:
    if not is_s3(uri):
        return atomic_write_bytes(uri, data)
    bucket, key = split_s3_object(uri)
    s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=data)  # visible when complete


def read_bytes(uri: str, endpoint: str | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes at ``uri``; more than ``max_bytes`` raises ``StorageError`` (read stops there)."""
    if is_s3(uri):
        bucket, key = split_s3_object(uri)
        extra = {"Range": f"bytes=0-{max_bytes}"} if max_bytes is not None else {}
        try:
            body = s3_client(endpoint).get_object(Bucket=bucket, Key=key, **extra)["Body"]
        except s3_errors() as error:
            if error_code(error) != "InvalidRange":  # S3's answer to a range of an empty object
                raise
            return b""
        data = body.read() if max_bytes is None else body.read(max_bytes + 1)
    else:
        with open(uri, "rb") as handle:
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise StorageError(f"{uri}: more than {max_bytes} bytes")
    return data


def exists(uri: str, endpoint: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint)
    return fs.get_file_info(path).type.name != "NotFound"


def list_files(uri: str, endpoint: str | None = None) -> list[str]:
    """Every file below ``uri`` (recursive, one listing), as URIs of the same kind, sorted."""
    if is_s3(uri):
        bucket = split_s3(uri)[0]
        return sorted(f"s3://{bucket}/{o['Key']}" for o in iter_s3(uri, endpoint)
                      if not o["Key"].endswith("/"))
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(uri)
                  for name in names)


def find_files(uri: str, name: str, endpoint: str | None = None) -> list[str]:
    return [f for f in list_files(uri, endpoint) if f.rsplit("/", 1)[-1] == name]


def read_many(uris: list[str], endpoint: str | None = None) -> list[bytes | BaseException]:
    """The bytes of each URI, 16 read at a time; a failed read is its exception, in place."""
    def read(uri: str) -> bytes | BaseException:
        try:
            return read_bytes(uri, endpoint)
        except Exception as error:
            return error

    with ThreadPoolExecutor(16 if any(is_s3(u) for u in uris) else 1) as pool:
        return list(pool.map(read, uris))


# ---------------------------------------------------------------------------- folders
def iter_s3(uri: str, endpoint: str | None = None):
    """The objects under an s3:// prefix, page by page (1,000 keys a request), streamed."""
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint)
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            yield from page.get("Contents", [])
    except client.exceptions.NoSuchBucket as error:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from error


def check_bucket(uri: str, endpoint: str | None = None) -> None:
    """``StorageError`` unless the bucket of ``uri`` exists and answers."""
    try:
        s3_client(endpoint).head_bucket(Bucket=split_s3(uri)[0])
    except s3_errors() as error:
        raise StorageError(f"bucket of {uri} is missing or not reachable ({error})") from None


def download_s3_prefix(uri: str, endpoint: str | None = None, workers: int = 16) -> Path:
    """Mirror an s3:// prefix into the local cache (keyed by URI and ETags, so a changed
    object is fetched again; a marker file marks it whole) and return the local folder."""
    objects = list(iter_s3(uri, endpoint))
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
        local = (staging / obj["Key"][len(prefix):].lstrip("/")).resolve()
        if staging.resolve() not in local.parents:  # a key like "../x" must not escape
            raise StorageError(f"{uri}: object key {obj['Key']!r} escapes the prefix")
        local.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj["Key"], str(local))

    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fetch, [o for o in objects if not o["Key"].endswith("/")]))
        (staging / ".complete").touch()
        try:  # the target only ever appears whole, so it is never deleted (others read it)
            os.rename(staging, target)
        except OSError:  # another process (a second Train worker) finished the same copy first
            if not (target / ".complete").exists():
                raise StorageError(f"{uri}: {target} is incomplete; delete it") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download_s3_file(uri: str, endpoint: str | None = None) -> Path:
    """Fetch one s3:// object into the local cache (keyed by URI and ETag); return its path."""
    bucket, key = split_s3_object(uri)
    client = s3_client(endpoint)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except s3_errors() as error:
        raise StorageError(f"{uri}: cannot read this object ({error})") from error
    digest = hashlib.sha256(f"{uri}\0{head.get('ETag', '')}".encode()).hexdigest()[:24]
    target = cache_dir("s3-files", digest) / Path(key).name
    if not target.exists():
        # A name of its own per download: a host's Train workers fetch the same weights at
        # once, and a shared ".partial" name was renamed away under one (a CI run lost it).
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as staging:
            client.download_file(bucket, key, f"{staging}/{target.name}")
            os.replace(f"{staging}/{target.name}", target)
    return target


def upload_file(local: str | Path, uri: str, endpoint: str | None = None) -> None:
    """Copy one local file to an s3:// URI (visible only once the whole upload completes)."""
    s3_client(endpoint).upload_file(str(local), *split_s3_object(uri))


def upload_tree(local: str | Path, uri: str, endpoint: str | None = None) -> None:
    """Make the folder at ``uri`` hold exactly the files of ``local``. Local: staged and
    swapped (a crash leaves the old folder or the new). S3: every new file is uploaded first,
    then the objects the new folder lacks are deleted (a crash never leaves a partial set)."""
    local = Path(local)
    if not is_s3(uri):
        copy_dir(local, Path(uri))
        return
    files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()}
    for relative, path in files.items():
        upload_file(path, join_uri(uri, relative), endpoint)
    bucket, prefix = split_s3(uri)
    stale = [o["Key"] for o in iter_s3(uri, endpoint)
             if o["Key"][len(prefix):].lstrip("/") not in files]
    client = s3_client(endpoint)
    for start in range(0, len(stale), 1000):  # DeleteObjects takes 1,000 keys a call
        client.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": key} for key in stale[start:start + 1000]], "Quiet": True})


def download_tree(uri: str, local: str | Path, endpoint: str | None = None) -> Path:
    """Copy a folder at ``uri`` (local or s3://) into the local folder ``local``."""
    import pyarrow.fs

    fs, path = filesystem(uri, endpoint)
    Path(local).mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(Path(local).resolve()), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return Path(local)


# ---------------------------------------------------------------------------- verified objects
MISSING = ("404", "NoSuchKey", "NotFound")  # S3's codes for "no such object"


def head_object(client, bucket: str, key: str) -> dict | None:
    """The object's metadata with checksums, or None."""
    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except s3_errors() as error:
        if error_code(error) in MISSING:
            return None
        raise


def mismatch(head: dict, digest) -> str | None:
    """None if a stored object (its ``head_object``) matches ``digest``, else what differs."""
    if head.get("ContentLength") != digest.size:
        return f"size {head.get('ContentLength')} != {digest.size}"
    checked = False
    stored_sha = head.get("ChecksumSHA256")
    if stored_sha:
        if stored_sha != digest.sha256_base64:
            return f"SHA-256 {stored_sha} != {digest.sha256_base64}"
        checked = True
    etag = str(head.get("ETag", "")).strip('"')
    # A single-part object's ETag is its MD5 unless KMS-encrypted or multipart ('-N' suffix).
    if etag and "-" not in etag and head.get("ServerSideEncryption") != "aws:kms":
        if etag != digest.md5:
            return f"ETag {etag} != MD5 {digest.md5}"
        checked = True
    if not checked:
        return "the store returned neither a SHA-256 checksum nor an MD5 ETag to verify"
    return None


def put_verified(client, bucket: str, key: str, source: Path | bytes, digest,
                 condition: dict | None = None) -> bool:
    """Upload unless an identical object is there, then verify it; True if it was sent. The
    body goes with its SHA-256 (S3 rejects a mismatch); ``condition`` (``{"IfMatch": etag}``,
    ``{"IfNoneMatch": "*"}``) makes S3 refuse the PUT with 412 if the object changed."""
    import mimetypes

    head = head_object(client, bucket, key)
    if head is not None and mismatch(head, digest) is None:
        return False
    arguments = dict(Bucket=bucket, Key=key,
                     ContentType=mimetypes.guess_type(key)[0] or "application/octet-stream",
                     ChecksumAlgorithm="SHA256", ChecksumSHA256=digest.sha256_base64,
                     Metadata={"sha256": digest.sha256}, **(condition or {}))
    if isinstance(source, bytes):
        client.put_object(Body=source, **arguments)
    else:
        with open(source, "rb") as body:  # seekable, so botocore can rewind on a retry
            client.put_object(Body=body, **arguments)
    head = head_object(client, bucket, key)
    problem = "it is missing after the upload" if head is None else mismatch(head, digest)
    if problem:
        raise StorageError(f"s3://{bucket}/{key}: verification failed after upload: {problem}")
    return True


def get_object(client, bucket: str, key: str) -> tuple[bytes, str] | None:
    """(body, ETag) of an object, or None if there is none."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except s3_errors() as error:
        if error_code(error) in MISSING:
            return None
        raise
    return response["Body"].read(), response["ETag"]
