"""The local cluster rehearsal: cluster.yaml's node types with fake GPUs, on one machine.

    cluster/local.sh start            # or: python -m cifar_core.cluster start
    eval "$(cluster/local.sh env)"    # RAY_API_SERVER_ADDRESS and the token, for `ray job ...`
    ray job submit --working-dir . -- python -m jobs.tune --smoke-test ...
    cluster/local.sh stop             # ends exactly the processes `start` began, by pid

``start_local_cluster`` runs ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``
with ``cluster.local.yaml``: the autoscaler (v2, as ``ray up`` runs it) starts fake worker
nodes (real raylets advertising GPUs) when work asks for GPUs and removes them when idle, as it
would launch and terminate EC2 instances. The cluster gets its own ports, its own
``--temp-dir`` and its own token (token authentication on, as on AWS), so it never meets
another Ray on the machine. Stopping finds its processes by a marker variable every one of
them inherits from ``ray start`` (job drivers included, though Ray starts them in sessions of
their own) and signals exactly those pids, never a machine-wide Ray stop. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

#: Every process of a rehearsal cluster inherits this variable (value: the cluster's temp dir):
#: how ``stop_local_cluster`` finds them, including job drivers, which Ray starts in sessions
#: of their own. (A process group would miss those, and its id can be reused once it is gone.)
MARKER_VARIABLE = "CIFAR_FLEET_REHEARSAL"
STATE_FILE = "rehearsal.json"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ClusterError(RuntimeError):
    """The rehearsal cluster could not be started, or its state is unreadable."""


@dataclass
class LocalCluster:
    """What a client needs to reach a rehearsal cluster, and what ``stop`` needs to end it."""

    temp_dir: str
    gcs_port: int
    dashboard_port: int
    client_port: int
    token_path: str

    @property
    def address(self) -> str:
        """The job-submission (dashboard) address, as ``ray job submit`` and the SDK want it."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """Environment for ``ray job submit`` / ``JobSubmissionClient`` against this cluster."""
        return {"RAY_API_SERVER_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": self.token_path}

    def auth_headers(self) -> dict[str, str]:
        """The bearer header the dashboard wants (for a client that cannot use the env vars)."""
        token = Path(self.token_path).read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def save(self) -> None:
        Path(self.temp_dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, temp_dir: str | os.PathLike) -> "LocalCluster":
        path = Path(temp_dir, STATE_FILE)
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise ClusterError(f"{path}: no readable rehearsal-cluster state ({error})") from error


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_executable() -> str:
    """The ``ray`` script of this interpreter's environment (not whatever is first on PATH)."""
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def start_local_cluster(config: str | os.PathLike = REPO_ROOT / "cluster.local.yaml",
                        temp_dir: str | os.PathLike | None = None,
                        extra_env: dict[str, str] | None = None,
                        timeout_s: float = 120) -> LocalCluster:
    """Start a fake-GPU autoscaling Ray cluster on this machine; return how to reach it.

    ``temp_dir`` defaults to a fresh short folder under /tmp (Ray's socket paths must stay
    under ~100 characters). ``extra_env`` goes to every Ray process, including job drivers.
    """
    import yaml

    if not Path("/proc/self/environ").exists():
        raise ClusterError("the rehearsal cluster needs Linux: stopping it reads /proc")
    temp_dir = Path(temp_dir or tempfile.mkdtemp(prefix="cfrehearsal-", dir="/tmp"))
    temp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    gcs_port, dashboard_port, client_port = _free_port(), _free_port(), _free_port()

    # The fake provider starts worker raylets itself and must be told where the GCS listens
    # (it assumes port 6379 otherwise); the port is only known now, so the config is copied.
    settings = yaml.safe_load(Path(config).read_text())
    settings["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    resolved_config = temp_dir / "cluster.local.yaml"
    resolved_config.write_text(yaml.safe_dump(settings, sort_keys=False))

    token_path = temp_dir / "auth_token"
    # A new file only (O_EXCL), never through a link (O_NOFOLLOW), readable by us alone.
    descriptor = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`

    head = settings["available_node_types"][settings["head_node_type"]]["resources"]
    env = dict(os.environ, **(extra_env or {}))
    # A client's own cluster address must not leak into the head (nor its job drivers).
    env.pop("RAY_ADDRESS", None)
    env.update({
        "RAY_FAKE_CLUSTER": "1",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
        MARKER_VARIABLE: str(temp_dir),
        # The autoscaler `ray up` runs since Ray 2.50 (v2: node-type priorities, fallback
        # when a type cannot be launched), started the way `ray up` starts it on the head.
        "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": settings["provider"]["head_node_id"],
        "RAY_NODE_TYPE_NAME": settings["head_node_type"],
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # react in seconds, not the default 5 s
        # The autoscaler's metrics server takes a fixed port (44217) unless told otherwise.
        "AUTOSCALER_METRIC_PORT": str(_free_port()),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Entry points say `python -m jobs...`, as on a cluster node: make that this venv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    command = [
        _ray_executable(), "start", "--head", f"--port={gcs_port}",
        f"--temp-dir={temp_dir / 'ray'}", f"--autoscaling-config={resolved_config}",
        f"--num-cpus={int(head.get('CPU', 0))}", f"--num-gpus={int(head.get('GPU', 0))}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}", "--dashboard-agent-listen-port=0",
        "--disable-usage-stats",
    ]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        # A session of its own: a Ctrl-C in the caller's terminal does not reach the cluster.
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=temp_dir)
    cluster = LocalCluster(str(temp_dir), gcs_port, dashboard_port, client_port,
                           str(token_path))
    cluster.save()
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        returncode = None
    if returncode != 0:
        stop_local_cluster(cluster)
        raise ClusterError(f"`{shlex.join(command)}` failed (exit {returncode}); see {log_path}:\n"
                           + log_path.read_text(errors="replace")[-3000:])
    return cluster


def _marked_processes(temp_dir: str) -> list[int]:
    """Pids of processes whose environment carries this cluster's marker (Linux /proc)."""
    marker = f"{MARKER_VARIABLE}={temp_dir}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return [pid for pid in found if pid != os.getpid()]


def _alive(cluster: LocalCluster) -> list[int]:
    """Pids of the cluster's processes still running (zombies excluded)."""
    alive = []
    for pid in _marked_processes(cluster.temp_dir):
        try:
            # The state letter follows the ")" that closes the command name.
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except (OSError, IndexError):
            continue
    return sorted(alive)


def stop_local_cluster(cluster: LocalCluster | str | os.PathLike, grace_s: float = 10,
                       remove_files: bool = False) -> list[int]:
    """End every process of a rehearsal cluster (SIGTERM, then SIGKILL); return their pids.

    Only processes carrying this cluster's marker are signalled, by pid.
    ``remove_files`` then deletes its temp dir (token, logs, Ray session).
    """
    if not isinstance(cluster, LocalCluster):
        cluster = LocalCluster.load(cluster)
    stopped = _alive(cluster)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _alive(cluster):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5)
        while _alive(cluster) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _alive(cluster):
            break
    left = _alive(cluster)
    if left:
        raise ClusterError(f"rehearsal cluster {cluster.temp_dir}: pids {left} survived SIGKILL")
    if remove_files:
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return stopped


# ---------------------------------------------------------------------------- node provider
class RehearsalNodeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider, each fake node with a runtime-env folder of its own.

    Real nodes have disks of their own; fake ones share the head's session folder, where a new
    node's runtime-env agent re-extracts a job's ``working_dir`` (``overwrite=True``), deleting
    the folder the job's driver runs in on the head: the driver's next ``os.getcwd()`` raises
    FileNotFoundError. A per-node ``runtime_env_dir_name`` keeps them apart, as on real nodes.
    """

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources,
                                               labels):
        import ray._private.parameter as parameter

        make_params = parameter.RayParams
        # The base class builds RayParams itself; hand it one with this node's folder. The
        # provider's lock (re-entrant, taken again inside) keeps the swap to this one call.
        with self.lock:
            folder = f"runtime_resources_node{self._next_node_id + 1}"
            parameter.RayParams = functools.partial(make_params, runtime_env_dir_name=folder)
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count,
                                                               resources, labels)
            finally:
                parameter.RayParams = make_params


# ---------------------------------------------------------------------------- command line
def _pointer() -> Path:
    """Where ``start`` remembers the running cluster's folder (the user's own cache)."""
    from cifar_core.storage import cache_dir

    return cache_dir("rehearsal") / "current"

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster/local.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "env"))
    parser.add_argument("--temp-dir", default=os.environ.get("CIFAR_FLEET_REHEARSAL_DIR"),
                        help="Folder for the cluster's state, token and Ray session (default: "
                             "a new private folder under /tmp for start; the running "
                             "cluster's, remembered in the user's cache, for env and stop).")
    parser.add_argument("--config", default=str(REPO_ROOT / "cluster.local.yaml"))
    args = parser.parse_args(argv)
    pointer = _pointer()
    if args.action == "start":
        running = args.temp_dir or (pointer.read_text().strip() if pointer.exists() else None)
        if running and Path(running, STATE_FILE).exists() and _alive(LocalCluster.load(running)):
            print(f"a rehearsal cluster is already running in {running}", file=sys.stderr)
            return 2
        cluster = start_local_cluster(args.config, args.temp_dir)
        pointer.write_text(cluster.temp_dir)
        print(f"rehearsal cluster up: dashboard and jobs at {cluster.address}, state in "
              f"{cluster.temp_dir}")
        print('clients: eval "$(cluster/local.sh env)"; stop: cluster/local.sh stop')
        return 0
    temp_dir = args.temp_dir or (pointer.read_text().strip() if pointer.exists() else None)
    if not temp_dir:
        print("no rehearsal cluster is known (start one, or pass --temp-dir)", file=sys.stderr)
        return 2
    cluster = LocalCluster.load(temp_dir)
    if args.action == "env":
        for name, value in cluster.client_env().items():
            print(f"export {name}={shlex.quote(value)}")
        print(f"# cluster state: ray status --address 127.0.0.1:{cluster.gcs_port}")
        return 0
    stopped = stop_local_cluster(cluster)
    print(f"stopped {len(stopped)} processes: {stopped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
