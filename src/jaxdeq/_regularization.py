"""Jacobian regularization: Hutchinson estimates of `||J_f(z*)||_F^2 / numel`."""

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

JacobianMode = Literal["forward", "reverse", "finite_difference"]
JACOBIAN_MODES = ("forward", "reverse", "finite_difference")


def _gaussian_like(key: PRNGKeyArray, tree: PyTree[Array]) -> PyTree[Array]:
    leaves, treedef = jtu.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jtu.tree_unflatten(
        treedef,
        [
            jax.random.normal(k, leaf.shape, leaf.dtype)
            for k, leaf in zip(keys, leaves, strict=True)
        ],
    )


def _sum_sq(tree: PyTree[Array]) -> Float[Array, ""]:
    return sum(
        jnp.sum(jnp.square(leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))))
        for leaf in jtu.tree_leaves(tree)
    )


def jacobian_frobenius_estimate(
    f: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    key: PRNGKeyArray,
    mode: JacobianMode = "reverse",
) -> Float[Array, ""]:
    """Unbiased Hutchinson estimate of `||J_f(z)||_F^2 / numel(z)` with one Gaussian
    probe `v`: `||J v||^2 / numel` (`"forward"`, a JVP), `||J^T v||^2 / numel`
    (`"reverse"`, a VJP) or `||(f(z + e v) - f(z - e v)) / 2e||^2 / numel`
    (`"finite_difference"`, two extra evaluations). All three have the same
    expectation; the value is differentiable with respect to whatever `f` closes over.

    **Arguments:**

    - `f`: the map whose Jacobian is regularized, e.g. `lambda z: cell(z, x)`.
    - `z`: the point, e.g. the fixed point `z*` (a pytree of arrays).
    - `key`: a PRNG key for the probe.
    - `mode`: `"forward"`, `"reverse"` or `"finite_difference"`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> W = 0.5 * jnp.eye(4)
    >>> est = jaxdeq.jacobian_frobenius_estimate(
    ...     lambda z: z @ W.T, jnp.ones((2, 4)), jax.random.key(0), "forward")
    >>> bool(est > 0)
    True

    ```
    """
    if mode not in JACOBIAN_MODES:
        raise ValueError(f"mode: expected one of {JACOBIAN_MODES}, got {mode!r}")
    numel = sum(leaf.size for leaf in jtu.tree_leaves(z))
    v = _gaussian_like(key, z)
    if mode == "forward":
        _, jv = jax.jvp(f, (z,), (v,))
    elif mode == "reverse":
        _, f_vjp = jax.vjp(f, z)
        (jv,) = f_vjp(v)
    else:
        dtype = jtu.tree_leaves(z)[0].dtype
        scale = 1.0 + jax.lax.stop_gradient(jnp.sqrt(_sum_sq(z) / numel))
        eps = (jnp.finfo(dtype).eps ** (1 / 3) * scale).astype(dtype)
        f_plus = f(jtu.tree_map(lambda a, b: a + eps * b, z, v))
        f_minus = f(jtu.tree_map(lambda a, b: a - eps * b, z, v))
        jv = jtu.tree_map(lambda a, b: (a - b) / (2 * eps), f_plus, f_minus)
    return _sum_sq(jv) / numel
