"""Gradient modes: how a fixed-point solve is differentiated (the `adjoint=` argument).

Every mode returns the same forward value, the state `z*` the solver found; they
differ only in the gradient attached to it, and so in backward cost and memory:

| mode | gradient | backward cost | memory in `max_steps` |
|---|---|---|---|
| `ImplicitAdjoint` | exact at a fixed point | one linear solve (VJPs) | flat |
| `PhantomGradient(k)` | tends to exact as `k` grows | `k` VJPs | flat |
| `OneStepGradient` | `(I - J)^{-1}` replaced by `I` | 1 VJP | flat |
| `UnrolledAdjoint` | of the solver's iterates | one VJP per step | grows |

`benchmarks/bench_gradients.py` measures all four on the benchmark workloads.
"""

import abc
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from ._conv_canon import canonicalize_convolutions
from ._misc import sample_sq_norm, tree_add, tree_sub, zero_cotangent
from ._solve import OptimistixBackend
from ._solver import Anderson

Cell = Callable[[PyTree[Array], PyTree], PyTree[Array]]
ForwardFn = Callable[..., Any]  # (z0, args, budget, differentiable) -> Forward


class AbstractAdjoint(eqx.Module):
    """How the fixed point `z*` of `f(z, args)` is differentiated."""

    @abc.abstractmethod
    def apply(
        self, forward: ForwardFn, f: Cell, z0: PyTree, args: PyTree, budget: Any
    ) -> tuple[PyTree, Any]:
        """Run `forward(z0, args, budget, differentiable)` and return `(z*, forward's
        outcome)` with this mode's gradient attached to `z*`."""


def _no_grad_forward(forward, z0, args, budget):
    z0, args = jax.lax.stop_gradient((z0, args))
    return forward(z0, args, budget, False)


def _value_preserving(z_star, z_graded):
    """`z_star` in value, the gradient of `z_graded`."""
    return jax.tree_util.tree_map(
        lambda a, b: a + (b - jax.lax.stop_gradient(b)), z_star, z_graded
    )


class ImplicitAdjoint(AbstractAdjoint):
    """The implicit-function-theorem gradient (the default).

    The backward pass solves `u = g + J_f(z*)^T u` matrix-free, with vector-Jacobian
    products of the cell only (never a dense Jacobian), then pulls `u` back through
    `f` to its parameters and inputs.

    **Arguments:**

    - `linear_solver`: `"fixed_point"` (iterate the VJP, as torchdeq's default),
        `"anderson"` (Anderson acceleration of that iteration), or any lineax solver
        for non-symmetric operators, e.g. `lineax.GMRES(rtol=1e-6, atol=1e-6)` or
        `lineax.BiCGStab(...)`, applied to `(I - J^T) u = g`.
    - `rtol`, `atol`: stopping rule of the iterative backward solves, on the 2-norm of
        the change of `u` (fixed point) or the residual (Anderson):
        `||du|| <= atol + rtol * ||u||`. Ignored by lineax solvers (set theirs).
    - `max_steps`: step cap of the backward solve.

    In per-sample mode (the default) the backward solve is per sample too.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, lineax as lx, optimistix as optx, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Chain(nn.Parallel(jnp.add, nn.Dense(3, 3), nn.Dense(3, 3)),
    ...                 nn.WrappedFunction(jnp.tanh))
    >>> model = jaxdeq.DeepEquilibriumNetwork(
    ...     cell, optx.FixedPointIteration(rtol=1e-5, atol=1e-5),
    ...     adjoint=jaxdeq.ImplicitAdjoint(lx.GMRES(rtol=1e-6, atol=1e-6)))
    >>> x = jnp.ones((2, 3))
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> grads = jax.grad(lambda ps: jnp.sum(model.apply(ps, st, x)[0]))(ps)

    ```
    """

    linear_solver: Literal["fixed_point", "anderson"] | lx.AbstractLinearSolver = (
        "fixed_point"
    )
    rtol: float = 0.0
    atol: float = 1e-6
    max_steps: int = 30

    def __check_init__(self):
        if isinstance(self.linear_solver, str):
            if self.linear_solver not in ("fixed_point", "anderson"):
                raise ValueError(
                    "linear_solver: expected 'fixed_point', 'anderson' or a lineax "
                    f"solver, got {self.linear_solver!r}"
                )
        elif not isinstance(self.linear_solver, lx.AbstractLinearSolver):
            raise TypeError(
                "linear_solver: expected 'fixed_point', 'anderson' or a lineax solver, "
                f"got {type(self.linear_solver).__name__}"
            )
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps: expected an int >= 1, got {self.max_steps!r}")

    def solve_adjoint(self, vjp_z: Callable, g: PyTree) -> PyTree:
        """Solve `u = g + vjp_z(u)` for `u`."""
        if isinstance(self.linear_solver, lx.AbstractLinearSolver):
            structure = jax.eval_shape(lambda: g)
            operator = lx.FunctionLinearOperator(
                lambda u: tree_sub(u, vjp_z(u)), structure
            )
            return lx.linear_solve(operator, g, self.linear_solver, throw=False).value
        if self.linear_solver == "anderson":
            backend = OptimistixBackend(
                Anderson(rtol=self.rtol, atol=self.atol, memory=5)
            )
            out = backend.solve(
                lambda u, _: tree_add(g, vjp_z(u)),
                g,
                None,
                max_steps=self.max_steps,
                budget=None,
                batched=False,
                trace=False,
            )
            return out.z
        return _fixed_point_iteration(
            lambda u: tree_add(g, vjp_z(u)), g, self.rtol, self.atol, self.max_steps
        )

    def apply(self, forward, f, z0, args, budget):
        @jax.custom_vjp
        def solve(z0, args, budget):
            out = forward(z0, args, budget, False)
            return out.z, out

        def solve_fwd(z0, args, budget):
            z, out = solve(z0, args, budget)
            return (z, out), (z, z0, args, budget)

        def solve_bwd(residuals, cotangents):
            z, z0, args, budget = residuals
            g, _ = cotangents  # the solve's statistics carry no gradient
            _, vjp_z = jax.vjp(lambda z: f(z, args), z)
            # Re-emit the VJP's convolutions in XLA:CPU's fast layout: the backward
            # iteration calls it in a loop, where non-canonical convs are 10-80x slower.
            u = self.solve_adjoint(canonicalize_convolutions(lambda u: vjp_z(u)[0]), g)
            _, vjp_args = jax.vjp(lambda a: f(z, a), args)
            (args_cotangent,) = vjp_args(u)
            return zero_cotangent(z0), args_cotangent, zero_cotangent(budget)

        solve.defvjp(solve_fwd, solve_bwd)
        z, out = solve(z0, args, budget)
        return z, jax.lax.stop_gradient(out)


