"""Batch scoring: classify every file under a folder (local or ``s3://``) with a trained model.

The pipeline is one Ray Data dataset, streamed end to end:

    list files (one task, ``score_source.py``: blocks as the walk goes)
        -> read bytes -> decode to 32x32 (``listing.py``, ``images.py``; tasks)
        -> ``Predictor`` (the model loaded once: in the driver, or in actors for GPUs or
           several predictors) -> write (driver: CSV and/or Parquet, streamed to a
           temporary file, replaced atomically) + summary JSON

- **N files in, N rows out**, every row ``ok`` or ``error`` with an ``error`` message
  (``"<kind>: <detail>"``); no per-file problem raises. The listing numbers its rows and marks
  the last, and the driver checks them all came back before it replaces the output.
- **Flat memory.** No process holds the listing or the rows: the listing streams, the driver
  writes each batch as it comes and counts the summary (``score_outputs.Tally``).
- **Safe models.** MODEL resolves through ``checkpoints.py`` (the one best-model rule) and
  loads through the one safe loader; the predictor applies ``data.preprocess_images`` with the
  checkpoint's ``input_size``, the function training used.

Output columns, one row per file: ``path``, ``label`` (empty unless SRC has CIFAR-10 class
folders or ``<class>_*`` file names), ``predicted_class``, ``confidence``, ``top2_class``,
``top2_confidence``, ``top3_class``, ``top3_confidence``, ``status``, ``error``. Rows follow
the listing: each folder's entries in name order (an s3:// prefix: key order).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cifar_core.checkpoints import (Checkpoint, CheckpointError, check_archive, check_model,
                                    resolve_checkpoint)
from cifar_core.images import DECODE_SIZE, DEFAULT_MAX_PIXELS, decode_rows, one_line
from cifar_core.listing import (BLOCK_BYTES, DEFAULT_MAX_FILE_BYTES, ERROR, OK, ListingError,
                                check_source, inside, iter_source, read_files)
from cifar_core.listing import FILES_PER_TASK, blocks  # noqa: F401  (their old home)
from cifar_core.settings import CLASS_NAMES
from cifar_core import storage
from cifar_core.score_outputs import (OUTPUT_FORMATS, OutputError, OutputWriter, Tally,
                                      output_uris, with_nulls)
from cifar_core.storage import is_s3, s3_endpoint, write_text

#: Peak bytes a decode needs per pixel of the image (an RGBA PNG: 4 decoded, 3 as RGB).
DECODE_BYTES_PER_PIXEL = 7
#: Where the model runs: "driver" (this process: no actor to start, the model already loaded
#: for checking) or "actors" (``concurrency`` Ray actors, e.g. on GPU nodes). "auto" is the
#: driver for one CPU predictor and actors otherwise.
PREDICT_IN = ("auto", "driver", "actors")

#: Columns written, in order.
PREDICTION_COLUMNS = ["predicted_class", "confidence", "top2_class", "top2_confidence",
                      "top3_class", "top3_confidence"]
COLUMNS = ["path", "label"] + PREDICTION_COLUMNS + ["status", "error"]


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
    model_threads: int = 0           # TensorFlow intra-op threads per predictor; 0 = all
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    limit: int | None = None         # score only the first N files (in listing order)
    predict_in: str = "auto"         # PREDICT_IN
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
        if self.predict_in not in PREDICT_IN:
            raise ScoringError(f"--predict-in {self.predict_in!r}: choose from {PREDICT_IN}")
        if self.predict_in == "driver" and (self.concurrency > 1 or self.gpus_per_actor):
            raise ScoringError("--predict-in driver runs one predictor in the job's own "
                               "process: it cannot take --concurrency > 1 or "
                               "--gpus-per-actor; use --predict-in actors")
        unknown = set(self.formats) - set(OUTPUT_FORMATS)
        if not self.formats or unknown:
            raise ScoringError(f"formats={self.formats!r}: choose from {OUTPUT_FORMATS}")

    @property
    def predictor_place(self) -> str:
        """"driver" or "actors", with "auto" resolved."""
        if self.predict_in != "auto":
            return self.predict_in
        return "driver" if self.concurrency == 1 and not self.gpus_per_actor else "actors"


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


def set_model_threads(threads: int) -> None:
    """TensorFlow's intra-op threads for this process; ``ScoringError`` once TensorFlow has
    run (it cannot change then), rather than a setting that silently does nothing."""
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError as error:
        raise ScoringError(f"--model-threads {threads}: TensorFlow already runs in this "
                           f"process and cannot change its thread count ({error})") from None


class Predictor:
    """Ray Data callable class: loads the model once per actor, then scores batches."""

    def __init__(self, model_ref: Any, input_size: int, model_threads: int = 0):
        import ray

        import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
        import tensorflow as tf

        if model_threads:
            set_model_threads(model_threads)
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
    first_row_s: float = 0.0          # pipeline start to first row written
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


def build_dataset(plan: "ScoringPlan"):
    """The Ray Data pipeline for a plan: list -> read -> decode (-> predict on actors).

    Listing is one streaming task (``score_source``); read and decode run as tasks (Ray
    fuses the two into one task per block) that reserve ``decode_cpus`` each, which also
    keeps them out of the predictor actors (Ray fuses stages with equal resources), so
    decoding overlaps prediction and scales on its own. Each also reserves the memory it can need (a block's bytes and one
    image decoded at the pixel cap), so Ray runs no more of them at once than memory holds.
    """
    import ray
    import ray.data

    from cifar_core.score_source import ListingSource

    options = plan.options
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False   # the driver prints one progress line instead
    context.execution_options.preserve_order = True  # output rows follow the listing
    # Ray Data merges what a task yields into blocks of this size before passing them on.
    # Its 128 MiB default would hold ~900,000 listed files back in one block; at 1 MiB the
    # listing hands on ~7,000 at a time (reading starts while the walk goes on), a read
    # task holds one ``blocks`` range of bytes at a time, and decoded images travel ~300 a
    # block. Smaller sizes cost more per-block overhead than they gained (bench-score.md).
    context.target_max_block_size = TARGET_BLOCK_BYTES
    endpoint = s3_endpoint(options.endpoint)
    memory = BLOCK_BYTES + DECODE_BYTES_PER_PIXEL * options.max_pixels
    dataset = ray.data.read_datasource(ListingSource(plan.src, options.limit, endpoint),
                                       num_cpus=LIST_CPUS, override_num_blocks=1)
    dataset = dataset.map_batches(
        read_files, batch_format="numpy", batch_size=None, num_cpus=options.decode_cpus,
        memory=memory,
        fn_kwargs=dict(root=plan.src, max_file_bytes=options.max_file_bytes,
                       endpoint=endpoint))
    dataset = dataset.map_batches(decode_rows, batch_format="numpy", batch_size=None,
                                  num_cpus=options.decode_cpus, memory=memory,
                                  fn_kwargs=dict(max_pixels=options.max_pixels))
    if options.predictor_place == "actors":
        dataset = dataset.map_batches(
            Predictor, batch_format="numpy", batch_size=options.batch_size,
            fn_constructor_kwargs=dict(model_ref=ray.put(plan.model_bytes),
                                       input_size=plan.checkpoint.settings.input_size,
                                       model_threads=options.model_threads),
            compute=ray.data.ActorPoolStrategy(size=options.concurrency),
            num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or None)
    return dataset


#: Ray Data's block size for a scoring job (see ``build_dataset``).
TARGET_BLOCK_BYTES = 1024 * 1024
#: Logical CPUs the one listing task reserves (little: it mostly waits on the disk or S3,
#: and a whole CPU would keep a read/decode task from starting beside it on a small node).
LIST_CPUS = 0.25


def check_room(options: ScoreOptions, cpus: float) -> None:
    """``ScoringError`` when, on a Ray of ``cpus`` CPUs that will not grow (a private local
    one), the predictor actors would leave too little for the listing task and one read/decode
    task: Ray Data would then wait for ever."""
    held = (options.concurrency * options.cpus_per_actor
            if options.predictor_place == "actors" else 0.0)
    needed = LIST_CPUS + options.decode_cpus
    if held + needed > cpus:
        raise ScoringError(
            f"--concurrency {options.concurrency} x --cpus-per-actor {options.cpus_per_actor:g} "
            f"leaves {max(cpus - held, 0):g} of this Ray's {cpus:g} CPUs for listing and "
            f"decoding, which need {needed:g} (--decode-cpus {options.decode_cpus:g} + "
            f"{LIST_CPUS:g}); lower --concurrency or --cpus-per-actor")


def scored_tables(plan: "ScoringPlan"):
    """Arrow tables of scored rows, in listing order, as the pipeline produces them."""
    import pyarrow as pa

    dataset = build_dataset(plan)
    if plan.options.predictor_place == "actors":
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
        return
    predictor = Predictor(plan.model_bytes, plan.checkpoint.settings.input_size,
                          plan.options.model_threads)
    for batch in dataset.iter_batches(batch_size=plan.options.batch_size,
                                      batch_format="numpy"):
        scored = predictor(batch)
        yield pa.table({name: scored[name] for name in scored if name not in ("source",)})


class FileCounter(threading.Thread):
    """Counts SRC's files in the background, for the progress line's percentage and ETA
    (the pipeline itself never needs the total: the listing marks its last row)."""

    def __init__(self, src: str, limit: int | None, endpoint: str | None):
        super().__init__(daemon=True, name="cifar-score-count")
        self.src, self.limit, self.endpoint = src, limit, endpoint
        self.total: int | None = None

    def run(self) -> None:
        count = 0
        try:
            for _ in iter_source(self.src, self.endpoint):
                count += 1
                if self.limit is not None and count >= self.limit:
                    break
        except Exception:  # progress only: the pipeline reports listing problems itself
            return
        self.total = count


def run_pipeline(plan: "ScoringPlan", writer: OutputWriter, log=print):
    """Run the pipeline for ``plan``, streaming rows into ``writer``; returns (tally, stage
    seconds incl. ``write`` and ``first_row``, pipeline seconds). Needs a running Ray."""
    options = plan.options
    counter = FileCounter(plan.src, options.limit, s3_endpoint(options.endpoint))
    if options.progress_interval_s:  # a second walk of SRC: only for the progress line
        counter.start()
    tally = Tally()
    start = last_report = time.perf_counter()
    first_row_s = None
    write_s = 0.0
    for table in scored_tables(plan):
        write_start = time.perf_counter()
        if first_row_s is None:  # actor start-up when predicting on actors
            first_row_s = write_start - start
        table = with_nulls(table)
        tally.add(table)
        writer.write(table)
        now = time.perf_counter()
        write_s += now - write_start
        if options.progress_interval_s and now - last_report >= options.progress_interval_s:
            last_report = now
            log(progress_line(tally, counter.total, now - start))
    if options.progress_interval_s and tally.files:
        log(progress_line(tally, tally.files, time.perf_counter() - start))
    if not tally.complete:
        raise RuntimeError(f"internal error: {tally.files} rows arrived but the listing's "
                           "last row did not; output not replaced")
    stage = {**tally.stage_s, "write": write_s, "first_row": first_row_s or 0.0}
    return tally, stage, time.perf_counter() - start


def progress_line(tally: Tally, total: int | None, seconds: float) -> str:
    rate = tally.files / seconds if seconds > 0 else 0.0
    if total:
        total = max(total, tally.files)
        eta = f"{(total - tally.files) / rate:.0f} s" if rate else "?"
        done = f"{tally.files}/{total} files ({tally.files / total:.0%})"
    else:
        eta, done = "?", f"{tally.files} files (counting)"
    return (f"cifar score: {done}, {rate:.0f} images/s, ETA {eta}, {tally.errors} errors")


@dataclass
class ScoringPlan:
    """Everything checked before any Ray work: SRC has files, the model, where output goes."""

    src: str
    checkpoint: Checkpoint
    model_bytes: bytes
    outputs: list[str]
    summary_uri: str
    options: ScoreOptions
    check_s: float                   # seconds to check SRC (listing runs in the pipeline)

    columns = COLUMNS


def plan_scoring(src: str, model: str, out: str, options: ScoreOptions = ScoreOptions(),
                 while_checking_model: Callable[[], Any] | None = None) -> ScoringPlan:
    """Check SRC, resolve and safely load MODEL, check OUT. No Ray; raises ``ScoringError``
    (or ``StorageError``) for every whole-job problem, before any output is touched.

    ``while_checking_model`` runs on this thread while the model check (TensorFlow's import
    and the safe load: seconds) runs on another, once every cheaper check has passed: the job
    starts Ray there, so the two start-ups overlap (``results/bench-score.md``). If it raised,
    so does this, after the check ends.
    """
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
        check_source(src, options.endpoint)
        check_s = time.perf_counter() - start
        checkpoint = resolve_checkpoint(model, options.endpoint)
        if options.model_threads and options.predictor_place == "driver":
            set_model_threads(options.model_threads)  # before the check runs TensorFlow
        if while_checking_model is None:
            model_bytes = check_model(checkpoint)
        else:
            check_archive(checkpoint)  # what safety refuses, before Ray starts
            with ThreadPoolExecutor(1, thread_name_prefix="cifar-model-check") as pool:
                check = pool.submit(check_model, checkpoint)
                try:
                    while_checking_model()
                finally:
                    model_bytes = check.result()
    except (ListingError, CheckpointError) as error:
        raise ScoringError(str(error)) from error
    return ScoringPlan(src, checkpoint, model_bytes, outputs, summary_uri, options, check_s)


def execute(plan: ScoringPlan, log=print) -> ScoreSummary:
    """Run the pipeline for a plan, replace the outputs, write the summary JSON beside them.

    Needs a running Ray (``ray_glue.connect_ray``).
    """
    from cifar_core.provenance import provenance

    options = plan.options
    log(f"cifar score: scoring the files under {plan.src} with model "
        f"{plan.checkpoint.settings.model} from {plan.checkpoint.uri} (predicting in the "
        f"{'driver' if options.predictor_place == 'driver' else 'actors'})")
    writer = OutputWriter(plan.outputs, plan.columns, options.endpoint)
    try:
        tally, stage, pipeline_s = run_pipeline(plan, writer, log)
        if writer.rows != tally.files:  # the promise: N files in, N rows out
            raise RuntimeError(f"internal error: {tally.files} files listed but "
                               f"{writer.rows} rows written; output not replaced")
        written = writer.commit()
    except BaseException:
        writer.abort()
        raise

    summary = ScoreSummary(
        src=plan.src, outputs=plan.outputs, summary_uri=plan.summary_uri,
        model=plan.checkpoint.describe(), output_files=written, files=tally.files,
        ok=tally.files - tally.errors, errors=tally.errors,
        error_rate=tally.errors / tally.files,
        errors_by_kind=dict(sorted(tally.kinds.items())),
        images_per_s=tally.files / pipeline_s, pipeline_s=round(pipeline_s, 3),
        first_row_s=round(stage.pop("first_row"), 3),
        stage_s={name: round(value, 3) for name, value in stage.items()},
        labels=tally.labels(), options=asdict(options), provenance=provenance())
    # Last, like a manifest: it names each output's rows and SHA-256, so the summary beside
    # an output always describes it (after a crash in between, the old one no longer matches).
    write_text(plan.summary_uri, json.dumps(asdict(summary), indent=1, default=str) + "\n",
               options.endpoint)
    return summary


def score(src: str, model: str, out: str, options: ScoreOptions = ScoreOptions(),
          log=print) -> ScoreSummary:
    """``plan_scoring`` then ``execute``: score every file under SRC with MODEL into OUT."""
    return execute(plan_scoring(src, model, out, options), log)
