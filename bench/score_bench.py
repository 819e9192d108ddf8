"""Benchmark: batch scoring on the 10,000 CIFAR-10 (JPEG) test images, three ways.

    python bench/score_bench.py                       # M7 and M1, 3 repeats: ~25 min, 2 cores
    python bench/score_bench.py --models M1 --repeats 1 --images 2000   # a quick look

For each model (M7 = MobileNetV2 at 96 px with a random-init backbone, which times like the
trained one; M1 = the small baseline CNN), each repeat runs, in this order:

  (a) notebook:   decode one file, one ``model.predict`` call, for ``--notebook-images`` files;
  (b) bare model on preloaded uint8 batches of ``--batch-size`` (``--bare-images`` images
      already decoded in memory: no files, no Ray), two ways: Keras ``model.predict`` over a
      tf.data pipeline that preprocesses each batch (as ``evaluate`` does), and the scorer's
      own compiled function (uint8 -> ``preprocess_images`` -> model), which is what each
      predictor actor runs and so the ceiling for (c);
  (c) cifar score: the real job, ``python -m jobs.score DIR --model CKPT --out x.parquet``, in
                  a fresh process (own local Ray). Reported two ways: the pipeline rate from
                  the job's summary (files / seconds from pipeline start to last row written,
                  actor start-up included) and the end-to-end rate (files / wall time of the
                  whole command, Python and Ray start-up included).

Repeats are interleaved (a, b, c, a, b, c, ...) so background load on a shared machine hits
all three alike. Writes results/bench-score.json and .md with provenance (machine, data,
commit, repeats, median/min/max) and the per-stage split of (c) from the job's summary:
list (driver wall time), read, decode+resize, predict (worker-seconds summed over rows),
write (driver time spent writing).
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import cifar_core  # noqa: E402,F401  (tf_keras before TensorFlow)

DATA = "/work/data/cifar10/test"


def make_checkpoint(model_id: str, folder: Path) -> Path:
    """A random-init checkpoint folder (model.keras + settings.json) for timing."""
    from cifar_core.models import build_model
    from cifar_core.settings import Settings

    extra = {"backbone_weights": "none"} if model_id in ("M5", "M7") else {}
    settings = Settings.from_dict({"model": model_id, "data": DATA, **extra})
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


def notebook_rate(model, input_size: int, files: list[str]) -> float:
    """(a) The notebook's way: read, decode, one ``predict`` call per image."""
    from PIL import Image

    from cifar_core.data import preprocess_images

    start = time.perf_counter()
    for path in files:
        image = np.asarray(Image.open(path).convert("RGB"))
        model.predict(preprocess_images(image[None], input_size), verbose=0)
    return len(files) / (time.perf_counter() - start)


def keras_predict_rate(model, input_size: int, images: np.ndarray, batch_size: int) -> float:
    """(b) Keras ``model.predict`` on preloaded batches, preprocessed by tf.data per batch."""
    import tensorflow as tf

    from cifar_core.data import preprocess_images

    dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(
        lambda batch: preprocess_images(batch, input_size)).prefetch(tf.data.AUTOTUNE)
    model.predict(dataset.take(1), verbose=0)  # build the predict function outside the timing
    start = time.perf_counter()
    model.predict(dataset, verbose=0)
    return len(images) / (time.perf_counter() - start)


def bare_model_rate(predict, images: np.ndarray, batch_size: int) -> float:
    """(b) The scorer's own compiled predict function on preloaded uint8 batches."""
    predict(images[:batch_size])  # trace and warm up outside the timing
    start = time.perf_counter()
    for offset in range(0, len(images), batch_size):
        predict(images[offset: offset + batch_size])
    return len(images) / (time.perf_counter() - start)


