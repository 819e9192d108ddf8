"""Ray Tune sweeps over the model ladder: every chosen model with its grid, as parallel trials.

The driver plans every cell before Ray starts (``plan.py``: validated, hashed), reads the
sweep's storage once (``records.scan``), loads the data once and hands it to the trials through
Ray's object store (``tune.with_parameters``), and lets Tune schedule, retry and (with ASHA)
stop trials.

Each trial runs the one training function, reports every epoch with a checkpoint (Tune keeps the
best and the latest), evaluates the best weights on the test set at its end, and writes its
record plus its best checkpoint under ``<storage>/<name>/trials/<trial_id>/``. Trials the
scheduler stopped, or that failed after their retries, get their record from the driver when
the sweep ends. A cell whose record says it completed (or was stopped by the scheduler) is not
run again when the sweep is re-submitted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from cifar_core import storage, tracking
from cifar_core.plan import (SweepOptions, check_one_data_source, plan_cells, trial_order,
                             with_checkpoints)
from cifar_core.records import (COMPLETED, ERRORED, STOPPED_BY_SCHEDULER, Cell, Outcome,
                                TrialRecord, make_record, now, scan)
from cifar_core.search import CellBook, TunePlan, optuna_plans

log = logging.getLogger(__name__)


def run_sweep(options: SweepOptions, data=None, address: str | None = None):
    """Run (or resume) a sweep; returns its trials as a pandas DataFrame, best first
    (``attrs["interrupted"]``: the trials a Ctrl-C left unfinished)."""
    from cifar_core.provenance import code_version, provenance

    if not storage.is_s3(options.storage):
        # Trials run in their own working folders: a relative path would land there.
        options = replace(options, storage=str(Path(options.storage).resolve()))
    cells = plan_cells(options, code_version())          # validates before anything starts
    tracking.check_available(options)
    endpoint = storage.s3_endpoint(options.s3_endpoint)
    state = scan(options.sweep_uri, endpoint)
    for uri, problem in sorted(state.damaged.items()):
        log.warning("cifar tune: damaged trial record %s (%s): its trial counts as not done "
                    "and runs again", uri, problem)
    if options.search == "optuna":
        plans = optuna_plans(options, state, code_version())
    else:
        plans = _grid_plans(cells, state, options)
    storage.write_text(storage.join_uri(options.sweep_uri, storage.SWEEP_FILE), json.dumps({
        "options": options.__dict__, "cells": len(cells), "provenance": provenance()},
        indent=1, default=str), endpoint)
    if not plans:
        return results_table(state.records.values())
    check_one_data_source([c for plan in plans
                           for c in (list(plan.book.cells.values()) or [plan.sample])])
    records, interrupted = _run(plans, options, data, address)
    table = results_table({**state.records, **records}.values())
    if interrupted:
        log.warning("cifar tune: the sweep was interrupted; %d trial(s) did not finish and have "
                    "no record: %s. Run the same command with --resume to continue them from "
                    "their checkpoints.", len(interrupted), ", ".join(sorted(interrupted)))
    table.attrs["interrupted"] = sorted(interrupted)
    return table


def _grid_plans(cells: list[Cell], state, options: SweepOptions) -> list[TunePlan]:
    """The planned cells not finished yet, as one Tune run (none if all are done)."""
    finished = state.finished()
    todo = [cell for cell in cells if cell.trial_id not in finished]
    log.info("cifar tune: %d cells in sweep %r; %d already finished in %s; %d to run",
             len(cells), options.name, len(cells) - len(todo), options.sweep_uri, len(todo))
    if not todo:
        return []
    earlier = state.earlier_versions(todo)
    if earlier:
        log.info("cifar tune: %d cell(s) to run match trials of another code version in this "
                 "storage (a trial id includes the code version):\n  %s", len(earlier),
                 "\n  ".join(earlier))
    if options.resume:
        # Tuner.restore hangs in this Ray when the driver died before its search state was
        # saved; instead the unfinished cells run again, each from the newest checkpoint an
        # earlier attempt left in the sweep's storage.
        log.info("cifar tune: resuming the interrupted sweep in %s", options.sweep_uri)
        todo = with_checkpoints(todo, state.checkpoints)
    return [TunePlan(CellBook({c.trial_id: c for c in todo}), param_space(todo, options),
                     sample=todo[0])]


def _run(plans: list[TunePlan], options: SweepOptions, data, address: str | None):
    """Run the plans under Tune, one after another; (their records by id, the interrupted
    trial ids). A Ctrl-C in one plan ends the sweep: the later plans stay for ``--resume``."""
    from cifar_core.data import load_cifar10
    from cifar_core.plan import SweepError
    from cifar_core.ray_glue import connect_ray, is_private, unfit

    samples = [c for plan in plans for c in (list(plan.book.cells.values()) or [plan.sample])]
    # The person's view by default: no trial processes' output, no Ray INFO lines (state
    # saves, checkpoint notices).
    started = connect_ray(address, dashboard=any(cell.workers for cell in samples),
                          log_to_driver=options.verbose,
                          logging_level=logging.INFO if options.verbose else logging.WARNING)
    if is_private(address):
        for cell in samples:
            problem = unfit({k: v for k, v in cell.resources.items() if k in ("CPU", "GPU")})
            if problem:
                if started:
                    import ray

                    ray.shutdown()
                raise SweepError(f"trial {cell.trial_id} ({cell.settings.model}) {problem}; "
                                 "change --resources/--use-gpu or run on a cluster (--address)")
    if data is None:
        data = load_cifar10(samples[0].settings)
    records, interrupted = {}, []
    for plan in plans:
        done, cut = _run_plan(plan, options, data)
        records.update(done)
        interrupted += cut
        if cut:
            break
    return records, interrupted


def _run_plan(plan: TunePlan, options: SweepOptions, data):
    from ray import tune

    book = plan.book
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, book=book),
        lambda config: tune.PlacementGroupFactory(
            [{k: v for k, v in book(config).resources.items() if v}]))
    scheduler = _scheduler(options, plan.max_epochs, book)
    fs, path = storage.pyarrow_filesystem(options.storage, options.s3_endpoint)
    name = lambda trial: book(trial.config).trial_id  # noqa: E731
    total = len(book.cells) if plan.searcher is None else plan.num_samples
    tuner = tune.Tuner(
        trainable,
        param_space=plan.param_space,
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", scheduler=scheduler,
            search_alg=plan.searcher, num_samples=plan.num_samples,
            max_concurrent_trials=options.max_concurrent,
            # A new process per trial pays Ray's actor start and TensorFlow's import (~5-10 s)
            # every time; reusing it keeps short trials cheap. Not under a scheduler: a trial it
            # stops keeps training in the reused process until its next report (up to an
            # epoch), Tune gives the reset 2 s, and the next trial there then fails with
            # "Trainable runner reuse requires reset_config()".
            reuse_actors=options.scheduler == "none",
            trial_name_creator=name,
            trial_dirname_creator=lambda trial: f"{name(trial)}_{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=options.name, storage_path=path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max"),
            callbacks=([] if options.verbose else [progress_callback(total, name)])
            + tracking.tune_callbacks(options, book),
            verbose=1 if options.verbose else 0))
    # Tune's legacy reporter prints nothing at verbose=0; the new one prints its experiment
    # table whatever `verbose` says (ray/tune/experimental/output.py,
    # TuneTerminalReporter.experiment_started). And Tune warns, three lines at a time, that
    # per-epoch checkpoints make it snapshot its state often (experiment_state.py): true and
    # intended here. Tune reads both switches in fit().
    quiet = {} if options.verbose else {
        "RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    earlier = {name: os.environ.get(name) for name in quiet}
    os.environ.update(quiet)
    try:
        results = tuner.fit()
    finally:
        for name, value in earlier.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return record_unfinished(results, book, getattr(scheduler, "stopped", set()),
                             options.storage)


def progress_callback(total: int, name=lambda trial: trial.config["trial_id"]):
    """Tune callback: the person's view of a sweep, one line per trial that ends (rewritten in
    place on a terminal), instead of Tune's trial tables (``--verbose`` brings those back)."""
    import sys

    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.ended, self.running, self.best = 0, set(), None
            self.terminal = sys.stderr.isatty()

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._show(f"started {name(trial)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            accuracy = result.get("val_accuracy")
            if accuracy is not None and (self.best is None or accuracy > self.best[0]):
                self.best = (accuracy, name(trial))
            if self.terminal:
                self._show(f"{name(trial)} epoch {result.get('epoch')}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "failed")

        def _end(self, trial, how: str) -> None:
            self.ended += 1
            self.running.discard(trial.trial_id)
            self._show(f"{how} {name(trial)}", final=not self.terminal)

        def _show(self, event: str, final: bool = False) -> None:
            best = f"; best val_accuracy {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
            line = (f"cifar tune: {self.ended}/{total} trials done, {len(self.running)} "
                    f"running, {total - self.ended - len(self.running)} pending{best}: {event}")
            if self.terminal:
                print("\r" + line[:150].ljust(150), end="", file=sys.stderr, flush=True)
            elif final:
                print(line, file=sys.stderr, flush=True)

        def on_experiment_end(self, trials, **info):
            if self.terminal:
                print(file=sys.stderr, flush=True)

    return Progress()


def param_space(cells: list[Cell], options: SweepOptions) -> dict:
    """Tune's search space: the cell ids as a grid, and each cell's varied settings (fields
    whose values differ between the cells, plus the model) resolved from its id, so
    ``ResultGrid.get_dataframe()``, Tune's CSV/JSON results and tracking callbacks see the real
    hyperparameters (Tune's default TensorBoard logger records only what its grid generator
    resolved, ``trial_id``: ``tracking.py`` writes the HParams). Only ``trial_id`` is read
    back: the cells themselves carry the truth."""
    from functools import partial

    from ray import tune

    settings = [c.settings.to_dict() for c in cells]
    varied = ["model"] + sorted(
        name for name in settings[0] if name != "model"
        and len({json.dumps(s[name], sort_keys=True) for s in settings}) > 1)
    by_id = {c.trial_id: c.settings.to_dict() for c in cells}
    return {"trial_id": tune.grid_search(trial_order(cells, options)),
            **{name: tune.sample_from(partial(_cell_setting, by_id, name)) for name in varied}}


def _cell_setting(by_id: dict[str, dict], name: str, config: dict) -> object:
    return by_id[config["trial_id"]][name]


# ---------------------------------------------------------------------------- the trial
def run_trial(config: dict, data, book: CellBook) -> None:
    """Tune function trainable: one cell, from its checkpoint if Tune is retrying it.

    ``config`` holds the cell's id and varied settings, or an Optuna point; the cell comes from
    ``book`` (the planned cells travel once through the object store, like the data).
    """
    cell = book(config)
    if cell.workers:
        # M7 on several GPUs: this trial drives a Ray Train run (Tuner(trainer) is deprecated).
        from cifar_core.multiworker import finetune_trial

        return finetune_trial(cell, data)
    started, started_at = time.time(), now()  # the trial's wall time counts all of it
    import tf_keras as keras

    from cifar_core.ray_glue import RayReporter, limit_threads_to_ray_cpus
    from cifar_core.train import train

    limit_threads_to_ray_cpus()
    keras.backend.clear_session()  # a reused process: drop the previous trial's graphs
    workdir = Path(tempfile.mkdtemp(prefix=f"{cell.trial_id}-"))
    try:
        resume_from, earlier_time = _restore(cell, workdir)
        reporter = RayReporter("tune", hold_from_epoch=cell.settings.total_epochs)
        result = train(cell.settings, data, workdir, report=reporter, resume_from=resume_from)
        storage.upload_tree(result.best_checkpoint, cell.best_uri, cell.s3_endpoint)
        provenance = json.loads((result.best_checkpoint / storage.PROVENANCE_FILE).read_text())
        record = make_record(cell, Outcome(
            COMPLETED, result.state.history, result.state.stop_reasons, result.evaluation,
            checkpoint_uri=cell.best_uri, wall_time_s=time.time() - started + earlier_time,
            started=started_at), data.summary(), provenance)
        storage.write_text(cell.record_uri, record.to_json(), cell.s3_endpoint)
        reporter.flush()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _restore(cell: Cell, workdir: Path) -> tuple[Path | None, float]:
    """The ``last`` checkpoint to continue from (Tune's, on a retry; else the one an earlier
    attempt left, under ``--resume``) and the training seconds already in it."""
    from ray import tune

    from cifar_core.train import TrainState

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        local = Path(checkpoint.to_directory(str(workdir / "resume")))
    elif cell.resume_from:
        local = storage.download_tree(cell.resume_from, workdir / "resume", cell.s3_endpoint)
    else:
        return None, 0.0
    last = local / storage.LAST
    history = TrainState.read(last).history
    return last, sum(m.get("epoch_time_s", 0.0) for m in history)


# ---------------------------------------------------------------------------- the end
def _scheduler(options: SweepOptions, max_epochs: int, book: CellBook):
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
                self.stopped.add(book(trial.config).trial_id)
            return action

    # Judge trials by epochs done (not by report count): a resumed trial keeps its epoch number.
    return RecordingASHA(time_attr="epoch", max_t=max_epochs,
                         grace_period=options.grace_period,
                         reduction_factor=options.reduction_factor)


def record_unfinished(results, book: CellBook, stopped_by_scheduler: set[str],
                      storage_root: str) -> tuple[dict[str, TrialRecord], list[str]]:
    """Read each run cell's record once; write one for trials that did not write their own
    (scheduler-stopped or errored). Returns (records by id, interrupted trial ids).

    Interrupted trials (a Ctrl-C) get no record, so ``--resume`` continues them. That includes
    cells Tune never got to: under ``max_concurrent_trials`` it creates trials one by one, so
    a Ctrl-C just after a trial finished leaves the next ones out of ``results``.
    """
    from cifar_core.provenance import provenance

    for result in results:  # an Optuna point's cell is known once its trial exists
        if result.config is not None:  # None: Tune created the trial, a Ctrl-C came first
            book(result.config)
    cells = book.cells
    records: dict[str, TrialRecord] = {}
    ids = list(cells)
    endpoint = next(iter(cells.values())).s3_endpoint if cells else None
    for trial_id, data in zip(ids, storage.read_many([cells[i].record_uri for i in ids],
                                                     endpoint)):
        try:
            if not isinstance(data, BaseException):
                records[trial_id] = TrialRecord.from_json(data)
        except ValueError:
            pass  # damaged: treated as missing, rewritten below if Tune knows how it ended
    done = {i for i, r in records.items() if r.status == COMPLETED}
    interrupted, seen = [], set()
    sweep_provenance = provenance()
    for result in results:
        if result.config is None:
            continue  # never reported: interrupted (its cell is counted below, unseen)
        cell = book(result.config)
        seen.add(cell.trial_id)
        if cell.trial_id in done:
            continue
        history = _history(result)
        error = None
        if result.error is not None:
            error = str(result.error)
        elif history and history[-1]["epoch"] >= cell.settings.total_epochs:
            error = "trial ended without writing its record"  # not the scheduler's doing
        elif cell.trial_id not in stopped_by_scheduler:
            interrupted.append(cell.trial_id)
            continue
        checkpoint_uri = None
        if result.checkpoint is not None:  # Tune's copy of the trial's checkpoints/ folder
            checkpoint_uri = storage.join_uri(
                storage.as_uri(result.checkpoint.path, storage_root), storage.BEST)
        record = make_record(cell, Outcome(
            ERRORED if error else STOPPED_BY_SCHEDULER, history, error=error,
            checkpoint_uri=checkpoint_uri), provenance=sweep_provenance)  # the trial's died
        storage.write_text(cell.record_uri, record.to_json(), cell.s3_endpoint)
        records[cell.trial_id] = record
    interrupted += [i for i in ids if i not in seen and i not in done]
    return records, interrupted


def _history(result) -> list[dict]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return []
    keep = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
            "epoch_time_s"]
    frame = frame[[c for c in keep if c in frame.columns]].drop_duplicates("epoch", keep="last")
    return [{k: (int(v) if k in ("epoch", "phase") else float(v)) for k, v in row.items()}
            for row in frame.to_dict("records")]


def results_table(records):
    """One row per trial of the sweep, best val_accuracy first (test_accuracy never ranks)."""
    import pandas as pd

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
        frame = frame.sort_values(["best_val_accuracy", "trial_id"], ascending=[False, True],
                                  na_position="last")
    return frame.reset_index(drop=True)


def read_records(sweep_uri: str, endpoint: str | None = None) -> list[TrialRecord]:
    """The readable records of a sweep (``records.scan``'s)."""
    return list(scan(sweep_uri, endpoint).records.values())

