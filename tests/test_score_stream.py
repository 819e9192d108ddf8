"""Scoring's streaming data path: the listing streams, the driver keeps no per-row state,
every listed file comes back once, and the model gives the same rows in the driver or in
actors (cifar_core/score_source.py, score_outputs.Tally, scoring.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
from cifar_core import listing
from cifar_core.settings import CLASS_NAMES
from tests.imaging import encode, sample_image
from tests.test_score import ray_module, samples, score_main  # noqa: F401,F811  (fixtures)


def test_confusion_summary_matches_scikit_learn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from cifar_core.evaluate import classification_summary

    rng = np.random.default_rng(0)
    for _ in range(50):
        size = int(rng.integers(1, 200))
        truth = rng.integers(0, 10, size)
        guess = np.where(rng.random(size) < 0.5, truth, rng.integers(0, rng.integers(1, 11),
                                                                      size))
        summary = classification_summary(truth, guess)
        precision, recall, f1, support = precision_recall_fscore_support(
            truth, guess, labels=list(range(10)), zero_division=0)
        assert summary["accuracy"] == pytest.approx(float((truth == guess).mean()))
        assert summary["confusion_matrix"] == confusion_matrix(
            truth, guess, labels=list(range(10))).tolist()
        for index, name in enumerate(CLASS_NAMES):
            facts = summary["per_class"][name]
            assert facts["precision"] == pytest.approx(precision[index])
            assert facts["recall"] == pytest.approx(recall[index])
            assert facts["f1"] == pytest.approx(f1[index])
            assert facts["support"] == support[index]


def test_the_listing_yields_its_first_block_before_the_walk_ends(tmp_path, monkeypatch):
    """A walk that would fail after 600 files has already handed on its first blocks: the
    listing streams instead of collecting everything first."""
    from cifar_core import score_source

    def walk(src, endpoint=None):
        for index in range(600):
            yield listing._row(f"{src}/{index:05d}.png", f"{index:05d}.png", size=10)
        raise OSError("the disk went away")

    monkeypatch.setattr(score_source, "iter_source", walk)
    blocks = score_source.listing_blocks("/x", None, None, rows_per_block=256)
    first, second = next(blocks), next(blocks)
    assert first.num_rows == second.num_rows == 256
    assert first.column("seq").to_pylist() == list(range(256))
    assert not any(first.column("last").to_pylist())
    with pytest.raises(OSError, match="disk went away"):
        next(blocks)


def test_the_last_row_is_marked_and_limit_stops_the_walk(tmp_path):
    from cifar_core.score_source import listing_blocks

    for index in range(7):
        (tmp_path / f"{index}.png").write_bytes(b"x")
    tables = list(listing_blocks(str(tmp_path), 5, None, rows_per_block=2))
    rows = pa.concat_tables(tables)
    assert [t.num_rows for t in tables] == [2, 2, 1]
    assert rows.column("seq").to_pylist() == [0, 1, 2, 3, 4]
    assert rows.column("last").to_pylist() == [False] * 4 + [True]
    assert [Path(p).name for p in rows.column("path").to_pylist()] == [
        f"{i}.png" for i in range(5)]


def test_the_walk_order_is_by_name_in_each_folder(tmp_path):
    for name in ("b/2.png", "b/1.png", "a/z.png", "c.png", "a.png", "a/b/y.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    relative = [str(Path(row["path"]).relative_to(tmp_path))
                for row in listing.iter_source(str(tmp_path))]
    assert relative == ["a.png", "c.png", "a/z.png", "a/b/y.png", "b/1.png", "b/2.png"]


def _table(seq, last, status=None, label=None, predicted=None, error=None):
    count = len(seq)
    return pa.table({
        "seq": pa.array(seq, pa.int64()), "last": pa.array(last),
        "status": pa.array(status or ["ok"] * count),
        "error": pa.array(error or [None] * count, pa.string()),
        "label": pa.array(label or [None] * count, pa.string()),
        "predicted_class": pa.array(predicted or ["cat"] * count, pa.string()),
        "read_s": pa.array([0.5] * count)})


def test_the_tally_counts_as_rows_stream_and_refuses_lost_or_repeated_rows():
    from cifar_core.score_outputs import Tally

    tally = Tally()
    tally.add(_table([0, 1, 2], [False] * 3, status=["ok", "error", "ok"],
                     label=["cat", "dog", None], predicted=["cat", None, "dog"],
                     error=[None, "corrupt image: bad", None]))
    tally.add(_table([3], [True], label=["dog"], predicted=["dog"]))
    assert (tally.files, tally.errors, tally.labelled, tally.complete) == (4, 1, 3, True)
    assert tally.kinds == {"corrupt image": 1} and tally.stage_s["read"] == 2.0
    labels = tally.labels()
    assert labels["scored"] == 2 and labels["accuracy"] == 1.0  # the failed "dog" is not scored
    with pytest.raises(RuntimeError, match="out of order or twice"):
        tally.add(_table([4], [False]))  # after the last row
    skipped = Tally()
    skipped.add(_table([0, 1], [False, False]))
    with pytest.raises(RuntimeError, match="out of order or twice"):
        skipped.add(_table([3], [True]))  # row 2 was lost
    assert Tally().labels() is None


@pytest.mark.slow
def test_actors_and_driver_give_the_same_rows(ray_module, samples, trained_run, tmp_path,
                                              capsys):
    """The model in the job's process (the default for one CPU predictor) and in two Ray
    actors: the same rows, in the listing's order, and the same summary."""
    rows = {}
    for place, extra in (("driver", []),
                         ("actors", ["--concurrency", "2", "--cpus-per-actor", "0.5"])):
        out = tmp_path / f"{place}.parquet"
        code, _, err = score_main(capsys, samples, "--model", trained_run, "--out", out,
                                  "--batch-size", "16", "--predict-in", place, *extra)
        assert code == 0, err
        rows[place] = pd.read_parquet(out)
        summary = json.loads((tmp_path / f"{place}.summary.json").read_text())
        assert summary["files"] == 50 and summary["options"]["predict_in"] == place
    assert list(rows["driver"]["path"]) == sorted(rows["driver"]["path"])  # one folder: by name
    pd.testing.assert_frame_equal(rows["driver"], rows["actors"], check_exact=False,
                                  atol=1e-6)


