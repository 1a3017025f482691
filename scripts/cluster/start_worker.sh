#!/usr/bin/env bash
# Joins this machine to a Ray cluster started by start_head.sh (run scripts/setup.sh first).
#
#   scripts/cluster/start_worker.sh HEAD_IP:PORT [--resources '{"sampler_node": 1}'] [--num-gpus 1] [...]
#
# The head's ~/.ray/auth_token must be here too (same path), or in RAY_AUTH_TOKEN. Custom resources label the
# node for a role: a recipe pins the learner or the samplers there with learner.resources / sampler.resources.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 HEAD_IP:PORT [ray start options]" >&2; exit 2; }
root="$(cd "$(dirname "$0")/../.." && pwd)"
address="$1"; shift
export RAY_AUTH_MODE=token
[ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s "$HOME/.ray/auth_token" ] || {
    echo "start_worker: no Ray auth token: copy the head's ~/.ray/auth_token here or set RAY_AUTH_TOKEN" >&2; exit 1; }
"$root/.venv/bin/ray" start --address="$address" "$@"
