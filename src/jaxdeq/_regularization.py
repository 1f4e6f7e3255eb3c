"""Regularizers and diagnostics for DEQ training, as plain functions usable in any
loss: the Jacobian-regularization estimate `||J_f(z*)||_F^2 / numel`, the
fixed-point correction loss, the skip loss, and a spectral-radius estimate."""

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._misc import accumulation_dtype, sample_sq_norm

if TYPE_CHECKING:
    from ._solution import DeepEquilibriumSolution

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
        jnp.sum(jnp.square(leaf.astype(accumulation_dtype(leaf.dtype))))
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


Weighting = Literal["exp", "linear", "constant"]
WEIGHTINGS = ("exp", "linear", "constant")


def fixed_point_correction_loss(
    loss_fn: Callable[[PyTree[Array]], Float[Array, ""]],
    states: PyTree[Array],
    gamma: float = 0.8,
    *,
    weighting: Weighting = "exp",
) -> Float[Array, ""]:
    """Fixed-point correction (Bai et al., 2022; torchdeq's `fp_correction`): a loss
    applied to `K` states sampled along the solve, `sum_k w_k loss_fn(z_k)`, so that
    the iterates leading to `z*`, not only `z*`, are trained.

    Weights, for `k = 0..K-1` (the last state weighs most): `"exp"`:
    `gamma^(K-1-k)`; `"linear"`: `1 - (K-1-k) / K * gamma`; `"constant"`: `1`.

    **Arguments:**

    - `loss_fn`: maps one state (batch first, shaped like `z*`) to a scalar loss,
        e.g. `lambda z: cross_entropy(head(z), labels)`.
    - `states`: a pytree whose leaves have a leading axis of length `K`, e.g.
        `solution.states` of a model built with `sample_states=K` (each
        state carries a one-step gradient to the cell's parameters).
    - `gamma`: the weighting's parameter, in `(0, 1]` for `"exp"`.
    - `weighting`: `"exp"` (default), `"linear"` or `"constant"`.

    **Returns:** the weighted sum of the `K` losses, a scalar.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optimistix as optx, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Chain(nn.Parallel(jnp.add, nn.Dense(3, 3), nn.Dense(3, 3)),
    ...                 nn.WrappedFunction(jnp.tanh))
    >>> model = jaxdeq.DeepEquilibriumNetwork(
    ...     cell, optx.FixedPointIteration(rtol=1e-4, atol=1e-4), sample_states=3)
    >>> x = jnp.ones((2, 3))
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> def loss(ps):
    ...     z, new_st, solution = model.apply(ps, st, x, return_solution=True)
    ...     states = solution.states
    ...     return jaxdeq.fixed_point_correction_loss(lambda z: jnp.mean(z**2), states)
    >>> grads = jax.grad(loss)(ps)

    ```
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "exp" and not 0 < gamma <= 1:
        raise ValueError(f"gamma: expected a value in (0, 1], got {gamma!r}")
    leaves = jtu.tree_leaves(states)
    if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError(
            "states: expected a pytree of arrays with a leading axis of sampled "
            "states (e.g. `solution.states` of a model with sample_states=K), got "
            f"{jax.eval_shape(lambda: states)}"
        )
    num_states = {leaf.shape[0] for leaf in leaves}
    if len(num_states) != 1:
        raise ValueError(
            f"states: leaves disagree on the number of states, {num_states}"
        )
    (num_states,) = num_states
    total = 0.0
    for k in range(num_states):
        if weighting == "exp":
            weight = gamma ** (num_states - 1 - k)
        elif weighting == "linear":
            weight = 1 - (num_states - 1 - k) / num_states * gamma
        else:
            weight = 1.0
        state = jtu.tree_map(lambda leaf, k=k: leaf[k], states)
        total = total + weight * loss_fn(state)
    return total


def skip_loss(solution: "DeepEquilibriumSolution") -> Float[Array, ""]:
    """The skip loss of Skip DEQs (Pal et al., 2022), `mean(|z* - u0|)` over every
    entry: it trains the initial condition `u0` (the init layer, or the cell in the
    skip-reg variant) to predict the fixed point. Both `z*` and `u0` carry
    gradients; `stop_gradient` one of them in the solution to train only the other.

    **Arguments:**

    - `solution`: a [`jaxdeq.DeepEquilibriumSolution`][], as returned by
        `model.apply(ps, st, x, return_solution=True)`.

    **Returns:** a scalar.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optimistix as optx, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Chain(nn.Parallel(jnp.add, nn.Dense(3, 3), nn.Dense(3, 3)),
    ...                 nn.WrappedFunction(jnp.tanh))
    >>> model = jaxdeq.SkipDeepEquilibriumNetwork(
    ...     cell, nn.Dense(3, 3), optx.FixedPointIteration(rtol=1e-4, atol=1e-4))
    >>> x = jnp.ones((2, 3))
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> _, st, solution = model.apply(ps, st, x, return_solution=True)
    >>> bool(jaxdeq.skip_loss(solution) >= 0)
    True

    ```
    """
    differences = jtu.tree_leaves(
        jtu.tree_map(jnp.subtract, solution.z_star, solution.u0)
    )
    total = sum(jnp.sum(jnp.abs(d)) for d in differences)
    return total / sum(d.size for d in differences)


def spectral_radius(
    f: Callable[[PyTree[Array]], PyTree[Array]],
    z: PyTree[Array],
    key: PRNGKeyArray,
    steps: int = 50,
    *,
    per_sample: bool = False,
) -> Float[Array, "*batch"]:
    """Estimate the spectral radius `max |lambda|` of the Jacobian `J_f(z)` by power
    iteration with Jacobian-vector products (one linearization of `f`, then one
    JVP per step; no dense Jacobian). A DEQ cell whose Jacobian at `z*` has
    spectral radius below 1 is locally contractive there, which fixed-point
    iteration and the implicit backward pass need.

    `J` need not be symmetric: the estimate is the geometric mean of the growth
    factors `||J v_k|| / ||v_k||` over the second half of the iterations, which
    tends to `|lambda_max|` also when the dominant eigenvalues are a complex pair
    (where the iterates themselves rotate and do not converge).

    **Arguments:**

    - `f`: the map, e.g. `lambda z: cell.apply(ps, st, (z, x))[0]`.
    - `z`: the point, e.g. `solution.z_star` (a pytree of arrays).
    - `key`: a PRNG key for the starting vector.
    - `steps`: power-iteration steps (static).
    - `per_sample`: if `True`, the leading axis of every leaf is a batch of
        independent problems (a cell that does not couple samples, whose Jacobian
        is block diagonal) and one radius per sample is returned.

    **Returns:** a scalar, or shape `(batch,)` with `per_sample`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> A = jnp.array([[0.5, 1.0], [0.0, -0.8]])  # eigenvalues 0.5 and -0.8
    >>> rho = jaxdeq.spectral_radius(lambda z: A @ z, jnp.ones(2), jax.random.key(0))
    >>> bool(jnp.abs(rho - 0.8) < 1e-2)
    True

    ```
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps: expected an int >= 2, got {steps!r}")
    _, jvp = jax.linearize(f, z)

    def norm(v):
        return jnp.sqrt(sample_sq_norm(v, batched=per_sample))

    def normalize(v, n):
        tiny = jnp.finfo(n.dtype).tiny

        def scale(leaf):
            factor = jnp.maximum(n, tiny)
            if per_sample:
                factor = factor.reshape(factor.shape + (1,) * (leaf.ndim - 1))
            return leaf / factor.astype(leaf.dtype)

        return jtu.tree_map(scale, v)

    v = _gaussian_like(key, z)
    v = normalize(v, norm(v))

    def step(v, _):
        w = jvp(v)
        growth = norm(w)
        return normalize(w, growth), jnp.log(
            jnp.maximum(growth, jnp.finfo(growth.dtype).tiny)
        )

    _, log_growth = jax.lax.scan(step, v, None, length=steps)
    return jnp.exp(jnp.mean(log_growth[steps // 2 :], axis=0))
