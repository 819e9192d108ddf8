"""Batch scoring: classify every file under a folder (local or ``s3://``) with a trained model.

The pipeline is one Ray Data dataset, streamed:

    list files (driver, ``listing.py``) -> read bytes -> decode to 32x32 (``images.py``, tasks)
        -> batch -> ``Predictor`` (callable class: the model loaded once per actor)
        -> write (driver: one CSV and/or Parquet file, replaced atomically) + summary JSON

- **N files in, N rows out**, every row ``ok`` or ``error`` with an ``error`` message
  (``"<kind>: <detail>"``); no per-file problem raises, and the driver checks the row count
  before it replaces the output. Reading rules: ``listing.py``; decoding rules: ``images.py``
  (the same decoder training's image folders go through).
- **Safe models.** MODEL resolves through ``checkpoints.py`` (the one best-model rule) and
  loads through the one safe loader; the predictor applies ``data.preprocess_images`` with the
  checkpoint's ``input_size``, the function training used.

Output columns, one row per file: ``path``, ``label`` (only when SRC has CIFAR-10 class
folders or ``<class>_*`` file names), ``predicted_class``, ``confidence``, ``top2_class``,
``top2_confidence``, ``top3_class``, ``top3_confidence``, ``status``, ``error``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar_core.evaluate import label_summary
from cifar_core.checkpoints import Checkpoint, CheckpointError, check_model, resolve_checkpoint
from cifar_core.images import DECODE_SIZE, DEFAULT_MAX_PIXELS, decode_rows, one_line
from cifar_core.listing import (DEFAULT_MAX_FILE_BYTES, ERROR, OK, ListingError, inside,
                                list_source, read_files)
from cifar_core.settings import CLASS_NAMES
from cifar_core import storage
from cifar_core.score_outputs import OUTPUT_FORMATS, OutputError, OutputWriter, output_uris
from cifar_core.storage import is_s3, s3_endpoint, write_text

#: A read/decode task's block: at most this many files and this many bytes of them (a block
#: of 256 files at the 64 MiB file cap would otherwise hold 16 GiB in one task).
FILES_PER_TASK = 256
BLOCK_BYTES = 64 * 2**20
#: Peak bytes a decode needs per pixel of the image (an RGBA PNG: 4 decoded, 3 as RGB).
DECODE_BYTES_PER_PIXEL = 7

#: Columns written, in order (``label`` only when labels are known).
PREDICTION_COLUMNS = ["predicted_class", "confidence", "top2_class", "top2_confidence",
                      "top3_class", "top3_confidence"]
#: Per-row seconds each stage spent (worker time); summed into the summary, never written.
TIMING_COLUMNS = ["read_s", "decode_s", "predict_s"]


class ScoringError(ValueError):
    """A whole-job problem: missing or empty SRC, bad output path, unusable model."""


@dataclass(frozen=True)
class ScoreOptions:
    """Knobs of one scoring job (the CLI flags of ``cifar score``)."""

    batch_size: int = 256            # images per model call
    concurrency: int = 1             # predictor actors (each loads the model once)
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0      # logical CPUs Ray reserves per actor
    decode_cpus: float = 0.5         # logical CPUs per read/decode task (must differ from
                                     # cpus_per_actor, or Ray runs decoding inside the actors)
    model_threads: int = 0           # TensorFlow intra-op threads per actor; 0 = all cores
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    limit: int | None = None         # score only the first N files (sorted by path)
    formats: tuple[str, ...] = ("csv",)
    progress_interval_s: float = 5.0  # 0 = no progress lines
    endpoint: str | None = None      # S3 endpoint override (else AWS_ENDPOINT_URL)

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "max_pixels", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ScoringError(f"--{name.replace('_', '-')} {getattr(self, name)!r} must "
                                   "be >= 1")
        for name in ("gpus_per_actor", "cpus_per_actor", "model_threads"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ScoringError(f"--{name.replace('_', '-')} {value!r} must be a finite "
                                   "number >= 0")
        if not (math.isfinite(self.decode_cpus) and self.decode_cpus > 0):
            raise ScoringError(f"--decode-cpus {self.decode_cpus!r} must be a finite number > 0")
        if self.limit is not None and self.limit < 1:
            raise ScoringError(f"limit={self.limit!r} must be >= 1")
        unknown = set(self.formats) - set(OUTPUT_FORMATS)
        if not self.formats or unknown:
            raise ScoringError(f"formats={self.formats!r}: choose from {OUTPUT_FORMATS}")


# ---------------------------------------------------------------------------- model stage
def make_predict_function(model, input_size: int):
    """uint8 (N, 32, 32, 3) -> class probabilities (N, 10): preprocessing + model, compiled once.

    ``data.preprocess_images`` is the function training used, so scaling and resizing match.
    """
    import tensorflow as tf

    from cifar_core.data import preprocess_images

    @tf.function(input_signature=[tf.TensorSpec([None, DECODE_SIZE, DECODE_SIZE, 3], tf.uint8)])
    def predict(images):
        return model(preprocess_images(images, input_size), training=False)

    return lambda images: predict(images).numpy()


def load_model_from_bytes(model_bytes: bytes):
    """An inference-only Keras model from the bytes of a ``model.keras`` file, through the
    project's one loader (``models.load_checkpoint_model``: archive checked, safe_mode on)."""
    from cifar_core.models import load_checkpoint_model

    with tempfile.TemporaryDirectory(prefix="cifar-score-") as folder:
        path = Path(folder, storage.MODEL_FILE)
        path.write_bytes(model_bytes)
        return load_checkpoint_model(path, compile=False)


