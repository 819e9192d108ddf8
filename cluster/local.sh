#!/usr/bin/env bash
# Local rehearsal of cluster.yaml: a fake-GPU Ray cluster on this machine (see cluster.local.yaml).
#
#   cluster/local.sh start    # own ports, own temp dir, own token; prints how to reach it
#   eval "$(cluster/local.sh env)"
#   ray job submit --working-dir . -- python -m jobs.tune --smoke-test ...
#   cluster/local.sh stop     # ends exactly the processes `start` began, by pid (never a machine-wide Ray stop)
#
# State (token, logs, Ray session) lives in $CIFAR_FLEET_REHEARSAL_DIR
# (default /tmp/cifar-fleet-rehearsal). Runs with the Python of the active environment
# (the one `pip install -e ".[test]"` installed this project into).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m cifar_core.cluster "$@"
