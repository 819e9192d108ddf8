"""Ray Tune sweeps over the model ladder: every chosen model with its grid, as parallel trials.

The driver expands every grid into explicit cells *before* Ray starts (so each one is validated
and hashed), loads the data once and hands it to the trials through Ray's object store
(``tune.with_parameters``), and lets Tune schedule, retry and (with ASHA) stop trials.

Each trial runs the one training function, reports every epoch with a checkpoint (Tune keeps the
best and the latest), evaluates the best weights on the test set at its end, and writes its
``TrialRecord`` plus its best checkpoint under ``<storage>/<name>/trials/<trial_id>/``
(``records.py``). Trials the scheduler stopped, or that failed after their retries, get their
record from the driver when the sweep ends. A cell whose record says it completed (or was
stopped by the scheduler) is not run again when the sweep is re-submitted.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_core.records import (COMPLETED, ERRORED, RECORD_FILE, STOPPED_BY_SCHEDULER,
                                TRIALS_DIR, TrialRecord, settings_hash, trial_id)
from cifar_core.settings import MODEL_DEFAULTS, Settings, SettingsError
from cifar_core import storage

ALL_MODELS = tuple(MODEL_DEFAULTS)

#: Resources per trial on a GPU cluster (``--use-gpu``): small CNNs share a card four to one
#: (they are input-bound long before they fill an A10G), M6 two to one, M5/M7 a whole card.
GPU_RESOURCES = {
    "M1": {"CPU": 2, "GPU": 0.25}, "M2": {"CPU": 2, "GPU": 0.25}, "M4": {"CPU": 2, "GPU": 0.25},
    "M6": {"CPU": 2, "GPU": 0.5}, "M5": {"CPU": 4, "GPU": 1}, "M7": {"CPU": 4, "GPU": 1},
}
#: Resources per trial without GPUs: one core each, so trials run side by side.
CPU_RESOURCES = {model: {"CPU": 1, "GPU": 0} for model in ALL_MODELS}

#: Settings for ``--smoke-test``: every model, tiny data, one epoch, small inputs.
SMOKE_SETTINGS = {"limit": 300, "num_epochs": 1, "batch_size": 32}
SMOKE_MODEL_SETTINGS = {
    "M5": {"image_size": 32, "backbone_weights": "none"},
    "M7": {"image_size": 32, "backbone_weights": "none", "backbone_alpha": 0.35,
           "fine_tune_epochs": 1},
}


class SweepError(ValueError):
    """The sweep's options or grid are invalid; nothing was started."""


@dataclass
class SweepOptions:
    """What one ``cifar tune`` invocation asks for (job options, not model settings)."""

    name: str
    storage: str
    models: tuple[str, ...] = ALL_MODELS
    grid: str = "default"                       # "seed", "default" or a JSON file
    overrides: dict[str, Any] = field(default_factory=dict)  # settings for every trial
    seeds: int = 1
    num_samples: int = 1
    epochs_scale: float = 1.0
    scheduler: str = "none"                     # "none" or "asha"
    # ASHA: first cut after grace_period epochs, then keep the best 1/reduction_factor at each
    # rung. Ray's own defaults. On a dozen trials asynchronous ASHA still spends ~40-47% of the
    # grid's epochs, whatever the factor: early arrivals at a rung are never cut
    # (results/bench-tune-asha-m4.md, bench/asha_replay.py).
    grace_period: int = 1
    reduction_factor: int = 4
    max_concurrent: int | None = None
    use_gpu: bool = False
    resources: dict[str, dict[str, float]] = field(default_factory=dict)  # per-model overrides
    max_failures: int = 1
    m7_workers: int = 1                         # >1: each M7 trial is a multi-worker Train run
    resume: bool = False
    s3_endpoint: str | None = None
    smoke_test: bool = False

    @property
    def sweep_uri(self) -> str:
        return storage.join_uri(self.storage, self.name)

    def trial_resources(self, model: str) -> dict[str, float]:
        if model == "M7" and self.m7_workers > 1:
            return {"CPU": 1, "GPU": 0}  # only the Train driver; its workers ask for their own
        table = GPU_RESOURCES if self.use_gpu else CPU_RESOURCES
        return {**table[model], **self.resources.get(model, {})}


