"""Shared fixtures: synthetic CIFAR-10 in every source format, a local S3 (moto), local Ray.

Synthetic images are made here, never copied from the real data set: each class gets its own
colour and stripe pattern plus noise, so a model can learn them in an epoch or two.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest

import cifar_core  # noqa: F401  (selects tf_keras before anything imports TensorFlow)
from cifar_core.settings import CLASS_NAMES, Settings

# Never let a test talk to real AWS or pick up a developer's credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def make_images(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic 32x32 RGB uint8 images, ``per_class`` of each class."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(len(CLASS_NAMES)):
        colour = np.array([(label * 53) % 256, (label * 97) % 256, (label * 151) % 256])
        base = np.zeros((32, 32, 3), np.float32) + colour
        base[:, :: 2 + label % 4] *= 0.5  # class-specific stripes
        for _ in range(per_class):
            noise = rng.normal(0, 20, size=(32, 32, 3))
            images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
            labels.append(label)
    order = rng.permutation(len(labels))
    return np.stack(images)[order], np.array(labels, np.int64)[order]


def write_image_folder(root: Path, per_class_train: int = 20, per_class_test: int = 5,
                       suffix: str = ".png") -> Path:
    from PIL import Image

    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        images, labels = make_images(per_class, seed=1 if split == "train" else 2)
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:05d}{suffix}")
    return root


def write_batches(root: Path, per_class_train: int = 10, per_class_test: int = 5) -> Path:
    """CIFAR-10's python-batch format: 5 train batches and a test batch of pickled dicts."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x_train, y_train = make_images(per_class_train * 5, seed=1)
    x_test, y_test = make_images(per_class_test, seed=2)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # R plane, G plane, B plane
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rows, b"labels": [int(v) for v in y]}, handle)

    for i, chunk in enumerate(np.array_split(np.arange(len(y_train)), 5), start=1):
        dump(f"data_batch_{i}", x_train[chunk], y_train[chunk])
    dump("test_batch", x_test, y_test)
    return root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own decode/S3 cache, so tests never see a stale one."""
    monkeypatch.setenv("CIFAR_FLEET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A synthetic image-folder data set: 20 train + 5 test PNGs per class."""
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def batches_folder(tmp_path_factory) -> Path:
    return write_batches(tmp_path_factory.mktemp("batches"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server on 127.0.0.1 (how Ray's own tests simulate S3); yields its URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch, request) -> str:
    """A fresh bucket on the moto server, with AWS_ENDPOINT_URL pointing at it."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    name = "test-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The shared CIFAR-10 (JPEG), unpacked: CIFAR10_JPEG_DIR, else the archive beside the
    repo (../shared/data) unpacked once into the cache. CI must have it; a laptop may skip."""
    if os.environ.get("CIFAR10_JPEG_DIR"):
        path = Path(os.environ["CIFAR10_JPEG_DIR"])
    elif SHARED_ARCHIVE.exists():
        from cifar_core.data import _unpack_archive

        path = _unpack_archive(SHARED_ARCHIVE) / "cifar10"
    else:
        path = Path("CIFAR10_JPEG_DIR-not-set")
    if not (path / "train").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CIFAR10_JPEG_DIR={path} is not the unpacked shared CIFAR-10 (JPEG)")
        pytest.skip("real CIFAR-10 (JPEG) not unpacked; set CIFAR10_JPEG_DIR")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole session (never attaches to another Ray)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="cfray-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1"}},
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_run(image_folder, tmp_path_factory) -> Path:
    """A real M1 run folder (checkpoints/best, evaluation.json) on the synthetic images."""
    from cifar_core.data import load_cifar10
    from cifar_core.train import train

    settings = Settings.from_dict(dict(model="M1", data=str(image_folder), num_epochs=3,
                                       batch_size=32, optimizer="adam", learning_rate=3e-3))
    workdir = tmp_path_factory.mktemp("m1run")
    train(settings, load_cifar10(settings), workdir)
    return workdir
