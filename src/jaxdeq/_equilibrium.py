"""The shared engine of every DEQ model: initial state -> solve -> solution.

Models (single- and multiscale) describe their cell as a batched function
`cell(ps, st, z, x) -> (f(z, x), st)`. `solve_equilibrium` reads top to bottom:

1. `_problem`: the cell as the solver sees it (one sample, or the joint batch);
2. `_solve`: the backend runs it to equilibrium inside the loop the gradient mode
   (adjoint) chooses, per sample (a `vmap` over the batch) or jointly; or the
   neural ODE / fixed-depth unroll;
3. `_solution`: the `DeepEquilibriumSolution` (residuals, Jacobian penalty, sampled
   states) and the cell's new state.
"""

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._adjoint import AbstractAdjoint, ImplicitAdjoint
from ._backend import OPTIMISTIX_SOLVERS, Forward, make_backend
from ._fallback import FallbackBackend
from ._misc import sample_sq_norm, tree_all_finite, tree_sub
from ._regularization import JACOBIAN_MODES, jacobian_frobenius_estimate
from ._solution import RESULTS, AnytimeSolution, DeepEquilibriumSolution

BatchedCell = Callable[[PyTree, PyTree, PyTree[Array], Any], tuple[PyTree, PyTree]]
PROBLEM_TYPES = ("steady_state", "ode")
# Keywords of every model besides the solver options: named in the "did you mean"
# of a misspelt keyword, which would otherwise land among the solver options.
_MODEL_KEYWORDS = (
    "init",
    "jacobian_regularization",
    "problem_type",
    "adjoint",
    "max_steps",
    "fixed_depth",
    "joint_solve",
    "trace",
    "sample_states",
    "compute_dtype",
    "throw",
    "fallback",
)


