"""Publish a report to object storage: objects first, verified, then ``manifest.json`` last.

Layout under ``s3://bucket/prefix``:

    manifest.json                                  written last; the only entry point
    publishes/<publish_id>/report/...              leaderboard.csv, trials.parquet, report.*
    publishes/<publish_id>/metrics/<sweep>/<trial_id>.json     every trial's record
    publishes/<publish_id>/checkpoints/<model>/<trial_id>/...  each family's best checkpoint

Guarantees:

- **All or nothing for readers.** A publish never overwrites an object a manifest points at:
  its objects go under a new ``publishes/<publish_id>/`` (the id is a digest of every object's
  path and SHA-256), and ``manifest.json`` (one atomic PUT) is written only after every object
  was uploaded and verified. A reader that starts from ``manifest.json`` sees the previous
  complete publish or the new complete one, never half of one. Older publishes stay in place
  (delete ``publishes/<id>/`` prefixes no manifest names if the space matters).
- **Newest wins.** The manifest carries ``data_as_of`` (the newest record's finish time) and a
  ``generation``; it is replaced with a conditional PUT (If-Match the ETag just read), so of
  two publishes racing, or run one after the other, an older report never replaces a newer.
- **Checksums.** Each object is sent with its SHA-256 (``ChecksumSHA256``; S3 rejects a body
  that does not match) and checked afterwards with ``head_object(ChecksumMode="ENABLED")``
  against the SHA-256 and, for single-part unencrypted-or-SSE-S3 objects, the ETag (= MD5).
  ``manifest.json`` lists every object with its size, SHA-256 and MD5.
- **Idempotent.** The same report publishes to the same keys with the same bytes: objects
  already present with matching checksums are not sent again, so a re-run after a failure
  uploads only what is missing and then writes the manifest.
- **Keys stay inside the prefix.** Every key component built from a run, trial or model name is
  checked; a name that is not a plain safe component (``../../x``, ``a/b``, empty) is replaced
  by a sanitised form plus a short hash of the original, so it can neither escape the prefix
  nor collide with another name. Every final key is checked once more before use.
- **Retries.** The client comes from ``storage.s3_client``: boto3 "standard" retries, at most
  ``storage.S3_MAX_ATTEMPTS`` attempts per call. Endpoint override for S3-compatible stores;
  credentials only from the usual AWS sources.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cifar_core import storage
from cifar_core.provenance import digest_of, git_commit

MANIFEST = "manifest.json"
PUBLISHES = "publishes"
MANIFEST_FORMAT = 1

_SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}")

OnObject = Callable[[int, str], None]


class PublishError(RuntimeError):
    """A publish could not complete; the previous manifest (if any) is still in place."""


# ---------------------------------------------------------------------------- safe keys
def safe_key_part(name: object) -> str:
    """``name`` if it is a plain key component, else a sanitised form + 8 hex of its hash.

    Plain: starts with a letter or digit, then letters, digits and ``._=+-`` only (so never
    ``.``, ``..``, empty, or containing ``/``).
    """
    text = str(name)
    if _SAFE_PART.fullmatch(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9._=+-]", "_", text).lstrip(".")[:80] or "_"
    return f"{cleaned}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def relative_key(*parts: object) -> str:
    """Join name components into a relative key, each made safe by ``safe_key_part``."""
    return "/".join(safe_key_part(part) for part in parts)


def object_key(prefix: str, relative: str) -> str:
    """``prefix/relative``, refusing any result that is not plainly inside ``prefix``."""
    key = f"{prefix}/{relative}" if prefix else relative
    inside = (key.startswith(prefix + "/") if prefix else True)
    if (not relative or posixpath.normpath(key) != key or key.startswith("/") or not inside
            or any(part in ("", ".", "..") for part in key.split("/"))):
        raise PublishError(f"object key {key!r} is not plainly inside the prefix {prefix!r}")
    return key


def check_destination(destination: str) -> tuple[str, str]:
    """(bucket, prefix) of an s3:// destination whose own prefix has no '.', '..' or '//'."""
    if not storage.is_s3(destination):
        raise PublishError(f"--publish {destination!r}: expected s3://bucket/prefix")
    bucket, prefix = storage.split_s3(destination)
    raw = destination[len("s3://") + len(bucket):].strip("/")
    if raw and any(part in ("", ".", "..") for part in raw.split("/")):
        raise PublishError(f"--publish {destination!r}: the prefix must not contain '.', '..' "
                           "or empty components")
    return bucket, prefix


