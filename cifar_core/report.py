"""The results report: one table row per trial, a leaderboard per model, a Pareto view, figures.

Input is every ``trial.json`` (a ``records.TrialRecord``) below one or more storage URIs (local
or ``s3://``), plus ``cifar train`` run folders (``metrics.jsonl`` + ``settings.json`` +
``checkpoints/best``), which become records of kind ``train``. ``build_report`` turns them into

    trials.parquet    one row per trial (all columns below, full precision)
    leaderboard.csv   one row per model family, best first
    report.md         the tables for people and for the README, linking the figures
    report.html       self-contained page: the tables plus figures (PNG data URIs)
    figure-*.png      each figure (report_figures.py), one parallel-coordinates plot per sweep

Every choice the report makes (best trial, best configuration, Pareto front, the overall winner)
uses validation accuracy (``best_val_accuracy``, a held-out part of the training set). The test
set only supplies the number reported for a checkpoint that was already chosen.

Costs: GPU-hours and CPU-hours are ``wall_time_s x resources held / 3600``; dollars are
``GPU-hours x gpu_hour_price + CPU-hours x cpu_hour_price`` (defaults in ``NODE_PRICES``).

The best trial of each family and the overall winner come from ``records.best_of`` and
``records.select_best``, the rule ``cifar score`` and ``cifar serve`` use too. What each sweep
varied and which settings mattered is ``report_sweeps.py``; figures are ``report_figures.py``,
markdown and HTML ``report_render.py``. This module needs pandas but neither
TensorFlow nor Ray. The output is a pure function of the records and this code (no clock
time), so re-running on the same records reproduces the same bytes, which keeps publishing
idempotent.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from cifar_core import storage
from cifar_core.provenance import digest_of
from cifar_core.ladder import LADDER
from cifar_core.records import (TrialRecord, best_of, experiment_variant, with_current_fields,
                                record_from_train_run, select_best, validation_key)
from cifar_core.report_sweeps import seed_changes
from cifar_core.settings import CLASS_NAMES

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

log = logging.getLogger(__name__)


class ReportError(ValueError):
    """The runs given to the report are missing, empty or unreadable."""


# ---------------------------------------------------------------------------- loading
def load_records(runs: Sequence[str], endpoint: str | None = None) -> list[TrialRecord]:
    """Every trial record below each of ``runs`` (local paths or s3:// URIs).

    ``trial.json`` files anywhere below a location are read as they are; ``cifar train`` run
    folders (``settings.json`` + ``metrics.jsonl``) that are not inside a sweep become records
    of kind ``train``. A record that does not parse is named in a warning and skipped; raises
    ``ReportError`` when a location holds no readable record and no run folder.
    """
    records: list[TrialRecord] = []
    for uri in runs:
        if not storage.is_s3(uri) and not Path(uri).exists():
            raise ReportError(f"--runs {uri!r}: no such folder")
        files = storage.list_files(uri, endpoint)
        trial_files = [f for f in files if f.rsplit("/", 1)[-1] == storage.RECORD_FILE]
        found = []
        for path, data in zip(trial_files, storage.read_many(trial_files, endpoint)):
            if storage.unreachable(data):
                raise ReportError(f"--runs {uri}: the store stopped answering ({data}); "
                                  "re-run when it is back")
            try:
                if isinstance(data, BaseException):
                    raise data
                found.append(TrialRecord.from_json(data))
            except (ValueError, TypeError, OSError) as error:
                # One damaged file must not hide every other result: named, then skipped.
                log.warning("cifar report: skipped %s: not a readable trial record (%s)",
                            path, error)
        # A sweep's root is <root>/trials/<trial_id>/trial.json; run folders inside one are
        # Tune's own working copies of trials already counted through their trial.json.
        sweep_roots = {storage.parent_uri(storage.parent_uri(storage.parent_uri(path)))
                       for path in trial_files}
        names = set(files)
        for metrics in (f for f in files if f.rsplit("/", 1)[-1] == storage.METRICS_FILE):
            folder = storage.parent_uri(metrics)
            if any(folder == root or folder.startswith(root.rstrip("/") + "/")
                   for root in sweep_roots):
                continue
            if storage.join_uri(folder, storage.SETTINGS_FILE) in names:
                try:
                    found.append(record_from_train_run(folder, endpoint))
                except ValueError as error:
                    raise ReportError(str(error)) from error
        if not found:
            raise ReportError(f"--runs {uri!r}: holds no {storage.RECORD_FILE} and no cifar "
                              "train run folder (settings.json + metrics.jsonl)")
        records.extend(found)
    unique = {}
    for record in records:  # the same trial reached through two --runs locations counts once
        unique.setdefault((record.sweep, record.trial_id), record)
    return list(unique.values())


# ---------------------------------------------------------------------------- tables
def family_of(record: TrialRecord) -> str:
    """A trial's model family: its model, labelled with its variant if it is another
    experiment than the seed's (``records.experiment_variant``), e.g. 'M7 [random-init ...]'."""
    variant = experiment_variant(record.settings)
    return f"{record.model} [{variant}]" if variant else record.model


def varied_settings(records: Iterable[TrialRecord]) -> dict[str, list[str]]:
    """Per family, the settings fields whose values differ across its trials (seed excluded).

    Per family, not per model: a 48-trial subset sweep of M1 must not make the seed's own M1
    run look as if it had varied the subset's settings."""
    by_family: dict[str, list[dict]] = {}
    for record in records:
        by_family.setdefault(family_of(record), []).append(record.settings)
    varied = {}
    for family, settings_list in by_family.items():
        names = sorted(set().union(*settings_list) - {"seed", "model"})
        varied[family] = [name for name in names
                          if len({json.dumps(s.get(name), sort_keys=True)
                                  for s in settings_list}) > 1]
    return varied


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
        family = family_of(record)
        names = varied[family]
        rows.append({
            "trial_id": record.trial_id, "sweep": record.sweep, "kind": record.kind,
            "model": record.model, "variant": experiment_variant(record.settings),
            "family": family,
            "varied": ", ".join(f"{n}={_short(record.settings.get(n))}" for n in names),
            "config": json.dumps({n: record.settings.get(n) for n in names}, sort_keys=True),
            # What else differs from the seed, the same in every trial of the family.
            "fixed_changes": ", ".join(f"{n}={_short(v)}" for n, v in seed_changes(
                record.model, record.settings).items() if n not in names),
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
    "seed_notebook_accuracy", "gpu_hours", "cpu_hours", "cost_usd", "best_trial",
    "best_settings", "fixed_changes", "best_val_accuracy",
    "test_accuracy", "difference_vs_seed", "seeds", "test_accuracy_mean", "test_accuracy_std",
    "best_epochs_run", "best_wall_time_s", "best_gpu_hours", "best_cost_usd", "checkpoint_uri"]


def leaderboard(records: Sequence[TrialRecord], table: pd.DataFrame | None = None
                ) -> pd.DataFrame:
    """One row per model family, the overall winner (``records.select_best``) first.

    A family is a model, or a model run as a different experiment from the seed's (a variant:
    random-init backbone, data subset, fewer epochs...), which is labelled and not compared
    with the seed's accuracy. Each family's row is its ``records.best_of``: the configuration
    (settings but the seed) with the highest mean ``best_val_accuracy`` over its seeds, and
    that configuration's best trial, with the mean and standard deviation of its seeds' test
    accuracy. Families validated on the winner's held-out split rank first (only accuracies on
    the same images compare), then the rest; by validation accuracy within each.
    """
    records = list(records)
    table = trials_table(records) if table is None else table
    family_of = dict(zip(zip(table["sweep"], table["trial_id"]), table["family"]))
    by_family: dict[str, list[TrialRecord]] = {}
    for record in records:
        by_family.setdefault(family_of[(record.sweep, record.trial_id)], []).append(record)
    winner = select_best(records)
    pool = validation_key(winner.record) if winner else None
    rows = []
    for name in sorted(by_family):
        family = table[table["family"] == name]
        row = _family_row(name, family, best_of(by_family[name]))
        row["_pool"] = bool(winner) and row.get("best_trial") is not None and validation_key(
            next(r for r in by_family[name] if r.trial_id == row["best_trial"])) == pool
        rows.append(row)
    board = pd.DataFrame(rows, columns=[*LEADERBOARD_COLUMNS[1:], "_pool"])
    board = board.sort_values(["_pool", "best_val_accuracy", "family"],
                              ascending=[False, False, True], na_position="last")
    board = board.drop(columns="_pool").reset_index(drop=True)
    board.insert(0, "rank", range(1, len(board) + 1))
    return board


def _family_row(name: str, family: pd.DataFrame, selection) -> dict[str, Any]:
    model, variant = family["model"].iloc[0], family["variant"].iloc[0]
    row: dict[str, Any] = {
        "family": name, "model": model, "variant": variant, "trials": len(family),
        "evaluated": int((family["test_accuracy"].notna()
                          & family["best_val_accuracy"].notna()).sum()),
        "configs": family["config"].nunique(),
        "seed_notebook_accuracy": LADDER[model].seed_test_accuracy
        if model in LADDER else math.nan,
        "gpu_hours": family["gpu_hours"].sum(), "cpu_hours": family["cpu_hours"].sum(),
        "cost_usd": family["cost_usd"].sum()}
    if selection is None:
        return row
    chosen = {r.trial_id for r in selection.seeds}
    seeds = family[family["trial_id"].isin(chosen)]
    best = family[family["trial_id"] == selection.record.trial_id].iloc[0]
    row.update({
        "best_trial": best["trial_id"], "best_settings": best["varied"],
        "fixed_changes": best["fixed_changes"],
        "best_val_accuracy": best["best_val_accuracy"], "test_accuracy": best["test_accuracy"],
        "difference_vs_seed": math.nan if variant
        else best["test_accuracy"] - row["seed_notebook_accuracy"],
        "seeds": len(seeds), "test_accuracy_mean": seeds["test_accuracy"].mean(),
        # Sample standard deviation; undefined for a single seed.
        "test_accuracy_std": seeds["test_accuracy"].std(ddof=1) if len(seeds) > 1
        else math.nan,
        "best_epochs_run": best["epochs_run"], "best_wall_time_s": best["wall_time_s"],
        "best_gpu_hours": best["gpu_hours"], "best_cost_usd": best["cost_usd"],
        "checkpoint_uri": best["checkpoint_uri"]})
    return row


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
    data_sources: list[str] = field(default_factory=list)  # ``data`` without split sizes


SCORE_SUMMARY_KEYS = ("src", "model", "files", "ok", "errors", "images_per_s", "pipeline_s")


def load_score_summaries(uris: Sequence[str], endpoint: str | None = None) -> list[dict]:
    """``cifar score``'s ``<out>.summary.json`` files (local or s3://), checked to be such and
    to describe the outputs beside them (SHA-256 when local). An output that is not there
    (a summary kept under results/ without its predictions) is listed in ``outputs_absent``:
    the report uses only the summary's own figures, so it can still show them, and says so;
    an output that is there but differs is refused."""
    summaries = []
    for uri in uris:
        try:
            summary = json.loads(storage.read_text(uri, endpoint))
        except (OSError, storage.StorageError, json.JSONDecodeError, *storage.s3_errors()
                ) as error:
            raise ReportError(f"--scores {uri}: cannot read a scoring summary: {error}")
        missing = [k for k in SCORE_SUMMARY_KEYS if not isinstance(summary, dict)
                   or k not in summary]
        if missing:
            raise ReportError(f"--scores {uri}: not a cifar score summary (missing "
                              f"{', '.join(missing)}); pass the OUT.summary.json it wrote")
        absent = []
        for output, facts in (summary.get("output_files") or {}).items():
            if not storage.exists(output, endpoint):
                absent.append(output)
                continue
            problem = _output_mismatch(output, facts)
            if problem:
                raise ReportError(f"--scores {uri}: {output} {problem}: the summary and the "
                                  "output are from different runs (re-run cifar score)")
        summaries.append({**summary, "summary_uri": uri, "outputs_absent": absent})
    return summaries


def _output_mismatch(output: str, facts: dict) -> str | None:
    if storage.is_s3(output):
        return None  # its size is checked when read; hashing a large object is not worth it
    digest = digest_of(Path(output))
    if digest.sha256 != facts.get("sha256"):
        return (f"has SHA-256 {digest.sha256[:12]}..., not the summary's "
                f"{str(facts.get('sha256'))[:12]}...")
    return None


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
    data, sources, hardware, commits = set(), set(), set(), set()
    for record in records:
        source = (record.data or {}).get("source", record.settings.get("data"))
        sources.add(data_label or describe_data(source))
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
    # Subsets of one source differ in split sizes only, and are labelled as other experiments.
    if len(sources) > 1:
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
                         trials, notes, data_sources=sorted(sources))


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------- the whole report
@dataclass
class Report:
    records: list[TrialRecord]
    table: pd.DataFrame
    leaderboard: pd.DataFrame
    context: ReportContext
    files: dict[str, Path]
    sweeps: list = field(default_factory=list)  # report_sweeps.FamilySweep per swept family

    def best_records(self) -> dict[str, TrialRecord]:
        """Each family's best trial (the leaderboard's choice), by family."""
        by_id = {r.trial_id: r for r in self.records}
        return {row["family"]: by_id[row["best_trial"]]
                for _, row in self.leaderboard.dropna(subset=["best_trial"]).iterrows()}

    def winner(self) -> TrialRecord | None:
        """The overall best trial (``records.select_best``; the leaderboard's first row)."""
        selection = select_best(self.records)
        return selection.record if selection else None


#: Written by every report; beside them one ``figure-<name>.png`` per figure (report_figures).
OUTPUT_FILES = ("leaderboard.csv", "trials.parquet", "report.md", "report.html")


def build_report(records: Sequence[TrialRecord], out: str | Path, *,
                 gpu_hour_price: float = DEFAULT_GPU_HOUR_PRICE,
                 cpu_hour_price: float = DEFAULT_CPU_HOUR_PRICE,
                 data_label: str | None = None, scores: Sequence[dict] = ()) -> Report:
    """Write leaderboard.csv, trials.parquet, report.md, report.html and the figures' PNGs
    (which report.md links and report.html embeds) into ``out``.

    ``scores``: ``cifar score`` summaries (``load_score_summaries``) for a scoring section."""
    for name, price in (("gpu_hour_price", gpu_hour_price), ("cpu_hour_price", cpu_hour_price)):
        if not (math.isfinite(price) and price >= 0):
            raise ReportError(f"{name}={price!r} must be a finite number >= 0")
    from cifar_core import report_figures as draw
    from cifar_core import report_render as render
    from cifar_core.report_sweeps import analyse_sweeps

    records = [with_current_fields(r) for r in records]
    table = trials_table(records, gpu_hour_price=gpu_hour_price, cpu_hour_price=cpu_hour_price)
    board = leaderboard(records, table)
    context = report_context(records, gpu_hour_price, cpu_hour_price, data_label)
    context.scoring = list(scores)
    report = Report(records, table, board, context, {}, analyse_sweeps(table, board))
    pictures = draw.figures(records, table, board, context, report.winner(), report.sweeps)
    # Figures first: a page is never on disk before the pictures it links to.
    contents = {draw.figure_file(name): png for name, png in pictures.items()}
    contents.update({
        "leaderboard.csv": board.to_csv(index=False).encode(),
        "trials.parquet": _parquet_bytes(table),
        "report.md": render.render_markdown(table, board, context, pictures,
                                            report.sweeps).encode(),
        "report.html": render.render_html(table, board, context, pictures,
                                          report.sweeps).encode()})
    out = Path(out)
    for name, content in contents.items():
        storage.atomic_write_bytes(out / name, content)  # never a half-written file
        report.files[name] = out / name
    for stale in out.glob(draw.figure_file("*")):  # a figure an earlier report drew, not this
        if stale.name not in contents:
            stale.unlink()
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
