"""Bare JAX DEQ: the floor that jaxdeq's general machinery must match.

A minimal hand-written DEQ of the benchmark settings: Anderson acceleration (memory 5,
ridge 1e-4, no damping) in one `lax.while_loop` over the whole batch with per-sample
relative-residual stopping (the loop runs until every sample's residual is <= 1e-4 or
30 cell evaluations; each sample keeps its lowest-residual iterate), and an implicit
backward pass in `jax.custom_vjp` that iterates `u <- J_f(z*)^T u + g` until every
sample's update is <= 1e-6 in absolute norm, or 30 VJPs.

    python benchmarks/bench_bare_jax.py --workloads w1,w2 [--tiny] [--reps N]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import workloads

HISTORY = 5
RIDGE = 1e-4
FORWARD_RTOL = 1e-4
MAX_STEPS = 30
BACKWARD_ATOL = 1e-6
STOP_RULE = (
    "per sample: loop until every sample's ||f(z)-z||/(||f(z)||+1e-9) <= 1e-4 "
    "(max over the batch), max 30 evaluations"
)


def _flatten_per_sample(tree):
    """A pytree of (batch, ...) arrays as one (batch, n) array, and the inverse."""
    leaves, treedef = jax.tree.flatten(tree)
    batch = leaves[0].shape[0]
    split_points = np.cumsum([leaf.size // batch for leaf in leaves])[:-1]
    flat = jnp.concatenate([leaf.reshape(batch, -1) for leaf in leaves], axis=1)

    def unflatten(flat):
        parts = jnp.split(flat, split_points, axis=1)
        shaped = [
            part.reshape(leaf.shape) for part, leaf in zip(parts, leaves, strict=True)
        ]
        return treedef.unflatten(shaped)

    return flat, unflatten


def _per_sample_norm(tree) -> jax.Array:
    squares = [
        jnp.sum(jnp.square(leaf.reshape(leaf.shape[0], -1)), axis=1)
        for leaf in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(squares))


def anderson(fn, z0):
    """Fixed point of `fn` from `z0`, per sample; returns `(z_star, stats)`."""
    flat0, unflatten = _flatten_per_sample(z0)
    batch, size = flat0.shape

    def f(flat):
        return _flatten_per_sample(fn(unflatten(flat)))[0]

    def rel_residual(x, fx):
        return jnp.linalg.norm(fx - x, axis=1) / (jnp.linalg.norm(fx, axis=1) + 1e-9)

    f0 = f(flat0)
    f1 = f(f0)
    history_x = jnp.zeros((batch, HISTORY, size), flat0.dtype)
    history_x = history_x.at[:, 0].set(flat0).at[:, 1].set(f0)
    history_f = jnp.zeros_like(history_x).at[:, 0].set(f0).at[:, 1].set(f1)
    res0, res1 = rel_residual(flat0, f0), rel_residual(f0, f1)
    best = jnp.where((res1 < res0)[:, None], f1, f0)
    best_res = jnp.minimum(res0, res1)
    converged_at = jnp.where(
        res0 <= FORWARD_RTOL, 1, jnp.where(res1 <= FORWARD_RTOL, 2, 0)
    )
    trace = jnp.full((MAX_STEPS,), jnp.nan).at[0].set(res0.max()).at[1].set(res1.max())
    eye = jnp.eye(HISTORY, dtype=flat0.dtype)

    def cond(carry):
        evaluations, _, _, _, best_res, _, _ = carry
        return (evaluations < MAX_STEPS) & jnp.any(best_res > FORWARD_RTOL)

    def body(carry):
        evaluations, history_x, history_f, best, best_res, converged_at, trace = carry
        active = (jnp.arange(HISTORY) < jnp.minimum(evaluations, HISTORY)).astype(
            flat0.dtype
        )
        residuals = (history_f - history_x) * active[None, :, None]
        # min ||sum_i a_i g_i||^2 + ridge ||a||^2 subject to sum a = 1 gives
        # a ~ (G G^T + ridge I)^-1 1; unused slots get an identity row and a zero
        # right-hand side, hence a_i = 0.
        gram = jnp.einsum("bin,bjn->bij", residuals, residuals)
        gram = gram + RIDGE * eye + jnp.diag(1.0 - active)
        weights = jnp.linalg.solve(
            gram, jnp.broadcast_to(active, (batch, HISTORY))[..., None]
        )[..., 0]
        alpha = weights / jnp.sum(weights, axis=1, keepdims=True)
        x_new = jnp.einsum("bi,bin->bn", alpha, history_f)
        f_new = f(x_new)
        slot = evaluations % HISTORY
        history_x = history_x.at[:, slot].set(x_new)
        history_f = history_f.at[:, slot].set(f_new)
        res = rel_residual(x_new, f_new)
        improved = res < best_res
        best = jnp.where(improved[:, None], f_new, best)
        best_res = jnp.where(improved, res, best_res)
        evaluations = evaluations + 1
        converged_at = jnp.where(
            (converged_at == 0) & (res <= FORWARD_RTOL), evaluations, converged_at
        )
        trace = trace.at[evaluations - 1].set(res.max())
        return evaluations, history_x, history_f, best, best_res, converged_at, trace

    init = (jnp.array(2), history_x, history_f, best, best_res, converged_at, trace)
    evaluations, _, _, best, best_res, converged_at, trace = jax.lax.while_loop(
        cond, body, init
    )
    stats = {
        "fwd_nfe": evaluations,
        "fwd_nfe_per_sample": jnp.where(converged_at == 0, evaluations, converged_at),
        "rel_residual": best_res,
        "residual_trace": trace,
    }
    return unflatten(best), stats


def solve_adjoint(vjp_state, cotangent):
    """Solve `u = J^T u + g` by fixed-point iteration; returns `(u, iterations)`."""

    def cond(carry):
        iterations, _, change = carry
        return (iterations < MAX_STEPS) & (change > BACKWARD_ATOL)

    def body(carry):
        iterations, u, _ = carry
        (vjp_u,) = vjp_state(u)
        u_new = jax.tree.map(jnp.add, vjp_u, cotangent)
        change = _per_sample_norm(jax.tree.map(jnp.subtract, u_new, u)).max()
        return iterations + 1, u_new, change

    iterations, u, _ = jax.lax.while_loop(
        cond, body, (jnp.array(0), cotangent, jnp.array(jnp.inf))
    )
    return u, iterations


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fixed_point(cell, cell_params, injection, z0):
    """`z* = cell(cell_params, z*, injection)` with implicit gradients."""
    return anderson(lambda z: cell(cell_params, z, injection), z0)


def _fixed_point_fwd(cell, cell_params, injection, z0):
    z_star, stats = fixed_point(cell, cell_params, injection, z0)
    return (z_star, stats), (cell_params, injection, z_star, z0)


def _fixed_point_bwd(cell, residuals, cotangents):
    cell_params, injection, z_star, z0 = residuals
    z_cotangent, _ = cotangents
    _, vjp_state = jax.vjp(lambda z: cell(cell_params, z, injection), z_star)
    adjoint, _ = solve_adjoint(vjp_state, z_cotangent)
    _, vjp_inputs = jax.vjp(lambda p, inj: cell(p, z_star, inj), cell_params, injection)
    grad_params, grad_injection = vjp_inputs(adjoint)
    return grad_params, grad_injection, jax.tree.map(jnp.zeros_like, z0)


fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)


def backward_nfe(cell, cell_params, injection, z_star, cotangent):
    """Iterations the backward solve takes for this cotangent."""
    _, vjp_state = jax.vjp(lambda z: cell(cell_params, z, injection), z_star)
    return solve_adjoint(vjp_state, cotangent)[1]


if __name__ == "__main__":
    workloads.run_jax_peer_cli(
        "bare_jax",
        fixed_point,
        stop_rule=STOP_RULE,
        versions=workloads.jax_versions(),
        backward_nfe=backward_nfe,
    )
