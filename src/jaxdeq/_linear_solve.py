"""The linear solve of the implicit gradient, `(I - J) u = b`, matrix-free.

`solve_linear` runs one solve for `jax.lax.custom_linear_solve`: JAX calls it for the
tangent solve of forward mode (`A = I - J`, by JVPs) and, transposed, for the
cotangent solve of reverse mode (`A^T = I - J^T`, by VJPs). Each solve stops relative
to its own right-hand side, judges its answer by the true residual `||b - A u||` (never
an estimate), and reports the outcome: to a callback, and as a run-time
error when asked to throw. It is never dropped.

`fixed_point_iteration` is the Richardson iteration `u <- b + J u` (torchdeq's
default backward): the cheapest step, but it converges only when the spectral radius
of `J` is below 1, and slowly near 1. `gmres` is restarted GMRES with a convergence
check after every product (lineax's GMRES only checks between restart cycles and
needs two cycles to stop, i.e. at least `2 * restart + 2` products): it converges
wherever `I - J` is invertible. The default, `"auto"`, runs the first while it
contracts fast and continues with the second from where it got to.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._misc import accumulation_dtype, tree_sub
from ._solution import RESULTS, first_outcome

if TYPE_CHECKING:
    from ._adjoint import ImplicitAdjoint

Vector = Float[Array, " n"]
MatVec = Callable[[Vector], Vector]


class BackwardStatistics(eqx.Module):
    """The outcome of one linear solve of an implicit gradient, as passed to
    `jaxdeq.ImplicitAdjoint(callback=...)`.

    **Fields** (scalars: per-sample solves report once per sample):

    - `steps`: products with `J` (JVPs in forward mode, VJPs in reverse mode):
        one per fixed-point or GMRES step, plus one per GMRES restart cycle (its
        true residual), plus one to check a lineax solver's answer.
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
    matvec: MatVec,
    b: Vector,
    x: Vector,
    residual: Vector,
    tol: Array,
    *,
    restart: int,
    max_steps: int,
    steps: Int[Array, ""],
) -> tuple[Vector, Vector, Int[Array, ""]]:
    """Restarted GMRES(`restart`) for `A x = b` (Saad & Schultz, 1986), from `x` with
    residual `b - A x`, stopping once the residual is `<= tol` or `steps` reaches
    `max_steps` (products, counting one per cycle for its true residual).

    Arnoldi with classical Gram-Schmidt applied twice (CGS2) and Givens rotations
    accumulated in a small orthogonal matrix; the residual estimate `|g_{j+1}|` is
    checked after every product; each cycle ends with the true residual. Returns
    `(x, b - A x, steps)`; no cycle runs when `residual` already meets `tol`.
    """
    (n,) = b.shape
    m = min(restart, max(n, 1))
    rows = jnp.arange(m + 1, dtype=jnp.int32)
    eye = jnp.eye(m + 1, dtype=b.dtype)

    def arnoldi(carry):
        # Rows are written through one-hot masks, not `.at[j].set`: under a
        # per-sample `vmap` `j` is batched, and a batched dynamic index becomes a
        # scatter, slow on CPU. The current Arnoldi vector is carried, not read back.
        basis, vector, triangular, rotations, g, j, steps = carry
        at_j = (rows == j).astype(b.dtype)
        at_next = (rows == j + 1).astype(b.dtype)
        w = matvec(vector)
        done_rows = (rows <= j).astype(b.dtype)
        h = (basis @ w) * done_rows
        w = w - h @ basis
        if REORTHOGONALIZE:
            h2 = (basis @ w) * done_rows
            w = w - h2 @ basis
            h = h + h2
        h_next = _norm(w)
        v = jnp.where(h_next > 0, w / jnp.where(h_next > 0, h_next, 1), 0)
        basis = basis + at_next[:, None] * (v[None, :] - basis)
        column = rotations @ (h + at_next * h_next)
        a, c = at_j @ column, at_next @ column
        radius = jnp.hypot(a, c)
        cos = jnp.where(radius > 0, a / jnp.where(radius > 0, radius, 1), 1)
        sin = jnp.where(radius > 0, c / jnp.where(radius > 0, radius, 1), 0)
        # The Givens rotation G_j acting on rows j and j + 1.
        givens = (
            eye
            + (cos - 1) * (jnp.outer(at_j, at_j) + jnp.outer(at_next, at_next))
            + sin * (jnp.outer(at_j, at_next) - jnp.outer(at_next, at_j))
        )
        rotations = givens @ rotations
        column = givens @ column
        triangular = triangular + (column[:, None] - triangular) * at_j[None, :m]
        g = givens @ g
        return basis, v, triangular, rotations, g, j + 1, steps + 1

    def cycle(carry):
        x, residual, steps = carry
        beta = _norm(residual)
        basis = jnp.zeros((m + 1, n), b.dtype)
        basis = basis.at[0].set(residual / jnp.where(beta > 0, beta, 1))
        g = jnp.zeros((m + 1,), b.dtype).at[0].set(beta)
        j0 = jnp.array(0, jnp.int32)
        triangular = jnp.zeros((m + 1, m), b.dtype)
        inner = (basis, basis[0], triangular, eye, g, j0, steps)

        def keep_going(c):
            *_, g, j, steps = c
            estimate = jnp.abs((rows == j).astype(b.dtype) @ g)
            return (j < m) & (estimate > tol) & (steps < max_steps)

        basis, _, triangular, rotations, g, k, steps = jax.lax.while_loop(
            keep_going, arnoldi, inner
        )
        # x += V_k y with R_k y = g_k (unused columns padded with the identity).
        active = jnp.arange(m, dtype=jnp.int32) < k
        square = jnp.where(
            active[:, None] & active[None, :], triangular[:m], jnp.eye(m, dtype=b.dtype)
        )
        y = jax.scipy.linalg.solve_triangular(
            square, jnp.where(active, g[:m], 0), lower=False
        )
        x = x + y @ basis[:m]
        # The true residual (one product per cycle): restarts and the caller's
        # check see b - A x itself, not the Arnoldi estimate.
        return x, b - matvec(x), steps + 1

    def not_done(carry):
        _, residual, steps = carry
        return (_norm(residual) > tol) & (steps < max_steps)

    return jax.lax.while_loop(not_done, cycle, (x, residual, steps))


