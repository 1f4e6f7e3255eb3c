from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Float, PyTree, Scalar

from .._misc import accumulation_dtype, tree_all_finite, tree_where
from ._common import (
    Aux,
    Progress,
    Termination,
    Y,
    check_common_options,
    check_tolerance,
    ravel,
    scaled_residual_size,
)


class _AndersonState(eqx.Module):
    history_y: Float[Array, "memory size"]
    history_residual: Float[Array, "memory size"]
    gram: Float[Array, "memory memory"]
    progress: Progress


def _spd_solve(
    matrix: Float[Array, "memory memory"], rhs: Float[Array, " memory"]
) -> Float[Array, " memory"]:
    """`matrix^{-1} rhs` for a small symmetric positive definite `matrix`, by a
    Cholesky factorisation written out column by column (`memory` is static).

    Only elementwise operations on vectors of length `memory`: under `jax.vmap` (a
    per-sample solve) these are fused batched operations, where `jnp.linalg.solve`
    would call LAPACK's LU once per sample on XLA:CPU. A matrix that is not
    numerically positive definite gives a non-finite result (the caller falls back).
    """
    m = rhs.shape[0]
    index = jnp.arange(m)
    columns = []  # columns of the lower-triangular factor L
    for j in range(m):
        # L[:, j] = (A[:, j] - sum_{k<j} L[:, k] L[j, k]) / L[j, j], zero above j.
        column = matrix[:, j]
        for previous in columns:
            column = column - previous * previous[j]
        pivot = jnp.sqrt(column[j])
        columns.append(jnp.where(index >= j, column / pivot, 0))
    # L y = rhs, then L^T w = y.
    y = []
    for i in range(m):
        value = rhs[i]
        for k in range(i):
            value = value - columns[k][i] * y[k]
        y.append(value / columns[i][i])
    w = [None] * m
    for i in reversed(range(m)):
        value = y[i]
        for k in range(i + 1, m):
            value = value - columns[i][k] * w[k]
        w[i] = value / columns[i][i]
    return jnp.stack(w)


def _mixing_weights(
    gram: Float[Array, "memory memory"],
    valid: Bool[Array, " memory"],
    ridge: float,
    fallback: Float[Array, " memory"],
) -> Float[Array, " memory"]:
    """Solve `min_α ||Σ_i α_i g_i||^2 + ridge Σ_i α_i^2 ||g_i||^2` subject to
    `Σ_i α_i = 1`, over the valid slots, given the Gram matrix `G G^T` of the `g_i`.

    The minimiser is `α = w / Σ w` with `(G G^T + ridge D) w = 1`, `D = diag(G G^T)`:
    the Lagrangian form of the usual bordered `(memory + 1) x (memory + 1)` system. It
    is solved in Jacobi-scaled form `(C + ridge I) w' = D^{-1/2} 1`, where `C` has unit
    diagonal, so the matrix is symmetric positive definite with condition number at
    most `(memory + ridge) / ridge` whatever the scale of the residuals. Invalid slots
    get an identity row and a zero right-hand side, so their weight is exactly zero.
    A zero residual keeps scale 1, so it gets (correctly) almost all of the weight.
    The small system is solved in at least float32 (LAPACK has no half precision).
    """
    out_dtype = gram.dtype
    gram = gram.astype(accumulation_dtype(out_dtype))
    fallback = fallback.astype(gram.dtype)
    both_valid = valid[:, None] & valid[None, :]
    diagonal = jnp.diagonal(gram)
    scale = jnp.sqrt(jnp.where(valid & (diagonal > 0), diagonal, 1))
    correlation = jnp.where(both_valid, gram / (scale[:, None] * scale[None, :]), 0)
    identity_weight = jnp.where(valid, ridge, 1).astype(gram.dtype)
    matrix = correlation + jnp.diag(identity_weight)
    rhs = jnp.where(valid, 1 / scale, 0)
    weights = _spd_solve(matrix, rhs) / scale
    total = jnp.sum(weights)
    ok = jnp.all(jnp.isfinite(weights)) & (total > 0)
    weights = jnp.where(ok, weights / jnp.where(ok, total, 1), fallback)
    return weights.astype(out_dtype)


