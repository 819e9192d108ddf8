"""How a sweep's trials are found: planned cells (grid, random) or Optuna's proposals.

A ``TunePlan`` is one Tune run: its search space, optional searcher, trial count and a
``CellBook`` that gives any trial's ``Cell`` from its Tune config. The grid and random searches
have one plan whose cells are all known up front (``plan.plan_cells``). ``--search optuna`` has
one plan per model: Ray Tune's ``OptunaSearch`` (TPE, seeded by ``--search-seed``) proposes
``--num-samples`` points of the model's plain-dict space while the sweep runs, each a cell
hashed like any other, so records, resume and the report do not care who chose the point.

Re-submission and ``--resume`` under Optuna: the model's finished trials in the sweep's storage
(same code version, same fixed settings) are told to Optuna as evaluated points and count
towards ``--num-samples``, so a re-submission runs only the missing trials and proposes them
from everything seen so far; trials an interruption cut short are proposed again first and
continue from their checkpoints. Concurrent trials make the proposals depend on the order
results arrive, so a search is seeded but not repeatable point for point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from cifar_core.plan import SweepError, SweepOptions, cell_for, model_space
from cifar_core.records import FINISHED, Cell, SweepState

log = logging.getLogger(__name__)


@dataclass
class CellBook:
    """The cells of one Tune run, found from a trial's config: by ``trial_id`` for planned
    cells, else built from the proposed point (``make``) and remembered."""

    cells: dict[str, Cell] = field(default_factory=dict)
    make: Callable[[dict], Cell] | None = None

    def __call__(self, config: dict) -> Cell:
        if "trial_id" in config:
            return self.cells[config["trial_id"]]
        cell = self.make(config)
        return self.cells.setdefault(cell.trial_id, cell)


@dataclass
class TunePlan:
    """One Tune run of a sweep."""

    book: CellBook
    param_space: dict
    num_samples: int = 1
    searcher: Any = None          # a ray.tune.search.Searcher, or None (the param_space grid)
    sample: Cell | None = None    # any cell of the run (resources, epochs, data source)

    @property
    def max_epochs(self) -> int:
        cells = list(self.book.cells.values()) or [self.sample]
        return max(c.settings.total_epochs for c in cells)


# ---------------------------------------------------------------------------- Optuna
def optuna_plans(options: SweepOptions, state: SweepState, code_version: str) -> list[TunePlan]:
    """One plan per model with trials still to run. Validates before Ray: the extra is
    installed, each space varies something Optuna can search, a point's settings are valid."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SweepError('--search optuna needs Optuna: pip install "cifar-fleet[search]"'
                         ) from None
    plans = []
    resume = {i: c.uri for i, c in state.checkpoints.items()}
    for model in options.models:
        fixed, domains = split_space(model_space(options, model), model)
        make = partial(_cell_of_point, options, model, fixed, code_version, resume)
        sample = make(_lowest_point(domains))  # validates the settings now, not in a trial
        done, cut = _earlier_points(state, domains, make)
        remaining = options.num_samples - len(done)
        log.info("cifar tune: %s: Optuna search of %s; %d of %d trials already finished here"
                 "%s", model, ", ".join(sorted(domains)), len(done), options.num_samples,
                 f", {len(cut)} interrupted (proposed again first)" if cut else "")
        if remaining <= 0:
            continue
        from optuna.samplers import TPESampler

        from cifar_core.search_optuna import DistinctOptunaSearch

        searcher = DistinctOptunaSearch(
            space=DistinctOptunaSearch.convert_search_space(_tune_domains(domains)),
            metric="val_accuracy", mode="max", points_to_evaluate=cut or None,
            sampler=TPESampler(seed=options.search_seed,
                               n_startup_trials=options.search_startup),
            max_epochs=sample.settings.total_epochs)
        for point, value, history in done:
            full = bool(history) and history[-1]["epoch"] >= sample.settings.total_epochs
            searcher.add_evaluated_point(
                point, value, pruned=not full,
                intermediate_values=None if full else [m["val_accuracy"] for m in history])
        plans.append(TunePlan(CellBook(make=make), {}, remaining, searcher, sample))
    return plans


def split_space(space: dict[str, Any], model: str) -> tuple[dict, dict]:
    """(fixed values, searched specs) of a model's space, checked for Optuna."""
    fixed = {k: v for k, v in space.items() if not isinstance(v, (list, dict))}
    searched = {k: v for k, v in space.items() if k not in fixed}
    if not searched:
        raise SweepError(f"--search optuna: model {model}'s space varies nothing; give it "
                         "lists or ranges in --grid (e.g. {\"learning_rate\": "
                         "{\"loguniform\": [0.001, 0.1]}})")
    for name, spec in searched.items():
        values = spec if isinstance(spec, list) else spec.get("choice", [])
        if any(not isinstance(v, (int, float, str, bool, type(None))) for v in values):
            raise SweepError(f"--search optuna: {model}.{name}: Optuna chooses among numbers, "
                             f"strings, booleans or null, not {values!r}")
    return fixed, searched


def _tune_domains(searched: dict[str, Any]) -> dict:
    """Tune's domains for the plain-dict specs (OptunaSearch converts them to Optuna's)."""
    from ray import tune

    domains = {}
    for name, spec in searched.items():
        kind, arguments = ("choice", spec) if isinstance(spec, list) else next(iter(spec.items()))
        if kind == "choice":
            domains[name] = tune.choice(arguments)
        else:  # randint's high is exclusive in both
            domains[name] = {"uniform": tune.uniform, "loguniform": tune.loguniform,
                             "randint": tune.randint}[kind](*arguments)
    return domains


def _lowest_point(searched: dict[str, Any]) -> dict:
    return {k: v[0] if isinstance(v, list) else next(iter(v.values()))[0]
            for k, v in searched.items()}


def _cell_of_point(options: SweepOptions, model: str, fixed: dict, code_version: str,
                   resume: dict[str, str], point: dict) -> Cell:
    from dataclasses import replace

    cell = cell_for(options, model, {**fixed, **point}, code_version)
    return replace(cell, resume_from=resume.get(cell.trial_id)) if options.resume else cell


def _earlier_points(state: SweepState, searched: dict, make: Callable[[dict], Cell]):
    """This search's trials already in storage: [(point, best val_accuracy, history)]
    finished, and [point] interrupted (a checkpoint, no record). A trial belongs to the search
    when its point, rebuilt into a cell, has its id (same model, fixed settings, code)."""
    done, cut = [], []
    for trial_id, record in sorted(state.records.items()):
        point = {k: record.settings.get(k) for k in searched}
        if (record.status in FINISHED and record.best_val_accuracy is not None
                and _is_cell(make, point, trial_id)):
            done.append((point, record.best_val_accuracy, record.history))
    for trial_id, info in sorted(state.checkpoints.items()):
        point = {k: info.settings.get(k) for k in searched}
        if trial_id not in state.records and _is_cell(make, point, trial_id):
            cut.append(point)
    return done, cut


def _is_cell(make: Callable[[dict], Cell], point: dict, trial_id: str) -> bool:
    try:
        return make(point).trial_id == trial_id
    except ValueError:  # another search's point (SettingsError, SweepError)
        return False
