"""Storage (cifar_core/storage.py): names and URIs, atomic writes, capped reads, folders on S3."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cifar_core import storage

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("uri, bucket, key", [
    ("s3://b/exp#1/trials/x.json", "b", "exp#1/trials/x.json"),
    ("s3://b/a?b=c/d", "b", "a?b=c/d"), ("s3://b/ spaced /k", "b", " spaced /k")])
def test_object_keys_are_kept_byte_for_byte(uri, bucket, key):
    assert storage.split_s3_object(uri) == (bucket, key)
    assert storage.split_s3(uri + "/") == (bucket, key)


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "/local/path", "s3://bucket"])
def test_malformed_object_uris_are_refused(uri):
    with pytest.raises(storage.StorageError):
        storage.split_s3_object(uri)


@pytest.mark.parametrize("name", ["../x", "a/b", "exp#1", "q?x", "", ".hidden", " lead",
                                  "x" * 129, "é"])
def test_names_that_are_not_one_plain_component_are_refused(name):
    with pytest.raises(storage.StorageError, match="--name"):
        storage.check_name(name, "--name")


def test_plain_names_pass():
    for name in ("ladder", "ladder-seed", "m7.4gpu", "finetune-m7-smoke-20261201-101010",
                 "a=b+c_d"):
        assert storage.check_name(name) == name


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "localhost", "ftp://x", "http://"])
def test_endpoints_without_a_scheme_are_refused(endpoint):
    with pytest.raises(storage.StorageError, match="http:// or https://"):
        storage.check_endpoint(endpoint)


def test_a_write_cut_by_a_full_disk_leaves_the_old_file(tmp_path):
    # A real write failure: the child's file-size limit (RLIMIT_FSIZE) stops the write midway,
    # as a full disk would. The old content must survive, with no partial file beside it.
    target = tmp_path / "trial.json"
    target.write_text("old record")
    code = ("import resource, signal, sys\n"
            "from cifar_core import storage\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n"
            "    storage.write_text(sys.argv[1], 'x' * 100_000)\n"
            "except OSError as error:\n"
            "    print('failed', error.errno)\n")
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.stdout.startswith("failed"), done.stderr
    assert target.read_text() == "old record"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial.json"]
    storage.write_text(str(target), "new record")  # and a write that fits replaces it
    assert target.read_text() == "new record"


def test_reads_stop_at_the_cap_locally_and_on_s3(tmp_path, s3_bucket):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 1000)
    storage.upload_file(path, f"s3://{s3_bucket}/blob")
    for uri in (str(path), f"s3://{s3_bucket}/blob"):
        assert storage.read_bytes(uri, max_bytes=1000) == b"x" * 1000
        with pytest.raises(storage.StorageError, match="more than 999 bytes"):
            storage.read_bytes(uri, max_bytes=999)


def test_simultaneous_downloads_of_one_object_or_prefix_all_succeed(tmp_path, s3_bucket,
                                                                     monkeypatch):
    # The Train workers of one host fetch the same s3:// weights at the same moment (a CI run
    # lost a worker to a shared ".partial" name renamed away under it).
    monkeypatch.setenv("CIFAR_FLEET_CACHE", str(tmp_path / "cache"))
    blob = tmp_path / "src" / "weights.h5"
    blob.parent.mkdir()
    blob.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: several multipart chunks
    (tmp_path / "src" / "b.txt").write_text("b")
    storage.upload_tree(blob.parent, f"s3://{s3_bucket}/w")
    copies = 6
    start = threading.Barrier(copies)

    def at_once(fetch):
        start.wait(timeout=30)
        return fetch()

    with ThreadPoolExecutor(copies) as pool:
        files = list(pool.map(at_once, [lambda: storage.download_s3_file(
            f"s3://{s3_bucket}/w/weights.h5")] * copies))
        folders = list(pool.map(at_once, [lambda: storage.download_s3_prefix(
            f"s3://{s3_bucket}/w")] * copies))
    assert len(set(files)) == 1 and files[0].read_bytes() == blob.read_bytes()
    assert len(set(folders)) == 1 and (folders[0] / "weights.h5").read_bytes() == blob.read_bytes()
    assert sorted(p.name for p in files[0].parent.iterdir()) == ["weights.h5"]
    assert sorted(p.name for p in folders[0].parent.iterdir()) == [folders[0].name]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("where", ["local", "s3"])
def test_upload_tree_leaves_exactly_the_new_folder(tmp_path, s3_bucket, where):
    old = _tree(tmp_path / "old", {"model.keras": "old", "stale.txt": "gone", "sub/a": "1"})
    new = _tree(tmp_path / "new", {"model.keras": "new", "sub/b": "2"})
    target = str(tmp_path / "best") if where == "local" else f"s3://{s3_bucket}/t/best"
    storage.upload_tree(old, target)
    storage.upload_tree(new, target)
    found = sorted(f.removeprefix(target).lstrip("/") for f in storage.list_files(target))
    assert found == ["model.keras", "sub/b"]
    assert storage.read_text(storage.join_uri(target, "model.keras")) == "new"


def test_s3_calls_fail_in_bounded_time_when_the_store_is_down(tmp_path):
    from moto.server import ThreadedMotoServer

    from tests.conftest import _free_port

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    storage.s3_client(endpoint).create_bucket(Bucket="down")
    storage.write_text("s3://down/k.json", "{}", endpoint)
    server.stop()  # the real outage: nothing listens on the port any more
    started = time.monotonic()
    with pytest.raises(storage.s3_errors()):
        storage.read_text("s3://down/k.json", endpoint)
    assert time.monotonic() - started < 60
