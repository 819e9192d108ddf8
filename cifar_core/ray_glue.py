"""Everything that couples the project to Ray's APIs, in one place.

- ``connect_ray``: join the cluster named by ``--address``/``RAY_ADDRESS``, else start a
  private local Ray (never attaching by accident to another Ray on the machine, and with a
  token of its own), carrying the Keras switch and provenance to every worker through the
  job's ``runtime_env``.
- ``RayReporter``: the one Keras->Ray bridge. ``train.train`` calls it after every epoch's
  checkpoint; it reports to Tune (a Tune trial) or to Ray Train (a Train worker). Ray's own
  Keras integration has moved modules three times; this file is where that coupling lives.
- ``train_to_tune``: Ray Train -> Tune, for a Tune trial that drives a multi-worker Train run.
- ``limit_threads_to_ray_cpus``: TensorFlow's thread pools sized to the CPUs Ray gave us.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any


def connect_ray(address: str | None = None, *, dashboard: bool = False,
                **init_kwargs: Any) -> bool:
    """Start or join Ray for a job; True if this call connected (the caller may shut down).

    Without an address (or with ``"local"``) this starts a private instance. ``dashboard=True``
    is for Ray Train: its V2 controller's PlacementGroupCleaner asks the state API (the
    dashboard) whether the controller is alive, and without a dashboard and a ``RAY_ADDRESS``
    naming this instance it asks *another* Ray on the machine, is told the controller does not
    exist, and removes the workers' placement group mid-run. So a private Ray for Train gets
    its dashboard, a GCS port chosen here and ``RAY_ADDRESS`` set for its processes.
    """
    import ray

    from cifar_core.provenance import runtime_env_vars

    if ray.is_initialized():
        return False
    # Under ``ray job submit`` the job's runtime_env already set these; Ray merges the two and
    # refuses conflicting values, so pass only what the workers would otherwise lack.
    env_vars = {k: v for k, v in runtime_env_vars().items() if os.environ.get(k) != v}
    kwargs: dict[str, Any] = {"log_to_driver": True, **init_kwargs}
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None,
                 **kwargs)
        return True
    for attempt in (1, 2):
        try:
            # A private Ray's daemons and workers inherit this process's environment, so the
            # variables go there for the start instead of into a job runtime_env: with one,
            # the raylet prestarts no worker for the job and its first task waits for a fresh
            # one (1.5 s against 0.4 s here: results/bench-score.md).
            with _environment(env_vars):
                _start_private(dashboard, kwargs)
            return True
        except Exception as error:
            # On a loaded machine the raylet can give up on its dashboard agent after a fixed
            # 15 s (ray-project/ray#65983); a fresh local start usually succeeds.
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"cifar: local Ray failed to start ({' '.join(str(error).split())[:200]}); "
                  "retrying once", file=sys.stderr, flush=True)
    return True


@contextlib.contextmanager
def _environment(variables: dict[str, str]):
    """``os.environ`` with ``variables`` set, restored afterwards."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_private(address: str | None) -> bool:
    """Whether ``connect_ray(address)`` starts a private local Ray (no cluster, no autoscaler)."""
    return (address or os.environ.get("RAY_ADDRESS") or "local") == "local"


