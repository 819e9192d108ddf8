"""Rendering the results report: markdown and a self-contained HTML page, from one outline.

Everything here turns the report's tables (``report.py``: trials table, leaderboard, context,
``report_sweeps.FamilySweep``) and figures (``report_figures.py``) into text, and nothing else:
no records are read and no choice is made here. ``report_blocks`` lays the report out once, as
a list of blocks (heading, paragraph, table, figure, folded details); ``render_markdown`` and
``render_html`` each write that list in their format, so the two never drift apart.

The order is for a reader: the winner, one line of provenance (details folded away), the ladder
against the seed notebook, then the other experiments (subsets, fewer epochs, other backbones)
in their own table, then figures, what each sweep explored, cost, scoring and every trial.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any, Sequence

import pandas as pd

from cifar_core.records import SELECTION_RULE
from cifar_core.report_figures import figure_file, parallel_name
from cifar_core.report_sweeps import IMPORTANCE_METHOD, MIN_IMPORTANCE_TRIALS, FamilySweep

SELECTION_NOTE = (
    "Every choice in this report (best trial, best configuration, Pareto front, winner, "
    "hyperparameter importance) uses validation accuracy on a stratified hold-out of the "
    "training set; the test set was not used for selection, only to evaluate each checkpoint "
    "after training ended.")
SCORING_NOTE = ("Batch scoring with `cifar score` (Ray Data): images/s = files / pipeline wall "
                "time, from listing the files to the last row written, actor start-up "
                "included; accuracy from the labels of the files' class folders.")
OTHER_EXPERIMENTS_NOTE = (
    "Runs that are not the notebook's experiment (a `--limit` subset of the images, fewer "
    "epochs, a random-init or proxy backbone, other input sizes): each family has its own row "
    "and is never compared with the notebook's accuracy (not the seed's experiment). rank: "
    "the order of the best-model rule over all families; a subset's val_accuracy is measured "
    "on other, fewer held-out images, so subsets rank after the full-data families whatever "
    "their accuracy.")


# ---------------------------------------------------------------------------- cells
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


def _settings_text(row) -> str:
    """The best trial's varied settings, then what every trial of the family changed."""
    if not isinstance(row.get("best_trial"), str):
        return "—"
    varied, fixed = row.get("best_settings") or "", row.get("fixed_changes") or ""
    if not isinstance(fixed, str):  # a leaderboard.csv read back: empty cells are NaN
        fixed = ""
    text = "; ".join(part for part in (varied, f"every trial: {fixed}" if fixed else "")
                     if part)
    return text or "seed defaults"


def _compute_text(row) -> str:
    gpu = (f"{_fmt(row['gpu_hours'], 'hours')} GPU-h + " if row["gpu_hours"] > 0 else "")
    return f"{gpu}{_fmt(row['cpu_hours'], 'hours')} CPU-h, {_fmt(row['cost_usd'], 'usd')}"


def _spread(row) -> str:
    mean, std, seeds = (row.get("test_accuracy_mean"), row.get("test_accuracy_std"),
                        row.get("seeds"))
    if isinstance(std, float) and math.isfinite(std):
        return f"{mean:.4f} ± {std:.4f} (n={int(seeds)})"
    return "one seed" if isinstance(row.get("best_trial"), str) else "—"


# ---------------------------------------------------------------------------- tables
def leaderboard_display(board: pd.DataFrame) -> pd.DataFrame:
    """Every family in one table (what leaderboard.csv holds, for people)."""
    rows = []
    for _, row in board.iterrows():
        rows.append({
            "rank": row["rank"], "model": row["family"],
            "test_accuracy": _fmt(row.get("test_accuracy"), "acc"),
            "mean ± std over seeds": _spread(row),
            "seed notebook": _fmt(row["seed_notebook_accuracy"], "acc") if not row["variant"]
            else "— (not the seed's experiment)",
            "difference": _fmt(row.get("difference_vs_seed"), "diff"),
            "best val_accuracy": _fmt(row.get("best_val_accuracy"), "acc"),
            "best settings": _settings_text(row),
            "trials": f"{row['evaluated']}/{row['trials']} evaluated",
            "best trial": row["best_trial"] if isinstance(row.get("best_trial"), str) else "—",
            "GPU-h (all trials)": _fmt(row["gpu_hours"], "hours"),
            "CPU-h (all trials)": _fmt(row["cpu_hours"], "hours"),
            "cost (all trials)": _fmt(row["cost_usd"], "usd"),
        })
    return pd.DataFrame(rows)


