#!/usr/bin/env bash
# Local rehearsal of cluster.yaml: a fake-GPU Ray cluster on this machine (see cluster.local.yaml).
#
#   cluster/local.sh start    # own ports, own temp dir, own token; prints how to reach it
#   eval "$(cluster/local.sh env)"
#   ray job submit --working-dir . -- python -m jobs.tune --smoke-test ...
#   cluster/local.sh stop     # ends exactly the processes `start` began, by pid (never a machine-wide Ray stop)
#
# State (token, logs, Ray session) lives in a new private folder under /tmp (mode 0700, the
# token file 0600), remembered in ~/.cache/cifar-fleet/rehearsal/current for env and stop;
# $CIFAR_FLEET_REHEARSAL_DIR or --temp-dir names another. Runs with the Python of the active environment
# (the one `pip install -e ".[test]"` installed this project into).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m cifar_core.cluster "$@"
