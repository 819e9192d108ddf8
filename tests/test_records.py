"""Records (cifar_core/records.py): the one constructor, reading a sweep once, the best model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cifar_core import storage
from cifar_core.records import (COMPLETED, ERRORED, STOPPED_BY_SCHEDULER, Cell, Outcome,
                                TrialRecord, make_record, scan, select_best)
from cifar_core.settings import Settings

_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and isinstance(args[0], str):
        _OPENED.append(args[0])


sys.addaudithook(_audit)  # counts real file opens while a test has armed _OPENED


def cell(model="M1", digest="aaa", **settings) -> Cell:
    return Cell(Settings.from_dict({"model": model, "data": "d", **settings}), digest,
                sweep="s", sweep_uri="/nowhere", resources={"CPU": 1, "GPU": 0})


def history(*vals: float) -> list[dict]:
    return [{"epoch": i + 1, "val_accuracy": v, "epoch_time_s": 2.0} for i, v in enumerate(vals)]


def test_make_record_derives_best_epoch_stop_reason_and_wall_time():
    record = make_record(cell(), Outcome(COMPLETED, history(0.3, 0.5, 0.4),
                                         ["early_stopped"], {"test_accuracy": 0.45}))
    assert (record.best_val_accuracy, record.best_epoch, record.epochs_run) == (0.5, 2, 3)
    assert record.stop_reason == "early_stopped" and record.test_accuracy == 0.45
    assert record.wall_time_s == 6.0 and record.trial_id == "M1-aaa"
    stopped = make_record(cell(), Outcome(STOPPED_BY_SCHEDULER, history(0.2)))
    assert stopped.stop_reason == "stopped_by_scheduler" and stopped.test_accuracy is None
    errored = make_record(cell(), Outcome(ERRORED, [], error="x" * 5000, wall_time_s=1.234))
    assert errored.stop_reason == "error" and len(errored.error) == 2000
    assert errored.wall_time_s == 1.234 and errored.best_epoch is None
    assert TrialRecord.from_json(record.to_json()) == record


def test_records_written_before_a_settings_field_existed_compare_at_its_default():
    """A field added to Settings later: an older record lacks it and trained with its
    default, so it is the same configuration as a new record at that default."""
    from dataclasses import replace

    from cifar_core.records import configuration, with_current_fields

    new = make_record(cell(), Outcome(COMPLETED, history(0.5)))
    old = replace(new, settings={k: v for k, v in new.settings.items() if k != "momentum"})
    assert configuration(old) == configuration(new)
    assert with_current_fields(old).settings == new.settings
    changed = replace(new, settings={**new.settings, "momentum": 0.5})
    assert configuration(changed) != configuration(new)


def test_records_with_the_old_mixed_precision_flag_compare_in_todays_terms():
    from dataclasses import replace

    from cifar_core.records import configuration, with_current_fields

    new = make_record(cell(), Outcome(COMPLETED, history(0.5)))
    bare = {k: v for k, v in new.settings.items() if k != "precision"}
    old = replace(new, settings={**bare, "mixed_precision": False})
    assert configuration(old) == configuration(new)
    assert with_current_fields(old).settings == new.settings
    half = with_current_fields(replace(new, settings={**bare, "mixed_precision": True}))
    assert half.settings["precision"] == "mixed_float16" and "mixed_precision" not in half.settings
    assert configuration(half) != configuration(new)


@pytest.mark.parametrize("text, problem", [("[]", "JSON object"), ('{"x": 1}', "no trial_id"),
                                           ('{"trial_id": "a", "sta', "")])
def test_damaged_records_are_reported_by_name_and_not_done(tmp_path, text, problem):
    sweep = tmp_path / "sweep"
    good = make_record(cell(digest="good"), Outcome(COMPLETED, history(0.5)))
    for trial_id, body in (("M1-good", good.to_json()), ("M1-bad", text)):
        path = sweep / "trials" / trial_id / "trial.json"
        path.parent.mkdir(parents=True)
        path.write_text(body)
    state = scan(str(sweep))
    assert state.finished() == {"M1-good"}
    (uri, message), = state.damaged.items()
    assert uri.endswith("M1-bad/trial.json") and problem in message


def test_scan_reads_each_record_once_and_finds_the_newest_checkpoint(tmp_path):
    sweep = tmp_path / "sweep"
    for index in range(20):
        record = make_record(cell(digest=f"{index:03d}", seed=index + 1),
                             Outcome(COMPLETED, history(0.1)))
        path = sweep / "trials" / record.trial_id / "trial.json"
        path.parent.mkdir(parents=True)
        path.write_text(record.to_json())
    # Two attempts of an interrupted trial, as Tune names them, with checkpoints at 2 and 5.
    settings = cell(digest="zzz").settings
    for attempt, epoch in (("M1-zzz_0001", 2), ("M1-zzz_0002", 5), ("M1-zzz_0002", 3)):
        last = sweep / attempt / f"checkpoint_00000{epoch}" / "last"
        last.mkdir(parents=True)
        (last / "state.json").write_text(json.dumps({"epoch": epoch}))
        (last / "settings.json").write_text(settings.to_json())
        (last / "provenance.json").write_text(json.dumps({"code_version": "abc"}))
    _OPENED[:] = ["armed"]
    state = scan(str(sweep))
    opened = [p for p in _OPENED[1:] if p.endswith("trial.json")]
    _OPENED.clear()
    assert len(state.records) == 20 and len(opened) == 20 and len(set(opened)) == 20
    newest = state.checkpoints["M1-zzz"]
    assert newest.epoch == 5 and newest.uri.endswith("M1-zzz_0002/checkpoint_000005")
    newer = cell(digest="new")  # same settings at another code version: named, with its epoch
    assert state.earlier_versions([Cell(settings, "new")]) == [
        f"{newer.trial_id}: same settings as M1-zzz, interrupted at epoch 5 at code version "
        "abc; starts over at this version"]


def _record(trial_id, model, val, test, checkpoint, limit=None, seed=0, lr=0.01, val_n=5000):
    settings = {"model": model, "data": "d", "limit": limit, "seed": seed, "learning_rate": lr,
                "validation_fraction": 0.1, "split_seed": 0}
    return TrialRecord(trial_id=trial_id, sweep="sweep", kind="tune", model=model,
                       settings=settings, settings_hash=trial_id, status=COMPLETED,
                       stop_reason="completed", epochs_run=3, best_val_accuracy=val,
                       test_accuracy=test, checkpoint_uri=checkpoint, data={"val": val_n},
                       resources={"CPU": 1, "GPU": 0}, finished="2026-12-01T00:00:00+00:00")


def test_one_data_set_at_two_paths_is_one_validation_pool():
    """The shared data unpacked at different paths on two machines (the committed results):
    their trials compete; another data set's do not."""
    from cifar_core.records import validation_key

    here, there, archive, other = (_record(i, "M4", v, v, None) for i, v in (
        ("M4-here", 0.70), ("M4-there", 0.89), ("M4-archive", 0.60), ("M4-other", 0.99)))
    here.settings["data"] = "/work/data/cifar10"
    there.settings["data"] = "/tmp/cifar-jpeg/cifar10/"
    archive.settings["data"] = "s3://bucket/sets/cifar10.tar.gz"
    other.settings["data"] = "/data/cifar100"
    assert validation_key(here) == validation_key(there) == validation_key(archive)
    assert validation_key(other) != validation_key(here)
    assert select_best([here, there]).record.trial_id == "M4-there"
    there.data = {"val": 1000}  # a different split size: other held-out images
    assert validation_key(there) != validation_key(here)


