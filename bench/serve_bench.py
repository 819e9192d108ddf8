"""Online serving under load: requests/s and latency of `cifar serve`, batching on and off.

    python bench/serve_bench.py --data /path/to/cifar10/test        # M4 and an M7-shaped net

For each model (M4 as the notebook defines it; M7 at 96 px with a random MobileNetV2: the
same computation as the real M7, no ImageNet download) it serves a random-init checkpoint
with `cifar serve`'s own code on 127.0.0.1 (one replica, one CPU), and sends one 32x32 PNG
cut from the test images per request (`POST /predict`, raw bytes) from an asyncio client in
this process: --requests requests at concurrency 1, 8 and 32, once with dynamic batching
(max batch 32, 10 ms wait) and once without (max batch 1). It reports requests/s and
p50/p95/p99 latency, and for comparison `cifar score`'s images/s for the same model over
--requests copies of the same file, plus where a request's time goes at concurrency 1 (HTTP
round trip of `/healthz`, decoding the PNG, one image through the model).

Targets (issue 16): at concurrency 32 with batching >= 0.5x `cifar score`'s images/s and >=
3x no batching; M4's p99 at concurrency 1 under 50 ms. Client and server share the machine's
2 cores (said in the results). Writes results/bench-serve.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import add_data_argument, write_results

MODELS = {"M4": {}, "M7": {"backbone_weights": "none"}}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_checkpoint(model_id: str, folder: Path) -> Path:
    """A random-init checkpoint folder (model.keras + settings.json): the real architecture."""
    from cifar_core.models import build_model
    from cifar_core.settings import Settings

    settings = Settings.from_dict({"model": model_id, "data": "keras", **MODELS[model_id]})
    folder.mkdir(parents=True, exist_ok=True)
    build_model(settings).save(str(folder / "model.keras"), save_format="keras_v3")
    (folder / "settings.json").write_text(settings.to_json())
    return folder


async def load(url: str, body: bytes, requests: int, concurrency: int) -> dict:
    """Send ``requests`` POSTs, ``concurrency`` at a time; throughput and latency."""
    import aiohttp

    latencies: list[float] = []
    queue = iter(range(requests))
    failures = 0

    async def worker(session) -> None:
        nonlocal failures
        for _ in queue:
            start = time.perf_counter()
            async with session.post(url, data=body,
                                    headers={"Content-Type": "image/png"}) as response:
                await response.read()
                failures += response.status != 200
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def percentile(p: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"requests": requests, "concurrency": concurrency, "failures": failures,
            "requests_per_s": requests / wall, "p50_ms": percentile(0.50),
            "p95_ms": percentile(0.95), "p99_ms": percentile(0.99)}


def breakdown(url: str, png: bytes, checkpoint: Path) -> dict:
    """Milliseconds of one request's parts at concurrency 1: HTTP, decode, the model."""
    import urllib.request

    import numpy as np

    from cifar_core.images import decode_image
    from cifar_core.models import load_checkpoint_model
    from cifar_core.scoring import make_predict_function
    from cifar_core.settings import Settings

    def median_ms(run, repeats: int = 200) -> float:
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)

    settings = Settings.from_json((checkpoint / "settings.json").read_text())
    predict = make_predict_function(load_checkpoint_model(checkpoint / "model.keras",
                                                          compile=False), settings.input_size)
    image = decode_image(png)[None]
    return {"http_round_trip_ms": median_ms(lambda: urllib.request.urlopen(
                f"{url}/healthz", timeout=30).read()),
            "decode_ms": median_ms(lambda: decode_image(png)),
            "model_one_image_ms": median_ms(lambda: predict(np.ascontiguousarray(image)), 50)}


def score_rate(checkpoint: Path, png: bytes, count: int, work: Path) -> float:
    """`cifar score`'s images/s over ``count`` copies of the request's PNG."""
    import json

    from jobs.score import main

    folder = work / "copies"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"{index:05d}.png").write_bytes(png)
    assert main([str(folder), "--model", str(checkpoint), "--out", str(work / "s.csv"),
                 "--quiet"]) == 0
    return json.loads((work / "s.summary.json").read_text())["images_per_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser, "the CIFAR-10 test images (a folder of .jpg files, searched "
                      "recursively)", under="test")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--models", default="M4,M7")
    args = parser.parse_args(argv)
    from ray import serve

    from cifar_core.images import decode_image, encode_png
    from cifar_core.ray_glue import connect_ray
    from cifar_core.serving import build
    from jobs.serve import start

    first = next(Path(args.data).rglob("*.jpg"))
    png = encode_png(decode_image(first.read_bytes()))  # one real 32x32 image, as PNG
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    connect_ray()
    results = {}
    try:
        for model in args.models.split(","):
            checkpoint = make_checkpoint(model, work / model)
            requests = args.requests if model == "M4" else max(200, args.requests // 4)
            entry = {"requests": requests, "cifar_score_images_per_s": score_rate(
                checkpoint, png, requests, work / f"{model}-score")}
            for label, batch in (("batching", 32), ("no batching", 1)):
                url = start(build(str(checkpoint), max_batch_size=batch, batch_wait_ms=10),
                            "127.0.0.1", free_port(), None)
                asyncio.run(load(f"{url}/predict", png, 50, 8))  # warm up
                entry[label] = [asyncio.run(load(f"{url}/predict", png, requests, c))
                                for c in (1, 8, 32)]
                if batch > 1:
                    entry["where_the_time_goes"] = breakdown(url, png, checkpoint)
                serve.shutdown()
                print(model, label, [round(r["requests_per_s"]) for r in entry[label]],
                      flush=True)
            results[model] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results("bench-serve", {"results": results}, markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = ["| model | batching | concurrency | requests/s | p50 ms | p95 ms | p99 ms |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for model, entry in results.items():
        for label in ("batching", "no batching"):
            for r in entry[label]:
                lines.append(f"| {model} | {label} | {r['concurrency']} | "
                             f"{r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
                             f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} |")
        on, off = entry["batching"][-1], entry["no batching"][-1]
        score = entry["cifar_score_images_per_s"]
        parts = entry["where_the_time_goes"]
        notes.append(
            f"- {model}: at concurrency 32 with batching {on['requests_per_s']:.0f} requests/s"
            f" = {on['requests_per_s'] / score:.2f}x `cifar score`'s {score:.0f} images/s "
            f"(target >= 0.5x) and {on['requests_per_s'] / off['requests_per_s']:.1f}x no "
            f"batching (target >= 3x); p99 at concurrency 1 {entry['batching'][0]['p99_ms']:.1f}"
            f" ms. One request at concurrency 1: HTTP round trip {parts['http_round_trip_ms']:.1f}"
            f" ms, PNG decode {parts['decode_ms']:.2f} ms, one image through the model "
            f"{parts['model_one_image_ms']:.1f} ms; the rest is Serve's routing and batching.")
    return "\n".join(["# cifar serve under load (one replica, 1 CPU; client on the same 2 "
                      "cores)", "", *lines, "", *notes])


if __name__ == "__main__":
    sys.exit(main())
