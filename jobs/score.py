"""Batch scoring on Ray Data: ``cifar score SRC --model MODEL --out OUT`` / ``python -m jobs.score``.

    cifar score test_images/ --model results/runs/m4 --out scores.csv
    cifar score /data/photos --model results/runs/m7/checkpoints/best --out scores.parquet
    cifar score s3://bucket/photos --model s3://bucket/sweeps/m7-grid \\
        --out s3://bucket/scores/photos.parquet --concurrency 4 --gpus-per-actor 1
    cifar score test_images/ --model results/runs/m1 --out /tmp/smoke.csv --smoke-test

SRC: a folder or s3://bucket/prefix, read recursively; every file gets one output row.
MODEL: a checkpoint folder (model.keras + settings.json), a run folder (its checkpoints/best) or
a sweep folder (the trial records.select_best picks: see README, "The best model"), local or
s3://.
Images are prepared exactly as in training (32x32 RGB, then the checkpoint's input size).

OUT (.csv or .parquet; ``--format both`` writes both) has one row per file, in listing order
(each folder's entries by name): path, label, predicted_class, confidence, top2_class,
top2_confidence, top3_class, top3_confidence, status (ok/error), error. ``label`` is filled in
when files sit in CIFAR-10 class folders or are named ``<class>_*``; then OUT's
``.summary.json`` also holds accuracy and the confusion matrix. A re-run replaces OUT (never
appends). Memory stays flat however many files SRC holds: the listing streams and rows are
written as they come. Progress lines go to stderr; stdout ends with a summary
line (files, ok, errors, images/s, output paths) and, when labels are known, the accuracy.

Without ``--address``/``RAY_ADDRESS`` the job starts its own local Ray. On a multi-node cluster
a local SRC must be on a filesystem every node mounts (use s3:// otherwise). The model runs
in this job's own process for one CPU predictor (``--predict-in auto``: no actor to start, so
the first rows come within seconds) and in Ray actors for ``--concurrency`` > 1 or
``--gpus-per-actor`` (the model travels to them through Ray's object store). ``--smoke-test``: first 200 files, batches of 64.

Exit codes:
  0  done; at most --max-error-rate (default 0.01) of the files are error rows
  1  failed (the object store stopped answering, or an unexpected error with its traceback);
     the previous OUT, if any, is left as it was
  2  nothing scored: bad arguments, missing or empty SRC, OUT inside SRC, model missing,
     unreadable or refused (needs code: models always load with safe_mode on)
  3  output written, but more than --max-error-rate of the files are error rows
"""

from __future__ import annotations

