"""Replay Ray's ASHA on a full grid's recorded learning curves: what would it have spent?

    python bench/asha_replay.py results/bench-tune-asha-m4-grid

The measured ASHA run (results/bench-tune-asha-m4.md) is one trial order and one timing. This
replays the same decisions offline, with Ray's own bracket (``_Bracket`` of
``ray.tune.schedulers.async_hyperband``, as ``ASHAScheduler`` builds it) fed the grid's
per-epoch ``val_accuracy``: trials start in a given order, ``--concurrency`` at a time, all at
the same speed. It reports trial-epochs spent and the gap to the grid's best, for the grid's
own order, for the seed-0 shuffle that ``cifar tune`` starts trials in under a scheduler, and
averaged over ``--orders`` random orders, for several reduction factors. Seconds, no
training. The folder holds the grid's ``trial.json`` records and ``order.json`` (Tune's
order).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from ray.tune.schedulers.async_hyperband import _Bracket


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def replay(curves: list[list[float]], reduction_factor: int, grace_period: int,
           concurrency: int) -> tuple[int, float]:
    """(trial-epochs spent, best val_accuracy seen) of one asynchronous ASHA run."""
    max_t = len(curves[0])
    bracket = _Bracket(grace_period, max_t, reduction_factor, s=0, stop_last_trials=True)
    waiting, running = list(range(len(curves))), {}
    spent, best = 0, 0.0
    while waiting or running:
        while waiting and len(running) < concurrency:
            running[waiting.pop(0)] = 0
        for index in list(running):  # equal speeds: every running trial does one epoch
            running[index] = epoch = running[index] + 1
            spent += 1
            value = curves[index][epoch - 1]
            best = max(best, value)
            action = bracket.on_result(_Trial(str(index)), epoch, value)
            if action == "STOP" or epoch >= max_t:
                del running[index]
    return spent, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--orders", type=int, default=200)
    args = parser.parse_args()
    order = json.loads((args.grid / "order.json").read_text())
    records = {p.parent.name: json.loads(p.read_text()) for p in args.grid.glob("*/trial.json")}
    curves = [[h["val_accuracy"] for h in records[t]["history"]] for t in order]
    grid_epochs = sum(len(c) for c in curves)
    grid_best = max(max(c) for c in curves)
    print(f"grid: {len(curves)} trials, {grid_epochs} trial-epochs, best {grid_best:.4f}")
    # cifar tune's own order under a scheduler: the grid order, shuffled with seed 0
    # (cifar_core.plan.trial_order).
    own_order = curves[:]
    random.Random(0).shuffle(own_order)
    print("| reduction factor | grid order: share of epochs, gap (points) | cifar tune's "
          "shuffled order: share, gap | "
          f"{args.orders} random orders: mean share (10th-90th pct.), runs within 0.5 points |")
    print("|---|---|---|---|")
    for rf in (3, 4, 5, 6, 8):
        spent, best = replay(curves, rf, args.grace_period, args.concurrency)
        own_spent, own_best = replay(own_order, rf, args.grace_period, args.concurrency)
        shares, hits = [], 0
        for seed in range(args.orders):
            shuffled = curves[:]
            random.Random(seed).shuffle(shuffled)
            s, b = replay(shuffled, rf, args.grace_period, args.concurrency)
            shares.append(s / grid_epochs)
            hits += (grid_best - b) * 100 <= 0.5
        low, high = np.percentile(shares, [10, 90])
        print(f"| {rf} | {spent / grid_epochs:.0%}, {(grid_best - best) * 100:+.2f} | "
              f"{own_spent / grid_epochs:.0%}, {(grid_best - own_best) * 100:+.2f} | "
              f"{np.mean(shares):.0%} ({low:.0%}-{high:.0%}), {hits / args.orders:.0%} |")


if __name__ == "__main__":
    main()
