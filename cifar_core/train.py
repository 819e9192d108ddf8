"""The one training function: every model, every job (CLI, Tune trial, Ray Train worker).

``train(settings, data, workdir)`` builds the model, runs its phases with Keras ``fit`` and the
seed's callbacks, and after every epoch writes a checkpoint, appends one JSON line of metrics
and calls an optional ``report(metrics, checkpoint_dir)`` hook (Tune and Ray Train plug in
there). Resuming, fine-tuning and the M7 second phase are the same code path: start from a
checkpoint whose ``state.json`` says which phase and epoch come next.

A checkpoint is a folder:

    model.keras        the model with its optimizer state (Keras format, loads with safe_mode)
    settings.json      the Settings it was trained with
    state.json         phase, epochs done, best val_accuracy so far, per-epoch history
    provenance.json    git commit, library versions, machine
    evaluation.json    test-set evaluation (best checkpoint, after training)

The workdir holds ``checkpoints/last``, ``checkpoints/best`` (by val_accuracy), ``metrics.jsonl``
and ``evaluation.json`` (names in ``storage``). Progress is one log line per epoch (logger
``cifar_core.train``); Keras' own per-step output stays off.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
import tf_keras as keras

from cifar_core import fast, storage
from cifar_core.data import Cifar10, make_dataset
from cifar_core.evaluate import evaluate
from cifar_core.models import (build_model, compile_model, load_checkpoint_model,
                               set_trainable_backbone_layers, use_precision)
from cifar_core.provenance import provenance
from cifar_core.settings import Settings
from cifar_core.storage import BEST, CHECKPOINTS_DIR, LAST, MODEL_FILE

#: ``report(metrics, last_checkpoint_dir)``, called after every epoch's checkpoint is saved.
ReportFn = Callable[[dict, str], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """One stretch of training at one learning rate with one set of trainable layers."""

    index: int
    epochs: int
    learning_rate: float
    trainable_backbone_layers: int


def schedule(settings: Settings) -> list[Phase]:
    """Phase 1 (backbone frozen) and, when ``fine_tune_epochs`` > 0, phase 2."""
    phases = [Phase(0, settings.num_epochs, settings.learning_rate, 0)]
    if settings.fine_tune_epochs:
        phases.append(Phase(1, settings.fine_tune_epochs, settings.fine_tune_learning_rate,
                            settings.fine_tune_layers))
    return phases


@dataclass
class TrainState:
    """What a checkpoint must remember to continue exactly where it stopped."""

    epoch: int = 0                 # epochs completed, all phases together
    phase: int = 0                 # index of the phase in progress (or last finished)
    phase_epochs: int = 0          # epochs completed within that phase
    best_val_accuracy: float = -math.inf
    best_epoch: int = 0
    stop_reasons: list[str] = field(default_factory=list)  # one per finished phase
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        data = self.__dict__.copy()
        if not math.isfinite(data["best_val_accuracy"]):
            data["best_val_accuracy"] = None
        return json.dumps(data, indent=1)

    @classmethod
    def read(cls, checkpoint: str | Path) -> "TrainState":
        data = json.loads(Path(checkpoint, storage.STATE_FILE).read_text())
        if data.get("best_val_accuracy") is None:
            data["best_val_accuracy"] = -math.inf
        return cls(**data)


@dataclass
class TrainResult:
    workdir: Path
    state: TrainState
    evaluation: dict | None

    @property
    def best_checkpoint(self) -> Path:
        return self.workdir / CHECKPOINTS_DIR / BEST

    @property
    def last_checkpoint(self) -> Path:
        return self.workdir / CHECKPOINTS_DIR / LAST

    @property
    def stop_reason(self) -> str:
        return "early_stopped" if "early_stopped" in self.state.stop_reasons else "completed"


def configure_gpus() -> None:
    """Memory growth on every visible GPU: trials that share a card must not grab all of it."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised in this process; the first call's setting stands


