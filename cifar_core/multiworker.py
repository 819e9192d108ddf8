"""The Ray Train driver: multi-worker (multi-GPU, multi-node) runs of the one training function.

Used by ``cifar finetune`` (M7's two-phase fine-tuning across GPUs) and by sweep cells whose
M7 trials get several workers (``--m7-workers``). The training itself is ``train.train``.

A ``TensorflowTrainer`` starts ``num_workers`` Ray actors; each one runs the project's one
training function, ``cifar_core.train.train``, under ``MultiWorkerMirroredStrategy``:

- **Data parallelism.** ``Settings.batch_size`` is the *global* batch (images per optimizer
  step, all workers together). Keras hands the batched ``tf.data`` pipeline to the strategy,
  which splits every global batch into one slice per replica (``AutoShardPolicy.DATA``), so
  each worker trains on its own share of every batch and of every epoch; gradients are summed
  with a collective all-reduce (NCCL on GPUs, gRPC ring on CPUs) and every replica applies the
  same update. The batch must divide evenly by the number of replicas.
- **Learning-rate rule.** The seed trained M7 with batch 64. With the default
  ``scale_learning_rate="none"`` the global batch stays what ``batch_size`` says (64 for M7)
  and the seed's learning rates are kept: N workers then compute exactly the seed's
  64-image gradient, split N ways. A larger global batch (``--batch-size 256`` on 4 GPUs) can
  scale both phases' rates by ``batch_size / seed batch`` ("linear", Goyal et al. 2017, for
  SGD) or by its square root ("sqrt", Malladi et al. 2022, for Adam); the scaled rates are the
  ones written into ``settings.json`` and the trial record.
- **BatchNorm.** The backbone runs with ``training=False`` (models.py), so its BatchNorm layers
  normalise with their ImageNet moving statistics in both phases; those statistics never
  change, nothing needs a cross-replica (synchronised) BatchNorm, and the per-worker batch
  size does not change the maths.
- **Phases and callbacks.** Phase (backbone frozen, then the last ``fine_tune_layers``
  layers trainable at ``fine_tune_learning_rate``) and epoch live in the checkpoint's
  ``state.json``. Early stopping, reduce-LR-on-plateau and best-by-val_accuracy run on every
  worker; Keras all-reduces the metrics, so every worker sees the same values and makes the
  same decision.
- **Checkpoints.** Every worker saves its own copy (the strategy's collectives need all of
  them to take part); rank 0 reports its ``checkpoints/`` folder (``last/`` and ``best/``)
  to Ray Train after every epoch, so a restart loses at most the epoch in progress.
- **Fault tolerance.** ``FailureConfig(max_failures)`` restarts the worker group from the
  last reported checkpoint after a worker dies; launching again with the same ``name`` and
  ``storage`` resumes the run (Train V2 reads ``checkpoint_manager_snapshot.json`` there).
- **Output.** At the end every worker evaluates the best weights on the test set (evaluation
  under the strategy is collective too; ``evaluate.py``'s accuracy from the gathered
  predictions matches Keras's ``test_accuracy``, so the test order is kept), and the driver
  writes ``<record_root>/trials/<trial_id>/{trial.json, best/, metrics.jsonl}`` (records.py
  layout, ``kind="finetune"``), ``best/`` being the checkpoint format the scoring job reads.

``run_finetune`` is the driver (``cifar finetune``); ``finetune_trial`` runs the same driver
inside a Ray Tune trial, so a sweep can give an M7 trial several GPU workers (Train V2 in Tune:
the Tune trial is only the driver, the workers get their own placement group).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
from cifar_core import storage
from cifar_core.ladder import LADDER
from cifar_core.plan import TRACKERS, SweepError
from cifar_core.records import (COMPLETED, ERRORED, Cell, Outcome, TrialRecord, make_record,
                                settings_hash)
from cifar_core.settings import Settings, SettingsError, check_global_batch

#: Learning-rate rules for a global batch other than the seed's (see the module docstring).
LR_RULES = ("none", "linear", "sqrt")

#: File Ray Train V2 keeps in a run folder; its presence means the run can be resumed.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

#: What a fine-tune run writes beside Ray's files: the options it was launched with.
RUN_SPEC_FILE = "finetune.json"


class FinetuneError(RuntimeError):
    """A fine-tune run could not start, or failed after its allowed restarts."""


@dataclass(frozen=True)
class FinetuneOptions:
    """How one fine-tune run is laid out on the cluster (job options, not model settings)."""

    storage: str                      # local folder or s3://bucket/prefix (shared by all nodes)
    name: str                         # the run lives in <storage>/<name>/
    num_workers: int = 2              # Ray Train workers (one process each)
    use_gpu: bool = False             # one GPU per worker unless gpus_per_worker says more
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 with use_gpu, else 0
    max_failures: int = 2             # restarts from the last checkpoint after a worker dies
    resume: bool = False              # continue <storage>/<name> if it exists
    init_from: str | None = None      # start from this checkpoint folder (weights and state)
    scale_learning_rate: str = "none"  # LR_RULES
    keep_checkpoints: int = 2         # reported checkpoints kept in storage (newest first)
    scratch_dir: str | None = None    # worker-local folder for per-worker workdirs
    record_root: str | None = None    # trials/<id>/ goes here; default <storage>/<name>
    trial_id: str | None = None       # the record's id; default <model>-<settings hash>
    sweep: str | None = None          # the record's sweep name; default ``name``
    tracking: str = "none"            # TRACKERS: none, tensorboard, mlflow (tracking.py)
    mlflow_tracking_uri: str | None = None  # default: <storage>/<name>/mlflow.db

    def __post_init__(self) -> None:
        try:
            storage.check_name(self.name, "--name")
        except storage.StorageError as error:
            raise FinetuneError(str(error)) from None
        if self.num_workers < 1:
            raise FinetuneError(f"--num-workers {self.num_workers} must be >= 1")
        if not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise FinetuneError(f"--cpus-per-worker {self.cpus_per_worker} must be a finite "
                                "number > 0")
        if self.gpus_per_worker is not None and not (
                math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise FinetuneError(f"--gpus-per-worker {self.gpus_per_worker} must be a finite "
                                "number >= 0")
        if self.max_failures < -1:
            raise FinetuneError(f"--max-failures {self.max_failures} must be >= -1 "
                                "(-1: unlimited)")
        if self.keep_checkpoints < 1:
            raise FinetuneError(f"--keep-checkpoints {self.keep_checkpoints} must be >= 1")
        if self.scale_learning_rate not in LR_RULES:
            raise FinetuneError(f"--scale-learning-rate {self.scale_learning_rate!r} must be "
                                f"one of {LR_RULES}")
        if self.tracking not in TRACKERS:
            raise FinetuneError(f"--tracking {self.tracking!r} must be one of {TRACKERS}")

    @property
    def gpus(self) -> float:
        """GPUs per worker."""
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1.0 if self.use_gpu else 0.0

    @property
    def replicas(self) -> int:
        """Model replicas the global batch is split over (a worker with k GPUs holds k)."""
        return self.num_workers * max(1, int(self.gpus))

    @property
    def run_uri(self) -> str:
        return storage.join_uri(self.storage, self.name)

    @property
    def resources(self) -> dict[str, float]:
        """All workers together, as a TrialRecord states them."""
        return {"CPU": self.cpus_per_worker * self.num_workers,
                "GPU": self.gpus * self.num_workers, "workers": self.num_workers}


@dataclass
class FinetuneResult:
    record: TrialRecord
    trial_uri: str                    # <record_root>/trials/<trial_id>
    run_uri: str                      # Ray Train's run folder (checkpoints, snapshot)

    @property
    def best_uri(self) -> str:
        return storage.join_uri(self.trial_uri, storage.BEST)


# ---------------------------------------------------------------------------- settings
def scale_learning_rate(settings: Settings, rule: str) -> Settings:
    """Both phases' learning rates for ``settings.batch_size``, relative to the seed's batch."""
    if rule not in LR_RULES:
        raise FinetuneError(f"learning-rate rule {rule!r} must be one of {LR_RULES}")
    reference = LADDER[settings.model].seed_settings["batch_size"]
    ratio = settings.batch_size / reference
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
    if factor == 1.0:
        return settings
    return settings.replace(learning_rate=settings.learning_rate * factor,
                            fine_tune_learning_rate=settings.fine_tune_learning_rate * factor)


def check_xla(settings: Settings, options: "FinetuneOptions") -> None:
    """XLA cannot compile the gradient all-reduce for CPU devices; say so before starting."""
    if settings.xla and options.replicas > 1 and not options.gpus:
        raise SettingsError(
            f"xla=True with {options.replicas} CPU replicas: TensorFlow cannot compile the "
            "all-reduce with XLA on CPU devices ('Collectives are not yet implemented for CPU "
            "devices when compiling with XLA'); use XLA with GPU workers or a single worker")


# ---------------------------------------------------------------------------- the workers
def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker runs: ``train()`` under the multi-worker strategy.

    ``config``: ``settings`` (dict), ``data`` (an ObjectRef of the ``Cifar10`` arrays),
    ``init_from`` (checkpoint URI or None), ``scratch_dir`` (None: the system temp folder).
    """
    import ray
    import ray.train

    from cifar_core.ray_glue import RayReporter
    from cifar_core.train import TrainState, train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    settings = Settings.from_dict(config["settings"])
    strategy = make_strategy(context.get_world_size())  # before any other TensorFlow op runs
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    data = ray.get(config["data"])
    if config.get("scratch_dir"):
        Path(config["scratch_dir"]).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"cifar-finetune-rank{rank}-",
                                    dir=config.get("scratch_dir")))
    try:
        resume_from = _starting_checkpoint(workdir, config.get("init_from"))
        start = TrainState.read(resume_from) if resume_from else TrainState()
        if rank == 0:
            where = (f"resuming at phase {start.phase + 1}, epoch {start.epoch}"
                     if resume_from else "starting from scratch")
            print(f"cifar finetune: {context.get_world_size()} workers, {where}", flush=True)
        reporter = RayReporter("train", rank=rank,
                               extra={"start_epoch": start.epoch, "replicas": replicas})
        result = train(settings, data, workdir / "run", report=reporter,
                       resume_from=resume_from, strategy=strategy)
        # One more report after the test evaluation, so the final checkpoint carries
        # best/evaluation.json and the driver (or Tune) sees test_accuracy.
        final = dict(result.state.history[-1]) if result.state.history else {}
        final.update({k: result.evaluation[k] for k in ("test_accuracy", "test_loss")})
        reporter(final, str(result.last_checkpoint))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def make_strategy(world_size: int):
    """The tf.distribute strategy for this worker; None when there is nothing to distribute.

    GPU memory growth and thread pools must be set before TensorFlow's runtime starts, and
    creating a strategy starts it, so both happen here first.
    """
    import tensorflow as tf

    from cifar_core.ray_glue import limit_threads_to_ray_cpus
    from cifar_core.train import configure_gpus

    limit_threads_to_ray_cpus()
    configure_gpus()
    local_gpus = len(tf.config.list_physical_devices("GPU"))
    if world_size > 1:
        # TF_CONFIG (cluster addresses, this worker's index) was set by Ray's TensorFlow backend.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if local_gpus > 1:
        return tf.distribute.MirroredStrategy()
    return None  # one worker, one device: plain fit, no collective overhead


