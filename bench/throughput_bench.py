"""Throughput on this machine: what TensorFlow sustains, and what training gets of it.

    python bench/throughput_bench.py --data DIR            # the real run, on a quiet machine:
                                                            # ~15 min on 2 cores; writes
                                                            # results/bench-throughput.{json,md}
    python bench/throughput_bench.py --quick --out /tmp/tp # plumbing check, ~3 min, synthetic
                                                            # images unless --data is given

DIR is CIFAR-10 as ``cifar train --data`` takes it (default: $CIFAR10_DATA).

1. Sustained GFLOP/s of a large matmul (2 n^3 FLOPs) and of a 3x3 conv (2 B H W Cin Cout 9)
   in fp32 (and in the compute dtype of each ``--precisions`` value: bf16, fp16) in the
   installed TensorFlow, with ``--threads`` intra/inter-op threads: a ``cifar train`` run
   leaves TensorFlow's defaults (all cores: the default here), a Tune trial gets its Ray CPUs
   (``ray_glue.limit_threads_to_ray_cpus``: 1 by default, so try ``--threads 1`` too).
2. Each model's FLOPs per image, counted by TensorFlow's graph profiler
   (``tf.compat.v1.profiler``, float_operation) on the model's forward pass: training forward
   (one view, augmentation and BatchNorm in training mode) x 3 for forward + backward, and the
   inference forward (M8's test-time augmentation included: 6 views).
3. Training images/s of M1, M4, M6 and M8 at their seed batch sizes, at each ``--precisions``
   (``Settings.precision``): ``cifar_core.train.train`` (tf.data from uint8, callbacks, a
   checkpoint per epoch) and a plain Keras ``fit`` of the same model on preloaded float
   tensors, both on the same ``--images`` training images with the same small validation
   split, timed over the last of ``--epochs`` epochs (the first one traces). With the FLOP
   counts this gives the GFLOP/s each reaches, against the conv peak of its compute dtype.

Numbers from a machine shared with other work are not results: only an uncontended run
writes into results/ (``--quick`` requires ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from common import (add_data_argument, conv3x3_rate, counted_flops, spread,
                    sustained_gflops, write_results)

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
import numpy as np

MODELS = ("M1", "M4", "M6", "M8")
NAME = "bench-throughput"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser, required=False)
    parser.add_argument("--quick", action="store_true",
                        help="Tiny sizes, 1 s per kernel; needs --out (never results/).")
    parser.add_argument("--out", help="Write <out>/bench-throughput.{json,md} here instead "
                        "of results/ (for runs on a contended machine).")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="TensorFlow intra- and inter-op threads (default: all cores).")
    parser.add_argument("--images", type=int, default=10000,
                        help="Training images per model run (a stratified --limit subset).")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs; the last is timed.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Runs of each model timing (train() and plain fit, each a fresh "
                        "model); the table shows the median, the JSON median/min/max.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Seconds per kernel.")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default="float32",
                        help="Comma-separated Settings.precision values to time each model "
                        "at (e.g. float32,mixed_bfloat16); kernels run in each one's compute "
                        "dtype.")
    args = parser.parse_args()
    from cifar_core.settings import PRECISIONS

    args.precisions = args.precisions.split(",")
    unknown = sorted(set(args.precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"--precisions {','.join(unknown)}: must be among {', '.join(PRECISIONS)}")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    if args.quick:
        if not args.out:
            parser.error("--quick writes only with --out (e.g. --out /tmp/tp), never results/")
        args.images, args.epochs, args.seconds = min(args.images, 1100), 2, 1.0
    return args


def set_threads(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def compute_dtype(precision: str) -> str:
    import tf_keras as keras

    return keras.mixed_precision.Policy(precision).compute_dtype


def kernel_rates(quick: bool, seconds: float, dtype: str = "float32") -> dict:
    """Sustained GFLOP/s of a large matmul and 3x3 conv in ``dtype`` (sums in float32)."""
    import tensorflow as tf

    n = 1024 if quick else 4096
    a, b = (tf.cast(tf.random.normal([n, n]), dtype) for _ in range(2))
    matmul = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32)))
    conv = dict(batch=16, channels=64) if quick else {}
    return {"matmul": {"shape": [n, n, n], **sustained_gflops(matmul, 2 * n ** 3, seconds)},
            "conv3x3": conv3x3_rate(dtype, seconds, **conv)}


def load_data(args: argparse.Namespace, settings):
    """The real data (a --limit subset), or synthetic uint8 images in --quick without --data."""
    from cifar_core.data import Cifar10, load_cifar10

    if args.data:
        return load_cifar10(settings)
    rng = np.random.default_rng(0)
    count = settings.limit
    val = max(10, round(count * settings.validation_fraction))
    x = rng.integers(0, 256, (count + val + 100, 32, 32, 3), dtype=np.uint8)
    y = np.arange(len(x)) % 10
    return Cifar10(x[:count], y[:count], x[count:count + val], y[count:count + val],
                   x[-100:], y[-100:], source="synthetic")


def model_settings(model: str, args: argparse.Namespace, precision: str = "float32"):
    from cifar_core.settings import Settings

    # A small validation split: both timings include it, but it should not dominate.
    return Settings.from_dict({"model": model, "data": args.data or "keras",
                               "limit": args.images, "validation_fraction": 0.05,
                               "num_epochs": args.epochs, "precision": precision})


def time_train(settings, data) -> float:
    """Training images/s of the last epoch of ``cifar_core.train.train``."""
    from cifar_core.train import read_metrics, train

    with tempfile.TemporaryDirectory(prefix="cifar-bench-") as workdir:
        train(settings, data, workdir, evaluate_test=False)
        seconds = read_metrics(workdir)[-1]["epoch_time_s"]
    return len(data.y_train) / seconds


def time_plain_fit(settings, data) -> float:
    """Training images/s of the last epoch of a plain ``fit`` on preloaded float tensors."""
    import tensorflow as tf
    import tf_keras as keras

    from cifar_core.data import preprocess_images
    from cifar_core.models import build_model

    model = build_model(settings, train_images=data.x_train)
    x, x_val = (preprocess_images(v, settings.input_size) for v in (data.x_train, data.x_val))
    y, y_val = (tf.one_hot(v, 10) for v in (data.y_train, data.y_val))
    times: list[float] = []
    clock = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: times.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: times.append(time.perf_counter() - times.pop()))
    model.fit(x, y, batch_size=settings.batch_size, epochs=settings.num_epochs,
              validation_data=(x_val, y_val), callbacks=[clock], verbose=0)
    return len(data.y_train) / times[-1]


def measure_model(model: str, args: argparse.Namespace, precision: str) -> dict:
    from cifar_core.models import build_model

    settings = model_settings(model, args, precision)
    data = load_data(args, settings)
    network = build_model(settings, compile=False)
    shape = (settings.input_size, settings.input_size, 3)
    forward = counted_flops(network, shape, training=True)
    inference = counted_flops(network, shape, training=False)
    # Alternating, so that a slow spell of the machine does not land on one of the two only.
    train_rates, fit_rates = [], []
    for _ in range(args.repeats):
        train_rates.append(time_train(settings, data))
        fit_rates.append(time_plain_fit(settings, data))
    train_spread, fit_spread = spread(train_rates), spread(fit_rates)
    train_rate, fit_rate = train_spread["median"], fit_spread["median"]
    per_image = 3 * forward
    return {"model": model, "precision": precision, "batch_size": settings.batch_size,
            "parameters": network.count_params(), "train_images": len(data.y_train),
            "validation_images": len(data.y_val), "forward_flops": forward,
            "train_flops_per_image": per_image, "inference_flops_per_image": inference,
            "train_images_per_s": train_rate, "fit_images_per_s": fit_rate,
            "train_images_per_s_spread": train_spread, "fit_images_per_s_spread": fit_spread,
            "train_gflops": train_rate * per_image / 1e9,
            "fit_gflops": fit_rate * per_image / 1e9}


def rate(row: dict, what: str) -> str:
    """Images/s: the median, with min-max when the row has repeats."""
    runs = row.get(f"{what}_images_per_s_spread", {"repeats": 1})
    median = f"{row[f'{what}_images_per_s']:.0f}"
    return median if runs["repeats"] == 1 else f"{median} ({runs['min']:.0f}-{runs['max']:.0f})"


def render(payload: dict) -> str:
    lines = [f"# Training throughput ({payload['threads']} TensorFlow threads)", ""]
    if "matmul" in payload["kernels"]:  # a payload from before --precisions: fp32 only
        payload = {**payload, "kernels": {"float32": payload["kernels"]}}
    for dtype, kernels in payload["kernels"].items():
        lines.append(
            f"Sustained {dtype}: matmul {kernels['matmul']['gflops']:.1f} GFLOP/s "
            f"({'x'.join(map(str, kernels['matmul']['shape']))}), 3x3 conv "
            f"{kernels['conv3x3']['gflops']:.1f} GFLOP/s (NHWC "
            f"{'x'.join(map(str, kernels['conv3x3']['shape_nhwc']))}).")
    lines += ["", "| model | precision | batch | params | train MFLOP/img (counted, 3x fwd) "
              "| inference MFLOP/img | train() img/s | plain fit img/s | train() GFLOP/s "
              "| fit GFLOP/s | train() / peak conv |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in payload["models"]:
        precision = row.get("precision", "float32")
        peak = payload["kernels"][compute_dtype(precision)]["conv3x3"]["gflops"]
        lines.append(
            f"| {row['model']} | {precision} | {row['batch_size']} | {row['parameters']:,} | "
            f"{row['train_flops_per_image'] / 1e6:.1f} | "
            f"{row['inference_flops_per_image'] / 1e6:.1f} | {rate(row, 'train')} | "
            f"{rate(row, 'fit')} | {row['train_gflops']:.1f} | "
            f"{row['fit_gflops']:.1f} | {row['train_gflops'] / peak:.0%} |")
    repeats = payload.get("repeats", 1)
    runs = f"median (min-max) of {repeats} runs" if repeats > 1 else "one run"
    quick = " (--quick: not a result)" if payload["quick"] else ""
    lines += ["", f"Images/s: last of {payload['epochs']} epochs over {payload['data']} "
              "training images, validation included (5% split; M8 validates with its 6-view "
              f"TTA); {runs}. Data: {payload['source']}{quick}."]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    payload = {"threads": args.threads, "quick": args.quick, "epochs": args.epochs,
               "data": args.images, "source": args.data or "synthetic uint8 noise",
               "repeats": args.repeats, "kernels": {}, "models": []}
    for dtype in dict.fromkeys(map(compute_dtype, ["float32", *args.precisions])):
        payload["kernels"][dtype] = kernel_rates(args.quick, args.seconds, dtype)
    for model in args.models.split(","):
        for precision in args.precisions:
            payload["models"].append(measure_model(model, args, precision))
            print(json.dumps(payload["models"][-1]), flush=True)
    table = render(payload)
    print(f"wrote {write_results(NAME, payload, table, args.out)}")


if __name__ == "__main__":
    main()
