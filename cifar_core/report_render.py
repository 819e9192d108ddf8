"""Rendering the results report: markdown and a self-contained HTML page with figures.

Everything here turns the report's tables (``report.py``: trials table, leaderboard, context)
into text and pictures, and nothing else: no records are read and no choice is made here.
Figures use matplotlib's object-oriented API (no pyplot state, no GUI backend).
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cifar_core.records import SELECTION_RULE, TrialRecord
from cifar_core.settings import CLASS_NAMES

SELECTION_NOTE = (
    "Every choice in this report (best trial, best configuration, Pareto front, winner) uses "
    "validation accuracy on a stratified hold-out of the training set; the test set was not "
    "used for selection, only to evaluate each checkpoint after training ended.")


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


# ---------------------------------------------------------------------------- figures
def figures(records: Sequence[TrialRecord], table: pd.DataFrame, board: pd.DataFrame,
            context, winner: TrialRecord | None) -> dict[str, bytes]:
    """Every figure of the HTML report, as PNG bytes by name."""
    found = {"accuracy_vs_seed": figure_accuracy_vs_seed(board, "; ".join(context.data)),
             "learning_curves": figure_learning_curves(records, table, board),
             "accuracy_vs_cost": figure_accuracy_vs_cost(table)}
    if winner is not None and winner.evaluation and winner.evaluation.get("confusion_matrix"):
        found["confusion"] = figure_confusion(winner)
    return found



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


def summary_lines(board: pd.DataFrame, context) -> list[str]:
    lines = [f"- **Data**: {'; '.join(context.data)}",
             f"- **Hardware**: {'; '.join(context.hardware)}",
             f"- **Code**: commit {', '.join(context.commits)}",
             f"- **Runs**: {', '.join(context.sweeps)}; {context.trials}",
             f"- **Selection**: {SELECTION_NOTE} The winner (the model `cifar score` and "
             f"`cifar serve` pick from the same runs): {SELECTION_RULE}.",
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


def render_markdown(table: pd.DataFrame, board: pd.DataFrame, context) -> str:
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


def render_html(table: pd.DataFrame, board: pd.DataFrame, context,
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


