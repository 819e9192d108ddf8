"""Experiment tracking: MLflow runs and TensorBoard event files of real smoke sweeps (read back
and compared with the trial records), a real MLflow server, and the errors for a missing extra
or an unusable store."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cifar_core.plan import SweepError, SweepOptions
from cifar_core.sweep import read_records, run_sweep
from cifar_core.tracking import MLFLOW_DB, describe, mlflow_tracking_uri

EXTRA = 'pip install "cifar-fleet[tracking]"'


def options(tmp_path, image_folder, rates=(0.01, 0.05), **kwargs) -> SweepOptions:
    """A smoke sweep of M1 over ``rates``, 2 epochs each."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"M1": {"learning_rate": list(rates)}}))
    base = dict(name="sweep", storage=str(tmp_path / "store"), models=("M1",), grid=str(grid),
                smoke_test=True, overrides={"data": str(image_folder), "num_epochs": 2})
    return SweepOptions(**{**base, **kwargs})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ---------------------------------------------------------------------------- MLflow
def sweep_runs(uri: str, name: str):
    """(client, parent runs, child runs) of experiment ``name`` at ``uri``."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def check_runs_match_records(uri: str, opts: SweepOptions) -> None:
    """One parent; one child per record, holding its settings, epochs and provenance."""
    client, parents, children = sweep_runs(uri, opts.name)
    records = read_records(opts.sweep_uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_cell = {run.data.tags["cifar.trial_id"]: run for run in children}
    assert len(children) == len(by_cell) and set(by_cell) == {r.trial_id for r in records}
    for record in records:
        run = by_cell[record.trial_id]
        assert run.info.status == "FINISHED" and run.info.run_name == record.trial_id
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.params == {k: str(v) for k, v in record.settings.items()}
        assert run.data.tags["mlflow.source.git.commit"] == record.provenance["git_commit"]
        assert run.data.tags["cifar.data"] == record.settings["data"]
        assert run.data.tags["cifar.best_checkpoint"] == record.checkpoint_uri
        assert run.data.metrics["test_accuracy"] == pytest.approx(record.test_accuracy)
        assert len(record.history) == 2
        for key in set(record.history[0]) - {"epoch"}:
            logged = sorted((m.step, m.value) for m in client.get_metric_history(
                run.info.run_id, key))
            assert logged == [(epoch["epoch"], pytest.approx(epoch[key]))
                              for epoch in record.history], key


def test_mlflow_parent_and_child_runs_match_the_records(tmp_path, image_folder, ray_local,
                                                        no_mlflow_env, monkeypatch):
    opts = options(tmp_path, image_folder, tracking="mlflow")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # MLflow's own default store and artifacts: ./mlruns
    run_sweep(opts)
    uri = mlflow_tracking_uri(opts)
    assert uri == f"sqlite:///{Path(opts.sweep_uri, MLFLOW_DB)}"  # the default: in the sweep
    assert uri in describe(opts)
    check_runs_match_records(uri, opts)
    assert not any((tmp_path / "cwd").iterdir())


@pytest.mark.slow
def test_mlflow_server_gets_the_runs_a_resubmission_reuses_the_parent_and_its_death_is_named(
        tmp_path, image_folder, ray_local, caplog):
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    # Its own session: the server's workers are in our process group, ended with it below.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{uri}/health", server, tmp_path / "server.log")
        first = options(tmp_path, image_folder, rates=(0.01,), tracking="mlflow",
                        mlflow_tracking_uri=uri)
        run_sweep(first)
        assert len(sweep_runs(uri, "sweep")[2]) == 1
        # The grid grows: only the new cell runs, under the same parent run.
        extended = options(tmp_path, image_folder, rates=(0.01, 0.05), tracking="mlflow",
                           mlflow_tracking_uri=uri)
        run_sweep(extended)
        check_runs_match_records(uri, extended)
        assert not Path(extended.sweep_uri, MLFLOW_DB).exists()
        # The server dies as the next submission starts: one warning names it, training goes on.
        third = options(tmp_path, image_folder, rates=(0.01, 0.05, 0.1), tracking="mlflow",
                        mlflow_tracking_uri=uri)
        killer = threading.Thread(target=kill_when_parent_runs, args=(uri, server))
        killer.start()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cifar_core.tracking"):
            run_sweep(third)
        killer.join()
        assert server.poll() is not None
        records = read_records(third.sweep_uri)
        assert len(records) == 3 and {r.status for r in records} == {"completed"}
        # Warnings only: an earlier test in this process may have set the jobs' loggers to
        # INFO (jobs.configure_logging), which lets the parent-run notice through as well.
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "cifar_core.tracking" and r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and uri in warnings[0] and "Training goes on" in warnings[0]
    finally:
        stop_group(server)
        log.close()


def kill_when_parent_runs(uri: str, server: subprocess.Popen, timeout_s=120.0) -> None:
    """SIGKILL the server (its process group, by its pid) once the parent run is running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parents = sweep_runs(uri, "sweep")[1]
        if parents and parents[0].info.status == "RUNNING":
            break
        time.sleep(0.1)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(10)