@dataclass(frozen=True)
class Cell:
    """One trial to run: validated settings and their id."""

    settings: Settings
    digest: str

    @property
    def trial_id(self) -> str:
        return trial_id(self.settings, self.digest)


# ---------------------------------------------------------------------------- grids
def load_grid(grid: str, model: str) -> dict[str, Any]:
    """The search space for one model: {} (seed), SEARCH_SPACES (default) or a JSON file.

    A JSON grid maps model ids to {field: value or [values]}; a list is a grid axis.
    """
    if grid == "seed":
        return {}
    if grid == "default":
        from cifar_core.models import SEARCH_SPACES

        return SEARCH_SPACES[model]
    path = Path(grid)
    if not path.is_file():
        raise SweepError(f"--grid {grid!r} is not 'seed', 'default' or a JSON file")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SweepError(f"--grid {grid}: not valid JSON ({error})") from error
    unknown = sorted(set(spec) - set(ALL_MODELS))
    if unknown:
        raise SweepError(f"--grid {grid}: unknown model(s) {unknown}; valid: {list(ALL_MODELS)}")
    from ray import tune

    return {name: tune.grid_search(value) if isinstance(value, list) else value
            for name, value in spec.get(model, {}).items()}


def expand(space: dict[str, Any], num_samples: int, rng: random.Random) -> list[dict]:
    """Explicit configs from a dict of plain values, ``tune.grid_search`` and ``tune.*`` domains.

    Grid axes are crossed; sampled domains (``tune.uniform``, ``tune.choice``, ...) are drawn
    ``num_samples`` times per grid point with a seeded generator, so the cells are known
    (and hashable) before any trial runs.
    """
    from ray.tune.search.sample import Domain

    grid_axes = {k: v["grid_search"] for k, v in space.items()
                 if isinstance(v, dict) and "grid_search" in v}
    sampled = {k: v for k, v in space.items() if isinstance(v, Domain)}
    fixed = {k: v for k, v in space.items() if k not in grid_axes and k not in sampled}
    configs = []
    for values in itertools.product(*grid_axes.values()):
        point = {**fixed, **dict(zip(grid_axes, values))}
        repeats = num_samples if sampled else 1
        for _ in range(repeats):
            configs.append({**point, **{k: d.sample(random_state=rng.randrange(2**31))
                                        for k, d in sampled.items()}})
    return configs


def plan_cells(options: SweepOptions, code_version: str) -> list[Cell]:
    """Every trial of the sweep, validated. Raises SettingsError naming model, field, value."""
    rng = random.Random(0)
    cells: list[Cell] = []
    for model in options.models:
        if model not in ALL_MODELS:
            raise SweepError(f"--models: unknown model {model!r}; valid: {list(ALL_MODELS)}")
        base = {**options.overrides, "model": model}
        if options.smoke_test:
            base = {**SMOKE_SETTINGS, **SMOKE_MODEL_SETTINGS.get(model, {}), **base}
        for point in expand(load_grid(options.grid, model), options.num_samples, rng):
            for seed in range(options.seeds):
                config = {**base, **point}
                if options.seeds > 1 or "seed" not in config:
                    config["seed"] = config.get("seed", 0) + seed
                try:
                    settings = Settings.from_dict(config)
                    settings = _scale_epochs(settings, options.epochs_scale)
                except SettingsError as error:
                    raise SettingsError(f"model {model}: {error}") from error
                digest = settings_hash(settings, settings.data, code_version)
                cells.append(Cell(settings, digest))
    unique = {cell.trial_id: cell for cell in cells}
    return list(unique.values())


def _scale_epochs(settings: Settings, scale: float) -> Settings:
    if scale == 1.0:
        return settings
    return settings.replace(
        num_epochs=max(1, round(settings.num_epochs * scale)),
        fine_tune_epochs=(max(1, round(settings.fine_tune_epochs * scale))
                          if settings.fine_tune_epochs else 0))