def ladder_display(board: pd.DataFrame) -> pd.DataFrame:
    """The families that ran the seed notebook's experiment, beside the notebook's numbers."""
    rows = []
    for _, row in board[board["variant"] == ""].iterrows():
        rows.append({
            "rank": row["rank"], "model": row["model"],
            "seed notebook": _fmt(row["seed_notebook_accuracy"], "acc"),
            "test_accuracy": _fmt(row.get("test_accuracy"), "acc"),
            "difference": _fmt(row.get("difference_vs_seed"), "diff"),
            "mean ± std over seeds": _spread(row), **_family_columns(row)})
    return pd.DataFrame(rows)


def _family_columns(row) -> dict:
    """The columns both family tables end with."""
    return {"best val_accuracy": _fmt(row.get("best_val_accuracy"), "acc"),
            "settings": _settings_text(row),
            "trials": f"{row['evaluated']}/{row['trials']} evaluated",
            "best trial": row["best_trial"] if isinstance(row.get("best_trial"), str) else "—",
            "compute (all trials)": _compute_text(row)}


def other_experiments_display(board: pd.DataFrame) -> pd.DataFrame:
    """The families that are another experiment than the notebook's, labelled as such."""
    rows = []
    for _, row in board[board["variant"] != ""].iterrows():
        rows.append({
            "rank": row["rank"], "model": row["model"], "experiment": row["variant"],
            "test_accuracy": _fmt(row.get("test_accuracy"), "acc"), **_family_columns(row)})
    return pd.DataFrame(rows)


def trials_display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "model": table["model"], "experiment": table["variant"].replace("", "the notebook's"),
        "trial": table["trial_id"], "kind": table["kind"],
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


def importance_display(sweep: FamilySweep) -> pd.DataFrame:
    """A family's settings, most important first (``report_sweeps.add_importance``)."""
    frame = sweep.importance
    # Drops can exceed 1 (R² goes negative when a key setting is shuffled): shares read easier.
    positive = frame["importance"].clip(lower=0)
    shares = positive / positive.sum() if positive.sum() > 0 else positive
    return pd.DataFrame({
        "rank": range(1, len(frame) + 1), "setting": frame["setting"],
        "share of importance": [f"{share:.0%}" for share in shares],
        "drop in R² when shuffled": [f"{m:.3f} ± {s:.3f}" for m, s in
                                     zip(frame["importance"], frame["importance_std"])],
        "values tried": frame["values"], "best value": frame["best_value"],
        "mean best val_accuracy per value": frame["mean_val_accuracy_per_value"]})


def scoring_display(summaries: Sequence[dict]) -> pd.DataFrame:
    rows = []
    for summary in summaries:
        model, labels = summary["model"] or {}, summary.get("labels") or {}
        provenance = summary.get("provenance") or {}
        selected = model.get("selected_trial")
        if isinstance(selected, dict):  # newer summaries: the best-model rule's whole record
            selected = selected.get("trial_id")
        rows.append({
            "images": summary["src"], "model": model.get("model"),
            "trial": selected or model.get("checkpoint"),
            "files": summary["files"], "errors": summary["errors"],
            "accuracy": _fmt(labels.get("accuracy"), "acc"),
            "images/s": f"{summary['images_per_s']:.0f}",
            "wall time": _fmt(summary["pipeline_s"], "time"),
            "first row after": _fmt(summary.get("first_row_s"), "time"),
            "commit": str(provenance.get("git_commit") or "—")[:12],
            "when": str(provenance.get("created") or "—")[:19],
            "outputs": _outputs_state(summary),
        })
    return pd.DataFrame(rows)


