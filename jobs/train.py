"""One local training run, no Ray: ``cifar train`` / ``python -m jobs.train``.

    cifar train --model M1 --data /data/cifar10 --out results/runs/m1
    cifar train --model M4 --data /data/cifar10 --limit 2000 --num-epochs 2 --out /tmp/m4

Every settings field is a flag (``--learning-rate``, ``--batch-size``, ``--num-epochs``, ...);
unset flags keep the model's seed values. Writes ``OUT/checkpoints/{last,best}``,
``OUT/metrics.jsonl`` (one JSON line per epoch) and ``OUT/evaluation.json``. Re-running into the
same ``OUT`` resumes from its last checkpoint; ``--resume-from CKPT`` starts from another run's
checkpoint. ``--smoke-test``: tiny data, one epoch. Exit code 2: invalid settings or data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
from cifar_core.data import DataError
from cifar_core.ladder import smoke_settings
from cifar_core.settings import SettingsError, add_settings_arguments, settings_from_args
from jobs import add_log_level, configure_logging, process_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Run folder (created; resumed if present).")
    parser.add_argument("--resume-from", help="Checkpoint folder to start from.")
    parser.add_argument("--smoke-test", action="store_true",
                        help="Tiny data, one epoch (ladder.py's smoke settings).")
    parser.add_argument("--quiet", action="store_true", help="Only the final line.")
    add_log_level(parser)
    add_settings_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("WARNING" if args.quiet else args.log_level)
    if args.smoke_test:
        for name, value in smoke_settings(args.model or "M4").items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    try:
        if args.resume_from:
            from cifar_core.storage import MODEL_FILE, STATE_FILE

            missing = [n for n in (STATE_FILE, MODEL_FILE)
                       if not (Path(args.resume_from) / n).is_file()]
            if missing:
                raise SettingsError(f"--resume-from {args.resume_from}: not a checkpoint folder "
                                    f"(no {', '.join(missing)})")
        settings = settings_from_args(args)
        from cifar_core.data import load_cifar10
        from cifar_core.train import train

        data = load_cifar10(settings)
    except (SettingsError, DataError) as error:
        print(f"cifar train: error: {error}", file=sys.stderr)
        return 2
    print(f"cifar train: {settings.model} on {json.dumps(data.summary())}", flush=True)
    result = train(settings, data, args.out, resume_from=args.resume_from)
    evaluation = result.evaluation or {}
    print(f"cifar train: best val_accuracy {result.state.best_val_accuracy:.4f} "
          f"(epoch {result.state.best_epoch}), test_accuracy "
          f"{evaluation.get('test_accuracy', float('nan')):.4f}; output in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(process_exit(main()))