class Predictor:
    """Ray Data callable class: loads the model once per actor, then scores batches."""

    def __init__(self, model_ref: Any, input_size: int, model_threads: int = 0):
        import ray

        import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
        import tensorflow as tf

        if model_threads:
            tf.config.threading.set_intra_op_parallelism_threads(model_threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)  # actors may share a GPU
        model_bytes = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        self.predict = make_predict_function(load_model_from_bytes(model_bytes), input_size)
        # Trace the function now, so start-up cost is not billed to the first batch.
        self.predict(np.zeros((1, DECODE_SIZE, DECODE_SIZE, 3), np.uint8))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["path"])
        status = np.array(batch["status"], dtype=object)
        errors = np.array(batch["error"], dtype=object)
        classes = np.full((count, 3), "", dtype=object)
        confidences = np.full((count, 3), np.nan, dtype=np.float64)
        seconds = np.zeros(count, dtype=np.float64)
        ok = np.flatnonzero(status == OK)
        if len(ok):
            start = time.perf_counter()
            try:
                probabilities = self.predict(np.ascontiguousarray(batch["image"][ok]))
                top = np.argsort(-probabilities, axis=1, kind="stable")[:, :3]
                classes[ok] = np.asarray(CLASS_NAMES, dtype=object)[top]
                confidences[ok] = np.take_along_axis(probabilities, top, axis=1)
            except Exception as error:  # keep the rows; the summary's error rate shows it
                status[ok], errors[ok] = ERROR, f"prediction failed: {one_line(error)}"
            seconds[ok] = (time.perf_counter() - start) / len(ok)
        output = {name: values for name, values in batch.items() if name != "image"}
        output.update(status=status, error=errors, predict_s=seconds,
                      predicted_class=classes[:, 0], confidence=confidences[:, 0],
                      top2_class=classes[:, 1], top2_confidence=confidences[:, 1],
                      top3_class=classes[:, 2], top3_confidence=confidences[:, 2])
        return output


# ---------------------------------------------------------------------------- the job
@dataclass
class ScoreSummary:
    """What one scoring job did; written as JSON beside the output."""

    src: str
    outputs: list[str]
    summary_uri: str
    model: dict
    output_files: dict[str, dict] = field(default_factory=dict)  # uri -> rows, bytes, sha256
    files: int = 0
    ok: int = 0
    errors: int = 0
    error_rate: float = 0.0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    images_per_s: float = 0.0         # files / pipeline seconds (read to last row written)
    pipeline_s: float = 0.0
    first_row_s: float = 0.0          # pipeline start to first row written (actor start-up)
    stage_s: dict[str, float] = field(default_factory=dict)
    labels: dict | None = None        # accuracy + confusion matrix when labels are known
    options: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.files} files, {self.ok} ok, {self.errors} errors "
                f"({self.error_rate:.2%}), {self.images_per_s:.0f} images/s; output in "
                f"{', '.join(self.outputs)} (summary {self.summary_uri})")


