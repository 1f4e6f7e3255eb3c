"""torchdeq's `anderson` and `broyden` solvers: relative residual of every cell call.

Run by `bench_nfe.py --with-torch` in .venv-torch (see envs.sh); reads the .npz files
that `bench_nfe.py` wrote (the JAX workload's parameters and inputs, in JAX layout),
solves the whole batch once per solver, and writes one .npz of results.

    .venv-torch/bin/python benchmarks/bench_nfe_torch.py IN.npz [...] --out OUT.npz

Each solver is torchdeq's own function called directly on the batch
(`torchdeq.solver.anderson_solver` with `m=5, lam=1e-4, tau=1.0`, and
`broyden_solver` with its defaults: full memory (`LBFGS_thres=max_iter`), no line
search), with `tol=1e-4, stop_mode="rel", max_iter=100`. The cell is wrapped so that
every call records each sample's `||f(z) - z||_2 / ||f(z)||_2` at the state it was
given: that is the per-sample trace `bench_nfe.py` counts from (the same measure as
on the JAX side). torchdeq's solvers are batched but per-sample independent (per-sample
`bmm`/`einsum`), except that they stop when the *largest* per-sample residual is below
`tol` (and Broyden's batch-level "no progress in 30 steps" exit), so every sample is
evaluated at every call until the batch stops. torchdeq's own `rel_trace` is saved too,
as a cross-check (it does not trace Anderson's first two calls nor Broyden's first).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json

import numpy as np
import torch
from torchdeq.solver import anderson_solver, broyden_solver

import workloads_torch

SOLVERS = {
    "anderson": lambda f, z0, tol, max_iter: anderson_solver(
        f, z0, max_iter=max_iter, tol=tol, stop_mode="rel", m=5, lam=1e-4, tau=1.0
    ),
    "broyden": lambda f, z0, tol, max_iter: broyden_solver(
        f, z0, max_iter=max_iter, tol=tol, stop_mode="rel"
    ),
}
# Cell calls before torchdeq's rel_trace[:, 1] (its entry 0 is a placeholder).
UNTRACED_CALLS = {"anderson": 2, "broyden": 1}


class RecordingCell:
    """The workload's cell at a fixed injection; records per-sample rel. residuals."""

    def __init__(self, workload, injection):
        self.workload, self.injection = workload, injection
        self.residuals: list[np.ndarray] = []

    def __call__(self, z):
        fz = self.workload.cell(z, self.injection)
        diff = (fz - z).flatten(1).norm(dim=1)
        self.residuals.append((diff / fz.flatten(1).norm(dim=1)).numpy())
        return fz


def run(path: str) -> dict[str, np.ndarray]:
    data = np.load(path)
    name, tiny = str(data["workload"]), bool(data["tiny"])
    tol, max_iter = float(data["tol"]), int(data["max_iter"])
    workload = workloads_torch.get_workload(name, tiny)
    params = {k[len("param:") :]: data[k] for k in data.files if k.startswith("param:")}
    workloads_torch.load_jax_params(workload, params)
    out = {}
    with torch.no_grad():
        x = workloads_torch._nhwc_to_nchw(data["x"])
        injection = workload.inject(x)
        jax_injection = workloads_torch._nhwc_to_nchw(data["injection"])
        out[f"{name}:injection_max_abs_err"] = np.array(
            (injection - jax_injection).abs().max().item()
        )
        for solver, call in SOLVERS.items():
            cell = RecordingCell(workload, injection)
            z0 = workload.initial_state(injection)
            _, _, info = call(cell, z0, tol, max_iter)
            # (calls, batch): rel. residual of every sample at every cell call.
            out[f"{name}:{solver}:residuals"] = np.stack(cell.residuals)
            out[f"{name}:{solver}:rel_trace"] = info["rel_trace"].numpy()
            out[f"{name}:{solver}:untraced_calls"] = np.array(UNTRACED_CALLS[solver])
            out[f"{name}:{solver}:nstep"] = info["nstep"].numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="IN.npz")
    parser.add_argument("--out", required=True, metavar="OUT.npz")
    args = parser.parse_args()
    results = {}
    for path in args.inputs:
        results |= run(path)
    versions = {
        "torch": torch.__version__,
        "torchdeq": importlib.metadata.version("torchdeq"),
    }
    np.savez(args.out, versions=json.dumps(versions), **results)
    print(json.dumps({"out": args.out, **versions}))


if __name__ == "__main__":
    main()
