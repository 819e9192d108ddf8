"""Benchmark: batch scoring on the 10,000 CIFAR-10 (JPEG) test images, three ways.

    python bench/score_bench.py --data DIR/test       # M7 and M1, 3 repeats: ~30-60 min, 2 cores
    python bench/score_bench.py --data DIR/test --models M1 --repeats 1 --images 2000
                                                      # a quick look
    python bench/score_bench.py --render results/bench-score.json --notes "..."
                                                      # only rewrite the .md (and its notes)

DIR/test is the folder of the 10,000 CIFAR-10 (JPEG) test images (``*.jpg``, any depth); without
``--data`` it is ``$CIFAR10_DATA/test``.

For each model (M7 = MobileNetV2 at 96 px with a random-init backbone, which times like the
trained one; M1 = the small baseline CNN), each repeat runs, in this order:

  (a) notebook:   decode one file, one ``model.predict`` call, for ``--notebook-images`` files;
  (b) bare model on preloaded uint8 batches of ``--batch-size`` (``--bare-images`` images
      already decoded in memory: no files, no Ray), two ways: Keras ``model.predict`` over a
      tf.data pipeline that preprocesses each batch (as ``evaluate`` does), and the scorer's
      own compiled function (uint8 -> ``preprocess_images`` -> model), which is what each
      predictor actor runs and so the ceiling for (c);
  (c) cifar score: the real job, ``python -m jobs.score DIR --model CKPT --out x.parquet``, in
      a fresh process (own local Ray). Reported as the pipeline rate from the job's summary
      (files / seconds from pipeline start to last row written, actor start-up included) and
      end to end (files / wall time of the whole command, Python and Ray start-up included).

Every measurement records wall time *and* CPU time: (a) and (b) the benchmark process's own CPU
time (all threads), (c) the summed user+system time of the job's whole process tree (driver,
Ray's daemons, read/decode tasks, predictor actor; sampled with psutil every 0.25 s). On a shared
machine wall-clock rates move with other people's load; CPU-seconds per image barely do, so
the CPU columns are the steadier comparison. One extra ``cifar score --limit 256`` run per model
measures the job's fixed start-up cost, so (c)'s per-image CPU can be split into fixed and
per-image parts.

Repeats are interleaved (a, b, c, a, b, c, ...) so background load hits all three alike.
Writes results/bench-score.json and .md with provenance (machine, data, commit, repeats,
median/min/max, load averages) and the per-stage split of (c) from the job's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from common import REPO, add_data_argument, add_render_arguments, render_only, require_data

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)


# ---------------------------------------------------------------------------- measuring
class Timer:
    """Wall and CPU time (this process, all threads) of a block, plus the load at its start."""

    def __enter__(self):
        self.load = os.getloadavg()[0]
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        return False


KIND_RANK = {"other": 0, "ray daemons": 1, "other ray workers": 2, "read+decode tasks": 3,
             "predictor actor": 3, "driver": 3}


def process_kind(process: psutil.Process, root: int) -> str:
    """Which part of the job a process is, from its title (Ray retitles its workers); "" when
    it cannot be told (gone, a zombie, or not ours to read)."""
    if process.pid == root:
        return "driver"
    try:
        title = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
        return ""
    if not title.strip():
        return ""  # a zombie (exited, not yet reaped): keep the kind seen while it lived
    for needle, kind in (("Predictor", "predictor actor"), ("read_files", "read+decode tasks"),
                         ("decode_rows", "read+decode tasks"),
                         ("raylet", "ray daemons"), ("gcs_server", "ray daemons"),
                         ("ray::", "other ray workers")):
        if needle in title:
            return kind
    return "ray daemons" if "ray" in title else "other"


def sample_tree(root: psutil.Process) -> list[tuple[int, float, str]]:
    """(pid, user+system CPU seconds, kind) of ``root`` and every descendant alive now;
    processes that exit (or cannot be read) while we look are left out of this sample."""
    try:
        processes = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []  # the root itself is gone
    rows = []
    for process in processes:
        try:
            with process.oneshot():
                times = process.cpu_times()  # a zombie's still reads: its final figure
                kind = process_kind(process, root.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rows.append((process.pid, times.user + times.system, kind))
    return rows


def run_tree(command: list[str], **kwargs
             ) -> tuple[subprocess.CompletedProcess, float, float, dict[str, float]]:
    """Run a command; (result, wall seconds, CPU seconds of it and all its descendants, the
    same CPU split by kind of process).

    Descendants are sampled with psutil every 0.25 s (each pid's last value kept), so a process
    that lives less than that may be missed; Ray's workers and daemons live for the whole job.
    """
    seen: dict[int, float] = {}
    kinds: dict[int, str] = {}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **kwargs)
    root = psutil.Process(process.pid)  # not reaped before communicate() returns: still there
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            for pid, cpu, kind in sample_tree(root):
                seen[pid] = max(seen.get(pid, 0.0), cpu)
                # A worker starts as a plain python process and Ray retitles it "ray::IDLE"
                # between tasks: keep the most specific kind it was ever seen as.
                if kind and KIND_RANK[kind] >= KIND_RANK.get(kinds.get(pid, ""), -1):
                    kinds[pid] = kind

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    by_kind: dict[str, float] = {}
    for pid, cpu in seen.items():
        by_kind[kinds.get(pid, "other")] = by_kind.get(kinds.get(pid, "other"), 0.0) + cpu
    return result, wall, sum(seen.values()), by_kind


def make_checkpoint(model_id: str, folder: Path, data: str) -> Path:
    """A random-init checkpoint folder (model.keras + settings.json) for timing."""
    from cifar_core.models import build_model
    from cifar_core.settings import Settings

    extra = {"backbone_weights": "none"} if model_id in ("M5", "M7") else {}
    settings = Settings.from_dict({"model": model_id, "data": data, **extra})
    folder.mkdir(parents=True, exist_ok=True)
    build_model(settings).save(str(folder / "model.keras"))
    (folder / "settings.json").write_text(settings.to_json())
    return folder


def image_files(data: str, count: int | None) -> list[str]:
    files = sorted(str(p) for p in Path(data).rglob("*.jpg"))
    if count is not None and count < len(files):
        # Evenly spaced, so every class is in the subset.
        files = [files[i] for i in np.linspace(0, len(files) - 1, count).astype(int)]
    return files


# ---------------------------------------------------------------------------- the three ways
def notebook(model, input_size: int, files: list[str]) -> dict:
    """(a) The notebook's way: read, decode, one ``predict`` call per image."""
    from PIL import Image

    from cifar_core.data import preprocess_images

    with Timer() as timer:
        for path in files:
            image = np.asarray(Image.open(path).convert("RGB"))
            model.predict(preprocess_images(image[None], input_size), verbose=0)
    return measurement(len(files), timer)


def keras_predict(model, input_size: int, images: np.ndarray, batch_size: int) -> dict:
    """(b) Keras ``model.predict`` on preloaded batches, preprocessed by tf.data per batch."""
    import tensorflow as tf

    from cifar_core.data import preprocess_images

    dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(
        lambda batch: preprocess_images(batch, input_size)).prefetch(tf.data.AUTOTUNE)
    model.predict(dataset.take(1), verbose=0)  # build the predict function outside the timing
    with Timer() as timer:
        model.predict(dataset, verbose=0)
    return measurement(len(images), timer)


def bare_function(predict, images: np.ndarray, batch_size: int) -> dict:
    """(b) The scorer's own compiled predict function on preloaded uint8 batches."""
    predict(images[:batch_size])  # trace and warm up outside the timing
    with Timer() as timer:
        for offset in range(0, len(images), batch_size):
            predict(images[offset: offset + batch_size])
    return measurement(len(images), timer)


def score_job(checkpoint: Path, data: str, limit: int | None, batch_size: int,
              workdir: Path) -> dict:
    """(c) ``cifar score`` in a fresh process: its summary, wall time, process-tree CPU."""
    out = workdir / "scores.parquet"
    command = [sys.executable, "-m", "jobs.score", data, "--model", str(checkpoint),
               "--out", str(out), "--batch-size", str(batch_size), "--quiet",
               "--max-error-rate", "0"]
    if limit is not None:
        command += ["--limit", str(limit)]
    load = os.getloadavg()[0]
    result, wall, cpu, cpu_by_kind = run_tree(command, cwd=REPO,
                                              env={**os.environ, "RAY_ADDRESS": ""})
    if result.returncode != 0:
        raise RuntimeError(f"cifar score failed ({result.returncode}):\n{result.stderr[-4000:]}")
    summary = json.loads((workdir / "scores.summary.json").read_text())
    files = summary["files"]
    return {"images": files, "wall_s": wall, "cpu_s": cpu, "load": load,
            "images_per_s": files / summary["pipeline_s"],  # the pipeline rate
            "end_to_end_images_per_s": files / wall, "cpu_ms_per_image": 1000 * cpu / files,
            "pipeline_s": summary["pipeline_s"], "first_row_s": summary["first_row_s"],
            "stage_s": summary["stage_s"], "ok": summary["ok"],
            "cpu_s_by_process": {k: round(v, 2) for k, v in sorted(cpu_by_kind.items())}}


def measurement(images: int, timer: Timer) -> dict:
    return {"images": images, "wall_s": timer.wall, "cpu_s": timer.cpu, "load": timer.load,
            "images_per_s": images / timer.wall, "cpu_ms_per_image": 1000 * timer.cpu / images}


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 4) for v in values]}


