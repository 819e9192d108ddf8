"""Seconds per epoch of M1, M2, M4 and M6 at the seed's batch sizes, on this machine.

    python bench/epoch_times.py --data DIR            # ~10 min on 2 CPU cores

DIR is the CIFAR-10 (JPEG) data, as ``cifar train --data`` takes it (default: the CIFAR10_DATA
environment variable).

Times Keras ``fit`` over ``--steps`` optimizer steps of real CIFAR-10 (JPEG) batches (after a
warm-up step that compiles the graph), three repeats, and scales to a full epoch of the seed
split (45,000 training images; 88 steps of 512). Writes results/bench-epoch-times.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import time

from common import add_data_argument, spread, write_results

from cifar_core.data import load_cifar10, make_dataset
from cifar_core.models import build_model
from cifar_core.settings import Settings

TRAIN_IMAGES = 45_000


def time_model(model_id: str, data_dir: str, steps: int, repeats: int) -> dict:
    settings = Settings.from_dict({"model": model_id, "data": data_dir})
    data = load_cifar10(settings)
    model = build_model(settings)
    dataset = make_dataset(data.x_train, data.y_train, settings, training=True).repeat()
    model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0)  # compile + warm-up
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
        per_step.append((time.perf_counter() - start) / steps)
    steps_per_epoch = math.ceil(TRAIN_IMAGES / settings.batch_size)
    return {"model": model_id, "batch_size": settings.batch_size, "steps_timed": steps,
            "steps_per_epoch": steps_per_epoch, "seconds_per_step": spread(per_step),
            "seconds_per_epoch": spread([s * steps_per_epoch for s in per_step]),
            "images_per_second": spread([settings.batch_size / s for s in per_step])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_data_argument(parser)
    parser.add_argument("--models", default="M1,M2,M4,M6")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [time_model(m, args.data, args.steps, args.repeats) for m in args.models.split(",")]
    lines = ["| model | batch | s/epoch median (min–max) | images/s median |",
             "|---|---|---|---|"]
    for r in rows:
        e = r["seconds_per_epoch"]
        lines.append(f"| {r['model']} | {r['batch_size']} | {e['median']:.1f} "
                     f"({e['min']:.1f}–{e['max']:.1f}) | {r['images_per_second']['median']:.0f} |")
    table = ("# Training epoch times, CIFAR-10 (JPEG), seed batch sizes\n\n"
             f"{args.steps} timed steps x {args.repeats} repeats per model, scaled to an epoch "
             "of 45,000 images; Keras `fit`, float32, all cores.\n\n" + "\n".join(lines))
    print(write_results("bench-epoch-times", {"rows": rows, "data": "CIFAR-10 (JPEG)"}, table))
    print(table)


if __name__ == "__main__":
    main()
