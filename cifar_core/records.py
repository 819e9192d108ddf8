"""Trial records: the one file per trial (or fine-tune run) that the report job reads.

Layout of a sweep (or fine-tune run) in its storage, local or ``s3://`` alike:

    <storage>/<name>/sweep.json                        what was asked for, with provenance
    <storage>/<name>/trials/<trial_id>/trial.json      a TrialRecord (this module)
    <storage>/<name>/trials/<trial_id>/best/           best checkpoint (model.keras, settings,
                                                       state, provenance, evaluation)
    <storage>/<name>/<ray files>                       Ray Tune / Train's own experiment state

``trial_id`` is ``<model>-<settings hash>``: the hash covers the settings, the data source and
the code version, so re-submitting a sweep skips every cell already completed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cifar_core.settings import Settings

RECORD_FILE = "trial.json"
TRIALS_DIR = "trials"

#: Values of TrialRecord.status.
COMPLETED = "completed"            # ran all its epochs (or its own early stopping ended it)
STOPPED_BY_SCHEDULER = "stopped_by_scheduler"  # ASHA cut it short
ERRORED = "errored"                # failed after its retries


def settings_hash(settings: Settings, data_source: str, code_version: str) -> str:
    """A stable 12-hex-digit id for one cell of a sweep.

    The data source is part of the settings already; ``data_source`` may add what the source
    resolved to. ``code_version`` is the git commit (a '-dirty' tree hashes like its commit).
    """
    payload = json.dumps({"settings": settings.to_dict(), "data": data_source,
                          "code": code_version.removesuffix("-dirty")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def trial_id(settings: Settings, digest: str) -> str:
    return f"{settings.model}-{digest}"


@dataclass
class TrialRecord:
    """Everything the results table needs about one trial; Keras metric names throughout."""

    trial_id: str
    sweep: str
    kind: str                            # "tune" or "finetune"
    model: str
    settings: dict[str, Any]
    settings_hash: str
    status: str                          # COMPLETED, STOPPED_BY_SCHEDULER or ERRORED
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=float)

    @classmethod
    def from_json(cls, text: str) -> "TrialRecord":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
