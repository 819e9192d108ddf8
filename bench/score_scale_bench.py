"""Benchmark: does ``cifar score`` stay linear in time and flat in memory as SRC grows?

    python bench/score_scale_bench.py --data DIR/test                  # 10k, 100k, 1M local;
                                                                       # 10k, 100k on moto S3
    python bench/score_scale_bench.py --data DIR/test --sizes 10000 --s3-sizes ""   # a look

For each size N the benchmark makes a synthetic folder of N small JPEG files by re-encoding
the shared CIFAR-10 test images (quality varied, so no two files are byte-equal; in CIFAR-10
class folders of 1,000 files a subfolder; never committed), or uploads it to a moto S3 server
on 127.0.0.1 started here, then runs the real job in a fresh process:

    python -m jobs.score SRC --model CKPT --out OUT.parquet --quiet

with an M1 checkpoint (random init: the data path, not the model, sets the pace), sampling
every process of the job's tree with psutil every 0.5 s: wall time per file, and the peak
resident memory of the driver, of the largest Ray worker and of all workers together.
The target: time grows linearly with N, and peak memory stays within 1.5x between the
smallest and largest N. Writes results/bench-score-scale.{json,md} with provenance.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from common import REPO, add_data_argument, add_render_arguments, render_only, require_data
from score_bench import make_checkpoint, process_kind

FILES_PER_FOLDER = 1000


def make_folder(source: str, count: int, target: Path) -> float:
    """``count`` re-encoded JPEGs under ``target/<class>/<chunk>/``; returns seconds taken."""
    from PIL import Image

    start = time.perf_counter()
    originals = sorted(Path(source).rglob("*.jpg"))
    images = [(p.parent.name, np.asarray(Image.open(p).convert("RGB"))) for p in originals]
    for index in range(count):
        label, pixels = images[index % len(images)]
        folder = target / label / f"{index // FILES_PER_FOLDER:05d}"
        if index % FILES_PER_FOLDER == 0 or not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=80 + index % 16)
        (folder / f"{index:07d}.jpg").write_bytes(buffer.getvalue())
    return time.perf_counter() - start


def upload(folder: Path, uri: str, endpoint: str) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from cifar_core import storage

    start = time.perf_counter()
    client = storage.s3_client(endpoint)
    bucket, prefix = storage.split_s3(uri)
    files = [p for p in folder.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.upload_file(
            str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}"), files))
    return time.perf_counter() - start


def run_job(src: str, checkpoint: Path, out: Path, env: dict) -> dict:
    """The job in a fresh process; wall time and per-kind peak RSS of its process tree."""
    command = [sys.executable, "-m", "jobs.score", src, "--model", str(checkpoint),
               "--out", str(out), "--quiet", "--max-error-rate", "0"]
    peak: dict[int, int] = {}
    kinds: dict[int, str] = {}
    titles: dict[int, str] = {}  # what a worker was doing at its peak (Ray retitles them)
    pss_peak: dict[int, int] = {}
    worker_total = worker_pss_total = 0
    done = threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)

    def sample() -> None:
        nonlocal worker_total, worker_pss_total
        while not done.wait(0.5):
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = pss_total = 0
            for child in tree:
                try:
                    # PSS splits shared pages (Ray's object store is shared memory, mapped by
                    # every worker that touches a block) among the processes mapping them, so
                    # a sum of PSS counts each page once; a sum of RSS counts it per process.
                    memory = child.memory_full_info()
                    rss, pss = memory.rss, memory.pss
                    kind = process_kind(child, root.pid) or kinds.get(child.pid, "")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if rss > peak.get(child.pid, 0):
                    peak[child.pid] = rss
                    titles[child.pid] = worker_title(child) or titles.get(child.pid, "")
                pss_peak[child.pid] = max(pss_peak.get(child.pid, 0), pss)
                if kind:
                    kinds[child.pid] = kind
                if kinds.get(child.pid) not in ("driver", "ray daemons"):
                    total += rss
                    pss_total += pss
            worker_total = max(worker_total, total)
            worker_pss_total = max(worker_pss_total, pss_total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"cifar score failed ({process.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    workers = [rss for pid, rss in peak.items()
               if kinds.get(pid) not in ("driver", "ray daemons")]
    return {"files": summary["files"], "ok": summary["ok"], "wall_s": round(wall, 2),
            "ms_per_file": round(1000 * wall / summary["files"], 4),
            "pipeline_s": summary["pipeline_s"], "first_row_s": summary["first_row_s"],
            "driver_peak_rss_mb": round(peak.get(root.pid, 0) / 2**20, 1),
            "largest_worker_peak_rss_mb": round(max(workers, default=0) / 2**20, 1),
            "workers_peak_total_rss_mb": round(worker_total / 2**20, 1),
            "driver_peak_pss_mb": round(pss_peak.get(root.pid, 0) / 2**20, 1),
            "workers_peak_total_pss_mb": round(worker_pss_total / 2**20, 1),
            "largest_workers": [
                {"title": titles.get(pid, ""), "peak_rss_mb": round(peak[pid] / 2**20, 1),
                 "peak_pss_mb": round(pss_peak.get(pid, 0) / 2**20, 1)}
                for pid in sorted(peak, key=peak.get, reverse=True)
                if kinds.get(pid) not in ("driver", "ray daemons")][:6],
            "stage_s": summary["stage_s"]}


def worker_title(process: psutil.Process) -> str:
    """A Ray worker's title (``ray::ReadListFiles``, ``ray::_StatsActor``, ``ray::IDLE``)."""
    try:
        words = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""
    return words[0][:60] if words and words[0].startswith("ray::") else ""


