"""Shared test helpers: cells with known behaviour, tree comparisons, finite
differences."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.nn import initializers

from jaxdeq import nn


def tree_allclose(a, b, rtol=1e-6, atol=1e-6):
    la, ta = jtu.tree_flatten(a)
    lb, tb = jtu.tree_flatten(b)
    if ta != tb:
        return False
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        for x, y in zip(la, lb, strict=True)
    )


def max_rel_error(a, b):
    a = np.concatenate([np.ravel(x) for x in jtu.tree_leaves(a)])
    b = np.concatenate([np.ravel(x) for x in jtu.tree_leaves(b)])
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def dense_cell(width, scale=0.3):
    """`tanh(W z + U x + b)` with `||W||` small enough to be a contraction."""
    init = initializers.normal(scale / np.sqrt(width))
    return nn.Chain(
        nn.Parallel(
            jnp.add,
            nn.Dense(width, width, use_bias=False, kernel_init=init),
            nn.Dense(width, width, kernel_init=initializers.normal(1 / np.sqrt(width))),
        ),
        nn.WrappedFunction(jnp.tanh),
    )


def conv_cell(channels, scale=0.3):
    """`tanh(conv(z) + conv(x))`, contractive."""
    fan_in = 9 * channels
    return nn.Chain(
        nn.Parallel(
            jnp.add,
            nn.Conv(
                3,
                channels,
                channels,
                use_bias=False,
                kernel_init=initializers.normal(scale / np.sqrt(fan_in)),
            ),
            nn.Conv(3, channels, channels),
        ),
        nn.WrappedFunction(jnp.tanh),
    )


def central_difference_grad(fn, params, eps=1e-6):
    """Gradient of a scalar `fn(params)` by central differences, leaf by leaf."""
    leaves, treedef = jtu.tree_flatten(params)
    grads = []
    for i, leaf in enumerate(leaves):
        flat = np.asarray(leaf, dtype=np.float64).ravel()
        g = np.zeros_like(flat)
        for j in range(flat.size):
            up, down = flat.copy(), flat.copy()
            up[j] += eps
            down[j] -= eps
            lp = list(leaves)
            lp[i] = jnp.asarray(up.reshape(leaf.shape))
            lm = list(leaves)
            lm[i] = jnp.asarray(down.reshape(leaf.shape))
            g[j] = (
                fn(jtu.tree_unflatten(treedef, lp))
                - fn(jtu.tree_unflatten(treedef, lm))
            ) / (2 * eps)
        grads.append(g.reshape(leaf.shape))
    return jtu.tree_unflatten(treedef, grads)


def random_like(key, tree):
    leaves, treedef = jtu.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jtu.tree_unflatten(
        treedef,
        [
            jax.random.normal(k, leaf.shape, leaf.dtype)
            for k, leaf in zip(keys, leaves, strict=True)
        ],
    )


def dense_fixed_point(f, z_guess):
    """A reference `z*(theta)` with `z* = f(z*, theta)`, by the implicit function
    theorem with dense Jacobians: Newton iterations (dense LU) for the value, and the
    tangent `dz = (I - J_z)^{-1} J_theta dtheta` by `jnp.linalg.solve`. Its JVP rule is
    plain JAX, so every AD transformation (jacfwd, hessian, grad of grad) applies.
    `f` maps a pytree state and a pytree `theta` to the state's structure."""
    flat_guess, unravel = jax.flatten_util.ravel_pytree(z_guess)

    def flat_f(z, theta):
        return jax.flatten_util.ravel_pytree(f(unravel(z), theta))[0]

    @jax.custom_jvp
    def solve(theta):
        def newton(_, z):
            jac = jax.jacobian(flat_f)(z, theta)
            eye = jnp.eye(z.size, dtype=z.dtype)
            return z - jnp.linalg.solve(eye - jac, z - flat_f(z, theta))

        return jax.lax.fori_loop(0, 50, newton, flat_guess)

    @solve.defjvp
    def solve_jvp(primals, tangents):
        (theta,), (theta_dot,) = primals, tangents
        z = solve(theta)
        jac = jax.jacobian(flat_f)(z, theta)
        rhs = jax.jvp(lambda t: flat_f(z, t), (theta,), (theta_dot,))[1]
        return z, jnp.linalg.solve(jnp.eye(z.size, dtype=z.dtype) - jac, rhs)

    return lambda theta: unravel(solve(theta))
