"""The registry: every model builds, predicts sane probabilities, and matches the seed's size."""

import numpy as np
import pytest

from cifar_core.ladder import LADDER
from cifar_core.models import (MODELS, ModelError, backbone_of, build_model,
                               load_checkpoint_model, set_trainable_backbone_layers)
from cifar_core.settings import Settings

#: Exact parameter counts of the seed architectures (total, trainable in phase 1).
PARAMETERS = {
    "M1": (722_006, 722_006),
    "M2": (1_060_138, 1_060_138),
    "M4": (591_274, 591_274),
    "M5": (15_241_802, 527_114),      # VGG16 base (14,714,688) frozen
    "M6": (1_672_906, 1_672_010),     # BatchNorm moving statistics are not trainable
    "M7": (2_588_490, 330_506),       # MobileNetV2 base (2,257,984) frozen
    "M8": (796_280, 794_496),         # 48/160/160; frozen whitening (312) and BN statistics
}


def count(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def seed_settings(name: str) -> Settings:
    return Settings.from_dict({"model": name, "backbone_weights": "none"})


def test_registry_lists_the_ladder():
    assert sorted(MODELS) == ["M1", "M2", "M4", "M5", "M6", "M7", "M8"]
    assert all(builder.__doc__ for builder in MODELS.values())
    assert list(LADDER) == list(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_shape_probabilities_and_parameter_count(name):
    settings = seed_settings(name)
    model = build_model(settings)
    size = settings.input_size
    assert model.input_shape == (None, size, size, 3)
    out = model.predict(np.random.default_rng(0).random((2, size, size, 3), np.float32),
                        verbose=0)
    assert out.shape == (2, 10) and not np.isnan(out).any()
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert (model.count_params(), count(model.trainable_weights)) == PARAMETERS[name]


@pytest.mark.parametrize("name, layers, unfrozen", [("M5", 19, 4), ("M7", 154, 50)])
def test_backbone_phases_freeze_exactly_what_they_should(name, layers, unfrozen):
    model = build_model(seed_settings(name))
    backbone = backbone_of(model)
    assert len(backbone.layers) == layers
    # Phase 1: no backbone layer trains; the head does.
    assert not any(layer.trainable for layer in backbone.layers) or not backbone.trainable
    assert count(backbone.trainable_weights) == 0 and count(model.trainable_weights) > 0
    # Phase 2: exactly the last N backbone layers train (M7's seed: 50).
    set_trainable_backbone_layers(model, unfrozen)
    flags = [layer.trainable for layer in backbone.layers]
    assert flags == [False] * (layers - unfrozen) + [True] * unfrozen
    head = count(model.trainable_weights) - count(backbone.trainable_weights)
    assert head == PARAMETERS[name][1]
    # And back to phase 1.
    set_trainable_backbone_layers(model, 0)
    assert count(backbone.trainable_weights) == 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_saves_and_loads_through_the_safe_loader(name, tmp_path):
    model = build_model(seed_settings(name))
    path = tmp_path / "model.keras"
    model.save(str(path), save_format="keras_v3")
    loaded = load_checkpoint_model(path)  # its config names only allowed Keras objects
    assert loaded.count_params() == model.count_params()


def test_m6_has_the_seed_augmentation_in_order():
    model = build_model(seed_settings("M6"))
    kinds = [type(layer).__name__ for layer in model.layers[1:4]]
    assert kinds == ["RandomContrast", "RandomFlip", "RandomRotation"]


def test_unknown_model_error_lists_valid_names():
    with pytest.raises(Exception, match="M1"):
        build_model(Settings.from_dict({"model": "M9"}))


def test_backbone_weights_from_a_file_are_loaded(tmp_path):
    from tf_keras.applications import MobileNetV2

    donor = MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    weights = tmp_path / "mobilenet.h5"
    donor.save_weights(str(weights))
    settings = Settings.from_dict({"model": "M7", "backbone_weights": str(weights),
                                   "image_size": 32, "backbone_alpha": 0.35})
    backbone = backbone_of(build_model(settings))
    for ours, theirs in zip(backbone.get_weights(), donor.get_weights()):
        assert np.array_equal(ours, theirs)


def test_backbone_weights_from_s3(tmp_path, s3_bucket):
    import boto3
    from tf_keras.applications import MobileNetV2

    donor = MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    weights = tmp_path / "mobilenet.h5"
    donor.save_weights(str(weights))
    boto3.client("s3").upload_file(str(weights), s3_bucket, "weights/mobilenet.h5")
    settings = Settings.from_dict({"model": "M7", "image_size": 32, "backbone_alpha": 0.35,
                                   "backbone_weights": f"s3://{s3_bucket}/weights/mobilenet.h5"})
    backbone = backbone_of(build_model(settings))
    assert np.array_equal(backbone.get_weights()[0], donor.get_weights()[0])


def test_loading_refuses_code_carrying_models(tmp_path):
    import tf_keras as keras

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(str(path))
    with pytest.raises(ModelError, match="refused: it names .Lambda."):
        load_checkpoint_model(str(path))


# ---------------------------------------------------------------------------- safe loading
def _lambda_touching(marker):
    """A Lambda whose code creates ``marker`` when it runs (the attack: code in the file)."""
    return eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")


@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_legacy_formats_at_model_keras_are_refused_before_keras_runs_their_code(tmp_path, fmt):
    import tf_keras as keras

    marker = tmp_path / "code-ran"
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(_lambda_touching(marker))(inputs))
    path = tmp_path / "model.keras"
    model.save(str(path), save_format=fmt)  # HDF5 file / SavedModel folder named model.keras
    marker.unlink(missing_ok=True)  # building the model ran the lambda once
    with pytest.raises(ModelError, match="not a zip-format|is a folder"):
        load_checkpoint_model(path)
    assert not marker.exists()
    # Control: tf_keras itself runs the file's code (safe_mode does not cover these formats),
    # so the check above is what keeps it out.
    if fmt == "h5":
        keras.models.load_model(str(path), safe_mode=True)
        assert marker.exists()


def _rewrite_config(source, target, edit):
    import json
    import zipfile

    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item.filename)
            if item.filename == "config.json":
                data = json.dumps(edit(json.loads(data))).encode()
            new.writestr(item, data)