# ---------------------------------------------------------------------------- one model
def bench_model(model_id: str, args, workdir: Path) -> dict:
    from cifar_core.images import decode_image
    from cifar_core.models import load_checkpoint_model
    from cifar_core.scoring import make_predict_function
    from cifar_core.settings import Settings

    checkpoint = make_checkpoint(model_id, workdir / f"ckpt-{model_id}", args.data)
    settings = Settings.from_json((checkpoint / "settings.json").read_text())
    model = load_checkpoint_model(checkpoint / "model.keras")
    predict = make_predict_function(model, settings.input_size)
    files = image_files(args.data, args.images)
    bare = np.stack([decode_image(Path(p).read_bytes()) for p in files[: args.bare_images]])
    notebook_files = files[:: max(1, len(files) // args.notebook_images)][: args.notebook_images]
    notebook(model, settings.input_size, notebook_files[:5])  # warm-up
    # The job's fixed cost (Python, TensorFlow and Ray start-up, model checks, actor start-up).
    fixed = score_job(checkpoint, args.data, 256, args.batch_size, workdir)
    small = workdir / "small-folder"  # a 40-file folder: command to exit
    small.mkdir(exist_ok=True)
    for path in files[:: max(1, len(files) // 40)][:40]:
        (small / Path(path).name).write_bytes(Path(path).read_bytes())
    runs: dict[str, list] = {"notebook": [], "keras_predict": [], "bare_function": [],
                             "score_job": [], "small_folder": []}
    for repeat in range(args.repeats):
        runs["notebook"].append(notebook(model, settings.input_size, notebook_files))
        runs["keras_predict"].append(keras_predict(model, settings.input_size, bare,
                                                   args.batch_size))
        runs["bare_function"].append(bare_function(predict, bare, args.batch_size))
        runs["score_job"].append(score_job(checkpoint, args.data, args.images,
                                           args.batch_size, workdir))
        runs["small_folder"].append(score_job(checkpoint, str(small), None, args.batch_size,
                                              workdir))
        print(f"{model_id} repeat {repeat + 1}: " + ", ".join(
            f"{name} {r[-1]['images_per_s']:.1f}/s {r[-1]['cpu_ms_per_image']:.2f} CPU-ms"
            for name, r in runs.items()), flush=True)

    def summary(name: str, key: str) -> dict:
        return stats([r[key] for r in runs[name]])

    jobs = runs["score_job"]
    result = {
        "model": model_id, "input_size": settings.input_size,
        "backbone_weights": settings.backbone_weights if model_id in ("M5", "M7") else None,
        "files": len(files), "notebook_images": len(notebook_files), "bare_images": len(bare),
        **{f"{name}_images_per_s": summary(name, "images_per_s") for name in runs},
        **{f"{name}_cpu_ms_per_image": summary(name, "cpu_ms_per_image") for name in runs},
        "score_job_end_to_end_images_per_s": summary("score_job", "end_to_end_images_per_s"),
        "score_first_row_s": stats([r["first_row_s"] for r in jobs]),
        "small_folder_wall_s": stats([r["wall_s"] for r in runs["small_folder"]]),
        # Approximate rate once the first rows are out (actor start-up excluded).
        "score_after_first_row_images_per_s": stats(
            [r["images"] / max(r["pipeline_s"] - r["first_row_s"], 1e-9) for r in jobs]),
        "score_stage_s_median": {name: statistics.median(r["stage_s"][name] for r in jobs)
                                 for name in jobs[0]["stage_s"]},
        "fixed_cost_run": fixed,
        "runs": runs,
    }
    # CPU per image of (c) beyond the fixed cost: (CPU(N files) - CPU(256 files)) / (N - 256).
    marginal = [(r["cpu_s"] - fixed["cpu_s"]) / (r["images"] - fixed["images"]) * 1000
                for r in jobs]
    result["score_job_marginal_cpu_ms_per_image"] = stats(marginal)

    def median(name: str, key: str = "images_per_s") -> float:
        return result[f"{name}_{key}"]["median"]

    result["ratios"] = {
        "wall_score_over_notebook": median("score_job") / median("notebook"),
        "wall_score_over_keras_predict": median("score_job") / median("keras_predict"),
        "wall_score_over_bare_function": median("score_job") / median("bare_function"),
        # CPU efficiency: how many images (c) scores per CPU-second relative to the others.
        "cpu_score_over_notebook": median("notebook", "cpu_ms_per_image")
        / median("score_job", "cpu_ms_per_image"),
        "cpu_score_over_bare_function": median("bare_function", "cpu_ms_per_image")
        / median("score_job", "cpu_ms_per_image"),
        "cpu_marginal_score_over_bare_function": median("bare_function", "cpu_ms_per_image")
        / result["score_job_marginal_cpu_ms_per_image"]["median"],
    }
    return result


# ---------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    prov = report["provenance"]
    machine = prov["machine"]

    def cell(s: dict, digits: int = 0) -> str:
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    lines = [
        "# Batch scoring benchmark (`bench/score_bench.py`)", "",
        f"Data: the {report['files']} shared CIFAR-10 (JPEG) test images (`{report['data']}`). "
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), GPUs: "
        f"{machine['gpus'] or 'none'}, "
        f"{'nothing else running' if report.get('alone') else '**shared with other jobs**'}"
        " (1-min load average "
        f"{report['load_min']:.1f}-{report['load_max']:.1f} during the runs on "
        f"{machine['cpus']} cores). Commit `{prov['git_commit']}`, {prov['created']}. "
        f"{report['repeats']} repeats, interleaved; median (min-max). Batch size "
        f"{report['batch_size']}, one predictor ({report.get('predictor', 'an actor')}), "
        "random-init models (timing only). "
        f"Command: `{report['command']}`.", "",
        "Throughput, wall clock, images/s:", "",
        "| model | (a) notebook: predict per image | (b) Keras predict, preloaded | "
        "(b) scorer's function, preloaded | (c) cifar score, pipeline | "
        "(c) cifar score, end to end | (c)/(a) | (c)/(b) Keras | (c)/(b) function |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        q = r["ratios"]
        lines.append(
            f"| {r['model']} ({r['input_size']} px) | {cell(r['notebook_images_per_s'], 1)} | "
            f"{cell(r['keras_predict_images_per_s'])} | {cell(r['bare_function_images_per_s'])}"
            f" | {cell(r['score_job_images_per_s'])} | "
            f"{cell(r['score_job_end_to_end_images_per_s'])} | "
            f"{q['wall_score_over_notebook']:.1f}x | {q['wall_score_over_keras_predict']:.2f}x"
            f" | {q['wall_score_over_bare_function']:.2f}x |")
    lines += [
        "", "CPU time per image, ms (all threads; (c): the job's whole process tree, "
        "start-up included; marginal: beyond the fixed cost of a 256-file run):", "",
        "| model | (a) notebook | (b) Keras predict | (b) scorer's function | (c) cifar score | "
        "(c) marginal | (c) fixed cost, CPU-s | CPU efficiency (c)/(a) | (c)/(b) function | "
        "(c) marginal/(b) function |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        q = r["ratios"]
        lines.append(
            f"| {r['model']} | {cell(r['notebook_cpu_ms_per_image'], 1)} | "
            f"{cell(r['keras_predict_cpu_ms_per_image'], 2)} | "
            f"{cell(r['bare_function_cpu_ms_per_image'], 2)} | "
            f"{cell(r['score_job_cpu_ms_per_image'], 2)} | "
            f"{cell(r['score_job_marginal_cpu_ms_per_image'], 2)} | "
            f"{r['fixed_cost_run']['cpu_s']:.0f} | {q['cpu_score_over_notebook']:.1f}x | "
            f"{q['cpu_score_over_bare_function']:.2f}x | "
            f"{q['cpu_marginal_score_over_bare_function']:.2f}x |")
    lines += ["", "Where (c)'s time goes, median seconds over repeats (list and write: driver "
              "wall time; read, decode+resize, predict: worker-seconds summed over files; first "
              "row: pipeline start to first row written; 40 files: a 40-file folder, "
              "command to exit):", "",
              "| model | list | read | decode+resize | predict | write | first row | "
              "pipeline total | images/s after the first row | 40 files, s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        s = r["score_stage_s_median"]
        total = statistics.median(run["pipeline_s"] for run in r["runs"]["score_job"])
        lines.append(f"| {r['model']} | {s['list']:.2f} | {s['read']:.2f} | {s['decode']:.2f} "
                     f"| {s['predict']:.2f} | {s['write']:.2f} | "
                     f"{r['score_first_row_s']['median']:.1f} | {total:.1f} | "
                     f"{cell(r['score_after_first_row_images_per_s'])} | "
                     f"{cell(r['small_folder_wall_s'], 1) if 'small_folder_wall_s' in r else '-'}"
                     " |")
    if all("cpu_s_by_process" in run for r in report["models"]
           for run in r["runs"]["score_job"]):
        kinds = sorted({k for r in report["models"] for run in r["runs"]["score_job"]
                        for k in run["cpu_s_by_process"]})
        lines += ["", "CPU-seconds of (c) by process, median over repeats (driver: the "
                  "`cifar score` process; other ray workers: Ray Data's own actors, idle "
                  "workers, and read+decode workers never sampled while running a task, "
                  "as Ray retitles them IDLE in between):", "",
                  "| model | " + " | ".join(kinds) + " | total |",
                  "|---|" + "---|" * (len(kinds) + 1)]
        for r in report["models"]:
            runs = r["runs"]["score_job"]
            cells = [statistics.median(run["cpu_s_by_process"].get(k, 0.0) for run in runs)
                     for k in kinds]
            total = statistics.median(run["cpu_s"] for run in runs)
            lines.append(f"| {r['model']} | " + " | ".join(f"{c:.1f}" for c in cells)
                         + f" | {total:.1f} |")
    lines += ["", "(a) uses " + ", ".join(f"{r['model']}: {r['notebook_images']}"
                                          for r in report["models"])
              + " images per repeat, (b) " + ", ".join(f"{r['model']}: {r['bare_images']}"
                                                     for r in report["models"])
              + "; (c) always the whole folder. Raw numbers: `bench-score.json`.", ""]
    if report.get("notes"):
        lines += [report["notes"], ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser, "Folder of the CIFAR-10 (JPEG) test images (*.jpg, any depth)",
                      required=False, under="test")  # --render needs none
    parser.add_argument("--models", default="M7,M4,M1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=None, help="Subset of the folder.")
    parser.add_argument("--notebook-images", type=int, default=300)
    parser.add_argument("--bare-images", type=int, default=2560,
                        help="Preloaded images for (b); a rate needs no more.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "results" / "bench-score"))
    parser.add_argument("--alone", action="store_true",
                        help="Say the machine ran nothing else (else: shared).")
    add_render_arguments(parser)
    args = parser.parse_args()
    if render_only(args, markdown):
        return 0
    require_data(parser, args)
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: not a folder (the test images, *.jpg)")

    from cifar_core.provenance import provenance

    started = provenance()  # the code as it was when the timings were taken
    with tempfile.TemporaryDirectory(prefix="score-bench-") as folder:
        models = [bench_model(m.strip(), args, Path(folder)) for m in args.models.split(",")]
    loads = [run["load"] for r in models for name in r["runs"] for run in r["runs"][name]]
    report = {
        "benchmark": "batch scoring, issue 5", "data": args.data,
        "data_description": "CIFAR-10 (JPEG) test split, 32x32 JPEG files",
        "files": models[0]["files"], "repeats": args.repeats, "batch_size": args.batch_size,
        "load_min": min(loads), "load_max": max(loads),
        "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "models": models, "notes": args.notes, "provenance": started, "alone": args.alone,
        "predictor": "in the driver: `--predict-in auto`",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