def wait_until_answers(url: str, process: subprocess.Popen, log: Path, timeout_s=90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"mlflow server exited:\n{log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer {url} in {timeout_s} s")


def stop_group(process: subprocess.Popen) -> None:
    """End the process we started and its children (its own process group, by its pid)."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------- TensorBoard
def read_events(path: Path):
    """(hparams, metric tags of the HParams view, event accumulator) of one event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return hparams, {m.name.tag for m in experiment.metric_infos}, events


def check_events_match_records(files: list[Path], records: list) -> None:
    """One event file per trial, with its varied settings as HParams and a scalar per epoch."""
    by_id = {record.trial_id: record for record in records}
    assert len(files) == len(by_id)
    for path in files:
        hparams, metrics, events = read_events(path)
        record = by_id.pop(hparams["trial_id"])
        assert path.parent.name.startswith(record.trial_id)
        assert hparams == {"trial_id": record.trial_id, "model": "M1",
                           "learning_rate": record.settings["learning_rate"]}
        assert "ray/tune/val_accuracy" in metrics
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            logged = [(s.step, s.value) for s in events.Scalars(f"ray/tune/{key}")]
            # Event files hold float32 values.
            assert logged == [(epoch["epoch"], pytest.approx(epoch[key], rel=1e-6))
                              for epoch in record.history], key


def test_tensorboard_events_hold_hparams_and_scalars_per_epoch(tmp_path, image_folder,
                                                                ray_local):
    opts = options(tmp_path, image_folder, tracking="tensorboard")
    run_sweep(opts)
    assert describe(opts) == f"TensorBoard: tensorboard --logdir {opts.sweep_uri}"
    records = read_records(opts.sweep_uri)
    assert len(records) == 2
    check_events_match_records(sorted(Path(opts.sweep_uri).glob("*/events.out.tfevents.*")),
                               records)


@pytest.mark.slow
def test_tensorboard_events_reach_s3_storage(tmp_path, image_folder, s3_bucket, ray_local):
    import boto3

    opts = options(tmp_path, image_folder, tracking="tensorboard",
                   storage=f"s3://{s3_bucket}/sweeps")
    run_sweep(opts)
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="sweeps/sweep/")
            ["Contents"] if "/events.out.tfevents." in o["Key"]]
    files = []
    for key in keys:  # Ray's syncer uploaded them with the rest of the trial's folder
        files.append(tmp_path / "events" / key)
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(s3_bucket, key, str(files[-1]))
    check_events_match_records(files, read_records(opts.sweep_uri))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("tracking, module", [("mlflow", "mlflow"),
                                              ("tensorboard", "tensorboard")])
def test_a_missing_extra_is_named_before_anything_starts(tmp_path, monkeypatch, tracking,
                                                         module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails, as if not installed
    opts = SweepOptions(name="sweep", storage=str(tmp_path), models=("M1",), grid="seed",
                        tracking=tracking)
    with pytest.raises(SweepError, match=re.escape(EXTRA)) as error:
        run_sweep(opts)
    assert module in str(error.value)
    assert not Path(opts.sweep_uri).exists()  # nothing written, no Ray started


def test_mlflow_on_s3_storage_needs_a_tracking_uri(no_mlflow_env):
    opts = SweepOptions(name="sweep", storage="s3://bucket/sweeps", models=("M1",),
                        grid="seed", tracking="mlflow")
    with pytest.raises(SweepError, match="--mlflow-tracking-uri"):
        run_sweep(opts)


def test_a_damaged_default_store_is_named_and_kept(tmp_path, no_mlflow_env):
    opts = SweepOptions(name="sweep", storage=str(tmp_path), models=("M1",), grid="seed",
                        tracking="mlflow")
    store = Path(opts.sweep_uri, MLFLOW_DB)
    store.parent.mkdir()
    store.write_bytes(b"not a database")
    with pytest.raises(SweepError, match=re.escape(str(store))):
        run_sweep(opts)
    assert store.read_bytes() == b"not a database"


def test_an_unreachable_mlflow_server_is_named(tmp_path, capsys):
    from jobs.tune import main

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    code = main(["--models", "M1", "--grid", "seed", "--storage", str(tmp_path), "--name",
                 "sweep", "--tracking", "mlflow", "--mlflow-tracking-uri", uri])
    assert code == 2  # an invalid option: nothing started
    assert f"MLflow tracking URI {uri}: " in capsys.readouterr().err
    assert time.monotonic() - started < 30  # MLflow's retries are bounded
    assert not (tmp_path / "sweep").exists()
