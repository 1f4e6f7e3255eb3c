"""Gradient modes: how a fixed-point solve is differentiated (the `adjoint=` argument).

Every mode returns the same forward value, the state `z*` the solver found; they
differ in the derivative attached to it, in cost and memory, and in the autodiff
transformations they support:

| mode | derivative | backward cost | memory in `max_steps` |
|---|---|---|---|
| `ImplicitAdjoint` | exact at a fixed point | one linear solve (JVPs/VJPs) | flat |
| `PhantomGradient(k)` | tends to exact as `k` grows | `k` cell VJPs | flat |
| `NeumannGradient(k)` | truncated Neumann series at `z*` | `k - 1` cell VJPs | flat |
| `ShineGradient(r)` | Broyden's inverse-Jacobian estimate | `r` cell VJPs | flat |
| `ReversibleAdjoint` | of the reversible solver's iterates | one VJP per step | flat |
| `OneStepGradient` | `(I - J)^{-1}` replaced by `I` | 1 cell VJP | flat |
| `UnrolledAdjoint` | of the solver's iterates | one VJP per step | grows |

Every mode but `ReversibleAdjoint` (a `custom_vjp`: reverse mode only) supports
every AD transformation: `jax.grad`, `jax.jvp`, `jax.jacfwd`, `jax.jacrev`,
`jax.hessian`, gradients of gradients, and `vmap` of all of them.

An adjoint also decides how the solver's loop is run (`loop`): a `lax.while_loop`
that is never differentiated, or, for `UnrolledAdjoint`, a scan that is.
`benchmarks/bench_gradients.py` measures every mode on the benchmark workloads.
"""

import abc
import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, PyTree

from ._conv_canon import canonicalize_convolutions
from ._linear_solve import (
    BackwardStatistics,
    report_statistics,
    richardson,
    solve_linear,
)
from ._misc import tree_add, tree_sub, tree_where, zero_cotangent
from ._solution import RESULTS
from ._solver._common import ravel
from ._solver.broyden import Broyden
from ._solver.reversible import Reversible

Cell = Callable[[PyTree[Array], PyTree], PyTree[Array]]
# forward(f, z0, args, budget, loop) -> Forward (see _backend.py)
Forward = Callable[..., Any]
Loop = Callable[..., Any]


def while_loop(cond_fun, body_fun, init_val, *, max_steps: int):
    """A `lax.while_loop` (not reverse-differentiable; `max_steps` is the caller's
    own cap, checked in `cond_fun`)."""
    del max_steps
    return jax.lax.while_loop(cond_fun, body_fun, init_val)


def scan_while_loop(cond_fun, body_fun, init_val, *, max_steps: int):
    """A reverse-differentiable while loop: `max_steps` scan steps whose state freezes
    once `cond_fun` is false."""

    def step(carry, _):
        keep_going = cond_fun(carry)
        return tree_where(keep_going, body_fun(carry), carry), None

    return jax.lax.scan(step, init_val, length=max_steps)[0]


class AbstractAdjoint(eqx.Module):
    """How the fixed point `z*` of `f(z, args)` is differentiated.

    `needs_solver_state`: whether `apply` reads the solver's final state
    (`forward(...).solver_state`), e.g. Broyden's inverse-Jacobian estimate.
    `differentiates_initial_state`: whether derivatives flow into `z0` (unrolled
    modes); the implicit ones give it none.
    `differentiates_loop`: whether JAX differentiates through the forward solve's
    loop (then a per-sample solve is a plain `jax.vmap` of it; otherwise the
    backend batches the loop itself, see `OptimistixBackend.solve`).
    """

    needs_solver_state: ClassVar[bool] = False
    # Whether derivatives flow into the solve's initial state `z0` (a warm start).
    differentiates_initial_state: ClassVar[bool] = False
    differentiates_loop: ClassVar[bool] = False

    def check_solver(self, solver: Any) -> None:
        """Raise a `ValueError` naming `adjoint` if this mode cannot differentiate
        a solve by `solver` (called when a model is built)."""
        del solver

    @abc.abstractmethod
    def loop(self, cond_fun, body_fun, init_val, *, max_steps: int) -> Any:
        """The loop the backend runs its solver in."""

    @abc.abstractmethod
    def apply(
        self, forward: Forward, f: Cell, z0: PyTree, args: PyTree, budget: Any
    ) -> tuple[PyTree, Any]:
        """Run `forward(f, z0, args, budget, self.loop)` and return `(z*, its
        outcome)` with this mode's derivative attached to `z*`."""


