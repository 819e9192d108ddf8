"""Sample images to try ``cifar score`` on: ``cifar export-samples`` / ``python -m jobs.export_samples``.

    cifar export-samples --data /data/cifar10 --n 40 --out test_images/
    cifar score test_images/ --model results/runs/m4 --out /tmp/samples.csv

Writes N images of the test split of *your own* copy of CIFAR-10 (any source ``--data``
accepts: an image folder, python batches, an archive, s3://, or 'keras') as lossless PNGs
named ``<class>_<test index>.png``, classes in turn, so ``cifar score`` knows each file's label
and reports accuracy. The repository ships no CIFAR-10 images; test_images/*.png is
git-ignored. ``--smoke-test``: 10 images. Exit code 2: bad data source or N.
"""

from __future__ import annotations

import argparse
import os
import sys

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
from cifar_core.data import DataError
from cifar_core.data import export_samples
from cifar_core.storage import StorageError
from jobs import process_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar export-samples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("CIFAR10_DATA", "keras"),
                        help="CIFAR-10 source (default: CIFAR10_DATA, else 'keras').")
    parser.add_argument("--n", type=int, default=40, help="Number of images (default 40).")
    parser.add_argument("--out", default="test_images", help="Folder to write into.")
    parser.add_argument("--seed", type=int, default=0, help="Which images are picked.")
    parser.add_argument("--smoke-test", action="store_true", help="10 images.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    count = 10 if args.smoke_test else args.n
    try:
        written = export_samples(args.data, count, args.out, seed=args.seed)
    except (DataError, StorageError) as error:
        print(f"cifar export-samples: error: {error}", file=sys.stderr)
        return 2
    print(f"cifar export-samples: wrote {len(written)} test images of {args.data} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(process_exit(main()))