def train(settings: Settings, data: Cifar10, workdir: str | Path, *,
          report: ReportFn | None = None, resume_from: str | Path | None = None,
          strategy: Any = None, evaluate_test: bool = True) -> TrainResult:
    """Train ``settings.model`` on ``data``; checkpoints and metrics go to ``workdir``.

    ``resume_from`` (or an existing ``workdir/checkpoints/last``) continues at the recorded
    phase and epoch. ``strategy`` is a ``tf.distribute`` strategy (multi-worker Ray Train);
    every worker must call ``train`` with its own workdir, since every worker must save.
    ``evaluate_test``: evaluate the best weights on the test set at the end.
    """
    configure_gpus()
    workdir = Path(workdir)
    (workdir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    storage.atomic_write_bytes(workdir / storage.SETTINGS_FILE, settings.to_json().encode())
    # A strategy's scope object can be entered only once, so each ``with`` gets a fresh one.
    scope = strategy.scope if strategy is not None else _null_scope
    with scope():
        model, state = _start(settings, workdir, resume_from, data.x_train)
    train_data = make_dataset(data.x_train, data.y_train, settings, training=True)
    val_data = make_dataset(data.x_val, data.y_val, settings, training=False)
    if strategy is not None:
        train_data, val_data = _shard_by_batch(train_data), _shard_by_batch(val_data)
    checkpointer = EpochCheckpoint(settings, workdir, state, report)
    phases = schedule(settings)
    for phase in phases[state.phase:]:
        if _phase_finished(state, phase):
            continue  # resumed after the run had finished this (last) phase
        _run_phase(model, phase, checkpointer, scope, (train_data, val_data))
        if phase.index + 1 < len(phases):
            state.phase, state.phase_epochs = phase.index + 1, 0
        if settings.early_stopping_patience:
            # The seed restores the best weights at the end of each phase; phase 2 starts there.
            checkpointer.restore_best(model)
        checkpointer.save(model, best=False, write_metrics=False)
    evaluation = None
    if evaluate_test:
        checkpointer.restore_best(model)
        evaluation = evaluate(model, data, settings)
        _write_evaluation(workdir, evaluation)
    return TrainResult(workdir, state, evaluation)


def _start(settings: Settings, workdir: Path, resume_from: str | Path | None, train_images):
    """(model, state): a new model (its data-derived layers set from ``train_images``), or the
    one in ``resume_from`` (default: the workdir's own last checkpoint), copied into this
    workdir when it came from elsewhere."""
    last = workdir / CHECKPOINTS_DIR / LAST
    if resume_from is None and (last / storage.STATE_FILE).exists():
        resume_from = last
    if resume_from is None:
        return build_model(settings, train_images=train_images), TrainState()
    resume_from = Path(resume_from)
    state = TrainState.read(resume_from)
    use_precision(settings)
    model = load_checkpoint_model(resume_from / MODEL_FILE)
    if resume_from.resolve() != last.resolve():
        storage.copy_dir(resume_from, last)
    best_source, best = resume_from.parent / BEST, workdir / CHECKPOINTS_DIR / BEST
    if (best_source / storage.STATE_FILE).exists() and not best.exists():
        storage.copy_dir(best_source, best)
    metrics_file = workdir / storage.METRICS_FILE
    if state.history and not metrics_file.exists():
        # Resumed into a fresh workdir (a retried Tune trial): keep the earlier epochs' lines.
        metrics_file.write_text("".join(json.dumps(m) + "\n" for m in state.history))
    return model, state


def _run_phase(model: keras.Model, phase: Phase, checkpointer: "EpochCheckpoint", scope,
               datasets) -> None:
    """Fit the rest of one phase with the seed's callbacks; record how the phase ended."""
    settings, state = checkpointer.settings, checkpointer.state
    del state.stop_reasons[phase.index:]  # a finished last phase re-opened with more epochs
    if state.phase_epochs == 0:
        # A fresh phase: set which layers train and compile at the phase's rate (this also
        # gives phase 2 a new optimizer). A resumed phase keeps its optimizer state.
        with scope():
            set_trainable_backbone_layers(model, phase.trainable_backbone_layers)
            compile_model(model, settings, phase.learning_rate)
    checkpointer.phase = phase
    callbacks: list[keras.callbacks.Callback] = []
    early_stopping = None
    if settings.early_stopping_patience:
        early_stopping = keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=settings.early_stopping_patience,
            restore_best_weights=True)
        callbacks.append(early_stopping)
    if settings.reduce_lr_patience:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=settings.reduce_lr_factor,
            patience=settings.reduce_lr_patience, verbose=0))
    if settings.learning_rate_schedule != "constant" or settings.warmup_fraction:
        callbacks.append(fast.WarmupLinearDecay(
            phase.learning_rate, phase.epochs, settings.warmup_fraction,
            decay=settings.learning_rate_schedule == "linear"))
    callbacks.append(checkpointer)  # sees the learning rate and stop flag the others set
    if settings.ema_decay:
        # After the checkpointer: validation and the epoch's checkpoint see the average, then
        # the raw weights come back for the next epoch (fast.WeightAverage).
        callbacks.append(fast.WeightAverage(settings.ema_decay))
    remaining = phase.epochs - state.phase_epochs
    if remaining > 0:
        train_data, val_data = datasets
        model.fit(train_data, validation_data=val_data, initial_epoch=state.epoch,
                  epochs=state.epoch + remaining, callbacks=callbacks, verbose=0)
    stopped = early_stopping is not None and early_stopping.stopped_epoch > 0
    state.stop_reasons.append("early_stopped" if stopped else "completed")


