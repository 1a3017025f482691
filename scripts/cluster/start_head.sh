#!/usr/bin/env bash
# Starts the head node of a Ray cluster for rl on this machine (run scripts/setup.sh first).
#
#   scripts/cluster/start_head.sh [--resources '{"learner_node": 1}'] [other `ray start` options]
#
# Ray 2.60 needs token authentication for `ray job submit`: this creates ~/.ray/auth_token once and starts Ray
# with RAY_AUTH_MODE=token. Copy that token to every worker machine (start_worker.sh reads it from there or from
# RAY_AUTH_TOKEN). The dashboard (and job server) listens on RL_DASHBOARD_HOST, loopback unless you say otherwise.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
ray="$root/.venv/bin/ray"
export RAY_AUTH_MODE=token
"$ray" get-auth-token --generate > /dev/null
"$ray" start --head --port="${RL_RAY_PORT:-6379}" --dashboard-host="${RL_DASHBOARD_HOST:-127.0.0.1}" \
    --include-dashboard=true "$@"
echo "head: workers join with scripts/cluster/start_worker.sh $(hostname -I 2>/dev/null | cut -d' ' -f1):${RL_RAY_PORT:-6379}"
echo "head: launch a recipe with scripts/cluster/submit.sh rl-train recipe=arithmetic_rl cluster=ray"
