"""How trials are found: random search, Optuna's proposals (deduplicated), resume and errors."""

import json
import sys
from pathlib import Path

import pytest

from cifar_core.plan import SweepError, SweepOptions, plan_cells
from cifar_core.records import scan
from cifar_core.sweep import read_records, run_sweep


def options(tmp_path, **kwargs) -> SweepOptions:
    base = dict(name="search", storage=str(tmp_path / "store"), models=("M1",))
    return SweepOptions(**{**base, **kwargs})


def grid_file(tmp_path, grid: dict) -> str:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    return str(path)


def test_random_search_draws_num_samples_points_per_model_from_its_seed(tmp_path):
    grid = grid_file(tmp_path, {"M1": {"learning_rate": {"loguniform": [0.001, 0.1]},
                                       "dense_units": [50, 100, 200], "momentum": 0.9}})
    cells = plan_cells(options(tmp_path, grid=grid, search="random", num_samples=5), "v")
    assert len(cells) == 5
    for cell in cells:
        assert 0.001 <= cell.settings.learning_rate <= 0.1
        assert cell.settings.dense_units in (50, 100, 200) and cell.settings.momentum == 0.9
    again = plan_cells(options(tmp_path, grid=grid, search="random", num_samples=5), "v")
    assert [c.trial_id for c in again] == [c.trial_id for c in cells]  # re-submission: same
    other = plan_cells(options(tmp_path, grid=grid, search="random", num_samples=5,
                               search_seed=1), "v")
    assert {c.trial_id for c in other}.isdisjoint({c.trial_id for c in cells})
    # Optuna's points are not known up front.
    assert plan_cells(options(tmp_path, grid=grid, search="optuna", num_samples=5), "v") == []


@pytest.mark.parametrize("grid, message", [
    ({"M1": {"momentum": 0.5}}, "M1's space varies nothing"),
    ({"M1": {"conv_filters": [[8, 16], [16, 32]]}}, "numbers, strings, booleans or null"),
    ({"M1": {"learning_rate": {"loguniform": [0.0, 0.1]}}}, "low > 0"),
])
def test_optuna_spaces_are_checked_before_ray(tmp_path, grid, message):
    opts = options(tmp_path, grid=grid_file(tmp_path, grid), search="optuna", num_samples=2)
    with pytest.raises(SweepError, match=message):
        run_sweep(opts)
    assert not Path(opts.sweep_uri).exists() or not list(Path(opts.sweep_uri).rglob("*.json"))


def test_optuna_options_and_missing_extra_fail_naming_the_fix(tmp_path, monkeypatch):
    with pytest.raises(SweepError, match="--seeds 2 with --search optuna"):
        options(tmp_path, search="optuna", seeds=2)
    with pytest.raises(SweepError, match="--search 'bayes'"):
        options(tmp_path, search="bayes")
    with pytest.raises(SweepError, match="--search-startup 0 must be >= 1"):
        options(tmp_path, search="optuna", search_startup=0)
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    grid = grid_file(tmp_path, {"M1": {"learning_rate": [0.01, 0.1]}})
    with pytest.raises(SweepError, match=r'pip install "cifar-fleet\[search\]"'):
        run_sweep(options(tmp_path, grid=grid, search="optuna", num_samples=2))


def test_distinct_optuna_never_hands_out_a_point_twice():
    """A 3-point space asked for 5 trials: 3 distinct points, then the search says finished;
    a point told as evaluated beforehand (a re-submission) is never proposed."""
    from ray import tune

    from cifar_core.search_optuna import DistinctOptunaSearch

    searcher = DistinctOptunaSearch(space={"x": tune.choice([1, 2, 3, 4])},
                                    metric="val_accuracy", mode="max", seed=0)
    searcher.add_evaluated_point({"x": 4}, 0.9)
    seen = []
    for i in range(5):
        config = searcher.suggest(f"t{i}")
        if config == searcher.FINISHED:
            break
        seen.append(config["x"])
        if i % 2:  # some finish before the next suggestion, some are still running
            searcher.on_trial_complete(f"t{i}", {"val_accuracy": config["x"] / 10})
    assert sorted(seen) == [1, 2, 3] and config == searcher.FINISHED


def test_trials_the_scheduler_cut_short_go_to_optuna_as_pruned():
    import optuna
    from ray import tune

    from cifar_core.search_optuna import DistinctOptunaSearch

    store = optuna.storages.InMemoryStorage()
    searcher = DistinctOptunaSearch(space={"x": tune.uniform(0, 1)}, metric="val_accuracy",
                                    mode="max", seed=0, max_epochs=4, storage=store,
                                    study_name="s")
    searcher.add_evaluated_point({"x": 0.5}, 0.6, pruned=True, intermediate_values=[0.5, 0.6])
    for name, epochs in (("cut", 1), ("full", 4)):
        searcher.suggest(name)
        for epoch in range(1, epochs + 1):
            searcher.on_trial_result(name, {"val_accuracy": epoch / 10, "epoch": epoch,
                                            "training_iteration": epoch})
        searcher.on_trial_complete(name, {"val_accuracy": epochs / 10, "epoch": epochs})
    earlier, cut, full = optuna.load_study(study_name="s", storage=store).trials
    assert earlier.state == cut.state == optuna.trial.TrialState.PRUNED
    assert full.state == optuna.trial.TrialState.COMPLETE and full.value == 0.4
    # Steps are epochs from 0, for earlier and live trials alike.
    assert earlier.intermediate_values == {0: 0.5, 1: 0.6} and cut.intermediate_values == {0: 0.1}
    assert sorted(full.intermediate_values) == [0, 1, 2, 3]


def test_optuna_sweep_with_asha_and_resubmission_runs_only_missing_trials(
        tmp_path, image_folder, ray_local):
    grid = grid_file(tmp_path, {"M1": {"learning_rate": {"loguniform": [0.001, 0.3]},
                                       "dense_units": [8, 16]}})
    opts = options(tmp_path, grid=grid, search="optuna", num_samples=4, scheduler="asha",
                   max_concurrent=2, smoke_test=True,
                   overrides={"data": str(image_folder), "num_epochs": 2})
    board = run_sweep(opts)
    first = {r.trial_id: r for r in read_records(opts.sweep_uri)}
    assert len(board) == 4 and len(first) == 4
    for record in first.values():
        assert 0.001 <= record.settings["learning_rate"] <= 0.3
        assert record.settings["dense_units"] in (8, 16) and record.status in (
            "completed", "stopped_by_scheduler")
    # Tune's own view: the proposed settings as config columns.
    from ray.tune import ExperimentAnalysis, ResultGrid

    frame = ResultGrid(ExperimentAnalysis(opts.sweep_uri)).get_dataframe()
    assert {"config/learning_rate", "config/dense_units"} <= set(frame.columns)
    # Re-submitting with 6 samples: the 4 finished trials are told to Optuna and kept; only
    # 2 new points run.
    more = options(tmp_path, grid=grid, search="optuna", num_samples=6, scheduler="asha",
                   max_concurrent=2, smoke_test=True, overrides=opts.overrides)
    run_sweep(more)
    after = {r.trial_id: r for r in read_records(opts.sweep_uri)}
    assert len(after) == 6 and {k: after[k].finished for k in first} == {
        k: r.finished for k, r in first.items()}
    # Nothing left to run: no Tune run at all.
    before = len(list(Path(opts.sweep_uri).glob("*_*")))
    run_sweep(more)
    assert len(scan(opts.sweep_uri).records) == 6
    assert len(list(Path(opts.sweep_uri).glob("*_*"))) == before
