"""Experiment tracking for ``cifar tune --tracking none|tensorboard|mlflow`` (docs/tracking.md).

- ``tensorboard``: Ray Tune's own ``TBXLoggerCallback``, which already writes every reported
  metric as a ``ray/tune/<name>`` scalar into each trial's folder under the sweep
  (``<sweep_uri>/<trial_id>_<ray id>/events.out.tfevents.*``, synced to ``s3://`` storage like
  the rest of Ray's files) and an HParams summary when the trial ends. Two changes: the step is
  the epoch, and the HParams are the trial's varied settings.
- ``mlflow``: one parent run per sweep, reused when the sweep is submitted again, and one child
  run per cell (params: all its settings; metrics: every epoch, ``step=epoch``; tags: cell id,
  git commit, data source, best checkpoint). Logged from the driver with ``MlflowClient``; by
  default into ``sqlite:///<sweep_uri>/mlflow.db``.

Tracking never stops a sweep: a failing MLflow store is named once and tracking ends, while
training goes on and every trial's record keeps its settings and per-epoch metrics.
mlflow and tensorboard are imported lazily (``sweep.py`` imports this module).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Callable

from cifar_core import storage
from cifar_core.plan import SweepError, SweepOptions
from cifar_core.records import Cell, TrialRecord

log = logging.getLogger(__name__)

EXTRA = 'pip install "cifar-fleet[tracking]"'
#: The default MLflow store and its artifact root, inside the sweep's (local) storage.
MLFLOW_DB, MLFLOW_ARTIFACTS = storage.MLFLOW_DB, storage.MLFLOW_ARTIFACTS
#: Our MLflow tags; runs are found again by these on a re-submission.
SWEEP_KEY, ROLE, CELL_TAG = "cifar.sweep_key", "cifar.role", "cifar.trial_id"
#: MLflow's settings around our calls (a value the user exported wins). Its HTTP defaults
#: (7 retries, backoff factor 2, 120 s timeout) would hold the Tune driver, and with it every
#: trial's next report, for minutes when a server goes away; and it prints a "View run" URL
#: to stdout at every run's end, through the sweep's progress line.
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


# ---------------------------------------------------------------------------- the sweep's hooks
def check_available(options: SweepOptions) -> None:
    """Before Ray starts: the packages ``options.tracking`` needs, and the MLflow store."""
    if options.tracking == "tensorboard":
        _require(options, "tensorboard", "to read the event files", EXTRA)
        _require(options, "tensorboardX", "Ray Tune's event-file writer",
                 'pip install "ray[tune]"')
    elif options.tracking == "mlflow":
        _require(options, "mlflow", "its client and store", EXTRA)
        _check_mlflow_store(options)


def tune_callbacks(options: SweepOptions, cell_of: Callable[[dict], Cell]) -> list:
    """The Tune callbacks ``options.tracking`` asks for (``cell_of``: a trial config's cell)."""
    if options.tracking == "tensorboard":
        return [_tensorboard_logger()]
    if options.tracking == "mlflow":
        return [_mlflow_callback(MlflowRuns(options, cell_of))]
    return []


def describe(options: SweepOptions) -> str | None:
    """Where to look at the sweep's tracking, as a line for a person (None: no tracking)."""
    if options.tracking == "tensorboard":
        return f"TensorBoard: tensorboard --logdir {options.sweep_uri}"
    if options.tracking == "mlflow":
        uri = mlflow_tracking_uri(options)
        if uri.startswith("sqlite:"):
            return f"MLflow: mlflow ui --backend-store-uri {uri} (experiment {options.name!r})"
        return f"MLflow: experiment {options.name!r} at {uri}"
    return None


def mlflow_tracking_uri(options: SweepOptions) -> str:
    """``--mlflow-tracking-uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store in the
    sweep's folder (MLflow 3 refuses new file stores, ``./mlruns``, without an opt-in)."""
    return (options.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or _default_store(options))


def _default_store(options: SweepOptions) -> str:
    return "sqlite:///" + str(Path(options.sweep_uri).resolve() / MLFLOW_DB)


def _require(options: SweepOptions, module: str, purpose: str, install: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as error:
        raise SweepError(f"--tracking {options.tracking} needs the {module} package "
                         f"({purpose}), which does not import ({error}); install it: "
                         f"{install}") from None


def _check_mlflow_store(options: SweepOptions) -> None:
    """A store we can use: not SQLite inside an object store; a given store, or our SQLite
    file once an earlier submission made it, opens and answers."""
    uri = options.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if storage.is_s3(options.storage):
            raise SweepError(
                f"--tracking mlflow with storage {options.storage}: the default MLflow store is "
                "a SQLite file in the sweep's folder, which cannot live in S3; give "
                "--mlflow-tracking-uri http://HOST:5000 (an MLflow server) or a local "
                "sqlite:////path/mlflow.db")
        uri = _default_store(options)
        if not (Path(options.sweep_uri) / MLFLOW_DB).exists():
            return  # made when the sweep starts
    from mlflow import MlflowClient

    problem = experiment = None
    try:
        with mlflow_env():
            experiment = MlflowClient(uri).get_experiment_by_name(options.name)
    except Exception as error:  # MLflow raises many kinds; all mean "cannot use this store"
        problem = _short(error)
    if problem:
        # Raised outside the handler: jobs/tune.py's storage.unreachable() walks __context__
        # and stumbles on requests' exceptions (their .response is None).
        raise SweepError(f"MLflow tracking URI {uri}: {problem}")
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise SweepError(f"MLflow experiment {options.name!r} at {uri} is deleted; restore "
                         f"it (mlflow experiments restore --experiment-id "
                         f"{experiment.experiment_id}) or choose another --name")


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"


@contextlib.contextmanager
def mlflow_env():
    """``MLFLOW_ENV`` for the MLflow calls inside."""
    added = {k: v for k, v in MLFLOW_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


# ---------------------------------------------------------------------------- TensorBoard
def _tensorboard_logger():
    """Ray's TensorBoard logger, stepping by epoch, with the trial's config as HParams."""
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.result import TIMESTEPS_TOTAL
    from ray.tune.utils import flatten_dict

    class EpochTBXLogger(TBXLoggerCallback):
        def log_trial_result(self, iteration, trial, result):
            # Ray's step is timesteps_total when reported, else training_iteration, which
            # starts at 1 again when --resume continues a cell in a new Tune trial; the epoch
            # keeps counting, so an attempt's curve continues the earlier one's.
            if "epoch" in result:
                result = {**result, TIMESTEPS_TOTAL: result["epoch"]}
            super().log_trial_result(iteration, trial, result)

        def log_trial_end(self, trial, failed=False):
            # Ray writes trial.evaluated_params as the HParams, and its basic variant generator
            # puts only grid_search values there: here just trial_id. The varied settings are
            # sample_from values of the config (sweep.param_space), so hand Ray the config.
            evaluated, trial.evaluated_params = trial.evaluated_params, flatten_dict(trial.config)
            try:
                super().log_trial_end(trial, failed)
            finally:
                trial.evaluated_params = evaluated

    return EpochTBXLogger()


# ---------------------------------------------------------------------------- MLflow
def _mlflow_callback(runs: "MlflowRuns"):
    """A Tune callback (run in the driver) handing each event to ``runs``."""
    from ray.tune import Callback

    class MlflowCallback(Callback):
        def setup(self, **info):
            runs.guard("opening the sweep's parent run", runs.start)

        def on_trial_start(self, iteration, trials, trial, **info):
            runs.guard("starting a trial's run", runs.start_trial, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            runs.guard("logging an epoch", runs.log_epoch, trial.config, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            runs.guard("ending a trial's run", runs.end_trial, trial.config, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            runs.guard("ending a trial's run", runs.end_trial, trial.config, "FAILED")

        def on_experiment_end(self, trials, **info):
            runs.guard("ending the sweep's runs", runs.end, [t.status for t in trials])

    return MlflowCallback()


class MlflowRuns:
    """A sweep's MLflow runs: one parent per sweep (found again by its ``cifar.sweep_key``
    tag), one child per cell (found again by its ``cifar.trial_id`` under that parent)."""

    def __init__(self, options: SweepOptions, cell_of: Callable[[dict], Cell]):
        self.options, self.cell_of = options, cell_of
        self.uri = mlflow_tracking_uri(options)
        self.client = None                 # made in start(): opening a store does work
        self.experiment_id = self.parent = None
        self.runs: dict[str, str] = {}     # cell id -> open child run id
        self.commit = "unknown"
        self.broken = False

    def guard(self, what: str, call: Callable, *args) -> None:
        """Run ``call``; on its first failure say what failed and stop tracking this sweep."""
        if self.broken:
            return
        try:
            with mlflow_env():
                call(*args)
        except Exception as error:  # tracking must never end a sweep
            self.broken = True
            log.warning("cifar: MLflow tracking at %s failed while %s (%s); no more "
                        "MLflow logging in this run. Training goes on, and each trial's "
                        "record (trials/<id>/) keeps its settings and per-epoch metrics.",
                        self.uri, what, _short(error))

    def start(self) -> None:
        from mlflow import MlflowClient

        from cifar_core.provenance import git_commit

        self.client = MlflowClient(self.uri)
        self.commit = git_commit()
        self.experiment_id = self._experiment()
        sweep_key = hashlib.sha256(self.options.sweep_uri.encode()).hexdigest()[:16]
        self.parent = self._find_or_create(
            {SWEEP_KEY: sweep_key, ROLE: "sweep"}, self.options.name,
            {"cifar.sweep_uri": self.options.sweep_uri})
        self.client.set_tag(self.parent, "mlflow.source.git.commit", self.commit)
        where = self.uri
        if self.uri.startswith(("http://", "https://")):
            where = (f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}"
                     f"/runs/{self.parent}")
        log.info("cifar tune: MLflow parent run %s of experiment %r: %s", self.parent,
                 self.options.name, where)

    def _experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.options.name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.uri == _default_store(self.options):
            # A SQLite store's default artifact root is ./mlruns in the working directory.
            location = (Path(self.options.sweep_uri).resolve() / MLFLOW_ARTIFACTS).as_uri()
        return self.client.create_experiment(self.options.name, artifact_location=location)

    def _find_or_create(self, match: dict[str, str], name: str, tags: dict[str, str]) -> str:
        """The newest run tagged with ``match`` (set running again), else a new one."""
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in match.items())
        found = self.client.search_runs([self.experiment_id], query, max_results=1,
                                        order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        return self.client.create_run(self.experiment_id, run_name=name,
                                      tags={**match, **tags}).info.run_id

    def start_trial(self, config: dict) -> None:
        from mlflow.entities import Param, RunTag

        cell = self.cell_of(config)
        if cell.trial_id in self.runs:  # Tune restarts a failed trial: the same run goes on
            self.client.update_run(self.runs[cell.trial_id], status="RUNNING")
            return
        run_id = self._find_or_create(
            {"mlflow.parentRunId": self.parent, CELL_TAG: cell.trial_id}, cell.trial_id, {})
        self.runs[cell.trial_id] = run_id
        tags = {"mlflow.source.git.commit": self.commit, "cifar.data": cell.settings.data,
                "cifar.model": cell.settings.model, "cifar.sweep_uri": cell.sweep_uri,
                "cifar.record_uri": cell.record_uri}
        # Params cannot change once logged; a cell's id hashes its settings, so a reused run
        # gets the same values again.
        self.client.log_batch(
            run_id, params=[Param(k, str(v)) for k, v in cell.settings.to_dict().items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_epoch(self, config: dict, result: dict) -> None:
        from mlflow.entities import Metric

        if "epoch" not in result:
            return
        stamp, step = int(time.time() * 1000), int(result["epoch"])
        self.client.log_batch(self.runs[self.cell_of(config).trial_id], metrics=[
            Metric(key, value, stamp, step) for key, value in epoch_metrics(result).items()])

    def end_trial(self, config: dict, status: str) -> None:
        """Close the cell's run; a completed trial's record adds its test metrics and best
        checkpoint (scheduler-stopped trials get their record later, from the driver)."""
        from mlflow.entities import Metric, RunTag

        cell = self.cell_of(config)
        run_id = self.runs.pop(cell.trial_id)
        data = storage.read_many([cell.record_uri], cell.s3_endpoint)[0]
        if status == "FINISHED" and not isinstance(data, BaseException):
            record = TrialRecord.from_json(data)
            stamp = int(time.time() * 1000)
            metrics = [Metric(name, float(getattr(record, name)), stamp, record.epochs_run)
                       for name in ("test_accuracy", "test_loss")
                       if getattr(record, name) is not None]
            tags = {"cifar.status": record.status, "cifar.stop_reason": record.stop_reason}
            if record.checkpoint_uri:
                tags["cifar.best_checkpoint"] = record.checkpoint_uri
            self.client.log_batch(run_id, metrics=metrics,
                                  tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run_id, status)

    def end(self, trial_statuses: list[str]) -> None:
        """Close runs Tune left open (a Ctrl-C) and the parent, with the sweep's outcome."""
        for run_id in self.runs.values():
            self.client.set_terminated(run_id, "KILLED")
        self.runs.clear()
        if self.parent is None:
            return
        status = ("FAILED" if "ERROR" in trial_statuses else "FINISHED"
                  if all(s == "TERMINATED" for s in trial_statuses) else "KILLED")
        self.client.set_terminated(self.parent, status)


def epoch_metrics(result: dict) -> dict[str, float]:
    """A Tune result's own metrics (Keras names, learning_rate, ...), without Ray's
    bookkeeping (iteration, times, pid, ...) or the epoch, which is the step."""
    from ray.tune.result import AUTO_RESULT_KEYS

    return {key: float(value) for key, value in result.items()
            if key not in AUTO_RESULT_KEYS and key != "epoch"
            and isinstance(value, (int, float)) and not isinstance(value, bool)}


# ---------------------------------------------------------------------------- cifar finetune
#: What the Train workers add to each report that is bookkeeping, not a metric.
TRAIN_BOOKKEEPING = ("start_epoch", "replicas")


def finetune_options(tracking: str, name: str, storage_uri: str, model: str,
                     mlflow_tracking_uri: str | None = None) -> SweepOptions:
    """A ``cifar finetune`` run tracked as a one-cell sweep named ``name``: the same checks,
    default store (``<storage>/<name>/mlflow.db``), parent and child runs as ``cifar tune``."""
    return SweepOptions(name=name, storage=storage_uri, models=(model,), tracking=tracking,
                        mlflow_tracking_uri=mlflow_tracking_uri)


def train_callbacks(options: SweepOptions, cell: Cell) -> list:
    """The Ray Train callbacks ``options.tracking`` asks for, for one multi-worker run.

    Train V2 has no logger callbacks of its own, so a ``UserCallback`` does it; Ray runs those
    in Train's controller, which it places on the driver's node, so a local store or event
    folder is the driver's. Each epoch as rank 0 reports it: TensorBoard scalars (and the
    HParams of the settings that differ from the model's defaults when the test report
    arrives), or MLflow metrics on the run's child run. ``finish_train_run`` (in the driver,
    after the record is written) closes the MLflow runs. A failing tracker is named once and
    tracking ends; training goes on."""
    if options.tracking == "none":
        return []
    from ray.train import UserCallback

    class TrainTracking(UserCallback):
        def __init__(self):
            self.events: TrainEvents | None = None
            self.runs: MlflowRuns | None = None
            self.broken = False

        def after_report(self, run_context, metrics, checkpoint):
            result = metrics[0] if metrics else {}
            if options.tracking == "mlflow":
                if self.runs is None:
                    self.runs = MlflowRuns(options, lambda config: cell)
                    self.runs.guard("opening the run's MLflow runs", _open_cell, self.runs)
                if "test_accuracy" not in result:  # the test report repeats the last epoch
                    self.runs.guard("logging an epoch", self.runs.log_epoch, {},
                                    _without_bookkeeping(result))
                return
            if self.broken:
                return
            try:
                self.events = self.events or TrainEvents(options, cell)
                self.events.log(_without_bookkeeping(result))
            except Exception as error:  # tracking must never end a run
                self.broken = True
                log.warning("cifar finetune: TensorBoard logging into %s failed (%s); no "
                            "more event files in this run. Training goes on, and the run's "
                            "record keeps its per-epoch metrics.",
                            options.sweep_uri, _short(error))

    return [TrainTracking()]


def finish_train_run(options: SweepOptions, cell: Cell, status: str) -> None:
    """In the driver, once the record is written: the cell's MLflow run gets its test
    metrics and best checkpoint and ends with ``status`` (FINISHED or FAILED), and so does
    the parent. Nothing for other trackers."""
    if options.tracking != "mlflow":
        return
    runs = MlflowRuns(options, lambda config: cell)

    def finish():
        _open_cell(runs)
        runs.end_trial({}, status)
        runs.end(["TERMINATED" if status == "FINISHED" else "ERROR"])

    runs.guard("ending the run's MLflow runs", finish)


def _open_cell(runs: "MlflowRuns") -> None:
    runs.start()
    runs.start_trial({})


def _without_bookkeeping(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TRAIN_BOOKKEEPING}


class TrainEvents:
    """TensorBoard event files of one Ray Train run in ``<run>/tensorboard/``, in
    tensorboardX's format (what Ray Tune's own logger writes); for ``s3://`` storage they are
    written in a local cache folder and the folder is uploaded after every epoch. Steps are
    epochs, so a resumed run's new event file continues the curves.

    tensorboardX's ``EventsWriter`` writes as it is called; its ``SummaryWriter`` hands events
    to a background thread and its ``flush`` does not wait for that thread, so an upload right
    after it could miss the epoch just logged."""

    def __init__(self, options: SweepOptions, cell: Cell):
        from tensorboardX.event_file_writer import EventsWriter

        self.remote = storage.join_uri(options.sweep_uri, storage.TENSORBOARD_DIR)
        if storage.is_s3(self.remote):
            self.local = storage.cache_dir(storage.TENSORBOARD_DIR, options.name, cell.trial_id)
        else:
            self.local, self.remote = Path(self.remote), None
            self.local.mkdir(parents=True, exist_ok=True)
        self.cell = cell
        self.writer = EventsWriter(str(self.local / "events"))

    def log(self, result: dict) -> None:
        from tensorboardX.summary import scalar

        if "test_accuracy" in result:
            self._hparams(result)
        elif "epoch" in result:
            for key, value in epoch_metrics(result).items():
                self._write(scalar(key, value), step=int(result["epoch"]))
        self.writer.flush()
        if self.remote:
            storage.upload_tree(self.local, self.remote)

    def _write(self, summary, step: int | None = None) -> None:
        from tensorboardX.proto import event_pb2

        event = event_pb2.Event(wall_time=time.time(), summary=summary)
        if step is not None:
            event.step = step
        self.writer.write_event(event)

    def _hparams(self, result: dict) -> None:
        from tensorboardX.summary import hparams

        from cifar_core.settings import Settings

        settings = self.cell.settings.to_dict()
        defaults = Settings.from_dict({"model": self.cell.settings.model}).to_dict()
        varied = {k: v for k, v in settings.items() if v != defaults.get(k) and k != "data"
                  and isinstance(v, (int, float, str, bool))}
        metrics = {"test_accuracy": float(result["test_accuracy"])}
        if "best_val_accuracy" in result:  # train()'s running best, across resumes
            metrics["val_accuracy"] = float(result["best_val_accuracy"])
        for summary in hparams(hparam_dict={"model": self.cell.settings.model, **varied},
                               metric_dict=metrics):
            self._write(summary)
