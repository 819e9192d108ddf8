"""Thin entry points: each job parses arguments, makes one call into cifar_core, says where
the output went. ``cifar <job> ...`` and ``python -m jobs.<job> ...`` are the same thing."""

import logging
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_log_level(parser) -> None:
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="How much the job says (default INFO: progress and results).")


def configure_logging(level: str = "INFO") -> None:
    """The jobs' own lines (loggers under ``cifar_core``) to stderr, one plain line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("cifar_core")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
