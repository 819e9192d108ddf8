"""Where a result came from: git commit, code version, library versions, machine, time.

Written beside every checkpoint, trial and benchmark. On Ray workers that received the code as a
``working_dir`` there is no ``.git``; the driver's commit travels in ``CIFAR_FLEET_COMMIT``
(``runtime_env_vars`` adds it), so workers report the same commit as the driver.

``code_version`` is what a trial's id hashes: the source of the modules that decide a trial's
result, so edits elsewhere (README, report, jobs, the sweep driver) keep every id.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import hashlib
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("tensorflow", "tf_keras", "ray", "numpy", "scikit-learn", "pandas", "boto3",
            "pyarrow", "pillow")
REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The code's commit (with ``-dirty`` when the work tree has changes), or 'unknown'."""
    if os.environ.get("CIFAR_FLEET_COMMIT"):
        return os.environ["CIFAR_FLEET_COMMIT"]
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        # A working_dir shipped to a cluster (.rayignore) keeps .git/HEAD and its refs only:
        # the commit it came from, though not whether it was dirty (code_version says exactly
        # what ran).
        return commit_from_files(REPO_ROOT / ".git") or "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def commit_from_files(git_dir: Path) -> str | None:
    """The commit ``HEAD`` names, read from the files alone (no git program, no objects)."""
    try:
        head = (git_dir / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref: "):
        return head or None  # a detached HEAD is the commit itself
    ref = head[5:]
    try:
        return (git_dir / ref).read_text().strip()
    except OSError:
        pass
    try:
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split(" ", 1)[0]
    except OSError:
        pass
    return None


#: The modules whose source decides what a trial computes (``code_version``).
RESULT_MODULES = ("__init__", "ladder", "settings", "models", "data", "images", "train",
                  "evaluate")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """12 hex digits of a hash over ``RESULT_MODULES``' source (found even without ``.git``)."""
    digest = hashlib.sha256()
    for name in RESULT_MODULES:
        digest.update(name.encode() + b"\0" + (REPO_ROOT / "cifar_core" / f"{name}.py")
                      .read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine() -> dict[str, object]:
    """Host facts that explain a timing: CPU count and model, the GPUs."""
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "cpu_model": cpu_model,
            "gpus": _gpus(), "platform": platform.platform()}


def _gpus() -> list[str]:
    """The GPUs TensorFlow sees where it is loaded already (trials, workers); elsewhere (a
    driver) NVIDIA's own list: importing TensorFlow only to ask costs a driver ~2.5 s
    (results/bench-tune-overhead.md)."""
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return [gpu.name for gpu in tf.config.list_physical_devices("GPU")]
    found = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        model = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                      if line.startswith("Model:")), "NVIDIA GPU")
        found.append(f"{model} ({info.parent.name})")
    return found


def provenance() -> dict[str, object]:
    return {"git_commit": git_commit(), "code_version": code_version(),
            "versions": library_versions(), "machine": machine(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def runtime_env_vars() -> dict[str, str]:
    """Environment variables every Ray worker of a job needs: the Keras switch and the commit."""
    from cifar_core import KERAS_ENV_VARS

    env = dict(KERAS_ENV_VARS)
    env["CIFAR_FLEET_COMMIT"] = git_commit()
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "CIFAR_FLEET_CACHE"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


# ---------------------------------------------------------------------------- checksums
@dataclass(frozen=True)
class Digest:
    """Size and checksums of some bytes, for verified uploads."""
    size: int
    sha256: str   # hex
    md5: str      # hex

    @property
    def sha256_base64(self) -> str:
        return base64.b64encode(bytes.fromhex(self.sha256)).decode()


def digest_of(source: Path | bytes) -> Digest:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()  # < 100 MB here
    return Digest(len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())