def _starting_checkpoint(workdir: Path, init_from: str | None) -> Path | None:
    """The ``last`` checkpoint to continue from: Ray's latest report, else ``init_from``."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure, or a re-launched run
        return Path(checkpoint.to_directory(str(workdir / "restored"))) / storage.LAST
    if init_from:
        local = workdir / "init"
        storage.download_tree(init_from, local)
        return local
    return None


def check_init_from(init_from: str) -> None:
    """``--init-from`` must be a checkpoint folder (state.json + model.keras), checked on the
    driver before any worker starts."""
    for name in (storage.STATE_FILE, storage.MODEL_FILE):
        if not storage.exists(storage.join_uri(init_from, name)):
            raise FinetuneError(f"--init-from {init_from}: not a checkpoint folder (no {name})")


# ---------------------------------------------------------------------------- the driver
def build_trainer(settings: Settings, options: FinetuneOptions, data_ref: Any, *,
                  callbacks: tuple = (), train_loop: Callable[[dict], None] | None = None):
    """The ``TensorflowTrainer`` for one run (``train_loop`` replaces the worker function in
    tests that need to reach into a worker)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from cifar_core.provenance import runtime_env_vars

    fs, path = storage.pyarrow_filesystem(options.storage)
    resources = {"CPU": options.cpus_per_worker}
    if options.gpus:
        resources["GPU"] = options.gpus
    return TensorflowTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config={"settings": settings.to_dict(), "data": data_ref,
                           "init_from": options.init_from, "scratch_dir": options.scratch_dir},
        scaling_config=ScalingConfig(num_workers=options.num_workers,
                                     use_gpu=bool(options.gpus),
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=options.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=options.keep_checkpoints),
            # The Keras switch must be in the workers' environment before TensorFlow loads.
            worker_runtime_env={"env_vars": runtime_env_vars()},
            callbacks=list(callbacks)))


