#!/usr/bin/env bash
# Create the peers' virtual environments, idempotently:
#   .venv-torch  Python 3.11 + torch 2.13.0 (CPU build from local disk) + torchdeq 0.1.0
#   .venv-banax  Python 3.12 (pyenv) + banax 0.1.5 + jax (the main venv's version) + optax
# Each venv gets a stamp file once its install succeeded; rerunning skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON311=${PYTHON311:-python3.11}
if ! "$PYTHON311" --version >/dev/null 2>&1; then PYTHON311=python3; fi

find_python312() {  # the first Python 3.12 that actually runs (pyenv shims may not)
    local candidate
    for candidate in "${PYTHON312:-}" python3.12 \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if [ -n "$candidate" ] && "$candidate" --version >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
    echo "envs.sh: no working Python 3.12 found (set PYTHON312)" >&2
    return 1
}

make_venv() {  # make_venv DIR PYTHON PACKAGES...
    local venv_dir=$1 python=$2
    shift 2
    local stamp="$venv_dir/.installed-stamp"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$*" ]; then
        echo "envs.sh: $venv_dir up to date"
        return
    fi
    echo "envs.sh: creating $venv_dir with $("$python" --version)"
    "$python" -m venv "$venv_dir"
    "$venv_dir/bin/python" -m pip install --quiet --upgrade pip
    "$venv_dir/bin/python" -m pip install --quiet "$@"
    echo "$*" >"$stamp"
}

# torch first and pinned, so that torchdeq's own dependency on torch is already met and
# pip never reaches for a multi-GB CUDA build.
make_venv .venv-torch "$PYTHON311" torch==2.13.0 torchdeq==0.1.0 numpy psutil
# The same jax as the main venv, so that JAX peers differ in their DEQ code, not in XLA.
JAX_VERSION=$(.venv/bin/python -c "import jax; print(jax.__version__)" 2>/dev/null || true)
JAX_REQUIREMENT=jax${JAX_VERSION:+==$JAX_VERSION}
PYTHON312=$(find_python312)
make_venv .venv-banax "$PYTHON312" banax==0.1.5 "$JAX_REQUIREMENT" optax psutil