def finished_trial_ids(sweep_uri: str, endpoint: str | None = None) -> set[str]:
    """Trials whose record says they completed or were stopped by the scheduler."""
    done = set()
    for uri in storage.find_files(storage.join_uri(sweep_uri, TRIALS_DIR), RECORD_FILE, endpoint):
        record = TrialRecord.from_json(storage.read_text(uri, endpoint))
        if record.status in (COMPLETED, STOPPED_BY_SCHEDULER):
            done.add(record.trial_id)
    return done


# ---------------------------------------------------------------------------- the trial
def run_trial(config: dict, data, cells: dict[str, dict]) -> None:
    """Tune function trainable: one cell, from its checkpoint if Tune is retrying it.

    ``config`` holds only the cell's id (so Tune's progress table stays readable); the cells
    themselves travel once through the object store, like the data.
    """
    from ray import tune

    cell = cells[config["trial_id"]]
    settings = Settings.from_dict(cell["settings"])
    meta = cell["meta"]
    if meta.get("s3_endpoint"):
        # The driver's S3 endpoint, for everything in this trial that talks to S3 (boto3 reads
        # it from the environment; weights and records go through it too).
        os.environ["AWS_ENDPOINT_URL"] = meta["s3_endpoint"]
    trial_uri = storage.join_uri(meta["sweep_uri"], TRIALS_DIR, meta["trial_id"])
    record_uri = storage.join_uri(trial_uri, RECORD_FILE)
    if storage.exists(record_uri, meta.get("s3_endpoint")):
        finished = TrialRecord.from_json(storage.read_text(record_uri, meta.get("s3_endpoint")))
        if finished.status == COMPLETED:
            # A resumed sweep whose driver died after this trial saved its record but before
            # Tune noted the trial as done: report the result again, do not run it again.
            tune.report(finished.history[-1] if finished.history else {})
            return
    if meta.get("workers"):
        # M7 on several GPUs: this trial drives a Ray Train run (Tuner(trainer) is deprecated).
        from cifar_core.finetune import finetune_trial

        return finetune_trial(config, data=data, cells=cells)
    import tf_keras as keras

    from cifar_core.train import TrainState, limit_threads_to_ray_cpus, train

    limit_threads_to_ray_cpus()
    keras.backend.clear_session()  # a reused process: drop the previous trial's graphs

    workdir = Path(tempfile.mkdtemp(prefix=f"{meta['trial_id']}-"))
    resume_from, earlier_time = None, 0.0
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and meta.get("resume"):
        checkpoint = _latest_earlier_checkpoint(meta)
    if checkpoint is not None:  # a retry after a crash, or a resumed sweep
        resume_from = Path(checkpoint.to_directory(str(workdir / "resume"))) / "last"
        earlier_time = sum(m.get("epoch_time_s", 0.0)
                           for m in TrainState.read(resume_from).history)
    started = time.time()

    final_report: list[dict] = []

    def report(metrics: dict, checkpoint_dir: str) -> None:
        if metrics["epoch"] >= settings.total_epochs:
            # A scheduler may stop a trial at any report, ASHA at its last rung even on the
            # final epoch: hold the final one back until the evaluation and record are saved.
            final_report.append(metrics)
            return
        # Hand Tune the whole checkpoints/ folder (last/ and best/), so a retried trial gets
        # its best weights back too, not only the latest.
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(
            str(Path(checkpoint_dir).parent)))

    result = train(settings, data, workdir, report=report, resume_from=resume_from)
    best_uri = storage.join_uri(trial_uri, "best")
    storage.upload_tree(result.best_checkpoint, best_uri, meta.get("s3_endpoint"))
    evaluation = result.evaluation or {}
    record = TrialRecord(
        trial_id=meta["trial_id"], sweep=meta["sweep"], kind="tune", model=settings.model,
        settings=settings.to_dict(), settings_hash=meta["digest"], status=COMPLETED,
        stop_reason=result.stop_reason, epochs_run=result.state.epoch,
        best_val_accuracy=result.state.best_val_accuracy, best_epoch=result.state.best_epoch,
        test_accuracy=evaluation.get("test_accuracy"), test_loss=evaluation.get("test_loss"),
        wall_time_s=round(time.time() - started + earlier_time, 2), resources=meta["resources"],
        checkpoint_uri=best_uri, data={**data.summary()}, history=result.state.history,
        evaluation=evaluation, provenance=json.loads(
            (result.best_checkpoint / "provenance.json").read_text()),
        finished=_now())
    storage.write_text(record_uri, record.to_json(), meta.get("s3_endpoint"))
    if final_report:
        tune.report(final_report[-1], checkpoint=tune.Checkpoint.from_directory(
            str(result.last_checkpoint.parent)))


