"""Thin entry points: each job parses arguments, makes one call into cifar_core, says where
the output went. ``cifar <job> ...`` and ``python -m jobs.<job> ...`` are the same thing."""

import logging
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_log_level(parser) -> None:
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="How much the job says (default INFO: progress and results).")


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is logged (a job called
    in-process, as the tests do, may find it replaced since it configured logging)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: str = "INFO", quiet_ray: bool = False) -> None:
    """The jobs' own lines (loggers under ``cifar_core``) to stderr, one plain line each;
    ``quiet_ray``: Ray's own INFO lines (Tune's state saves, checkpoint notices) kept back."""
    if quiet_ray:
        logging.getLogger("ray").setLevel(logging.WARNING)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("cifar_core")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
