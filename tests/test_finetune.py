"""Multi-worker runs on Ray Train (cifar_core/multiworker.py, jobs/finetune.py).

Two CPU workers on a private local Ray, small inputs and widths. M7 gets a MobileNetV2 whose
BatchNorm statistics were calibrated on synthetic images (a randomly initialised one outputs
~1e-12 everywhere in inference mode, so nothing would train); the file doubles as the
"pre-staged weights" an air-gapped cluster points at. Faults are real process deaths: a worker
``os._exit``s right after a given epoch's checkpoint was reported (once, guarded by a marker
file), and the driver of ``cifar finetune`` is SIGKILLed in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
from cifar_core import storage
from cifar_core.multiworker import (RAY_SNAPSHOT_FILE, FinetuneError, FinetuneOptions,
                                    check_global_batch, check_xla, latest_report, run_finetune,
                                    scale_learning_rate)
from cifar_core.records import Cell, TrialRecord
from cifar_core.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parent.parent
ALPHA = 0.35
#: Small M7: 32-px inputs, 0.35-width backbone, 2 + 1 epochs.
M7_SMALL = dict(model="M7", backbone_alpha=ALPHA, image_size=32, limit=300, num_epochs=2,
                fine_tune_epochs=1, batch_size=32)
#: M4 without dropout or augmentation: fast to trace, deterministic given its weights.
M4_SMALL = dict(model="M4", limit=200, batch_size=32, dropout_rate=0.0, conv_dropout_rate=0.0)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, moto_endpoint):
    """A private 2-CPU Ray for this module, started the way ``cifar finetune`` starts one.

    Its processes inherit the test cache folder and the moto endpoint, so workers (and Tune
    trials) fetch s3:// weights and write s3:// storage there.
    """
    import ray

    from cifar_core.ray_glue import connect_ray

    saved = {k: os.environ.get(k) for k in ("CIFAR_FLEET_CACHE", "AWS_ENDPOINT_URL",
                                             "RAY_ADDRESS")}
    os.environ["CIFAR_FLEET_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    os.environ["AWS_ENDPOINT_URL"] = moto_endpoint
    temp_dir = tempfile.mkdtemp(prefix="cfft-", dir="/tmp")  # short: Ray's socket paths
    connect_ray(None, dashboard=True, num_cpus=2, _temp_dir=temp_dir, log_to_driver=False)
    yield ray
    ray.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def staged_weights(tmp_path_factory) -> Path:
    """MobileNetV2 (0.35, no top) weights with BatchNorm statistics of synthetic images."""
    import tf_keras as keras
    from tf_keras.applications import MobileNetV2

    from cifar_core.data import preprocess_images
    from tests.conftest import make_images

    images, _ = make_images(10, seed=5)
    keras.utils.set_random_seed(0)
    backbone = MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3),
                           alpha=ALPHA)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # one training-mode pass sets the moving statistics
    backbone(preprocess_images(images, 32), training=True)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_0.35_32_no_top.h5"
    backbone.save_weights(str(path))
    return path


@pytest.fixture(scope="module")
def m4_data(image_folder):
    from cifar_core.data import load_cifar10

    return load_cifar10(Settings.from_dict({**M4_SMALL, "data": str(image_folder)}))


def _options(tmp_path: Path, name: str, **changes) -> FinetuneOptions:
    defaults = dict(storage=str(tmp_path / "store"), name=name, num_workers=2,
                    cpus_per_worker=1.0, max_failures=0, keep_checkpoints=20,
                    scratch_dir=str(tmp_path))
    return FinetuneOptions(**{**defaults, **changes})


def _reports(options: FinetuneOptions) -> list[dict]:
    """Metrics of every checkpoint the run reported (kept: keep_checkpoints is large)."""
    from ray.train import Result

    fs, path = storage.pyarrow_filesystem(options.run_uri)
    result = Result.from_path(path, storage_filesystem=fs)
    return sorted((dict(m) for _, m in result.best_checkpoints),
                  key=lambda m: (m["epoch"], "test_accuracy" in m))


def _check_record(record: TrialRecord, epochs: int) -> None:
    assert record.kind == "finetune" and record.status == "completed"
    assert record.epochs_run == epochs
    assert [m["epoch"] for m in record.history] == list(range(1, epochs + 1))
    evaluation = record.evaluation
    # test_accuracy comes from model.evaluate, accuracy from model.predict's gathered
    # outputs against the labels in order: equal only if prediction kept the test order.
    assert evaluation["accuracy"] == pytest.approx(evaluation["test_accuracy"], abs=1e-6)
    assert record.test_accuracy == evaluation["test_accuracy"]


# ---------------------------------------------------------------------------- no cluster
def test_global_batch_and_learning_rate_rule():
    settings = Settings.from_dict({"model": "M7", "batch_size": 256,
                                   "backbone_weights": "none"})
    assert scale_learning_rate(settings, "none") == settings
    linear = scale_learning_rate(settings, "linear")  # 256 / seed batch 64 = 4
    assert linear.learning_rate == pytest.approx(4e-4)
    assert linear.fine_tune_learning_rate == pytest.approx(4e-5)
    assert scale_learning_rate(settings, "sqrt").learning_rate == pytest.approx(2e-4)
    check_global_batch(settings, 4)
    with pytest.raises(SettingsError, match="does not divide evenly over 3 replicas"):
        check_global_batch(settings, 3)
    with pytest.raises(FinetuneError, match="--scale-learning-rate"):
        FinetuneOptions(storage="/tmp/x", name="x", scale_learning_rate="cubic")
    assert FinetuneOptions(storage="/s", name="x", num_workers=4, use_gpu=True,
                           gpus_per_worker=2).replicas == 8
    xla = settings.replace(xla=True, augment_rotation=0.0, augment_shift=0.0)
    check_xla(xla, FinetuneOptions(storage="/s", name="x", num_workers=1))
    check_xla(xla, FinetuneOptions(storage="/s", name="x", num_workers=2, use_gpu=True))
    with pytest.raises(SettingsError, match="XLA on CPU devices"):
        check_xla(xla, FinetuneOptions(storage="/s", name="x", num_workers=2))


def test_job_rejects_bad_input_before_starting(tmp_path, capsys):
    from jobs.finetune import main

    code = main(["--storage", str(tmp_path), "--num-workers", "3", "--batch-size", "64",
                 "--backbone-weights", "none", "--data", str(tmp_path)])
    assert code == 2
    assert "does not divide evenly over 3 replicas" in capsys.readouterr().err
    assert main(["--num-workers", "0", "--storage", str(tmp_path)]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--cpus-per-worker", "nan"], "--cpus-per-worker nan"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker -1.0"),
    (["--name", "../x"], "--name '../x'"), (["--keep-checkpoints", "0"], "--keep-checkpoints 0"),
    (["--s3-endpoint", "minio:9000"], "--s3-endpoint 'minio:9000'"),
    (["--init-from", "/no/such/checkpoint"], "--init-from /no/such/checkpoint: not a checkpoint"),
    (["--scale-learning-rate", "cubic"], "invalid choice: 'cubic'"),
])
def test_bad_options_exit_2_naming_option_and_value(tmp_path, image_folder, capsys, argv,
                                                    message):
    import ray

    from jobs.finetune import main

    ray_was_running = ray.is_initialized()
    try:
        code = main(["--storage", str(tmp_path), "--backbone-weights", "none",
                     "--data", str(image_folder), *argv])
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    assert code == 2 and message in capsys.readouterr().err
    assert ray.is_initialized() == ray_was_running and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- gradient sync
@pytest.mark.slow
def test_gradient_sync_two_workers_equal_one_worker_with_double_batch(
        ray_cluster, m4_data, tmp_path):
    """One SGD step: 2 workers x 35 images == 1 process x 70 images, from the same weights."""
    from cifar_core.models import build_model, load_checkpoint_model
    from cifar_core.train import TrainState, train

    data = m4_data
    global_batch = len(data.y_train)  # exactly one optimizer step per epoch
    assert global_batch % 2 == 0
    settings = Settings.from_dict({**M4_SMALL, "data": data.source, "batch_size": global_batch,
                                   "optimizer": "sgd", "learning_rate": 0.5, "num_epochs": 1})
    init = tmp_path / "init"
    init.mkdir()
    build_model(settings).save(str(init / "model.keras"))
    (init / "state.json").write_text(TrainState().to_json())
    (init / "settings.json").write_text(settings.to_json())

    result = run_finetune(settings, _options(tmp_path, "sync", init_from=str(init)),
                          data=data)
    distributed = load_checkpoint_model(str(Path(result.best_uri, "model.keras")))
    reference_run = train(settings, data, tmp_path / "one-worker", resume_from=init,
                          evaluate_test=False)
    reference = load_checkpoint_model(str(reference_run.best_checkpoint / "model.keras"))
    initial = load_checkpoint_model(str(init / "model.keras"))

    step = np.concatenate([(r - i).ravel() for r, i in
                           zip(reference.get_weights(), initial.get_weights())])
    gap = np.concatenate([(d - r).ravel() for d, r in
                          zip(distributed.get_weights(), reference.get_weights())])
    # An unsynchronised worker would be off by about half its step (its half-batch gradient
    # differs from the full batch's); summing instead of averaging, by a whole step.
    assert np.linalg.norm(step) > 1e-2
    assert np.linalg.norm(gap) < 1e-3 * np.linalg.norm(step)
    assert [m["epoch"] for m in result.record.history] == [1]
    sync_options = _options(tmp_path, "sync")
    assert {m["replicas"] for m in _reports(sync_options)} == {2}  # one step, two replicas


@pytest.mark.slow
def test_tracking_tensorboard_and_mlflow_follow_the_record(ray_cluster, m4_data, tmp_path,
                                                           monkeypatch):
    """--tracking for a Ray Train run: TensorBoard scalars per epoch and HParams, and an MLflow
    parent (the run's name) and child (the trial) in the default store, matching the record."""
    from mlflow import MlflowClient

    from cifar_core.tracking import finetune_options, mlflow_tracking_uri
    from tests.test_tracking import read_events

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings.from_dict({**M4_SMALL, "data": m4_data.source, "num_epochs": 2,
                                   "learning_rate": 3e-3})
    options = _options(tmp_path, "tb", tracking="tensorboard")
    record = run_finetune(settings, options, data=m4_data).record
    files = list((Path(options.run_uri) / storage.TENSORBOARD_DIR).glob("events.out.*"))
    assert len(files) == 1
    hparams, metric_tags, events = read_events(files[0])
    # The HParams: the model and what differs from its defaults (limit, epochs, rate, ...).
    assert hparams["model"] == "M4" and hparams["learning_rate"] == pytest.approx(3e-3)
    assert hparams["num_epochs"] == 2 and "data" not in hparams
    assert metric_tags == {"test_accuracy", "val_accuracy"}
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        logged = [(s.step, s.value) for s in events.Scalars(key)]
        assert logged == [(epoch["epoch"], pytest.approx(epoch[key], rel=1e-6))
                          for epoch in record.history], key
    assert "replicas" not in events.Tags()["scalars"]  # bookkeeping, not a metric

    options = _options(tmp_path, "ml", tracking="mlflow")
    record = run_finetune(settings, options, data=m4_data).record
    uri = mlflow_tracking_uri(finetune_options("mlflow", options.name, options.storage, "M4"))
    assert uri == f"sqlite:///{Path(options.run_uri, 'mlflow.db')}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ml").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == len(children) == 1
    child = children[0]
    assert parents[0].info.status == child.info.status == "FINISHED"
    assert child.data.tags["cifar.trial_id"] == record.trial_id
    assert child.data.tags["cifar.best_checkpoint"] == record.checkpoint_uri
    assert child.data.params == {k: str(v) for k, v in record.settings.items()}
    assert child.data.metrics["test_accuracy"] == pytest.approx(record.test_accuracy)
    for key in ("loss", "val_accuracy"):
        logged = sorted((m.step, m.value)
                        for m in client.get_metric_history(child.info.run_id, key))
        assert logged == [(epoch["epoch"], pytest.approx(epoch[key]))
                          for epoch in record.history], key
    assert not any("replicas" in key or "start_epoch" in key for key in child.data.metrics)