def unfit(request: dict[str, float]) -> str | None:
    """Why no node of the running Ray can ever hold ``request`` ({"CPU": n, "GPU": n}), or
    None if one can. For a private local Ray only: a cluster's autoscaler may add nodes."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for resources in nodes:
        if all(resources.get(k, 0) >= v for k, v in request.items() if v):
            return None
    largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    return (f"asks for {request}, but the largest node here has CPU={largest.get('CPU', 0):g}, "
            f"GPU={largest.get('GPU', 0):g} (nothing would ever run it)")


def private_token() -> Path:
    """A fresh token for a private Ray, in a new 0700 folder (file 0600, never through a link),
    and the environment that makes Ray require it: the instance and every process it starts
    use it, and no other Ray on the machine (sharing ``~/.ray/auth_token``) can join it."""
    folder = Path(tempfile.mkdtemp(prefix="cifar-ray-auth-"))
    path = folder / "auth_token"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    atexit.register(shutil.rmtree, folder, True)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the path
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path))
    # This process read its auth settings when Ray was imported: re-read them, as Ray's own
    # ray._private.authentication.authentication_token_setup._enable_token_auth does.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return path


def _start_private(dashboard: bool, kwargs: dict[str, Any]) -> None:
    import ray

    private_token()
    if not dashboard:
        ray.init(address="local", include_dashboard=False, **kwargs)
        return
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    try:
        ray.init(address="local", include_dashboard=True, **kwargs)
    except BaseException:
        os.environ.pop("RAY_ADDRESS", None)
        raise
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def limit_threads_to_ray_cpus() -> None:
    """Size TensorFlow's thread pools to the CPUs Ray gave this process, so trials and workers
    packed on one machine do not oversubscribe it. Call before TensorFlow runs anything."""
    import ray
    import tensorflow as tf

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, int(cpus)))
            tf.config.threading.set_inter_op_parallelism_threads(max(1, int(cpus)))
        except RuntimeError:
            pass  # TensorFlow already initialised in this process; its setting stands


class RayReporter:
    """``train()``'s per-epoch hook: report the epoch's metrics and checkpoints to Ray.

    ``to`` is ``"tune"`` (a Tune function trial) or ``"train"`` (a Ray Train worker: every
    worker reports, since Train's report is a barrier; only rank 0 hands over its checkpoint).
    The checkpoint is the whole ``checkpoints/`` folder (``last/`` and ``best/``), so a retry
    gets its best weights back too. From epoch ``hold_from_epoch`` on, reports are held back
    until ``flush``: a scheduler may stop a trial at any report (ASHA at its last rung, even on
    the final epoch), so the last one waits until the evaluation and record are saved.
    """

    def __init__(self, to: str, *, hold_from_epoch: int | None = None, rank: int = 0,
                 extra: dict | None = None):
        if to not in ("tune", "train"):
            raise ValueError(f"RayReporter(to={to!r}): 'tune' or 'train'")
        self.to, self.hold_from_epoch, self.rank = to, hold_from_epoch, rank
        self.extra = dict(extra or {})
        self.held: tuple[dict, str] | None = None

    def __call__(self, metrics: dict, checkpoint_dir: str) -> None:
        if self.hold_from_epoch is not None and metrics["epoch"] >= self.hold_from_epoch:
            self.held = (metrics, checkpoint_dir)
            return
        self._report(metrics, checkpoint_dir)

    def flush(self, **more: Any) -> None:
        """Report the held-back epoch, with ``more`` metrics (e.g. test_accuracy)."""
        if self.held is not None:
            metrics, checkpoint_dir = self.held
            self.held = None
            self._report({**metrics, **more}, checkpoint_dir)

    def _report(self, metrics: dict, checkpoint_dir: str) -> None:
        # Tune and Train each want their own Checkpoint class (ray-project/ray#49454).
        if self.to == "tune":
            from ray.tune import Checkpoint, report
        else:
            from ray.train import Checkpoint, report
        checkpoint = None
        if self.rank == 0:
            checkpoint = Checkpoint.from_directory(str(Path(checkpoint_dir).parent))
        report({**metrics, **self.extra}, checkpoint=checkpoint)


def train_to_tune(hold_from_epoch: int):
    """A Ray Train callback forwarding each epoch's report to the Tune trial that drives the
    Train run, except from epoch ``hold_from_epoch`` on and the final (test) report: the trial
    reports those itself once the record is written (see ``RayReporter``)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class HoldingTuneReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            rank0 = metrics[0] if metrics else {}
            if rank0.get("epoch", 0) >= hold_from_epoch or "test_accuracy" in rank0:
                return
            super().after_report(run_context, metrics, checkpoint)

    return HoldingTuneReport()
