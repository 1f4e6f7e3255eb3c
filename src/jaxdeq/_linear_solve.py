"""The linear solve of the implicit gradient, `(I - J) u = b`, matrix-free.

`solve_linear` runs one solve for `jax.lax.custom_linear_solve`: JAX calls it for the
tangent solve of forward mode (`A = I - J`, by JVPs) and, transposed, for the
cotangent solve of reverse mode (`A^T = I - J^T`, by VJPs). Each solve stops relative
to its own right-hand side, checks its answer with one more product (the true
residual `||b - A u||`), and reports the outcome: to a callback, and as a run-time
error when asked to throw. It is never dropped.

`gmres` is restarted GMRES with a convergence check after every product (lineax's
GMRES only checks between restart cycles and needs two cycles to stop, i.e. at least
`2 * restart + 2` products), and `fixed_point_iteration` is the Richardson iteration
`u <- b + J u` (torchdeq's default backward), which converges only when the spectral
radius of `J` is below 1.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float, Int, PyTree

from ._misc import accumulation_dtype
from ._solution import RESULTS

Vector = Float[Array, " n"]
MatVec = Callable[[Vector], Vector]


class BackwardStatistics(eqx.Module):
    """The outcome of one linear solve of an implicit gradient, as passed to
    `jaxdeq.ImplicitAdjoint(callback=...)`.

    **Fields** (scalars: per-sample solves report once per sample):

    - `steps`: products with `J` (JVPs in forward mode, VJPs in reverse mode),
        including the final check of the residual.
    - `residual_norm`: `||b - (I - J) u||_2` of the returned `u`.
    - `relative_residual_norm`: `residual_norm / ||b||_2` (0 when `b = 0`).
    - `result`: a [`jaxdeq.RESULTS`][] code: `successful`, `max_steps_reached`,
        `diverged` (the solver stopped on a failure of its own, e.g. a lineax
        breakdown) or `nonfinite`.
    """

    steps: Int[Array, "*batch"]
    residual_norm: Float[Array, "*batch"]
    relative_residual_norm: Float[Array, "*batch"]
    result: Int[Array, "*batch"]


def _norm(v: Vector) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(v)))


def gmres(
    matvec: MatVec, b: Vector, tol: Array, *, restart: int, max_steps: int
) -> tuple[Vector, Int[Array, ""]]:
    """Restarted GMRES(`restart`) for `A x = b` from `x = 0` (Saad & Schultz, 1986).

    Arnoldi with classical Gram-Schmidt applied twice (CGS2), Givens rotations
    accumulated in a small orthogonal matrix, and the residual estimate `|g_{j+1}|`
    checked after every product: the loop stops once it is `<= tol` or after
    `max_steps` products. A restart takes its residual from the Arnoldi relation, so
    every step costs exactly one product. Returns `(x, products)`.
    """
    (n,) = b.shape
    m = min(restart, max(n, 1))
    rows = jnp.arange(m + 1, dtype=jnp.int32)

    def new_cycle(r, beta):
        basis = jnp.zeros((m + 1, n), b.dtype)
        basis = basis.at[0].set(
            jnp.where(beta > 0, r / jnp.where(beta > 0, beta, 1), 0)
        )
        return (
            basis,
            jnp.eye(m + 1, dtype=b.dtype),
            jnp.zeros((m + 1,), b.dtype).at[0].set(beta),
        )

    beta0 = _norm(b)
    basis, rotations, g = new_cycle(b, beta0)
    # x: start of this cycle; x_now: best estimate after the last step.
    init = (
        jnp.zeros_like(b),  # x
        jnp.zeros_like(b),  # x_now
        basis,
        jnp.zeros((m + 1, m), b.dtype),  # triangular factor R
        rotations,  # Q, with Q H = R
        g,  # Q (beta e_1)
        jnp.array(0, jnp.int32),  # j: position in the cycle
        jnp.array(0, jnp.int32),  # products
        beta0,  # residual estimate
    )

    def cond(carry):
        *_, steps, estimate = carry
        return (estimate > tol) & (steps < max_steps)

    def body(carry):
        x, _, basis, triangular, rotations, g, j, steps, _ = carry
        w = matvec(basis[j])
        done_rows = (rows <= j).astype(b.dtype)
        h = (basis @ w) * done_rows
        w = w - h @ basis
        h2 = (basis @ w) * done_rows
        w = w - h2 @ basis
        h = h + h2
        h_next = _norm(w)
        basis = basis.at[j + 1].set(
            jnp.where(h_next > 0, w / jnp.where(h_next > 0, h_next, 1), 0)
        )
        column = rotations @ h.at[j + 1].set(h_next)
        a, c = column[j], column[j + 1]
        radius = jnp.hypot(a, c)
        cos = jnp.where(radius > 0, a / jnp.where(radius > 0, radius, 1), 1)
        sin = jnp.where(radius > 0, c / jnp.where(radius > 0, radius, 1), 0)
        q_j, q_next = rotations[j], rotations[j + 1]
        rotations = (
            rotations.at[j]
            .set(cos * q_j + sin * q_next)
            .at[j + 1]
            .set(-sin * q_j + cos * q_next)
        )
        column = column.at[j].set(radius).at[j + 1].set(0)
        triangular = triangular.at[:, j].set(column)
        g_j, g_next = g[j], g[j + 1]
        g = (
            g.at[j]
            .set(cos * g_j + sin * g_next)
            .at[j + 1]
            .set(-sin * g_j + cos * g_next)
        )
        estimate = jnp.abs(g[j + 1])
        # x_now = x + V_j y with R_j y = g_j (unused columns padded with the identity)
        active = jnp.arange(m, dtype=jnp.int32) <= j
        square = jnp.where(
            active[:, None] & active[None, :], triangular[:m], jnp.eye(m, dtype=b.dtype)
        )
        y = jax.scipy.linalg.solve_triangular(
            square, jnp.where(active, g[:m], 0), lower=False
        )
        x_now = x + y @ basis[:m]
        restart_now = (j + 1 == m) | (estimate <= tol)
        # Residual b - A x_now = V_{j+1} Q^T (g_{j+1} e_{j+1}) (Arnoldi relation).
        residual = g[j + 1] * (rotations[j + 1] @ basis)
        fresh_basis, fresh_rotations, fresh_g = new_cycle(residual, estimate)
        x, basis, rotations, g, triangular = jax.tree_util.tree_map(
            lambda fresh, old: jnp.where(restart_now, fresh, old),
            (x_now, fresh_basis, fresh_rotations, fresh_g, jnp.zeros_like(triangular)),
            (x, basis, rotations, g, triangular),
        )
        j = jnp.where(restart_now, 0, j + 1)
        return x, x_now, basis, triangular, rotations, g, j, steps + 1, estimate

    out = jax.lax.while_loop(cond, body, init)
    return out[1], out[7]


def fixed_point_iteration(
    matvec: MatVec, b: Vector, tol: Array, *, max_steps: int
) -> tuple[Vector, Int[Array, ""]]:
    """The Richardson iteration `x <- x + (b - A x)` (for `A = I - J`: `x <- b + J x`)
    from `x = 0`; stops once `||b - A x|| <= tol`, after `max_steps` products, or when
    the residual grows beyond `1e4` times its smallest value (divergence).
    Returns `(x, products)`."""

    def cond(carry):
        _, residual, smallest, steps = carry
        return (residual > tol) & (steps < max_steps) & (residual <= 1e4 * smallest)

    def body(carry):
        x, _, smallest, steps = carry
        step = b - matvec(x)
        residual = _norm(step)
        return x + step, residual, jnp.minimum(smallest, residual), steps + 1

    beta = _norm(b)
    init = (jnp.zeros_like(b), beta, beta, jnp.array(0, jnp.int32))
    x, *_, steps = jax.lax.while_loop(cond, body, init)
    return x, steps


class LinearSolveSettings(eqx.Module):
    """How `solve_linear` solves: validated by `jaxdeq.ImplicitAdjoint`."""

    method: str | lx.AbstractLinearSolver
    rtol: float | None
    atol: float
    max_steps: int
    restart: int
    throw: bool
    callback: Callable[[BackwardStatistics], None] | None

    def tolerance(self, dtype, b_norm: Array) -> Array:
        """The stopping tolerance on `||b - A u||_2`: `max(atol, rtol ||b||_2)`, with
        `rtol = eps ** (2/3)` of the dtype by default (float64 3.7e-11, float32
        2.4e-5)."""
        rtol = self.rtol
        if rtol is None:
            rtol = float(jnp.finfo(dtype).eps) ** (2 / 3)
        return jnp.maximum(jnp.asarray(self.atol, dtype), rtol * b_norm)


_FAILURE = (
    "jaxdeq.ImplicitAdjoint: the linear solve (I - J) u = b of the implicit gradient "
    "{}; the gradient would be wrong. Raise ImplicitAdjoint(max_steps=...), use "
    "linear_solver='gmres', or check that I - J is invertible at the fixed point "
    "(jaxdeq.spectral_radius); pass throw=False to get the gradient anyway, with "
    "callback=... to see each solve's statistics."
)
_FAILURES = {
    RESULTS.max_steps_reached: "did not reach its tolerance within max_steps",
    RESULTS.diverged: "failed (the linear solver reported a failure or diverged)",
    RESULTS.nonfinite: "produced non-finite values (NaN or infinity)",
}


def solve_linear(settings: LinearSolveSettings, matvec: Callable, b: PyTree) -> PyTree:
    """Solve `matvec(u) = b` for `u` as `settings` say, check and report the outcome."""
    b_flat, unravel = jfu.ravel_pytree(b)
    dtype = accumulation_dtype(b_flat.dtype)  # solve half precision in float32

    def flat_matvec(v):
        out, _ = jfu.ravel_pytree(matvec(unravel(v.astype(b_flat.dtype))))
        return out.astype(dtype)

    b32 = b_flat.astype(dtype)
    b_norm = _norm(b32)
    tol = settings.tolerance(dtype, b_norm)
    solver_failed = jnp.array(False)
    if settings.method == "gmres":
        u, steps = gmres(
            flat_matvec,
            b32,
            tol,
            restart=settings.restart,
            max_steps=settings.max_steps,
        )
    elif settings.method == "fixed_point":
        u, steps = fixed_point_iteration(
            flat_matvec, b32, tol, max_steps=settings.max_steps
        )
    else:
        structure = jax.ShapeDtypeStruct(b32.shape, dtype)
        operator = lx.FunctionLinearOperator(flat_matvec, structure)
        solution = lx.linear_solve(operator, b32, settings.method, throw=False)
        u = solution.value
        steps = jnp.asarray(solution.stats.get("num_steps", 0), jnp.int32)
        solver_failed = solution.result != lx.RESULTS.successful
    residual_norm = _norm(b32 - flat_matvec(u))
    finite = jnp.isfinite(residual_norm) & jnp.all(jnp.isfinite(u))
    # Own solvers stop on an estimate (GMRES) or on the residual itself; allow for
    # rounding between the estimate and the true residual.
    converged = residual_norm <= 2 * tol
    result = jnp.where(
        ~finite,
        RESULTS.nonfinite,
        jnp.where(
            solver_failed,
            RESULTS.diverged,
            jnp.where(converged, RESULTS.successful, RESULTS.max_steps_reached),
        ),
    ).astype(jnp.int32)
    if settings.callback is not None:
        stats = BackwardStatistics(
            steps=steps + 1,
            residual_norm=residual_norm,
            relative_residual_norm=jnp.where(
                b_norm > 0, residual_norm / jnp.where(b_norm > 0, b_norm, 1), 0
            ),
            result=result,
        )
        jax.debug.callback(settings.callback, stats)
    if settings.throw:
        codes = sorted(_FAILURES)
        index = jnp.argmax(jnp.array(codes, jnp.int32) == result)
        u = eqx.branched_error_if(
            u,
            result != RESULTS.successful,
            index,
            [_FAILURE.format(_FAILURES[code]) for code in codes],
        )
    return unravel(u.astype(b_flat.dtype))