def _outputs_state(summary: dict) -> str:
    """Whether the predictions behind a scoring row were checked against its summary."""
    if not summary.get("output_files"):
        return "not recorded (older summary)"
    if summary.get("outputs_absent"):
        return "not present here (figures from the summary)"
    return "checked (SHA-256 when local)"


# ---------------------------------------------------------------------------- the outline
def winner_text(board: pd.DataFrame) -> str | None:
    ranked = board.dropna(subset=["test_accuracy"])
    if ranked.empty:
        return None
    winner = ranked.iloc[0]
    versus = (f"{_fmt(winner['difference_vs_seed'], 'diff')} vs the seed notebook's "
              f"{_fmt(winner['seed_notebook_accuracy'], 'acc')}" if not winner["variant"]
              else "not the seed's experiment, so not compared with it")
    text = (f"**Winner: {winner['family']}** (trial {winner['best_trial']}): test accuracy "
            f"{winner['test_accuracy']:.4f}, validation {winner['best_val_accuracy']:.4f}, "
            f"{versus}; the trial took {_fmt(winner['best_wall_time_s'], 'time')} and "
            f"{_fmt(winner['best_cost_usd'], 'usd')}.")
    if len(ranked) > 1:
        runner = ranked.iloc[1]
        text += (f" Runner-up {runner['family']}: test accuracy {runner['test_accuracy']:.4f} "
                 f"({winner['test_accuracy'] - runner['test_accuracy']:+.4f} for the winner).")
    return text


def headline(table: pd.DataFrame, board: pd.DataFrame, context) -> str:
    """Data, hardware, seeds, trials and code in one line (the details are folded away)."""
    seeds = int(pd.to_numeric(board["seeds"], errors="coerce").fillna(1).max() or 1)
    commits = context.commits
    winner = board.dropna(subset=["best_trial"])
    commit = (table.loc[table["trial_id"] == winner.iloc[0]["best_trial"], "git_commit"]
              .iloc[0] if not winner.empty else None) or (commits[0] if commits else "unknown")
    short = str(commit)[:12] + ("-dirty" if str(commit).endswith("-dirty") else "")
    code = (f"commit `{short}`" + (f" (the winner's; {len(commits)} commits in all)"
                                   if len(commits) > 1 else ""))
    return (f"**Data** {'; '.join(context.data_sources or context.data)} · **hardware** "
            f"{'; '.join(context.hardware)} · "
            + ("one seed per configuration" if seeds <= 1 else f"up to {seeds} seeds per "
               "configuration")
            + f" · {len(table)} trials in {len(context.sweeps)} runs · {code}")


def detail_lines(context) -> list[str]:
    lines = [f"**Data**: {'; '.join(context.data)}",
             f"**Hardware**: {'; '.join(context.hardware)}",
             f"**Code**: commit {', '.join(context.commits)}",
             f"**Runs**: {', '.join(context.sweeps)}; {context.trials}",
             f"**Selection**: {SELECTION_NOTE} The winner (the model `cifar score` and "
             f"`cifar serve` pick from the same runs): {SELECTION_RULE}.",
             f"**Cost**: GPU-hours × ${context.gpu_hour_price:.3f} + CPU-hours × "
             f"${context.cpu_hour_price:.3f} (AWS us-east-1 on-demand: g5.xlarge less its "
             "vCPUs, m5 per vCPU; see cifar_core/report.py NODE_PRICES). Hours = wall time × "
             "resources each trial held."]
    return lines + [f"**Note**: {note}" for note in context.notes]


