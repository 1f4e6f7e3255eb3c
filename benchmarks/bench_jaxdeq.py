"""jaxdeq on the benchmark workloads, through its public API.

The workload's cell becomes a `jaxdeq.nn` layer; the solve is a
`jaxdeq.DeepEquilibriumNetwork` with the benchmark's settings: Anderson (memory 5,
ridge 1e-4, no damping) stopping per sample at `||f(z)-z|| <= 1e-4 ||f(z)||` or 30
steps, and `ImplicitAdjoint` (fixed-point iteration of the VJP, absolute 1e-6 or 30
steps), per-sample (vmapped) solves.

    python benchmarks/bench_jaxdeq.py --workloads w1,w2 [--tiny] [--reps N]
"""

from __future__ import annotations

import os
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx

import jaxdeq
import workloads
from jaxdeq import nn

MAX_STEPS = 30
STOP_RULE = (
    "per sample (vmapped solves): each sample stops when ||f(z)-z||_2 <= 1e-4 "
    "||f(z)||_2, max 30 Anderson steps; the batch runs until its slowest sample stops"
)


class WorkloadCell(nn.AbstractLayer):
    """A benchmark cell `cell(params, z, injection)` as a ps/st layer on `(z, x)`."""

    cell: Callable = eqx.field(static=True)
    param_structs: object = eqx.field(static=True)

    def init(self, key, x):
        # The benchmark owns the parameters; init only fixes their structure.
        return jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), self.param_structs
        ), {}

    def apply(self, ps, st, x):
        z, injection = x
        return self.cell(ps, z, injection), st


def make_model(cell, cell_params, z0) -> jaxdeq.DeepEquilibriumNetwork:
    structs = jax.eval_shape(lambda: z0)
    zeros = nn.WrappedFunction(
        lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structs)
    )
    return jaxdeq.DeepEquilibriumNetwork(
        WorkloadCell(cell, jax.eval_shape(lambda: cell_params)),
        jaxdeq.Anderson(
            rtol=1e-4,
            atol=0.0,
            norm=optx.two_norm,
            termination="normwise",
            memory=5,
            ridge=1e-4,
        ),
        init=zeros,
        # The default backward: GMRES to eps^(2/3) relative (float32: 2.4e-5), which
        # is more accurate than BENCHMARKS.md's 30 fixed-point VJP steps to 1e-6.
        # JAXDEQ_BACKWARD=gmres|fixed_point measures the other backward solvers.
        adjoint=jaxdeq.ImplicitAdjoint(os.environ.get("JAXDEQ_BACKWARD", "auto")),
        max_steps=MAX_STEPS,
    )


def solve(cell, cell_params, injection, z0):
    model = make_model(cell, cell_params, z0)
    _, st = model.init(jax.random.key(0), injection)
    z_star, _, solution = model.apply(
        {"model": cell_params, "init": {}}, st, injection, return_solution=True
    )
    stats = {
        "fwd_nfe": jnp.max(solution.nfe),
        "fwd_nfe_per_sample": solution.nfe,
        "rel_residual": solution.relative_residual_norm,
    }
    return z_star, stats


if __name__ == "__main__":
    workloads.run_jax_peer_cli(
        "jaxdeq",
        solve,
        stop_rule=STOP_RULE,
        versions=workloads.jax_versions(jaxdeq=jaxdeq.__version__),
    )
