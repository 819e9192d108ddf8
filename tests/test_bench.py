"""The benchmark scripts' own logic, at toy sizes (their numbers are results/, not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_step_profile_counts_only_the_gradients_the_step_takes(tmp_path):
    # A narrow M8: augmentation and the frozen whitening need no gradient, the conv after
    # them needs only its weights' gradient, later convs both.
    settings = json.dumps({"widths": "4,4,4", "batch_size": 8})
    run = subprocess.run(
        [sys.executable, str(BENCH / "step_profile.py"), "--model", "M8", "--settings", settings,
         "--steps", "2", "--seconds", "0.01", "--out", str(tmp_path), "--tag", "toy"],
        cwd=BENCH, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads((tmp_path / "bench-step-profile-toy.json").read_text())
    layers = {row["layer"]: row for row in payload["layers"]}
    convs = [row for row in payload["layers"] if row["type"] == "Conv2D"]
    assert layers["whitening"]["flop_factor"] == 1
    assert [row["flop_factor"] for row in convs[1:3]] == [2, 3]
    assert layers["random_flip"]["flop_factor"] == 1
    assert all(row["ms_per_step"] > 0 for row in payload["layers"])
    assert payload["fit_ms_per_step"] > 0 and payload["forward_flops"] > 0
    table = (tmp_path / "bench-step-profile-toy.md").read_text()
    assert "| Conv2D (forward + backward) |" in table and "| optimizer update |" in table


def test_throughput_table_shows_median_and_range_of_repeats(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import throughput_bench

    row = {"model": "M1", "precision": "float32", "batch_size": 512, "parameters": 10,
           "train_flops_per_image": 9e6, "inference_flops_per_image": 3e6,
           "train_images_per_s": 1000.0, "fit_images_per_s": 1100.0,
           "train_images_per_s_spread": {"median": 1000.0, "min": 900.0, "max": 1200.0,
                                         "repeats": 3},
           "fit_images_per_s_spread": {"median": 1100.0, "min": 1050.0, "max": 1111.0,
                                       "repeats": 3},
           "train_gflops": 9.0, "fit_gflops": 9.9}
    kernels = {"float32": {"matmul": {"gflops": 100.0, "shape": [8, 8, 8]},
                           "conv3x3": {"gflops": 90.0, "shape_nhwc": [1, 8, 8, 8]}}}
    table = throughput_bench.render({"threads": 2, "quick": False, "epochs": 2, "data": 100,
                                     "source": "x", "repeats": 3, "kernels": kernels,
                                     "models": [row]})
    assert "| 1000 (900-1200) | 1100 (1050-1111) |" in table
    assert "median (min-max) of 3 runs" in table


def test_step_knobs_refuses_an_unknown_setting_before_any_run():
    run = subprocess.run(["bash", str(BENCH / "step_knobs.sh"), "1", "default,fpmath"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "unknown setting 'fpmath'; known: default,onednn-off" in run.stderr
