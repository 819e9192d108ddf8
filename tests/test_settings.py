"""Settings: model defaults, overrides, and every invalid value rejected naming its field."""

import json
import math

import pytest

from cifar_core.ladder import LADDER
from cifar_core.settings import Settings, SettingsError


def test_model_defaults_are_the_seed_notebooks():
    m1 = Settings.from_dict({"model": "M1"})
    assert (m1.num_epochs, m1.batch_size, m1.optimizer, m1.learning_rate) == (50, 512, "sgd", 0.01)
    m5 = Settings.from_dict({"model": "M5"})
    assert (m5.momentum, m5.nesterov, m5.image_size, m5.batch_size) == (0.9, True, 64, 64)
    m7 = Settings.from_dict({"model": "M7"})
    assert (m7.num_epochs, m7.fine_tune_epochs, m7.fine_tune_layers) == (20, 15, 50)
    assert (m7.learning_rate, m7.fine_tune_learning_rate) == (1e-4, 1e-5)
    assert m7.augment_rotation == pytest.approx(15 / 360) and m7.total_epochs == 35


def test_explicit_values_override_model_defaults_and_none_means_unset():
    s = Settings.from_dict({"model": "M4", "learning_rate": 3e-3, "batch_size": None})
    assert s.learning_rate == 3e-3 and s.batch_size == LADDER["M4"].seed_settings["batch_size"]


def test_json_round_trip():
    s = Settings.from_dict({"model": "M6", "limit": 1000, "seed": 3})
    assert Settings.from_json(s.to_json()) == s
    assert json.loads(s.to_json())["model"] == "M6"


@pytest.mark.parametrize("field, value", [
    ("learning_rate", 0), ("learning_rate", -1e-3), ("learning_rate", math.nan),
    ("learning_rate", math.inf), ("fine_tune_learning_rate", 0.0),
    ("dropout_rate", 1.0), ("dropout_rate", -0.1), ("conv_dropout_rate", 1.5),
    ("batch_size", 0), ("num_epochs", 0), ("dense_units", 0),
    ("optimizer", "rmsprop"), ("limit", 5), ("momentum", 1.0),
    ("validation_fraction", 0.0), ("reduce_lr_factor", 1.0),
    ("backbone_weights", "/no/such/weights.h5"), ("batch_size", "64"),
    ("nesterov", "yes"), ("image_size", 16),
])
def test_invalid_values_name_the_field_and_value(field, value):
    with pytest.raises(SettingsError) as error:
        Settings.from_dict({"model": "M4", field: value})
    assert field in str(error.value)
    assert repr(value) in str(error.value) or str(value) in str(error.value)


def test_settings_written_with_the_old_mixed_precision_flag_still_load():
    assert Settings.from_dict({"model": "M4", "mixed_precision": True}).precision == \
        "mixed_float16"
    assert Settings.from_dict({"model": "M4", "mixed_precision": False}).precision == "float32"
    with pytest.raises(SettingsError, match="mixed_precision='yes'"):
        Settings.from_dict({"model": "M4", "mixed_precision": "yes"})
    with pytest.raises(SettingsError, match="unknown settings field.*mixed_precision"):
        Settings.from_dict({"model": "M4", "mixed_precision": True, "precision": "float32"})


def test_unknown_key_is_rejected_with_valid_names():
    with pytest.raises(SettingsError, match="unknown settings field.*'learnin_rate'"):
        Settings.from_dict({"model": "M1", "learnin_rate": 0.1})


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(SettingsError, match="M3.*M1.*M2.*M4"):
        Settings.from_dict({"model": "M3"})


def test_fine_tuning_needs_a_backbone():
    with pytest.raises(SettingsError, match="fine_tune_epochs"):
        Settings.from_dict({"model": "M4", "fine_tune_epochs": 3})


def test_readable_weights_file_is_accepted(tmp_path):
    weights = tmp_path / "backbone.h5"
    weights.write_bytes(b"x")
    assert Settings.from_dict({"model": "M7", "backbone_weights": str(weights)})


def test_numpy_numbers_from_tune_grids_are_accepted():
    import numpy as np

    s = Settings.from_dict({"model": "M1", "batch_size": np.int64(128),
                            "learning_rate": np.float64(0.03)})
    assert s.batch_size == 128 and type(s.batch_size) is int and s.learning_rate == 0.03


@pytest.mark.parametrize("text", ["[]", "null", "3", '"M1"', "{not json"])
def test_settings_json_that_is_not_an_object_is_a_settings_error(text):
    with pytest.raises(SettingsError, match="settings (must be an object|are not valid JSON)"):
        Settings.from_json(text)