def test_tensorboard_events_of_a_train_run_reach_s3_storage(tmp_path, s3_bucket,
                                                            monkeypatch):
    """The event file is written in the local cache and uploaded after every epoch."""
    from cifar_core.tracking import TrainEvents, finetune_options
    from tests.test_tracking import read_events

    monkeypatch.setenv("CIFAR_FLEET_CACHE", str(tmp_path / "cache"))
    options = finetune_options("tensorboard", "m4-s3", f"s3://{s3_bucket}/runs", "M4")
    settings = Settings.from_dict({"model": "M4", "learning_rate": 0.5})
    events = TrainEvents(options, Cell(settings, "abc", sweep_uri=options.sweep_uri))
    remote = storage.join_uri(options.sweep_uri, storage.TENSORBOARD_DIR)
    history = [{"epoch": 1, "loss": 2.0, "val_accuracy": 0.3, "best_val_accuracy": 0.3},
               {"epoch": 2, "loss": 1.5, "val_accuracy": 0.4, "best_val_accuracy": 0.4}]
    events.log(history[0])
    assert len(storage.list_files(remote)) == 1  # there after the first epoch
    events.log(history[1])
    events.log({**history[1], "test_accuracy": 0.38})
    (uri,) = storage.list_files(remote)
    local = tmp_path / "copy" / uri.rsplit("/", 1)[-1]
    local.parent.mkdir()
    local.write_bytes(storage.read_bytes(uri))
    hparams, metric_tags, read = read_events(local)
    assert hparams == {"model": "M4", "learning_rate": 0.5}
    assert metric_tags == {"test_accuracy", "val_accuracy"}
    assert [(s.step, s.value) for s in read.Scalars("loss")] == [(1, 2.0), (2, 1.5)]