def _latest_earlier_checkpoint(meta: dict):
    """The newest checkpoint an earlier attempt of this cell left in the sweep's storage."""
    from ray import tune

    fs, path = storage.filesystem(meta["sweep_uri"], meta.get("s3_endpoint"))
    newest = _newest_checkpoints(fs, path).get(meta["trial_id"])
    return None if newest is None else tune.Checkpoint(newest[0], filesystem=fs)


def _newest_checkpoints(fs, sweep_path: str) -> dict[str, tuple[str, int]]:
    """trial id -> (its newest checkpoint folder, epoch), over every attempt in the sweep.

    Tune names an attempt's folder ``<trial id>_<Tune's id>``; a checkpoint counts once its
    ``last/state.json`` is written (it is staged and renamed into place, so never partial).
    """
    import pyarrow.fs

    newest: dict[str, tuple[str, int]] = {}
    selector = pyarrow.fs.FileSelector(sweep_path, allow_not_found=True)
    for trial_dir in fs.get_file_info(selector):
        if trial_dir.type != pyarrow.fs.FileType.Directory or "_" not in trial_dir.base_name:
            continue
        trial_id = trial_dir.base_name.split("_", 1)[0]
        for entry in fs.get_file_info(pyarrow.fs.FileSelector(trial_dir.path)):
            state = f"{entry.path}/last/state.json"
            if (entry.base_name.startswith("checkpoint_")
                    and fs.get_file_info(state).type == pyarrow.fs.FileType.File):
                with fs.open_input_stream(state) as stream:
                    epoch = json.loads(stream.read())["epoch"]
                if epoch > newest.get(trial_id, ("", -1))[1]:
                    newest[trial_id] = (entry.path, epoch)
    return newest