def check_output(src: str, out: str) -> None:
    """OUT must not lie inside SRC: a re-run would then score its own previous output."""
    if is_s3(src) != is_s3(out):
        return
    if is_s3(src):
        within = out.startswith(src.rstrip("/") + "/")
    else:
        within = inside(os.path.realpath(os.path.dirname(os.path.abspath(out)) or "."),
                        os.path.realpath(src))
    if within:
        raise ScoringError(f"OUT {out!r} lies inside SRC {src!r}; write it elsewhere")


def blocks(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, end) of consecutive blocks of files: <= FILES_PER_TASK files, and <= BLOCK_BYTES
    of them unless one file alone is larger."""
    found, start, held = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= FILES_PER_TASK or held + size > BLOCK_BYTES):
            found.append((start, index))
            start, held = index, 0
        held += size
    return found + [(start, len(sizes))] if sizes else found


def run_pipeline(listing, checkpoint: Checkpoint, model_bytes: bytes, src: str,
                 writer: OutputWriter, options: ScoreOptions, log=print):
    """Run the Ray Data pipeline over ``listing``, streaming rows into ``writer``.

    Returns (stage seconds incl. ``first_row``, the label/prediction/status columns for the
    summary, pipeline seconds). Needs a running Ray (``ray.init``) in this process.
    """
    import pyarrow as pa
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False   # the driver prints one progress line instead
    context.execution_options.preserve_order = True  # output rows follow the sorted listing
    endpoint = s3_endpoint(options.endpoint)
    total = len(listing)
    table = pa.Table.from_pandas(listing, preserve_index=False)
    sizes = [s if s <= options.max_file_bytes else 0 for s in listing["size"].tolist()]
    dataset = ray.data.from_arrow([table.slice(a, b - a) for a, b in blocks(sizes)])
    # Read and decode run as tasks (Ray fuses the two into one task per block); they reserve
    # decode_cpus each, which also keeps them out of the predictor actors (Ray fuses stages
    # with equal resources), so decoding overlaps prediction and scales on its own. Each
    # also reserves the memory it can need (its block's bytes and one image decoded at the
    # pixel cap), so Ray runs no more of them at once than the node's memory holds.
    memory = BLOCK_BYTES + DECODE_BYTES_PER_PIXEL * options.max_pixels
    dataset = dataset.map_batches(
        read_files, batch_format="numpy", batch_size=None, num_cpus=options.decode_cpus,
        memory=memory,
        fn_kwargs=dict(root=src, max_file_bytes=options.max_file_bytes, endpoint=endpoint))
    dataset = dataset.map_batches(decode_rows, batch_format="numpy", batch_size=None,
                                  num_cpus=options.decode_cpus, memory=memory,
                                  fn_kwargs=dict(max_pixels=options.max_pixels))
    dataset = dataset.map_batches(
        Predictor, batch_format="numpy", batch_size=options.batch_size,
        fn_constructor_kwargs=dict(model_ref=ray.put(model_bytes),
                                   input_size=checkpoint.settings.input_size,
                                   model_threads=options.model_threads),
        compute=ray.data.ActorPoolStrategy(size=options.concurrency),
        num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or None)

    stage = Counter()
    collected = {"label": [], "predicted_class": [], "status": [], "error": []}
    start = last_report = time.perf_counter()
    done = errors = 0
    first_row_s = None
    for frame in dataset.iter_batches(batch_size=None, batch_format="pandas"):
        write_start = time.perf_counter()
        if first_row_s is None:  # mostly the predictor actors' start-up (imports, model load)
            first_row_s = write_start - start
        for column in TIMING_COLUMNS:
            stage[column.removesuffix("_s")] += float(frame[column].sum())
        for column in collected:
            collected[column].extend(frame[column].tolist())
        for column in ["label", "error"] + PREDICTION_COLUMNS:
            if column in frame and not column.endswith("confidence"):
                frame[column] = frame[column].replace("", None)
        writer.write(frame)
        done += len(frame)
        errors += int((frame["status"] == ERROR).sum())
        now = time.perf_counter()
        stage["write"] += now - write_start
        if options.progress_interval_s and now - last_report >= options.progress_interval_s:
            last_report = now
            rate = done / (now - start)
            log(f"cifar score: {done}/{total} files ({done / total:.0%}), {rate:.0f} images/s, "
                f"ETA {(total - done) / rate:.0f} s, {errors} errors")
    stage["first_row"] = first_row_s or 0.0
    return dict(stage), collected, time.perf_counter() - start


@dataclass
class ScoringPlan:
    """Everything checked before any Ray work: the files, the model, where output goes."""

    src: str
    listing: Any                     # DataFrame: path, size, label, status, error
    checkpoint: Checkpoint
    model_bytes: bytes
    outputs: list[str]
    summary_uri: str
    options: ScoreOptions
    list_s: float

    @property
    def has_labels(self) -> bool:
        return bool((self.listing["label"] != "").any())

    @property
    def columns(self) -> list[str]:
        return (["path"] + (["label"] if self.has_labels else []) + PREDICTION_COLUMNS
                + ["status", "error"])


def plan_scoring(src: str, model: str, out: str, options: ScoreOptions = ScoreOptions()
                 ) -> ScoringPlan:
    """List SRC, resolve and safely load MODEL, check OUT. No Ray; raises ``ScoringError``
    (or ``StorageError``) for every whole-job problem, before any output is touched."""
    src = src.rstrip("/") if is_s3(src) else src
    try:
        outputs, summary_uri = output_uris(out, options.formats)
    except OutputError as error:
        raise ScoringError(str(error)) from error
    check_output(src, out)
    if is_s3(out):
        try:  # a missing bucket would otherwise fail only after the whole pipeline
            storage.check_bucket(out, options.endpoint)
        except storage.StorageError as error:
            raise ScoringError(f"OUT {out!r}: {error}") from error
    start = time.perf_counter()
    try:
        listing = list_source(src, options.limit, options.endpoint)
        list_s = time.perf_counter() - start
        checkpoint = resolve_checkpoint(model, options.endpoint)
        model_bytes = check_model(checkpoint)
    except (ListingError, CheckpointError) as error:
        raise ScoringError(str(error)) from error
    return ScoringPlan(src, listing, checkpoint, model_bytes, outputs, summary_uri, options,
                       list_s)


def execute(plan: ScoringPlan, log=print) -> ScoreSummary:
    """Run the pipeline for a plan, replace the outputs, write the summary JSON beside them.

    Needs a running Ray (``ray_glue.connect_ray``).
    """
    from cifar_core.provenance import provenance

    options = plan.options
    log(f"cifar score: {len(plan.listing)} files under {plan.src}; model "
        f"{plan.checkpoint.settings.model} from {plan.checkpoint.uri}")
    writer = OutputWriter(plan.outputs, plan.columns, options.endpoint)
    try:
        stage, collected, pipeline_s = run_pipeline(plan.listing, plan.checkpoint,
                                                    plan.model_bytes, plan.src, writer,
                                                    options, log)
        if writer.rows != len(plan.listing):  # the promise: N files in, N rows out
            raise RuntimeError(f"internal error: {len(plan.listing)} files listed but "
                               f"{writer.rows} rows produced; output not replaced")
        written = writer.commit()
    except BaseException:
        writer.abort()
        raise

    status = np.array(collected["status"], dtype=object)
    errors = int((status == ERROR).sum())
    kinds = Counter(str(e).split(":", 1)[0] for e, s in zip(collected["error"], status)
                    if s == ERROR)
    summary = ScoreSummary(
        src=plan.src, outputs=plan.outputs, summary_uri=plan.summary_uri,
        model=plan.checkpoint.describe(), output_files=written, files=len(status),
        ok=len(status) - errors,
        errors=errors, error_rate=errors / len(status),
        errors_by_kind=dict(sorted(kinds.items())),
        images_per_s=len(status) / pipeline_s, pipeline_s=round(pipeline_s, 3),
        first_row_s=round(stage.pop("first_row"), 3),
        stage_s={"list": round(plan.list_s, 3),
                 **{name: round(value, 3) for name, value in stage.items()}},
        labels=label_summary(collected) if plan.has_labels else None,
        options=asdict(options), provenance=provenance())
    # Last, like a manifest: it names each output's rows and SHA-256, so the summary beside
    # an output always describes it (after a crash in between, the old one no longer matches).
    write_text(plan.summary_uri, json.dumps(asdict(summary), indent=1, default=str) + "\n",
               options.endpoint)
    return summary


def score(src: str, model: str, out: str, options: ScoreOptions = ScoreOptions(),
          log=print) -> ScoreSummary:
    """``plan_scoring`` then ``execute``: score every file under SRC with MODEL into OUT."""
    return execute(plan_scoring(src, model, out, options), log)
