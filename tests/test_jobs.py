"""The jobs package's own helpers (jobs/__init__.py): how an entry point ends its process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_process_exit_keeps_the_code_the_output_and_every_atexit_handler():
    """``process_exit`` ends the process with the job's code right after the atexit handlers,
    skipping only CPython's module teardown: a handler registered late (as Ray's and the
    private token's clean-up are) still runs, buffered output is not lost, the code stands."""
    script = ("import atexit, sys, jobs\n"
              "atexit.register(print, 'handler ran')\n"
              "print('buffered', end='')\n"
              "sys.stderr.write('to stderr')\n"
              "sys.exit(jobs.process_exit(3))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "bufferedhandler ran\n" and done.stderr == "to stderr"


def test_without_process_exit_a_process_ends_as_usual():
    """Importing ``jobs`` (as the tests do, calling ``main`` in-process) changes nothing."""
    script = "import sys, jobs\nsys.exit(5)\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 5 and done.stderr == ""
