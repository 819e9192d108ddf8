"""Benchmark: the cost of running training inside Ray Train (1 worker) vs plain Keras ``fit``.

    python bench/finetune_bench.py --data DIR   # M7 (0.35 width, 96 px), 4 repeats: ~15 min
    python bench/finetune_bench.py --data DIR --repeats 1 --limit 400 --epochs-per-phase 2
                                                # a quick look
    python bench/finetune_bench.py --render results/bench-finetune.json   # only rewrite the .md

DIR is the CIFAR-10 (JPEG) data, as ``cifar train --data`` takes it (default: the CIFAR10_DATA
environment variable).

Both arms run the same function, ``cifar_core.train.train``, on the same CIFAR-10 (JPEG) subset
with the same settings: (a) **plain**: a fresh Python process, no Ray; (b) **ray**: a one-worker
``TensorflowTrainer`` (``run_finetune``, 2 CPUs for its worker, checkpoints reported to local
storage every epoch). Ray runs its workers at nice 15 (the raylet's ``worker_niceness``); on a
machine shared with other jobs that alone costs a worker CPU share, so the plain process runs
at the same niceness and the comparison isolates Ray Train's own overhead (each arm's measured
niceness is in the results). Repeats are interleaved (a, b, a, b, ...) so the machine's
background load hits both alike. Per run we record:

- ``interval``: seconds between consecutive epoch ends, taken when the report hook is called
  (after the epoch's checkpoint is written; for Ray, just before ``ray.train.report``), so an
  interval holds the epoch's ``fit`` (with validation), its checkpoint save and, for Ray, the
  previous epoch's report and upload. Phase 1 (frozen backbone) and phase 2 (last 50 layers
  training) are reported separately, from their second epoch (the first one traces the graph).
- ``epoch_time_s``: Keras's own epoch time (``fit`` + validation only), same epochs.
- ``images_per_s``: training images / interval.
- ``wall_s``: the call that trains, from start to returned result: ``train()`` for plain;
  ``run_finetune()`` for Ray (worker start-up, TensorFlow import in the worker, data through
  the object store, every report and the final export included).

Overhead = ray / plain - 1, of the medians and of the minimums over all steady epochs. Writes results/bench-finetune.json and .md with
provenance (machine, data, commit, repeats, median/min/max of every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, add_data_argument, require_data

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)

RESULTS = REPO / "results"
#: Niceness of Ray's worker processes (raylet default ``worker_niceness``), given to plain too.
RAY_WORKER_NICENESS = 15


def bench_settings(args):
    from cifar_core.settings import Settings

    # M7's seed schedule shape (two phases, batch 64, 96-px inputs, augmentation) at 0.35 width
    # and random weights (same cost as ImageNet ones, no download); no early stopping, so every
    # run trains the same epochs.
    return Settings.from_dict({
        "model": "M7", "data": args.data, "limit": args.limit, "backbone_weights": "none",
        "backbone_alpha": args.alpha, "image_size": 96, "num_epochs": args.epochs_per_phase,
        "fine_tune_epochs": args.epochs_per_phase, "early_stopping_patience": 0,
        "reduce_lr_patience": 0})


def run_plain(args, folder: Path) -> dict:
    """(a) In a child process at Ray's worker niceness: ``train()`` alone."""
    folder.mkdir(parents=True)
    command = [sys.executable, __file__, "--child-plain", str(folder), "--data", args.data,
               "--limit", str(args.limit), "--alpha", str(args.alpha),
               "--epochs-per-phase", str(args.epochs_per_phase)]
    subprocess.run(command, check=True, cwd=REPO,
                   preexec_fn=lambda: os.nice(RAY_WORKER_NICENESS - os.nice(0)))
    return json.loads((folder / "figures.json").read_text())


def child_plain(args) -> None:
    from cifar_core.data import load_cifar10
    from cifar_core.train import train

    settings = bench_settings(args)
    data = load_cifar10(settings)
    stamps = []
    start = time.perf_counter()
    result = train(settings, data, Path(args.child_plain) / "run",
                   report=lambda m, c: stamps.append(time.time()))
    wall = time.perf_counter() - start
    figures = summarize(result.state.history, stamps, len(data.y_train), wall)
    figures["niceness"] = os.nice(0)
    Path(args.child_plain, "figures.json").write_text(json.dumps(figures))


def run_ray(args, folder: Path, settings, data) -> dict:
    """(b) A one-worker Ray Train run of the same settings on the same arrays."""
    from cifar_core.multiworker import FinetuneOptions, run_finetune

    options = FinetuneOptions(storage=str(folder / "store"), name="bench", num_workers=1,
                              cpus_per_worker=2.0, max_failures=0, keep_checkpoints=10,
                              scratch_dir=str(folder))
    start = time.perf_counter()
    result = run_finetune(settings, options, data=data, train_loop=_stamping_loop())
    wall = time.perf_counter() - start
    stamps, niceness = _stamps_from_storage(options)
    figures = summarize(result.record.history, stamps, len(data.y_train), wall)
    figures["niceness"] = niceness
    return figures


