from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._misc import tree_all_finite, tree_where
from ._common import (
    Aux,
    Progress,
    Termination,
    Y,
    check_common_options,
    ravel,
    scaled_residual_size,
)

# Armijo constant of the line search, and the step length below which a trial point
# is accepted whatever its residual (after four halvings).
_ARMIJO = 1e-4
_MIN_STEP_LENGTH = 1 / 16


class _BroydenState(eqx.Module):
    u: Float[Array, "memory size"]
    v: Float[Array, "memory size"]
    num_updates: Int[Array, ""]
    y_base: Float[Array, " size"]
    residual_base: Float[Array, " size"]
    direction: Float[Array, " size"]
    step_length: Scalar
    progress: Progress


def _inverse_jacobian_mv(u, v, x):
    # H x, with H = -I + Σ_i u_i v_i^T.
    return -x + (v @ x) @ u


def _inverse_jacobian_rmv(u, v, x):
    # H^T x.
    return -x + (u @ x) @ v


class Broyden(optx.AbstractRootFinder[Y, Y, Aux, _BroydenState]):
    """Limited-memory ("good") Broyden method for roots `g(y) = 0`, and through
    `optx.fixed_point` for fixed points `y = f(y)` (optimistix solves those as roots
    of `g(y) = f(y) - y`).

    The inverse Jacobian of `g` is approximated by `H = -I + Σ_i u_i v_i^T`, starting
    from `H = -I` (the inverse Jacobian of `f(y) - y` when `f` is locally constant, so
    the first step is one plain fixed-point iteration `y_1 = y_0 + g(y_0)`). Each step
    evaluates `g` at the current iterate, applies the Sherman--Morrison form of
    Broyden's rank-one secant update

    `H <- H + (Δy - H Δg) (Δy^T H) / (Δy^T H Δg)`

    and moves to `y - H g(y)`. The `memory` rank-one terms live in two fixed-size
    `memory x size(y)` buffers. Once they are full, the next update restarts from
    `H = -I`. (Overwriting the oldest term instead, as some DEQ implementations do,
    leaves an `H` that no longer satisfies the recent secant equations, since each term
    was computed against the ones before it; on hard problems that diverged markedly
    more often in our tests.) An update is skipped when `Δy^T H Δg` is (relatively)
    too close to zero to divide by, so a degenerate history (zero steps, constant `g`,
    cancellation in low precision) never produces NaN.

    `g` must return a pytree with the same structure and shapes as `y`.

    **Line search.** With `line_search=True`, a backtracking (Armijo) line search on
    `||g||_2^2` is spread over steps, so that every step still evaluates `g` once: a
    trial point `y_base + t d` that fails to decrease `||g||_2^2` by the factor
    `1 - 2e-4 t` is rejected, and the next step tries `t / 2` from the same base point
    (its secant information is still used to update `H`). After four halvings the trial
    point is accepted regardless. Off by default: on DEQ-like problems the full
    Broyden step, even when it increases `||g||` for a while, usually gets there in
    fewer evaluations.

    **Function evaluations.** `init` evaluates nothing; every `step` evaluates `g`
    exactly once, at the `y` it is given, and returns the `aux` of that evaluation. So
    the number of evaluations equals `sol.stats["num_steps"]`.

    **Termination.** With `termination="elementwise"` (the default), the solve stops
    once `norm(g(y) / (atol + rtol * |y|)) < 1` at an evaluated `y`; with
    `termination="normwise"`, once `norm(g(y)) < atol + rtol * norm(y)`. The residual
    is measured against `y` because a root finder only sees `g`; for a fixed point
    `g(y) = f(y) - y` this agrees with [`jaxdeq.Anderson`][]'s scale `|f(y)|` up to a
    factor `1 + O(tolerance)`. So `norm=optx.two_norm, atol=0, termination="normwise"`
    is the DEQ benchmarks' relative residual `||f(y) - y||_2 / ||y||_2 < rtol`.

    **Returned value.** The solver keeps the evaluated iterate with the lowest residual
    (in the termination measure) and its `aux`, and `postprocess` returns those: on
    success, the iterate at which convergence was detected; when `max_steps` runs out
    or the solve diverges, the best one seen. `sol.stats["residual_norm"]` is
    `norm(g(y))` at the returned iterate. The solve is stopped with
    `optx.RESULTS.nonlinear_divergence` when `norm(g(y))` becomes non-finite or exceeds
    `divergence_factor` times the residual of the best iterate.

    `y` may be any pytree of floating arrays; the algebra runs on its flattening. The
    state has a fixed size, independent of `max_steps`, so the solver works under
    `jax.vmap` (one independent solve per batch element).

    !!! Example

        ```python
        import jax.numpy as jnp
        import optimistix as optx
        import jaxdeq

        def f(z, x):
            return jnp.tanh(0.5 * z + x)

        x = jnp.linspace(-1.0, 1.0, 8)
        solver = jaxdeq.Broyden(rtol=1e-6, atol=1e-6)
        sol = optx.fixed_point(f, solver, jnp.zeros(8), x)
        # The same problem as a root find:
        sol = optx.root_find(lambda z, x: f(z, x) - z, solver, jnp.zeros(8), x)
        ```
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    memory: int = eqx.field(static=True, default=10)
    line_search: bool = eqx.field(static=True, default=False)
    termination: Termination = eqx.field(static=True, default="elementwise")
    divergence_factor: float = 1e4

    def __check_init__(self):
        if isinstance(self.memory, bool) or not isinstance(self.memory, int):
            raise TypeError(
                f"Broyden(memory=...): expected a positive int, got {self.memory!r}"
            )
        if self.memory < 1:
            raise ValueError(
                f"Broyden(memory=...): expected a positive int, got {self.memory!r}"
            )
        if not isinstance(self.line_search, bool):
            raise TypeError(
                f"Broyden(line_search=...): expected a bool, got {self.line_search!r}"
            )
        check_common_options(
            "Broyden", self.rtol, self.atol, self.termination, self.divergence_factor
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
    ) -> _BroydenState:
        del fn, args, options, tags
        y_struct = jax.eval_shape(lambda: y)
        y_leaves, y_tree = jtu.tree_flatten(y_struct)
        f_leaves, f_tree = jtu.tree_flatten(f_struct)
        same_shape = y_tree == f_tree and all(
            a.shape == b.shape for a, b in zip(y_leaves, f_leaves, strict=True)
        )
        if not same_shape:
            raise ValueError(
                "`Broyden` needs `fn(y, args)` to return a pytree with the same "
                f"structure and shapes as `y`; got {f_struct} for `y` of {y_struct}."
            )
        y_flat, _ = ravel(y)
        # The widest of the state's and the function's dtypes, chosen explicitly
        # (strict dtype promotion has no implicit float32 x float64 rule).
        dtype = max(
            [y_flat.dtype, *(s.dtype for s in jtu.tree_leaves(f_struct))],
            key=lambda d: jnp.dtype(d).itemsize,
        )
        zeros = jnp.zeros(y_flat.size, dtype)
        return _BroydenState(
            u=jnp.zeros((self.memory, y_flat.size), dtype),
            v=jnp.zeros((self.memory, y_flat.size), dtype),
            num_updates=jnp.array(0),
            y_base=zeros,
            residual_base=zeros,
            direction=zeros,
            step_length=jnp.array(1.0, dtype),
            progress=Progress.start(y, aux_struct, dtype),
        )

    def step(
        self,
        fn: Callable,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _BroydenState,
        tags: frozenset[object],
    ) -> tuple[Y, _BroydenState, Aux]:
        del options, tags
        residual, aux = fn(y, args)
        with jax.numpy_dtype_promotion("standard"):
            error = scaled_residual_size(
                self.norm, self.termination, self.atol, self.rtol, residual, y
            )
            residual_norm = self.norm(residual)
        progress = state.progress.record(y, aux, error, residual_norm)
        finite = tree_all_finite(residual)

        dtype = state.y_base.dtype
        y_flat, unravel = ravel(y)
        y_dtype = y_flat.dtype
        y_flat = y_flat.astype(dtype)
        residual_flat = ravel(residual)[0].astype(dtype)
        first = state.progress.num_steps == 0

        # Broyden's secant update of H, relative to the last accepted point. When all
        # `memory` terms are in use, restart from H = -I first.
        full = state.num_updates == self.memory
        u = jnp.where(full, 0, state.u)
        v = jnp.where(full, 0, state.v)
        num_updates = jnp.where(full, 0, state.num_updates)
        dy = y_flat - state.y_base
        dg = residual_flat - state.residual_base
        h_dg = _inverse_jacobian_mv(u, v, dg)
        new_v = _inverse_jacobian_rmv(u, v, dy)
        denominator = new_v @ dg
        # Skip the update when Δy^T H Δg is too close to zero relative to its factors:
        # the rank-one term would be huge, or NaN (e.g. Δy = 0 or Δg = 0).
        threshold = jnp.sqrt(jnp.finfo(dtype).eps) * (
            jnp.linalg.norm(new_v) * jnp.linalg.norm(dg)
        )
        update = (
            jnp.invert(first)
            & finite
            & (jnp.abs(denominator) > threshold)
            & jnp.isfinite(denominator)
        )
        new_u = (dy - h_dg) / jnp.where(update, denominator, 1)
        # A one-hot select rather than `.at[num_updates]`: under `jax.vmap` (a
        # per-sample solve) a scatter with per-sample slots copies and loops.
        memory = jnp.arange(self.memory, dtype=num_updates.dtype)
        write = ((memory == num_updates) & update)[:, None]
        u = jnp.where(write, new_u[None], u)
        v = jnp.where(write, new_v[None], v)
        num_updates = num_updates + update.astype(num_updates.dtype)

        if self.line_search:
            merit = residual_flat @ residual_flat
            base_merit = state.residual_base @ state.residual_base
            t = state.step_length
            sufficient_decrease = merit <= (1 - 2 * _ARMIJO * t) * base_merit
            accept = first | sufficient_decrease | (t <= _MIN_STEP_LENGTH)
        else:
            accept = jnp.array(True)
        y_base, residual_base = tree_where(
            accept,
            (y_flat, residual_flat),
            (state.y_base, state.residual_base),
        )
        direction = jnp.where(
            accept, -_inverse_jacobian_mv(u, v, residual_flat), state.direction
        )
        step_length = jnp.where(accept, 1, state.step_length / 2).astype(dtype)
        new_y = unravel((y_base + step_length * direction).astype(y_dtype))
        # A non-finite evaluation stops the solve (see `terminate`); don't hand on a
        # NaN iterate meanwhile.
        new_y = tree_where(finite, new_y, progress.best_y)
        new_state = _BroydenState(
            u=u,
            v=v,
            num_updates=num_updates,
            y_base=y_base,
            residual_base=residual_base,
            direction=direction,
            step_length=step_length,
            progress=progress,
        )
        return new_y, new_state, aux

    def terminate(
        self,
        fn: Callable,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _BroydenState,
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
        state: _BroydenState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Aux, dict[str, Any]]:
        del fn, y, aux, args, options, tags, result
        progress = state.progress
        stats = {"residual_norm": progress.best_residual_norm}
        return progress.best_y, progress.best_aux, stats


Broyden.__init__.__doc__ = """**Arguments:**

- `rtol`: Relative tolerance for terminating the solve (see "Termination" above).
- `atol`: Absolute tolerance for terminating the solve.
- `norm`: The norm used in the termination criterion, any function
    `PyTree -> Scalar`, e.g. `optimistix.max_norm` (the default),
    `optimistix.rms_norm` or `optimistix.two_norm`.
- `memory`: How many rank-one terms the inverse-Jacobian approximation keeps. The
    state holds two `memory x size(y)` buffers, whatever `max_steps` is.
- `line_search`: Whether to backtrack along the Broyden direction until `||g||_2`
    decreases (see "Line search" above).
- `termination`: `"elementwise"` or `"normwise"`; see "Termination" above.
- `divergence_factor`: Stop with `optimistix.RESULTS.nonlinear_divergence` when the
    residual norm exceeds this multiple of the best one seen. `float("inf")` disables
    this check (non-finite residuals still stop the solve).
"""