# ---------------------------------------------------------------------------- publishing
@dataclass
class PublishResult:
    destination: str
    publish_id: str
    manifest_key: str
    uploaded: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


def publish_items(items: dict[str, Path | bytes], destination: str, *,
                  extra: dict | None = None, endpoint: str | None = None, client=None,
                  on_object: OnObject | None = None) -> PublishResult:
    """Upload ``items`` ({relative key: local file or bytes}) then write ``manifest.json``.

    ``extra["data_as_of"]`` orders publishes: a manifest whose data is newer is never replaced
    by an older one, even when two publishes race (compare-and-swap on the manifest's ETag).
    ``on_object(index, key)`` is called after each object is verified (tests use it to cut the
    connection mid-publish). Raises ``PublishError`` on any failure; nothing is then changed
    for readers, and calling again with the same items completes the publish.
    """
    bucket, prefix = check_destination(destination)
    if not items:
        raise PublishError("nothing to publish")
    for relative in items:
        object_key(prefix, relative)  # every key is checked before anything is sent
    digests = {relative: digest_of(source) for relative, source in items.items()}
    listing = json.dumps(sorted((k, d.sha256) for k, d in digests.items()))
    publish_id = hashlib.sha256(listing.encode()).hexdigest()[:16]
    base = f"{PUBLISHES}/{publish_id}"
    result = PublishResult(destination, publish_id, object_key(prefix, MANIFEST))
    objects, done = [], 0
    try:
        client = client or storage.s3_client(endpoint)
        for index, relative in enumerate(sorted(items)):
            key = object_key(prefix, f"{base}/{relative}")
            digest = digests[relative]
            sent = storage.put_verified(client, bucket, key, items[relative], digest)
            (result.uploaded if sent else result.already_present).append(key)
            objects.append({"path": relative, "key": f"{base}/{relative}", "size": digest.size,
                            "sha256": digest.sha256, "md5": digest.md5})
            done = index + 1
            if on_object is not None:
                on_object(index, key)
        result.manifest = {"format": MANIFEST_FORMAT, "publish_id": publish_id, "base": base,
                           "objects": objects, "published_by_commit": git_commit(),
                           **(extra or {})}
        _swap_manifest(client, bucket, result)
    except (*storage.s3_errors(), storage.StorageError, OSError) as error:
        raise PublishError(
            f"publish to {destination} stopped after {done} of {len(items)} objects "
            f"({type(error).__name__}: {error}); manifest.json was not changed, so readers "
            "still see the previous publish. Re-run to complete it.") from error
    return result


def _swap_manifest(client, bucket: str, result: PublishResult, attempts: int = 5) -> None:
    """Make ``result.manifest`` current unless the current one is the same publish or has
    newer data; a conditional PUT (If-Match the ETag read, or If-None-Match for the first)
    makes S3 refuse the write if another publish replaced the manifest in between."""
    manifest, key = result.manifest, result.manifest_key
    for _ in range(attempts):
        current = storage.get_object(client, bucket, key)
        condition = {"IfNoneMatch": "*"}
        if current is not None:
            body, etag = current
            existing = json.loads(body)
            if existing.get("publish_id") == manifest["publish_id"]:
                result.already_present.append(key)
                result.manifest = existing
                return
            if str(existing.get("data_as_of") or "") > str(manifest.get("data_as_of") or ""):
                raise PublishError(
                    f"s3://{bucket}/{key} is a newer publish (data as of "
                    f"{existing.get('data_as_of')}) than this one ({manifest.get('data_as_of')}"
                    f"); it was left in place. This publish's objects are under "
                    f"{manifest['base']}/ (not current).")
            manifest["generation"] = int(existing.get("generation") or 0) + 1
            condition = {"IfMatch": etag}
        else:
            manifest["generation"] = 1
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        try:
            storage.put_verified(client, bucket, key, body, digest_of(body), condition)
        except storage.s3_errors() as error:
            if storage.error_code(error) in ("PreconditionFailed", "412",
                                             "ConditionalRequestConflict"):
                continue  # another publish wrote the manifest meanwhile: look again
            raise
        result.uploaded.append(key)
        return
    raise PublishError(f"s3://{bucket}/{key}: the manifest kept changing under {attempts} "
                       "attempts to replace it; re-run the publish")


