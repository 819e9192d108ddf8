"""Online classification on Ray Serve: ``cifar serve --model MODEL`` / ``python -m jobs.serve``.

    cifar serve --model results/runs                    # the report's winner, on 127.0.0.1:8000
    cifar serve --model s3://bucket/sweeps/ladder --replicas 2 --gpus-per-replica 0.5
    curl -F file=@cat.png -F file=@ship.jpg http://127.0.0.1:8000/predict
    curl --data-binary @cat.png http://127.0.0.1:8000/predict
    serve run cifar_core.serving:app_builder model=results/runs   # Ray Serve's own tool

MODEL is anything ``cifar score --model`` takes (checkpoint, run folder, sweep, storage of
sweeps; local or s3://), resolved by the same best-model rule. The page at ``/`` lets a person
try it; ``POST /predict`` answers JSON (top-3 per image, the model's trial id and settings
hash), ``GET /model`` says what is served, ``GET /healthz`` whether it is up; Ray Serve's own
metrics (requests, latencies, batch sizes) are on Ray's metrics endpoint, printed at start. Requests are
batched across clients (``--max-batch-size`` images, waiting at most ``--batch-wait-ms``).

It listens on 127.0.0.1 unless ``--host`` says otherwise; on a cluster reach it the way the
dashboard is reached, through SSH (docs/cluster.md), never by opening the port to the world.
Runs on the cluster named by ``--address``/``RAY_ADDRESS``, else on a private local Ray, until
Ctrl-C. ``--smoke-test``: serve, classify one made-up image through HTTP, stop. Exit code 2:
MODEL missing, unreadable or refused, or a bad option (nothing started).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.request

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
from jobs import add_log_level, configure_logging, process_exit


def build_parser() -> argparse.ArgumentParser:
    from cifar_core.serving import ServeLimits

    limits = ServeLimits()
    parser = argparse.ArgumentParser(prog="cifar serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Checkpoint, run, sweep or storage.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (default 127.0.0.1: this machine only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1, help="Model replicas (processes).")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="Images per model call, gathered across requests (1: no batching).")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="Longest a request waits for others to share its batch.")
    parser.add_argument("--max-request-bytes", type=int, default=limits.max_request_bytes)
    parser.add_argument("--max-files", type=int, default=limits.max_files,
                        help="Images per request.")
    parser.add_argument("--max-file-bytes", type=int, default=limits.max_file_bytes)
    parser.add_argument("--max-pixels", type=int, default=limits.max_pixels,
                        help="Refuse images whose header declares more pixels (not decoded).")
    parser.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else local).")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint (else AWS_ENDPOINT_URL).")
    parser.add_argument("--smoke-test", action="store_true",
                        help="Serve, classify one made-up image over HTTP, stop.")
    add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    from cifar_core.checkpoints import CheckpointError
    from cifar_core.serving import ServeLimits, build
    from cifar_core.storage import StorageError, check_endpoint

    try:
        if not 0 < args.port < 65536:
            raise ValueError(f"--port {args.port} must be in 1..65535")
        endpoint = check_endpoint(args.s3_endpoint) if args.s3_endpoint else None
        limits = ServeLimits(args.max_request_bytes, args.max_files, args.max_file_bytes,
                             args.max_pixels)
        application = build(args.model, limits, replicas=args.replicas,
                            gpus_per_replica=args.gpus_per_replica,
                            max_batch_size=args.max_batch_size,
                            batch_wait_ms=args.batch_wait_ms, endpoint=endpoint)
    except (CheckpointError, StorageError, ValueError) as error:
        print(f"cifar serve: error: {error}", file=sys.stderr)
        return 2
    url = start(application, args.host, args.port, args.address)
    print(f"cifar serve: {args.model} at {url}/ (POST {url}/predict); Ray Serve's metrics "
          f"at {metrics_url()}; Ctrl-C stops", flush=True)
    try:
        if args.smoke_test:
            print(f"cifar serve: smoke test: {json.dumps(smoke_request(url))}", flush=True)
        else:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    finally:
        from ray import serve

        serve.shutdown()
    return 0


def start(application, host: str, port: int, address: str | None) -> str:
    """Run the application on Ray Serve; the base URL it answers at."""
    from ray import serve

    from cifar_core.ray_glue import connect_ray

    connect_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name="cifar", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def metrics_url() -> str:
    """Where Ray exports its metrics, Serve's among them (requests, latencies, batch sizes)
    in Prometheus' text format: this node's metrics agent."""
    import ray

    node = next(n for n in ray.nodes() if n.get("Alive"))
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def smoke_request(url: str) -> dict:
    """POST one made-up 32x32 PNG to ``url``/predict; the answer."""
    import numpy as np

    from cifar_core.images import encode_png

    image = encode_png(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    request = urllib.request.Request(f"{url}/predict", data=image, method="POST",
                                     headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


if __name__ == "__main__":
    sys.exit(process_exit(main()))
