"""DeepEquilibriumNetwork and SkipDeepEquilibriumNetwork."""

from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._equilibrium import EquilibriumConfig
from ._model import AbstractEquilibriumModel
from .nn._core import AbstractLayer

INIT_MODES = ("zeros", "skip_reg", "layer")


def _resolve_init(init) -> tuple[str, AbstractLayer | None]:
    if init is None:
        return "skip_reg", None
    if isinstance(init, str):
        if init != "zeros":
            raise ValueError(
                "init: expected 'zeros', None (skip-reg: z0 = f(0, x)) or a layer, "
                f"got {init!r}"
            )
        return "zeros", None
    if isinstance(init, AbstractLayer):
        return "layer", init
    raise TypeError(
        f"init: expected 'zeros', None or a jaxdeq.nn layer, got {type(init).__name__}"
    )


class DeepEquilibriumNetwork(AbstractEquilibriumModel):
    """Deep equilibrium network (Bai et al., 2019; Pal et al., 2022): the output is
    the fixed point `z* = f(z*, x)` of the cell `f`, found by an optimistix
    root-finder or fixed-point solver or a diffrax steady-state solve, and
    differentiated implicitly.

    **Arguments:**

    - `model`: the cell, a layer applied to the tuple `(z, x)`, e.g.
        `nn.Parallel(jnp.add, nn.Dense(d, d), nn.Dense(d, d))` for `W1 z + W2 x`.
    - `solver`: any optimistix root-finder (`optx.Newton`, `optx.Chord`, ...) or
        fixed-point solver (`optx.FixedPointIteration`, `jaxdeq.Anderson`,
        `jaxdeq.Broyden`), or any diffrax solver (`diffrax.Tsit5()`, ...).
    - `init`: `"zeros"` (`z0 = 0` shaped like `x`), `None` (skip-reg: `z0 = f(0, x)`),
        or a layer (Skip DEQ: `z0 = init(x)`; the state may then differ in shape
        from `x`).
    - `jacobian_regularization`: `None`, `"forward"`, `"reverse"` or
        `"finite_difference"`: the Hutchinson estimate of `||J_f(z*)||_F^2 / numel`
        by a JVP, a VJP or central differences, in `solution.jacobian_loss`, with a
        fresh Gaussian probe at every call.
    - `problem_type`: `"steady_state"`, or `"ode"` for a neural ODE
        `dz/dt = f(z, x) - z` on `[0, 1]` (needs a diffrax solver), returning `z(1)`.
    - `adjoint`: the gradient mode: `jaxdeq.ImplicitAdjoint()` (default),
        `jaxdeq.PhantomGradient`, `jaxdeq.NeumannGradient`,
        `jaxdeq.ShineGradient` (with `jaxdeq.Broyden`),
        `jaxdeq.ReversibleAdjoint` (with `jaxdeq.Reversible`),
        `jaxdeq.OneStepGradient` or `jaxdeq.UnrolledAdjoint`.
    - `max_steps`: the step cap of the solve (static; `apply(..., max_steps=n)` lowers
        it per call without recompiling).
    - `fixed_depth`: if `> 0`, apply `f` exactly that many times from `z0` with plain
        backpropagation instead of solving (pretraining); `nfe == fixed_depth`.
    - `joint_solve`: `False` (default) solves each sample as its own problem (a
        `vmap` over the batch: per-sample convergence, nfe and residual; the batch
        runs until its slowest sample stops, finished samples frozen). `True` solves
        the whole batch as one problem, for cells that couple samples (BatchNorm).
    - `trace`: record per-iteration residual norms in `solution.trace`.
    - `compute_dtype`: mixed precision, e.g. `jnp.bfloat16`: the cell computes in
        this dtype (parameters, state and input cast on the way in, the output cast
        back), while the solver's state, residuals and norms stay in the state's
        dtype (float32 with float32 inputs). `None` (default) computes in the
        state's dtype.
    - `sample_states`: store that many iterates of the solve, evenly spaced over
        `max_steps`, in `solution.states`, each with a one-step gradient, for
        [`jaxdeq.fixed_point_correction_loss`][] (optimistix-style solvers only).
    - `throw`: raise at run time (under `jit` too) when a sample's solve does not
        succeed, with the outcome's message (optimistix's convention; an
        `equinox` run-time error: under `jax.jit` it surfaces as a
        `jax.errors.JaxRuntimeError` carrying the message, under
        `equinox.filter_jit` as the message alone). `False` (default): read the
        outcome in `solution.result`.
    - `fallback`: `None`, or a second optimistix solver (e.g.
        `optx.FixedPointIteration(rtol, atol)` or `jaxdeq.Broyden(rtol, atol)`)
        that continues, from the lowest-residual iterate, each sample whose solve
        by `solver` did not succeed (diverged, went non-finite or ran out of
        steps), inside the same compiled solve, with its own budget of
        `max_steps` (or the per-call one) steps. `solution.fallback` says which
        samples fell back; their `nfe`, `steps` and `result` count both solves;
        the others are bit-identical to a solve without fallback. With
        optimistix-style primary solvers; not with `sample_states`, `anytime`,
        `fixed_depth > 0`, or gradient modes that read the solver's state
        (`ShineGradient`, `ReversibleAdjoint`).
    - `**solver_options`: for diffrax solvers `rtol`, `atol` (steady-state test and
        the default `PIDController`; default: the user's `stepsize_controller`'s,
        else `1e-4`/`1e-6`), `dt0`, `stepsize_controller`; for optimistix solvers
        `options` (a dict; the keys the solver reads, checked for jaxdeq's and
        optimistix's solvers; their tolerances live on the solver). Unknown options
        and misspelt keywords are a `TypeError` naming the keyword meant.

    **Inputs:** `x`, batch-first.

    **Returns:** `(z*, st)`, or `(z*, st, solution)` with
    `apply(..., return_solution=True)`: a [`jaxdeq.DeepEquilibriumSolution`][].

    **Parameters:** `{"model": ..., "init": ...}` (`"init"` only with an init layer).

    **States:** `{"model": ..., "init": ..., "key": ...}`, nothing shaped by the
    batch: the key is advanced by every `apply` (fresh Jacobian-regularization
    probes).

    **Option pairs.** `fixed_depth > 0` unrolls every problem type, the neural ODE
    included, and ignores `adjoint` (plain backpropagation; the adjoint applies once
    `fixed_depth` is 0); a per-call `max_steps` or `trace=True` with it is an
    error, as is an `adjoint` with `problem_type="ode"` (diffrax differentiates
    the ODE). A diffrax solver's per-call `max_steps` must be a Python int: its
    step cap is static, so each budget compiles once.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, diffrax, jaxdeq
    >>> from jaxdeq import nn
    >>> model = jaxdeq.DeepEquilibriumNetwork(
    ...     nn.Parallel(jnp.add, nn.Dense(2, 2, use_bias=False),
    ...                 nn.Dense(2, 2, use_bias=False)),
    ...     diffrax.Tsit5())
    >>> ps, st = model.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> y, st, solution = model.apply(ps, st, jnp.ones((1, 2)), return_solution=True)
    >>> y.shape, solution.result.tolist()
    ((1, 2), [0])

    ```
    """

    model: AbstractLayer
    init_layer: AbstractLayer | None
    init_mode: Literal["zeros", "skip_reg", "layer"]
    config: EquilibriumConfig

    def __init__(
        self,
        model: AbstractLayer,
        solver: Any,
        *,
        init: Literal["zeros"] | AbstractLayer | None = "zeros",
        jacobian_regularization: str | None = None,
        problem_type: str = "steady_state",
        adjoint=None,
        max_steps: int = 32,
        fixed_depth: int = 0,
        joint_solve: bool = False,
        trace: bool = False,
        sample_states: int = 0,
        compute_dtype: Any = None,
        throw: bool = False,
        fallback: Any = None,
        **solver_options,
    ):
        if not isinstance(model, AbstractLayer):
            raise TypeError(
                "model: expected a jaxdeq.nn layer (wrap Flax/Equinox modules with "
                f"nn.from_flax / nn.from_equinox), got {type(model).__name__}"
            )
        self.model = model
        self.init_mode, self.init_layer = _resolve_init(init)
        self.config = EquilibriumConfig(
            solver,
            jacobian_regularization=jacobian_regularization,
            problem_type=problem_type,
            adjoint=adjoint,
            max_steps=max_steps,
            fixed_depth=fixed_depth,
            joint_solve=joint_solve,
            trace=trace,
            sample_states=sample_states,
            compute_dtype=compute_dtype,
            throw=throw,
            fallback=fallback,
            **solver_options,
        )

    cell_name: ClassVar[str] = "model"

    def _init_layers(self, key, x):
        model_key, init_key = jax.random.split(key)
        ps, st = {}, {}
        if self.init_mode == "layer":
            ps["init"], st["init"] = self.init_layer.init(init_key, x)
            z = self.init_layer.apply(ps["init"], st["init"], x)[0]
        else:
            z = jtu.tree_map(jnp.zeros_like, x)
        ps["model"], st["model"] = self.model.init(model_key, (z, x))
        return ps, st

    def _cell_part(self, tree):
        return tree["model"]

    def _with_cell_state(self, st, cell_st):
        return dict(st, model=cell_st)

    def _prepare(self, cell_ps, cell_st):
        return self.model.prepare(cell_ps, cell_st)

    def _cell(self, cell_ps, cell_st, z, x):
        return self.model.apply(cell_ps, cell_st, (z, x))

    def _initial_state(self, ps, st, cell_ps, cell_st, x):
        if self.init_mode == "layer":
            u0, st_init = self.init_layer.apply(ps["init"], st["init"], x)
            return u0, u0, st_init
        zeros = jtu.tree_map(jnp.zeros_like, x)
        if self.init_mode == "zeros":
            return zeros, zeros, None
        u0, _ = self._cell(cell_ps, cell_st, zeros, x)
        return u0, u0, None

    def _output(self, z):
        return z


def SkipDeepEquilibriumNetwork(
    model: AbstractLayer, init: AbstractLayer | None, solver: Any, **kwargs
) -> DeepEquilibriumNetwork:
    """Skip DEQ (Pal et al., 2022): a [`jaxdeq.DeepEquilibriumNetwork`][] whose
    initial state is predicted by the layer `init` (`z0 = init(x)`, trained through
    skip losses on `solution.u0`); with `init=None` it is the skip-reg variant,
    `z0 = f(0, x)`. Keyword arguments are those of `DeepEquilibriumNetwork`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optimistix as optx, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Parallel(jnp.add, nn.Dense(3, 3, activation=jnp.tanh), nn.Dense(3, 3))
    >>> model = jaxdeq.SkipDeepEquilibriumNetwork(
    ...     cell, nn.Dense(3, 3), optx.Newton(rtol=1e-5, atol=1e-5))
    >>> ps, st = model.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> sorted(ps)
    ['init', 'model']

    ```
    """
    return DeepEquilibriumNetwork(model, solver, init=init, **kwargs)
