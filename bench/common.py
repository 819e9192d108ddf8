"""Shared bits of the benchmark scripts: provenance and median/min/max summaries."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cifar_core  # noqa: E402,F401  (tf_keras before TensorFlow)
from cifar_core.provenance import provenance  # noqa: E402


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "repeats": len(values), "values": values}


def write_results(name: str, payload: dict, table: str) -> Path:
    """results/<name>.json (machines) and results/<name>.md (people), both with provenance."""
    payload = {**payload, "provenance": provenance()}
    out = REPO / "results"
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    prov = payload["provenance"]
    (out / f"{name}.md").write_text(
        f"{table}\n\nMachine: {prov['machine']['cpus']} CPUs ({prov['machine']['cpu_model']}), "
        f"GPUs: {prov['machine']['gpus'] or 'none'}; commit {prov['git_commit']}; "
        f"TensorFlow {prov['versions']['tensorflow']}, Ray {prov['versions']['ray']}; "
        f"{prov['created']}.\n")
    return out / f"{name}.md"
