"""What each family's sweep explored: its varied settings as axes, and which of them mattered.

The trials of one family (rows of ``report.trials_table``) become a ``FamilySweep``: every
setting whose value differs between them, encoded as an axis on [0, 1] (log-spaced when a
positive range spans a factor of ``LOG_RANGE`` or more, as learning rates do; categories for
strings, booleans and None), and each trial's ``best_val_accuracy``. The parallel-coordinates
figure draws these axes.

With at least ``MIN_IMPORTANCE_TRIALS`` trials, a random forest is fitted to (settings ->
best_val_accuracy) and a setting's importance is its permutation importance: how much the
forest's R² drops when that setting's column is shuffled (``IMPORTANCE_METHOD``). scikit-learn
is a core dependency, so this needs no extra. The test set is never an input: like every choice
in the report, importance uses validation accuracy only. Random states are fixed, so the report
stays a pure function of its records (same records, same bytes).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cifar_core.records import FINISHED

#: A family needs this many finished trials for a parallel-coordinates figure...
MIN_PARALLEL_TRIALS = 2
#: ...and this many for an importance table (a forest on fewer points ranks noise).
MIN_IMPORTANCE_TRIALS = 8
#: Settings that say where the images were read from, not how the model was trained; two paths
#: to the same data on two machines must not look like a hyperparameter (the Data line says
#: which data it was).
NOT_HYPERPARAMETERS = frozenset({"data"})
#: A positive numeric axis spanning this factor or more (learning_rate 0.003-0.1, dense_units
#: 50-400) is drawn log-spaced so that a geometric grid's values sit evenly apart.
LOG_RANGE = 8.0
#: Axes with at most this many distinct values get one tick per value (a grid's values).
MAX_TICKS = 8
IMPORTANCE_METHOD = (
    "permutation importance of a random forest (scikit-learn, 100 trees, min 2 trials per "
    "leaf, random_state 0) fitted to each trial's settings -> best val_accuracy: the drop in "
    "the forest's R² when one setting's values are shuffled among the trials (mean ± std over "
    "10 shuffles). Fit quality is the forest's out-of-bag R²; near or below 0 the settings "
    "explain little and the ranking is noise. Trials cut by the scheduler count with the best "
    "val_accuracy they reached; test accuracy is never used.")


@dataclass(frozen=True)
class SettingAxis:
    """One varied setting: each trial's value as a label and as a position on [0, 1]."""

    name: str
    scale: str                      # "log", "linear" or "category"
    positions: np.ndarray           # per trial, in the sweep's trial order
    labels: list[str]               # per trial, the value as shown
    ticks: list[tuple[float, str]]  # (position, label) to mark on the axis


@dataclass
class FamilySweep:
    """A family's finished trials, the settings that differ between them, and their effect."""

    family: str
    model: str
    trial_ids: list[str]
    best_val_accuracy: np.ndarray
    axes: list[SettingAxis]          # most important first when importance is known
    best_trial: str | None           # the leaderboard's choice (records.best_of)
    importance: pd.DataFrame | None = None
    fit_r2: float = math.nan         # the forest's out-of-bag R²
    notes: list[str] = field(default_factory=list)


