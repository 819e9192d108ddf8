"""The tuning job: smoke sweep of the ladder, ASHA, S3 storage, dedupe, crash and driver kill."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cifar_core.plan import SweepOptions, check_one_data_source, plan_cells, trial_order
from cifar_core.provenance import code_version
from cifar_core.records import TrialRecord, scan
from cifar_core.search import CellBook

from cifar_core.sweep import read_records, record_unfinished, run_sweep

REPO = Path(__file__).resolve().parent.parent


def options(tmp_path, **kwargs) -> SweepOptions:
    base = dict(name="sweep", storage=str(tmp_path / "store"), models=("M1",), grid="seed")
    return SweepOptions(**{**base, **kwargs})


def write_grid(path: Path, grid: dict) -> str:
    path.write_text(json.dumps(grid))
    return str(path)


@pytest.mark.slow
def test_smoke_sweep_runs_every_model(tmp_path, image_folder, ray_local):
    opts = options(tmp_path, models=("M1", "M2", "M4", "M5", "M6", "M7"), smoke_test=True,
                   overrides={"data": str(image_folder)})
    board = run_sweep(opts)
    assert len(board) == 6 and set(board["status"]) == {"completed"}
    for record in read_records(opts.sweep_uri):
        best = Path(record.checkpoint_uri)
        assert (best / "model.keras").exists() and (best / "evaluation.json").exists()
        assert record.test_accuracy is not None and record.epochs_run >= 1
        assert record.history and {"loss", "val_accuracy"} <= set(record.history[0])
        assert record.provenance["git_commit"] and record.settings["model"] == record.model
    m7 = next(r for r in read_records(opts.sweep_uri) if r.model == "M7")
    assert [m["phase"] for m in m7.history] == [1, 2]  # both phases ran


def test_resubmitting_runs_only_missing_cells(tmp_path, image_folder, ray_local):
    grid = write_grid(tmp_path / "grid.json", {"M1": {"learning_rate": [0.01, 0.05]}})
    opts = options(tmp_path, grid=grid, overrides={"data": str(image_folder), "num_epochs": 1})
    run_sweep(opts)
    first = {r.trial_id: r.finished for r in read_records(opts.sweep_uri)}
    assert len(first) == 2
    # Tune's own view carries the varied settings (issue 18), keyed by the cell id.
    from ray.tune import ExperimentAnalysis, ResultGrid
    frame = ResultGrid(ExperimentAnalysis(opts.sweep_uri)).get_dataframe()
    by_cell = dict(zip(frame["config/trial_id"], frame["config/learning_rate"]))
    assert by_cell == {r.trial_id: r.settings["learning_rate"]
                       for r in read_records(opts.sweep_uri)}
    assert set(frame["config/model"]) == {"M1"}
    # Extend the grid: only the new cell runs; the finished ones keep their records.
    grid = write_grid(tmp_path / "grid.json", {"M1": {"learning_rate": [0.01, 0.05, 0.1]}})
    extended = options(tmp_path, grid=grid, overrides=opts.overrides)
    board = run_sweep(extended)
    assert len(board) == 3
    again = {r.trial_id: r.finished for r in read_records(opts.sweep_uri)}
    assert {k: again[k] for k in first} == first
    # After a code change the same settings are new cells (ids hash the code version): the
    # sweep names the earlier trials they match, so a re-run from epoch 0 is no surprise.
    assert scan(extended.sweep_uri).earlier_versions(plan_cells(extended, code_version())) == []
    newer = plan_cells(extended, "a-later-commit")
    lines = scan(extended.sweep_uri).earlier_versions(newer)
    assert len(lines) == 3 and all("completed at code version" in line for line in lines)
    # An interrupted trial has checkpoints but no record: named with the epoch it reached.
    next(Path(opts.sweep_uri, "trials").glob("*/trial.json")).unlink()
    lines = scan(extended.sweep_uri).earlier_versions(newer)
    assert len(lines) == 3
    assert sum("interrupted at epoch 1 " in line and "starts over" in line
               for line in lines) == 1


def test_asha_stops_weak_trials_early_and_records_why(tmp_path, image_folder, ray_local):
    rates = [0.1, 1e-6, 2e-6, 0.05, 3e-6, 4e-6, 0.08, 5e-6, 6e-6]
    grid = write_grid(tmp_path / "grid.json", {"M1": {"learning_rate": rates}})
    # No retries: a trial started where a stopped one ran must not fail (reused processes).
    opts = options(tmp_path, grid=grid, scheduler="asha", max_concurrent=2, max_failures=0,
                   overrides={"data": str(image_folder), "num_epochs": 9, "batch_size": 32})
    run_sweep(opts)
    records = read_records(opts.sweep_uri)
    stopped = [r for r in records if r.status == "stopped_by_scheduler"]
    completed = [r for r in records if r.status == "completed"]
    assert len(records) == len(rates) and stopped and completed
    assert len(stopped) + len(completed) == len(rates), [r.error for r in records]
    assert all(r.epochs_run < 9 and r.stop_reason == "stopped_by_scheduler" for r in stopped)
    assert all(r.epochs_run == 9 and r.test_accuracy is not None for r in completed)
    assert all(r.test_accuracy is None for r in stopped)  # never evaluated, never selected
    assert all(r.provenance["git_commit"] for r in records)


def test_sweep_on_s3_storage_and_resubmit(tmp_path, image_folder, s3_bucket, ray_local):
    import boto3

    opts = options(tmp_path, storage=f"s3://{s3_bucket}/sweeps",
                   overrides={"data": str(image_folder), "num_epochs": 1})
    run_sweep(opts)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket, Prefix="sweeps/sweep/")["Contents"]}
    (record,) = read_records(opts.sweep_uri)
    prefix = f"sweeps/sweep/trials/{record.trial_id}"
    assert {f"{prefix}/trial.json", f"{prefix}/best/model.keras",
            f"{prefix}/best/evaluation.json"} <= keys
    assert any("/checkpoint_" in key for key in keys)  # Ray's own checkpoints, for retries
    assert record.checkpoint_uri == f"s3://{s3_bucket}/{prefix}/best"
    # Re-submitting finds the finished cell in the bucket and runs nothing.
    board = run_sweep(opts)
    assert len(board) == 1 and read_records(opts.sweep_uri)[0].finished == record.finished


def test_tune_shows_the_persons_view_and_ray_output_only_with_verbose(tmp_path, image_folder):
    """Default output: progress lines, the leaderboard, where results went; no Tune tables,
    Keras step lines, colour codes or Ray INFO lines (those come with --verbose)."""
    command = [sys.executable, "-m", "jobs.tune", "--smoke-test", "--models", "M1,M2",
               "--data", str(image_folder), "--storage", str(tmp_path), "--name", "quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) <= 12, "\n".join(lines)
    assert "\x1b[" not in done.stdout + done.stderr
    assert sum("trials done" in line for line in lines) == 2  # one per ended trial (no TTY)
    assert "2/2 trials done, 0 running, 0 pending" in done.stderr
    assert f"results in {tmp_path}" in done.stdout
    loud = subprocess.run(command + ["--name", "loud", "--verbose"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Configuration for experiment" in loud.stdout + loud.stderr
    assert len((loud.stdout + loud.stderr).splitlines()) > len(lines)


def test_invalid_grid_exits_2_naming_model_field_and_value(tmp_path, image_folder):
    grid = write_grid(tmp_path / "grid.json", {"M4": {"dropout_rate": [0.5, 1.5]}})
    done = subprocess.run(
        [sys.executable, "-m", "jobs.tune", "--models", "M4", "--grid", grid,
         "--data", str(image_folder), "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert "model M4" in done.stderr and "dropout_rate=1.5" in done.stderr
    assert not (tmp_path / "ladder").exists()  # nothing was started or written


def test_invalid_asha_options_exit_2_before_ray(tmp_path, image_folder):
    done = subprocess.run(
        [sys.executable, "-m", "jobs.tune", "--models", "M1", "--grid", "seed",
         "--scheduler", "asha", "--reduction-factor", "1", "--data", str(image_folder),
         "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "--reduction-factor 1" in done.stderr
    assert not (tmp_path / "ladder").exists()


BAD_GRIDS = {
    "empty-axis": ('{"M1": {"learning_rate": []}}', "M1.learning_rate is an empty list"),
    "model-to-list": ('{"M1": [0.1, 0.2]}', "model M1 maps to list"),
    "not-an-object": ("[1, 2]", "expected an object"),
    "bad-range": ('{"M1": {"learning_rate": {"loguniform": [0, 1]}}}', "loguniform needs"),
    "unknown-sampler": ('{"M1": {"learning_rate": {"gauss": [0, 1]}}}', "not a sampled range"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_grid_files_exit_2_naming_the_problem(tmp_path, image_folder, capsys, case):
    import ray

    from jobs.tune import main

    ray_was_running = ray.is_initialized()
    text, message = BAD_GRIDS[case]
    grid = tmp_path / "grid.json"
    grid.write_text(text)
    code = main(["--models", "M1", "--grid", str(grid), "--data", str(image_folder),
                 "--storage", str(tmp_path / "store")])
    assert code == 2 and message in capsys.readouterr().err
    assert ray.is_initialized() == ray_was_running and not (tmp_path / "store").exists()


def test_a_grid_file_that_is_not_utf8_exits_2(tmp_path, capsys):
    from jobs.tune import main

    grid = tmp_path / "grid.json"
    grid.write_bytes(b'{"M1": {"learning_rate": [0.1]}, "x": "\xff\xfe"}')
    assert main(["--models", "M1", "--grid", str(grid), "--storage", str(tmp_path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--models", ","], "--models"),
    (["--models", "M1,M3"], "unknown model(s) ['M3']"),
    (["--epochs-scale", "nan"], "--epochs-scale nan"),
    (["--epochs-scale", "-1"], "--epochs-scale -1.0"),
    (["--resources", "M1=nan,0"], "CPU=nan"),
    (["--resources", "M1=1,-1"], "GPU=-1.0"),
    (["--resources", "M1=inf,0"], "CPU=inf"),
    (["--s3-endpoint", "127.0.0.1:9000"], "--s3-endpoint '127.0.0.1:9000'"),
    (["--models", "M7", "--m7-workers", "3"], "--m7-workers 3"),
    (["--name", "../x"], "--name '../x'"),
    (["--name", "exp#1"], "--name 'exp#1'"),
    (["--max-concurrent", "0"], "--max-concurrent 0"),
    (["--seeds", "0"], "--seeds 0"),
    (["--num-samples", "0"], "--num-samples 0"),
    (["--grace-period", "0"], "--grace-period 0"),
    (["--max-failures", "-2"], "--max-failures -2"),
    (["--learning-rate", "nan"], "learning_rate=nan"),
])
def test_bad_options_exit_2_before_ray_naming_option_and_value(tmp_path, image_folder, capsys,
                                                               argv, message):
    import ray

    from jobs.tune import main

    ray_was_running = ray.is_initialized()
    code = main(["--grid", "seed", "--data", str(image_folder), "--storage",
                 str(tmp_path / "store"), *(["--models", "M1"] if "--models" not in argv
                                           else []), *argv])
    assert code == 2, capsys.readouterr()
    assert message in capsys.readouterr().err
    assert ray.is_initialized() == ray_was_running and not (tmp_path / "store").exists()


def test_resources_no_node_can_hold_exit_2_instead_of_pending_forever(tmp_path, image_folder,
                                                                      capsys):
    from jobs.tune import main

    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.tune", "--models", "M1", "--grid", "seed",
         "--resources", "M1=64,0", "--data", str(image_folder), "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "asks for {'CPU': 64.0" in done.stderr and "nothing would ever run it" in done.stderr
    assert not list(tmp_path.glob("ladder/trials/*"))


def test_trials_start_in_a_fixed_shuffle_under_asha(tmp_path):
    # The grid's own order (ascending learning rates) is the worst case for asynchronous ASHA.
    grid = write_grid(tmp_path / "grid.json", {"M1": {"learning_rate": [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]}})
    plain = options(tmp_path, grid=grid)
    cells = plan_cells(plain, "v1")
    in_grid_order = [cell.trial_id for cell in cells]
    assert trial_order(cells, plain) == in_grid_order
    asha = options(tmp_path, grid=grid, scheduler="asha")
    shuffled = trial_order(cells, asha)
    assert sorted(shuffled) == sorted(in_grid_order) and shuffled != in_grid_order
    assert trial_order(cells, asha) == shuffled  # the same order on every run


def test_cells_tune_never_created_count_as_interrupted(tmp_path):
    # Under max_concurrent_trials Tune creates trials one by one: a Ctrl-C right after a trial
    # finished leaves the rest out of its results. They must count as interrupted (exit 130,
    # open for --resume), not vanish from the sweep as if it had finished.
    grid = write_grid(tmp_path / "grid.json", {"M1": {"learning_rate": [0.01, 0.02, 0.03]}})
    opts = options(tmp_path, grid=grid)
    cells = plan_cells(opts, "v1")
    finished = cells[0]
    record = TrialRecord(trial_id=finished.trial_id, sweep=opts.name, kind="tune", model="M1",
                         settings=finished.settings.to_dict(), settings_hash=finished.digest,
                         status="completed", stop_reason="completed")
    path = Path(opts.sweep_uri) / "trials" / finished.trial_id / "trial.json"
    path.parent.mkdir(parents=True)
    path.write_text(record.to_json())
    records, missing = record_unfinished([], CellBook({c.trial_id: c for c in cells}),
                                         stopped_by_scheduler=set(), storage_root=opts.storage)
    assert sorted(missing) == sorted(cell.trial_id for cell in cells[1:])
    assert list(records) == [finished.trial_id]


def test_a_trial_interrupted_before_its_first_report_counts_as_interrupted(tmp_path):
    # A Ctrl-C between Tune creating a trial and its first result: Tune hands back a Result
    # whose config is None (no result.json yet). Seen once: record_unfinished failed on it
    # with a TypeError instead of ending the sweep resumable.
    from types import SimpleNamespace

    grid = write_grid(tmp_path / "grid.json", {"M1": {"learning_rate": [0.01, 0.02]}})
    opts = options(tmp_path, grid=grid)
    cells = plan_cells(opts, "v1")
    started = SimpleNamespace(config={"trial_id": cells[0].trial_id}, error=None,
                              metrics_dataframe=None, checkpoint=None)
    records, missing = record_unfinished([started, SimpleNamespace(config=None)],
                                         CellBook({c.trial_id: c for c in cells}),
                                         stopped_by_scheduler=set(), storage_root=opts.storage)
    assert sorted(missing) == sorted(cell.trial_id for cell in cells) and records == {}


def test_cells_are_validated_and_hashed_before_ray(tmp_path, image_folder):
    opts = options(tmp_path, models=("M1", "M4"), grid="default", seeds=2,
                   overrides={"data": str(image_folder)})
    cells = plan_cells(opts, "abc123")
    assert len(cells) == 2 * (6 + 12) and len({c.trial_id for c in cells}) == len(cells)
    assert {c.settings.seed for c in cells} == {0, 1}
    check_one_data_source(cells)  # seeds vary, the data split does not: one load serves all
    assert plan_cells(opts, "abc123") == cells                 # stable ids
    assert plan_cells(opts, "def456")[0].digest != cells[0].digest  # code version counts


# ---------------------------------------------------------------------------- fault injection
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so tests end only what they started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_crashed_trial_is_retried_from_its_checkpoint(tmp_path, image_folder, ray_local):
    opts = options(tmp_path, max_failures=1, overrides={
        "data": str(image_folder), "num_epochs": 6, "batch_size": 8})
    killed = []

    def kill_trial_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            # Kill once Tune's driver has taken in the first report (result.json has a line),
            # so it knows the checkpoint; a kill before that restarts from scratch, rightly.
            results = list(Path(opts.sweep_uri).glob("M1-*/result.json"))
            if results and results[0].read_text().strip():
                for pid in descendants(os.getpid()):
                    if cmdline(pid).startswith("ray::ImplicitFunc"):
                        os.kill(pid, signal.SIGKILL)  # a real crash of the trial's process
                        killed.append(pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_trial_after_first_checkpoint, daemon=True)
    killer.start()
    run_sweep(opts)
    killer.join(timeout=5)
    assert killed, "the trial finished before it could be killed"
    (record,) = read_records(opts.sweep_uri)
    assert record.status == "completed" and record.epochs_run == 6
    assert [m["epoch"] for m in record.history] == [1, 2, 3, 4, 5, 6]
    # Ray's log of reports (each line carries the reporting process's pid): no epoch twice, and
    # the retried process's first epoch comes after the checkpointed one (a retry from scratch
    # would report epoch 1 again).
    (result_file,) = Path(opts.sweep_uri).glob("M1-*/result.json")
    lines = [json.loads(line) for line in result_file.read_text().splitlines()]
    epochs = [line["epoch"] for line in lines]
    assert epochs == list(range(epochs[0], 7))
    retry = [line for line in lines if line["pid"] not in killed]
    assert retry and retry[0]["epoch"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path, image_folder, stop):
    # SIGINT lets Tune wind down and hand back results: the trial it cut short must not be
    # mistaken for one the scheduler stopped (that record would make --resume skip it).
    grid = write_grid(tmp_path / "grid.json", {"M1": {"learning_rate": [0.01, 0.02, 0.03]}})
    command = [sys.executable, "-m", "jobs.tune", "--models", "M1", "--grid", grid,
               "--data", str(image_folder), "--num-epochs", "3", "--batch-size", "8",
               "--max-concurrent", "1", "--storage", str(tmp_path / "store"),
               "--name", "killed"]
    trials = tmp_path / "store" / "killed" / "trials"
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    started = []
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not list(trials.glob("*/trial.json")):
            started = descendants(driver.pid) or started
            time.sleep(0.2)
        assert list(trials.glob("*/trial.json")), "no trial finished before the deadline"
        started = descendants(driver.pid)
        os.kill(driver.pid, stop)
        code = driver.wait(timeout=300)
    finally:
        for pid in [driver.pid, *started]:  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert code == (130 if stop == signal.SIGINT else -signal.SIGKILL)
    before = {p.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/trial.json")}
    assert 1 <= len(before) < 3
    assert {TrialRecord.from_json(p.read_text()).status
            for p in trials.glob("*/trial.json")} == {"completed"}
    done = subprocess.run(command + ["--resume"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming the interrupted sweep" in done.stdout + done.stderr
    records = [TrialRecord.from_json(p.read_text()) for p in trials.glob("*/trial.json")]
    assert len(records) == 3 and {r.status for r in records} == {"completed"}
    after = {p.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/trial.json")}
    assert {k: after[k] for k in before} == before  # finished trials were not run again


@pytest.mark.slow
def test_m7_trial_runs_as_a_multi_worker_train_run(tmp_path, image_folder):
    # Its own Ray with 4 logical CPUs: the Tune trial (1) drives 2 Train workers (1 each).
    script = ("import sys, cifar_core; from cifar_core.ray_glue import connect_ray;"
              "connect_ray(None, dashboard=True, num_cpus=4);"
              "from jobs.tune import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run(
        [sys.executable, "-c", script, "--smoke-test", "--models", "M7", "--m7-workers", "2",
         "--data", str(image_folder), "--storage", str(tmp_path), "--name", "m7",
         "--tracking", "tensorboard"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = read_records(str(tmp_path / "m7"))
    assert record.kind == "finetune" and record.status == "completed"
    assert [m["phase"] for m in record.history] == [1, 2]
    assert record.test_accuracy is not None and (Path(record.checkpoint_uri) / "model.keras").exists()
    # Tracking sees a Train run's epochs as it sees any trial's.
    from tests.test_tracking import read_events

    (events_file,) = (tmp_path / "m7").glob("*/events.out.tfevents.*")
    hparams, _, events = read_events(events_file)
    assert hparams["trial_id"] == record.trial_id
    assert [(s.step, s.value) for s in events.Scalars("ray/tune/val_accuracy")] == [
        (m["epoch"], pytest.approx(m["val_accuracy"], rel=1e-6)) for m in record.history]


def test_a_damaged_record_is_named_and_its_trial_runs_again(tmp_path, image_folder, ray_local,
                                                            capsys):
    from jobs.tune import main

    argv = ["--models", "M1", "--grid", "seed", "--data", str(image_folder), "--num-epochs",
            "1", "--batch-size", "32", "--storage", str(tmp_path), "--name", "damaged"]
    assert main(argv) == 0
    (record,) = (tmp_path / "damaged" / "trials").glob("*/trial.json")
    whole = record.read_text()
    record.write_text(whole[: len(whole) // 3])  # a crash or a full disk cut it
    capsys.readouterr()
    assert main(argv) == 0  # no JSONDecodeError: the trial counts as not done and runs again
    err = capsys.readouterr().err
    assert f"damaged trial record {record}" in err and "runs again" in err
    assert TrialRecord.from_json(record.read_text()).status == "completed"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_storage_outage_mid_sweep_fails_clearly_and_resume_loses_nothing(tmp_path,
                                                                           image_folder):
    """The sweep's S3 store stops answering after the first trial's record is written: the
    job stops (exit 1) saying so; with the store back, --resume runs only the other trial."""
    from moto.server import ThreadedMotoServer

    from cifar_core import storage
    from tests.conftest import _free_port

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    storage.s3_client(endpoint).create_bucket(Bucket="sweeps")
    grid = write_grid(tmp_path / "grid.json", {"M1": {"learning_rate": [0.01, 0.02]}})
    command = [sys.executable, "-m", "jobs.tune", "--models", "M1", "--grid", grid,
               "--data", str(image_folder), "--num-epochs", "2", "--batch-size", "16",
               "--max-concurrent", "1", "--max-failures", "0", "--storage", "s3://sweeps/s",
               "--name", "outage", "--s3-endpoint", endpoint]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("AWS_ENDPOINT_URL", None)
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and first is None:
            records = storage.find_files("s3://sweeps/s/outage/trials", "trial.json", endpoint)
            first = records[0] if records else None
            time.sleep(0.5)
        assert first, "no trial finished"
        before = storage.s3_client(endpoint).head_object(
            Bucket="sweeps", Key=storage.split_s3_object(first)[1])["ETag"]
        server.stop()  # the outage
        out, err = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 1, err[-3000:]
    assert "storage stopped answering" in err and "--resume" in err
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()  # the store is back (moto kept its objects in this process)
    try:
        done = subprocess.run(command + ["--resume"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        records = [TrialRecord.from_json(storage.read_text(uri, endpoint)) for uri in
                   storage.find_files("s3://sweeps/s/outage/trials", "trial.json", endpoint)]
        assert len(records) == 2 and {r.status for r in records} == {"completed"}
        after = storage.s3_client(endpoint).head_object(
            Bucket="sweeps", Key=storage.split_s3_object(first)[1])["ETag"]
        assert after == before  # the finished trial was not run again
    finally:
        server.stop()
