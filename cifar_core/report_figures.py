"""The report's figures, as PNG bytes: readable at a glance, one colour per model throughout.

Every figure takes its colours from ``PALETTE`` (one colour per model id), so M4 is the same red
in the bar chart, the learning curves and the cost scatter; families of one model (the seed's
experiment and its variants) share the colour and differ by line style or marker. Legends sit
outside the data. Figures use matplotlib's object-oriented API (no pyplot state, no GUI
backend), and PNGs carry no clock time, so the same tables give the same bytes.
"""

from __future__ import annotations

import io
import textwrap
from typing import Sequence

import numpy as np
import pandas as pd

from cifar_core.records import TrialRecord
from cifar_core.report_sweeps import FamilySweep
from cifar_core.settings import CLASS_NAMES

#: One colour per model id, in every figure (matplotlib's tab10 colours; grey is kept for the
#: seed notebook's bars).
PALETTE = {"M1": "#1f77b4", "M2": "#ff7f0e", "M4": "#d62728", "M5": "#9467bd",
           "M6": "#8c564b", "M7": "#2ca02c"}
UNKNOWN_MODEL_COLOR = "#17becf"
NOTEBOOK_COLOR = "#c8c8c8"
#: Families of one model in one panel: the first solid, the next dashed, ...
LINE_STYLES = ("-", "--", "-.", (0, (1, 1)))
#: Markers in the cost scatter: the seed's experiment, other experiments.
LADDER_MARKER, OTHER_MARKER = "o", "^"
#: Figure files beside report.md, ``figure-<name>.png`` (the HTML embeds the same bytes).
FIGURE_PREFIX = "figure-"


def model_color(model: str) -> str:
    return PALETTE.get(model, UNKNOWN_MODEL_COLOR)


def figure_file(name: str) -> str:
    return f"{FIGURE_PREFIX}{name}.png"


def parallel_name(family: str) -> str:
    """The figure name of a family's parallel-coordinates plot (safe as a file name)."""
    slug = "".join(c if c.isalnum() else "-" for c in family.lower())
    return "parallel-" + "-".join(part for part in slug.split("-") if part)


def figures(records: Sequence[TrialRecord], table: pd.DataFrame, board: pd.DataFrame,
            context, winner: TrialRecord | None,
            sweeps: Sequence[FamilySweep] = ()) -> dict[str, bytes]:
    """Every figure of the report, as PNG bytes by name."""
    data = "; ".join(context.data_sources or context.data)
    found = {"accuracy_vs_seed": figure_accuracy_vs_seed(board, data),
             "learning_curves": figure_learning_curves(records, table, board),
             "accuracy_vs_cost": figure_accuracy_vs_cost(table)}
    for sweep in sweeps:
        found[parallel_name(sweep.family)] = figure_parallel_coordinates(sweep)
    if winner is not None and winner.evaluation and winner.evaluation.get("confusion_matrix"):
        found["confusion"] = figure_confusion(winner)
    return found


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float, layout: str | None = None):
    # The object-oriented API needs no pyplot state or GUI backend: safe in jobs and threads.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def _family_label(model: str, variant: str, width: int = 44) -> str:
    return textwrap.fill(f"{model}: {variant}" if variant else model, width)


