"""The shared engine of every DEQ model: initial state -> solve -> solution.

Models (single- and multiscale) describe their cell as a batched function
`cell(ps, st, z, x) -> (f(z, x), st)`; this module runs it to equilibrium per sample
(a `vmap` over the batch) or jointly, attaches the gradient mode, and assembles the
`DeepEquilibriumSolution`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._adjoint import AbstractAdjoint, ImplicitAdjoint
from ._misc import sample_sq_norm, tree_sub
from ._regularization import JACOBIAN_MODES, jacobian_frobenius_estimate
from ._solution import RESULTS, DeepEquilibriumSolution
from ._solve import DiffraxBackend, Forward, make_backend

BatchedCell = Callable[[PyTree, PyTree, PyTree[Array], Any], tuple[PyTree, PyTree]]
PROBLEM_TYPES = ("steady_state", "ode")


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
        **solver_options,
    ):
        self.backend = make_backend(solver, solver_options)
        if compute_dtype is not None:
            compute_dtype = jnp.dtype(compute_dtype)
            if not jnp.issubdtype(compute_dtype, jnp.floating):
                raise TypeError(
                    "compute_dtype: expected None or a floating dtype such as "
                    f"jnp.bfloat16, got {compute_dtype}"
                )
        self.compute_dtype = compute_dtype
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
        is_diffrax = isinstance(self.backend, DiffraxBackend)
        if problem_type == "ode" and not is_diffrax:
            raise ValueError(
                "problem_type: 'ode' integrates dz/dt = f(z, x) - z and needs a "
                f"diffrax solver, got {type(solver).__name__}"
            )
        if trace and is_diffrax:
            raise ValueError(
                "trace: residual traces are recorded by optimistix-style solvers; "
                f"the diffrax solver {type(solver).__name__} does not provide one"
            )
        adjoint = ImplicitAdjoint() if adjoint is None else adjoint
        if not isinstance(adjoint, AbstractAdjoint):
            raise TypeError(
                "adjoint: expected a gradient mode such as jaxdeq.ImplicitAdjoint(), "
                f"jaxdeq.PhantomGradient(), jaxdeq.OneStepGradient() or "
                f"jaxdeq.UnrolledAdjoint(), got {type(adjoint).__name__}"
            )
        for name, value, low in (
            ("max_steps", max_steps, 1),
            ("fixed_depth", fixed_depth, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if isinstance(sample_states, bool) or not isinstance(sample_states, int):
            raise TypeError(f"sample_states: expected an int, got {sample_states!r}")
        if not 0 <= sample_states <= max_steps:
            raise ValueError(
                f"sample_states: expected 0 <= sample_states <= max_steps "
                f"({max_steps}), got {sample_states}"
            )
        if sample_states and (is_diffrax or fixed_depth or problem_type == "ode"):
            raise ValueError(
                "sample_states: iterates are sampled from optimistix-style solves; "
                "not available with a diffrax solver, fixed_depth > 0 or "
                "problem_type='ode'"
            )
        if not isinstance(joint_solve, bool):
            raise TypeError(f"joint_solve: expected a bool, got {joint_solve!r}")
        self.adjoint = adjoint
        self.jacobian_regularization = jacobian_regularization
        self.problem_type = problem_type
        self.max_steps = max_steps
        self.fixed_depth = fixed_depth
        self.joint_solve = joint_solve
        self.trace = bool(trace)
        self.sample_states = sample_states

    def budget(self, max_steps):
        """Validate a per-call budget: `None`, a Python int or a traced int array."""
        if max_steps is None:
            return None
        if isinstance(max_steps, bool):
            raise TypeError(f"max_steps: expected an int, got {max_steps!r}")
        if isinstance(max_steps, int):
            if not 1 <= max_steps <= self.max_steps:
                raise ValueError(
                    f"max_steps: expected 1 <= max_steps <= {self.max_steps} (the "
                    f"model's max_steps), got {max_steps}"
                )
            if isinstance(self.backend, DiffraxBackend):
                return max_steps
            return jnp.asarray(max_steps, jnp.int32)
        max_steps = jnp.asarray(max_steps)
        if max_steps.shape != () or not jnp.issubdtype(max_steps.dtype, jnp.integer):
            raise TypeError(
                "max_steps: expected an int or a scalar integer array, got "
                f"{max_steps.dtype}{list(max_steps.shape)}"
            )
        return max_steps.astype(jnp.int32)


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
    """Trace-time check that the cell maps the state to its own shape."""
    out, _ = jax.eval_shape(cell, ps, st, z0, x)
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
) -> tuple[PyTree[Array], PyTree, DeepEquilibriumSolution]:
    """Run `cell` from `z0` to equilibrium; returns `(z*, new cell state, solution)`."""
    budget = config.budget(max_steps)
    if config.compute_dtype is not None:
        cell = _mixed_precision(cell, config.compute_dtype)
    # A Python-int budget is static (diffrax's step cap must be); arrays stay traced.
    static_budget = budget if isinstance(budget, int) else None
    if static_budget is not None:
        budget = None
    batch = jtu.tree_leaves(x)[0].shape[0]
    joint = config.joint_solve

    def f_joint(z, args):
        ps, st, x = args
        return cell(ps, st, z, x)[0]

    def f_one(z, args):
        ps, st, x = args
        return _remove_batch(cell(ps, st, _add_batch(z), _add_batch(x))[0])

    f = f_joint if joint else f_one
    per_sample = not joint and config.fixed_depth == 0
    keyed = per_sample and any(_is_key(leaf) for leaf in jtu.tree_leaves(st))
    sample_index = jnp.arange(batch)

    def sample_st(index):
        return _fold_in_sample(st, index) if keyed else st

    def forward(z0, args, budget, differentiable):
        return config.backend.solve(
            f,
            z0,
            args,
            max_steps=config.max_steps,
            budget=budget if static_budget is None else static_budget,
            batched=joint,
            trace=config.trace,
            differentiable=differentiable,
            samples=config.sample_states,
        )

    if config.problem_type == "ode":

        def integrate(z0, x, index):
            return config.backend.integrate(
                f, z0, (ps, sample_st(index), x), max_steps=config.max_steps
            )

        if joint:
            z, out = integrate(z0, x, None)
        else:
            z, out = jax.vmap(integrate)(z0, x, sample_index)
    elif config.fixed_depth > 0:
        z = jax.lax.fori_loop(
            0, config.fixed_depth, lambda _, z: f_joint(z, (ps, st, x)), z0
        )
        nfe = jnp.full((batch,), config.fixed_depth, jnp.int32)
        out = Forward(z, nfe, jnp.full((batch,), RESULTS.successful), None, None)
    elif joint:
        z, out = config.adjoint.apply(forward, f, z0, (ps, st, x), budget)
    else:

        def solve_one(z0, x, index):
            args = (ps, sample_st(index), x)
            return config.adjoint.apply(forward, f, z0, args, budget)

        z, out = jax.vmap(solve_one)(z0, x, sample_index)

    if keyed:
        # The cell as the per-sample solve saw it (per-sample keys); the state to
        # return comes from a batched call, whose output is unused (and removed by
        # XLA under jit).
        def f_batch(z):
            return jax.vmap(lambda z, x, i: f_one(z, (ps, sample_st(i), x)))(
                z, x, sample_index
            )

        fz, new_st = f_batch(z), cell(ps, st, z, x)[1]
    else:

        def f_batch(z):
            return cell(ps, st, z, x)[0]

        fz, new_st = cell(ps, st, z, x)
    residual = tree_sub(fz, z)
    if config.jacobian_regularization is None:
        jacobian_loss = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(z)))
    else:
        jacobian_loss = jacobian_frobenius_estimate(
            f_batch, z, key, config.jacobian_regularization
        )
    states = None
    if out.samples is not None:
        states = out.samples
        if not joint:  # (batch, k, ...) -> (k, batch, ...)
            states = jtu.tree_map(lambda leaf: jnp.moveaxis(leaf, 1, 0), states)
        states = jax.lax.stop_gradient(states)
        # Each sampled state gets a one-step (Jacobian-free) gradient, as in
        # torchdeq's fixed-point correction.
        states = jtu.tree_map(
            lambda s, g: s + (g - jax.lax.stop_gradient(g)),
            states,
            jax.vmap(f_batch)(states),
        )
    residual_norm = jnp.sqrt(sample_sq_norm(residual, batched=True))
    fz_norm = jnp.sqrt(sample_sq_norm(fz, batched=True))
    tiny = jnp.finfo(residual_norm.dtype).tiny
    solution = DeepEquilibriumSolution(
        z_star=z,
        u0=u0,
        residual=residual,
        jacobian_loss=jacobian_loss,
        nfe=jnp.broadcast_to(out.nfe, (batch,)),
        result=jnp.broadcast_to(out.result.astype(jnp.int32), (batch,)),
        residual_norm=jax.lax.stop_gradient(residual_norm),
        relative_residual_norm=jax.lax.stop_gradient(
            residual_norm / jnp.maximum(fz_norm, tiny)
        ),
        trace=out.trace,
        original=out.original,
        states=states,
    )
    return z, new_st, solution