def _write_evaluation(workdir: Path, evaluation: dict) -> None:
    data = json.dumps(evaluation, indent=1).encode()
    storage.atomic_write_bytes(workdir / storage.EVALUATION_FILE, data)
    best = workdir / CHECKPOINTS_DIR / BEST
    if best.exists():
        storage.atomic_write_bytes(best / storage.EVALUATION_FILE, data)


def _phase_finished(state: TrainState, phase: Phase) -> bool:
    """Did an earlier run end this phase (early stop, or all of its epochs)?"""
    if len(state.stop_reasons) <= phase.index:
        return False
    return (state.stop_reasons[phase.index] == "early_stopped"
            or state.phase_epochs >= phase.epochs)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: metrics line, last (and best) checkpoint, then the report hook."""

    def __init__(self, settings: Settings, workdir: Path, state: TrainState,
                 report: ReportFn | None):
        super().__init__()
        self.settings, self.workdir, self.state, self.report = settings, workdir, state, report
        self.phase: Phase | None = None
        self.best_weights: list | None = None
        self.provenance = provenance()
        self._epoch_start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()
        self._learning_rate = float(keras.backend.get_value(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        logs.pop("lr", None)  # ReduceLROnPlateau's alias; we record learning_rate instead
        metrics = {name: float(value) for name, value in logs.items()}
        metrics.update(epoch=epoch + 1, phase=self.phase.index + 1,
                       learning_rate=self._learning_rate,
                       epoch_time_s=round(time.perf_counter() - self._epoch_start, 3))
        state = self.state
        state.epoch, state.phase_epochs = epoch + 1, state.phase_epochs + 1
        improved = metrics.get("val_accuracy", -math.inf) > state.best_val_accuracy
        if improved:
            state.best_val_accuracy, state.best_epoch = metrics["val_accuracy"], epoch + 1
            self.best_weights = self.model.get_weights()
        metrics["best_val_accuracy"] = state.best_val_accuracy
        state.history.append(metrics)
        self.save(self.model, best=improved, write_metrics=True)
        log.info("%s epoch %d/%d: %s", self.settings.model, epoch + 1,
                 self.settings.total_epochs, "  ".join(
                     f"{k} {metrics[k]:.4f}" for k in ("loss", "accuracy", "val_loss",
                                                       "val_accuracy") if k in metrics)
                 + f"  ({metrics['epoch_time_s']:.1f} s)")
        if self.report is not None:
            self.report(metrics, str(self.workdir / CHECKPOINTS_DIR / LAST))

    def save(self, model: keras.Model, best: bool, write_metrics: bool) -> None:
        """Write ``last`` atomically (stage, then rename); copy it to ``best`` if improved."""
        checkpoints = self.workdir / CHECKPOINTS_DIR
        staging = checkpoints / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        # "keras_v3" rather than the file suffix: tf_keras picks the format from a thread-local
        # flag that is unset in non-main threads (Ray Train and Tune run the training function in
        # one) and, after the first save or load there, it silently writes HDF5 instead.
        model.save(str(staging / MODEL_FILE), save_format="keras_v3")
        (staging / storage.SETTINGS_FILE).write_text(self.settings.to_json())
        (staging / storage.STATE_FILE).write_text(self.state.to_json())
        (staging / storage.PROVENANCE_FILE).write_text(json.dumps(self.provenance, indent=1))
        storage.replace_dir(staging, checkpoints / LAST)
        if best:
            storage.copy_dir(checkpoints / LAST, checkpoints / BEST)
        if write_metrics:
            with open(self.workdir / storage.METRICS_FILE, "a") as handle:
                handle.write(json.dumps(self.state.history[-1]) + "\n")

    def restore_best(self, model: keras.Model) -> None:
        """Load the best-by-val_accuracy weights (from memory, or the best checkpoint)."""
        if self.best_weights is None:
            best = self.workdir / CHECKPOINTS_DIR / BEST / MODEL_FILE
            if not best.exists():
                return
            self.best_weights = load_checkpoint_model(best).get_weights()
        model.set_weights(self.best_weights)


def _shard_by_batch(dataset):
    """Split every global batch between the workers (``batch_size`` is the global batch).

    In-memory arrays have no files to divide, so the DATA policy is the one that applies; saying
    so explicitly spares the AUTO policy's failed FILE attempt and its warning.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


class _null_scope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def read_metrics(workdir: str | Path) -> list[dict]:
    """The per-epoch metrics lines a run wrote."""
    path = Path(workdir, storage.METRICS_FILE)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