import argparse
import os
import sys

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
from cifar_core.images import DEFAULT_MAX_PIXELS
from cifar_core.listing import DEFAULT_MAX_FILE_BYTES
from cifar_core.score_outputs import OutputError, formats_for
from cifar_core.scoring import ScoreOptions, ScoringError
from jobs import process_exit

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_ERROR_RATE = 0, 1, 2, 3
SMOKE = {"limit": 200, "batch_size": 64}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="Folder or s3://bucket/prefix of images.")
    parser.add_argument("--model", required=True, help="Checkpoint, run or sweep folder.")
    parser.add_argument("--out", required=True, help="Output file (.csv or .parquet).")
    parser.add_argument("--format", choices=("csv", "parquet", "both"),
                        help="Output format(s); default: OUT's suffix.")
    parser.add_argument("--batch-size", type=int, default=256, help="Images per model call.")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="Predictor actors; each loads the model once.")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--predict-in", choices=("auto", "driver", "actors"), default="auto",
                        help="Where the model runs: this process (driver) or Ray actors; "
                             "auto: the driver for one CPU predictor, else actors.")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0,
                        help="Logical CPUs Ray reserves per predictor actor.")
    parser.add_argument("--decode-cpus", type=float, default=0.5,
                        help="Logical CPUs per read/decode task (default 0.5).")
    parser.add_argument("--model-threads", type=int, default=0,
                        help="TensorFlow threads per predictor (0: all cores of the machine).")
    parser.add_argument("--max-error-rate", type=float, default=0.01,
                        help="Exit 3 when more than this fraction of files fail (default 0.01).")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="Refuse images whose header declares more pixels (not decoded).")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help="Refuse larger files without reading them.")
    parser.add_argument("--limit", type=int, help="Score only the first N files (listing order).")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a "
                                          "new local Ray).")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint (else AWS_ENDPOINT_URL).")
    parser.add_argument("--quiet", action="store_true", help="No progress lines.")
    parser.add_argument("--smoke-test", action="store_true",
                        help="First 200 files, batches of 64.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke_test:
        args.limit = args.limit or SMOKE["limit"]
        args.batch_size = SMOKE["batch_size"]
    if not 0 <= args.max_error_rate <= 1:
        print(f"cifar score: error: --max-error-rate={args.max_error_rate} must be in [0, 1]",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    from cifar_core.ray_glue import connect_ray, is_private, unfit
    from cifar_core.scoring import check_room, execute, plan_scoring
    from cifar_core.storage import StorageError, check_endpoint, unreachable

    started = False

    def start_ray() -> None:  # while the model check runs (plan_scoring)
        nonlocal started
        started = connect_ray(args.address)

    try:
        if args.s3_endpoint:
            # Ray workers get it through the job's runtime_env (provenance.runtime_env_vars).
            os.environ["AWS_ENDPOINT_URL"] = check_endpoint(args.s3_endpoint)
        options = ScoreOptions(
            batch_size=args.batch_size, concurrency=args.concurrency,
            gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
            decode_cpus=args.decode_cpus, model_threads=args.model_threads,
            predict_in=args.predict_in,
            max_pixels=args.max_pixels, max_file_bytes=args.max_file_bytes, limit=args.limit,
            formats=formats_for(args.out, args.format),
            progress_interval_s=0 if args.quiet else 5.0, endpoint=args.s3_endpoint)
        # Everything that can be wrong with the whole job is found here; Ray starts only
        # once SRC, OUT and MODEL's settings have passed, beside the model's load.
        plan = plan_scoring(args.src, args.model, args.out, options,
                            while_checking_model=start_ray)
    except (ScoringError, OutputError, StorageError) as error:
        print(f"cifar score: error: {error}", file=sys.stderr)
        if started:
            import ray

            ray.shutdown()
        return EXIT_BAD_INPUT
    if is_private(args.address):
        import ray

        try:
            check_room(options, ray.cluster_resources().get("CPU", 0.0))
            problem = options.predictor_place == "actors" and unfit(
                {"CPU": options.cpus_per_actor, "GPU": options.gpus_per_actor})
            if problem:  # it would wait for ever
                raise ScoringError(f"--cpus-per-actor {options.cpus_per_actor:g} "
                                   f"--gpus-per-actor {options.gpus_per_actor:g}: a predictor "
                                   f"actor {problem}")
        except ScoringError as error:
            print(f"cifar score: error: {error}", file=sys.stderr)
            if started:
                ray.shutdown()
            return EXIT_BAD_INPUT
    try:
        summary = execute(plan, log=lambda text: print(text, file=sys.stderr, flush=True))
    except Exception as error:
        if not unreachable(error):
            raise
        print(f"cifar score: error: the object store stopped answering "
              f"({' '.join(str(error).split())[:300]}). Nothing was replaced: OUT and its "
              "summary are as before. Run the same command again when the store is back.",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        if started:
            import ray

            ray.shutdown()
    print(f"cifar score: {summary.line()}", flush=True)
    if summary.labels and summary.labels.get("accuracy") is not None:
        print(f"cifar score: accuracy {summary.labels['accuracy']:.4f} on "
              f"{summary.labels['scored']} labelled files", flush=True)
    if summary.error_rate > args.max_error_rate:
        print(f"cifar score: error rate {summary.error_rate:.2%} is above --max-error-rate "
              f"{args.max_error_rate:.2%}; kinds: {summary.errors_by_kind}", file=sys.stderr)
        return EXIT_ERROR_RATE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(process_exit(main()))