def test_predict_in_driver_refuses_several_predictors(samples, trained_run, tmp_path, capsys):
    code, _, err = score_main(capsys, samples, "--model", trained_run, "--out",
                              tmp_path / "o.csv", "--predict-in", "driver", "--concurrency", "2")
    assert code == 2 and "--predict-in driver" in err


def test_actors_that_leave_no_cpu_for_decoding_are_refused(ray_module, samples, trained_run,
                                                          tmp_path, capsys):
    """Two 1-CPU actors on a 2-CPU Ray would leave the listing and decoding no CPU: Ray Data
    would wait for ever (seen: a test hung until killed). Refused, naming the options."""
    code, _, err = score_main(capsys, samples, "--model", trained_run, "--out",
                              tmp_path / "o.csv", "--concurrency", "2")
    assert code == 2 and "lower --concurrency or --cpus-per-actor" in err, err
    # A GPU that no node of this (CPU-only, private) Ray has would keep the actor pending.
    code, _, err = score_main(capsys, samples, "--model", trained_run, "--out",
                              tmp_path / "o.csv", "--gpus-per-actor", "1")
    assert code == 2 and "--gpus-per-actor 1: a predictor actor asks for" in err, err
    assert not (tmp_path / "o.csv").exists()


def test_a_folder_without_labels_still_has_a_label_column(ray_module, trained_run, tmp_path,
                                                          capsys):
    src = tmp_path / "photos"
    src.mkdir()
    for index in range(3):
        (src / f"IMG_{index}.png").write_bytes(encode(sample_image()))
    out = tmp_path / "o.csv"
    code, _, err = score_main(capsys, src, "--model", trained_run, "--out", out)
    assert code == 0, err
    frame = pd.read_csv(out)
    assert list(frame.columns)[:2] == ["path", "label"] and frame["label"].isna().all()
    assert json.loads((tmp_path / "o.summary.json").read_text())["labels"] is None


def test_model_threads_that_can_no_longer_apply_are_refused(samples, trained_run, tmp_path):
    """In the driver, --model-threads must be set before TensorFlow first runs; where it
    already has (a library caller), the option is refused rather than silently ignored."""
    import tensorflow as tf

    from cifar_core.scoring import ScoreOptions, ScoringError, plan_scoring

    float(tf.reduce_sum(tf.ones(3)))  # TensorFlow has run in this process
    threads = tf.config.threading.get_intra_op_parallelism_threads() + 3
    with pytest.raises(ScoringError, match="--model-threads"):
        plan_scoring(str(samples), str(trained_run), str(tmp_path / "o.csv"),
                     ScoreOptions(model_threads=threads))