def figure_accuracy_vs_seed(board: pd.DataFrame, data_label: str) -> bytes:
    """Horizontal bars, one per family: the seed's experiment beside the notebook's number in
    one panel, the other experiments (no notebook number to meet) in a second."""
    from matplotlib.patches import Patch

    panels = [(title, part.sort_values(["model", "family"])) for title, part in (
        ("The ladder: the notebook's experiment", board[board["variant"] == ""]),
        ("Other experiments: not comparable with the notebook", board[board["variant"] != ""]))
        if not part.empty]
    sizes = [len(part) for _, part in panels]
    # Constrained layout keeps the panel titles clear of the figure's title.
    figure = _figure(10, 1.0 + sum(0.55 * n + 0.5 for n in sizes), layout="constrained")
    axes = np.atleast_1d(figure.subplots(len(panels), 1, sharex=True,
                                         gridspec_kw={"height_ratios": sizes}))
    for axis, (title, part) in zip(axes, panels):
        ladder = bool((part["variant"] == "").all())
        y = np.arange(len(part))[::-1].astype(float)
        ours = part["test_accuracy"].astype(float).to_numpy()
        std = part["test_accuracy_std"].astype(float).to_numpy()
        offset, height = (0.18, 0.36) if ladder else (0.0, 0.5)
        axis.barh(y + offset, ours, height, color=[model_color(m) for m in part["model"]],
                  xerr=np.where(std > 0, std, np.nan) if np.nanmax(
                      np.append(std, 0)) > 0 else None, capsize=2)
        _bar_values(axis, y + offset, ours, "black")
        if ladder:
            notebook = part["seed_notebook_accuracy"].astype(float).to_numpy()
            axis.barh(y - offset, notebook, height, color=NOTEBOOK_COLOR, edgecolor="#777777",
                      hatch="//")
            _bar_values(axis, y - offset, notebook, "#555555")
        axis.set_yticks(y, [_family_label(m, v, 40) for m, v in zip(part["model"],
                                                                       part["variant"])],
                        fontsize=8)
        axis.set_ylim(-0.6, len(part) - 0.4)
        axis.set_title(title, fontsize=9, loc="left")
        axis.grid(axis="x", alpha=0.3)
    axes[-1].set_xlim(0, 1.0)
    axes[-1].set_xlabel("test accuracy of the family's best configuration (chosen by "
                        "val_accuracy)")
    # Swatches in neutral colours: each family's bar is in its model's colour.
    handles = [Patch(facecolor="#555555", label="cifar-fleet (model's colour)")]
    if (board["variant"] == "").any():
        handles.append(Patch(facecolor=NOTEBOOK_COLOR, edgecolor="#777777", hatch="//",
                             label="the seed notebook"))
    axes[0].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   frameon=False)
    figure.suptitle(textwrap.fill(f"Test accuracy per model family vs the seed notebook "
                                  f"({data_label})", 100), fontsize=10)
    return _png(figure)


def _bar_values(axis, y, values, color: str) -> None:
    for yi, value in zip(y, values):
        if np.isfinite(value):
            axis.text(value + 0.01, yi, f"{value:.3f}", va="center", fontsize=8, color=color)


def figure_learning_curves(records: Sequence[TrialRecord], table: pd.DataFrame,
                           board: pd.DataFrame) -> bytes:
    """val_accuracy per epoch of each family's best trial, the seed's experiment and the other
    experiments in two panels; markers where a trial was cut short.

    A family with no evaluated trial yet (all still running) shows its best trial so far."""
    by_id = {r.trial_id: r for r in records}
    chosen = dict(zip(board["family"], board["best_trial"]))
    panels = [("The seed's experiment", table[table["variant"] == ""]),
              ("Other experiments (subsets, fewer epochs, other backbones)",
               table[table["variant"] != ""])]
    panels = [(title, part) for title, part in panels if not part.empty]
    figure = _figure(6.5 * len(panels), 5.2)
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharey=True))
    for axis, (title, part) in zip(axes, panels):
        drawn: dict[str, int] = {}  # families of each model drawn so far in this panel
        for name, family in part.groupby("family", sort=True):
            best = chosen.get(name)
            if not isinstance(best, str):
                best = family.sort_values("best_val_accuracy", ascending=False).iloc[0][
                    "trial_id"]
            model = family["model"].iloc[0]
            style = LINE_STYLES[min(drawn.get(model, 0), len(LINE_STYLES) - 1)]
            drawn[model] = drawn.get(model, 0) + 1
            _draw_curve(axis, by_id[best], _family_label(model, family["variant"].iloc[0]),
                        model_color(model), style)
        _mark_cut_trials(axis, [by_id[t] for t in part["trial_id"] if t in by_id])
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1,
                    frameon=False)
    axes[0].set_ylabel("val_accuracy (thick), accuracy on training images (faint)")
    figure.suptitle("Learning curves of each family's best trial", fontsize=10)
    return _png(figure)


def _draw_curve(axis, record: TrialRecord, label: str, color: str, style) -> None:
    epochs = [m["epoch"] for m in record.history if "val_accuracy" in m]
    axis.plot(epochs, [m["val_accuracy"] for m in record.history if "val_accuracy" in m],
              linestyle=style, marker="o", markersize=2.5, linewidth=1.6, color=color,
              label=label)
    axis.plot(epochs, [m.get("accuracy", np.nan) for m in record.history
                       if "val_accuracy" in m], linestyle=style, color=color, linewidth=0.8,
              alpha=0.35)