class EquilibriumConfig(eqx.Module):
    """The solve settings shared by every DEQ model, validated once."""

    backend: Any
    adjoint: AbstractAdjoint
    jacobian_regularization: str | None
    problem_type: str
    max_steps: int
    fixed_depth: int
    joint_solve: bool
    trace: bool
    sample_states: int
    compute_dtype: Any
    throw: bool
    fallback: bool

    def __init__(
        self,
        solver,
        *,
        jacobian_regularization=None,
        problem_type="steady_state",
        adjoint=None,
        max_steps=32,
        fixed_depth=0,
        joint_solve=False,
        trace=False,
        sample_states=0,
        compute_dtype=None,
        throw=False,
        fallback=None,
        **solver_options,
    ):
        self.backend = make_backend(solver, solver_options, _MODEL_KEYWORDS)
        if compute_dtype is not None:
            try:
                compute_dtype = jnp.dtype(compute_dtype)
            except TypeError as error:
                raise TypeError(
                    "compute_dtype: expected None or a floating dtype such as "
                    f"jnp.bfloat16, got {compute_dtype!r}"
                ) from error
            if not jnp.issubdtype(compute_dtype, jnp.floating):
                raise TypeError(
                    "compute_dtype: expected None or a floating dtype such as "
                    f"jnp.bfloat16, got {compute_dtype}"
                )
        self.compute_dtype = compute_dtype
        for name, value in (
            ("jacobian_regularization", jacobian_regularization),
            ("problem_type", problem_type),
        ):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}: expected a string, got {value!r}")
        if jacobian_regularization is not None and (
            jacobian_regularization not in JACOBIAN_MODES
        ):
            raise ValueError(
                "jacobian_regularization: expected None or one of "
                f"{JACOBIAN_MODES}, got {jacobian_regularization!r}"
            )
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"problem_type: expected one of {PROBLEM_TYPES}, got {problem_type!r}"
            )
        backend = self.backend
        if problem_type == "ode" and not backend.neural_ode:
            raise ValueError(
                "problem_type: 'ode' integrates dz/dt = f(z, x) - z and needs a "
                f"diffrax solver, got {type(solver).__name__}"
            )
        if trace and not backend.residual_trace:
            raise ValueError(
                "trace: residual traces are recorded by optimistix-style solvers; "
                f"the diffrax solver {type(solver).__name__} does not provide one"
            )
        if problem_type == "ode" and adjoint is not None:
            raise ValueError(
                "adjoint: a neural ODE (problem_type='ode') is differentiated by "
                "diffrax's own adjoint, not by a DEQ gradient mode; leave `adjoint` "
                f"unset, got {type(adjoint).__name__}"
            )
        adjoint = ImplicitAdjoint() if adjoint is None else adjoint
        if (
            compute_dtype is not None
            and isinstance(adjoint, ImplicitAdjoint)
            and adjoint.rtol is None
        ):
            # The cell's JVPs are only as accurate as its compute dtype: so is the
            # backward solve's default tolerance.
            rtol = float(jnp.finfo(compute_dtype).eps) ** (2 / 3)
            adjoint = dataclasses.replace(adjoint, rtol=rtol)
        if not isinstance(adjoint, AbstractAdjoint):
            raise TypeError(
                "adjoint: expected a gradient mode such as jaxdeq.ImplicitAdjoint(), "
                "jaxdeq.PhantomGradient(), jaxdeq.NeumannGradient(), "
                "jaxdeq.ShineGradient(), jaxdeq.OneStepGradient(), "
                "jaxdeq.ReversibleAdjoint() or jaxdeq.UnrolledAdjoint(), got "
                f"{type(adjoint).__name__}"
            )
        adjoint.check_solver(solver)
        for name, value, low in (
            ("max_steps", max_steps, 1),
            ("fixed_depth", fixed_depth, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name}: expected an int >= {low}, got {value!r}")
            value = int(value)
            if value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if isinstance(sample_states, bool) or not isinstance(sample_states, int):
            raise TypeError(f"sample_states: expected an int, got {sample_states!r}")
        if not 0 <= sample_states <= max_steps:
            raise ValueError(
                f"sample_states: expected 0 <= sample_states <= max_steps "
                f"({max_steps}), got {sample_states}"
            )
        if sample_states and (
            not backend.sampled_iterates or fixed_depth or problem_type == "ode"
        ):
            raise ValueError(
                "sample_states: iterates are sampled from optimistix-style solves; "
                "not available with a diffrax solver, fixed_depth > 0 or "
                "problem_type='ode'"
            )
        for name, value in (
            ("joint_solve", joint_solve),
            ("trace", trace),
            ("throw", throw),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {value!r}")
        if trace and fixed_depth:
            raise ValueError(
                "trace: residual traces are recorded by solves; with fixed_depth > 0 "
                "the cell is applied a fixed number of times and nothing is recorded"
            )
        self.adjoint = adjoint
        self.jacobian_regularization = jacobian_regularization
        self.problem_type = problem_type
        self.max_steps = int(max_steps)
        self.fixed_depth = int(fixed_depth)
        self.joint_solve = joint_solve
        self.trace = trace
        self.sample_states = sample_states
        self.throw = throw
        self.fallback = fallback is not None
        if fallback is not None:
            self.backend = _with_fallback(
                self.backend, fallback, adjoint, fixed_depth, sample_states
            )

    @property
    def differentiates_initial_state(self) -> bool:
        """Whether derivatives flow into the solve's initial state: unrolled
        gradient modes, `fixed_depth > 0` and the neural ODE."""
        return (
            self.fixed_depth > 0
            or self.problem_type == "ode"
            or self.adjoint.differentiates_initial_state
        )

    def anytime(self, anytime, max_steps) -> tuple[int, ...]:
        """Validate per-call anytime budgets: `None` or a sequence of Python ints in
        `1..max_steps` (and not above a per-call int `max_steps`); sorted, unique."""
        if anytime is None:
            return ()
        want = f"a sequence of ints in 1..{self.max_steps} (the model's max_steps)"
        if isinstance(anytime, (str, bytes)) or not hasattr(anytime, "__iter__"):
            raise TypeError(f"anytime: expected {want}, got {anytime!r}")
        budgets = tuple(anytime)
        if not budgets or any(
            isinstance(b, bool) or not isinstance(b, numbers.Integral) for b in budgets
        ):
            raise TypeError(f"anytime: expected {want}, got {anytime!r}")
        top = max_steps if isinstance(max_steps, int) else self.max_steps
        if any(not 1 <= b <= top for b in budgets):
            raise ValueError(
                f"anytime: expected {want}"
                + (
                    f" and <= the per-call max_steps ({top})"
                    if top != self.max_steps
                    else ""
                )
                + f", got {anytime!r}"
            )
        if self.fixed_depth or self.problem_type == "ode":
            raise ValueError(
                "anytime: budgets are steps of a solve; with fixed_depth > 0 or "
                "problem_type='ode' there is no solve to stop early"
            )
        if not self.backend.anytime_budgets:
            raise ValueError(
                "anytime: the states at several budgets come from optimistix-style "
                "solvers without a fallback; not available with "
                f"{type(self.backend).__name__}"
            )
        return tuple(sorted({int(b) for b in budgets}))

    def budget(self, max_steps):
        """Validate a per-call budget: `None`, a Python int or a traced int array
        (checked at run time: `1 <= max_steps <= self.max_steps`)."""
        if max_steps is None:
            return None
        if self.fixed_depth:
            raise ValueError(
                "max_steps: a per-call budget has no effect with fixed_depth > 0 "
                f"(the cell is applied exactly {self.fixed_depth} times)"
            )
        if isinstance(max_steps, bool):
            raise TypeError(f"max_steps: expected an int, got {max_steps!r}")
        if isinstance(max_steps, int):
            if not 1 <= max_steps <= self.max_steps:
                raise ValueError(
                    f"max_steps: expected 1 <= max_steps <= {self.max_steps} (the "
                    f"model's max_steps), got {max_steps}"
                )
            if not self.backend.traced_budget:
                return max_steps
            return jnp.asarray(max_steps, jnp.int32)
        try:
            max_steps = jnp.asarray(max_steps)
        except TypeError as error:
            raise TypeError(
                "max_steps: expected an int or a scalar integer array, got "
                f"{max_steps!r}"
            ) from error
        if max_steps.shape != () or not jnp.issubdtype(max_steps.dtype, jnp.integer):
            raise TypeError(
                "max_steps: expected an int or a scalar integer array, got "
                f"{max_steps.dtype}{list(max_steps.shape)}"
            )
        return eqx.error_if(
            max_steps.astype(jnp.int32),
            (max_steps < 1) | (max_steps > self.max_steps),
            f"max_steps: expected 1 <= max_steps <= {self.max_steps} (the model's "
            "max_steps)",
        )


def _with_fallback(backend, fallback, adjoint, fixed_depth, sample_states):
    """The backend that continues a failed solve with the solver `fallback`."""
    if not backend.fallback_solvers:
        raise ValueError(
            "fallback: a fallback solver continues the solves of an optimistix-style "
            f"solver; {type(backend).__name__} solves cannot be continued"
        )
    if not isinstance(fallback, OPTIMISTIX_SOLVERS):
        raise TypeError(
            "fallback: expected an optimistix root-finder or fixed-point solver, "
            "e.g. optx.FixedPointIteration(rtol, atol) or jaxdeq.Broyden(rtol, "
            f"atol), got {type(fallback).__name__}"
        )
    second = make_backend(fallback, {})
    for problem, why in (
        (fixed_depth, "fixed_depth > 0 applies the cell without solving"),
        (sample_states, "sample_states samples the primary solve only"),
        (
            adjoint.needs_solver_state,
            f"{type(adjoint).__name__} reads the solver's state, which a fallback "
            "would replace",
        ),
    ):
        if problem:
            raise ValueError(f"fallback: not available here: {why}")
    return FallbackBackend(backend, second)


def _add_batch(tree):
    return jtu.tree_map(lambda leaf: leaf[None], tree)


def _remove_batch(tree):
    return jtu.tree_map(lambda leaf: leaf[0], tree)


def _is_key(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _fold_in_sample(st: PyTree, index: Array) -> PyTree:
    """A cell state with every PRNG key folded with the sample's index, so that in
    a per-sample solve random layers (`nn.VariationalDropout`) draw per sample."""

    def fold(leaf):
        if not _is_key(leaf):
            return leaf
        flat = jnp.reshape(leaf, (-1,))
        folded = jax.vmap(lambda key: jax.random.fold_in(key, index))(flat)
        return jnp.reshape(folded, jnp.shape(leaf))

    return jtu.tree_map(fold, st)


def check_cell_output(cell: BatchedCell, ps, st, z0, x, name: str = "model"):
    """Trace-time check that the cell maps the state to its own shape, on the batch
    and on one sample of it (the leading axis of `x` is the batch)."""
    out, _ = jax.eval_shape(cell, ps, st, z0, x)
    first = jtu.tree_map(lambda leaf: leaf[:1], (z0, x))
    if jtu.tree_leaves(x)[0].shape[0] > 1:
        try:
            jax.eval_shape(cell, ps, st, *first)
        except (ValueError, TypeError) as error:
            shapes = jtu.tree_map(jnp.shape, x)
            raise ValueError(
                f"x: the cell takes the whole of x ({shapes}) but not one sample of "
                "it, x[:1]: x must be batch-first (its leading axis is the batch); "
                "to solve a single sample, pass x[None]"
            ) from error
    want = jax.eval_shape(lambda: z0)
    got_shapes = jtu.tree_map(lambda s: (s.shape, s.dtype), out)
    want_shapes = jtu.tree_map(lambda s: (s.shape, s.dtype), want)
    if jtu.tree_structure(out) != jtu.tree_structure(want) or got_shapes != want_shapes:
        raise ValueError(
            f"{name}: a DEQ cell must map the state to its own shape and dtype, but "
            f"it maps {want_shapes} to {got_shapes}; give the model an `init` layer "
            "that produces the state, or put an input layer before the DEQ"
        )


def _cast_floating(tree, dtype):
    return jtu.tree_map(
        lambda leaf: (
            leaf.astype(dtype)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
            else leaf
        ),
        tree,
    )


def _mixed_precision(cell: BatchedCell, dtype) -> BatchedCell:
    """Run the cell in `dtype` (parameters, state and input cast on the way in) while
    the solver's state, residuals and norms stay in the state's own dtype."""

    def mixed(ps, st, z, x):
        fz, st = cell(
            _cast_floating(ps, dtype),
            st,
            _cast_floating(z, dtype),
            _cast_floating(x, dtype),
        )
        return jtu.tree_map(lambda out, ref: out.astype(ref.dtype), fz, z), st

    return mixed


class _Problem(eqx.Module):
    """The cell as the solver sees it: `f(z, args)` on one sample (per-sample
    solves) or on the batch (joint solves), and the same on the batch for the
    residual, Jacobian penalty and sampled states."""

    cell: BatchedCell
    ps: PyTree
    st: PyTree
    x: Any
    joint: bool
    keyed: bool  # per-sample PRNG keys (random layers in a per-sample solve)

    @property
    def batch(self) -> int:
        return jtu.tree_leaves(self.x)[0].shape[0]

    def sample_st(self, index):
        return _fold_in_sample(self.st, index) if self.keyed else self.st

    def f_joint(self, z, args):
        ps, st, x = args
        return self.cell(ps, st, z, x)[0]

    def f_one(self, z, args):
        ps, st, x = args
        return _remove_batch(self.cell(ps, st, _add_batch(z), _add_batch(x))[0])

    @property
    def f(self):
        return self.f_joint if self.joint else self.f_one

    def f_batch(self, z):
        """The cell on the batch, as the solve saw it (per-sample keys included)."""
        if not self.keyed:
            return self.cell(self.ps, self.st, z, self.x)[0]
        return jax.vmap(lambda z, x, i: self.f_one(z, (self.ps, self.sample_st(i), x)))(
            z, self.x, jnp.arange(self.batch)
        )


def _problem(config: EquilibriumConfig, cell, ps, st, x) -> _Problem:
    if config.compute_dtype is not None:
        cell = _mixed_precision(cell, config.compute_dtype)
    joint = config.joint_solve
    per_sample = not joint and config.fixed_depth == 0
    keyed = per_sample and any(_is_key(leaf) for leaf in jtu.tree_leaves(st))
    return _Problem(cell, ps, st, x, joint, keyed)


def _solve(
    config: EquilibriumConfig,
    problem: _Problem,
    z0: PyTree[Array],
    budget,
    anytime: tuple[int, ...] = (),
) -> tuple[PyTree[Array], Forward]:
    """Run the problem from `z0`: `(z*, the solve's outcome)`."""
    ps, x, batch = problem.ps, problem.x, problem.batch
    sample_index = jnp.arange(batch)
    if config.fixed_depth > 0:
        # Pretraining, for every problem type (the neural ODE included, as in the
        # seed): `f` applied exactly `fixed_depth` times, plain backpropagation.
        args = (ps, problem.st, x)
        z = jax.lax.fori_loop(
            0, config.fixed_depth, lambda _, z: problem.f_joint(z, args), z0
        )
        depth = jnp.full((batch,), config.fixed_depth, jnp.int32)
        successful = jnp.full((batch,), RESULTS.successful, jnp.int32)
        return z, Forward(z, depth, successful, None, None, steps=depth)
    if config.problem_type == "ode":
        steps = config.max_steps if budget is None else budget

        def integrate(z0, x, index):
            args = (ps, problem.sample_st(index), x)
            return config.backend.integrate(problem.f, z0, args, max_steps=steps)

        if isinstance(steps, jax.Array):
            raise TypeError(
                "max_steps: a neural ODE needs a Python int per-call budget "
                "(diffrax's step cap is static: each budget compiles once); got a "
                "traced array"
            )
        if problem.joint:
            return integrate(z0, x, None)
        return jax.vmap(integrate)(z0, x, sample_index)
    # A Python-int budget is static (diffrax's step cap must be): bound into the
    # forward solve; array budgets stay traced inputs of the solve.
    static_budget = budget if isinstance(budget, int) else None
    if static_budget is not None:
        budget = None
    forward = functools.partial(
        _forward,
        config.backend,
        static_budget=static_budget,
        max_steps=config.max_steps,
        batched=problem.joint,
        trace=config.trace,
        samples=config.sample_states,
        solver_state=config.adjoint.needs_solver_state,
        anytime=anytime,
        per_sample=not problem.joint and not config.adjoint.differentiates_loop,
    )
    if problem.joint:
        args = (ps, problem.st, x)
        return config.adjoint.apply(forward, problem.f, z0, args, budget)

    def solve_one(z0, x, index):
        args = (ps, problem.sample_st(index), x)
        return config.adjoint.apply(forward, problem.f, z0, args, budget)

    return jax.vmap(solve_one)(z0, x, sample_index)


def _forward(
    backend, f, z0, args, budget, loop, *, static_budget, **settings
) -> Forward:
    budget = budget if static_budget is None else static_budget
    return backend.solve(f, z0, args, budget, loop, **settings)


def _solution(
    config: EquilibriumConfig,
    problem: _Problem,
    z: PyTree[Array],
    out: Forward,
    u0: PyTree[Array],
    key: PRNGKeyArray,
    budgets: tuple[int, ...] = (),
) -> tuple[PyTree, DeepEquilibriumSolution]:
    """The cell's new state and the solution at `z`."""
    # The returned cell state comes from a batched call; with per-sample keys its
    # output is unused (and removed by XLA under jit).
    fz_plain, new_st = problem.cell(problem.ps, problem.st, z, problem.x)
    fz = problem.f_batch(z) if problem.keyed else fz_plain
    residual = tree_sub(fz, z)
    if config.jacobian_regularization is None:
        jacobian_loss = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(z)))
    else:
        jacobian_loss = jacobian_frobenius_estimate(
            problem.f_batch, z, key, config.jacobian_regularization
        )
    states = None
    if out.samples is not None:
        states = out.samples
        if not problem.joint:  # (batch, k, ...) -> (k, batch, ...)
            states = jtu.tree_map(lambda leaf: jnp.moveaxis(leaf, 1, 0), states)
        states = jax.lax.stop_gradient(states)
        # Each sampled state gets a one-step (Jacobian-free) gradient, as in
        # torchdeq's fixed-point correction.
        states = jtu.tree_map(
            lambda s, g: s + (g - jax.lax.stop_gradient(g)),
            states,
            jax.vmap(problem.f_batch)(states),
        )
    anytime = None
    if out.anytime is not None:
        a = out.anytime
        if not problem.joint:  # (batch, k, ...) -> (k, batch, ...)
            a = jtu.tree_map(lambda leaf: jnp.moveaxis(leaf, 1, 0), a)
        anytime = AnytimeSolution(
            budgets=budgets,
            z_star=jax.lax.stop_gradient(a.z),
            nfe=a.nfe,
            steps=a.steps,
            result=a.result,
        )
    batch = problem.batch
    residual_norm = jnp.sqrt(sample_sq_norm(residual, batched=True))
    fz_norm = jnp.sqrt(sample_sq_norm(fz, batched=True))
    tiny = jnp.finfo(residual_norm.dtype).tiny
    solution = DeepEquilibriumSolution(
        z_star=z,
        u0=u0,
        residual=residual,
        jacobian_loss=jacobian_loss,
        nfe=jnp.broadcast_to(out.nfe, (batch,)),
        steps=jnp.broadcast_to(out.steps, (batch,)),
        result=jnp.broadcast_to(out.result.astype(jnp.int32), (batch,)),
        residual_norm=jax.lax.stop_gradient(residual_norm),
        relative_residual_norm=jax.lax.stop_gradient(
            residual_norm / jnp.maximum(fz_norm, tiny)
        ),
        trace=out.trace,
        original=out.original,
        states=states,
        fallback=out.fallback,
        anytime=anytime,
    )
    return new_st, solution


def solve_equilibrium(
    config: EquilibriumConfig,
    cell: BatchedCell,
    ps: PyTree,
    st: PyTree,
    x: Any,
    u0: PyTree[Array],
    z0: PyTree[Array],
    key: PRNGKeyArray,
    max_steps=None,
    anytime=None,
) -> tuple[PyTree[Array], PyTree, DeepEquilibriumSolution]:
    """Run `cell` from `z0` to equilibrium; returns `(z*, new cell state, solution)`.
    With `anytime=(b_1, ...)`, the solution also holds what the solve returns at
    each of those budgets."""
    budgets = config.anytime(anytime, max_steps)
    budget = config.budget(max_steps)
    if budgets and isinstance(budget, jax.Array):
        budget = eqx.error_if(
            budget,
            budget < budgets[-1],
            f"anytime: expected budgets <= the per-call max_steps, got {budgets}",
        )
    problem = _problem(config, cell, ps, st, x)
    z, out = _solve(config, problem, z0, budget, budgets)
    z, out = _poison_nonfinite_inputs(problem, z0, z, out)
    new_st, solution = _solution(config, problem, z, out, u0, key, budgets)
    if config.throw:
        z = _raise_if_unsuccessful(z, solution.result)
    return z, new_st, solution


def _inexact_leaves(tree: PyTree) -> list[Array]:
    return [leaf for leaf in jtu.tree_leaves(tree) if eqx.is_inexact_array(leaf)]


def _poison_nonfinite_inputs(
    problem: _Problem, z0: PyTree[Array], z: PyTree[Array], out: Forward
) -> tuple[PyTree[Array], Forward]:
    """A sample whose input, initial state, or whose cell's parameters or state, hold
    NaN or infinity gets `nonfinite` and a NaN output: garbage in stays visible (a
    solve that goes non-finite from finite inputs keeps its best finite iterate)."""
    batch = problem.batch
    shared_ok = tree_all_finite(_inexact_leaves((problem.ps, problem.st)))
    ok = (
        shared_ok
        & tree_all_finite(_inexact_leaves(problem.x), batched=True)
        & tree_all_finite(z0, batched=True)
    )
    ok = jnp.broadcast_to(ok, (batch,))
    if problem.joint:  # one coupled problem: a bad sample spoils every sample
        ok = jnp.broadcast_to(jnp.all(ok), (batch,))
    # A multiplication by 1 or NaN: the bad sample's value *and* its tangents (in
    # forward mode too) are NaN; the others are unchanged, exactly.
    factor = jnp.where(ok, 1, jnp.nan)

    def poison(leaf, axis=0):
        shape = [1] * leaf.ndim
        shape[axis] = batch
        return leaf * jnp.reshape(factor.astype(leaf.dtype), shape)

    z = jtu.tree_map(poison, z)
    result = jnp.where(
        ok, jnp.broadcast_to(out.result, (batch,)), jnp.int32(RESULTS.nonfinite)
    )
    anytime = out.anytime
    if anytime is not None:  # leaves (batch, k, ...) per sample, (k, batch, ...) joint
        axis = 1 if problem.joint else 0
        bad = jnp.reshape(~ok, (1, batch) if problem.joint else (batch, 1))
        anytime = dataclasses.replace(
            anytime,
            z=jtu.tree_map(functools.partial(poison, axis=axis), anytime.z),
            result=jnp.where(bad, jnp.int32(RESULTS.nonfinite), anytime.result),
        )
    return z, dataclasses.replace(out, z=z, result=result, anytime=anytime)


def _raise_if_unsuccessful(z: PyTree[Array], result: Array) -> PyTree[Array]:
    """`z`, with a run-time error (under `jit` too) carrying the outcome's message
    when a sample's solve did not succeed (optimistix's `throw`)."""
    messages = [
        f"jaxdeq: a DEQ solve did not succeed (RESULTS.{code.name}): "
        f"{RESULTS.message(code)}. Build the model with throw=False to get the "
        "per-sample outcome codes in solution.result instead."
        for code in RESULTS
    ]
    worst = jnp.max(result, initial=RESULTS.successful)
    # The check guards a factor of exactly 1 that multiplies the output: its value
    # is needed by the output's tangents and cotangents too, so the check runs
    # under `jax.grad` (which would prune a check on the primal output alone).
    one = eqx.branched_error_if(
        jnp.ones((), jnp.int32), worst != RESULTS.successful, worst, messages
    )
    return jtu.tree_map(lambda leaf: leaf * one.astype(leaf.dtype), z)
