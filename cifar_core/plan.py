"""Planning a sweep: options, grids and cells, all checked before Ray starts.

A grid is a plain dict keyed by settings fields, the same in ``ladder.py`` and in a
``--grid FILE`` (JSON ``{model: {field: spec}}``). A field's spec is

- a value: every trial of the model gets it;
- a list: a grid axis (crossed with the other axes);
- ``{"uniform": [low, high]}``, ``{"loguniform": [low, high]}``, ``{"randint": [low, high]}``
  (high exclusive) or ``{"choice": [values]}``: a sampled range, drawn ``--num-samples``
  times per grid point from a seeded generator, so every cell is known (and hashed) up front.

``--search`` says how the space is walked: ``grid`` (above), ``random`` (``--num-samples``
points per model, every field drawn, a list as a choice; seeded by ``--search-seed``, so also
known up front) or ``optuna`` (Optuna proposes ``--num-samples`` points per model while the
sweep runs, from the results so far: ``search.py``).

``plan_cells`` turns the options into validated, hashed ``records.Cell`` values. No Ray, no
TensorFlow: a bad option, grid or setting fails in milliseconds, before any cluster work.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cifar_core import storage
from cifar_core.ladder import LADDER, MODEL_IDS, smoke_settings
from cifar_core.records import Cell, settings_hash
from cifar_core.settings import Settings, SettingsError, check_global_batch

SCHEDULERS = ("none", "asha")
SEARCHES = ("grid", "random", "optuna")
TRACKERS = ("none", "tensorboard", "mlflow")
#: Sampled-range specs of a grid and how each draws a value.
SAMPLERS = {
    "uniform": lambda rng, low, high: rng.uniform(low, high),
    "loguniform": lambda rng, low, high: math.exp(rng.uniform(math.log(low), math.log(high))),
    "randint": lambda rng, low, high: rng.randrange(int(low), int(high)),
}


class SweepError(ValueError):
    """The sweep's options or grid are invalid; nothing was started."""


@dataclass(frozen=True)
class SweepOptions:
    """What one ``cifar tune`` invocation asks for (job options, not model settings)."""

    name: str
    storage: str
    models: tuple[str, ...] = MODEL_IDS
    grid: str = "default"                       # "seed", "default" or a JSON file
    overrides: dict[str, Any] = field(default_factory=dict)  # settings for every trial
    seeds: int = 1
    num_samples: int = 1
    epochs_scale: float = 1.0
    scheduler: str = "none"                     # SCHEDULERS
    # ASHA: first cut after grace_period epochs, then keep the best 1/reduction_factor at each
    # rung (Ray's defaults). results/bench-tune-asha-*.md measures what it saves.
    grace_period: int = 1
    reduction_factor: int = 4
    max_concurrent: int | None = None
    use_gpu: bool = False
    resources: dict[str, dict[str, float]] = field(default_factory=dict)  # per-model overrides
    max_failures: int = 1
    m7_workers: int = 1                         # >1: each M7 trial is a multi-worker Train run
    resume: bool = False
    s3_endpoint: str | None = None
    smoke_test: bool = False
    verbose: bool = False                       # Ray's trial tables and workers' own output
    search: str = "grid"                        # SEARCHES
    search_seed: int = 0                        # random and optuna: the searcher's seed
    search_startup: int = 10                    # optuna: random points before TPE (Optuna's)
    tracking: str = "none"                      # TRACKERS (cifar_core/tracking.py)
    mlflow_tracking_uri: str | None = None      # default: a local store in the sweep's storage

    def __post_init__(self) -> None:
        storage.check_name(self.name, "--name")
        if not self.models or any(not m for m in self.models):
            raise SweepError(f"--models {','.join(self.models)!r}: name at least one model, "
                             f"e.g. {','.join(MODEL_IDS[:2])}")
        unknown = [m for m in self.models if m not in LADDER]
        if unknown:
            raise SweepError(f"--models: unknown model(s) {unknown}; valid: {list(MODEL_IDS)}")
        for flag, value in (("--seeds", self.seeds), ("--num-samples", self.num_samples),
                            ("--m7-workers", self.m7_workers),
                            ("--grace-period", self.grace_period)):
            if value < 1:
                raise SweepError(f"{flag} {value} must be >= 1")
        if not (math.isfinite(self.epochs_scale) and self.epochs_scale > 0):
            raise SweepError(f"--epochs-scale {self.epochs_scale} must be a finite number > 0")
        if self.scheduler not in SCHEDULERS:
            raise SweepError(f"--scheduler {self.scheduler!r} must be one of {SCHEDULERS}")
        if self.search not in SEARCHES:
            raise SweepError(f"--search {self.search!r} must be one of {SEARCHES}")
        if self.search_startup < 1:
            raise SweepError(f"--search-startup {self.search_startup} must be >= 1")
        if self.search == "optuna" and self.seeds > 1:
            raise SweepError(f"--seeds {self.seeds} with --search optuna: a searcher "
                             "proposes single points; repeat a chosen point with --search grid")
        if self.tracking not in TRACKERS:
            raise SweepError(f"--tracking {self.tracking!r} must be one of {TRACKERS}")
        if self.mlflow_tracking_uri is not None and self.tracking != "mlflow":
            raise SweepError("--mlflow-tracking-uri needs --tracking mlflow")
        if self.reduction_factor < 2:
            raise SweepError(f"--reduction-factor {self.reduction_factor} must be >= 2")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise SweepError(f"--max-concurrent {self.max_concurrent} must be >= 1")
        if self.max_failures < -1:
            raise SweepError(f"--max-failures {self.max_failures} must be >= -1 (-1: "
                             "unlimited)")
        for model, spec in self.resources.items():
            check_resources(spec, f"--resources {model}")
        if self.s3_endpoint is not None:
            storage.check_endpoint(self.s3_endpoint)

    @property
    def sweep_uri(self) -> str:
        return storage.join_uri(self.storage, self.name)

    def trial_resources(self, model: str) -> dict[str, float]:
        if model == "M7" and self.m7_workers > 1:
            return {"CPU": 1, "GPU": 0}  # only the Train driver; its workers ask for their own
        table = LADDER[model].gpu_resources if self.use_gpu else {"CPU": 1, "GPU": 0}
        return {**table, **self.resources.get(model, {})}