def earlier_code_versions(options: SweepOptions, todo: list[Cell]) -> list[str]:
    """Lines naming the cells to run that this storage already holds under another code version.

    A trial's id hashes the code version, so after a code change the same settings are a new
    cell: it runs again from epoch 0 and an interrupted trial's checkpoints are not continued
    (a result must come from one version of the code). Say so, rather than leave a user
    wondering why ``--resume`` started over.
    """
    wanted = {json.dumps(cell.settings.to_dict(), sort_keys=True): cell for cell in todo}
    if not wanted:
        return []
    lines, seen = [], set()
    for uri in storage.find_files(storage.join_uri(options.sweep_uri, TRIALS_DIR), RECORD_FILE,
                                  options.s3_endpoint):
        record = TrialRecord.from_json(storage.read_text(uri, options.s3_endpoint))
        cell = wanted.get(json.dumps(record.settings, sort_keys=True))
        if cell is not None and record.trial_id != cell.trial_id:
            seen.add(record.trial_id)
            commit = (record.provenance or {}).get("git_commit", "?")
            lines.append(f"{cell.trial_id}: same settings as {record.trial_id} ({record.status} "
                         f"at code version {commit[:12]}); runs again at this version")
    fs, path = storage.filesystem(options.sweep_uri, options.s3_endpoint)
    for trial_id, (checkpoint, epoch) in sorted(_newest_checkpoints(fs, path).items()):
        if trial_id in seen:
            continue
        try:
            with fs.open_input_stream(f"{checkpoint}/last/settings.json") as stream:
                settings = json.loads(stream.read())
            with fs.open_input_stream(f"{checkpoint}/last/provenance.json") as stream:
                commit = json.loads(stream.read()).get("git_commit", "?")
        except (OSError, ValueError):
            continue  # not one of ours, or from before checkpoints carried these
        cell = wanted.get(json.dumps(settings, sort_keys=True))
        if cell is not None and trial_id != cell.trial_id:
            lines.append(f"{cell.trial_id}: same settings as {trial_id}, interrupted at epoch "
                         f"{epoch} at code version {commit[:12]}; starts over at this version")
    return lines


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- the driver
def connect_ray(address: str | None = None) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS``, else start a private local Ray.

    Never attaches by accident to another Ray running on the machine: without an address we
    ask for ``address="local"``, which always starts a new instance.
    """
    import ray

    from cifar_core.provenance import runtime_env_vars

    if ray.is_initialized():
        return
    # Under ``ray job submit`` the job's runtime_env already set these; Ray merges the two and
    # refuses conflicting values, so pass only what the workers would otherwise lack.
    env_vars = {k: v for k, v in runtime_env_vars().items() if os.environ.get(k) != v}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)


def run_sweep(options: SweepOptions, data=None, address: str | None = None):
    """Run (or resume) a sweep; returns its records as a pandas DataFrame leaderboard."""
    from ray import tune

    from cifar_core.data import load_cifar10
    from cifar_core.provenance import git_commit, provenance

    if not storage.is_s3(options.storage):
        # Trials run in their own working folders: a relative path would land there.
        options.storage = str(Path(options.storage).resolve())
    code_version = git_commit()
    cells = plan_cells(options, code_version)          # validates before anything starts
    options.s3_endpoint = storage.s3_endpoint(options.s3_endpoint)  # trials get the driver's
    if options.scheduler not in ("none", "asha"):
        raise SweepError(f"--scheduler {options.scheduler!r} must be 'none' or 'asha'")
    if options.grace_period < 1 or options.reduction_factor < 2:
        raise SweepError(f"--grace-period {options.grace_period} must be >= 1 and "
                         f"--reduction-factor {options.reduction_factor} >= 2")
    sweep_uri = options.sweep_uri
    done = finished_trial_ids(sweep_uri, options.s3_endpoint)
    todo = [cell for cell in cells if cell.trial_id not in done]
    print(f"cifar tune: {len(cells)} cells in sweep {options.name!r}; {len(cells) - len(todo)} "
          f"already finished in {sweep_uri}; {len(todo)} to run", flush=True)
    storage.write_text(storage.join_uri(sweep_uri, "sweep.json"), json.dumps({
        "options": {k: v for k, v in options.__dict__.items()}, "cells": len(cells),
        "provenance": provenance()}, indent=1, default=str), options.s3_endpoint)

    fs, path = storage.pyarrow_filesystem(options.storage, options.s3_endpoint)
    if not todo:
        return leaderboard(options)
    earlier = earlier_code_versions(options, todo)
    if earlier:
        print(f"cifar tune: {len(earlier)} cell(s) to run match trials of another code version "
              f"in this storage (a trial id includes the code version):\n  "
              + "\n  ".join(earlier), flush=True)
    if options.resume:
        # Tuner.restore hangs in this Ray when the driver died before its search state was
        # saved; instead the unfinished cells run again and each starts from the newest
        # checkpoint an earlier attempt left in the sweep's storage.
        print(f"cifar tune: resuming the interrupted sweep in {sweep_uri}", flush=True)

    _check_one_data_source(todo or cells)
    if options.m7_workers > 1 and any(c.settings.model == "M7" for c in todo):
        from cifar_core.finetune import connect  # Ray Train needs its private Ray pinned

        connect(address)
    else:
        connect_ray(address)
    if data is None:
        data = load_cifar10((todo or cells)[0].settings)
    cell_configs = {cell.trial_id: _cell_config(cell, options) for cell in todo}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, cells=cell_configs),
        lambda config: _placement(cell_configs[config["trial_id"]]))
    scheduler = _scheduler(options, todo)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial_id": tune.grid_search(trial_order(todo, options))},
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", scheduler=scheduler,
            max_concurrent_trials=options.max_concurrent,
            # A new process per trial pays Ray's actor start and TensorFlow's import
            # (~5-10 s) every time; reusing it keeps short trials cheap. Not under a
            # scheduler: a trial it stops keeps training in the reused process until its next
            # report (up to an epoch), Tune gives the reset 2 s, and the next trial there then
            # fails with "Trainable runner reuse requires reset_config()".
            reuse_actors=options.scheduler == "none",
            trial_name_creator=lambda trial: trial.config["trial_id"],
            trial_dirname_creator=lambda trial: (
                f"{trial.config['trial_id']}_{trial.trial_id}")),
        run_config=tune.RunConfig(
            name=options.name, storage_path=path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max"),
            verbose=1))
    results = tuner.fit()
    interrupted = record_unfinished(results, options, cell_configs,
                                    getattr(scheduler, "stopped", set()))
    board = leaderboard(options)
    if interrupted:
        print(f"cifar tune: the sweep was interrupted; {len(interrupted)} trial(s) did not "
              f"finish and have no record: {', '.join(sorted(interrupted))}. Run the same "
              "command with --resume to continue them from their checkpoints.", flush=True)
    board.attrs["interrupted"] = sorted(interrupted)
    return board


def trial_order(cells: list[Cell], options: SweepOptions) -> list[str]:
    """The order Tune starts the trials in: the grid's, or a fixed shuffle under a scheduler.

    Asynchronous ASHA promotes whoever reaches a rung while it beats the trials seen so far, so
    a grid in its natural order (learning rates ascending, say) hands it a rising sequence and
    it promotes most of them: 54% of the grid's epochs on 48 M1 cells in grid order, 31% on
    average over random orders (results/bench-tune-asha-m1.md). Seed 0: re-runs keep the order.
    """
    order = [cell.trial_id for cell in cells]
    if options.scheduler != "none":
        random.Random(0).shuffle(order)
    return order


def _check_one_data_source(cells: list[Cell]) -> None:
    """The data set is loaded once per sweep: every cell must name the same data and limit."""
    sources = {(c.settings.data, c.settings.limit, c.settings.split_seed,
                c.settings.validation_fraction) for c in cells}
    if len(sources) > 1:
        raise SweepError("all trials of one sweep must share data, limit, split_seed and "
                         f"validation_fraction (the data set is loaded once); got {sources}")


def _cell_config(cell: Cell, options: SweepOptions) -> dict:
    meta = {"trial_id": cell.trial_id, "digest": cell.digest, "sweep": options.name,
            "sweep_uri": options.sweep_uri, "s3_endpoint": options.s3_endpoint,
            "resources": options.trial_resources(cell.settings.model),
            "resume": options.resume}
    if cell.settings.model == "M7" and options.m7_workers > 1:
        meta["workers"] = {"num_workers": options.m7_workers, "use_gpu": options.use_gpu,
                           "max_failures": options.max_failures}
    return {"settings": cell.settings.to_dict(), "meta": meta}


def _placement(cell: dict):
    from ray import tune

    resources = {k: v for k, v in cell["meta"]["resources"].items() if v}
    return tune.PlacementGroupFactory([resources])


def _scheduler(options: SweepOptions, cells: list[Cell]):
    if options.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        """ASHA that remembers whom it stopped: a trial the user's Ctrl-C ended looks the same
        in Tune's results (no error, epochs missing) but must stay open for ``--resume``."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.stopped: set[str] = set()

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                self.stopped.add(trial.config["trial_id"])
            return action

    max_epochs = max(c.settings.total_epochs for c in cells)
    # Judge trials by epochs done (not by report count): a resumed trial keeps its epoch number.
    return RecordingASHA(time_attr="epoch", max_t=max_epochs,
                         grace_period=options.grace_period,
                         reduction_factor=options.reduction_factor)