def _mb(run: dict, key: str) -> str:
    return f"{run[key]:.0f}" if key in run else "-"  # runs from before PSS was sampled


def markdown(report: dict) -> str:
    prov, machine = report["provenance"], report["provenance"]["machine"]
    lines = [
        "# Batch scoring at scale (`bench/score_scale_bench.py`)", "",
        f"Synthetic folders of N re-encoded CIFAR-10 test JPEGs (made from `{report['data']}`"
        f", not committed), scored by `cifar score` with a random-init M1 checkpoint. Machine: "
        f"{machine['cpus']} CPUs ({machine['cpu_model']}), no GPU; load average "
        f"{report['load_min']:.1f}-{report['load_max']:.1f} during the runs. Commit "
        f"`{prov['git_commit']}`, {prov['created']}. One run per size (a run of 1M files "
        "takes minutes; repeats are left to a machine with time). Memory: peak resident set "
        "sampled every 0.5 s. Command: " f"`{report['command']}`.", "",
        "| source | files | wall, s | ms per file | first row, s | driver peak RSS, MB | "
        "largest worker peak RSS, MB | all workers peak RSS, MB | driver peak PSS, MB | "
        "all workers peak PSS, MB |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['source']} | {run['files']:,} | {run['wall_s']:.1f} | "
                     f"{run['ms_per_file']:.3f} | {run['first_row_s']:.1f} | "
                     f"{run['driver_peak_rss_mb']:.0f} | {run['largest_worker_peak_rss_mb']:.0f}"
                     f" | {run['workers_peak_total_rss_mb']:.0f} | "
                     f"{_mb(run, 'driver_peak_pss_mb')} | {_mb(run, 'workers_peak_total_pss_mb')} |")
    ranked = [run for run in report["runs"] if run.get("largest_workers")]
    if ranked:
        lines += ["", "The largest Ray workers, each with its title at its peak (what it was "
                  "running then: Ray retitles a worker per task), MB:", "",
                  "| source | files | workers, largest first |", "|---|---|---|"]
        lines += [f"| {run['source']} | {run['files']:,} | " + ", ".join(
            f"{w['title'] or '?'} {w['peak_rss_mb']:.0f} (PSS {w['peak_pss_mb']:.0f})"
            for w in run["largest_workers"])
            + " |" for run in ranked]
    lines += ["", "Raw numbers: `bench-score-scale.json`.", ""]
    if report.get("notes"):
        lines += [report["notes"], ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser, "Folder of the CIFAR-10 (JPEG) test images", required=False,
                      under="test")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--s3-sizes", default="10000,100000")
    parser.add_argument("--work", default=None, help="Scratch folder (default: a temp dir).")
    parser.add_argument("--out", default=str(REPO / "results" / "bench-score-scale"))
    add_render_arguments(parser)
    args = parser.parse_args()
    if render_only(args, markdown):
        return 0
    require_data(parser, args)

    from moto.server import ThreadedMotoServer

    from cifar_core.provenance import provenance

    started = provenance()
    work = Path(args.work or tempfile.mkdtemp(prefix="score-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint("M1", work / "ckpt-M1", args.data)
    sizes = [int(n) for n in args.sizes.split(",") if n]
    s3_sizes = [int(n) for n in args.s3_sizes.split(",") if n]
    runs, loads = [], []
    server = endpoint = None
    env = {**os.environ, "RAY_ADDRESS": ""}
    try:
        for count in sorted(set(sizes) | set(s3_sizes)):
            folder = work / f"files-{count}"
            if not (folder / ".complete").exists():
                shutil.rmtree(folder, ignore_errors=True)
                made = make_folder(args.data, count, folder)
                (folder / ".complete").touch()
                print(f"made {count} files in {made:.0f} s", flush=True)
            (folder / ".complete").unlink()  # not a file to score
            try:
                if count in sizes:
                    loads.append(os.getloadavg()[0])
                    run = run_job(str(folder), checkpoint, work / "out.parquet", env)
                    runs.append({"source": "local folder", **run})
                    print(json.dumps(runs[-1]), flush=True)
                if count in s3_sizes:
                    if server is None:
                        import socket

                        with socket.socket() as probe:
                            probe.bind(("127.0.0.1", 0))
                            port = probe.getsockname()[1]
                        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
                        server.start()
                        endpoint = f"http://127.0.0.1:{port}"
                        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                                   AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
                        os.environ.update({k: env[k] for k in (
                            "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                            "AWS_DEFAULT_REGION")})
                        from cifar_core import storage

                        storage.s3_client(endpoint).create_bucket(Bucket="bench")
                    uri = f"s3://bench/files-{count}"
                    uploaded = upload(folder, uri, endpoint)
                    print(f"uploaded {count} files in {uploaded:.0f} s", flush=True)
                    loads.append(os.getloadavg()[0])
                    run = run_job(uri, checkpoint, work / "out.parquet", env)
                    runs.append({"source": "moto S3 (127.0.0.1)", **run})
                    print(json.dumps(runs[-1]), flush=True)
            finally:
                (folder / ".complete").touch()
    finally:
        if server is not None:
            server.stop()
    report = {"benchmark": "batch scoring at scale, issue 19", "data": args.data,
              "load_min": min(loads), "load_max": max(loads),
              "command": " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
              "runs": runs, "notes": args.notes, "provenance": started}
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
