"""Where a training step's time goes: each layer's forward + backward, timed on its own.

    python bench/step_profile.py --model M8 --precision mixed_bfloat16 \
        --settings '{"widths": "64,256,256"}'             # ~5 min on 2 cores
    python bench/step_profile.py --model M6 --out /tmp/sp  # a contended machine: not results/

Builds the model as ``cifar train`` does (``models.build_model``: the settings' precision,
augmentation, BatchNorm in training mode) and times, on random tensors at the settings' batch
size (no data needed; whitening keeps its random init, which costs the same):

- the whole step: a plain Keras ``fit`` epoch of 40 steps on preloaded tensors (the second
  epoch; the first traces), per step;
- each layer's forward + backward alone in one ``tf.function``, its input a random tensor of
  the shape and dtype it gets in the model. Backward computes what the real step needs: the
  layer's weight gradients, and its input gradient only when a trainable layer lies before
  it (M8's augmentation and frozen whitening get none, as in the real step);
- the optimizer's update of all trainable weights, alone.

Per layer: counted forward FLOPs (TensorFlow's graph profiler, as bench/throughput_bench.py
counts models), milliseconds per step, and GFLOP/s at k x the forward FLOPs (k = 1 + one
product per gradient taken: 3 for a conv with both, 2 for M8's first conv after the frozen
whitening) against the compute dtype's sustained 3x3-conv peak, measured before and after.
The whole step is put against the peak at 3x the model's forward FLOPs, as
bench/throughput_bench.py does. The sum over layers + optimizer against the whole step shows
what the graph runtime adds (loss, metrics, dispatch between ops, casts between dtypes).

Environment settings that change TensorFlow's kernels (``TF_ENABLE_ONEDNN_OPTS``,
``ONEDNN_*``, ``OMP_*``, ``TF_NUM_*``) must be set before the command; they are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import conv3x3_rate, counted_flops, median_call_seconds, write_results

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
import numpy as np

NAME = "bench-step-profile"
#: Environment variables recorded with the result (they change which kernels run, or how).
KERNEL_ENV = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_DEFAULT_FPMATH_MODE", "TF_NUM_INTRAOP_THREADS",
              "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS", "KMP_BLOCKTIME", "KMP_AFFINITY",
              "TF_ONEDNN_ASSOC", "TF_ONEDNN_USE_SYSTEM_ALLOCATOR")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="M8")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--settings", default="{}", type=json.loads,
                        help="Further settings as JSON, e.g. '{\"widths\": \"64,256,256\"}'.")
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra-op threads (default 0: TensorFlow's own, all "
                        "cores, as `cifar train` runs).")
    parser.add_argument("--inter-threads", type=int, default=0,
                        help="TensorFlow inter-op threads (default 0: TensorFlow's own).")
    parser.add_argument("--seconds", type=float, default=2.0, help="Seconds of calls per timing.")
    parser.add_argument("--steps", type=int, default=40,
                        help="Steps of the timed plain-fit epoch (the second of two).")
    parser.add_argument("--step-only", action="store_true",
                        help="Time the whole step only (no per-layer table): for comparing "
                        "kernel environments.")
    parser.add_argument("--out", help="Write <out>/<name>.{json,md} instead of results/.")
    parser.add_argument("--tag", default="", help="Appended to the result's file name.")
    return parser.parse_args()


def timed(call, seconds: float) -> float:
    """Median seconds of ``call()`` (a traced function, run once first to trace and warm)."""
    return median_call_seconds(call, seconds, min_calls=5)[0]


def time_layer(layer, shape, dtype, batch: int, input_grad: bool, seconds: float) -> float:
    import tensorflow as tf

    x = tf.cast(tf.random.uniform([batch, *shape]), dtype)
    weights = layer.trainable_weights

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32))
        targets = ([x] if input_grad else []) + weights
        return tape.gradient(loss, targets) if targets else [y]

    def call():
        outputs = step()
        outputs[0].numpy()  # wait for the step: TensorFlow runs ops asynchronously

    return timed(call, seconds)


def time_fit_step(model, settings, steps: int) -> float:
    """Seconds per step of a plain ``fit`` on preloaded random tensors (second epoch)."""
    import tensorflow as tf
    import tf_keras as keras

    batch = settings.batch_size
    x = tf.random.uniform([batch * steps, settings.input_size, settings.input_size, 3])
    y = tf.one_hot(np.arange(batch * steps) % 10, 10)
    times: list[float] = []
    clock = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: times.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: times.append(time.perf_counter() - times.pop()))
    model.fit(x, y, batch_size=batch, epochs=2, callbacks=[clock], verbose=0)
    return times[-1] / steps


def time_optimizer(model, seconds: float) -> float:
    import tensorflow as tf

    weights = model.trainable_weights
    grads = [tf.random.normal(w.shape, stddev=1e-6, dtype=w.dtype) for w in weights]
    optimizer = model.optimizer

    @tf.function
    def apply():
        optimizer.apply_gradients(zip(grads, weights))
        return optimizer.iterations

    return timed(lambda: apply().numpy(), seconds)


def profile(args: argparse.Namespace) -> dict:
    import tensorflow as tf
    import tf_keras as keras

    from cifar_core.models import build_model
    from cifar_core.settings import Settings

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
    settings = Settings.from_dict({**args.settings, "model": args.model,
                                   "precision": args.precision})
    model = build_model(settings)
    compute = keras.mixed_precision.Policy(settings.precision).compute_dtype
    # Measured before and after the rest: a shared VM's speed drifts (seen here: 79-146
    # GFLOP/s within an hour), and interference only slows, so the higher is the peak.
    peaks = [conv3x3_rate(compute, args.seconds * 2)["gflops"]]
    print(f"{compute} 3x3-conv peak {peaks[0]:.0f} GFLOP/s; timing the whole step", flush=True)
    step = time_fit_step(model, settings, args.steps)
    model_flops = counted_flops(model, (settings.input_size, settings.input_size, 3))
    rows, trainable_before = [], False
    for layer in [] if args.step_only else model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        shape, dtype = tuple(layer.input.shape[1:]), layer.input.dtype
        print(f"timing {layer.name} ({type(layer).__name__}, input {shape})", flush=True)
        flops = counted_flops(layer, shape, dtype)
        seconds = time_layer(layer, shape, dtype, settings.batch_size, trainable_before,
                             args.seconds)
        # Forward, plus one product of the same size per gradient taken (weights, input).
        factor = 1 + bool(layer.trainable_weights) + trainable_before
        rows.append({"layer": layer.name, "type": type(layer).__name__,
                     "input": list(shape), "input_dtype": dtype.name,
                     "compute_dtype": layer.compute_dtype, "forward_flops": flops,
                     "flop_factor": factor, "ms_per_step": seconds * 1e3,
                     "gflops": factor * flops * settings.batch_size / seconds / 1e9})
        trainable_before = trainable_before or bool(layer.trainable_weights)
    optimizer = 0.0 if args.step_only else time_optimizer(model, args.seconds)
    peaks.append(conv3x3_rate(compute, args.seconds * 2)["gflops"])
    peak = max(peaks)
    return {"model": args.model, "precision": settings.precision, "compute_dtype": compute,
            "batch_size": settings.batch_size, "settings": args.settings,
            "threads": f"intra {args.threads or 'default'}, inter "
                       f"{args.inter_threads or 'default'}",
            "tensorflow_threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                                   tf.config.threading.get_inter_op_parallelism_threads()],
            "environment": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
            "conv_peak_gflops": peak, "conv_peak_samples_gflops": peaks,
            "fit_ms_per_step": step * 1e3, "fit_steps": args.steps,
            "forward_flops": model_flops,
            "fit_gflops": 3 * model_flops * settings.batch_size / step / 1e9,
            "optimizer_ms_per_step": optimizer * 1e3, "layers": rows}


def render(payload: dict) -> str:
    peak, step = payload["conv_peak_gflops"], payload["fit_ms_per_step"]
    extra = ", ".join(f"{k}={v}" for k, v in payload["environment"].items()) or "none"
    settings = json.dumps(payload["settings"]) if payload["settings"] else ""
    lines = [f"# Step profile: {payload['model']} {payload['precision']}, batch "
             f"{payload['batch_size']} {settings}",
             "", f"Whole step (plain fit on preloaded tensors, {payload['fit_steps']} steps): "
             f"**{step:.1f} ms**, {payload['fit_gflops']:.0f} GFLOP/s at 3x the counted "
             f"{payload['forward_flops'] / 1e6:.0f} forward MFLOP/img = "
             f"**{payload['fit_gflops'] / peak:.0%}** of the sustained {payload['compute_dtype']} "
             f"3x3-conv peak ({peak:.0f} GFLOP/s, the higher of "
             f"{' and '.join(f'{x:.0f}' for x in payload.get('conv_peak_samples_gflops', [peak]))}"
             f" before and after); TensorFlow threads {payload['threads']}; "
             f"kernel environment: {extra}."]
    if not payload["layers"]:
        return "\n".join(lines)
    lines += ["", "| layer | type | input | dtype in -> compute | fwd MFLOP/img | ms/step | "
              "share of step | GFLOP/s (k x fwd) | of peak |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in payload["layers"]:
        lines.append(
            f"| {row['layer']} | {row['type']} | {'x'.join(map(str, row['input']))} | "
            f"{row['input_dtype']} -> {row['compute_dtype']} | {row['forward_flops'] / 1e6:.2f} "
            f"| {row['ms_per_step']:.2f} | {row['ms_per_step'] / step:.0%} | "
            f"{row['gflops']:.0f} ({row['flop_factor']}x) | {row['gflops'] / peak:.0%} |")
    by_type: dict[str, float] = {}
    for row in payload["layers"]:
        by_type[row["type"]] = by_type.get(row["type"], 0.0) + row["ms_per_step"]
    layers_total = sum(by_type.values())
    rest = step - layers_total - payload["optimizer_ms_per_step"]
    lines += ["", "| part | ms/step | share of step |", "|---|---|---|"]
    for name, ms in sorted(by_type.items(), key=lambda item: -item[1]):
        lines.append(f"| {name} (forward + backward) | {ms:.1f} | {ms / step:.0%} |")
    lines += [f"| optimizer update | {payload['optimizer_ms_per_step']:.1f} | "
              f"{payload['optimizer_ms_per_step'] / step:.0%} |",
              f"| rest of the step (loss, metrics, graph runtime; negative: layers overlap "
              f"in the whole step) | {rest:.1f} | {rest / step:.0%} |"]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    payload = profile(args)
    table = render(payload)
    print(table)
    name = NAME + (f"-{args.tag}" if args.tag else "")
    print(f"wrote {write_results(name, payload, table, args.out)}")


if __name__ == "__main__":
    main()