def fixed_point_iteration(
    matvec: MatVec,
    b: Vector,
    tol: Array,
    *,
    max_steps: int,
    switch_ratio: float | None,
) -> tuple[Vector, Vector, Int[Array, ""], Bool[Array, ""]]:
    """The Richardson iteration `x <- x + (b - A x)` (for `A = I - J`: `x <- b + J x`)
    from `x = 0`. Stops once `||b - A x|| <= tol`, after `max_steps` products, when
    the residual grows beyond `1e4` times its smallest value (divergence), or, with
    `switch_ratio`, as soon as one step shrinks the residual by less than that factor
    (too slow a contraction: time to switch to GMRES). Returns
    `(x, b - A x, products, diverged)`."""

    def cond(carry):
        _, _, norm, previous, smallest, steps = carry
        slow = False if switch_ratio is None else norm > switch_ratio * previous
        return (
            (norm > tol)
            & (steps < max_steps)
            & (norm <= 1e4 * smallest)
            & ~(slow & (steps > 0))
        )

    def body(carry):
        x, residual, norm, _, smallest, steps = carry
        x = x + residual
        residual = b - matvec(x)
        new_norm = _norm(residual)
        return x, residual, new_norm, norm, jnp.minimum(smallest, new_norm), steps + 1

    beta = _norm(b)
    init = (jnp.zeros_like(b), b, beta, beta, beta, jnp.array(0, jnp.int32))
    x, residual, norm, _, smallest, steps = jax.lax.while_loop(cond, body, init)
    return x, residual, steps, ~(norm <= 1e4 * smallest)


# Classical Gram-Schmidt twice (CGS2): orthogonal to working precision. (Once is
# 1.3x cheaper per GMRES step on W1, but loses orthogonality on ill-conditioned J.)
REORTHOGONALIZE = True

# "auto": fixed-point iteration while each step shrinks the residual at least this
# much (a 1e-5 reduction in about 32 steps), then GMRES from where it got to. On
# W1 fixed point is cheapest (ratio ~0.4; a GMRES step costs ~2x a 256-wide
# matvec on CPU), on W2 GMRES needs 3x fewer products (ratio ~0.8):
# `benchmarks/results/backward.md`.
SWITCH_RATIO = 0.7


def _tolerance(adjoint: "ImplicitAdjoint", dtype, b_norm: Array, scale: Array) -> Array:
    """The stopping tolerance on `||b - A u||_2` for `b` divided by `scale`:
    `max(atol / scale, rtol ||b||_2)`, with `rtol = eps ** (2/3)` of the dtype by
    default (float64 3.7e-11, float32 2.4e-5)."""
    rtol = adjoint.rtol
    if rtol is None:
        rtol = float(jnp.finfo(dtype).eps) ** (2 / 3)
    return jnp.maximum(jnp.asarray(adjoint.atol, dtype) / scale, rtol * b_norm)


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


