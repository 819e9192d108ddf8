"""Publishing (cifar_core/publish.py): newest wins, races, and S3 errors as publish errors.

The publish path's upload, verification and cut-connection tests run on the tune smoke
sweep in test_report.py; these use small hand-made reports over a real checkpoint folder.
"""

from __future__ import annotations

import time

import pytest

from cifar_core import storage
from cifar_core.publish import MANIFEST, PublishError, publish_report, read_manifest
from cifar_core.records import COMPLETED, TrialRecord
from cifar_core.report import build_report


def _report(trained_run, out, finished: str, val: float):
    record = TrialRecord(
        trial_id=f"M1-{val:.2f}", sweep="s", kind="tune", model="M1",
        settings={"model": "M1", "data": "d", "seed": 0}, settings_hash="h", status=COMPLETED,
        stop_reason="completed", epochs_run=1, best_val_accuracy=val, test_accuracy=val,
        checkpoint_uri=str(trained_run / "checkpoints" / "best"), data={"val": 50},
        finished=finished)
    return build_report([record], out)


def test_an_older_report_never_replaces_a_newer_manifest(trained_run, tmp_path, s3_bucket):
    destination = f"s3://{s3_bucket}/pub"
    newer = _report(trained_run, tmp_path / "new", "2026-12-01T11:00:00+00:00", 0.6)
    older = _report(trained_run, tmp_path / "old", "2026-12-01T10:00:00+00:00", 0.5)
    first = publish_report(newer, destination)
    assert first.manifest["generation"] == 1
    with pytest.raises(PublishError, match="newer publish"):
        publish_report(older, destination)
    manifest = read_manifest(destination)
    assert manifest["publish_id"] == first.publish_id and manifest["generation"] == 1
    again = publish_report(newer, destination)  # the same publish again: a no-op
    assert again.uploaded == [] and read_manifest(destination)["generation"] == 1


def test_two_publishes_racing_cannot_leave_the_older_one_current(trained_run, tmp_path,
                                                                 s3_bucket, moto_endpoint):
    """The older publish reads the manifest, then a newer publish replaces it before the
    older one's PUT: the conditional PUT (If-Match) is refused and the older one stops."""
    destination = f"s3://{s3_bucket}/race"
    older = _report(trained_run, tmp_path / "old", "2026-12-01T10:00:00+00:00", 0.5)
    newer = _report(trained_run, tmp_path / "new", "2026-12-01T11:00:00+00:00", 0.6)
    seed = _report(trained_run, tmp_path / "seed", "2026-12-01T09:00:00+00:00", 0.4)
    publish_report(seed, destination)  # there is a manifest to race on
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=moto_endpoint,
                          config=Config(retries={"max_attempts": 1}))
    raced = []

    def newer_publishes_first(params, **_):
        if params["Key"].endswith(MANIFEST) and not raced:
            raced.append(publish_report(newer, destination))  # another process, in effect

    client.meta.events.register("provide-client-params.s3.PutObject", newer_publishes_first)
    with pytest.raises(PublishError, match="newer publish"):
        publish_report(older, destination, client=client)
    assert raced, "the race was not staged"
    manifest = read_manifest(destination)
    assert manifest["publish_id"] == raced[0].publish_id
    assert manifest["generation"] == 2 and manifest["data_as_of"].startswith("2026-12-01T11")


def test_s3_errors_in_publish_are_publish_errors(trained_run, tmp_path):
    from moto.server import ThreadedMotoServer

    from tests.conftest import _free_port

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    storage.s3_client(endpoint).create_bucket(Bucket="pub")
    report = _report(trained_run, tmp_path / "r", "2026-12-01T10:00:00+00:00", 0.5)
    server.stop()  # the outage
    started = time.monotonic()
    with pytest.raises(PublishError, match="manifest.json was not changed"):
        publish_report(report, "s3://pub/x", endpoint=endpoint)
    with pytest.raises(PublishError, match="cannot read manifest.json"):
        read_manifest("s3://pub/x", endpoint=endpoint)
    assert time.monotonic() - started < 120