def _closure_converted(f: Cell, z0: PyTree, args: PyTree) -> tuple[Cell, list]:
    """`(cell, consts)` with `cell(z, (args, consts)) == f(z, args)`: the traced
    values `f` closes over (e.g. a scalar inside a WrappedFunction) hoisted out by
    `jax.closure_convert`, so that a caller can differentiate or stop them."""
    f_closed, consts = jax.closure_convert(lambda z, a: f(z, a), z0, args)

    def cell(z, params):
        cell_args, cell_consts = params
        return f_closed(z, cell_args, *cell_consts)

    return cell, consts


def _no_grad_forward(adjoint, forward, f, z0, args, budget):
    """The forward solve with no derivative at all: of its inputs, and of values
    the cell closes over."""
    cell, consts = _closure_converted(f, z0, args)
    z0, params = jax.lax.stop_gradient((z0, (args, consts)))
    return forward(cell, z0, params, budget, adjoint.loop)


def _value_preserving(z_star, z_graded):
    """`z_star` in value, the derivative of `z_graded`."""
    return jtu.tree_map(
        lambda a, b: a + (b - jax.lax.stop_gradient(b)), z_star, z_graded
    )


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def _check_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {value!r}")


def _is_symbolic_zero(tangent) -> bool:
    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _partial_jvp(fn: Callable, primals: PyTree, tangents: PyTree):
    """`jax.jvp(fn, (primals,), (tangents,))[1]` over the leaves whose tangent is not a
    symbolic zero (or `None` when all are): the others are held constant, so no work
    is spent on derivatives that are zero."""
    leaves, treedef = jtu.tree_flatten(primals)
    tangent_leaves = jtu.tree_leaves(tangents, is_leaf=_is_symbolic_zero)
    live = [
        i
        for i, t in enumerate(tangent_leaves)
        if not _is_symbolic_zero(t) and jnp.result_type(t) != jax.dtypes.float0
    ]
    if not live:
        return None

    def restricted(*values):
        full = list(leaves)
        for i, value in zip(live, values, strict=True):
            full[i] = value
        return fn(jtu.tree_unflatten(treedef, full))

    primal_live = [leaves[i] for i in live]
    tangent_live = [tangent_leaves[i] for i in live]
    return jax.jvp(restricted, primal_live, tangent_live)[1]