def value_label(value) -> str:
    """A setting's value as a short axis or table label."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if "/" in text:  # a path (e.g. backbone_weights): its file name says enough
        text = text.rstrip("/").rsplit("/", 1)[-1]
    return text if len(text) <= 20 else text[:19] + "…"


def encode_setting(name: str, values: list) -> SettingAxis:
    """``values`` (one per trial, at least two distinct) as an axis on [0, 1]."""
    labels = [value_label(v) for v in values]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        array = np.asarray(values, dtype=float)
        distinct = np.unique(array)
        log = bool(distinct[0] > 0 and distinct[-1] / distinct[0] >= LOG_RANGE
                   and len(distinct) >= 3)
        def transform(x):
            return np.log10(x) if log else np.asarray(x, dtype=float)

        low, high = transform(distinct[0]), transform(distinct[-1])
        def place(x):
            return (transform(x) - low) / (high - low)

        marks = distinct if len(distinct) <= MAX_TICKS else (
            10 ** np.linspace(low, high, 5) if log else np.linspace(low, high, 5))
        label_of = {float(v): label for v, label in zip(values, labels)}  # 50, not 50.0
        return SettingAxis(name, "log" if log else "linear", place(array), labels,
                           [(float(place(m)), label_of.get(float(m), value_label(float(m))))
                            for m in marks])
    # None first, then numbers in order, then the rest alphabetically: a stable, readable order.
    order = sorted({json.dumps(v, sort_keys=True): v for v in values}.values(),
                   key=lambda v: (v is not None, not isinstance(v, (int, float)),
                                  v if isinstance(v, (int, float)) else 0, str(v)))
    index = {json.dumps(v, sort_keys=True): i for i, v in enumerate(order)}
    positions = np.array([index[json.dumps(v, sort_keys=True)] for v in values],
                         dtype=float) / (len(order) - 1)
    return SettingAxis(name, "category", positions, labels,
                       [(i / (len(order) - 1), value_label(v)) for i, v in enumerate(order)])


def analyse_sweeps(table: pd.DataFrame, board: pd.DataFrame) -> list[FamilySweep]:
    """A ``FamilySweep`` per family with at least ``MIN_PARALLEL_TRIALS`` finished trials that
    differ in a setting; with an importance table from ``MIN_IMPORTANCE_TRIALS`` trials on."""
    chosen = dict(zip(board["family"], board["best_trial"]))
    sweeps = []
    for family, rows in table.groupby("family", sort=True):
        rows = rows[rows["status"].isin(FINISHED) & rows["best_val_accuracy"].notna()]
        rows = rows.sort_values("trial_id")
        if len(rows) < MIN_PARALLEL_TRIALS:
            continue
        configs = [json.loads(c) for c in rows["config"]]
        names = sorted({n for c in configs for n in c} - NOT_HYPERPARAMETERS)
        axes = [encode_setting(n, [c.get(n) for c in configs]) for n in names
                if len({json.dumps(c.get(n), sort_keys=True) for c in configs}) > 1]
        if not axes:
            continue
        best = chosen.get(family)
        sweep = FamilySweep(family, rows["model"].iloc[0], list(rows["trial_id"]),
                            rows["best_val_accuracy"].to_numpy(dtype=float), axes,
                            best if isinstance(best, str) else None)
        if len(rows) >= MIN_IMPORTANCE_TRIALS:
            add_importance(sweep)
        sweeps.append(sweep)
    return sweeps


def add_importance(sweep: FamilySweep) -> None:
    """Rank the sweep's settings by permutation importance (``IMPORTANCE_METHOD``) and order
    its axes that way; leaves ``importance`` None when val_accuracy did not vary at all."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance

    target = sweep.best_val_accuracy
    if np.ptp(target) == 0:
        sweep.notes.append("every trial reached the same best val_accuracy: no importance")
        return
    features = np.column_stack([axis.positions for axis in sweep.axes])
    forest = RandomForestRegressor(n_estimators=100, min_samples_leaf=2, oob_score=True,
                                   random_state=0, n_jobs=1)
    with warnings.catch_warnings():
        # With few trials some are in every bootstrap sample and get no out-of-bag estimate;
        # sklearn warns and scores the rest, which is what we want.
        warnings.simplefilter("ignore", UserWarning)
        forest.fit(features, target)
    shuffled = permutation_importance(forest, features, target, n_repeats=10,
                                      random_state=0, n_jobs=1)
    sweep.fit_r2 = float(forest.oob_score_)
    rows = []
    for axis, mean, std in zip(sweep.axes, shuffled.importances_mean,
                               shuffled.importances_std):
        by_value = pd.Series(target).groupby(pd.Series(axis.labels)).mean()
        ordered = [label for _, label in axis.ticks if label in by_value.index]
        per_value = " · ".join(f"{label}: {by_value[label]:.3f}" for label in ordered) \
            if len(by_value) <= MAX_TICKS else f"{len(by_value)} values (continuous)"
        rows.append({"setting": axis.name, "importance": float(mean),
                     "importance_std": float(std), "values": int(len(by_value)),
                     "best_value": by_value.idxmax() if len(by_value) <= MAX_TICKS else "—",
                     "mean_val_accuracy_per_value": per_value})
    importance = pd.DataFrame(rows).sort_values(["importance", "setting"],
                                                ascending=[False, True], kind="stable")
    sweep.importance = importance.reset_index(drop=True)
    order = {name: i for i, name in enumerate(sweep.importance["setting"])}
    sweep.axes.sort(key=lambda axis: order[axis.name])


#: Settings whose difference from the seed a family's label already names
#: (``records.experiment_variant``): a subset, input size, backbone; epochs when fewer.
_LABELLED = frozenset({"limit", "image_size", "backbone_weights", "backbone_alpha"})


def seed_changes(model: str, settings: dict) -> dict:
    """A trial's settings that differ from its model's seed settings (``ladder.LADDER``),
    apart from the seed itself, the data's location and what the family label names."""
    from cifar_core.ladder import LADDER
    from cifar_core.settings import Settings

    if model not in LADDER:
        return {}
    seed = Settings.from_dict({"model": model}).to_dict()
    changes = {}
    for name, value in sorted(settings.items()):
        if name in ("seed", "model", "data") or name in _LABELLED or name not in seed:
            continue
        if name in ("num_epochs", "fine_tune_epochs") and (
                (value or 0) < (seed[name] or 0) or (value and not seed[name])):
            continue  # in the label: "16 of 50 epochs", or a phase the seed lacks "1+1 of 20"
        if value != seed[name]:
            changes[name] = value
    return changes