def solve_linear(settings: "ImplicitAdjoint", matvec: Callable, b: PyTree) -> PyTree:
    """Solve `matvec(u) = b` for `u` with the settings of an `ImplicitAdjoint`
    (`linear_solver`, tolerances, `max_steps`, `restart`), check and report the
    outcome (`throw`, `callback`)."""
    b_flat, unravel = jfu.ravel_pytree(b)
    dtype = accumulation_dtype(b_flat.dtype)  # solve half precision in float32

    def flat_matvec(v):
        out, _ = jfu.ravel_pytree(matvec(unravel(v.astype(b_flat.dtype))))
        return out.astype(dtype)

    # The solve runs on b / max|b| (the problem is linear): a right-hand side of
    # 1e-20 in float32 would otherwise underflow in its own norm, and stop at once.
    b_raw = b_flat.astype(dtype)
    scale = jnp.max(jnp.abs(b_raw), initial=0)
    scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1)
    b32 = b_raw / scale
    b_norm = _norm(b32)
    tol = _tolerance(settings, dtype, b_norm, scale)
    solver_failed = jnp.array(False)
    if settings.linear_solver in ("auto", "gmres", "fixed_point"):
        u, residual, steps = jnp.zeros_like(b32), b32, jnp.array(0, jnp.int32)
        if settings.linear_solver != "gmres":
            u, residual, steps, diverged = fixed_point_iteration(
                flat_matvec,
                b32,
                tol,
                max_steps=settings.max_steps,
                switch_ratio=SWITCH_RATIO if settings.linear_solver == "auto" else None,
            )
            if settings.linear_solver == "fixed_point":
                solver_failed = diverged
        if settings.linear_solver != "fixed_point":
            u, residual, steps = gmres(
                flat_matvec,
                b32,
                u,
                residual,
                tol,
                restart=settings.restart,
                max_steps=settings.max_steps,
                steps=steps,
            )
    else:
        structure = jax.ShapeDtypeStruct(b32.shape, dtype)
        operator = lx.FunctionLinearOperator(flat_matvec, structure)
        solution = lx.linear_solve(operator, b32, settings.linear_solver, throw=False)
        u = solution.value
        steps = jnp.asarray(solution.stats.get("num_steps", 0), jnp.int32)
        # Judged by its own result code (it stops on its own tolerances).
        solver_failed = solution.result != lx.RESULTS.successful
        residual = b32 - flat_matvec(u)  # for the statistics: one more product
        steps = steps + 1
        tol = jnp.asarray(jnp.inf, dtype)
    residual_norm = _norm(residual)  # in units of the scaled problem
    finite = jnp.isfinite(residual_norm) & jnp.all(jnp.isfinite(u))
    converged = residual_norm <= tol
    result = first_outcome(
        [
            (~finite, RESULTS.nonfinite),
            (solver_failed, RESULTS.diverged),
            (converged, RESULTS.successful),
        ],
        RESULTS.max_steps_reached,
    )
    if settings.callback is not None:
        stats = BackwardStatistics(
            steps=steps,
            residual_norm=residual_norm * scale,
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
    return unravel((u * scale).astype(b_flat.dtype))


def tree_norm(tree: PyTree[Array]) -> Array:
    """The 2-norm of a pytree, accumulated in at least float32."""
    sums = [
        jnp.sum(jnp.square(leaf.astype(accumulation_dtype(leaf.dtype))))
        for leaf in jtu.tree_leaves(tree)
    ]
    dtype = max((s.dtype for s in sums), key=lambda d: d.itemsize)
    return jnp.sqrt(sum(s.astype(dtype) for s in sums))


def richardson(
    matvec: Callable, b: PyTree, u: PyTree, *, steps: int, damping: float
) -> PyTree:
    """`steps` damped Richardson steps `u <- u + damping (b - A u)` from `u`
    (`steps` products with `A`; no stopping test)."""

    def step(_, u):
        residual = tree_sub(b, matvec(u))
        return jtu.tree_map(lambda x, r: x + damping * r, u, residual)

    if steps == 0:
        return u
    return jax.lax.fori_loop(0, steps, step, u)


def report_statistics(
    callback: Callable[[BackwardStatistics], object] | None,
    steps: int | Array,
    residual: PyTree[Array],
    reference: PyTree[Array],
) -> None:
    """Pass the `BackwardStatistics` of an approximate backward pass (no tolerance:
    `successful` unless something is non-finite) to `callback`, if any."""
    if callback is None:
        return
    residual_norm = tree_norm(residual)
    reference_norm = tree_norm(reference).astype(residual_norm.dtype)
    positive = reference_norm > 0
    stats = BackwardStatistics(
        steps=jnp.asarray(steps, jnp.int32),
        residual_norm=residual_norm,
        relative_residual_norm=jnp.where(
            positive, residual_norm / jnp.where(positive, reference_norm, 1), 0
        ),
        result=jnp.where(
            jnp.isfinite(residual_norm),
            jnp.int32(RESULTS.successful),
            jnp.int32(RESULTS.nonfinite),
        ),
    )
    jax.debug.callback(callback, stats)