def _fixed_point_iteration(step, u0, rtol, atol, max_steps):
    def cond(carry):
        k, _, change_sq, u_sq = carry
        scale = atol + rtol * jnp.sqrt(u_sq)
        return (k < max_steps) & (jnp.sqrt(change_sq) > scale)

    def body(carry):
        k, u, _, _ = carry
        u_next = step(u)
        change_sq = sample_sq_norm(tree_sub(u_next, u), batched=False)
        return k + 1, u_next, change_sq, sample_sq_norm(u_next, batched=False)

    sq_struct = jax.eval_shape(lambda: sample_sq_norm(u0, batched=False))
    inf = jnp.full(sq_struct.shape, jnp.inf, sq_struct.dtype)
    zero = jnp.zeros(sq_struct.shape, sq_struct.dtype)
    _, u, _, _ = jax.lax.while_loop(cond, body, (0, u0, inf, zero))
    return u


class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagation through every solver step (for checking and small problems).

    The loop runs as a `lax.scan` of `max_steps` steps that freezes once the solver
    stops, so memory and backward cost grow with `max_steps` (every step's VJP runs,
    also after the solve stopped). Gradients also flow into `z0`. At a converged
    solve it agrees with `ImplicitAdjoint`; use it to check that, or for small
    problems and unconverged budgets where the solver's own trajectory matters.

    **Example:** `adjoint=jaxdeq.UnrolledAdjoint()`.
    """

    def apply(self, forward, f, z0, args, budget):
        del f
        out = forward(z0, args, budget, True)
        return out.z, jax.lax.stop_gradient(out)


class PhantomGradient(AbstractAdjoint):
    """Phantom gradient (Geng et al., 2021): the gradient of `steps` damped iterations
    `z <- (1 - damping) z + damping f(z)` started from the (constant) fixed point.

    **Arguments:**

    - `steps`: number of unrolled iterations (>= 1); more approach the implicit
        gradient on contractive cells.
    - `damping`: the step size `lambda` in `(0, 1]`.

    The value stays the solver's `z*`; only the gradient comes from the unrolled
    steps. Backward cost: `steps` VJPs of the cell; memory independent of the
    forward budget.

    **Example:** `adjoint=jaxdeq.PhantomGradient(steps=5, damping=0.8)`.
    """

    steps: int = 5
    damping: float = 0.5

    def __check_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {self.steps!r}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping: expected a value in (0, 1], got {self.damping}")

    def apply(self, forward, f, z0, args, budget):
        out = _no_grad_forward(forward, z0, args, budget)
        z = jax.lax.stop_gradient(out.z)
        # Unrolled in Python, not a loop: `steps` is small, and XLA:CPU runs
        # convolution VJPs inside loops far slower than unrolled (BENCHMARKS.md).
        for _ in range(self.steps):
            fz = f(z, args)
            z = jax.tree_util.tree_map(
                lambda a, b: (1 - self.damping) * a + self.damping * b, z, fz
            )
        return _value_preserving(out.z, z), jax.lax.stop_gradient(out)


class OneStepGradient(AbstractAdjoint):
    """Jacobian-free backpropagation (Fung et al., 2022): the gradient of one cell
    application at the (constant) fixed point, i.e. the implicit gradient with
    `(I - J)^{-1}` replaced by the identity.

    One VJP of the cell per backward pass. On a contractive cell
    (`||J_f(z*)|| < 1`) it is a descent direction for the exact loss; it trains
    well when the cell stays contractive (Jacobian regularization helps).

    **Example:** `adjoint=jaxdeq.OneStepGradient()`.
    """

    def apply(self, forward, f, z0, args, budget):
        out = _no_grad_forward(forward, z0, args, budget)
        fz = f(jax.lax.stop_gradient(out.z), args)
        return _value_preserving(out.z, fz), jax.lax.stop_gradient(out)