def record_unfinished(results, options: SweepOptions, cells: dict[str, dict],
                      stopped_by_scheduler: set[str]) -> list[str]:
    """Write records for trials that did not write their own: scheduler-stopped or errored.

    Returns the trials that were neither (the sweep was interrupted, e.g. by Ctrl-C): they
    get no record, so ``--resume`` or a re-submission continues them from their checkpoints.
    That includes cells Tune never got to: under ``max_concurrent_trials`` it creates trials
    one by one, so a Ctrl-C just after a trial finished leaves the next ones out of ``results``.
    """
    from cifar_core.provenance import provenance

    def completed(record_uri: str) -> bool:
        if not storage.exists(record_uri, options.s3_endpoint):
            return False
        record = TrialRecord.from_json(storage.read_text(record_uri, options.s3_endpoint))
        return record.status == COMPLETED

    sweep_provenance = provenance()
    interrupted = []
    seen = set()
    for result in results:
        cell = cells[result.config["trial_id"]]
        meta = cell["meta"]
        seen.add(meta["trial_id"])
        trial_uri = storage.join_uri(options.sweep_uri, TRIALS_DIR, meta["trial_id"])
        record_uri = storage.join_uri(trial_uri, RECORD_FILE)
        if completed(record_uri):
            continue
        settings = Settings.from_dict(cell["settings"])
        history = _history(result)
        errored = result.error is not None
        if not errored and history and history[-1]["epoch"] >= settings.total_epochs:
            # Ran every epoch yet left no record: not the scheduler's doing; say so.
            errored, result_error = True, "trial ended without writing its record"
        elif not errored and meta["trial_id"] not in stopped_by_scheduler:
            interrupted.append(meta["trial_id"])
            continue
        else:
            result_error = str(result.error)[:2000] if errored else None
        checkpoint_uri = None
        if result.checkpoint is not None:  # Tune's copy of the trial's checkpoints/ folder
            checkpoint_uri = ("s3://" if storage.is_s3(options.storage) else "") + \
                result.checkpoint.path + "/best"
        best = max(history, key=lambda m: m.get("val_accuracy", -math.inf), default={})
        record = TrialRecord(
            trial_id=meta["trial_id"], sweep=meta["sweep"], kind="tune", model=settings.model,
            settings=settings.to_dict(), settings_hash=meta["digest"],
            status=ERRORED if errored else STOPPED_BY_SCHEDULER,
            stop_reason="error" if errored else "stopped_by_scheduler",
            epochs_run=int(history[-1]["epoch"]) if history else 0,
            best_val_accuracy=best.get("val_accuracy"), best_epoch=best.get("epoch"),
            wall_time_s=round(sum(m.get("epoch_time_s", 0.0) for m in history), 2),
            resources=meta["resources"], checkpoint_uri=checkpoint_uri, history=history,
            error=result_error, finished=_now(),
            provenance=sweep_provenance)  # the driver's: the trial's own died with it
        storage.write_text(record_uri, record.to_json(), options.s3_endpoint)
    for trial_id in cells.keys() - seen:  # never created by Tune (unless finished elsewhere)
        if not completed(storage.join_uri(options.sweep_uri, TRIALS_DIR, trial_id, RECORD_FILE)):
            interrupted.append(trial_id)
    return interrupted


