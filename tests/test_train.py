"""The one training function: metrics, checkpoints, round trip, resume, M7's two phases, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cifar_core.data import load_cifar10, preprocess_images
from cifar_core.models import backbone_of, load_checkpoint_model
from cifar_core.settings import Settings
from cifar_core.train import TrainState, read_metrics, train

KERAS_METRICS = {"loss", "accuracy", "val_loss", "val_accuracy"}


@pytest.fixture(scope="module")
def tiny(image_folder):
    settings = Settings.from_dict({"model": "M1", "data": str(image_folder), "num_epochs": 2,
                                   "batch_size": 32, "learning_rate": 0.05})
    return settings, load_cifar10(settings)


def test_training_writes_metrics_checkpoints_and_evaluation(tmp_path, tiny):
    settings, data = tiny
    reports = []
    result = train(settings, data, tmp_path, report=lambda m, c: reports.append((m, c)))
    lines = read_metrics(tmp_path)
    assert [m["epoch"] for m in lines] == [1, 2]
    assert KERAS_METRICS <= set(lines[0]) and "lr" not in lines[0]
    assert [m for m, _ in reports] == lines
    for name in ("model.keras", "settings.json", "state.json", "provenance.json"):
        assert (tmp_path / "checkpoints" / "last" / name).exists()
        assert (tmp_path / "checkpoints" / "best" / name).exists()
    assert Settings.from_json((tmp_path / "checkpoints/last/settings.json").read_text()) == settings
    provenance = json.loads((tmp_path / "checkpoints/last/provenance.json").read_text())
    assert provenance["git_commit"] and provenance["versions"]["tf_keras"].startswith("2.")
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["test_images"] == 50
    assert np.array(evaluation["confusion_matrix"]).sum() == 50
    assert set(evaluation["per_class"]) >= {"airplane", "truck"}
    best_epoch = max(lines, key=lambda m: m["val_accuracy"])["epoch"]
    assert result.state.best_epoch == best_epoch
    # The synthetic classes are easy: two epochs must beat chance clearly.
    assert result.state.best_val_accuracy > 0.3


def test_checkpoint_round_trip_gives_the_same_predictions(tmp_path, tiny):
    settings, data = tiny
    train(settings.replace(num_epochs=1), data, tmp_path, evaluate_test=False)
    model = load_checkpoint_model(str(tmp_path / "checkpoints/last/model.keras"))
    again = load_checkpoint_model(str(tmp_path / "checkpoints/last/model.keras"))
    images = preprocess_images(data.x_test[:8], 32)
    assert np.allclose(model.predict(images, verbose=0), again.predict(images, verbose=0))
    # The saved model predicts what the in-memory one did at the end of training.
    result_model = load_checkpoint_model(str(tmp_path / "checkpoints/best/model.keras"))
    assert np.allclose(result_model.predict(images, verbose=0), model.predict(images, verbose=0))


def test_resume_continues_the_epoch_count(tmp_path, tiny):
    settings, data = tiny
    train(settings.replace(num_epochs=1), data, tmp_path, evaluate_test=False)
    result = train(settings.replace(num_epochs=3), data, tmp_path, evaluate_test=False)
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2, 3]
    assert result.state.epoch == 3


def test_fine_tune_from_another_runs_checkpoint(tmp_path, tiny):
    settings, data = tiny
    train(settings.replace(num_epochs=1), data, tmp_path / "a", evaluate_test=False)
    result = train(settings.replace(num_epochs=2), data, tmp_path / "b", evaluate_test=False,
                   resume_from=tmp_path / "a" / "checkpoints" / "last")
    assert [m["epoch"] for m in read_metrics(tmp_path / "b")] == [1, 2]
    assert result.state.history[0] == TrainState.read(tmp_path / "a/checkpoints/last").history[0]


def test_m7_runs_both_phases_with_the_seed_callbacks(tmp_path, image_folder):
    settings = Settings.from_dict({
        "model": "M7", "data": str(image_folder), "backbone_weights": "none",
        "backbone_alpha": 0.35, "image_size": 32, "num_epochs": 2, "fine_tune_epochs": 2,
        "fine_tune_layers": 10, "batch_size": 32, "early_stopping_patience": 1,
        "reduce_lr_patience": 1})
    data = load_cifar10(settings)
    result = train(settings, data, tmp_path)
    lines = read_metrics(tmp_path)
    phases = [m["phase"] for m in lines]
    assert phases[0] == 1 and phases[-1] == 2 and phases == sorted(phases)
    assert len(result.state.stop_reasons) == 2
    phase2_rates = {m["learning_rate"] for m in lines if m["phase"] == 2}
    assert max(phase2_rates) == pytest.approx(1e-5)
    model = load_checkpoint_model(str(tmp_path / "checkpoints/last/model.keras"))
    # (The saved format does not keep an InputLayer's flag; it holds no weights anyway.)
    flags = [layer.trainable for layer in backbone_of(model).layers[1:]]
    assert flags[-10:] == [True] * 10 and not any(flags[:-10])


def test_cli_train_smoke(tmp_path, image_folder):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--model", "M1", "--data", str(image_folder),
         "--num-epochs", "1", "--batch-size", "32", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test_accuracy" in done.stdout and str(out) in done.stdout
    assert len(read_metrics(out)) == 1 and (out / "evaluation.json").exists()


def test_cli_rejects_bad_settings_with_exit_code_2(tmp_path, image_folder):
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--model", "M1", "--data", str(image_folder),
         "--learning-rate", "-1", "--out", str(tmp_path)], capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 2 and "learning_rate=-1.0" in done.stderr


def test_cli_rejects_a_resume_from_that_is_not_a_checkpoint(tmp_path, image_folder):
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--model", "M1", "--data", str(image_folder),
         "--resume-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not a checkpoint folder" in done.stderr
    assert not (tmp_path / "run").exists()