def _mark_cut_trials(axis, records: Sequence[TrialRecord]) -> None:
    cut = {"early_stopped": ("v", "early stopping"),
           "stopped_by_scheduler": ("x", "the scheduler")}
    labelled = set()
    for record in records:
        marker = cut.get(record.stop_reason)
        values = [m["val_accuracy"] for m in record.history if "val_accuracy" in m]
        if marker is None or not values:
            continue
        label = None if marker[1] in labelled else f"a trial stopped by {marker[1]}"
        labelled.add(marker[1])
        axis.scatter([record.epochs_run], [values[-1]], marker=marker[0], s=40,
                     color=model_color(record.model), label=label, zorder=3)


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
    right.barh(range(len(names)), per_class, color=model_color(record.model))
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
    figure = _figure(12, 4.2)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, column, label in ((axes[0], hours, hours.replace("_", "-").replace("gpu", "GPU")
                                 .replace("cpu", "CPU")),
                                (axes[1], "cost_usd", "cost (USD)")):
        for (model, other), group in table.groupby(["model", table["variant"] != ""]):
            axis.scatter(group[column], group["best_val_accuracy"], s=22, alpha=0.75,
                         color=model_color(model), marker=OTHER_MARKER if other
                         else LADDER_MARKER,
                         label=f"{model}, other experiments" if other
                         else f"{model}, the seed's experiment")
        front = table[table["pareto"]].sort_values("cost_usd")
        if column == "cost_usd":  # the front is a staircase in the dollars it is defined on
            axis.plot(front[column], front["best_val_accuracy"], color="black", linewidth=1,
                      drawstyle="steps-post")
        axis.scatter(front[column], front["best_val_accuracy"], s=70, facecolors="none",
                     edgecolors="black", label="Pareto front")
        values = table[column][table[column] > 0]
        if len(values) and values.max() >= 100 * values.min():
            axis.set_xscale("log")  # cheap short trials and long runs both stay readable
        axis.set_xlabel(label + ("" if use_gpu or column == "cost_usd" else
                                 " (no trial held a GPU)")
                        + (", log scale" if axis.get_xscale() == "log" else ""))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("best val_accuracy")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    figure.suptitle("Accuracy vs compute, one point per trial; circled: trials no other trial "
                    "beats on both", fontsize=9)
    return _png(figure)


def figure_parallel_coordinates(sweep: FamilySweep) -> bytes:
    """One line per trial through each varied setting (most important first) to its best
    val_accuracy, coloured by that val_accuracy; the family's best trial drawn thick."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    target = sweep.best_val_accuracy
    low, high = float(target.min()), float(target.max())
    span = high - low or 1.0
    rng = np.random.default_rng(0)  # fixed: the same records give the same picture
    columns = []
    for axis in sweep.axes:
        # Grid values are shared by many trials: a little vertical spread keeps their lines
        # apart where they meet an axis (at most 3% of the axis).
        spread = 0.03 if len(axis.ticks) <= 8 else 0.0
        columns.append(axis.positions + rng.uniform(-spread, spread, len(target)))
    columns.append((target - low) / span)
    lines = np.column_stack(columns)
    x = np.arange(lines.shape[1])
    figure = _figure(max(7.5, 2.4 * len(x) + 1.5), 4.8)
    plot = figure.subplots()
    norm, cmap = Normalize(low, high), colormaps["viridis"]
    for i in np.argsort(target, kind="stable"):  # best last, on top
        plot.plot(x, lines[i], color=cmap(norm(target[i])), linewidth=1.1, alpha=0.75)
    if sweep.best_trial in sweep.trial_ids:
        i = sweep.trial_ids.index(sweep.best_trial)
        plot.plot(x, lines[i], color="black", linewidth=3.4, zorder=4)
        plot.plot(x, lines[i], color=cmap(norm(target[i])), linewidth=1.8, zorder=5,
                  label=f"the family's best trial ({sweep.best_trial})")
        plot.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ticks = [axis.ticks for axis in sweep.axes]
    ticks.append([((v - low) / span, f"{v:.3f}") for v in np.linspace(low, high, 5)])
    for xi, marks in zip(x, ticks):
        plot.axvline(xi, color="#333333", linewidth=0.8)
        for position, text in marks:
            plot.text(xi - 0.03, position, text, ha="right", va="center", fontsize=8,
                      zorder=6, bbox={"facecolor": "white", "edgecolor": "none",
                                      "alpha": 0.8, "pad": 0.5})
    names = [a.name + ("\n(log scale)" if a.scale == "log" else "") for a in sweep.axes]
    plot.set_xticks(x, names + ["best val_accuracy"], fontsize=9)
    plot.set_xlim(-0.45, x[-1] + 0.15)
    plot.set_ylim(-0.06, 1.06)
    plot.set_yticks([])
    for side in ("left", "right", "top"):
        plot.spines[side].set_visible(False)
    figure.colorbar(ScalarMappable(norm, cmap), ax=plot, fraction=0.04, pad=0.02,
                    label="best val_accuracy")
    plot.set_title(textwrap.fill(f"{sweep.family}: {len(target)} trials, one line each",
                                 100), fontsize=9, pad=18)
    return _png(figure)
