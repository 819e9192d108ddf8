"""``cifar`` command: dispatches ``cifar <job> [options]`` to ``jobs/<job>.py``.

    cifar train --model M4 --data DIR --out results/runs/m4   # one local run, no Ray
    cifar tune --smoke-test                                    # the main job (Ray Tune)
    cifar finetune | score | serve | report | export-samples   # see each job's --help
"""

from __future__ import annotations

import importlib
import sys

from jobs import process_exit

JOBS = {
    "train": "jobs.train",
    "tune": "jobs.tune",
    "finetune": "jobs.finetune",
    "score": "jobs.score",
    "report": "jobs.report",
    "serve": "jobs.serve",
    "export-samples": "jobs.export_samples",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        print(__doc__.strip())
        print("\njobs: " + ", ".join(JOBS))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown job {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(JOBS[argv[0]])
    return module.main(argv[1:])


def run() -> None:
    """The ``cifar`` console script."""
    sys.exit(process_exit(main()))


if __name__ == "__main__":
    run()