def _stamping_loop():
    """The real worker loop; each report carries the time it was made (bench instrumentation)."""

    def loop(config: dict) -> None:
        import time as _time

        import ray.train

        from cifar_core.multiworker import train_loop_per_worker

        report = ray.train.report

        def stamped(metrics, checkpoint=None, **kwargs):
            report({**metrics, "reported_at": _time.time(), "niceness": os.nice(0)},
                   checkpoint=checkpoint, **kwargs)

        ray.train.report = stamped
        train_loop_per_worker(config)

    return loop


def _stamps_from_storage(options) -> tuple[list[float], int]:
    """Report times, one per epoch, and the worker's niceness, from the metrics Ray Train kept
    with each checkpoint."""
    from ray.train import Result

    from cifar_core import storage

    fs, path = storage.pyarrow_filesystem(options.run_uri)
    frame = Result.from_path(path, storage_filesystem=fs).metrics_dataframe
    frame = frame[frame["test_accuracy"].isna()] if "test_accuracy" in frame else frame
    frame = frame.sort_values("epoch")
    return list(frame["reported_at"]), int(frame["niceness"].iloc[0])


def summarize(history: list[dict], stamps: list[float], train_images: int,
              wall: float) -> dict:
    """Per-phase steady-state samples: every epoch of a phase except its first (tracing)."""
    out = {"wall_s": round(wall, 2)}
    for phase in (1, 2):
        steady = [i for i, m in enumerate(history) if m["phase"] == phase][1:]
        intervals = [round(stamps[i] - stamps[i - 1], 3) for i in steady if 0 < i < len(stamps)]
        out[f"phase{phase}"] = {
            "interval_s": intervals,
            "epoch_time_s": [history[i]["epoch_time_s"] for i in steady],
            "images_per_s": [round(train_images / t, 1) for t in intervals]}
    return out


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser, required=False)  # --render needs none
    parser.add_argument("--limit", type=int, default=1200)
    parser.add_argument("--epochs-per-phase", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "bench-finetune"))
    parser.add_argument("--child-plain", help=argparse.SUPPRESS)  # internal: the plain arm
    parser.add_argument("--render", metavar="JSON",
                        help="Only rewrite the .md from an earlier run's .json.")
    args = parser.parse_args(argv)
    if args.child_plain:
        child_plain(args)
        return 0
    if args.render:
        report = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(report))
        return 0
    require_data(parser, args)

    from cifar_core.data import load_cifar10
    from cifar_core.provenance import provenance
    from cifar_core.ray_glue import connect_ray

    settings = bench_settings(args)
    data = load_cifar10(settings)
    # A private local Ray of 2 CPUs (with the dashboard Ray Train needs); a RAY_ADDRESS set
    # in the environment joins that cluster instead, which takes no num_cpus or _temp_dir.
    private = (os.environ.get("RAY_ADDRESS") or "local") == "local"
    local_ray = ({"num_cpus": 2, "_temp_dir": tempfile.mkdtemp(prefix="cfbench-", dir="/tmp")}
                 if private else {})
    connect_ray(None, dashboard=True, log_to_driver=False, **local_ray)
    runs = {"plain": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as scratch:
        for repeat in range(args.repeats):
            for arm in ("plain", "ray"):
                folder = Path(scratch, f"{arm}-{repeat}")
                figures = (run_plain(args, folder) if arm == "plain"
                           else run_ray(args, folder, settings, data))
                runs[arm].append(figures)
                print(f"{arm} #{repeat + 1}: {json.dumps(figures)}", flush=True)

    # Statistics over every steady epoch of every repeat (n = repeats x steady epochs).
    summary = {}
    for arm, results in runs.items():
        summary[arm] = {"wall_s": stats([r["wall_s"] for r in results])}
        for phase in ("phase1", "phase2"):
            for key in ("interval_s", "epoch_time_s", "images_per_s"):
                values = [v for r in results for v in r[phase][key]]
                if values:
                    summary[arm].setdefault(phase, {})[key] = stats(values)
    # Overhead of the medians and of the minimums: background load only ever adds time, so
    # the fastest epochs are the closest to each arm's own cost on a shared machine.
    overhead = {}
    for phase in ("phase1", "phase2"):
        for key in ("interval_s", "epoch_time_s"):
            plain = summary["plain"].get(phase, {}).get(key)
            ray_ = summary["ray"].get(phase, {}).get(key)
            if plain and ray_:
                overhead[f"{phase}_{key}"] = {
                    which: round(ray_[which] / plain[which] - 1, 4)
                    for which in ("median", "min")}
    overhead["wall_s"] = {which: round(summary["ray"]["wall_s"][which]
                                       / summary["plain"]["wall_s"][which] - 1, 4)
                          for which in ("median", "min")}
    report = {
        "benchmark": "1-worker Ray Train TensorflowTrainer vs plain Keras fit, same train()",
        "data": f"CIFAR-10 (JPEG) {args.data}, stratified subset limit={args.limit}: "
                f"{json.dumps(data.summary())}",
        "settings": settings.to_dict(), "repeats": args.repeats,
        "ray_worker": {"num_workers": 1, "cpus_per_worker": 2, "storage": "local disk",
                       "report": "checkpoint every epoch"},
        "niceness": {arm: sorted({r["niceness"] for r in results})
                     for arm, results in runs.items()},
        "summary": summary, "overhead": overhead, "runs": runs, "provenance": provenance()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    prov = report["provenance"]
    machine = prov["machine"]
    lines = [
        "# Ray Train overhead: 1-worker TensorflowTrainer vs plain `fit`", "",
        f"Data: {report['data']}.  ",
        f"Model: M7 (MobileNetV2 width {report['settings']['backbone_alpha']}, random init, "
        f"96 px, batch {report['settings']['batch_size']}, {report['settings']['num_epochs']} "
        "epochs per phase).  ",
        f"Machine: {machine['cpus']} vCPUs ({machine['cpu_model']}), GPUs: "
        f"{machine['gpus'] or 'none'}; shared with other jobs while it ran.  ",
        f"Both arms at niceness {report['niceness']} (Ray's worker default), plain in a "
        "fresh process.  ",
        f"Commit {prov['git_commit']}, TensorFlow {prov['versions']['tensorflow']}, "
        f"Ray {prov['versions']['ray']}; {report['repeats']} interleaved repeats per arm "
        "(median [min-max] over every steady epoch of every repeat).", "",
        "| figure | plain fit | Ray Train, 1 worker | overhead of medians | of minimums |",
        "|---|---|---|---|---|"]

    def cell(arm, phase, key):
        scope = report["summary"][arm] if phase is None else report["summary"][arm].get(phase, {})
        s = scope.get(key)
        return f"{s['median']} [{s['min']}-{s['max']}]" if s else "n/a"

    for phase, label in (("phase1", "phase 1 (backbone frozen)"),
                         ("phase2", "phase 2 (last 50 layers)")):
        for key, what in (("interval_s", "s per epoch, end to end"),
                          ("epoch_time_s", "s per epoch, Keras fit"),
                          ("images_per_s", "training images/s")):
            over = report["overhead"].get(f"{phase}_{key}") or {}
            lines.append(f"| {label}: {what} | {cell('plain', phase, key)} | "
                         f"{cell('ray', phase, key)} | "
                         + " | ".join(f"{over[w]:+.1%}" if w in over else ""
                                      for w in ("median", "min")) + " |")
    wall = report["overhead"]["wall_s"]
    lines.append(f"| whole run, s (start-up and export included) | "
                 f"{cell('plain', None, 'wall_s')} | {cell('ray', None, 'wall_s')} | "
                 f"{wall['median']:+.1%} | {wall['min']:+.1%} |")
    lines += ["", "An epoch interval runs from one epoch end to the next: the epoch's `fit` with "
              "validation, its checkpoint save and (Ray) the previous epoch's report and upload. "
              "The first epoch of each phase traces the graph and is left out.", ""]
    lines += ["Reading: " + reading(report), ""]
    return "\n".join(lines)


def reading(report: dict) -> str:
    """What the table supports, in words: are the per-epoch differences within the noise?"""
    summary = report["summary"]
    overlapping = []
    for phase in ("phase1", "phase2"):
        for key in ("interval_s", "epoch_time_s"):
            plain, ray_ = summary["plain"][phase][key], summary["ray"][phase][key]
            overlapping.append(ray_["min"] <= plain["max"] and plain["min"] <= ray_["max"])
    medians = [report["overhead"][f"{p}_{k}"]["median"] for p in ("phase1", "phase2")
               for k in ("interval_s", "epoch_time_s")]
    fixed = summary["ray"]["wall_s"]["median"] - summary["plain"]["wall_s"]["median"]
    if all(overlapping):
        verdict = (f"the per-epoch differences (medians {min(medians):+.0%} to "
                   f"{max(medians):+.0%}) are inside the spread of either arm, so this machine "
                   "cannot tell Ray Train's per-epoch cost from zero, nor confirm or refute a "
                   "5% bound at this noise level")
    else:
        verdict = (f"per-epoch medians differ by {min(medians):+.0%} to {max(medians):+.0%}, "
                   "outside the other arm's range for at least one figure")
    return (f"{verdict}. Each run also pays a fixed cost of about {fixed:.0f} s (median) for "
            "starting the worker, importing TensorFlow in it, passing the data through the "
            "object store, reporting checkpoints and exporting the result.")


if __name__ == "__main__":
    sys.exit(main())