def score_job(checkpoint: Path, data: str, limit: int | None, batch_size: int,
              workdir: Path) -> dict:
    """(c) ``cifar score`` in a fresh process; its summary plus the command's wall time."""
    out = workdir / "scores.parquet"
    command = [sys.executable, "-m", "jobs.score", data, "--model", str(checkpoint),
               "--out", str(out), "--batch-size", str(batch_size), "--quiet",
               "--max-error-rate", "0"]
    if limit is not None:
        command += ["--limit", str(limit)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"cifar score failed ({result.returncode}):\n{result.stderr[-4000:]}")
    summary = json.loads((workdir / "scores.summary.json").read_text())
    return {"pipeline_images_per_s": summary["images_per_s"],
            "end_to_end_images_per_s": summary["files"] / wall, "wall_s": wall,
            "pipeline_s": summary["pipeline_s"], "first_row_s": summary.get("first_row_s"),
            "stage_s": summary["stage_s"], "files": summary["files"], "ok": summary["ok"]}


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def bench_model(model_id: str, args, workdir: Path) -> dict:
    from cifar_core.models import load_checkpoint_model
    from cifar_core.scoring import decode_image, make_predict_function
    from cifar_core.settings import Settings

    checkpoint = make_checkpoint(model_id, workdir / f"ckpt-{model_id}")
    settings = Settings.from_json((checkpoint / "settings.json").read_text())
    model = load_checkpoint_model(str(checkpoint / "model.keras"))
    predict = make_predict_function(model, settings.input_size)
    files = image_files(args.data, args.images)
    images = np.stack([decode_image(Path(p).read_bytes()) for p in files])
    notebook_files = files[:: max(1, len(files) // args.notebook_images)][: args.notebook_images]
    notebook_rate(model, settings.input_size, notebook_files[:5])  # warm-up
    bare = images[: args.bare_images]
    runs: dict[str, list] = {"notebook": [], "keras_predict": [], "bare_model": [],
                             "score_job": []}
    for repeat in range(args.repeats):
        runs["notebook"].append(notebook_rate(model, settings.input_size, notebook_files))
        runs["keras_predict"].append(keras_predict_rate(model, settings.input_size, bare,
                                                        args.batch_size))
        runs["bare_model"].append(bare_model_rate(predict, bare, args.batch_size))
        runs["score_job"].append(score_job(checkpoint, args.data, args.images,
                                           args.batch_size, workdir))
        print(f"{model_id} repeat {repeat + 1}: notebook {runs['notebook'][-1]:.1f}, keras "
              f"predict {runs['keras_predict'][-1]:.1f}, bare {runs['bare_model'][-1]:.1f}, "
              f"score pipeline "
              f"{runs['score_job'][-1]['pipeline_images_per_s']:.1f} / end-to-end "
              f"{runs['score_job'][-1]['end_to_end_images_per_s']:.1f} images/s", flush=True)
    pipeline = [r["pipeline_images_per_s"] for r in runs["score_job"]]
    stages = {name: statistics.median(r["stage_s"][name] for r in runs["score_job"])
              for name in runs["score_job"][0]["stage_s"]}
    result = {
        "model": model_id, "input_size": settings.input_size,
        "backbone_weights": settings.backbone_weights if model_id in ("M5", "M7") else None,
        "files": len(files), "notebook_images": len(notebook_files),
        "bare_images": len(bare),
        "notebook_images_per_s": stats(runs["notebook"]),
        "keras_predict_images_per_s": stats(runs["keras_predict"]),
        "bare_model_images_per_s": stats(runs["bare_model"]),
        "score_pipeline_images_per_s": stats(pipeline),
        "score_end_to_end_images_per_s": stats(
            [r["end_to_end_images_per_s"] for r in runs["score_job"]]),
        "score_first_row_s": stats([r["first_row_s"] or 0.0 for r in runs["score_job"]]),
        # Rate once the first row is out (actor start-up excluded): what a long job sustains.
        "score_steady_images_per_s": stats(
            [r["files"] / max(r["pipeline_s"] - (r["first_row_s"] or 0.0), 1e-9)
             for r in runs["score_job"]]),
        "score_stage_s_median": stages,
        "score_runs": runs["score_job"],
    }
    result["ratios"] = {
        "score_pipeline_over_notebook": statistics.median(pipeline) / statistics.median(
            runs["notebook"]),
        "score_pipeline_over_bare_model": statistics.median(pipeline) / statistics.median(
            runs["bare_model"]),
        "score_pipeline_over_keras_predict": statistics.median(pipeline) / statistics.median(
            runs["keras_predict"]),
        "score_end_to_end_over_bare_model": result["score_end_to_end_images_per_s"]["median"]
        / statistics.median(runs["bare_model"]),
    }
    return result


def markdown(report: dict) -> str:
    prov = report["provenance"]
    machine = prov["machine"]
    lines = [
        "# Batch scoring benchmark (`bench/score_bench.py`)", "",
        f"Data: the {report['files']} shared CIFAR-10 (JPEG) test images, `{report['data']}`. "
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), GPUs: "
        f"{machine['gpus'] or 'none'}; shared with other jobs (load average at start "
        f"{report['load_average_start']}, at end {report['load_average_end']}). Commit "
        f"`{prov['git_commit']}`, {prov['created']}. {report['repeats']} repeats, interleaved; "
        f"images/s as median (min-max). Batch size {report['batch_size']}, one predictor "
        "actor. Models are random-init (timing only).", "",
        "| model | (a) notebook: predict per image | (b) Keras predict, preloaded batches | "
        "(b) scorer's function, preloaded batches | (c) cifar score, pipeline | "
        "(c) cifar score, end to end | (c)/(a) | (c)/(b) Keras | (c)/(b) function |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(s: dict) -> str:
        return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"

    for r in report["models"]:
        lines.append(
            f"| {r['model']} ({r['input_size']} px) | {cell(r['notebook_images_per_s'])} | "
            f"{cell(r['keras_predict_images_per_s'])} | {cell(r['bare_model_images_per_s'])} | "
            f"{cell(r['score_pipeline_images_per_s'])} | "
            f"{cell(r['score_end_to_end_images_per_s'])} | "
            f"{r['ratios']['score_pipeline_over_notebook']:.1f}x | "
            f"{r['ratios']['score_pipeline_over_keras_predict']:.2f}x | "
            f"{r['ratios']['score_pipeline_over_bare_model']:.2f}x |")
    lines += ["", "Per-stage split of (c), median seconds over repeats (list and write: driver "
              "wall time; read, decode+resize, predict: worker-seconds summed over files; "
              "first row: pipeline start to first row written, which is mostly the predictor "
              "actor's start-up):", "",
              "| model | list | read | decode+resize | predict | write | first row | "
              "pipeline total | images/s after the first row |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        s = r["score_stage_s_median"]
        total = statistics.median(run["pipeline_s"] for run in r["score_runs"])
        lines.append(f"| {r['model']} | {s.get('list', 0):.2f} | {s.get('read', 0):.2f} | "
                     f"{s.get('decode', 0):.2f} | {s.get('predict', 0):.2f} | "
                     f"{s.get('write', 0):.2f} | {r['score_first_row_s']['median']:.1f} | "
                     f"{total:.1f} | {cell(r['score_steady_images_per_s'])} |")
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
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--models", default="M7,M1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=None, help="Subset of the folder.")
    parser.add_argument("--notebook-images", type=int, default=300)
    parser.add_argument("--bare-images", type=int, default=2560,
                        help="Preloaded images for (b); a rate needs no more.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "results" / "bench-score"))
    parser.add_argument("--notes", default="", help="A paragraph added to the .md.")
    args = parser.parse_args()

    from cifar_core.provenance import provenance

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="score-bench-") as folder:
        models = [bench_model(m.strip(), args, Path(folder)) for m in args.models.split(",")]
    report = {
        "benchmark": "batch scoring, issue 5", "data": args.data,
        "data_description": "CIFAR-10 (JPEG) test split, 32x32 JPEG files",
        "files": models[0]["files"], "repeats": args.repeats, "batch_size": args.batch_size,
        "load_average_start": [round(v, 1) for v in load_start],
        "load_average_end": [round(v, 1) for v in os.getloadavg()],
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "models": models, "notes": args.notes, "provenance": provenance(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
