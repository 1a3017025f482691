#!/usr/bin/env bash
# Submits a command to the cluster as a Ray job, from the repository root (shipped as the job's working dir).
#
#   scripts/cluster/submit.sh rl-train recipe=arithmetic_rl cluster=ray sampler.replicas=2
#
# RL_JOB_ADDRESS picks the job server (default http://127.0.0.1:8265, the head's dashboard).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
root="$(cd "$(dirname "$0")/../.." && pwd)"
command="$1"; shift
[ -x "$root/.venv/bin/$command" ] && command="$root/.venv/bin/$command"
export RAY_AUTH_MODE=token
cd "$root"
# Right after `ray start --head` the job server may not have found the head's job agent yet and refuses the
# submission ("No available agent"); nothing was submitted then, so it is safe to try again.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for attempt in $(seq 1 20); do
    status=0
    "$root/.venv/bin/ray" job submit --address "${RL_JOB_ADDRESS:-http://127.0.0.1:8265}" -- "$command" "$@" 2>&1 \
        | tee "$log" || status=$?
    grep -q "No available agent" "$log" || exit "$status"
    echo "submit: the job server has no agent yet (try $attempt of 20); trying again in 3 s" >&2
    sleep 3
done
exit 1