def report_blocks(table: pd.DataFrame, board: pd.DataFrame, context,
                  sweeps: Sequence[FamilySweep] = ()) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p"|"note", text), ("list", lines),
    ("table", frame, id), ("figure", name, alt), ("details", summary, blocks)."""
    data = "; ".join(context.data_sources or context.data)
    winner = winner_text(board)
    ladder, others = ladder_display(board), other_experiments_display(board)
    front = table[table["pareto"]].sort_values("cost_usd")
    blocks: list[tuple] = [("h1", "cifar-fleet results"), *([("p", winner)] if winner else []),
                           ("p", headline(table, board, context)),
                           ("details", "Where the numbers come from: data, hardware, code, "
                            "selection rule, prices", [("list", detail_lines(context))]),
                           ("h2", "The ladder against the seed notebook")]
    blocks += [("note", "The models run as the notebook ran them (all the data, its settings "
                "and epochs). test_accuracy: the family's best configuration's best trial, "
                "both chosen by validation accuracy; mean ± std over that configuration's "
                "seeds; difference: test_accuracy minus the notebook's; rank: the order of the "
                "best-model rule over all families (details above)."),
               ("table", ladder, "leaderboard") if not ladder.empty
               else ("p", "No run of the notebook's own experiment among these runs."),
               ("figure", "accuracy_vs_seed", f"Test accuracy per family vs the seed notebook "
                f"({data})")]
    if not others.empty:
        blocks += [("h2", f"Other experiments ({len(others)})"),
                   ("note", OTHER_EXPERIMENTS_NOTE),
                   ("table", others, "other-experiments")]
    blocks += [("h2", "Learning curves of each family's best trial"),
               ("figure", "learning_curves", f"Learning curves ({data})"),
               *sweep_blocks(sweeps, data),
               ("h2", "Best model: confusion matrix and per-class accuracy"),
               ("figure", "confusion", f"Confusion matrix of the best model ({data}, test set)"),
               ("h2", "Accuracy vs compute"),
               ("figure", "accuracy_vs_cost", f"Accuracy vs GPU-hours and cost ({data})"),
               ("h3", "Trials no other trial beats on both accuracy and cost"),
               ("table", trials_display(front), "pareto")]
    if context.scoring:
        blocks += [("h2", "Batch scoring"),
                   ("table", scoring_display(context.scoring), "scoring"),
                   ("note", SCORING_NOTE)]
    blocks += [("h2", f"All trials ({len(table)})"),
               ("details", f"Show all {len(table)} trials",
                [("table", trials_display(table), "trials")]),
               ("note", f"Data: {data}. Hardware: {'; '.join(context.hardware)}. Commit: "
                f"{', '.join(context.commits)}. Full-precision columns are in trials.parquet "
                "and leaderboard.csv.")]
    return blocks


def sweep_blocks(sweeps: Sequence[FamilySweep], data: str) -> list[tuple]:
    """What each family's sweep varied: its importance table and parallel coordinates."""
    if not sweeps:
        return []
    blocks: list[tuple] = [
        ("h2", "What the sweeps explored"),
        ("note", "Per model family with trials that differ in their settings: one line per "
         "trial through each varied setting to its best val_accuracy (parallel coordinates), "
         f"and, from {MIN_IMPORTANCE_TRIALS} trials on, which settings mattered. Importance "
         f"is {IMPORTANCE_METHOD}")]
    for sweep in sweeps:
        blocks.append(("h3", f"{sweep.family}: {len(sweep.trial_ids)} trials, "
                             f"{len(sweep.axes)} varied setting(s)"))
        if sweep.importance is not None:
            blocks += [("note", f"Hyperparameter importance over {len(sweep.trial_ids)} "
                        f"trials (forest out-of-bag R² {sweep.fit_r2:.2f}):"),
                       ("table", importance_display(sweep),
                        "importance-" + parallel_name(sweep.family).removeprefix("parallel-"))]
        else:
            reason = "; ".join(sweep.notes) or (
                f"an importance table needs {MIN_IMPORTANCE_TRIALS} finished trials")
            blocks.append(("note", f"No importance table: {reason}."))
        blocks.append(("figure", parallel_name(sweep.family),
                       f"Parallel coordinates of {sweep.family}'s settings, coloured by best "
                       f"val_accuracy ({data})"))
    return blocks


