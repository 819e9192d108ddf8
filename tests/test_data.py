"""Data sources (keras, batches, image folder, archive, s3://), splits and their errors."""

import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest

from cifar_core.data import DataError, load_cifar10, load_raw, make_dataset, preprocess_images
from cifar_core.settings import CLASS_NAMES, Settings
from tests.conftest import write_image_folder


def settings_for(source, **extra) -> Settings:
    return Settings.from_dict({"model": "M1", "data": str(source), **extra})


def test_image_folder_reads_back_every_image(image_folder):
    x_train, y_train, x_test, y_test = load_raw(str(image_folder))
    assert x_train.shape == (200, 32, 32, 3) and x_train.dtype == np.uint8
    assert x_test.shape == (50, 32, 32, 3)
    assert Counter(y_train.tolist()) == {label: 20 for label in range(10)}


def test_image_folder_pixels_match_what_was_written(tmp_path):
    from PIL import Image

    root = write_image_folder(tmp_path / "f", per_class_train=1, per_class_test=1)
    path = next((root / "train" / "cat").iterdir())
    x_train, y_train, _, _ = load_raw(str(root))
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert any(np.array_equal(expected, image) for image in x_train[y_train == 3])


def test_batches_format_matches_image_layout(batches_folder):
    x_train, y_train, x_test, y_test = load_raw(str(batches_folder))
    assert x_train.shape == (500, 32, 32, 3) and len(y_test) == 50
    # Rows are planar RGB: the loader must transpose, not reshape, so colours survive.
    assert Counter(y_train.tolist())[0] == 50
    colour = x_train[y_train == 1].reshape(-1, 3).mean(axis=0)
    assert colour[0] < colour[1]  # class 1 is greener than red (53 vs 97 base, see conftest)


def test_archive_source_unpacks_once(tmp_path, image_folder):
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder, arcname="cifar10")
    first = load_raw(str(archive))
    second = load_raw(str(archive))
    assert len(first[1]) == 200 and np.array_equal(first[0], second[0])


def test_s3_source_reads_the_same_images(s3_bucket, image_folder):
    from cifar_core.storage import upload_tree

    upload_tree(image_folder, f"s3://{s3_bucket}/cifar/images")
    local = load_raw(str(image_folder))
    remote = load_raw(f"s3://{s3_bucket}/cifar/images")
    for a, b in zip(local, remote):
        assert np.array_equal(a, b)


def test_split_is_stratified_seeded_and_disjoint(image_folder):
    data = load_cifar10(settings_for(image_folder, validation_fraction=0.2, split_seed=1))
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (160, 40, 50)
    assert Counter(data.y_val.tolist()) == {label: 4 for label in range(10)}
    again = load_cifar10(settings_for(image_folder, validation_fraction=0.2, split_seed=1,
                                      seed=7))  # the training seed does not move the split
    assert np.array_equal(data.x_val, again.x_val)
    other = load_cifar10(settings_for(image_folder, validation_fraction=0.2, split_seed=2))
    assert not np.array_equal(data.x_val, other.x_val)
    train_rows = {image.tobytes() for image in data.x_train}
    assert not any(image.tobytes() in train_rows for image in data.x_val)


def test_limit_is_a_stratified_subset(image_folder):
    data = load_cifar10(settings_for(image_folder, limit=100))
    assert len(data.y_train) + len(data.y_val) == 100
    assert Counter(np.concatenate([data.y_train, data.y_val]).tolist()) == {
        label: 10 for label in range(10)}
    assert len(data.y_test) == 20


def test_pipeline_scales_resizes_and_one_hots(image_folder):
    data = load_cifar10(settings_for(image_folder))
    settings = Settings.from_dict({"model": "M5", "data": str(image_folder),
                                   "backbone_weights": "none", "batch_size": 16})
    images, labels = next(iter(make_dataset(data.x_train, data.y_train, settings,
                                            training=True)))
    assert images.shape == (16, 64, 64, 3) and labels.shape == (16, 10)
    assert 0.0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 1.0
    same = preprocess_images(data.x_train[:2], 32).numpy()
    assert np.allclose(same, data.x_train[:2] / 255.0)


