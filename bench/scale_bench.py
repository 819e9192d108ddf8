"""How the driver's cost grows with the sweep: planning, the resume scan and the report.

    python bench/scale_bench.py                       # 10, 100, 1,000, 10,000 records, local + moto
    python bench/scale_bench.py --sizes 10 100 --no-s3 --repeats 1     # a quick look

For each size N it writes a synthetic sweep of N trial records (a 20-epoch history, a test
evaluation with its confusion matrix: the size of a real record, ~10 kB), once in a local
folder and once in a bucket of a moto S3 server on 127.0.0.1, and times what a command does
with them:

- ``plan``: ``plan.plan_cells`` over a grid of N cells (validation and hashing);
- ``scan``: ``records.scan``, what ``cifar tune`` reads before it starts (re-submission and
  ``--resume``);
- ``report``: ``report.load_records`` + ``report.build_report`` (tables, markdown, HTML with
  figures), what ``cifar report`` does.

It counts the reads of trial records each step makes (local: file opens seen by an audit
hook; S3: GetObject calls seen by a botocore event hook), to show each record is read once per
command. Target: linear growth, <= 5 ms per record locally and <= 20 ms on moto.
Writes results/bench-scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from common import spread, write_results

from cifar_core import storage
from cifar_core.plan import SweepOptions, plan_cells
from cifar_core.records import COMPLETED, Cell, Outcome, make_record, scan
from cifar_core.report import build_report, load_records
from cifar_core.settings import CLASS_NAMES, Settings

OPENED: list[str] = []
GETS: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and OPENED and isinstance(args[0], str) and args[0].endswith(
            storage.RECORD_FILE):
        OPENED.append(args[0])


def synthetic_record(index: int):
    """A record shaped like a real M1 trial's (20 epochs, evaluation, provenance)."""
    settings = Settings.from_dict({"model": "M1", "data": "/data/cifar10",
                                   "learning_rate": 0.001 + index * 1e-6, "num_epochs": 20})
    history = [{"epoch": e, "phase": 1, "loss": 1.5 - e * 0.01, "accuracy": 0.4 + e * 0.005,
                "val_loss": 1.6 - e * 0.01, "val_accuracy": 0.4 + e * 0.004 + index * 1e-7,
                "learning_rate": 0.01, "epoch_time_s": 2.5, "best_val_accuracy": 0.5}
               for e in range(1, 21)]
    matrix = [[100 if i == j else 10 for j in range(10)] for i in range(10)]
    evaluation = {"test_accuracy": 0.5, "test_loss": 1.4, "test_images": 10000,
                  "accuracy": 0.5, "class_names": list(CLASS_NAMES), "confusion_matrix": matrix,
                  "per_class": {n: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 1000}
                                for n in CLASS_NAMES}}
    cell = Cell(settings, f"{index:012x}", sweep="scale", sweep_uri="", resources={"CPU": 1})
    provenance = {"git_commit": "0" * 40, "code_version": "abc", "created": "2026-12-01",
                  "machine": {"cpus": 2, "cpu_model": "synthetic", "gpus": []}}
    return make_record(cell, Outcome(COMPLETED, history, ["completed"], evaluation,
                                     checkpoint_uri="/nowhere/best",
                                     finished="2026-12-01T00:00:00+00:00"),
                       {"source": "/data/cifar10", "train": 45000, "val": 5000, "test": 10000},
                       provenance)


def write_sweep(root: str, count: int, endpoint: str | None) -> str:
    sweep = storage.join_uri(root, "scale")
    for index in range(count):
        record = synthetic_record(index)
        storage.write_text(storage.trial_uri(sweep, record.trial_id, storage.RECORD_FILE),
                           record.to_json(), endpoint)
    return sweep


def time_steps(root: str, count: int, endpoint: str | None, work: Path) -> dict:
    sweep = write_sweep(root, count, endpoint)
    grid = work / f"grid-{count}.json"
    grid.write_text(json.dumps({"M1": {"learning_rate": [0.001 + i * 1e-6
                                                         for i in range(count)]}}))
    options = SweepOptions(name="scale", storage=root, models=("M1",), grid=str(grid),
                           overrides={"data": "/data/cifar10", "num_epochs": 20})
    out = {}
    for step, run in (
            ("plan", lambda: plan_cells(options, "abc")),
            ("scan", lambda: scan(sweep, endpoint)),
            ("report", lambda: build_report(load_records([sweep], endpoint),
                                            work / f"report-{count}"))):
        OPENED[:], GETS[:] = ["armed"], []
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        out[step] = {"seconds": seconds, "ms_per_record": 1000 * seconds / count,
                     "record_reads": len(OPENED) - 1 + len(GETS)}
        OPENED.clear()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true", help="Local storage only.")
    args = parser.parse_args(argv)
    sys.addaudithook(_audit)
    kinds = {"local": None}
    server = None
    if not args.no_s3:
        from moto.server import ThreadedMotoServer

        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY",
                            "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(name, value)  # moto's: never a real account

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        kinds["moto S3"] = f"http://127.0.0.1:{port}"
        client = storage.s3_client(kinds["moto S3"])
        client.meta.events.register(
            "provide-client-params.s3.GetObject",
            lambda params, **_: GETS.append(params["Key"])
            if params["Key"].endswith(storage.RECORD_FILE) else None)
    results = {}
    try:
        for kind, endpoint in kinds.items():
            for count in args.sizes:
                runs = []
                for repeat in range(args.repeats):
                    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
                    if endpoint:
                        bucket = f"scale-{count}-{repeat}"
                        storage.s3_client(endpoint).create_bucket(Bucket=bucket)
                        root = f"s3://{bucket}/sweeps"
                    else:
                        root = str(work / "sweeps")
                    runs.append(time_steps(root, count, endpoint, work))
                    print(kind, count, repeat, {k: round(v["seconds"], 3)
                                                for k, v in runs[-1].items()}, flush=True)
                results[f"{kind}/{count}"] = {
                    step: {"seconds": spread([r[step]["seconds"] for r in runs]),
                           "ms_per_record": spread([r[step]["ms_per_record"] for r in runs]),
                           "record_reads": runs[0][step]["record_reads"]}
                    for step in runs[0]}
    finally:
        if server is not None:
            server.stop()
    write_results("bench-scale", {"sizes": args.sizes, "repeats": args.repeats,
                                  "results": results}, markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = ["| storage | records | step | median s | ms / record (median) | min–max s | "
             "record reads |", "|---|---|---|---|---|---|---|"]
    for key, steps in results.items():
        kind, count = key.split("/")
        for step, value in steps.items():
            s = value["seconds"]
            lines.append(f"| {kind} | {int(count):,} | {step} | {s['median']:.3f} | "
                         f"{value['ms_per_record']['median']:.2f} | {s['min']:.3f}–{s['max']:.3f}"
                         f" | {value['record_reads']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
