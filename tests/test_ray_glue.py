"""Ray glue (cifar_core/ray_glue.py): a private local Ray has a token of its own."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOLD = ("import os, sys, time, cifar_core, ray\n"
        "from cifar_core.ray_glue import connect_ray\n"
        "connect_ray(None, num_cpus=1)\n"
        "node = ray._private.worker.global_worker.node\n"
        "print(node.gcs_address, os.environ['RAY_AUTH_TOKEN_PATH'], flush=True)\n"
        "time.sleep(300)\n")
JOIN = ("import ray, sys\n"
        "try:\n"
        "    ray.init(address=sys.argv[1])\n"
        "    print('joined', ray.get(ray.remote(lambda: 6 * 7).remote()))\n"
        "except Exception as error:\n"
        "    print('refused', type(error).__name__)\n")


@pytest.mark.slow
def test_a_private_ray_admits_only_holders_of_its_own_token(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                              env={**os.environ, "RAY_ADDRESS": ""})
    try:
        address, token = holder.stdout.readline().split()
        assert stat.S_IMODE(os.stat(token).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(Path(token).parent).st_mode) == 0o700
        # Another Ray client of the same user, with the machine's shared ~/.ray token: refused.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        started = time.monotonic()
        other = subprocess.run([sys.executable, "-c", JOIN, address], capture_output=True,
                               text=True, timeout=180, env={**env, "RAY_AUTH_MODE": "token"})
        assert other.stdout.strip().startswith("refused"), other.stdout + other.stderr[-1000:]
        assert time.monotonic() - started < 120
        # The same client given the instance's own token joins.
        own = subprocess.run([sys.executable, "-c", JOIN, address], capture_output=True,
                             text=True, timeout=180,
                             env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token})
        assert own.stdout.strip() == "joined 42", own.stderr[-2000:]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the holder's own session: only what we started
        holder.wait()