class ImplicitAdjoint(AbstractAdjoint):
    """The implicit-function-theorem derivative (the default), as a JVP rule.

    At a fixed point `z* = f(z*, θ)`, the tangent of `z*` solves
    `(I - J_z) dz = J_θ dθ`, with `J_z`, `J_θ` the Jacobians of the cell. jaxdeq
    solves it matrix-free, with JVPs of the cell only, through
    `jax.lax.custom_linear_solve`; JAX transposes it for reverse mode (the same solve
    with `I - J_z^T`, by VJPs, never a dense Jacobian). So every transformation
    works: `jax.grad`, `jax.jvp`, `jax.jacfwd`, `jax.jacrev`, `jax.hessian`, a
    gradient of a gradient (gradient penalties, forces `-dE/dx`), and `vmap` of all
    of them. Values the cell closes over are hoisted out (`jax.closure_convert`), so
    they are differentiated too. The forward solve itself runs in a
    `lax.while_loop` that is never differentiated: memory is flat in `max_steps`.

    **Arguments:**

    - `linear_solver`: `"auto"` (default): fixed-point iteration while each step
        shrinks the residual by at least 30 %, then GMRES from where it got to;
        `"gmres"`: restarted GMRES from the start (one product per step; converges
        wherever `I - J` is invertible); `"fixed_point"`: iterate `u <- b + J u`
        only (torchdeq's backward: the cheapest step, converges only if the
        spectral radius of `J` is below 1; stops when it diverges); or any lineax
        solver, e.g.
        `lineax.BiCGStab(rtol=1e-8, atol=1e-8)`, which then stops on its own
        tolerances and is judged by its own result code (and by the finiteness of
        its answer); `rtol`, `atol`, `max_steps` and `restart` do not apply to it.
    - `rtol`, `atol`: each solve stops once `||b - (I - J) u||_2 <= max(atol,
        rtol ||b||_2)`, relative to its own right-hand side `b` (so scaling the
        loss does not change the accuracy). `rtol=None` (default) is
        `eps ** (2/3)` of the state's dtype (3.7e-11 in float64, 2.4e-5 in
        float32), or of the model's `compute_dtype` when it is set (0.039 in
        bfloat16).
    - `max_steps`: the most products with `J` per solve (default 100).
    - `restart`: the Krylov dimension of GMRES before it restarts (memory:
        `restart + 1` vectors the size of one sample's state).
    - `throw`: if `True`, a solve that fails (runs out of steps, diverges, reports
        a failure, or produces NaN/infinity) raises at run time, under `jit` too,
        with an error naming the backward solve (a `jax.errors.JaxRuntimeError`
        carrying the message). It checks the *linear* solve only: the derivative is
        taken at the state the forward solve returned, so read the forward outcome
        in `solution.result` (a forward solve that ran out of steps gives the exact
        derivative of the map at that state, not of the true fixed point). With
        `False` (default, optimistix's and the models' convention for outcomes that
        are not errors of the program) the gradient is returned as it is; read the
        outcome with `callback`. `throw=True` adds a host callback guarded by a
        condition to the compiled backward pass.
    - `callback`: `None`, or a function called at run time with the
        [`jaxdeq.BackwardStatistics`][] of every solve (products used, final residual
        and its ratio to `||b||`, a [`jaxdeq.RESULTS`][] code), through
        `jax.debug.callback`: torchdeq's backward hook. Per-sample solves (the
        default) call it once per sample (once in all when the right-hand side does
        not depend on the sample, e.g. a tangent w.r.t. a shared parameter under
        `jacfwd`).

    The statistics of the *forward* solve are in the model's
    [`jaxdeq.DeepEquilibriumSolution`][]. In per-sample mode (the default) each
    sample's backward solve is its own problem, with its own tolerance.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optimistix as optx, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Chain(nn.Parallel(jnp.add, nn.Dense(3, 3), nn.Dense(3, 3)),
    ...                 nn.WrappedFunction(jnp.tanh))
    >>> steps = []
    >>> model = jaxdeq.DeepEquilibriumNetwork(
    ...     cell, optx.FixedPointIteration(rtol=1e-5, atol=1e-5),
    ...     adjoint=jaxdeq.ImplicitAdjoint(
    ...         callback=lambda stats: steps.append(stats.steps)))
    >>> x = jnp.ones((2, 3))
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> grads = jax.grad(lambda ps: jnp.sum(model.apply(ps, st, x)[0]))(ps)
    >>> jvp = jax.jvp(lambda x: model.apply(ps, st, x)[0], (x,), (x,))[1]
    >>> len(steps)  # per sample: one reverse-mode and one forward-mode solve
    4

    ```
    """

    linear_solver: Literal["auto", "gmres", "fixed_point"] | lx.AbstractLinearSolver = (
        "auto"
    )
    rtol: float | None = None
    atol: float = 0.0
    max_steps: int = 100
    restart: int = 10
    throw: bool = False
    callback: Callable[[BackwardStatistics], Any] | None = None

    def __check_init__(self):
        expected = "'auto', 'gmres', 'fixed_point' or a lineax solver"
        if isinstance(self.linear_solver, str):
            if self.linear_solver not in ("auto", "gmres", "fixed_point"):
                raise ValueError(
                    f"linear_solver: expected {expected}, got {self.linear_solver!r}"
                )
        elif not isinstance(self.linear_solver, lx.AbstractLinearSolver):
            raise TypeError(
                f"linear_solver: expected {expected}, got "
                f"{type(self.linear_solver).__name__}"
            )
        for name in ("max_steps", "restart"):
            _check_int(name, getattr(self, name), 1)
        if self.rtol is not None:
            _check_real("rtol", self.rtol)
            if not 0 <= self.rtol < 1:
                raise ValueError(f"rtol: expected 0 <= rtol < 1, got {self.rtol!r}")
        _check_real("atol", self.atol)
        if not 0 <= self.atol < float("inf"):
            raise ValueError(f"atol: expected a finite float >= 0, got {self.atol!r}")
        if not isinstance(self.throw, bool):
            raise TypeError(f"throw: expected a bool, got {self.throw!r}")
        if self.callback is not None and not callable(self.callback):
            raise TypeError(
                f"callback: expected None or a function, got {self.callback!r}"
            )

    def loop(self, cond_fun, body_fun, init_val, *, max_steps):
        return while_loop(cond_fun, body_fun, init_val, max_steps=max_steps)

    def apply(self, forward, f, z0, args, budget):
        return _linear_solve_rule(
            self,
            forward,
            f,
            z0,
            args,
            budget,
            lambda out: (
                functools.partial(solve_linear, self),
                # Reverse mode: XLA:CPU runs convolution VJPs inside loops far
                # faster in canonical layout (see _conv_canon.py).
                lambda vecmat, b: solve_linear(
                    self, canonicalize_convolutions(vecmat), b
                ),
            ),
        )


