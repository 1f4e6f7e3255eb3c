"""The `init`/`apply` template that every DEQ model shares.

A model declares its layers and cell through a few hooks; `init` and `apply` are
written once here:

`apply`: advance the PRNG key -> prepare the cell's layers (once per forward pass)
-> initial state -> check the cell's output -> `solve_equilibrium` (engine ->
backend -> solver, with the gradient mode around it) -> the new state.
"""

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Bool, PRNGKeyArray, PyTree

from ._equilibrium import EquilibriumConfig, check_cell_output, solve_equilibrium
from ._init_program import init_program
from ._misc import tree_where
from ._solution import DeepEquilibriumSolution
from .nn._core import AbstractLayer, apply_with_solution, check_return_solution


def check_input(x: Any) -> None:
    leaves = jtu.tree_leaves(x)
    if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError(
            "x: expected a batch-first array (or pytree of arrays) with a leading "
            f"batch axis, got {jax.eval_shape(lambda: x)}"
        )
    batch = {jnp.shape(leaf)[0] for leaf in leaves}
    if len(batch) != 1:
        raise ValueError(f"x: every leaf needs the same batch size, got {batch}")


def warm_start(
    z0: PyTree[Array], warm: Array | None, own: PyTree[Array]
) -> PyTree[Array]:
    """The initial state: `z0` (checked against the model's own initial state
    `own`: same structure and shapes; floating leaves cast to its dtypes) where
    `warm` holds (everywhere without a mask), `own` elsewhere."""
    want = jax.eval_shape(lambda: own)
    try:
        got = jax.eval_shape(lambda: z0)
        same = jtu.tree_structure(got) == jtu.tree_structure(want) and all(
            g.shape == w.shape
            for g, w in zip(jtu.tree_leaves(got), jtu.tree_leaves(want), strict=True)
        )
    except TypeError:
        same = False
    if not same:
        shapes = jtu.tree_map(lambda s: s.shape, want)
        raise ValueError(
            f"z0: expected a state shaped like the model's, {shapes} (e.g. "
            f"solution.z_star of an earlier call on a batch of this size), got "
            f"{jtu.tree_map(jnp.shape, z0)}"
        )
    for g in jtu.tree_leaves(got):
        if not jnp.issubdtype(g.dtype, jnp.floating):
            raise TypeError(f"z0: expected floating arrays, got {g.dtype}")
    z0 = jtu.tree_map(lambda a, w: jnp.asarray(a).astype(w.dtype), z0, want)
    if warm is None:
        return z0
    batch = jtu.tree_leaves(want)[0].shape[0]
    warm = jnp.asarray(warm)
    if warm.shape != (batch,) or warm.dtype != jnp.bool_:
        raise TypeError(
            f"warm: expected a bool array of shape ({batch},) (one flag per sample), "
            f"got {warm.dtype}{list(warm.shape)}"
        )
    return tree_where(warm, z0, own, batched=True)


def apply_model(
    model: AbstractLayer,
    ps,
    st,
    x,
    max_steps,
    return_solution: bool,
    **solve_kwargs,
) -> tuple[Any, PyTree, tuple]:
    """`model.apply` for the framework wrappers: `(output, st, (solution,))`, or
    `(output, st, ())` without `return_solution`. Only DEQ models take a per-call
    budget and the solve's keywords (`z0`, `warm`, `anytime`; passed when not
    `None`); other layers keep the bare protocol."""
    check_return_solution(return_solution)
    kwargs = {} if max_steps is None else {"max_steps": max_steps}
    kwargs.update({k: v for k, v in solve_kwargs.items() if v is not None})
    if not return_solution:
        out, st = model.apply(ps, st, x, **kwargs)
        return out, st, ()
    if not model.returns_solution:
        raise TypeError(
            f"return_solution: {type(model).__name__} returns no solution; use a DEQ "
            "model or a container of one"
        )
    out, st, solution = apply_with_solution(model, ps, st, x, **kwargs)
    return out, st, (solution,)


def _on_auto_axes(fn: Callable, args: tuple) -> Any:
    """`fn(*args)`, run with the mesh axes automatic when `x` (the last argument) is
    sharded over explicit axes, as `jax.make_mesh` makes them by default: the
    per-sample solve is a `vmap` of a loop whose buffers start unsharded, which
    explicit sharding types reject. Outputs that lead with the batch axis (the
    state and the solution) come back split over the input's batch axes; the rest
    (`st`, batch means) replicated."""
    leaf = jtu.tree_leaves(args[-1])[0]
    sharding = jax.typeof(leaf).sharding
    mesh = sharding.mesh
    if mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return fn(*args)
    batch_axes = sharding.spec[0] if len(sharding.spec) else None
    batch = jnp.shape(leaf)[0]
    # (shapes only: the structs carry no sharding, so `fn` traces as unsharded)
    out_struct = jax.eval_shape(
        fn, *jtu.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    )
    with jax.sharding.use_abstract_mesh(mesh):
        out_st = jtu.tree_map(lambda _: P(), out_struct[1])
        out_specs = jtu.tree_map(
            lambda s: P(batch_axes) if s.ndim and s.shape[0] == batch else P(),
            (out_struct[0], out_struct[2]),
        )
        out_sharding = (out_specs[0], out_st, out_specs[1])
        return jax.sharding.auto_axes(fn, out_sharding=out_sharding)(*args)


