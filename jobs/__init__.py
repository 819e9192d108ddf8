"""Thin entry points: each job parses arguments, makes one call into cifar_core, says where
the output went. ``cifar <job> ...`` and ``python -m jobs.<job> ...`` are the same thing."""

import atexit
import os
import sys

_exit_code: list[int] = []


def _skip_module_teardown() -> None:
    # Registered on import of ``jobs``, before Ray, TensorFlow or cifar_core register theirs,
    # so it runs after every other atexit handler (they run last-in, first-out).
    if _exit_code:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code[0])


atexit.register(_skip_module_teardown)

import logging  # noqa: E402  (after the registration above: its shutdown handler runs first)


def process_exit(code: int) -> int:
    """For the entry points only (``cifar``, ``python -m jobs.<job>``), once the job returned:
    end the process with ``code`` right after the atexit handlers, without CPython freeing
    every module (with TensorFlow loaded that alone takes ~1 s: results/bench-score.md). The
    jobs close their files and Ray themselves; atexit handlers (Ray's, logging's) still run."""
    _exit_code[:] = [code]
    return code

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