# ---------------------------------------------------------------------------- a report's objects
def report_items(report, scratch: Path, endpoint: str | None = None) -> dict[str, Path | bytes]:
    """What a report publishes: its files, every trial's record, each family's best checkpoint.

    ``report`` is a ``cifar_core.report.Report``; checkpoints on S3 are copied into ``scratch``.
    """
    items: dict[str, Path | bytes] = {}
    for name, path in report.files.items():
        items[relative_key("report", name)] = Path(path)
    for record in report.records:
        items[relative_key("metrics", record.sweep, f"{record.trial_id}.json")] = (
            record.to_json().encode())
    for index, (model, record) in enumerate(sorted(report.best_records().items())):
        uri = record.checkpoint_uri
        if not uri or not storage.exists(uri, endpoint):
            raise PublishError(f"{model}: best trial {record.trial_id}'s checkpoint {uri!r} "
                               "does not exist; nothing was published")
        local = Path(uri) if not storage.is_s3(uri) else storage.download_tree(
            uri, scratch / f"checkpoint-{index}", endpoint)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        if not files:
            raise PublishError(f"{model}: checkpoint {uri} is an empty folder")
        for path in files:
            items[relative_key("checkpoints", model, record.trial_id,
                               *path.relative_to(local).parts)] = path
    return items


def publish_report(report, destination: str, *, endpoint: str | None = None, client=None,
                   on_object: OnObject | None = None) -> PublishResult:
    """Publish a built report (tables, report files, metrics, best checkpoints) to S3."""
    check_destination(destination)
    winner = report.winner()
    best = {model: {"trial_id": record.trial_id, "sweep": record.sweep,
                    "test_accuracy": record.test_accuracy,
                    "best_val_accuracy": record.best_val_accuracy,
                    "checkpoint": relative_key("checkpoints", model, record.trial_id)}
            for model, record in sorted(report.best_records().items())}
    with tempfile.TemporaryDirectory(prefix="cifar-publish-") as scratch:
        try:
            items = report_items(report, Path(scratch), endpoint)
        except (*storage.s3_errors(), storage.StorageError, OSError) as error:
            raise PublishError(f"publish to {destination}: cannot gather the report's objects "
                               f"({type(error).__name__}: {error}); nothing was sent") from error
        extra = {"best_checkpoints": best, "data_as_of": data_as_of(report.records),
                 "winner": {"trial_id": winner.trial_id, "sweep": winner.sweep,
                            "model": winner.model} if winner else None}
        return publish_items(items, destination, extra=extra, endpoint=endpoint,
                             client=client, on_object=on_object)


def data_as_of(records) -> str:
    """When the newest record of a report finished (what orders two publishes)."""
    return max((r.finished or (r.provenance or {}).get("created") or "" for r in records),
               default="")


def read_manifest(destination: str, endpoint: str | None = None, client=None) -> dict | None:
    """The current manifest at ``destination``, or None if nothing was published there."""
    bucket, prefix = check_destination(destination)
    try:
        found = storage.get_object(client or storage.s3_client(endpoint), bucket,
                                   object_key(prefix, MANIFEST))
    except storage.s3_errors() as error:
        raise PublishError(f"{destination}: cannot read manifest.json ({error})") from error
    return None if found is None else json.loads(found[0])
