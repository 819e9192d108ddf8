"""Shared bits of the benchmark scripts: provenance, median/min/max summaries, ``--data``.

The scripts use the installed package (``pip install -e .``); run them as
``python bench/<script>.py`` so this folder is on ``sys.path`` for ``from common import ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
from cifar_core.provenance import git_commit, provenance

#: The commit when the benchmark started (files edited while it runs must not relabel it).
STARTED_AT_COMMIT = git_commit()

#: The repository's root: results are written to ``REPO / "results"``.
REPO = Path(__file__).resolve().parent.parent

#: Environment variable naming the CIFAR-10 data when ``--data`` is not given.
DATA_ENV = "CIFAR10_DATA"


def add_data_argument(parser: argparse.ArgumentParser,
                      what: str = "CIFAR-10 data, as `cifar train --data` takes it", *,
                      required: bool = True, under: str | None = None) -> None:
    """``--data DIR``, defaulting to ``$CIFAR10_DATA`` (``$CIFAR10_DATA/<under>`` with
    ``under``); with neither, argparse stops with "the following arguments are required:
    --data". ``required=False``: the script checks later with ``require_data`` (for modes that
    need no data, such as ``--render``)."""
    default = os.environ.get(DATA_ENV) or None
    if default is not None and under:
        default = os.path.join(default, under)
    now = "unset, so --data is required" if default is None else default
    env = f"${DATA_ENV}/{under}" if under else f"${DATA_ENV}"
    help_text = f"{what}. Default: {env} ({now})".replace("%", "%%")  # argparse %-formats
    parser.add_argument("--data", default=default, required=required and default is None,
                        metavar="DIR", help=help_text)


def require_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``args.data``, or the argparse error a required ``--data`` gives (exit status 2)."""
    if not args.data:
        parser.error(f"the following arguments are required: --data (or set ${DATA_ENV})")
    return args.data


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "repeats": len(values), "values": values}


def write_results(name: str, payload: dict, table: str, out: str | Path | None = None) -> Path:
    """results/<name>.json (machines) and results/<name>.md (people), both with provenance;
    into ``out`` instead when given (a contended or trial run: never results/)."""
    payload = {**payload, "provenance": provenance()}
    out = REPO / "results" if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    prov = payload["provenance"]
    (out / f"{name}.md").write_text(
        f"{table}\n\nMachine: {prov['machine']['cpus']} CPUs ({prov['machine']['cpu_model']}), "
        f"GPUs: {prov['machine']['gpus'] or 'none'}; commit {prov['git_commit']}; "
        f"TensorFlow {prov['versions']['tensorflow']}, Ray {prov['versions']['ray']}; "
        f"{prov['created']}.\n")
    return out / f"{name}.md"


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    """``--notes`` (a paragraph for the .md) and ``--render JSON`` (only rewrite the .md)."""
    parser.add_argument("--notes", default="", help="A paragraph added to the .md.")
    parser.add_argument("--render", metavar="JSON",
                        help="Only rewrite the .md from an earlier run's JSON (with --notes).")


def render_only(args: argparse.Namespace, markdown) -> bool:
    """With ``--render``: rewrite that JSON's .md (and its notes, if given); True if done."""
    if not args.render:
        return False
    report = json.loads(Path(args.render).read_text())
    report["notes"] = args.notes or report.get("notes", "")
    Path(args.render).write_text(json.dumps(report, indent=1) + "\n")
    Path(args.render).with_suffix(".md").write_text(markdown(report))
    return True
