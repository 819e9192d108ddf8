"""What --model names (cifar_core/checkpoints.py): checkpoint, run and sweep folders."""

from __future__ import annotations

import pytest

from cifar_core.checkpoints import CheckpointError, resolve_checkpoint


def test_resolve_checkpoint_run_and_sweep(trained_run, tmp_path):
    from cifar_core.records import COMPLETED, ERRORED, TrialRecord

    best = trained_run / "checkpoints" / "best"
    assert resolve_checkpoint(str(best)).local_dir == best
    assert resolve_checkpoint(str(trained_run)).local_dir == best
    assert resolve_checkpoint(str(best / "model.keras")).local_dir == best

    sweep = tmp_path / "sweep"

    def record(trial_id: str, status: str, accuracy: float | None, checkpoint: str) -> None:
        folder = sweep / "trials" / trial_id
        folder.mkdir(parents=True)
        (folder / "trial.json").write_text(TrialRecord(
            trial_id=trial_id, sweep="sweep", kind="tune", model="M1", settings={},
            settings_hash=trial_id, status=status, stop_reason="completed",
            best_val_accuracy=accuracy, test_accuracy=0.99 if trial_id == "M1-c" else 0.1,
            checkpoint_uri=checkpoint).to_json())

    record("M1-a", COMPLETED, 0.6, str(best))
    record("M1-b", ERRORED, 0.9, str(tmp_path / "nowhere"))          # errored: never chosen
    record("M1-c", COMPLETED, 0.4, str(trained_run / "checkpoints" / "last"))  # best *test*
    (sweep / "trials" / "M1-d").mkdir()
    (sweep / "trials" / "M1-d" / "trial.json").write_text("{half written")
    chosen = resolve_checkpoint(str(sweep))
    assert chosen.local_dir == best
    assert chosen.selected_trial["trial_id"] == "M1-a"
    assert chosen.selected_trial["selected_by"] == "best_val_accuracy"
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "empty"))
