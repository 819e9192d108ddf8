"""Ray Tune's OptunaSearch, made to hand out each point of the space at most once."""

from __future__ import annotations

import json

from ray.tune.search.optuna import OptunaSearch


def _key(point: dict) -> str:
    return json.dumps(point, sort_keys=True, default=str)


class DistinctOptunaSearch(OptunaSearch):
    """OptunaSearch that never hands Tune a point already run or running, and tells Optuna
    which trials a scheduler cut short.

    TPE repeats points of discrete spaces (Optuna's FAQ, "How to ignore duplicated samples");
    two trials of one point would share a cell id and its storage. A repeat is told to Optuna
    at once (the known val_accuracy, or pruned while its twin runs) and Optuna asks again under
    an internal trial id, so only OptunaSearch's public Searcher methods are used.

    A trial that ended before ``max_epochs`` without an error was stopped by ASHA: it goes to
    Optuna as pruned, not as complete with its early val_accuracy. TPE ranks pruned trials
    below complete ones, those that got further first (optuna.samplers.TPESampler), which is
    what ASHA's cut means; as complete trials their one-epoch scores would be compared with
    full runs' as equals.
    """

    def __init__(self, max_epochs: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_epochs = max_epochs
        self.known: dict[str, float] = {}       # point -> val_accuracy
        self.running: dict[str, str] = {}       # Tune trial id -> point
        self.inner: dict[str, str] = {}         # Tune trial id -> OptunaSearch's trial id

    def add_evaluated_point(self, parameters, value, *args, **kwargs):
        self.known[_key(parameters)] = value
        return super().add_evaluated_point(parameters, value, *args, **kwargs)

    def suggest(self, trial_id):
        for attempt in range(100):
            inner = f"{trial_id}~{attempt}"
            config = super().suggest(inner)
            if not isinstance(config, dict):
                return config
            key = _key(config)
            if key not in self.known and key not in self.running.values():
                self.running[trial_id], self.inner[trial_id] = key, inner
                return config
            value = self.known.get(key)
            super().on_trial_complete(
                inner, result=None if value is None else {self.metric: value})
        return self.FINISHED  # (almost) every point of the space has run

    def on_trial_result(self, trial_id, result):
        # Optuna's step is the epoch counted from 0, as add_evaluated_point numbers an earlier
        # trial's per-epoch values; Tune's report count would restart on a resumed trial.
        if "epoch" in result:
            result = {**result, "training_iteration": result["epoch"] - 1}
        return super().on_trial_result(self.inner.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        key = self.running.pop(trial_id, None)
        if key is not None and result and result.get(self.metric) is not None:
            self.known[key] = result[self.metric]
        if (result and not error and self.max_epochs is not None
                and result.get("epoch", self.max_epochs) < self.max_epochs):
            result = None  # cut short by the scheduler: pruned, with its per-epoch values
        return super().on_trial_complete(self.inner.pop(trial_id, trial_id), result=result,
                                         error=error)
