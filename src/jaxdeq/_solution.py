"""The solution of a DEQ solve and the per-sample outcome codes."""

import enum
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree


class RESULTS(enum.IntEnum):
    """Per-sample outcome of a fixed-point solve, stored as `int32` arrays.

    Compare with the members directly: `solution.result == jaxdeq.RESULTS.successful`.
    `RESULTS.message(code)` gives a readable message.

    - `successful`: the solver's tolerance was met.
    - `max_steps_reached`: the step budget ran out; the lowest-residual iterate seen
        is returned (diffrax solvers: the lower-residual of the final and initial
        states).
    - `diverged`: the solver stopped on a failure of its own (divergence, a failed
        linear solve, an ODE step-size collapse); the lowest-residual iterate seen
        is returned (diffrax: as above).
    - `nonfinite`: either the sample's input, the parameters or the initial state
        hold NaN or infinity, and the sample's output is NaN (garbage in stays
        visible; its solve stops at the first evaluation, `steps == 1`); or the
        iteration itself produced non-finite values from finite inputs, and the
        lowest-residual finite iterate seen (at worst the initial guess) is
        returned.
    """

    successful = 0
    max_steps_reached = 1
    diverged = 2
    nonfinite = 3

    @classmethod
    def message(cls, code: int) -> str:
        """A readable message for an outcome code."""
        return _MESSAGES[cls(int(code))]


_MESSAGES = {
    RESULTS.successful: "converged within tolerance",
    RESULTS.max_steps_reached: (
        "the step budget ran out before the tolerance was met; the lowest-residual "
        "iterate is returned"
    ),
    RESULTS.diverged: (
        "the solver stopped on a failure (divergence or a failed inner solve); the "
        "lowest-residual iterate is returned"
    ),
    RESULTS.nonfinite: (
        "the iteration produced non-finite values; the lowest-residual finite iterate "
        "is returned"
    ),
}


def first_outcome(cases, default: RESULTS) -> Int[Array, "..."]:
    """The code of the first `(predicate, code)` pair whose predicate holds
    (elementwise), else `default`, as `int32`."""
    code = jnp.asarray(default, jnp.int32)
    for predicate, value in reversed(cases):
        code = jnp.where(predicate, jnp.int32(value), code)
    return code


class DeepEquilibriumSolution(eqx.Module):
    """What a DEQ solve found: `y, st, solution = model.apply(ps, st, x,
    return_solution=True)`.

    **Fields:**

    - `z_star`: the fixed point (or the state reached when the budget ran out). Carries
        gradients, as set by the model's `adjoint`.
    - `u0`: the initial condition of the solve. Carries gradients (to the init layer of
        a Skip DEQ, or to the cell for skip-reg), so skip losses such as
        `mean(|z_star - u0|)` train it.
    - `residual`: `f(z_star, x) - z_star`. Carries gradients.
    - `jacobian_loss`: the Hutchinson estimate of `||J_f(z_star)||_F^2 / numel` when
        `jacobian_regularization` is set, else `0`. Carries gradients.
    - `nfe`: per-sample number of cell evaluations, shape `(batch,)`: one per step
        of a fixed-point solver (`jaxdeq.Anderson`, `jaxdeq.Broyden`,
        `optx.FixedPointIteration`); for `optx.Newton` one per step plus its dense
        Jacobian, counted as `n` evaluations per step (`n` the size of one sample's
        state, or of the batch's in a joint solve: one forward-mode column each);
        for `optx.Chord` one per step plus one Jacobian, counted as `n`; for a
        diffrax solver the vector-field evaluations of its stages (explicit
        Runge-Kutta methods and Euler; implicit solvers' inner iterations are not
        counted), plus, for a steady state, the steady-state test (at the start and
        after each step) and two for choosing the lower-residual of the final and
        initial states, for a neural ODE one at the initial state (telling a
        non-finite vector field from a spent budget). With `fixed_depth`,
        `fixed_depth` (and `result` is `successful`: there is no tolerance).
    - `steps`: per-sample number of solver steps (attempted ODE steps, rejected ones
        included, for diffrax), shape `(batch,)`.
    - `result`: per-sample [`jaxdeq.RESULTS`][] code, shape `(batch,)`.
    - `residual_norm`: per-sample 2-norm of `residual`, shape `(batch,)`.
    - `relative_residual_norm`: per-sample `||f(z*) - z*|| / ||f(z*)||`.
    - `trace`: per-sample, per-iteration residual 2-norms of the evaluated iterates,
        shape `(batch, max_steps)` (`inf` after a sample stopped), when the model was
        built with `trace=True`; otherwise `None`. With a `fallback` solver,
        `(batch, 2 * max_steps)`: the primary solve's then the fallback's (`inf`
        where it did not run).
    - `original`: the backend's own solution object (`optimistix.Solution` without
        solver state, or `diffrax.Solution`), batched over samples in per-sample mode.
    - `fallback`: per-sample `bool`, shape `(batch,)`: whether the sample's solve was
        continued by the model's `fallback` solver (its primary solve did not
        succeed); `nfe`, `steps` and `result` then count both solves. `None` for
        a model without a fallback.
    - `anytime`: with `apply(..., anytime=(b_1, ..., b_k))`, a
        [`jaxdeq.AnytimeSolution`][]: what the solve returns at each budget, from
        the same solve. Otherwise `None`.
    - `states`: with `sample_states=k`, `k` iterates of the solve at evenly spaced
        steps (leaves `(k, batch, ...)`, the last ones equal to the final iterate
        when the solve stopped early), each carrying a one-step (Jacobian-free)
        gradient: the input of [`jaxdeq.fixed_point_correction_loss`][]. Otherwise
        `None`.
    """

    z_star: PyTree[Array]
    u0: PyTree[Array]
    residual: PyTree[Array]
    jacobian_loss: Float[Array, ""]
    nfe: Int[Array, " batch"]
    steps: Int[Array, " batch"]
    result: Int[Array, " batch"]
    residual_norm: Float[Array, " batch"]
    relative_residual_norm: Float[Array, " batch"]
    trace: Float[Array, "batch steps"] | None
    original: Any
    states: PyTree[Array] | None = None
    fallback: Bool[Array, " batch"] | None = None
    anytime: "AnytimeSolution | None" = None


class AnytimeSolution(eqx.Module):
    """The states one solve passes through at several step budgets:
    `solution.anytime` after `model.apply(..., anytime=(b_1, ..., b_k),
    return_solution=True)`, for accuracy-against-compute curves from one call.

    Entry `j` equals what a separate call with `max_steps=b_j` returns (the
    solver's iterates do not depend on its budget): the state the solver returns
    when stopped after `b_j` steps (its lowest-residual iterate if not converged),
    or the converged state if it stopped earlier. Values only: no derivative flows
    through `z_star` (use `sample_states` for losses on intermediate iterates).

    **Fields:**

    - `budgets`: the budgets, sorted, unique (a static tuple of ints).
    - `z_star`: the states, leaves `(k, batch, ...)`.
    - `nfe`, `steps`, `result`: per budget and sample, shape `(k, batch)`: as in
        [`jaxdeq.DeepEquilibriumSolution`][] for a solve with that budget.
    """

    budgets: tuple[int, ...] = eqx.field(static=True)
    z_star: PyTree[Array]
    nfe: Int[Array, "k batch"]
    steps: Int[Array, "k batch"]
    result: Int[Array, "k batch"]
