"""Multi-worker fine-tuning on Ray Train: ``cifar finetune`` / ``python -m jobs.finetune``.

    cifar finetune --smoke-test --data DATA     # 2 CPU workers, tiny M7, ~2 min on 2 cores
    cifar finetune --data s3://bucket/cifar10 --storage s3://bucket/runs --name m7-4gpu \\
        --num-workers 4 --use-gpu --precision mixed_float16  # M7's seed schedule on 4 GPUs
    cifar finetune --name m7-4gpu --storage s3://bucket/runs --resume ...  # after a lost node
    ray job submit --working-dir . -- python -m jobs.finetune --use-gpu --num-workers 8 ...

Trains ``--model`` (default M7: frozen MobileNetV2 backbone, then its last 50 layers at the lower
rate) with ``--num-workers`` Ray Train workers under MultiWorkerMirroredStrategy. Every
settings field is a flag; ``--batch-size`` is the *global* batch (split over the workers, so the
seed's 64 keeps the seed's learning rates); ``--scale-learning-rate linear|sqrt`` rescales both
phases' rates for a larger global batch. ``--backbone-weights`` takes ``imagenet`` (Keras
download), a file every node can read, an ``s3://`` URI (air-gapped clusters: pre-stage the
``.h5`` there) or ``none``.

``--tracking tensorboard`` writes each epoch's metrics (and the HParams at the end) to
``STORAGE/NAME/tensorboard/``; ``--tracking mlflow`` logs an MLflow run (parent: NAME, child: the
trial id), by default into ``STORAGE/NAME/mlflow.db`` (docs/tracking.md).

Output: Ray Train's checkpoints in ``STORAGE/NAME/`` (one per epoch, the newest
``--keep-checkpoints`` kept); at the end ``STORAGE/NAME/trials/<trial_id>/`` with ``trial.json``,
``metrics.jsonl`` and ``best/`` (the checkpoint ``cifar score`` reads). A worker that dies is
replaced and the run continues from the last epoch's checkpoint (``--max-failures`` times); a
run whose driver died is continued by launching it again with the same ``--name``,
``--storage`` and ``--resume``. Runs on the cluster named by ``--address``/``RAY_ADDRESS``,
otherwise on a private local Ray. Exit codes: 2 invalid options/settings/data (nothing
started), 1 the run failed after its restarts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
from cifar_core.data import DataError
from cifar_core.ladder import smoke_settings
from cifar_core.multiworker import LR_RULES, FinetuneError, FinetuneOptions, run_finetune
from cifar_core.plan import TRACKERS
from cifar_core.settings import SettingsError, add_settings_arguments, settings_from_args
from cifar_core.storage import StorageError, check_endpoint
from jobs import add_log_level, configure_logging, process_exit

DEFAULT_STORAGE = str(Path("results") / "runs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--num-workers", type=int, default=2, help="Ray Train workers.")
    run.add_argument("--use-gpu", action="store_true", help="One GPU per worker.")
    run.add_argument("--cpus-per-worker", type=float, default=1.0)
    run.add_argument("--gpus-per-worker", type=float, default=None,
                     help="GPUs per worker (default 1 with --use-gpu); k > 1 mirrors over k.")
    run.add_argument("--storage", default=DEFAULT_STORAGE,
                     help="Local folder or s3://bucket/prefix every node can reach "
                          "(default: results/runs).")
    run.add_argument("--name", default=None, help="Run name (default: finetune-<model>).")
    run.add_argument("--resume", action="store_true",
                     help="Continue the run STORAGE/NAME from its last checkpoint.")
    run.add_argument("--init-from", default=None,
                     help="Start from this checkpoint folder (local or s3://), e.g. a tune "
                          "trial's best/: its weights and its recorded phase and epoch.")
    run.add_argument("--max-failures", type=int, default=2,
                     help="Restarts after a worker dies (-1: unlimited; 0: fail at once).")
    run.add_argument("--keep-checkpoints", type=int, default=2,
                     help="Reported checkpoints kept in storage, newest first.")
    run.add_argument("--scale-learning-rate", choices=LR_RULES, default="none",
                     help="Rescale both phases' rates for the global batch vs the seed's: "
                          "none (default), linear (SGD) or sqrt (Adam).")
    run.add_argument("--scratch-dir", default=None,
                     help="Worker-local folder for per-worker checkpoints (default: temp).")
    run.add_argument("--tracking", choices=TRACKERS, default="none",
                     help="Experiment tracking: TensorBoard event files in STORAGE/NAME/"
                          "tensorboard/ or MLflow runs (needs the [tracking] extra).")
    run.add_argument("--mlflow-tracking-uri", default=None,
                     help="An MLflow tracking server (default with --tracking mlflow: a local "
                          "store in STORAGE/NAME/mlflow.db).")
    run.add_argument("--address", default=None, help="Ray cluster address (or RAY_ADDRESS).")
    run.add_argument("--s3-endpoint", default=None,
                     help="Endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL).")
    run.add_argument("--smoke-test", action="store_true",
                     help="Tiny M7 (ladder.py's smoke settings), 2 CPU workers; plumbing only: "
                          "a random backbone stays near chance.")
    add_log_level(run)
    add_settings_arguments(parser.add_argument_group("settings"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if args.model is None:
        args.model = "M7"
    if args.smoke_test:
        for name, value in smoke_settings(args.model).items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)
    name = args.name or f"finetune-{args.model.lower()}" + (
        time.strftime("-smoke-%Y%m%d-%H%M%S") if args.smoke_test else "")
    try:
        if args.s3_endpoint:
            # Workers get it through the job's runtime_env (provenance.runtime_env_vars).
            os.environ["AWS_ENDPOINT_URL"] = check_endpoint(args.s3_endpoint)
        settings = settings_from_args(args)
        options = FinetuneOptions(
            storage=args.storage, name=name, num_workers=args.num_workers,
            use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker, max_failures=args.max_failures,
            resume=args.resume, init_from=args.init_from,
            scale_learning_rate=args.scale_learning_rate,
            keep_checkpoints=args.keep_checkpoints, scratch_dir=args.scratch_dir,
            tracking=args.tracking, mlflow_tracking_uri=args.mlflow_tracking_uri)
        print(f"cifar finetune: {settings.model} with {options.num_workers} workers "
              f"(global batch {settings.batch_size}) into {options.run_uri}", flush=True)
        result = run_finetune(settings, options, address=args.address)
    except (SettingsError, DataError, StorageError) as error:
        print(f"cifar finetune: error: {error}", file=sys.stderr)
        return 2
    except FinetuneError as error:
        print(f"cifar finetune: error: {error}", file=sys.stderr)
        return 1 if error.__cause__ is not None else 2
    record = result.record
    print(f"cifar finetune: best val_accuracy {record.best_val_accuracy:.4f} (epoch "
          f"{record.best_epoch} of {record.epochs_run}), test_accuracy "
          f"{record.test_accuracy:.4f}; model in {result.best_uri}, record in "
          f"{result.trial_uri}")
    if options.tracking != "none":
        from cifar_core.tracking import describe, finetune_options

        print("cifar finetune: " + describe(finetune_options(
            options.tracking, options.name, options.storage, settings.model,
            options.mlflow_tracking_uri)))
    return 0


if __name__ == "__main__":
    sys.exit(process_exit(main()))
