"""Batch scoring (``cifar score``) and sample export (``cifar export-samples``).

Real artifacts throughout: an M1 checkpoint trained for real on the synthetic image folder,
images written with Pillow/TensorFlow encoders, a private local Ray for the module, moto S3.
The pipeline tests run ``jobs.score.main`` in-process against that Ray (each run starts one
predictor actor, ~10-20 s on a busy 2-core machine).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
from cifar_core.images import DEFAULT_MAX_PIXELS
from cifar_core.listing import label_of
from cifar_core.settings import CLASS_NAMES, Settings
from tests.imaging import bomb_png, corrupt_png, encode, equivalent_pairs, sample_image

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- helpers
def read_rows(uri: str) -> pd.DataFrame:
    if uri.startswith("s3://"):
        from cifar_core.storage import read_bytes

        return pd.read_parquet(io.BytesIO(read_bytes(uri)))
    return pd.read_parquet(uri) if uri.endswith(".parquet") else pd.read_csv(uri)


def score_main(capsys, *argv) -> tuple[int, str, str]:
    from jobs.score import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_module():
    """One private local Ray for this module (reused if the session already started one)."""
    import ray

    from cifar_core.provenance import runtime_env_vars

    if ray.is_initialized():
        yield ray
        return
    for attempt in (1, 2):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     _temp_dir=tempfile.mkdtemp(prefix="cfscore-", dir="/tmp"),
                     runtime_env={"env_vars": runtime_env_vars()})
            break
        except Exception:
            # A loaded machine can make the raylet give up on its agent (ray#65983): retry once.
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def samples(image_folder, tmp_path_factory) -> Path:
    """Every synthetic test image (5 per class), exported the way users export theirs."""
    from jobs.export_samples import main

    out = tmp_path_factory.mktemp("samples")
    assert main(["--data", str(image_folder), "--n", "50", "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------- no Ray needed
def test_export_samples_writes_exact_test_images_named_by_class(image_folder, tmp_path):
    from cifar_core.data import load_raw
    from jobs.export_samples import main
    from PIL import Image

    assert main(["--data", str(image_folder), "--n", "13", "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.iterdir())
    assert len(files) == 13
    _, _, x_test, y_test = load_raw(str(image_folder))
    for path in files:
        name, index = path.stem.rsplit("_", 1)
        assert name == CLASS_NAMES[y_test[int(index)]]
        assert label_of(path.name) == name
        np.testing.assert_array_equal(np.asarray(Image.open(path)), x_test[int(index)])
    # Classes in turn: 13 images cover all ten classes.
    assert {label_of(p.name) for p in files} == set(CLASS_NAMES)
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


def _write_unsafe_checkpoint(folder: Path) -> Path:
    import tf_keras as keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)  # arbitrary Python code in the model
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(x))
    folder.mkdir(parents=True)
    keras.Model(inputs, outputs).save(str(folder / "model.keras"))
    (folder / "settings.json").write_text(Settings(model="M1").to_json())
    return folder


def test_whole_job_errors_exit_2_before_ray(tmp_path, samples, trained_run, capsys):
    import ray

    ray_was_running = ray.is_initialized()
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.keras").write_bytes(b"not a zip file")
    (broken / "settings.json").write_text(Settings(model="M1").to_json())
    unsafe = _write_unsafe_checkpoint(tmp_path / "unsafe")
    out = tmp_path / "out" / "scores.csv"
    cases = [
        ([tmp_path / "missing", "--model", trained_run, "--out", out], "does not exist"),
        ([empty, "--model", trained_run, "--out", out], "holds no files"),
        ([samples, "--model", tmp_path / "nothing", "--out", out], "not a checkpoint folder"),
        ([samples, "--model", broken, "--out", out], "refused or unreadable"),
        ([samples, "--model", unsafe, "--out", out], "arbitrary code execution"),
        ([samples, "--model", trained_run, "--out", samples / "in.csv"], "inside SRC"),
        ([samples, "--model", trained_run, "--out", tmp_path / "scores.txt"], ".csv or .parquet"),
    ]
    for argv, message in cases:
        code, _, err = score_main(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in err, (message, err)
    assert not out.parent.exists()  # nothing written
    assert ray.is_initialized() == ray_was_running  # all found before Ray would start


def test_a_model_that_fails_after_ray_started_exits_2_and_stops_that_ray(tmp_path, samples,
                                                                        trained_run, capsys):
    """The archive check passes before Ray starts; the load (beside Ray's start) then finds the
    model does not match its settings: exit 2 naming it, nothing written, and a Ray the job
    started is shut down again."""
    import shutil

    import ray

    ray_was_running = ray.is_initialized()
    folder = tmp_path / "mismatch"
    shutil.copytree(trained_run / "checkpoints" / "best", folder)
    settings = Settings.from_json((folder / "settings.json").read_text())
    (folder / "settings.json").write_text(Settings.from_dict(
        {**settings.to_dict(), "model": "M7"}).to_json())  # M7 takes 96 px, this model 32
    out = tmp_path / "out" / "scores.csv"
    code, _, err = score_main(capsys, samples, "--model", folder, "--out", out)
    assert code == 2 and "but its settings say" in err, err
    assert not out.parent.exists()
    assert ray.is_initialized() == ray_was_running


def test_hdf5_checkpoint_is_refused_without_running_its_code(tmp_path, samples, capsys):
    import tf_keras as keras

    marker = tmp_path / "code-ran"
    touch = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(touch)(inputs)
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(x))
    folder = tmp_path / "hdf5"
    folder.mkdir()
    keras.Model(inputs, outputs).save(str(folder / "model.keras"), save_format="h5")
    (folder / "settings.json").write_text(Settings(model="M1").to_json())
    marker.unlink(missing_ok=True)  # building the model ran the lambda once
    code, _, err = score_main(capsys, samples, "--model", folder, "--out", tmp_path / "o.csv")
    assert code == 2 and "not a zip-format .keras archive" in err
    assert not marker.exists()


# ---------------------------------------------------------------------------- pipeline runs
def test_scores_exported_samples_like_training_evaluated_them(ray_module, samples, trained_run,
                                                                tmp_path, capsys):
    out = tmp_path / "scores.csv"
    for _ in range(2):  # the second run replaces the output: still one row per file
        code, stdout, _ = score_main(capsys, samples, "--model", trained_run, "--out", out,
                                     "--format", "both", "--batch-size", "16")
        assert code == 0
        for path in (out, out.with_suffix(".parquet")):
            rows = read_rows(str(path))
            assert len(rows) == 50 and rows["path"].is_unique
            assert set(rows["status"]) == {"ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "scores.csv", "scores.parquet", "scores.summary.json"]  # no partial files left
    assert "50 files, 50 ok, 0 errors" in stdout
    assert list(rows.columns) == [
        "path", "label", "predicted_class", "confidence", "top2_class", "top2_confidence",
        "top3_class", "top3_confidence", "status", "error"]
    assert (rows["label"] == rows["path"].map(lambda p: Path(p).name.split("_")[0])).all()
    assert (rows["confidence"] >= rows["top2_confidence"]).all()
    assert (rows["top2_confidence"] >= rows["top3_confidence"]).all()
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    accuracy = float((rows["label"] == rows["predicted_class"]).mean())
    assert summary["labels"]["accuracy"] == pytest.approx(accuracy)
    # The samples are the whole test split, so scoring must reproduce training's evaluation
    # exactly: same pixels, same preprocessing, same model.
    evaluation = json.loads((trained_run / "evaluation.json").read_text())
    assert summary["labels"]["accuracy"] == pytest.approx(evaluation["test_accuracy"])
    assert summary["labels"]["confusion_matrix"] == evaluation["confusion_matrix"]
    assert summary["files"] == 50 and summary["provenance"]["git_commit"]
    assert set(summary["stage_s"]) == {"list", "read", "decode", "predict", "write"}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, str]]]:
    """One file of every bad kind, odd-but-fine images, and the expected (status, kind)."""
    root = tmp_path_factory.mktemp("mixed")
    src, outside = root / "src", root / "outside"
    (src / "cat").mkdir(parents=True)
    outside.mkdir()
    rgb = sample_image()
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    files = {
        "good.png": encode(rgb), "good.jpg": encode(rgb, "JPEG"),
        "cat/nested.png": encode(rgb),
        "gray.png": encode(rgb[..., 0]), "rgba.png": encode(np.dstack([rgb, rgb[..., 0]])),
        "photo.jpg": encode(np.zeros((300, 500, 3), np.uint8) + 128, "JPEG"),
        **equivalent_pairs(),
        "notes.txt": b"not an image\n", "empty.png": b"", "random.jpg": os.urandom(2000),
        "truncated.png": encode(noise)[:3000], "truncated.jpg": encode(noise, "JPEG")[:1000],
        "huge.png": bomb_png(20_000, 20_000),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "corrupt.png").write_bytes(corrupt_png())
    (outside / "secret.png").write_bytes(encode(rgb))
    os.mkfifo(outside / "pipe")  # if the escaping link below were ever opened, the job hangs
    (src / "link_outside.png").symlink_to(outside / "secret.png")
    (src / "link_outside_fifo.png").symlink_to(outside / "pipe")
    (src / "linked_dir").symlink_to(outside)
    (src / "link_inside.png").symlink_to(src / "good.png")
    (src / "broken_link.png").symlink_to(src / "gone.png")
    os.mkfifo(src / "fifo")
    expected = {name: ("ok", "") for name in files}
    expected.update({
        "notes.txt": ("error", "not an image"), "empty.png": ("error", "empty file"),
        "random.jpg": ("error", "not an image"), "truncated.png": ("error", "corrupt image"),
        "truncated.jpg": ("error", "corrupt image"), "huge.png": ("error", "too large"),
        "corrupt.png": ("error", "corrupt image"),
        "link_outside.png": ("error", "symlink outside SRC"),
        "link_outside_fifo.png": ("error", "symlink outside SRC"),
        "linked_dir": ("error", "symlink outside SRC"), "link_inside.png": ("ok", ""),
        "broken_link.png": ("error", "unreadable"), "fifo": ("error", "not a regular file"),
    })
    return src, expected


@pytest.mark.slow
@pytest.mark.timeout(600)  # a hang here means a FIFO or an escaping link was opened
def test_mixed_folder_one_row_per_file_and_right_statuses(ray_module, mixed_folder,
                                                          trained_run, tmp_path, capsys):
    src, expected = mixed_folder
    out = tmp_path / "mixed.parquet"
    code, _, err = score_main(capsys, src, "--model", trained_run, "--out", out,
                              "--max-pixels", DEFAULT_MAX_PIXELS)
    assert code == 3, err  # 12 of 30 files fail: above the default 1 % error rate
    assert "above --max-error-rate" in err
    rows = read_rows(str(out)).set_index("path")
    assert len(rows) == len(expected)
    found = {os.path.relpath(path, src): (
        row.status, row.error.split(":")[0] if isinstance(row.error, str) else "")
        for path, row in rows.iterrows()}
    assert found == expected
    failed = rows[rows["status"] == "error"]
    assert failed["predicted_class"].isna().all() and failed["confidence"].isna().all()
    ok = rows[rows["status"] == "ok"]
    assert ok["predicted_class"].isin(CLASS_NAMES).all() and ok["error"].isna().all()
    assert "not decoded" in rows.loc[str(src / "huge.png"), "error"]
    # Labels: only the file inside the cat/ folder has one.
    assert rows["label"].notna().sum() == 1 and rows.loc[str(src / "cat/nested.png"),
                                                         "label"] == "cat"
    # 16-bit and palette images score exactly like their 8-bit RGB equivalents.
    for name in ("gray16", "rgb16", "palette"):
        a, b = rows.loc[str(src / f"{name}.png")], rows.loc[str(src / f"{name}_rgb.png")]
        assert a["predicted_class"] == b["predicted_class"]
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)
    summary = json.loads((tmp_path / "mixed.summary.json").read_text())
    assert summary["files"] == len(expected) and summary["errors"] == len(failed)
    assert summary["errors_by_kind"]["symlink outside SRC"] == 3


@pytest.mark.slow
def test_s3_source_and_output_match_local(ray_module, s3_bucket, samples, trained_run,
                                          tmp_path, capsys):
    import shutil

    from cifar_core.records import COMPLETED, TrialRecord
    from cifar_core.storage import read_text, upload_tree, write_text

    folder = tmp_path / "images"
    shutil.copytree(samples, folder / "batch1")
    (folder / "bad").mkdir()
    (folder / "bad" / "empty.jpg").write_bytes(b"")
    (folder / "bad" / "notes.txt").write_text("hello")
    (folder / "bad" / "huge.png").write_bytes(bomb_png(20_000, 20_000))
    upload_tree(folder, f"s3://{s3_bucket}/images")
    # MODEL as an s3 sweep folder whose only completed trial is the trained run.
    checkpoint = f"s3://{s3_bucket}/sweep/trials/M1-x/best"
    upload_tree(trained_run / "checkpoints" / "best", checkpoint)
    write_text(f"s3://{s3_bucket}/sweep/trials/M1-x/trial.json", TrialRecord(
        trial_id="M1-x", sweep="sweep", kind="tune", model="M1", settings={},
        settings_hash="x", status=COMPLETED, stop_reason="completed", best_val_accuracy=0.5,
        checkpoint_uri=checkpoint).to_json())

    local_out = tmp_path / "local.parquet"
    s3_out = f"s3://{s3_bucket}/scores/run.parquet"
    assert score_main(capsys, folder, "--model", trained_run, "--out", local_out,
                      "--max-error-rate", "0.1")[0] == 0
    code, stdout, err = score_main(capsys, f"s3://{s3_bucket}/images", "--model",
                                   f"s3://{s3_bucket}/sweep", "--out", s3_out,
                                   "--max-error-rate", "0.1")
    assert code == 0, err
    local = read_rows(str(local_out))
    remote = read_rows(s3_out)
    local["path"] = local["path"].map(lambda p: os.path.relpath(p, folder))
    remote["path"] = remote["path"].str.removeprefix(f"s3://{s3_bucket}/images/")
    assert len(remote) == 53
    pd.testing.assert_frame_equal(local.sort_values("path").reset_index(drop=True),
                                  remote.sort_values("path").reset_index(drop=True))
    summary = json.loads(read_text(f"s3://{s3_bucket}/scores/run.summary.json"))
    assert summary["model"]["selected_trial"]["trial_id"] == "M1-x"
    assert summary["errors"] == 3 and summary["labels"]["scored"] == 50


@pytest.mark.slow
def test_smoke_test_cli_starts_its_own_ray(samples, trained_run, tmp_path):
    out = tmp_path / "smoke.csv"
    env = {**os.environ, "RAY_ADDRESS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "jobs", "score", str(samples), "--model", str(trained_run),
         "--out", str(out), "--smoke-test", "--limit", "20", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "20 files, 20 ok, 0 errors" in result.stdout
    assert len(pd.read_csv(out)) == 20


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"
       b"newpath 0 0 moveto 32 32 lineto stroke showpage\n%%EOF\n")


@pytest.mark.slow
def test_hostile_names_and_formats_become_rows_and_csv_cells_are_inert(
        ray_module, trained_run, tmp_path, capsys):
    """A file name that is not UTF-8, names a spreadsheet would run as formulas, and an EPS
    file (Pillow would hand it to Ghostscript): each is one row; the CSV cannot execute."""
    src = tmp_path / "src"
    src.mkdir()
    good = encode(sample_image())
    (src / "=HYPERLINK(x).png").write_bytes(good)
    (src / "@SUM(1).png").write_bytes(good)
    (src / "cat_plain.png").write_bytes(good)
    (src / "figure.eps").write_bytes(EPS)
    raw_name = os.fsencode(str(src)) + b"/caf\xe9_\xff.png"  # Latin-1 bytes: not UTF-8
    with open(raw_name, "wb") as handle:
        handle.write(good)
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()
    code, _, err = score_main(capsys, src, "--model", trained_run, "--out", out,
                              "--format", "both", "--max-error-rate", "0.5")
    assert code == 0, err
    csv_rows = pd.read_csv(out)
    parquet = pd.read_parquet(out.with_suffix(".parquet")).set_index("path")
    assert len(csv_rows) == len(parquet) == 5
    escaped = str(src / "caf\\xe9_\\xff.png")
    assert parquet.loc[escaped, "status"] == "ok"  # read by its real bytes, shown escaped
    assert parquet.loc[str(src / "figure.eps"), "error"].startswith("not an image")
    formula = [p for p in parquet.index if "HYPERLINK" in p or "SUM" in p]
    assert len(formula) == 2
    # Paths start with "/", so the cells to neutralise here are error texts and the like; a
    # path that starts with a formula character (a relative SRC) is checked below.
    from cifar_core.score_outputs import spreadsheet_safe

    frame = spreadsheet_safe(pd.DataFrame({"path": ["=cmd|' /C calc'!A0", "+1", "-2", "@x",
                                                    "ok.png"], "confidence": [0.1] * 5}))
    assert list(frame["path"]) == ["'=cmd|' /C calc'!A0", "'+1", "'-2", "'@x", "ok.png"]
    assert list(frame["confidence"]) == [0.1] * 5
    # The summary is written last and names what it describes.
    summary = json.loads((out.parent / "scores.summary.json").read_text())
    import hashlib

    for uri, facts in summary["output_files"].items():
        assert facts["rows"] == 5
        assert facts["sha256"] == hashlib.sha256(Path(uri).read_bytes()).hexdigest()


@pytest.mark.slow
def test_csv_of_a_relative_src_starting_like_a_formula_is_neutralised(trained_run, tmp_path):
    """Run from the folder above SRC with a relative SRC named "-x": every path cell starts
    with "-"; in the CSV each is prefixed with "'", in Parquet it is kept exactly."""
    src = tmp_path / "-x"
    src.mkdir()
    (src / "a.png").write_bytes(encode(sample_image()))
    done = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--model", str(trained_run),
         "--out", str(tmp_path / "o.csv"), "--format", "both", "--quiet", "--", "-x"],
        cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "o.csv").read_text().splitlines()[1].startswith('"\'-x/a.png"')
    assert pd.read_parquet(tmp_path / "o.parquet")["path"].tolist() == ["-x/a.png"]


def test_a_summary_that_does_not_match_its_output_is_refused_by_the_report(tmp_path):
    from cifar_core.report import ReportError, load_score_summaries

    output = tmp_path / "s.csv"
    output.write_text("path\na.png\n")
    import hashlib

    summary = {"src": "x", "model": {}, "files": 1, "ok": 1, "errors": 0, "images_per_s": 1.0,
               "pipeline_s": 1.0, "output_files": {str(output): {
                   "rows": 1, "sha256": hashlib.sha256(output.read_bytes()).hexdigest()}}}
    path = tmp_path / "s.summary.json"
    path.write_text(json.dumps(summary))
    assert load_score_summaries([str(path)])[0]["files"] == 1
    output.write_text("path\nb.png\n")  # a later run replaced the output, not the summary
    with pytest.raises(ReportError, match="different runs"):
        load_score_summaries([str(path)])


def test_a_summary_kept_without_its_output_is_shown_and_says_so(tmp_path):
    from cifar_core.report import load_score_summaries
    from cifar_core.report_render import scoring_display

    summary = {"src": "x", "model": {"model": "M8", "checkpoint": "/runs/M8-1/best",
                                     "selected_trial": {"trial_id": "M8-1"}}, "files": 1, "ok": 1, "errors": 0,
               "images_per_s": 1.0, "pipeline_s": 1.0, "output_files": {
                   str(tmp_path / "gone.csv"): {"rows": 1, "sha256": "0" * 64}}}
    path = tmp_path / "s.summary.json"
    path.write_text(json.dumps(summary))
    loaded = load_score_summaries([str(path)])
    assert loaded[0]["outputs_absent"] == [str(tmp_path / "gone.csv")]
    shown = scoring_display(loaded)
    assert shown["outputs"].tolist() == ["not present here (figures from the summary)"]
    assert shown["trial"].tolist() == ["M8-1"]


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0"), (["--limit", "0"], "limit=0"),
    (["--gpus-per-actor", "nan"], "--gpus-per-actor nan"),
    (["--cpus-per-actor", "-1"], "--cpus-per-actor -1.0"),
    (["--decode-cpus", "0"], "--decode-cpus 0.0"), (["--max-pixels", "0"], "--max-pixels 0"),
    (["--max-error-rate", "nan"], "--max-error-rate=nan"),
    (["--s3-endpoint", "localhost:9000"], "--s3-endpoint 'localhost:9000'"),
    (["--format", "parquet", "--out", "s3://no-such-bucket/x.parquet"], "no-such-bucket"),
])
def test_bad_options_exit_2_before_ray(samples, trained_run, tmp_path, capsys, s3_bucket,
                                       argv, message):
    import ray

    ray_was_running = ray.is_initialized()
    out = ["--out", str(tmp_path / "o.csv")] if "--out" not in argv else []
    code, _, err = score_main(capsys, samples, "--model", trained_run, *out, *argv)
    assert code == 2 and message in err, err
    assert ray.is_initialized() == ray_was_running and not (tmp_path / "o.csv").exists()


@pytest.mark.slow
def test_an_s3_outage_mid_job_fails_clearly_and_a_rerun_completes(ray_module, samples,
                                                                  trained_run, tmp_path):
    """The store stops answering after the job has listed SRC: the job fails saying so, OUT
    is not written; the same job run again once the store is back scores every file."""
    from moto.server import ThreadedMotoServer

    from cifar_core import storage
    from cifar_core.scoring import ScoreOptions, execute, plan_scoring
    from tests.conftest import _free_port

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    storage.s3_client(endpoint).create_bucket(Bucket="photos")
    storage.upload_tree(samples, "s3://photos/in", endpoint)
    out = tmp_path / "scores.csv"
    plan = plan_scoring("s3://photos/in", str(trained_run), str(out),
                        ScoreOptions(endpoint=endpoint, progress_interval_s=0))
    server.stop()  # the outage, after the listing
    with pytest.raises(Exception) as raised:
        execute(plan, log=lambda _: None)
    assert storage.unreachable(raised.value), raised.value
    assert not out.exists() and not (tmp_path / "scores.summary.json").exists()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()  # moto keeps its buckets in this process: the store is back as it was
    try:
        summary = execute(plan, log=lambda _: None)
    finally:
        server.stop()
    assert summary.files == summary.ok == 50 and len(pd.read_csv(out)) == 50


def test_progress_lines_give_files_rate_and_eta(ray_module, samples, trained_run, tmp_path):
    import re

    from cifar_core.scoring import ScoreOptions, execute, plan_scoring

    plan = plan_scoring(str(samples), str(trained_run), str(tmp_path / "s.csv"),
                        ScoreOptions(batch_size=8, progress_interval_s=1e-9))
    lines: list[str] = []
    execute(plan, log=lines.append)
    progress = [line for line in lines if re.fullmatch(
        r"cifar score: \d+/50 files \(\d+%\), \d+ images/s, ETA \d+ s, 0 errors", line)]
    assert progress and progress[-1].startswith("cifar score: 50/50 files (100%)")
    assert progress[-1].endswith("ETA 0 s, 0 errors")


CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_folder_of_huge_16_bit_images_scores_within_a_memory_limit(trained_run, tmp_path):
    """Eight 49-MP 16-bit PNGs (95 kB each on disk, 98 MB each decoded) and eight small
    images, scored by the real job inside a 2 GiB memory cgroup. Decoding them the float way
    peaked at 1.26 GB an image and the job never finished there (281 OOM kills seen)."""
    from tests.imaging import png16_zeros

    group = CGROUP_MEMORY / f"cifar-fleet-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as error:
        pytest.skip(f"no writable cgroup-v1 memory controller here ({error})")
    limit = 2 * 2**30
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        src = tmp_path / "src"
        src.mkdir()
        big = png16_zeros(7000, 7000)
        for index in range(8):
            (src / f"big{index}.png").write_bytes(big)
            (src / f"small{index}.png").write_bytes(encode(sample_image()))
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.score", str(src), "--model", str(trained_run),
             "--out", str(tmp_path / "o.csv"), "--quiet"], cwd=REPO,
            env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        try:
            out, err = job.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            out, err = "", "timed out"
        assert job.returncode == 0, err[-2000:]
        assert "16 files, 16 ok, 0 errors" in out
        assert "oom_kill 0" in (group / "memory.oom_control").read_text()
        assert int((group / "memory.max_usage_in_bytes").read_text()) <= limit
    finally:
        for pid in (group / "cgroup.procs").read_text().split():  # only what this test ran
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        deadline = time.time() + 30
        while (group / "cgroup.procs").read_text().split() and time.time() < deadline:
            time.sleep(0.5)
        group.rmdir()


def test_read_blocks_bound_files_and_bytes():
    from cifar_core.scoring import BLOCK_BYTES, FILES_PER_TASK, blocks

    assert blocks([]) == []
    assert blocks([1] * 600) == [(0, 256), (256, 512), (512, 600)]
    huge = BLOCK_BYTES // 4 + 1
    assert blocks([huge] * 10) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # 3 * huge < 64 MiB
    assert blocks([BLOCK_BYTES * 2, 1]) == [(0, 1), (1, 2)]           # one big file alone
    for start, end in blocks([huge] * 1000):
        assert end - start <= FILES_PER_TASK and (end - start) * huge <= max(BLOCK_BYTES, huge)