def run_finetune(settings: Settings, options: FinetuneOptions, *, data=None,
                 address: str | None = None, callbacks: tuple = (),
                 train_loop: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Run (or resume) one multi-worker run to the end; export its best checkpoint and record.

    Raises ``SettingsError``/``FinetuneError`` before any cluster work for bad input, and
    ``FinetuneError`` when the run failed after ``max_failures`` restarts (its record says
    ``errored``; its checkpoints stay, so ``resume=True`` continues it).
    """
    import ray

    from cifar_core import tracking
    from cifar_core.data import load_cifar10
    from cifar_core.provenance import code_version, provenance
    from cifar_core.ray_glue import connect_ray

    settings = scale_learning_rate(settings, options.scale_learning_rate)
    check_global_batch(settings, options.replicas)
    check_xla(settings, options)
    if options.init_from:
        check_init_from(options.init_from)
    cell = _cell(settings, options, code_version())
    tracked = tracking.finetune_options(options.tracking, options.name, options.storage,
                                        settings.model, options.mlflow_tracking_uri)
    try:
        tracking.check_available(tracked)
    except SweepError as error:
        raise FinetuneError(str(error)) from None
    previous = latest_report(options)
    if previous is not None and not options.resume:
        raise FinetuneError(
            f"run {options.run_uri} already exists (last checkpoint: epoch "
            f"{previous[1].get('epoch', '?')}); pass --resume to continue it, or pick another "
            "--name")
    if options.resume:
        print(f"cifar finetune: {_describe(previous, options)}", flush=True)
    connect_ray(address, dashboard=True)
    if data is None:
        data = load_cifar10(settings)
    storage.write_text(storage.join_uri(options.run_uri, RUN_SPEC_FILE), json.dumps({
        "settings": settings.to_dict(), "options": asdict(options), "trial_id": cell.trial_id,
        "data": data.summary(), "provenance": provenance()}, indent=1))
    callbacks = (*callbacks, *tracking.train_callbacks(tracked, cell))
    trainer = build_trainer(settings, options, ray.put(data), callbacks=callbacks,
                            train_loop=train_loop)
    earlier_time = _time_spent(previous, options)
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as error:  # ray.train.TrainingFailedError, or the cluster's own errors
        record = _errored_record(cell, options, data, error,
                                 earlier_time + time.time() - started)
        storage.write_text(cell.record_uri, record.to_json())
        tracking.finish_train_run(tracked, cell, "FAILED")
        raise FinetuneError(
            f"fine-tune run {options.run_uri} failed after the {options.max_failures} "
            f"restart(s) --max-failures allows: {_first_lines(error)}\nIts checkpoints are "
            "kept: launch it again with the same --name and --storage and --resume to "
            f"continue from the last one. Record: {cell.record_uri}") from error
    exported = _export(result, cell, options, data, earlier_time + time.time() - started)
    tracking.finish_train_run(tracked, cell, "FINISHED")
    return exported


def _cell(settings: Settings, options: FinetuneOptions, code: str) -> Cell:
    digest = settings_hash(settings, settings.data, code)
    if options.trial_id:  # a sweep's cell: its id, not one hashed here
        digest = options.trial_id.partition("-")[2]
    return Cell(settings, digest, sweep=options.sweep or options.name,
                sweep_uri=options.record_root or options.run_uri, kind="finetune",
                resources=options.resources)


def latest_report(options: FinetuneOptions) -> tuple[Any, dict] | None:
    """(checkpoint, metrics) of the run's newest reported checkpoint, or None if no run."""
    from ray.train import Result

    if not storage.exists(storage.join_uri(options.run_uri, RAY_SNAPSHOT_FILE)):
        return None
    fs, path = storage.pyarrow_filesystem(options.run_uri)
    for attempt in range(5):
        try:
            result = Result.from_path(path, storage_filesystem=fs)
            break
        except Exception as error:
            # Ray rewrites the snapshot in place after every report: read mid-rewrite (a local
            # disk, or moto, whose S3 objects are not atomic under concurrent requests) it is
            # cut short and does not parse. Read again; anything else is a real error.
            if attempt == 4 or not isinstance(error.__cause__, json.JSONDecodeError):
                raise
            time.sleep(0.5)
    if result.checkpoint is None:
        return None
    return result.checkpoint, dict(result.metrics or {})


def _describe(previous: tuple[Any, dict] | None, options: FinetuneOptions) -> str:
    if previous is None:
        return f"nothing to resume in {options.run_uri}; starting a new run"
    metrics = previous[1]
    return (f"resuming {options.run_uri} after epoch {metrics.get('epoch')} "
            f"(phase {metrics.get('phase')})")


def _time_spent(previous: tuple[Any, dict] | None, options: FinetuneOptions) -> float:
    """Seconds of training already in the checkpoint a re-launched run continues from."""
    if previous is None:
        return 0.0
    history = _read_state(previous[0], options).get("history", [])
    return sum(m.get("epoch_time_s", 0.0) for m in history)


def _read_state(checkpoint, options: FinetuneOptions) -> dict:
    """A reported checkpoint's last/state.json, read in place (no model download)."""
    return json.loads(storage.read_text(storage.join_uri(
        storage.as_uri(checkpoint.path, options.storage), storage.LAST, storage.STATE_FILE)))


def _export(result, cell: Cell, options: FinetuneOptions, data,
            wall_time_s: float) -> FinetuneResult:
    """Copy the final checkpoint's best/ to the trial folder and write its TrialRecord."""
    trial_uri = storage.trial_uri(cell.sweep_uri, cell.trial_id)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(result.checkpoint.to_directory(folder))
        state = json.loads((local / storage.LAST / storage.STATE_FILE).read_text())
        best = local / storage.BEST
        if not (best / storage.MODEL_FILE).exists():  # no epoch had a val_accuracy: the last
            best = local / storage.LAST
        evaluation = json.loads((best / storage.EVALUATION_FILE).read_text())
        storage.upload_tree(best, cell.best_uri)
        storage.write_text(storage.join_uri(trial_uri, storage.METRICS_FILE),
                           "".join(json.dumps(m) + "\n" for m in state["history"]))
        record = make_record(cell, Outcome(
            COMPLETED, state["history"], state["stop_reasons"], evaluation,
            checkpoint_uri=cell.best_uri, wall_time_s=wall_time_s), data.summary(),
            json.loads((best / storage.PROVENANCE_FILE).read_text()))
    storage.write_text(cell.record_uri, record.to_json())
    return FinetuneResult(record, trial_uri, options.run_uri)


def _errored_record(cell: Cell, options: FinetuneOptions, data, error: BaseException,
                    wall_time_s: float) -> TrialRecord:
    history, checkpoint_uri = [], None
    try:
        previous = latest_report(options)
    except Exception:  # the record of a failure must not fail on a half-written snapshot
        previous = None
    if previous is not None:
        history = _read_state(previous[0], options).get("history", [])
        checkpoint_uri = storage.as_uri(previous[0].path, options.storage)
    return make_record(cell, Outcome(ERRORED, history, error=str(error),
                                     checkpoint_uri=checkpoint_uri, wall_time_s=wall_time_s),
                       data.summary())


def _first_lines(error: BaseException, count: int = 6) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return "\n".join(lines[:count]) or type(error).__name__


# ---------------------------------------------------------------------------- Tune
def finetune_trial(cell: Cell, data=None) -> None:
    """Inside a Ray Tune trial: train ``cell`` with a multi-worker Ray Train run.

    ``cell.workers`` holds ``FinetuneOptions`` fields (``num_workers``, ``use_gpu``,
    ``cpus_per_worker``, ``gpus_per_worker``, ``max_failures``, ``scale_learning_rate``,
    ``keep_checkpoints``, ``scratch_dir``). The Train run lives in
    ``<sweep_uri>/finetune-<trial_id>/`` and resumes from there when Tune retries the trial.
    Each epoch's metrics reach Tune (for its scheduler) as Train reports them, except the
    last epoch's: that one is reported after the record and ``best/`` are written, with
    test_accuracy, so a scheduler stopping the trial at its last rung cannot lose them. The
    trial itself is only the Train driver: give it ``{"CPU": 1}`` and cap
    ``max_concurrent_trials`` by the GPUs, ``total GPUs // (num_workers * gpus_per_worker)``.
    """
    from ray import tune

    from cifar_core.ray_glue import train_to_tune

    options = FinetuneOptions(
        storage=cell.sweep_uri, name=f"finetune-{cell.trial_id}", resume=True,
        record_root=cell.sweep_uri, trial_id=cell.trial_id, sweep=cell.sweep,
        **(cell.workers or {}))
    result = run_finetune(cell.settings, options, data=data,
                          callbacks=(train_to_tune(cell.settings.total_epochs),))
    record = result.record
    tune.report({**record.history[-1], "test_accuracy": record.test_accuracy,
                 "test_loss": record.test_loss})