def test_the_best_model_is_the_same_for_report_score_and_publish(trained_run, tmp_path,
                                                                 s3_bucket):
    """A --limit subset trial has the highest val_accuracy of all, but on 100 held-out images,
    not the full split's 5,000: the report, cifar score and publishing all pick the full-data
    configuration with the best mean over its seeds (they used to pick three different ones)."""
    from cifar_core.checkpoints import resolve_checkpoint
    from cifar_core.publish import publish_report
    from cifar_core.report import build_report

    best = str(trained_run / "checkpoints" / "best")
    records = [
        _record("M1-subset", "M1", 0.95, 0.40, best, limit=1000, val_n=100),
        _record("M4-a0", "M4", 0.74, 0.70, best, seed=0), _record("M4-a1", "M4", 0.72, 0.71,
                                                                  best, seed=1),
        _record("M4-b0", "M4", 0.75, 0.90, best, lr=0.1),   # best single trial, worse mean
        _record("M4-b1", "M4", 0.65, 0.60, best, lr=0.1, seed=1),
    ]
    sweep = tmp_path / "sweep"
    for record in records:
        path = sweep / "trials" / record.trial_id / "trial.json"
        path.parent.mkdir(parents=True)
        path.write_text(record.to_json())
    assert select_best(records).record.trial_id == "M4-a0"
    report = build_report(records, tmp_path / "report")
    assert report.leaderboard.iloc[0]["best_trial"] == "M4-a0"
    assert report.winner().trial_id == "M4-a0"
    assert resolve_checkpoint(str(sweep)).selected_trial["trial_id"] == "M4-a0"
    manifest = publish_report(report, f"s3://{s3_bucket}/pub").manifest
    assert manifest["winner"]["trial_id"] == "M4-a0"
    assert manifest["best_checkpoints"]["M4"]["trial_id"] == "M4-a0"