def _linear_solve_rule(adjoint, forward, f, z0, args, budget, solvers):
    """The forward solve with the implicit derivative as a JVP rule: the tangent of
    `z*` is `solve((I - J_z), J_θ dθ)` through `jax.lax.custom_linear_solve`, with
    `(solve, transpose_solve) = solvers(forward outcome)`. Exact solves give the
    implicit gradient; truncated or approximate ones (Neumann series, SHINE) give
    their approximation of it, in every AD mode."""
    # Values the cell closes over (e.g. a traced scalar inside a WrappedFunction)
    # become explicit inputs, so that their tangents reach the JVP rule.
    cell, consts = _closure_converted(f, z0, args)
    static_parts = []

    @jax.custom_jvp
    def fixed_point(z0, params, budget):
        out = forward(cell, z0, params, budget, adjoint.loop)
        dynamic, static = eqx.partition(out, eqx.is_array)
        static_parts.append(static)
        return dynamic

    def fixed_point_jvp(primals, tangents):
        z0, params, budget = primals
        _, params_dot, _ = tangents
        out = fixed_point(z0, params, budget)
        z = out.z
        rhs = _partial_jvp(lambda p: cell(z, p), params, params_dot)
        if rhs is None:
            z_dot = jtu.tree_map(jnp.zeros_like, z)
        else:
            _, jvp_z = jax.linearize(lambda z: cell(z, params), z)
            solve, transpose_solve = solvers(eqx.combine(out, static_parts[0]))
            z_dot = jax.lax.custom_linear_solve(
                lambda v: tree_sub(v, jvp_z(v)), rhs, solve, transpose_solve
            )
        out_dot = zero_cotangent(out)  # (a zero tangent: same structure)
        return out, eqx.tree_at(lambda o: o.z, out_dot, z_dot)

    fixed_point.defjvp(fixed_point_jvp, symbolic_zeros=True)

    dynamic = fixed_point(z0, (args, consts), budget)
    out = eqx.combine(jax.lax.stop_gradient(dynamic), static_parts[0])
    return dynamic.z, _without_solver_state(out)


def _without_solver_state(out):
    """The forward outcome without the solver's state (read by the gradient mode
    only; large, and not part of the solution)."""
    return dataclasses.replace(out, solver_state=None)