def check_resources(spec: dict[str, float], what: str) -> None:
    """CPU > 0 and GPU >= 0, both finite: Ray would otherwise queue the trial forever."""
    cpu, gpu = spec.get("CPU", 1), spec.get("GPU", 0)
    if not (math.isfinite(cpu) and cpu > 0 and math.isfinite(gpu) and gpu >= 0):
        raise SweepError(f"{what}: CPU={cpu}, GPU={gpu}: CPU must be > 0 and GPU >= 0, "
                         "both finite")


# ---------------------------------------------------------------------------- grids
def load_grid(grid: str, model: str) -> dict[str, Any]:
    """The plain-dict space for one model: {} (seed), the ladder's (default) or a JSON file's."""
    if grid == "seed":
        return {}
    if grid == "default":
        return LADDER[model].default_grid
    return read_grid_file(grid).get(model, {})


def read_grid_file(grid: str) -> dict[str, dict[str, Any]]:
    """A ``--grid FILE``, checked: UTF-8 JSON, ``{model: {field: spec}}``, specs well-formed."""
    path = Path(grid)
    if not path.is_file():
        raise SweepError(f"--grid {grid!r} is not 'seed', 'default' or a JSON file")
    try:
        spec = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise SweepError(f"--grid {grid}: not UTF-8 text ({error})") from error
    except json.JSONDecodeError as error:
        raise SweepError(f"--grid {grid}: not valid JSON ({error})") from error
    if not isinstance(spec, dict):
        raise SweepError(f"--grid {grid}: expected an object {{model: {{field: values}}}}, "
                         f"got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(MODEL_IDS))
    if unknown:
        raise SweepError(f"--grid {grid}: unknown model(s) {unknown}; valid: {list(MODEL_IDS)}")
    for model, space in spec.items():
        if not isinstance(space, dict):
            raise SweepError(f"--grid {grid}: model {model} maps to {type(space).__name__}; "
                             "expected an object {field: value or [values]}")
        for name, value in space.items():
            check_spec(value, f"--grid {grid}: {model}.{name}")
    return spec


def check_spec(value: Any, where: str) -> None:
    if isinstance(value, list) and not value:
        raise SweepError(f"{where} is an empty list: a grid axis needs at least one value")
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in (*SAMPLERS, "choice"):
            raise SweepError(f"{where}: {value!r} is not a sampled range; use "
                             f"{{kind: [low, high]}} with kind in {[*SAMPLERS, 'choice']}")
        kind, arguments = next(iter(value.items()))
        if kind == "choice":
            if not isinstance(arguments, list) or not arguments:
                raise SweepError(f"{where}: choice needs a non-empty list")
            return
        if (not isinstance(arguments, list) or len(arguments) != 2
                or not all(isinstance(a, (int, float)) and math.isfinite(a) for a in arguments)
                or not arguments[0] < arguments[1]
                or (kind == "loguniform" and arguments[0] <= 0)):
            raise SweepError(f"{where}: {kind} needs [low, high] with low < high (and low > 0 "
                             "for loguniform)")


def expand(space: dict[str, Any], num_samples: int, rng: random.Random) -> list[dict]:
    """Explicit configs: grid axes crossed, sampled ranges drawn ``num_samples`` times per
    grid point, everything else fixed."""
    axes = {k: v for k, v in space.items() if isinstance(v, list)}
    sampled = {k: v for k, v in space.items() if isinstance(v, dict)}
    fixed = {k: v for k, v in space.items() if k not in axes and k not in sampled}
    configs = []
    for values in itertools.product(*axes.values()):
        point = {**fixed, **dict(zip(axes, values))}
        for _ in range(num_samples if sampled else 1):
            configs.append({**point, **{k: draw(spec, rng) for k, spec in sampled.items()}})
    return configs


def draw(spec: dict, rng: random.Random) -> Any:
    kind, arguments = next(iter(spec.items()))
    if kind == "choice":
        return rng.choice(arguments)
    return SAMPLERS[kind](rng, *arguments)


# ---------------------------------------------------------------------------- cells
def plan_cells(options: SweepOptions, code_version: str) -> list[Cell]:
    """Every trial of the sweep, validated and hashed (none for ``--search optuna``, whose
    points come while it runs: ``search.py``). Raises SettingsError naming the model, the field
    and the value, or SweepError for a bad grid."""
    rng = random.Random(options.search_seed)
    cells: dict[str, Cell] = {}
    for model in options.models:
        space = model_space(options, model)
        if options.search == "optuna":
            continue
        points = (expand(space, options.num_samples, rng) if options.search == "grid"
                  else [{k: draw_any(v, rng) for k, v in space.items()}
                        for _ in range(options.num_samples)])
        for point in points:
            for seed in range(options.seeds):
                cell = cell_for(options, model, point, code_version, seed)
                cells.setdefault(cell.trial_id, cell)
    return list(cells.values())


def model_space(options: SweepOptions, model: str) -> dict[str, Any]:
    """One model's plain-dict space, checked."""
    space = load_grid(options.grid, model)
    for name, value in space.items():
        check_spec(value, f"grid {model}.{name}")
    return space


def draw_any(spec: Any, rng: random.Random) -> Any:
    """One random value of a spec: a list's element, a range's draw, a value itself."""
    if isinstance(spec, list):
        return rng.choice(spec)
    return draw(spec, rng) if isinstance(spec, dict) else spec


def cell_for(options: SweepOptions, model: str, point: dict[str, Any], code_version: str,
             seed: int = 0) -> Cell:
    """The validated, hashed cell of one point of ``model``'s space (``seed``: which of the
    ``--seeds`` repeats)."""
    config = {**options.overrides, "model": model}
    if options.smoke_test:
        config = {**smoke_settings(model), **config}
    config.update(point)
    if options.seeds > 1 or "seed" not in config:
        config["seed"] = config.get("seed", 0) + seed
    try:
        settings = _scale_epochs(Settings.from_dict(config), options.epochs_scale)
    except SettingsError as error:
        raise SettingsError(f"model {model}: {error}") from error
    workers = _workers(options, model)
    if workers:  # each of the Train run's workers takes an equal share of a batch
        try:
            check_global_batch(settings, workers["num_workers"])
        except SettingsError as error:
            raise SweepError(f"--m7-workers {workers['num_workers']}: {error}") from None
    return Cell(settings, settings_hash(settings, settings.data, code_version),
                sweep=options.name, sweep_uri=options.sweep_uri,
                resources=options.trial_resources(model),
                s3_endpoint=storage.s3_endpoint(options.s3_endpoint), workers=workers)


def _workers(options: SweepOptions, model: str) -> dict | None:
    if model != "M7" or options.m7_workers <= 1:
        return None
    return {"num_workers": options.m7_workers, "use_gpu": options.use_gpu,
            "max_failures": options.max_failures}


def _scale_epochs(settings: Settings, scale: float) -> Settings:
    if scale == 1.0:
        return settings
    return settings.replace(
        num_epochs=max(1, round(settings.num_epochs * scale)),
        fine_tune_epochs=(max(1, round(settings.fine_tune_epochs * scale))
                          if settings.fine_tune_epochs else 0))


def with_checkpoints(cells: list[Cell], newest: dict[str, Any]) -> list[Cell]:
    """The cells, each told the newest checkpoint an earlier attempt of it left (``--resume``)."""
    return [replace(c, resume_from=newest[c.trial_id].uri) if c.trial_id in newest else c
            for c in cells]


def trial_order(cells: list[Cell], options: SweepOptions) -> list[str]:
    """The order Tune starts the trials in: the grid's, or a fixed shuffle under a scheduler.

    Asynchronous ASHA promotes whoever reaches a rung while it beats the trials seen so far, so
    a grid in its natural order (learning rates ascending, say) hands it a rising sequence and
    it promotes most of them (results/bench-tune-asha-m1.md). Seed 0: re-runs keep the order.
    """
    order = [cell.trial_id for cell in cells]
    if options.scheduler != "none":
        random.Random(0).shuffle(order)
    return order


def check_one_data_source(cells: list[Cell]) -> None:
    """The data set is loaded once per sweep: every cell must name the same data and split."""
    sources = {(c.settings.data, c.settings.limit, c.settings.split_seed,
                c.settings.validation_fraction) for c in cells}
    if len(sources) > 1:
        raise SweepError("all trials of one sweep must share data, limit, split_seed and "
                         f"validation_fraction (the data set is loaded once); got {sources}")