def test_tracking_needs_its_extra_before_anything_starts(tmp_path, image_folder, monkeypatch,
                                                         capsys):
    from jobs.finetune import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails: not installed
    code = main(["--storage", str(tmp_path / "store"), "--tracking", "mlflow", "--model", "M4",
                 "--data", str(image_folder), "--limit", "100"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--tracking mlflow needs the mlflow package" in err
    assert 'pip install "cifar-fleet[tracking]"' in err
    assert not (tmp_path / "store").exists()  # refused before Ray or any file


# ---------------------------------------------------------------------------- Tune
@pytest.mark.slow
def test_runs_as_a_tune_trial_with_its_own_workers(ray_cluster, m4_data, s3_bucket, tmp_path):
    """A sweep cell trained by a 2-worker Train run inside a Tune trial; records go to s3."""
    from ray import tune

    from cifar_core.search import CellBook
    from cifar_core.sweep import run_trial

    settings = Settings.from_dict({**M4_SMALL, "data": m4_data.source, "num_epochs": 3})
    sweep_uri = f"s3://{s3_bucket}/sweeps/m7gpu"
    # The sweep's shape: config names the cell; cells and data come through the object store.
    cells = {"M4-cell0": Cell(settings, "cell0", sweep="m7gpu", sweep_uri=sweep_uri,
                              workers={"num_workers": 2, "cpus_per_worker": 0.5,
                                       "max_failures": 0, "scratch_dir": str(tmp_path)})}
    tuner = tune.Tuner(
        tune.with_parameters(run_trial, data=m4_data, book=CellBook(cells)),  # trial: 1 CPU
        param_space={"trial_id": "M4-cell0"},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="sweep"))
    results = tuner.fit()
    assert results.errors == []
    frame = results[0].metrics_dataframe
    # Every epoch reached Tune (for its scheduler); the last one only after the record was
    # written, with the test accuracy.
    assert list(frame["epoch"]) == [1, 2, 3]
    assert frame["test_accuracy"].isna().tolist() == [True, True, False]
    trial_uri = f"{sweep_uri}/trials/M4-cell0"
    record = TrialRecord.from_json(storage.read_text(f"{trial_uri}/trial.json"))
    _check_record(record, epochs=3)
    assert record.test_accuracy == frame["test_accuracy"].iloc[-1]
    assert record.sweep == "m7gpu" and record.resources["workers"] == 2
    assert record.checkpoint_uri == f"{trial_uri}/best"
    assert storage.exists(f"{trial_uri}/best/model.keras")
    assert storage.exists(f"{sweep_uri}/finetune-M4-cell0/checkpoint_manager_snapshot.json")


# ---------------------------------------------------------------------------- worker faults
def _loop_killing_a_worker(marker: str, rank: int, epoch: int, registered_in: FinetuneOptions):
    """The real worker loop, except that ``rank`` dies (os._exit) after reporting ``epoch``,
    once (the marker file lets the restarted worker live). It first waits until the run's
    snapshot in storage holds that epoch's checkpoint, so the death comes while the other
    worker trains the next epoch. (Ray Train's controller collects reports by polling, every
    2 s: a worker dying within that window of a report makes the restart redo that epoch too,
    so "at most one epoch lost" is the bound, the last reported checkpoint the usual case.)"""

    def loop(config: dict) -> None:
        import ray.train

        from cifar_core.multiworker import latest_report, train_loop_per_worker

        report = ray.train.report

        def report_then_die(metrics, checkpoint=None, **kwargs):
            report(metrics, checkpoint=checkpoint, **kwargs)
            if (ray.train.get_context().get_world_rank() == rank
                    and metrics.get("epoch") == epoch and "test_accuracy" not in metrics
                    and not os.path.exists(marker)):
                deadline = time.time() + 120
                while time.time() < deadline:
                    latest = latest_report(registered_in)
                    if latest is not None and latest[1]["epoch"] >= epoch:
                        break
                    time.sleep(0.5)
                Path(marker).touch()
                os._exit(1)

        ray.train.report = report_then_die
        train_loop_per_worker(config)

    return loop


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint(ray_cluster, m4_data, tmp_path):
    settings = Settings.from_dict({**M4_SMALL, "data": m4_data.source, "num_epochs": 4})
    options = _options(tmp_path, "workerkill", max_failures=1)
    marker = tmp_path / "killed"
    result = run_finetune(settings, options, data=m4_data,
                          train_loop=_loop_killing_a_worker(str(marker), rank=1, epoch=2,
                                                            registered_in=options))
    assert marker.exists()
    _check_record(result.record, epochs=4)
    starts = {m["epoch"]: m["start_epoch"] for m in _reports(options)}
    # Epochs 1-2 ran in the first attempt; rank 1 died during epoch 3; the restart began at
    # the epoch-2 checkpoint: only the epoch in progress was lost.
    assert starts == {1: 0, 2: 0, 3: 2, 4: 2}

    # Ray rewrites its snapshot after every report; read mid-rewrite it is cut short. Such a
    # read is retried (the writer finishes), and one that never parses still fails.
    snapshot = Path(options.run_uri) / RAY_SNAPSHOT_FILE
    whole = snapshot.read_text()
    snapshot.write_text(whole[: len(whole) // 2])
    rewrite = threading.Timer(1.0, snapshot.write_text, args=(whole,))
    rewrite.start()
    assert latest_report(options)[1]["epoch"] == 4
    rewrite.join()
    snapshot.write_text(whole[: len(whole) // 2])
    with pytest.raises(Exception) as torn:
        latest_report(options)
    assert isinstance(torn.value.__cause__, json.JSONDecodeError)


@pytest.mark.slow
def test_killed_worker_without_retries_fails_clearly(ray_cluster, m4_data, tmp_path):
    settings = Settings.from_dict({**M4_SMALL, "data": m4_data.source, "num_epochs": 3})
    options = _options(tmp_path, "noretry", max_failures=0)
    with pytest.raises(FinetuneError) as raised:
        run_finetune(settings, options, data=m4_data,
                     train_loop=_loop_killing_a_worker(str(tmp_path / "killed"), 1, 1,
                                                       registered_in=options))
    message = str(raised.value)
    assert "failed after the 0 restart(s) --max-failures allows" in message
    assert "--resume" in message and "worker" in message.lower()
    record_uri = storage.find_files(options.run_uri, "trial.json")[0]
    record = TrialRecord.from_json(storage.read_text(record_uri))
    assert record.status == "errored" and record.epochs_run == 1
    assert record.checkpoint_uri is not None  # the epoch-1 checkpoint, to resume from


# ---------------------------------------------------------------------------- driver kill
def _job(args: list[str], log: Path) -> subprocess.Popen:
    """``cifar finetune`` as a driver process of its own, on this module's Ray."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "jobs.finetune", *args], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 3 min seen at load average 10 on 2 cores, 11 min at load 30
def test_m7_both_phases_survive_a_driver_kill(ray_cluster, image_folder, staged_weights,
                                              s3_bucket, tmp_path):
    """M7 on 2 workers with s3:// weights and storage: the driver is SIGKILLed once phase 1 has
    reported, a new driver with --resume continues at the recorded phase and epoch, trains
    phase 2 and exports; phase 1 trains none of the backbone, phase 2 exactly its last 50
    layers."""
    from cifar_core.models import backbone_of, load_checkpoint_model

    weights_uri = f"s3://{s3_bucket}/weights/{staged_weights.name}"
    storage.upload_tree(staged_weights.parent, f"s3://{s3_bucket}/weights")
    store = f"s3://{s3_bucket}/runs"
    args = ["--name", "m7", "--storage", store, "--data", str(image_folder),
            "--backbone-weights", weights_uri, "--num-workers", "2", "--max-failures", "0",
            "--keep-checkpoints", "20", "--scratch-dir", str(tmp_path),
            "--address", os.environ["RAY_ADDRESS"],
            *[f"--{k.replace('_', '-')}={v}" for k, v in M7_SMALL.items()]]
    options = _options(tmp_path, "m7", storage=store)
    log = tmp_path / "driver.log"

    first = _job(args, log)  # 2 epochs of phase 1, 1 of phase 2
    try:
        deadline = time.time() + 900
        # Killed once phase 1 is over: the new driver must start phase 2 at epoch 3.
        while (latest_report(options) or (None, {"epoch": 0}))[1]["epoch"] < 2:
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "phase 1 not reported within 15 minutes"
            time.sleep(1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver's own session: only what we started
        first.wait()
    _, at_kill = latest_report(options)
    assert at_kill["epoch"] < 3, "the run finished before the driver was killed"

    second = _job([*args, "--resume"], log)
    assert second.wait(timeout=1200) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert f"after epoch {at_kill['epoch']} (phase {at_kill['phase']})" in output

    reports = _reports(options)
    resumed = [m for m in reports if m["epoch"] > at_kill["epoch"]]
    assert resumed and all(m["start_epoch"] == at_kill["epoch"] for m in resumed)
    assert [(m["epoch"], m["phase"]) for m in reports if "test_accuracy" not in m] == [
        (1, 1), (2, 1), (3, 2)]
    record_uri = storage.find_files(options.run_uri, "trial.json")[0]
    record = TrialRecord.from_json(storage.read_text(record_uri))
    _check_record(record, epochs=3)
    assert [m["phase"] for m in record.history] == [1, 1, 2]
    assert storage.exists(f"{record.checkpoint_uri}/evaluation.json")

    # Phase facts, from the weights each epoch's checkpoint holds.
    models = {}
    for checkpoint in storage.find_files(options.run_uri, "state.json"):
        folder = checkpoint.rsplit("/", 1)[0]
        if not folder.endswith("/last"):
            continue
        state = json.loads(storage.read_text(checkpoint))
        local = storage.download_tree(folder, tmp_path / "ckpt" / str(state["epoch"]))
        models.setdefault(state["epoch"], load_checkpoint_model(str(local / "model.keras")))
    changed = {epochs: _changed_layers(models[epochs[0]], models[epochs[1]])
               for epochs in ((1, 2), (2, 3))}
    backbone_size = len(backbone_of(models[3]).layers)
    assert not [i for i in changed[(1, 2)] if isinstance(i, int)]  # phase 1: backbone frozen
    head = {name for name in changed[(1, 2)] if isinstance(name, str)}
    assert "predictions" in head and any(n.startswith("dense") for n in head)  # head trains
    # Layers that have weights a phase could train (independent of the saved trainable flags).
    with_weights = {i for i, layer in enumerate(backbone_of(models[3]).layers)
                    if any("moving_" not in w.name for w in layer.weights)}
    assert {i for i in changed[(2, 3)] if isinstance(i, int)} == {
        i for i in with_weights if i >= backbone_size - 50}       # phase 2: exactly the last 50


def _changed_layers(before, after) -> set:
    """Backbone layer indices and head layer names whose trainable weights differ; moving
    statistics (non-trainable) must never change."""
    from cifar_core.models import backbone_of

    changed: set = set()
    pairs = [(i, a, b) for i, (a, b) in enumerate(zip(backbone_of(before).layers,
                                                      backbone_of(after).layers))]
    pairs += [(a.name, a, b) for a, b in zip(before.layers, after.layers)
              if a.name != "backbone"]
    for key, a, b in pairs:
        for wa, wb in zip(a.weights, b.weights):
            differs = not np.array_equal(wa.numpy(), wb.numpy())
            if differs and "moving_" in wa.name:
                raise AssertionError(f"BatchNorm statistic {wa.name} changed")
            if differs:
                changed.add(key)
    return changed
