#!/usr/bin/env bash
# Run the side-by-side benchmarks on a lent GPU machine (nothing can be downloaded
# there; its Python already has jax[cuda], torch, equinox, flax, optimistix, diffrax,
# lineax, optax).
#
# Here, once:   bash benchmarks/gpu_run.sh --fetch-wheels
#               (downloads torchdeq and banax wheels to benchmarks/wheels/, ignored by git)
# There:        the device tool's run, carrying benchmarks/wheels:
#               run(command="bash benchmarks/gpu_run.sh", carry=["benchmarks/wheels"])
# It installs jaxdeq (editable, no dependencies), torchdeq and banax from the carried
# wheels into that machine's Python, points the peers' venv paths at it, runs W1, W2
# (batch 32 and 128) and W3 for every peer, and writes RESULTS.md, records and plots
# under $OUT (merge the records here with `run_all.py --merge`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # the GPU machine runs Python 3.12 (banax needs >= 3.12)
    python3 -m pip download --no-deps --python-version 3.12 --only-binary=:all: \
        -d benchmarks/wheels torchdeq==0.1.0 banax==0.1.5
    exit 0
fi
PY=$(command -v python3 || command -v python)
"$PY" -m pip install --quiet --no-deps --no-index --find-links benchmarks/wheels \
    torchdeq banax
"$PY" -m pip install --quiet --no-deps -e .
for venv in .venv-torch .venv-banax; do
    mkdir -p "$venv/bin"
    ln -sf "$PY" "$venv/bin/python"
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
OUT=${OUT:-benchmarks/gpu-results}
"$PY" benchmarks/run_all.py --workloads w1,w2,w3 \
    --peers jaxdeq,bare_jax,torchdeq,banax,banax_per_sample --out "$OUT"