# ---------------------------------------------------------------------------- writers
def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (pandas' to_markdown needs an extra package)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(table: pd.DataFrame, board: pd.DataFrame, context,
                    figures: dict[str, bytes] | None = None,
                    sweeps: Sequence[FamilySweep] = ()) -> str:
    """report.md: the blocks as GitHub markdown; figures link the PNG files beside it."""
    figures = figures or {}

    def write(block: tuple) -> str:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            return "#" * int(kind[1]) + " " + block[1]
        if kind == "list":
            return "\n".join(f"- {line}" for line in block[1])
        if kind == "table":
            return markdown_table(block[1])
        if kind == "figure":
            return (f"![{block[2]}]({figure_file(block[1])})" if block[1] in figures
                    else f"{block[2]}: not available for these runs.")
        if kind == "details":  # GitHub folds this; needs blank lines around the markdown
            inner = "\n\n".join(write(b) for b in block[2])
            return f"<details><summary>{html.escape(block[1])}</summary>\n\n{inner}\n\n</details>"
        return block[1]

    return "\n\n".join(write(b) for b in report_blocks(table, board, context, sweeps)) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
td { white-space: nowrap; }
td.wrap { white-space: normal; min-width: 12em; max-width: 30em; }
th { background: #eef2f7; }
tr:nth-child(even) td { background: #fafafa; }
.scroll { overflow-x: auto; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-size: 13px; max-width: 60em; }
details { margin: 0.4em 0 1em; font-size: 14px; }
summary { cursor: pointer; color: #3b5f8f; }
"""
#: Columns whose long text may wrap; every other cell stays on one line.
WRAPPING_COLUMNS = ("settings", "experiment", "settings varied", "best settings",
                    "mean best val_accuracy per value")


def html_table(frame: pd.DataFrame, table_id: str) -> str:
    def cell(value: Any) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    wrap = [c in WRAPPING_COLUMNS for c in frame.columns]
    body = "".join("<tr>" + "".join(f'<td class="wrap">{cell(v)}</td>' if w
                                    else f"<td>{cell(v)}</td>" for v, w in zip(row, wrap))
                   + "</tr>" for row in frame.itertuples(index=False))
    return (f'<div class="scroll"><table id="{html.escape(table_id)}"><thead><tr>{head}</tr>'
            f"</thead><tbody>{body}</tbody></table></div>")


def _inline(text: str) -> str:
    """The markdown the blocks use (**bold**, `code`) as HTML, everything else escaped."""
    escaped = html.escape(text)
    for mark, tag in (("**", "b"), ("`", "code")):
        while escaped.count(mark) >= 2:
            escaped = escaped.replace(mark, f"<{tag}>", 1).replace(mark, f"</{tag}>", 1)
    return escaped


def render_html(table: pd.DataFrame, board: pd.DataFrame, context,
                figures: dict[str, bytes], sweeps: Sequence[FamilySweep] = ()) -> str:
    """A self-contained page: inline CSS, figures as base64 PNG data URIs, no scripts."""
    def write(block: tuple) -> str:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            return f"<{kind}>{_inline(block[1])}</{kind}>"
        if kind == "list":
            return "<ul>" + "".join(f"<li>{_inline(line)}</li>" for line in block[1]) + "</ul>"
        if kind == "table":
            return html_table(block[1], block[2])
        if kind == "figure":
            name, alt = block[1], html.escape(block[2])
            if name not in figures:
                return f"<p class='note'>{alt}: not available for these runs.</p>"
            data = base64.b64encode(figures[name]).decode()
            return (f"<img id='fig-{name}' alt='{alt}' title='{figure_file(name)}' "
                    f"src='data:image/png;base64,{data}'>")
        if kind == "details":
            return (f"<details><summary>{html.escape(block[1])}</summary>"
                    + "".join(write(b) for b in block[2]) + "</details>")
        return f"<p class='{'note' if kind == 'note' else 'text'}'>{_inline(block[1])}</p>"

    return "\n".join([
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<title>cifar-fleet results</title>", f"<style>{HTML_STYLE}</style></head><body>",
        *(write(b) for b in report_blocks(table, board, context, sweeps)),
        "</body></html>", ""])