# ---------------------------------------------------------------------------- errors
def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_raw(str(tmp_path / "nowhere"))


def test_wrong_layout(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match="neither CIFAR-10 python batches"):
        load_raw(str(tmp_path))


def test_unknown_class_folder(tmp_path, image_folder):
    root = tmp_path / "copy"
    shutil.copytree(image_folder, root)
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match="unknown class folder.*zebra"):
        load_raw(str(root))


def test_missing_class_folder(tmp_path, image_folder):
    root = tmp_path / "copy"
    shutil.copytree(image_folder, root)
    shutil.rmtree(root / "test" / "truck")
    with pytest.raises(DataError, match="missing class folder.*truck"):
        load_raw(str(root))


def test_empty_split(tmp_path):
    for name in CLASS_NAMES:
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "test" / name).mkdir(parents=True)
    with pytest.raises(DataError, match="'train' split holds no"):
        load_raw(str(tmp_path))


def test_unreadable_batch_file(tmp_path, batches_folder):
    root = tmp_path / "copy"
    shutil.copytree(batches_folder, root)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3: unreadable CIFAR-10 batch file"):
        load_raw(str(root))


class _Payload:
    """Pickles to a call of ``pathlib.Path(marker).touch()``: code run by unpickling."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_batch_files_that_would_run_code_are_refused_before_it_runs(tmp_path, batches_folder):
    import pickle

    root = tmp_path / "copy"
    shutil.copytree(batches_folder, root)
    marker = tmp_path / "code-ran"
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "rb") as handle:
        content = pickle.load(handle)
    content[b"batch_label"] = _Payload(marker)
    batch.write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match="data_batch_2: .*pathlib.*refused"):
        load_raw(str(root))
    assert not marker.exists()
    pickle.loads(batch.read_bytes())  # control: a plain unpickle does run it
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_batch_files_of_either_pickle_protocol_load(tmp_path, batches_folder, protocol):
    import pickle

    root = tmp_path / "copy"
    shutil.copytree(batches_folder, root)
    for path in (root / "cifar-10-batches-py").iterdir():
        with open(path, "rb") as handle:
            content = pickle.load(handle)
        # What the official files hold besides data and labels (bytes, lists of bytes).
        content[b"batch_label"] = b"training batch 1 of 5"
        content[b"filenames"] = [b"x.png"] * len(content[b"labels"])
        path.write_bytes(pickle.dumps(content, protocol=protocol))
    for a, b in zip(load_raw(str(root)), load_raw(str(batches_folder))):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("content, problem", [
    ([1, 2, 3], "not a dict"), ({b"data": "x", b"labels": []}, "b'data' is not"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "b'labels' is not"),
])
def test_batch_files_of_the_wrong_shape_are_data_errors(tmp_path, batches_folder, content,
                                                        problem):
    import pickle

    root = tmp_path / "copy"
    shutil.copytree(batches_folder, root)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=f"test_batch: .*{problem}"):
        load_raw(str(root))


def test_limit_smaller_than_number_of_classes_is_a_settings_error(image_folder):
    from cifar_core.settings import SettingsError

    with pytest.raises(SettingsError, match="limit=9"):
        settings_for(image_folder, limit=9)


def test_keras_download_is_the_default_source(monkeypatch):
    monkeypatch.delenv("CIFAR10_DATA", raising=False)
    assert Settings().data == "keras"
    monkeypatch.setenv("CIFAR10_DATA", "/data/cifar")
    assert Settings().data == "/data/cifar"


# ---------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_cifar10_jpeg_counts_and_split(real_data_dir):
    x_train, y_train, x_test, y_test = load_raw(str(real_data_dir))
    assert x_train.shape == (50000, 32, 32, 3) and x_test.shape == (10000, 32, 32, 3)
    assert Counter(y_train.tolist()) == {label: 5000 for label in range(10)}
    assert Counter(y_test.tolist()) == {label: 1000 for label in range(10)}
    data = load_cifar10(settings_for(real_data_dir))
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (45000, 5000, 10000)
    assert Counter(data.y_val.tolist()) == {label: 500 for label in range(10)}