@pytest.mark.parametrize("module, name", [
    ("os", "system"), ("builtins", "eval"), ("keras.layers", "Lambda"),
    ("keras.src.saving.serialization_lib", "enable_unsafe_deserialization"),
    ("tf_keras.src.engine.functional", "Sequential"),
])
def test_zip_archives_naming_anything_outside_the_allowlist_are_refused(tmp_path, module, name):
    settings = Settings.from_dict({"model": "M1"})
    good = tmp_path / "good.keras"
    build_model(settings).save(str(good), save_format="keras_v3")
    load_checkpoint_model(good)  # the real archive passes

    def swap_first_dense(config):
        layer = next(l for l in config["config"]["layers"] if l["class_name"] == "Dense")
        layer["module"], layer["class_name"] = module, name
        return config

    bad = tmp_path / "bad.keras"
    _rewrite_config(good, bad, swap_first_dense)
    with pytest.raises(ModelError, match=f"refused: it names '{name}'"):
        load_checkpoint_model(bad)


def test_unexpected_archive_members_are_refused(tmp_path):
    import zipfile

    good = tmp_path / "good.keras"
    build_model(Settings.from_dict({"model": "M1"})).save(str(good), save_format="keras_v3")
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(good) as old, zipfile.ZipFile(bad, "w") as new:
        for item in old.infolist():
            new.writestr(item, old.read(item.filename))
        new.writestr("assets/payload.py", "print('hi')")
    with pytest.raises(ModelError, match="unexpected archive contents.*payload"):
        load_checkpoint_model(bad)
