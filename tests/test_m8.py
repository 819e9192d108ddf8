"""M8, the fast recipe (cifar_core/fast.py + models.build_m8): whitening from data and frozen,
TTA as the mean of explicit views in every prediction path, the weight average, the schedule,
the safe save/load round trip and a ``cifar train --model M8 --smoke-test`` run."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cifar_core.data import load_cifar10, preprocess_images
from cifar_core.fast import (WHITENING_LAYER, WarmupLinearDecay, WeightAverage,
                             whitening_weights)
from cifar_core.ladder import smoke_settings
from cifar_core.models import build_model, load_checkpoint_model
from cifar_core.settings import Settings, SettingsError
from tests.conftest import make_images


def smoke(**changes) -> Settings:
    config = {**smoke_settings("M8"), "model": "M8", **changes}
    config.pop("limit")
    return Settings.from_dict(config)


@pytest.fixture(scope="module")
def images():
    x, y = make_images(30, seed=3)  # 300 synthetic images, 30 per class
    return x, y


def one_hot(y):
    return np.eye(10, dtype=np.float32)[y]


def as_inputs(x):
    return preprocess_images(x, 32).numpy()


def test_whitening_is_computed_from_the_training_images_and_frozen(images):
    x, y = images
    model = build_model(smoke(), train_images=x)
    layer = model.get_layer(WHITENING_LAYER)
    kernel, bias = layer.get_weights()
    expected_kernel, expected_bias = whitening_weights(as_inputs(x))
    assert np.allclose(kernel, expected_kernel) and np.allclose(bias, expected_bias)
    other_kernel, _ = whitening_weights(as_inputs(make_images(30, seed=4)[0]))
    assert not np.allclose(kernel, other_kernel, atol=1e-2)  # other data, other whitening
    # It whitens: over the training patches, the first half of its outputs (the eigenvectors;
    # the second half are their negatives) have covariance diag(l / (l + eps)), ~identity.
    patches = layer(as_inputs(x)).numpy().reshape(-1, kernel.shape[-1])[:, :12]
    assert np.allclose(patches.mean(axis=0), 0, atol=1e-3)
    covariance = np.cov(patches, rowvar=False)
    assert np.allclose(covariance, np.diag(np.diag(covariance)), atol=1e-2)
    assert np.diag(covariance)[0] == pytest.approx(1, abs=0.01)
    # Frozen: not trainable, unchanged by a training step that changes the other convs.
    assert not layer.trainable and layer.weights[0] not in model.trainable_weights
    conv = next(l for l in model.layers if type(l).__name__ == "Conv2D" and l is not layer)
    before = conv.get_weights()[0].copy()
    model.fit(as_inputs(x), one_hot(y), batch_size=64, epochs=1, steps_per_epoch=1, verbose=0)
    assert np.array_equal(layer.get_weights()[0], kernel)
    assert not np.allclose(conv.get_weights()[0], before)


def test_whitening_off_is_a_trainable_random_conv(images):
    x, _ = images
    model = build_model(smoke(whitening=False), train_images=x)
    layer = model.get_layer(WHITENING_LAYER)
    assert layer.trainable and not np.allclose(layer.get_weights()[0],
                                               whitening_weights(as_inputs(x))[0], atol=1e-2)


def explicit_views(x, level):
    """The TTA views, written out with numpy: mirror; 1-px shifts with reflect padding."""
    views = [x]
    if level == 2:
        padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
        views += [padded[:, :32, :32], padded[:, 2:, 2:]]
    return [v for image in views for v in (image, image[:, :, ::-1])]


@pytest.mark.parametrize("level, views", [(1, 2), (2, 6)])
def test_tta_predictions_are_the_mean_of_the_explicit_views(images, level, views):
    from cifar_core.scoring import make_predict_function

    x, _ = images
    model = build_model(smoke(tta_level=level), train_images=x)
    plain = build_model(smoke(tta_level=0))
    plain.set_weights(model.get_weights())  # TTA layers hold no weights: the same network
    inputs = as_inputs(x[:16])
    expected = np.mean([plain.predict(v, verbose=0) for v in explicit_views(inputs, level)], 0)
    assert len(explicit_views(inputs, level)) == views
    assert np.allclose(model.predict(inputs, verbose=0), expected, atol=1e-5)
    # Not the single view: the mean differs from the unaugmented prediction.
    assert not np.allclose(expected, plain.predict(inputs, verbose=0), atol=1e-6)
    # cifar score and cifar serve predict through this function: the same numbers.
    assert np.allclose(make_predict_function(model, 32)(x[:16]), expected, atol=1e-5)
    # While training, one view per image.
    assert model(inputs, training=True).shape == (16, 10)


def test_weight_average_is_what_validation_and_the_end_of_training_see(images):
    x, y = images
    model = build_model(smoke(ema_decay=0.9), train_images=x)
    average = WeightAverage(0.9)
    seen = []
    from tf_keras.callbacks import LambdaCallback

    # Stands where train.EpochCheckpoint does, before the average: what a checkpoint saves.
    record = LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(model.get_weights()))
    inputs = as_inputs(x)
    model.fit(inputs, one_hot(y), batch_size=32, epochs=2, validation_data=(inputs, one_hot(y)),
              callbacks=[record, average], verbose=0)
    final = model.get_weights()
    assert all(np.allclose(f, a.numpy()) for f, a in zip(final, average.average))
    assert any(not np.allclose(f, r) for f, r in zip(final, average.raw))  # raw weights differ
    assert all(np.allclose(s, f) for s, f in zip(seen[-1], final))  # the checkpoint's weights
    assert any(not np.allclose(a, b) for a, b in zip(seen[0], seen[1]))


def test_warmup_then_linear_decay():
    schedule = WarmupLinearDecay(0.4, epochs=10, warmup_fraction=0.2, decay=True)
    schedule.total_steps = 100
    rates = [schedule.rate(step) for step in range(100)]
    assert rates[0] == pytest.approx(0.02) and rates[19] == pytest.approx(0.4)
    assert max(rates) == pytest.approx(0.4) and rates.index(max(rates)) in (19, 20)
    assert rates[-1] == pytest.approx(0.4 / 80) and np.all(np.diff(rates[20:]) < 0)
    flat = WarmupLinearDecay(0.1, epochs=1, warmup_fraction=0.0, decay=False)
    flat.total_steps = 10
    assert [flat.rate(s) for s in range(10)] == [0.1] * 10


@pytest.mark.parametrize("change, message", [
    ({"widths": "64,x"}, "widths='64,x'"), ({"widths": ""}, "needs its conv widths"),
    ({"tta_level": 3}, "tta_level=3"), ({"ema_decay": 1.0}, "ema_decay=1.0"),
    ({"label_smoothing": -0.1}, "label_smoothing=-0.1"),
    ({"learning_rate_schedule": "cosine"}, "learning_rate_schedule='cosine'"),
    ({"reduce_lr_patience": 2, "learning_rate_schedule": "linear"},
     "reduce_lr_patience=2 cannot be combined"),
    ({"early_stopping_patience": 2}, "ema_decay=0.99 cannot be combined"),
    ({"weight_decay": -1.0}, "weight_decay=-1.0"),
    ({"precision": "bfloat16"}, "precision='bfloat16' must be one of"),
    ({"xla": True}, "xla=True cannot compile the random augment_shift augmentation")])
def test_bad_recipe_settings_fail_loudly(change, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_dict({"model": "M8", **change})


def test_other_models_refuse_m8_options_and_keep_their_defaults():
    with pytest.raises(SettingsError, match=r"only \['M8'\] read whitening"):
        Settings.from_dict({"model": "M4", "whitening": True})
    m4 = Settings.from_dict({"model": "M4"})
    assert (m4.label_smoothing, m4.ema_decay, m4.weight_decay, m4.tta_level) == (0, 0, 0, 0)
    model = build_model(m4)
    assert model.loss == "categorical_crossentropy" and model.optimizer.weight_decay is None


def test_m8_saves_and_loads_through_the_safe_loader(images, tmp_path):
    x, _ = images
    model = build_model(smoke(), train_images=x)
    path = tmp_path / "model.keras"
    model.save(str(path), save_format="keras_v3")
    loaded = load_checkpoint_model(path)
    inputs = as_inputs(x[:8])
    assert np.allclose(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0))
    assert [type(loaded.get_layer(n)).__name__ for n in ("tta_views", "tta_mean")] == [
        "TestTimeViews", "TestTimeMean"]
    assert not loaded.get_layer(WHITENING_LAYER).trainable
    assert np.array_equal(loaded.get_layer(WHITENING_LAYER).get_weights()[0],
                          model.get_layer(WHITENING_LAYER).get_weights()[0])


def test_bfloat16_computes_the_same_model_with_its_first_and_last_layers_in_float32(
        images, tmp_path):
    import tf_keras as keras

    x, y = images
    try:
        model = build_model(smoke(precision="mixed_bfloat16"), train_images=x)
        policies = {type(layer).__name__ if layer.name.startswith("random") else layer.name:
                    layer.dtype_policy.name for layer in model.layers}
        # Whitening's cancelling sums, the pixels before it, TTA and softmax stay exact.
        for name in ("RandomFlip", "RandomTranslation", "tta_views", WHITENING_LAYER,
                     "predictions", "tta_mean"):
            assert policies[name] == "float32", name
        gelus = [l for l in model.layers if type(l).__name__ == "Activation"
                 and l.get_config()["activation"] == "gelu"]
        assert len(gelus) == 7 and {l.compute_dtype for l in gelus} == {"float32"}  # speed
        conv = next(l for l in model.layers if type(l).__name__ == "Conv2D"
                    and l.name != WHITENING_LAYER)
        assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
        average = WeightAverage(0.9)
        model.fit(as_inputs(x), one_hot(y), batch_size=64, epochs=1, steps_per_epoch=3,
                  callbacks=[average], verbose=0)
        # Its weights are AutoCastVariables; the average's update must not retrace per step.
        assert average._update.experimental_get_tracing_count() == 1
        path = tmp_path / "model.keras"
        model.save(str(path), save_format="keras_v3")
        loaded = load_checkpoint_model(path)
        inputs = as_inputs(x[:16])
        low = model.predict(inputs, verbose=0)
        assert low.dtype == np.float32  # the TTA mean of float32 probabilities
        assert np.allclose(loaded.predict(inputs, verbose=0), low)
        exact = build_model(smoke(), train_images=x)
        exact.set_weights(model.get_weights())  # the same float32 variables

        def logits(network):  # before the softmax: M8's scaled logits make probabilities flat
            head = keras.Model(network.input, network.get_layer("predictions").input)
            return np.asarray(head.predict(inputs, verbose=0), dtype=np.float32)

        reference, rounded = logits(exact), logits(model)
        error = np.abs(reference - rounded).mean() / np.abs(reference).mean()
        assert error < 0.03, error  # bf16 keeps ~3 significant digits: measured ~0.012
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_cli_train_m8_smoke(tmp_path, image_folder):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--model", "M8", "--smoke-test", "--data",
         str(image_folder), "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test_time_augmentation"] == (
        "horizontal flip x 1-pixel shifts: mean of 6 views")
    settings = Settings.from_json((out / "settings.json").read_text())
    assert settings.model == "M8" and settings.ema_decay > 0 and settings.whitening
    model = load_checkpoint_model(out / "checkpoints" / "best" / "model.keras")
    # The saved whitening is the one the training images of this run give.
    data = load_cifar10(settings)
    expected, _ = whitening_weights(as_inputs(data.x_train[:5000]))
    assert np.allclose(model.get_layer(WHITENING_LAYER).get_weights()[0], expected, atol=1e-5)