def _history(result) -> list[dict]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return []
    keep = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
            "epoch_time_s"]
    frame = frame[[c for c in keep if c in frame.columns]].drop_duplicates("epoch", keep="last")
    return [{k: (int(v) if k in ("epoch", "phase") else float(v)) for k, v in row.items()}
            for row in frame.to_dict("records")]


def read_records(sweep_uri: str, endpoint: str | None = None) -> list[TrialRecord]:
    uris = storage.find_files(storage.join_uri(sweep_uri, TRIALS_DIR), RECORD_FILE, endpoint)
    return [TrialRecord.from_json(storage.read_text(uri, endpoint)) for uri in uris]


def leaderboard(options: SweepOptions):
    """One row per trial of the sweep, best val_accuracy first (test_accuracy is never used
    to rank)."""
    import pandas as pd

    records = read_records(options.sweep_uri, options.s3_endpoint)
    rows = []
    for record in records:
        varied = {k: record.settings.get(k) for k in ("learning_rate", "batch_size",
                                                      "dropout_rate", "seed")}
        rows.append({"model": record.model, "trial_id": record.trial_id, **varied,
                     "status": record.status, "stop_reason": record.stop_reason,
                     "epochs_run": record.epochs_run,
                     "best_val_accuracy": record.best_val_accuracy,
                     "test_accuracy": record.test_accuracy,
                     "wall_time_s": record.wall_time_s})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values("best_val_accuracy", ascending=False, na_position="last")
    return frame.reset_index(drop=True)
