#!/usr/bin/env bash
# Stops Ray on this machine (head or worker): every Ray of this user, as `ray stop` does, including one that
# rl-train or rl-serve started in its own process here, which then exits.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
RAY_AUTH_MODE=token "$root/.venv/bin/ray" stop "$@"
