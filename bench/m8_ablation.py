"""Which of M8's fast-training ideas pay for themselves here: one idea off at a time.

    python bench/m8_ablation.py --data DIR               # on a quiet machine: ~30 min on 2
                                                          # cores; results/m8-ablation.{json,md}
    python bench/m8_ablation.py --data DIR --images 600 --epochs 1 --variants recipe,no_ema \
        --out /tmp/abl --runs /tmp/abl-runs               # plumbing check, ~2 min

Each variant is ``cifar train --model M8`` (a subprocess, as a user runs it) on the same
stratified ``--images`` subset for the same ``--epochs``, with M8's defaults overridden by
``BASE`` and then by the variant's own (``VARIANTS``: plain dicts of settings). The figure
that decides is the best validation accuracy (the subset's 10% held-out split); the subset's test accuracy is
printed beside it but chooses nothing. ``recipe`` runs with ``--seeds`` seeds so the table
shows how far two runs of one recipe differ; a difference smaller than that is noise.
Resumable: a variant whose run folder holds an ``evaluation.json`` is read, not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, add_data_argument, add_render_arguments, render_only, require_data

NAME = "m8-ablation"

#: What the one-off rows take ideas away from: M8 as it was first written (airbench's
#: schedule), stated here so the table stays reproducible after the defaults moved on.
BASE = {"batch_size": 512, "learning_rate": 0.4, "learning_rate_schedule": "linear",
        "warmup_fraction": 0.2, "label_smoothing": 0.2, "ema_decay": 0.99}

#: Variant name -> (what it takes away, settings overrides on top of BASE). M8's defaults now
#: are ``batch_128`` without label smoothing: the schedule stayed, as the full data's
#: validation preferred it to the constant rate these subset runs favour.
VARIANTS: dict[str, tuple[str, dict]] = {
    "recipe": ("nothing (BASE: M8 as first written)", {}),
    "no_whitening": ("frozen patch whitening (the first conv trains from random)",
                     {"whitening": False}),
    "no_dirac": ("identity init of the 3x3 convs", {"dirac_init": False}),
    "no_label_smoothing": ("label smoothing 0.2", {"label_smoothing": 0.0}),
    "no_nesterov": ("Nesterov momentum (plain momentum)", {"nesterov": False}),
    "no_schedule": ("warm-up and linear decay (constant rate)",
                    {"learning_rate_schedule": "constant", "warmup_fraction": 0.0}),
    "no_ema": ("weight EMA", {"ema_decay": 0.0}),
    "no_augmentation": ("flip + 2-px shifts", {"augment_flip": False, "augment_shift": 0.0}),
    "no_tta": ("test-time augmentation (1 view, not 6)", {"tta_level": 0}),
    "batch_128": ("large batches (128 at a quarter of the rate, not 512)",
                  {"batch_size": 128, "learning_rate": 0.1}),
    # Pairs of what did not pay alone in the one-off rows (results/m8-ablation.md).
    "constant_no_smoothing": ("schedule and label smoothing",
                              {"learning_rate_schedule": "constant", "warmup_fraction": 0.0,
                               "label_smoothing": 0.0}),
    "constant_no_smoothing_b128": ("schedule, label smoothing, large batches",
                                   {"learning_rate_schedule": "constant",
                                    "warmup_fraction": 0.0, "label_smoothing": 0.0,
                                    "batch_size": 128, "learning_rate": 0.1}),
    "constant_no_ema": ("schedule and EMA", {"learning_rate_schedule": "constant",
                                             "warmup_fraction": 0.0, "ema_decay": 0.0}),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser, required=False)
    parser.add_argument("--images", type=int, default=10000,
                        help="Training images (a stratified --limit subset; 10%% validate).")
    parser.add_argument("--epochs", type=int, default=8, help="Epochs per run (fixed budget).")
    parser.add_argument("--seeds", type=int, default=2, help="Seeds of the 'recipe' variant.")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"Comma-separated, of {', '.join(VARIANTS)}.")
    parser.add_argument("--runs", default="/tmp/m8-ablation-runs",
                        help="Run folders (kept, so a rerun resumes).")
    parser.add_argument("--out", default=str(REPO / "results" / NAME),
                        help="Results path without suffix (.json and .md are written). "
                        "Default: results/m8-ablation; elsewhere for a contended machine.")
    parser.add_argument("--alone", action="store_true",
                        help="Say in the results that nothing else ran.")
    add_render_arguments(parser)
    args = parser.parse_args()
    if not args.render:
        require_data(parser, args)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    return args


def flags(overrides: dict) -> list[str]:
    out = []
    for name, value in overrides.items():
        out += ["--" + name.replace("_", "-"),
                str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def run_variant(args, variant: str, seed: int) -> dict:
    what, overrides = VARIANTS[variant]
    folder = Path(args.runs) / f"{variant}-s{seed}-{args.images}-{args.epochs}"
    evaluation = folder / "evaluation.json"  # written last: the run is complete
    if not evaluation.is_file():
        command = [sys.executable, "-m", "jobs.train", "--model", "M8", "--data", args.data,
                   "--limit", str(args.images), "--num-epochs", str(args.epochs),
                   "--seed", str(seed), "--out", str(folder), "--quiet", *flags({**BASE, **overrides})]
        print(" ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        (folder / "bench-wall.json").write_text(json.dumps(
            {"command_s": time.perf_counter() - started, "load_1min": os.getloadavg()[0]}))
    from cifar_core import storage

    state = json.loads((folder / storage.CHECKPOINTS_DIR / storage.BEST / storage.STATE_FILE)
                       .read_text())
    epochs = [json.loads(line) for line in
              (folder / storage.METRICS_FILE).read_text().splitlines() if line.strip()]
    row = {"variant": variant, "takes_away": what, "overrides": overrides, "seed": seed,
           "best_val_accuracy": state["best_val_accuracy"], "best_epoch": state["best_epoch"],
           "test_accuracy": json.loads(evaluation.read_text())["test_accuracy"],
           "train_s": sum(epoch["epoch_time_s"] for epoch in epochs),
           **json.loads((folder / "bench-wall.json").read_text())}
    print(json.dumps(row), flush=True)
    return row


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = [r["best_val_accuracy"] for r in rows if r["variant"] == "recipe"]
    base_mean = sum(base) / len(base) if base else float("nan")
    lines = [f"# M8 ablation: one idea off at a time, then pairs ({report['images']:,} CIFAR-10 (JPEG) "
             f"training images, {report['epochs']} epochs)", "",
             "| variant | takes away | seed | best val_accuracy | vs recipe mean | best epoch "
             "| test_accuracy (subset, not used) | epoch time sum (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['takes_away']} | {r['seed']} | {r['best_val_accuracy']:.4f} "
            f"| {r['best_val_accuracy'] - base_mean:+.4f} | {r['best_epoch']} "
            f"| {r['test_accuracy']:.4f} | {r['train_s']:.0f} |")
    if len(base) > 1:
        lines += ["", f"Recipe seeds differ by {max(base) - min(base):.4f} in validation "
                  "accuracy: smaller differences are within one run's noise."]
    prov, machine = report["provenance"], report["provenance"]["machine"]
    loads = [r["load_1min"] for r in rows]
    lines += ["", f"Data: {report['data']} (a stratified {report['images']:,}-image subset; "
              "validation is its 10% held-out split, the test column its 1/5-size test subset). "
              f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), GPUs: "
              f"{machine['gpus'] or 'none'}, "
              f"{'nothing else running' if report['alone'] else '**shared with other jobs**'} "
              f"(1-min load average {min(loads):.1f}-{max(loads):.1f} at the runs' ends). "
              f"Commit `{prov['git_commit']}`, TensorFlow {prov['versions']['tensorflow']}, "
              f"{prov['created']}. One run per variant (the recipe: {report['seeds']} seeds). "
              f"Command: `{report['command']}`.", ""]
    if report.get("notes"):
        lines += [report["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if render_only(args, markdown):
        return
    from cifar_core.provenance import provenance

    started = provenance()  # the code as it was when the runs started
    rows = []
    for variant in args.variants.split(","):
        for seed in range(args.seeds if variant == "recipe" else 1):
            rows.append(run_variant(args, variant, seed))
    report = {"rows": rows, "images": args.images, "epochs": args.epochs, "data": args.data,
              "seeds": args.seeds, "alone": args.alone, "provenance": started,
              "command": "python bench/m8_ablation.py " + " ".join(sys.argv[1:]),
              "notes": args.notes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    Path(args.out + ".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