class Anderson(optx.AbstractFixedPointSolver[Y, Aux, _AndersonState]):
    """Anderson acceleration (type II, limited memory) for fixed points `y = f(y)`.

    Each step evaluates `f` once at the current iterate `y_k`, stores `y_k` and its
    residual `g_k = f(y_k) - y_k` in a circular buffer of the last `memory`
    evaluations, and moves to the affine combination

    `y_{k+1} = Σ_i α_i (y_i + damping * g_i)`,

    where `α` minimises `||Σ_i α_i g_i||_2^2 + ridge * Σ_i α_i^2 ||g_i||_2^2` subject
    to `Σ_i α_i = 1`. The ridge is relative to each residual's size (as in SciPy's
    `anderson`), so the weights don't depend on the scale of `f`, and near-collinear
    residuals (typical close to convergence, or in low precision) give a system of
    condition number at most `(memory + ridge) / ridge`. The first step is a plain
    (damped) fixed-point iteration. On an affine `f(y) = A y + b` in `n` dimensions,
    with `memory > n`, `damping = 1` and a vanishing ridge, this is equivalent to
    GMRES on `(I - A) y = b`: exact after `n + 1` steps, even where fixed-point
    iteration diverges.

    **Function evaluations.** `init` evaluates nothing; every `step` evaluates `f`
    exactly once, at the `y` it is given, and returns the `aux` of that evaluation. So
    the number of evaluations equals `sol.stats["num_steps"]`.

    **Termination.** With `termination="elementwise"` (the default, optimistix's
    convention), the solve stops once `norm((f(y) - y) / (atol + rtol * |f(y)|)) < 1`
    at an evaluated `y`. With `termination="normwise"` it stops once
    `norm(f(y) - y) < atol + rtol * norm(f(y))`: with `norm=optx.two_norm` and
    `atol=0` this is the relative residual `||f(y) - y||_2 / ||f(y)||_2 < rtol` used by
    DEQ benchmarks (torchdeq's `stop_mode="rel"`); with `rtol=0`, the absolute one.
    This is a separate switch rather than a special `norm` because `norm` only ever
    sees one pytree, and a ratio of two norms cannot be written as a norm of one
    elementwise ratio.

    **Returned value.** The solver keeps the evaluated iterate with the lowest residual
    (in the termination measure) and its `aux`, and `postprocess` returns those: on
    success, the iterate at which convergence was detected; when `max_steps` runs out
    or the solve diverges, the best one seen. `sol.stats["residual_norm"]` is
    `norm(f(y) - y)` at the returned iterate. The solve is stopped with
    `optx.RESULTS.nonlinear_divergence` when `norm(f(y) - y)` becomes non-finite or
    exceeds `divergence_factor` times the residual of the best iterate. No NaN is
    produced from a degenerate history (a zero or repeated residual, cancellation in
    low precision): the weights come from a ridge-regularised positive definite solve
    and fall back to a plain iteration step should that solve fail.

    `y` may be any pytree of floating arrays (for example one array per scale of a
    multiscale DEQ); the algebra runs on its flattening. The state has a fixed size,
    independent of `max_steps`, so the solver works under `jax.vmap` (one independent
    solve per batch element).

    !!! Example

        ```python
        import jax.numpy as jnp
        import optimistix as optx
        import jaxdeq

        def f(z, x):
            return jnp.tanh(0.5 * z + x)

        x = jnp.linspace(-1.0, 1.0, 8)
        solver = jaxdeq.Anderson(rtol=1e-6, atol=1e-6)
        sol = optx.fixed_point(f, solver, jnp.zeros(8), x)
        # DEQ-style stopping: ||f(z) - z||_2 / ||f(z)||_2 < 1e-4.
        deq_solver = jaxdeq.Anderson(
            rtol=1e-4, atol=0.0, norm=optx.two_norm, termination="normwise"
        )
        sol = optx.fixed_point(f, deq_solver, jnp.zeros(8), x, max_steps=30)
        ```
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    memory: int = eqx.field(static=True, default=5)
    ridge: float = 1e-4
    damping: float = 1.0
    termination: Termination = eqx.field(static=True, default="elementwise")
    divergence_factor: float = 1e4

    def __check_init__(self):
        if isinstance(self.memory, bool) or not isinstance(self.memory, int):
            raise TypeError(
                f"Anderson(memory=...): expected a positive int, got {self.memory!r}"
            )
        if self.memory < 1:
            raise ValueError(
                f"Anderson(memory=...): expected a positive int, got {self.memory!r}"
            )
        check_tolerance("Anderson", "ridge", self.ridge)
        check_tolerance("Anderson", "damping", self.damping)
        if isinstance(self.ridge, (int, float)) and not self.ridge > 0:
            raise ValueError(f"Anderson(ridge=...): expected > 0, got {self.ridge}")
        if isinstance(self.damping, (int, float)) and not self.damping > 0:
            raise ValueError(f"Anderson(damping=...): expected > 0, got {self.damping}")
        check_common_options(
            "Anderson", self.rtol, self.atol, self.termination, self.divergence_factor
        )

    def init(
        self,
        fn: Callable,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _AndersonState:
        del fn, args, options, f_struct, tags
        y_flat, _ = ravel(y)
        dtype = y_flat.dtype
        return _AndersonState(
            history_y=jnp.zeros((self.memory, y_flat.size), dtype),
            history_residual=jnp.zeros((self.memory, y_flat.size), dtype),
            gram=jnp.zeros((self.memory, self.memory), dtype),
            progress=Progress.start(y, aux_struct, dtype),
        )

    def step(
        self,
        fn: Callable,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
    ) -> tuple[Y, _AndersonState, Aux]:
        del options, tags
        f_y, aux = fn(y, args)
        residual = jtu.tree_map(jnp.subtract, f_y, y)
        with jax.numpy_dtype_promotion("standard"):
            error = scaled_residual_size(
                self.norm, self.termination, self.atol, self.rtol, residual, f_y
            )
            residual_norm = self.norm(residual)
        progress = state.progress.record(y, aux, error, residual_norm)
        finite = tree_all_finite(residual)

        y_flat, unravel = ravel(y)
        residual_flat, _ = ravel(residual)
        slot = state.progress.num_steps % self.memory
        # The history is written with a one-hot select rather than `.at[slot]`: under
        # `jax.vmap` (a per-sample solve) each sample has its own slot, and a select
        # is one fused elementwise pass where a scatter copies and loops. A
        # non-finite evaluation stops the solve (see `terminate`); it is kept out of
        # the history so that nothing computed from here on is NaN.
        write = (jnp.arange(self.memory, dtype=slot.dtype) == slot) & finite
        history_y = jnp.where(write[:, None], y_flat[None], state.history_y)
        history_residual = jnp.where(
            write[:, None], residual_flat[None], state.history_residual
        )
        # Only one new row and column of the Gram matrix per step: O(memory * size).
        new_row = history_residual @ residual_flat
        gram = jnp.where(
            write[:, None],
            new_row[None, :],
            jnp.where(write[None, :], new_row[:, None], state.gram),
        )

        valid = jnp.arange(self.memory) < progress.num_steps
        plain_iteration = jax.nn.one_hot(slot, self.memory, dtype=gram.dtype)
        weights = _mixing_weights(gram, valid, self.ridge, plain_iteration)
        new_y_flat = weights @ history_y + self.damping * (weights @ history_residual)
        new_y = tree_where(finite, unravel(new_y_flat), progress.best_y)
        new_state = _AndersonState(history_y, history_residual, gram, progress)
        return new_y, new_state, aux

    def terminate(
        self,
        fn: Callable,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        del fn, y, args, options, tags
        return state.progress.terminate(self.divergence_factor)

    def postprocess(
        self,
        fn: Callable,
        y: Y,
        aux: Aux,
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Aux, dict[str, Any]]:
        del fn, y, aux, args, options, tags, result
        progress = state.progress
        stats = {"residual_norm": progress.best_residual_norm}
        return progress.best_y, progress.best_aux, stats


Anderson.__init__.__doc__ = """**Arguments:**

- `rtol`: Relative tolerance for terminating the solve (see "Termination" above).
- `atol`: Absolute tolerance for terminating the solve.
- `norm`: The norm used in the termination criterion, any function
    `PyTree -> Scalar`, e.g. `optimistix.max_norm` (the default),
    `optimistix.rms_norm` or `optimistix.two_norm`.
- `memory`: How many past evaluations the extrapolation uses (`m`). The state holds
    two `memory x size(y)` buffers, whatever `max_steps` is.
- `ridge`: Tikhonov regularisation of the least-squares problem for the mixing
    weights, relative to each residual's squared norm. Must be `> 0`.
- `damping`: The mixing parameter `β` of `y_{k+1} = Σ α_i ((1 - β) y_i + β f(y_i))`.
    `1.0` (the default) is undamped, as in DEQ benchmarks.
- `termination`: `"elementwise"` or `"normwise"`; see "Termination" above.
- `divergence_factor`: Stop with `optimistix.RESULTS.nonlinear_divergence` when the
    residual norm exceeds this multiple of the best one seen. `float("inf")` disables
    this check (non-finite residuals still stop the solve).
"""
