"""Shared bits of the benchmark scripts: provenance, median/min/max summaries, ``--data``.

The scripts use the installed package (``pip install -e .``); run them as
``python bench/<script>.py`` so this folder is on ``sys.path`` for ``from common import ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
from cifar_core.provenance import git_commit, provenance

#: The commit when the benchmark started (files edited while it runs must not relabel it).
STARTED_AT_COMMIT = git_commit()

#: The repository's root: results are written to ``REPO / "results"``.
REPO = Path(__file__).resolve().parent.parent

#: Environment variable naming the CIFAR-10 data when ``--data`` is not given.
DATA_ENV = "CIFAR10_DATA"


def add_data_argument(parser: argparse.ArgumentParser,
                      what: str = "CIFAR-10 data, as `cifar train --data` takes it", *,
                      required: bool = True, under: str | None = None) -> None:
    """``--data DIR``, defaulting to ``$CIFAR10_DATA`` (``$CIFAR10_DATA/<under>`` with
    ``under``); with neither, argparse stops with "the following arguments are required:
    --data". ``required=False``: the script checks later with ``require_data`` (for modes that
    need no data, such as ``--render``)."""
    default = os.environ.get(DATA_ENV) or None
    if default is not None and under:
        default = os.path.join(default, under)
    now = "unset, so --data is required" if default is None else default
    env = f"${DATA_ENV}/{under}" if under else f"${DATA_ENV}"
    help_text = f"{what}. Default: {env} ({now})".replace("%", "%%")  # argparse %-formats
    parser.add_argument("--data", default=default, required=required and default is None,
                        metavar="DIR", help=help_text)


def require_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``args.data``, or the argparse error a required ``--data`` gives (exit status 2)."""
    if not args.data:
        parser.error(f"the following arguments are required: --data (or set ${DATA_ENV})")
    return args.data


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "repeats": len(values), "values": values}


def median_call_seconds(call, seconds: float, min_calls: int = 3) -> tuple[float, int]:
    """Median seconds of ``call()`` (which must block until done) over ``seconds`` of calls,
    after one untimed call that traces and warms up; and how many calls were timed."""
    call()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_calls:
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times), len(times)


def sustained_gflops(step, flops_per_call: float, seconds: float) -> dict:
    """Call ``step`` (a traced tf.function) until ``seconds`` pass; GFLOP/s of the median call."""
    median, calls = median_call_seconds(lambda: step().numpy(), seconds)
    return {"gflops": flops_per_call / median / 1e9, "call_s": median, "calls": calls}


def conv3x3_rate(dtype: str, seconds: float, batch: int = 128, size: int = 32,
                 channels: int = 128) -> dict:
    """Sustained GFLOP/s of one 3x3 conv, NHWC ``batch x size x size x channels`` to
    ``channels`` filters, in ``dtype`` (summed in float32): the benchmarks' peak."""
    import tensorflow as tf

    images = tf.cast(tf.random.normal([batch, size, size, channels]), dtype)
    kernel = tf.cast(tf.random.normal([3, 3, channels, channels]), dtype)
    conv = tf.function(lambda: tf.reduce_sum(tf.cast(
        tf.nn.conv2d(images, kernel, 1, "SAME"), tf.float32)))
    return {"shape_nhwc": [batch, size, size, channels], "filters": channels,
            **sustained_gflops(conv, 2 * batch * size * size * channels ** 2 * 9, seconds)}


def counted_flops(layer, shape, dtype="float32", training: bool = True) -> int:
    """FLOPs of one forward pass of ``layer`` (a model or one layer) on one input of ``shape``
    (no batch axis), counted by TensorFlow's graph profiler (``tf.compat.v1.profiler``,
    float_operation).

    Profiles the traced graph as it is: freezing it to constants first fails on the
    augmentation layers' stateful random ops (RngReadAndSkip takes a resource)."""
    import tensorflow as tf

    @tf.autograph.experimental.do_not_convert
    def forward(x):
        return layer(x, training=training)

    concrete = tf.function(forward).get_concrete_function(tf.TensorSpec([1, *shape], dtype))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=concrete.graph, cmd="op", options=options)
    return int(profile.total_float_ops)


def write_results(name: str, payload: dict, table: str, out: str | Path | None = None) -> Path:
    """results/<name>.json (machines) and results/<name>.md (people), both with provenance;
    into ``out`` instead when given (a contended or trial run: never results/)."""
    payload = {**payload, "provenance": provenance()}
    out = REPO / "results" if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    prov = payload["provenance"]
    (out / f"{name}.md").write_text(
        f"{table}\n\nMachine: {prov['machine']['cpus']} CPUs ({prov['machine']['cpu_model']}), "
        f"GPUs: {prov['machine']['gpus'] or 'none'}; commit {prov['git_commit']}; "
        f"TensorFlow {prov['versions']['tensorflow']}, Ray {prov['versions']['ray']}; "
        f"{prov['created']}.\n")
    return out / f"{name}.md"


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    """``--notes`` (a paragraph for the .md) and ``--render JSON`` (only rewrite the .md)."""
    parser.add_argument("--notes", default="", help="A paragraph added to the .md.")
    parser.add_argument("--render", metavar="JSON",
                        help="Only rewrite the .md from an earlier run's JSON (with --notes).")


def render_only(args: argparse.Namespace, markdown) -> bool:
    """With ``--render``: rewrite that JSON's .md (and its notes, if given); True if done."""
    if not args.render:
        return False
    report = json.loads(Path(args.render).read_text())
    report["notes"] = args.notes or report.get("notes", "")
    Path(args.render).write_text(json.dumps(report, indent=1) + "\n")
    Path(args.render).with_suffix(".md").write_text(markdown(report))
    return True