class AbstractEquilibriumModel(AbstractLayer):
    """A DEQ model: its cell, initial state and layers, solved by the shared engine.

    `ps` and `st` are dicts. `st` holds what persists between calls and nothing that
    depends on the batch: the layers' states and `"key"` (advanced by every `apply`).
    A call's per-sample [`jaxdeq.DeepEquilibriumSolution`][] is returned on request,
    `apply(..., return_solution=True)`.
    """

    config: EquilibriumConfig
    # The argument named by errors about the cell's output.
    cell_name: ClassVar[str]
    returns_solution: ClassVar[bool] = True
    # Whether `init` runs the initialisers as one compiled program (many layers),
    # or eagerly (a few: compiling would cost more, and XLA's fused reductions, e.g.
    # a weight norm's, may differ from the eager ones in the last bit).
    init_in_one_program: ClassVar[bool] = False

    @abc.abstractmethod
    def _init_layers(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        """`(ps, st)` of every layer (cell and init layers) for inputs like `x`."""

    @abc.abstractmethod
    def _cell_part(self, tree: dict) -> PyTree:
        """The cell's part of the model's `ps` or `st`."""

    @abc.abstractmethod
    def _with_cell_state(self, st: dict, cell_st: PyTree) -> dict:
        """`st` with the cell's part replaced."""

    @abc.abstractmethod
    def _prepare(self, cell_ps: PyTree, cell_st: PyTree) -> tuple[PyTree, PyTree]:
        """The cell layers' `prepare` (see `AbstractLayer.prepare`)."""

    @abc.abstractmethod
    def _cell(self, cell_ps, cell_st, z, x) -> tuple[PyTree, PyTree]:
        """The batched cell: `(f(z, x), new cell state)`."""

    @abc.abstractmethod
    def _initial_state(self, ps, st, cell_ps, cell_st, x) -> tuple[Any, Any, Any]:
        """`(u0, z0, init layers' new state or None)`."""

    @abc.abstractmethod
    def _output(self, z: PyTree) -> Any:
        """The model's output for the fixed point `z`."""

    @property
    def max_steps(self) -> int:
        return self.config.max_steps

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[PyTree, PyTree]:
        check_input(x)
        if self.init_in_one_program:
            # All initialisers as one compiled program whose random draws and their
            # elementwise chains are shared by all layers (see `_init_program`):
            # eager initialisation compiles every small op for every shape, and
            # even under one `jax.jit` XLA compiles a random hash and a chain per
            # layer. Its values are those of `jax.jit(self._init_with_key)`.
            ps, st = init_program(self._init_with_key, key, x)
        else:
            ps, st = self._init_with_key(key, x)
        # Trace (not run) the cell as `apply` will call it: a model whose cell or
        # init layers can't take `x` fails here, naming the argument, rather than at
        # the first `apply`. (Not the whole `apply`: tracing the solver loop and its
        # gradient rules would cost as much as the initialisers themselves.)
        jax.eval_shape(self._start, ps, st, x)
        return ps, st

    def _init_with_key(self, key: PRNGKeyArray, x: Any) -> tuple[PyTree, PyTree]:
        layers_key, state_key = jax.random.split(key)
        ps, st = self._init_layers(layers_key, x)
        st["key"] = state_key
        return ps, st

    def _start(self, ps, st, x) -> tuple:
        """`apply`'s path up to the solve: prepare the cell's layers (once per
        forward pass, not at every solver iteration; see `AbstractLayer.prepare`),
        the initial state, the cell check. `(cell_ps, cell_st, u0, z0, st_init)`."""
        cell_ps, cell_st = self._prepare(self._cell_part(ps), self._cell_part(st))
        u0, z0, st_init = self._initial_state(ps, st, cell_ps, cell_st, x)
        check_cell_output(self._cell, cell_ps, cell_st, z0, x, name=self.cell_name)
        return cell_ps, cell_st, u0, z0, st_init

    @property
    def differentiates_initial_state(self) -> bool:
        """Whether derivatives flow into the solve's initial state (a warm start's
        `z0`): with an unrolled gradient mode, `fixed_depth > 0` or a neural ODE."""
        return self.config.differentiates_initial_state

    def apply(
        self,
        ps: PyTree,
        st: PyTree,
        x: Any,
        *,
        max_steps: int | Array | None = None,
        return_solution: bool = False,
        z0: PyTree[Array] | None = None,
        warm: Bool[Array, " batch"] | None = None,
        anytime: Sequence[int] | None = None,
    ) -> tuple[Any, PyTree] | tuple[Any, PyTree, DeepEquilibriumSolution]:
        """`(output, st)`, or `(output, st, solution)` with `return_solution=True`.

        **Arguments:**

        - `ps`, `st`: from `init` (or the previous `apply`'s `st`).
        - `x`: the input, batch-first.
        - `max_steps`: a per-call step budget, `1 <= max_steps <= model.max_steps`: a
            Python int, or a traced integer scalar (optimistix-style solvers: no
            recompilation when it changes; checked at run time).
        - `return_solution`: also return the call's
            [`jaxdeq.DeepEquilibriumSolution`][] (per-sample nfe, steps, residuals,
            outcome codes; the differentiable `jacobian_loss`, `u0` and `states`).
        - `z0`: a warm start: the solve's initial state, per sample, a pytree shaped
            like the model's state (`solution.z_star` of an earlier call, e.g. of the
            previous frame or epoch), replacing the model's own (`init`: zeros,
            skip-reg or the init layer; `solution.u0` stays the model's own, for
            skip losses). A traced input: a new value does not recompile. From
            `z0 = z*` of the same input a fixed-point solver (`jaxdeq.Anderson`,
            `jaxdeq.Broyden`, `optx.FixedPointIteration`) stops after one
            evaluation (`nfe == 1`: it must evaluate `f` once to see the residual);
            `optx.Newton` takes one step (`nfe == 1 + n`), a diffrax solver a few.
            Gradients: implicit modes (`ImplicitAdjoint`, `PhantomGradient`,
            `NeumannGradient`, `ShineGradient`, `OneStepGradient`) give `z0` none,
            as the fixed point does not depend on where the solve started;
            `UnrolledAdjoint`, `ReversibleAdjoint`, `fixed_depth > 0` and the neural
            ODE (whose output depends on `z0`) differentiate through it. A warm
            start changes the derivative of modes built from the solve itself:
            `ShineGradient` uses Broyden's estimate, which a solve of few steps
            barely updates (from `z0 = z*`, none: the identity, as
            `OneStepGradient`). Floating leaves are cast to the state's dtype.
        - `warm`: with `z0`, a per-sample `bool` mask of shape `(batch,)`: `True`
            starts the sample from `z0`, `False` from the model's own initial state
            (what [`jaxdeq.FixedPointStore.lookup`][] returns for samples it has
            no fresh fixed point for).
        - `anytime`: step budgets `(b_1, ..., b_k)` (Python ints in
            `1..max_steps`): `solution.anytime` then holds what the solve returns at
            each budget, equal to separate calls with `max_steps=b_j`, from this one
            solve (optimistix-style solvers without a fallback; needs
            `return_solution=True` to be read). See [`jaxdeq.AnytimeSolution`][].

        **Raises:** `ValueError`/`TypeError` for inputs of the wrong structure; at run
        time (under `jit` too), an error carrying the outcome's message when the model
        was built with `throw=True` and a sample's solve did not succeed.
        """
        check_return_solution(return_solution)
        check_input(x)
        if not isinstance(st, dict) or "key" not in st:
            raise ValueError(
                "st: expected the state returned by `init` or `apply` (a dict with a "
                f"'key'), got {type(st).__name__}"
                + (f" with keys {sorted(st)}" if isinstance(st, dict) else "")
            )
        if warm is not None and z0 is None:
            raise ValueError("warm: a warm-start mask needs z0= (the warm start)")
        out = _on_auto_axes(
            lambda ps, st, z0, warm, x: self._apply(
                ps, st, x, max_steps, z0, warm, anytime
            ),
            (ps, st, z0, warm, x),
        )
        return out if return_solution else out[:2]

    def _apply(self, ps, st, x, max_steps, z0_warm=None, warm=None, anytime=None):
        key, probe_key = jax.random.split(st["key"])
        cell_ps, cell_st, u0, z0, st_init = self._start(ps, st, x)
        if z0_warm is not None:
            z0 = warm_start(z0_warm, warm, z0)
        z, new_cell_st, solution = solve_equilibrium(
            self.config,
            self._cell,
            cell_ps,
            cell_st,
            x,
            u0,
            z0,
            probe_key,
            max_steps,
            anytime,
        )
        new_st = self._with_cell_state(st, new_cell_st)
        new_st = dict(new_st, key=key)
        if st_init is not None:
            new_st["init"] = st_init
        return self._output(z), new_st, solution
