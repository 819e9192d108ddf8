"""Results report of sweeps and fine-tune runs: ``cifar report`` / ``python -m jobs.report``.

    cifar report --runs /data/sweeps --out results/
    cifar report --runs s3://bucket/sweeps --out /tmp/report --publish s3://bucket/published
    cifar report --runs runs/m1-seed --runs runs/sweeps --gpu-hour-price 1.2 --out results/
    cifar report --runs runs/sweeps --scores scores/test.summary.json --out results/

Reads every ``trial.json`` below each ``--runs`` location (local or s3://; also plain
``cifar train`` run folders) and writes into ``--out``: ``trials.parquet`` (one row per trial),
``leaderboard.csv`` (one row per model family), ``report.md`` and a self-contained
``report.html`` with figures. Takes seconds for hundreds of trials. ``--publish`` then uploads
the report, every trial's metrics and each family's best checkpoint, verified by checksum, and
writes ``manifest.json`` last (see cifar_core/publish.py). ``--smoke-test`` first makes a
tiny sweep (``cifar tune --smoke-test --models M1,M2`` on ``--data``, local Ray, about 1-2 min)
in a temporary folder and reports on that. ``--scores`` adds a batch-scoring section from the
``OUT.summary.json`` files ``cifar score`` wrote (accuracy, images/s). Exit code 2: no runs found or bad input; 1: the
publish failed (re-run to complete it).
"""

from __future__ import annotations

import argparse
import sys

import cifar_core  # noqa: F401  (selects tf_keras before anything can load TensorFlow)
from cifar_core.report import (DEFAULT_CPU_HOUR_PRICE, DEFAULT_GPU_HOUR_PRICE, ReportError,
                               build_report, load_records, load_score_summaries)
from cifar_core.storage import StorageError
from jobs import add_log_level, configure_logging, process_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", action="append", default=[], metavar="STORAGE",
                        help="Sweep storage or run folder (local or s3://); repeatable.")
    parser.add_argument("--smoke-test", action="store_true",
                        help="Report on a tiny M1+M2 smoke sweep made first in a temp folder.")
    parser.add_argument("--data", help="--smoke-test only: CIFAR-10 source for the sweep "
                                       "(default: CIFAR10_DATA).")
    parser.add_argument("--out", default="results", help="Output folder (default: results).")
    parser.add_argument("--publish", metavar="S3_URI",
                        help="Also publish to s3://bucket/prefix (manifest.json written last).")
    parser.add_argument("--gpu-hour-price", type=float, default=DEFAULT_GPU_HOUR_PRICE,
                        help="USD per GPU-hour (default %(default).3f: AWS g5.xlarge on-demand, "
                             "us-east-1, less its vCPUs).")
    parser.add_argument("--cpu-hour-price", type=float, default=DEFAULT_CPU_HOUR_PRICE,
                        help="USD per CPU-hour (default %(default).3f: AWS m5 on-demand per "
                             "vCPU, us-east-1).")
    parser.add_argument("--data-label", help="Name of the data for the report, e.g. "
                                             "'CIFAR-10 (JPEG)' (default: from the records).")
    parser.add_argument("--scores", action="append", default=[], metavar="SUMMARY_JSON",
                        help="A cifar score OUT.summary.json (local or s3://) to report; "
                             "repeatable.")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: "
                                              "AWS_ENDPOINT_URL or AWS).")
    add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if not args.runs and not args.smoke_test:
        parser.error("--runs STORAGE is required (or --smoke-test)")
    if args.smoke_test:
        from cifar_core.data import DataError
        from cifar_core.plan import SweepError
        from cifar_core.settings import SettingsError

        try:
            args.runs.append(smoke_sweep(args.data))
        except (DataError, SettingsError, SweepError) as error:
            print(f"cifar report: error: smoke sweep: {error}", file=sys.stderr)
            return 2
    try:
        if args.publish:  # a bad destination is bad input: say so before any work
            from cifar_core.publish import PublishError, check_destination

            try:
                check_destination(args.publish)
            except (PublishError, StorageError) as error:
                raise ReportError(str(error)) from error
        scores = load_score_summaries(args.scores, args.s3_endpoint)
        records = load_records(args.runs, args.s3_endpoint)
        report = build_report(records, args.out, gpu_hour_price=args.gpu_hour_price,
                              cpu_hour_price=args.cpu_hour_price, data_label=args.data_label,
                              scores=scores)
    except (ReportError, StorageError, OSError) as error:
        print(f"cifar report: error: {error}", file=sys.stderr)
        return 2
    board = report.leaderboard.dropna(subset=["test_accuracy"])
    if not board.empty:
        top = board.iloc[0]
        print(f"cifar report: {len(records)} trials; best {top['family']} test_accuracy "
              f"{top['test_accuracy']:.4f} (val {top['best_val_accuracy']:.4f})")
    print(f"cifar report: wrote {', '.join(sorted(report.files))} to {args.out}")
    if args.publish:
        from cifar_core.publish import PublishError, publish_report

        try:
            result = publish_report(report, args.publish, endpoint=args.s3_endpoint)
        except PublishError as error:
            print(f"cifar report: error: {error}", file=sys.stderr)
            return 1
        print(f"cifar report: published {len(result.manifest['objects'])} objects and "
              f"{args.publish.rstrip('/')}/manifest.json (written last; "
              f"{len(result.uploaded)} PUTs, {len(result.already_present)} already there "
              "with matching checksums)")
    return 0


def smoke_sweep(data: str | None) -> str:
    """Run the tune job's smoke sweep (M1, M2) into a temporary folder; return the storage."""
    import tempfile

    from cifar_core.plan import SweepOptions
    from cifar_core.sweep import run_sweep

    storage = tempfile.mkdtemp(prefix="cifar-report-smoke-")
    overrides = {"data": data} if data else {}
    run_sweep(SweepOptions(name="smoke", storage=storage, models=("M1", "M2"), grid="seed",
                           overrides=overrides, smoke_test=True))
    return storage


if __name__ == "__main__":
    sys.exit(process_exit(main()))