class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagation through every solver step (for checking and small problems).

    The loop runs as a `lax.scan` of `max_steps` steps that freezes once the solver
    stops, so memory and backward cost grow with `max_steps` (every step's VJP runs,
    also after the solve stopped). Derivatives also flow into `z0`. At a converged
    solve it agrees with `ImplicitAdjoint`; use it to check that, or for small
    problems and unconverged budgets where the solver's own trajectory matters.
    Supports every AD transformation.

    **Example:** `adjoint=jaxdeq.UnrolledAdjoint()`.
    """

    differentiates_initial_state: ClassVar[bool] = True
    differentiates_loop: ClassVar[bool] = True

    def loop(self, cond_fun, body_fun, init_val, *, max_steps):
        return scan_while_loop(cond_fun, body_fun, init_val, max_steps=max_steps)

    def apply(self, forward, f, z0, args, budget):
        out = forward(f, z0, args, budget, self.loop)
        return out.z, jax.lax.stop_gradient(out)


class PhantomGradient(AbstractAdjoint):
    """Phantom gradient (Geng et al., 2021): the derivative of `steps` damped
    iterations `z <- (1 - damping) z + damping f(z)` started from the (constant)
    fixed point.

    **Arguments:**

    - `steps`: number of unrolled iterations (>= 1); more approach the implicit
        gradient on contractive cells.
    - `damping`: the step size `lambda` in `(0, 1]`.

    The value stays the solver's `z*`; only the derivative comes from the unrolled
    steps. Backward cost: `steps` VJPs of the cell; memory independent of the
    forward budget. Supports every AD transformation.

    **Example:** `adjoint=jaxdeq.PhantomGradient(steps=5, damping=0.8)`.
    """

    steps: int = 5
    damping: float = 0.5

    def __check_init__(self):
        _check_int("steps", self.steps, 1)
        _check_real("damping", self.damping)
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping: expected a value in (0, 1], got {self.damping}")

    def loop(self, cond_fun, body_fun, init_val, *, max_steps):
        return while_loop(cond_fun, body_fun, init_val, max_steps=max_steps)

    def apply(self, forward, f, z0, args, budget):
        out = _no_grad_forward(self, forward, f, z0, args, budget)
        z = jax.lax.stop_gradient(out.z)
        # Unrolled in Python, not a loop: `steps` is small, and XLA:CPU runs
        # convolution VJPs inside loops far slower than unrolled (BENCHMARKS.md).
        for _ in range(self.steps):
            fz = f(z, args)
            z = jtu.tree_map(
                lambda a, b: (1 - self.damping) * a + self.damping * b, z, fz
            )
        return _value_preserving(out.z, z), jax.lax.stop_gradient(out)


class OneStepGradient(AbstractAdjoint):
    """Jacobian-free backpropagation (Fung et al., 2022): the derivative of one cell
    application at the (constant) fixed point, i.e. the implicit derivative with
    `(I - J)^{-1}` replaced by the identity.

    One VJP of the cell per backward pass. On a contractive cell
    (`||J_f(z*)|| < 1`) it is a descent direction for the exact loss; it trains
    well when the cell stays contractive (Jacobian regularization helps). Supports
    every AD transformation.

    **Example:** `adjoint=jaxdeq.OneStepGradient()`.
    """

    def loop(self, cond_fun, body_fun, init_val, *, max_steps):
        return while_loop(cond_fun, body_fun, init_val, max_steps=max_steps)

    def apply(self, forward, f, z0, args, budget):
        out = _no_grad_forward(self, forward, f, z0, args, budget)
        fz = f(jax.lax.stop_gradient(out.z), args)
        return _value_preserving(out.z, fz), jax.lax.stop_gradient(out)


def _check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected None or a function, got {callback!r}")


class NeumannGradient(AbstractAdjoint):
    """The Neumann-series phantom gradient (Geng et al., 2021, "On training implicit
    models"): `(I - J)^{-1}` replaced by the damped, truncated series

    `λ Σ_{i<k} B^i`,  `B = (1 - λ) I + λ J`,  `J = ∂f/∂z` at `z*`,

    with `k = steps` terms and `λ = damping`, the paper's scaling. As `k` grows it
    tends to `(λ (I - J))^{-1} λ = (I - J)^{-1}` whenever the spectral radius of `B`
    is below 1 (for `damping = 1`: of `J`), so every `λ` approximates the same
    implicit derivative; a smaller `λ` converges more slowly but on more cells.
    Unlike [`jaxdeq.PhantomGradient`][] (the unrolled phantom gradient, which
    differentiates `k` fresh cell applications), all products are taken with the
    Jacobian at `z*`: the series is `k - 1` damped Richardson steps
    `u <- u + λ (g - (I - J^T) u)` from `u = λ g`, run with VJPs in reverse mode and
    JVPs in forward mode, through `jax.lax.custom_linear_solve`.

    **Arguments:**

    - `steps`: the number of series terms `k >= 1`: `k - 1` products with `J`
        (VJPs in reverse mode); `steps=1` is the one-step gradient scaled by `λ`.
    - `damping`: `λ` in `(0, 1]`.
    - `callback`: `None`, or a function called with the
        [`jaxdeq.BackwardStatistics`][] of every backward pass: `steps` products
        (one more than the series needs, for the true residual
        `||g - (I - J^T) u||`, computed only when a callback is given), the residual
        and its ratio to `||g||`, and `result` (`successful`, or `nonfinite`).

    The value stays the solver's `z*`; memory is independent of the forward budget
    and of `steps`. Supports every AD transformation.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optimistix as optx, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Chain(nn.Parallel(jnp.add, nn.Dense(3, 3), nn.Dense(3, 3)),
    ...                 nn.WrappedFunction(jnp.tanh))
    >>> model = jaxdeq.DeepEquilibriumNetwork(
    ...     cell, jaxdeq.Anderson(rtol=1e-6, atol=1e-6),
    ...     adjoint=jaxdeq.NeumannGradient(steps=8, damping=0.9))
    >>> x = jnp.ones((2, 3))
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> grads = jax.grad(lambda ps: jnp.sum(model.apply(ps, st, x)[0]))(ps)

    ```
    """

    steps: int = 5
    damping: float = 1.0
    callback: Callable[[BackwardStatistics], Any] | None = None

    def __check_init__(self):
        _check_int("steps", self.steps, 1)
        _check_real("damping", self.damping)
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping: expected a value in (0, 1], got {self.damping}")
        _check_callback(self.callback)

    def loop(self, cond_fun, body_fun, init_val, *, max_steps):
        return while_loop(cond_fun, body_fun, init_val, max_steps=max_steps)

    def _series(self, matvec, b):
        # λ Σ_{i<k} (I - λ A)^i b, with A = I - J (or its transpose).
        u = jtu.tree_map(lambda x: self.damping * x, b)
        u = richardson(matvec, b, u, steps=self.steps - 1, damping=self.damping)
        if self.callback is not None:
            report_statistics(self.callback, self.steps, tree_sub(b, matvec(u)), b)
        return u

    def apply(self, forward, f, z0, args, budget):
        return _linear_solve_rule(
            self,
            forward,
            f,
            z0,
            args,
            budget,
            lambda out: (self._series, _canonical_transpose(self._series)),
        )


def _canonical_transpose(solve):
    """A transpose solve whose VJPs run with canonical convolutions: XLA:CPU runs
    convolution VJPs inside loops far faster in that layout (see _conv_canon.py)."""
    return lambda vecmat, b: solve(canonicalize_convolutions(vecmat), b)


def _broyden_inverse(state, b, *, transpose: bool):
    """`-H b` (or `-H^T b`) for Broyden's estimate `H ≈ (J - I)^{-1}` of the
    inverse Jacobian of `f(z) - z`: an estimate of `(I - J)^{-1} b`."""
    flat, unravel = ravel(b)
    x = flat.astype(state.u.dtype)
    low_rank = (state.u @ x) @ state.v if transpose else (state.v @ x) @ state.u
    return unravel((x - low_rank).astype(flat.dtype))


def _require_solver(mode, solver, required: type, uses: str, other: str) -> None:
    """The construction-time error of a gradient mode that needs one solver."""
    if not isinstance(solver, required):
        name = required.__name__
        raise ValueError(
            f"adjoint: jaxdeq.{type(mode).__name__} {uses} a jaxdeq.{name} forward "
            f"solve, but the solver is {type(solver).__name__}; use "
            f"solver=jaxdeq.{name}(...) or another gradient mode (e.g. "
            f"jaxdeq.{other})"
        )


class ShineGradient(AbstractAdjoint):
    """SHINE (Ramzi et al., ICLR 2022): the backward linear solve replaced by the
    inverse-Jacobian estimate the forward solve already built.

    [`jaxdeq.Broyden`][] approximates the inverse Jacobian of `f(z) - z` by
    `H = -I + Σ_i u_i v_i^T` (low rank, `memory` terms), so `(I - J)^{-1} ≈ -H`:
    the reverse-mode cotangent is `u = -H^T g` (forward mode: `-H b`), read from the
    solver's final state, with no product with `J` at all. `refine_steps > 0`
    continues from there with that many fixed-point steps
    `u <- g + J^T u` ("SHINE refine", one VJP each), which converge to the implicit
    gradient when the spectral radius of `J` is below 1.

    The estimate only holds the secant information along the forward trajectory:
    it is accurate in the directions the solver explored (exactly so on an affine
    cell after enough Broyden steps), and can be poor elsewhere; refinement steps,
    or a cosine check against [`jaxdeq.ImplicitAdjoint`][] on a few batches, tell
    how much that matters for a given model.

    Needs the forward solver to be `jaxdeq.Broyden`: any other solver is an error
    when the model is built.

    **Arguments:**

    - `refine_steps`: fixed-point refinement steps after the Broyden estimate
        (default 0: none).
    - `callback`: `None`, or a function called with the
        [`jaxdeq.BackwardStatistics`][] of every backward pass: `refine_steps + 1`
        products (the last one computes the true residual `||g - (I - J^T) u||`,
        only when a callback is given), the residual, its ratio to `||g||`, and
        `result` (`successful`, or `nonfinite`).

    The value stays the solver's `z*`; memory is independent of the forward budget.
    Supports every AD transformation.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Chain(nn.Parallel(jnp.add, nn.Dense(3, 3), nn.Dense(3, 3)),
    ...                 nn.WrappedFunction(jnp.tanh))
    >>> model = jaxdeq.DeepEquilibriumNetwork(
    ...     cell, jaxdeq.Broyden(rtol=1e-6, atol=1e-6),
    ...     adjoint=jaxdeq.ShineGradient(refine_steps=2))
    >>> x = jnp.ones((2, 3))
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> grads = jax.grad(lambda ps: jnp.sum(model.apply(ps, st, x)[0]))(ps)

    ```
    """

    refine_steps: int = 0
    callback: Callable[[BackwardStatistics], Any] | None = None

    needs_solver_state: ClassVar[bool] = True

    def __check_init__(self):
        _check_int("refine_steps", self.refine_steps, 0)
        _check_callback(self.callback)

    def check_solver(self, solver):
        _require_solver(
            self,
            solver,
            Broyden,
            "uses the inverse-Jacobian estimate of",
            "NeumannGradient",
        )

    def loop(self, cond_fun, body_fun, init_val, *, max_steps):
        return while_loop(cond_fun, body_fun, init_val, max_steps=max_steps)

    def _solvers(self, out):
        state = out.solver_state

        def solver(transpose):
            def solve(matvec, b):
                u = _broyden_inverse(state, b, transpose=transpose)
                u = richardson(matvec, b, u, steps=self.refine_steps, damping=1.0)
                if self.callback is not None:
                    residual = tree_sub(b, matvec(u))
                    report_statistics(self.callback, self.refine_steps + 1, residual, b)
                return u

            return solve

        return solver(False), _canonical_transpose(solver(True))

    def apply(self, forward, f, z0, args, budget):
        return _linear_solve_rule(self, forward, f, z0, args, budget, self._solvers)


class ReversibleAdjoint(AbstractAdjoint):
    """Exact backpropagation through a [`jaxdeq.Reversible`][] solve with memory
    independent of the number of steps (McCallum, Arora & Foster, 2025).

    The forward solve runs in a `lax.while_loop` and keeps only its last two
    iterates. The backward pass reconstructs the trajectory from them, step by step
    backwards, with the exact algebraic inverse of the reversible step, and
    backpropagates through each step as it goes (one cell evaluation and one VJP
    per step): the exact gradient of the computation the forward performed, the
    iterate it returned (the last one on success, else the lowest-residual one)
    included, whether or not it converged. It equals
    [`jaxdeq.UnrolledAdjoint`][] over the same solver up to the round-off of the
    reconstruction, without its memory growing with `max_steps`. Derivatives also
    flow into `z0`.

    Reverse mode only (`jax.grad`, `jax.vjp`, `jax.jacrev`, and `vmap` of them):
    it is a `jax.custom_vjp`.

    **Cost.** One cell evaluation and one VJP per forward step. In per-sample
    solves (the default) the backward loop runs under the batch's `vmap`, so it
    carries one parameter cotangent per sample (memory `batch x parameters`, flat
    in the number of steps, and that much memory traffic per step): on the W1
    benchmark workload (batch 128, a 256-wide dense cell) its train step is several
    times the implicit mode's (`benchmarks/RESULTS.md`). A joint solve
    (`joint_solve=True`) carries one.

    Needs the forward solver to be `jaxdeq.Reversible`: any other solver is an
    error when the model is built.

    **Arguments:**

    - `callback`: `None`, or a function called with the
        [`jaxdeq.BackwardStatistics`][] of every backward pass: `steps` VJPs (the
        number of forward steps reversed), `residual_norm` the distance of the
        reconstructed initial state from the true `z0` (the reconstruction's
        accumulated round-off), its ratio to the norm of the last iterate, and
        `result` (`successful`, or `nonfinite`).

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Chain(nn.Parallel(jnp.add, nn.Dense(3, 3), nn.Dense(3, 3)),
    ...                 nn.WrappedFunction(jnp.tanh))
    >>> model = jaxdeq.DeepEquilibriumNetwork(
    ...     cell, jaxdeq.Reversible(rtol=1e-6, atol=1e-6, relaxation=0.8),
    ...     adjoint=jaxdeq.ReversibleAdjoint(), max_steps=100)
    >>> x = jnp.ones((2, 3))
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> grads = jax.grad(lambda ps: jnp.sum(model.apply(ps, st, x)[0]))(ps)

    ```
    """

    callback: Callable[[BackwardStatistics], Any] | None = None

    needs_solver_state: ClassVar[bool] = True
    differentiates_initial_state: ClassVar[bool] = True

    def __check_init__(self):
        _check_callback(self.callback)

    def check_solver(self, solver):
        _require_solver(
            self, solver, Reversible, "reverses the steps of", "ImplicitAdjoint"
        )

    def loop(self, cond_fun, body_fun, init_val, *, max_steps):
        return while_loop(cond_fun, body_fun, init_val, max_steps=max_steps)

    def apply(self, forward, f, z0, args, budget):
        cell, consts = _closure_converted(f, z0, args)
        static_parts = []

        def run(z0, params, budget):
            out = forward(cell, z0, params, budget, self.loop)
            dynamic, static = eqx.partition(out, eqx.is_array)
            static_parts.append(static)
            return dynamic

        @jax.custom_vjp
        def solve(z0, params, budget):
            return run(z0, params, budget)

        def solve_fwd(z0, params, budget):
            out = run(z0, params, budget)
            state = out.solver_state
            steps = state.progress.num_steps.astype(jnp.int32)
            # The returned iterate: the last one on success, else the best one.
            index = jnp.where(out.result == RESULTS.successful, steps, out.best_step)
            residuals = (state.previous, state.current, state.relaxation, steps, index)
            return out, (residuals, z0, params, budget)

        def solve_bwd(saved, out_bar):
            (previous, current, beta, steps, index), z0, params, budget = saved
            z_bar = out_bar.z
            batched = jnp.ndim(index) > 0
            diff, nondiff = eqx.partition(params, eqx.is_inexact_array)

            def inject(k, cotangent):
                # The output's cotangent enters at the step that produced it.
                return tree_where(
                    index == k, tree_add(cotangent, z_bar), cotangent, batched=batched
                )

            def body(carry):
                k, prev, cur, prev_bar, cur_bar, diff_bar = carry
                cur_bar = inject(k, cur_bar)
                # (w_{k-1}, w_k) -> (w_{k-2}, w_{k-1}); the VJP of the step
                # w_k = (1 - β) w_{k-2} + β f(w_{k-1}) at the same evaluation.
                f_prev, vjp = jax.vjp(
                    lambda z, d: cell(z, eqx.combine(d, nondiff)), prev, diff
                )
                older = jtu.tree_map(
                    lambda c, fp: (c - beta * fp) / (1 - beta), cur, f_prev
                )
                scaled = jtu.tree_map(lambda a: beta * a, cur_bar)
                prev_cell_bar, diff_step_bar = vjp(scaled)
                new_prev_bar = jtu.tree_map(lambda a: (1 - beta) * a, cur_bar)
                new_cur_bar = tree_add(prev_bar, prev_cell_bar)
                diff_bar = tree_add(diff_bar, diff_step_bar)
                return k - 1, older, prev, new_prev_bar, new_cur_bar, diff_bar

            zeros = jtu.tree_map(jnp.zeros_like, current)
            init = (steps, previous, current, zeros, zeros, zero_cotangent(diff))
            # Canonical convolutions: XLA:CPU runs convolution VJPs inside loops
            # far faster in that layout (see _conv_canon.py).
            _, first, second, prev_bar, cur_bar, diff_bar = jax.lax.while_loop(
                lambda carry: carry[0] > 0, canonicalize_convolutions(body), init
            )
            cur_bar = inject(0, cur_bar)
            if self.callback is not None:
                # The reconstruction ends at (w_{-1}, w_0), both equal to z0.
                error = (tree_sub(first, z0), tree_sub(second, z0))
                report_statistics(self.callback, steps, error, current)
            params_bar = eqx.combine(diff_bar, zero_cotangent(nondiff))
            return tree_add(prev_bar, cur_bar), params_bar, zero_cotangent(budget)

        solve.defvjp(solve_fwd, solve_bwd)

        dynamic = solve(z0, (args, consts), budget)
        out = eqx.combine(jax.lax.stop_gradient(dynamic), static_parts[0])
        return dynamic.z, _without_solver_state(out)
