"""The main job: Ray Tune fans the model ladder and its grids out as parallel trials.

    cifar tune --smoke-test --data DATA                      # every model, 300 images, 1 epoch
    cifar tune --grid seed --models M1,M2,M4 --data DATA     # the notebook's settings
    cifar tune --grid default --scheduler asha --use-gpu \\
        --storage s3://my-bucket/cifar-fleet --name ladder   # on a GPU cluster
    ray job submit --working-dir . -- python -m jobs.tune --grid default --use-gpu ...

Runs on the cluster named by ``--address`` or ``RAY_ADDRESS`` (set by ``ray job submit``),
otherwise on a private local Ray. Results: ``STORAGE/NAME/trials/<trial_id>/trial.json`` and
``best/`` per trial (read them with ``cifar report --runs STORAGE``). Re-submitting the same
``--name`` into the same ``--storage`` runs only the cells not yet finished; ``--resume``
continues an interrupted sweep's unfinished trials from their checkpoints.
Expect: the smoke test takes about 2 minutes on 2 CPU cores. Exit code 2: invalid options or
grid (nothing started); 1: some trials errored after their retries; 130: interrupted (Ctrl-C),
continue with --resume.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
from cifar_core.data import DataError
from cifar_core.ladder import LADDER, MODEL_IDS
from cifar_core.plan import SweepError, SweepOptions, check_resources
from cifar_core.settings import SettingsError, add_settings_arguments
from cifar_core.storage import StorageError, unreachable
from jobs import add_log_level, configure_logging, process_exit

DEFAULT_STORAGE = str(Path("results") / "runs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    job = parser.add_argument_group("sweep")
    job.add_argument("--models", default=",".join(MODEL_IDS),
                     help=f"Comma-separated model ids (default: all {len(MODEL_IDS)}).")
    job.add_argument("--grid", default="default",
                     help="'seed' (the notebook's settings, one trial per model), 'default' "
                          "(a grid around them) or a JSON file {model: {field: [values]}}.")
    job.add_argument("--search", choices=("grid", "random", "optuna"), default="grid",
                     help="grid: lists crossed, ranges drawn --num-samples times per point; "
                          "random: --num-samples points per model, every field drawn; optuna: "
                          "Optuna (TPE) proposes --num-samples points per model from the "
                          "results so far (needs the [search] extra).")
    job.add_argument("--search-seed", type=int, default=0,
                     help="Seed of the random draws and of Optuna's sampler.")
    job.add_argument("--search-startup", type=int, default=10,
                     help="optuna: points drawn at random before TPE models the results "
                          "(Optuna's default 10; fewer for small --num-samples).")
    job.add_argument("--num-samples", type=int, default=1,
                     help="grid: draws per grid point of the ranges; random, optuna: trials "
                          "per model.")
    job.add_argument("--seeds", type=int, default=1, help="Repeat every cell with K seeds.")
    job.add_argument("--epochs-scale", type=float, default=1.0,
                     help="Multiply every model's epochs (e.g. 0.1 for a quick look).")
    job.add_argument("--scheduler", choices=("none", "asha"), default="none")
    job.add_argument("--grace-period", type=int, default=1,
                     help="ASHA: epochs every trial runs before its first cut.")
    job.add_argument("--reduction-factor", type=int, default=4,
                     help="ASHA: keep the best 1/N of trials at each rung.")
    job.add_argument("--max-concurrent", type=int, default=None,
                     help="At most this many trials at once (default: as resources allow).")
    job.add_argument("--use-gpu", action="store_true",
                     help="Give trials GPU fractions (" + ", ".join(
                         f"{m}: {r.gpu_resources['GPU']:g}" for m, r in LADDER.items()) + ").")
    job.add_argument("--resources", action="append", default=[], metavar="MODEL=CPU,GPU",
                     help="Per-model resources per trial, e.g. M7=8,1 or M1=1,0.25 "
                          "(repeatable).")
    job.add_argument("--m7-workers", type=int, default=1,
                     help="Run each M7 trial as a Ray Train run of N workers (one GPU each "
                          "with --use-gpu), MultiWorkerMirroredStrategy.")
    job.add_argument("--max-failures", type=int, default=1,
                     help="Retries per trial after a crash, from its last checkpoint.")
    job.add_argument("--storage", default=DEFAULT_STORAGE,
                     help="Local folder or s3://bucket/prefix (default: results/runs).")
    job.add_argument("--s3-endpoint", default=None,
                     help="Endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL).")
    job.add_argument("--name", default=None, help="Sweep name (default: ladder, or smoke).")
    job.add_argument("--resume", action="store_true",
                     help="Continue an interrupted sweep of this name from its checkpoints.")
    job.add_argument("--address", default=None, help="Ray cluster address (or RAY_ADDRESS).")
    job.add_argument("--smoke-test", action="store_true",
                     help="Every model, 300 images, 1 epoch, small inputs (ladder.py).")
    job.add_argument("--tracking", choices=("none", "tensorboard", "mlflow"), default="none",
                     help="Experiment tracking: TensorBoard event files or MLflow runs, under "
                          "the sweep's storage (needs the [tracking] extra).")
    job.add_argument("--mlflow-tracking-uri", default=None,
                     help="An MLflow tracking server (default with --tracking mlflow: a local "
                          "store inside the sweep's storage).")
    job.add_argument("--verbose", action="store_true",
                     help="Also Ray Tune's trial tables and the trials' own output.")
    add_log_level(job)
    settings = parser.add_argument_group("settings applied to every trial")
    add_settings_arguments(settings, skip=("model",))
    return parser


def parse_resources(specs: list[str]) -> dict[str, dict[str, float]]:
    resources = {}
    for spec in specs:
        try:
            model, values = spec.split("=", 1)
            cpu, gpu = (float(v) for v in values.split(","))
        except ValueError:
            raise SweepError(f"--resources {spec!r}: expected MODEL=CPU,GPU, e.g. M7=8,1")
        if model not in LADDER:
            raise SweepError(f"--resources {spec!r}: unknown model; valid: {list(MODEL_IDS)}")
        check_resources({"CPU": cpu, "GPU": gpu}, f"--resources {spec!r}")
        resources[model] = {"CPU": cpu, "GPU": gpu}
    return resources


def options_from_args(args: argparse.Namespace) -> SweepOptions:
    from cifar_core.settings import Settings

    overrides = {k: v for k, v in vars(args).items()
                 if k in Settings.field_names() and v is not None}
    return SweepOptions(
        name=args.name or ("smoke" if args.smoke_test else "ladder"), storage=args.storage,
        models=tuple(m.strip() for m in args.models.split(",")), grid=args.grid,
        overrides=overrides, seeds=args.seeds, num_samples=args.num_samples,
        epochs_scale=args.epochs_scale, scheduler=args.scheduler,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent, use_gpu=args.use_gpu,
        resources=parse_resources(args.resources), max_failures=args.max_failures,
        m7_workers=args.m7_workers, resume=args.resume, s3_endpoint=args.s3_endpoint,
        smoke_test=args.smoke_test, verbose=args.verbose, tracking=args.tracking,
        search=args.search, search_seed=args.search_seed, search_startup=args.search_startup,
        mlflow_tracking_uri=args.mlflow_tracking_uri)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, quiet_ray=not args.verbose)
    if args.smoke_test and args.grid == "default":
        args.grid = "seed"  # one trial per model
    try:
        options = options_from_args(args)
        if options.s3_endpoint:
            # Ray workers get it through the job's runtime_env (provenance.runtime_env_vars).
            os.environ["AWS_ENDPOINT_URL"] = options.s3_endpoint
        from cifar_core.sweep import run_sweep

        board = run_sweep(options, address=args.address)
    except Exception as error:
        if unreachable(error):
            print(f"cifar tune: error: the sweep's storage stopped answering "
                  f"({' '.join(str(error).split())[:300]}). Finished trials keep their "
                  "records; run the same command with --resume when the store is back to "
                  "continue the others from their checkpoints.", file=sys.stderr)
            return 1
        if not isinstance(error, (SettingsError, SweepError, DataError, StorageError)):
            raise
        print(f"cifar tune: error: {error}", file=sys.stderr)
        return 2
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(board.to_string(index=False) if not board.empty else "(no trials)")
    print(f"cifar tune: {len(board)} trials; results in {options.sweep_uri} "
          f"(cifar report --runs {options.storage})")
    from cifar_core.tracking import describe

    if describe(options):
        print(f"cifar tune: {describe(options)}")
    if board.attrs.get("interrupted"):
        return 130  # the shell's code for Ctrl-C: not finished, resumable
    errored = int((board["status"] == "errored").sum()) if not board.empty else 0
    return 1 if errored else 0


if __name__ == "__main__":
    sys.exit(process_exit(main()))
