#!/usr/bin/env bash
# Stops Ray on this machine (head or worker).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
RAY_AUTH_MODE=token "$root/.venv/bin/ray" stop "$@"
