"""What ``--model MODEL`` names, for batch scoring and serving: one resolved, checked checkpoint.

MODEL is a checkpoint folder (``model.keras`` + ``settings.json``), a ``model.keras`` file
beside its ``settings.json``, a ``cifar train`` run folder (its ``checkpoints/best``), or a
sweep folder / storage folder of sweeps (the trial ``records.select_best`` picks, never by test
accuracy). Local or ``s3://``; s3 checkpoints are mirrored into the local cache. The model is
loaded once on the driver through the project's one safe loader (``check_archive`` before any
Ray work, the load itself while a job's Ray starts), so an unsafe or broken checkpoint is a
clear error, not an actor crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cifar_core import storage
from cifar_core.keras_archive import ModelError, check_keras_archive
from cifar_core.records import TrialRecord, select_best, settings_hash
from cifar_core.settings import CLASS_NAMES, Settings, SettingsError


class CheckpointError(ValueError):
    """MODEL names no usable checkpoint (missing, unreadable, unsafe, inconsistent)."""


@dataclass
class Checkpoint:
    """A resolved checkpoint: where it came from, its local folder and its settings."""

    uri: str                         # the checkpoint folder (local path or s3:// URI)
    local_dir: Path
    settings: Settings
    selected_trial: dict | None = None  # when MODEL held trials: the trial picked and why
    record: TrialRecord | None = None

    def describe(self) -> dict:
        """What is being used, for summaries and answers: the trial's record when MODEL held
        one, else what the checkpoint folder itself says (its evaluation and provenance)."""
        record = self.record
        if record is not None:
            identity = {"trial_id": record.trial_id, "settings_hash": record.settings_hash,
                        "val_accuracy": record.best_val_accuracy,
                        "test_accuracy": record.test_accuracy,
                        "git_commit": (record.provenance or {}).get("git_commit")}
        else:
            provenance = _json(self.local_dir / storage.PROVENANCE_FILE)
            state = _json(self.local_dir / storage.STATE_FILE)
            code = str(provenance.get("code_version") or provenance.get("git_commit", "?"))
            digest = settings_hash(self.settings, self.settings.data, code)
            identity = {"trial_id": f"{self.settings.model}-{digest}", "settings_hash": digest,
                        "val_accuracy": state.get("best_val_accuracy"),
                        "test_accuracy": _json(self.local_dir / storage.EVALUATION_FILE).get(
                            "test_accuracy"), "git_commit": provenance.get("git_commit")}
        return {"checkpoint": self.uri, "model": self.settings.model,
                "input_size": self.settings.input_size, "selected_trial": self.selected_trial,
                **identity}

    @property
    def model_file(self) -> Path:
        return self.local_dir / storage.MODEL_FILE


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def resolve_checkpoint(model: str, endpoint: str | None = None) -> Checkpoint:
    """The checkpoint MODEL names (see the module docstring)."""
    model = str(model).rstrip("/") if storage.is_s3(model) else str(model)
    try:
        if model.endswith(".keras"):
            model = storage.parent_uri(model) if storage.is_s3(model) else str(Path(model).parent)
        if _is_checkpoint(model, endpoint):
            return _load(model, endpoint)
        best = storage.join_uri(model, storage.CHECKPOINTS_DIR, storage.BEST)
        if _is_checkpoint(best, endpoint):
            return _load(best, endpoint)
        files = storage.list_files(model, endpoint)
    except (OSError, ValueError, storage.StorageError) as error:
        raise CheckpointError(f"MODEL {model!r}: cannot read it ({error})") from error
    records = [f for f in files if f.endswith("/" + storage.RECORD_FILE)
               and storage.parent_uri(storage.parent_uri(f)).endswith("/" + storage.TRIALS_DIR)]
    if records:
        return _best_trial(model, records, endpoint)
    raise CheckpointError(
        f"MODEL {model!r} is not a checkpoint folder (model.keras + settings.json), a run "
        "folder (checkpoints/best) or a sweep folder (trials/*/trial.json)")


def _is_checkpoint(uri: str, endpoint: str | None) -> bool:
    return storage.exists(storage.join_uri(uri, storage.MODEL_FILE), endpoint) and \
        storage.exists(storage.join_uri(uri, storage.SETTINGS_FILE), endpoint)


def _load(uri: str, endpoint: str | None, record: TrialRecord | None = None,
          selected: dict | None = None) -> Checkpoint:
    local = storage.download_s3_prefix(uri, endpoint) if storage.is_s3(uri) else Path(uri)
    try:
        settings = Settings.from_json((local / storage.SETTINGS_FILE).read_text())
    except (SettingsError, ValueError, OSError) as error:
        raise CheckpointError(f"{uri}/{storage.SETTINGS_FILE}: not valid settings ({error})"
                              ) from error
    return Checkpoint(uri, local, settings, selected, record)


def _best_trial(root: str, record_uris: list[str], endpoint: str | None) -> Checkpoint:
    """The trial ``records.select_best`` picks among the readable records below ``root``."""
    records = []
    for data in storage.read_many(record_uris, endpoint):
        try:
            if not isinstance(data, BaseException):
                records.append(TrialRecord.from_json(data))
        except (ValueError, TypeError):
            continue  # a half-written or foreign trial.json is not a candidate
    selection = select_best(records)
    if selection is None:
        raise CheckpointError(f"MODEL {root!r}: {len(record_uris)} trial record(s) but no "
                              "completed trial with a validation accuracy")
    best = selection.record
    if not best.checkpoint_uri or not _is_checkpoint(best.checkpoint_uri, endpoint):
        raise CheckpointError(f"MODEL {root!r}: best trial {best.trial_id}'s checkpoint "
                              f"{best.checkpoint_uri!r} has no model.keras + settings.json")
    return _load(best.checkpoint_uri, endpoint, best, selection.describe())


def check_archive(checkpoint: Checkpoint) -> None:
    """The safe loader's first half (``keras_archive.check_keras_archive``): no TensorFlow,
    milliseconds, so a job runs it before it starts Ray. ``CheckpointError`` if refused."""
    try:
        check_keras_archive(checkpoint.model_file)
    except ModelError as error:
        raise _refused(checkpoint, error) from error


def check_model(checkpoint: Checkpoint) -> bytes:
    """Load the model once, safely, check it matches its settings; return the file's bytes
    (they travel to Ray actors through the object store, so no node needs the driver's disk)."""
    from cifar_core.models import load_checkpoint_model

    try:
        model = load_checkpoint_model(checkpoint.model_file, compile=False)
    except ModelError as error:
        raise _refused(checkpoint, error) from error
    size = checkpoint.settings.input_size
    expected = (None, size, size, 3)
    if tuple(model.input_shape) != expected or tuple(model.output_shape) != (
            None, len(CLASS_NAMES)):
        raise CheckpointError(
            f"MODEL {checkpoint.uri}: model takes {model.input_shape} -> {model.output_shape}, "
            f"but its settings say {expected} -> (None, {len(CLASS_NAMES)})")
    return checkpoint.model_file.read_bytes()


def _refused(checkpoint: Checkpoint, error: ModelError) -> CheckpointError:
    return CheckpointError(
        f"MODEL {checkpoint.uri}: refused or unreadable: {error}. Models are loaded from zip "
        ".keras archives with safe_mode=True only (no Lambda layers, no custom code); there "
        "is no option to lower that.")
