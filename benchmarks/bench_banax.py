"""banax 0.1.5 peer (JAX/Equinox, Python >= 3.12), run in .venv-banax (see envs.sh).

    Implicit(solver=Anderson(depth=5, ridge=1e-4, damp=1.0, rtol=1e-4, max_steps=30),
             b_solver=Picard(atol=1e-6, rtol=0.0, max_steps=30))

`rtol=0.0` on the backward Picard makes it stop on the absolute 1e-6 only, as the other
peers do (banax's default `rtol=1e-5` would also stop it on a relative criterion).
By default the whole batch is one system (banax's documented usage), so the forward
stops on one relative norm over the batch: fewer iterations than a per-sample rule.
`--per-sample` instead `jax.vmap`s the solve over the batch: every sample is its own
system, and the vmapped loop runs until the last sample has converged, which is the
bare loop's rule (reported as lib `banax_per_sample`).

Forward nfe counts cell evaluations (banax's `steps` plus the one in `init`).

    .venv-banax/bin/python benchmarks/bench_banax.py --workloads w1,w2 [--per-sample]
"""

from __future__ import annotations

import importlib.metadata
import sys

import jax
import jax.numpy as jnp
from banax.adjoint import JFB, Implicit
from banax.solver import Anderson, Picard

import workloads

MAX_STEPS = 30
FORWARD = Anderson(depth=5, ridge=1e-4, damp=1.0, rtol=1e-4, max_steps=MAX_STEPS)
BACKWARD = Picard(atol=1e-6, rtol=0.0, max_steps=MAX_STEPS)
IMPLICIT = Implicit(solver=FORWARD, b_solver=BACKWARD)
JOINT_STOP_RULE = (
    "whole batch: ||f(z)-z||/(||f(z)||+1e-8) <= 1e-4 with one norm over the batch, "
    "max 30 Anderson steps"
)
PER_SAMPLE_STOP_RULE = (
    "per sample (jax.vmap over the batch): loop until every sample's "
    "||f(z)-z||/(||f(z)||+1e-8) <= 1e-4, max 30 Anderson steps"
)


def _record_residual(trace, z, fz, aux):
    """banax trace fold: relative residual of every cell evaluation."""
    del aux
    count, residuals = trace
    diff = jax.tree.map(jnp.subtract, fz, z)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(diff)))
    scale = jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(fz)))
    return count + 1, residuals.at[count].set(norm / (scale + 1e-8))


def _empty_trace():
    return jnp.array(0), jnp.full((MAX_STEPS + 1,), jnp.nan)


def _solve_one_system(cell, cell_params, injection, z0):
    solution = IMPLICIT(
        (lambda z, p, inj: cell(p, z, inj), (cell_params, injection)),
        z0,
        trace=(_record_residual, _empty_trace()),
    )
    _, residuals = solution.trace
    stats = {
        "fwd_nfe": solution.stats.steps + 1,
        "rel_residual": solution.stats.rel_err,
        "residual_trace": residuals,
    }
    return solution.value, stats


def solve_joint(cell, cell_params, injection, z0):
    """The whole batch as one fixed-point system."""
    z_star, stats = _solve_one_system(cell, cell_params, injection, z0)
    stats["rel_residual"] = stats["rel_residual"][None]
    return z_star, stats


def solve_per_sample(cell, cell_params, injection, z0):
    """One system per sample, by `jax.vmap` over the batch axis."""

    def one_sample(injection, z0):
        def sample_cell(p, z, inj):
            batched = cell(p, jax.tree.map(lambda a: a[None], z), inj[None])
            return jax.tree.map(lambda a: a[0], batched)

        return _solve_one_system(sample_cell, cell_params, injection, z0)

    z_star, stats = jax.vmap(one_sample)(injection, z0)
    return z_star, {
        "fwd_nfe": stats["fwd_nfe"].max(),
        "fwd_nfe_per_sample": stats["fwd_nfe"],
        "rel_residual": stats["rel_residual"],
        "residual_trace": jnp.nanmax(stats["residual_trace"], axis=0),
    }


def _backward_nfe(sample_axis: bool):
    """Steps of banax's backward Picard solve for a cotangent (same map as Implicit)."""

    def count(cell, cell_params, injection, z_star, cotangent):
        _, pullback = jax.vjp(lambda z: cell(cell_params, z, injection), z_star)

        def adjoint_map(u):
            return jax.tree.map(jnp.add, cotangent, pullback(u)[0])

        if sample_axis:
            # vmapped per-sample systems: the loop runs until the slowest sample stops
            return _max_per_sample_picard_steps(adjoint_map, cotangent)
        return JFB(solver=BACKWARD)(adjoint_map, cotangent).stats.steps

    return count


def _max_per_sample_picard_steps(adjoint_map, cotangent):
    """Picard iterations until every sample's update is <= atol (or max steps)."""

    def per_sample_change(new, old):
        squares = [
            jnp.sum(jnp.square(n - o).reshape(n.shape[0], -1), axis=1)
            for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
        ]
        return jnp.sqrt(sum(squares))

    def cond(carry):
        steps, _, change = carry
        return (steps < MAX_STEPS) & (change > BACKWARD.atol)

    def body(carry):
        steps, u, _ = carry
        u_new = adjoint_map(u)
        return steps + 1, u_new, per_sample_change(u_new, u).max()

    init = (jnp.array(0), cotangent, jnp.array(jnp.inf))
    return jax.lax.while_loop(cond, body, init)[0]


def main(argv: list[str]) -> None:
    per_sample = "--per-sample" in argv
    argv = [arg for arg in argv if arg != "--per-sample"]
    workloads.run_jax_peer_cli(
        "banax_per_sample" if per_sample else "banax",
        solve_per_sample if per_sample else solve_joint,
        stop_rule=PER_SAMPLE_STOP_RULE if per_sample else JOINT_STOP_RULE,
        versions=workloads.jax_versions(banax=importlib.metadata.version("banax")),
        backward_nfe=_backward_nfe(sample_axis=per_sample),
        argv=argv,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
