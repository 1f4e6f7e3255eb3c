"""Backends: one forward solve for optimistix solvers and for diffrax ODE solvers.

A backend takes the cell `f(z, args)` and the loop to run in (chosen by the gradient
mode, see `_adjoint.py`) and returns a `Forward`: the state it reached and its
per-sample outcome. It knows nothing of models or layers, and nothing of gradients.
What a backend can do beyond a plain solve is declared on its class
(`AbstractBackend`'s class variables), not discovered by the engine.

The optimistix backend runs its own lean loop around the solver's
`init`/`step`/`terminate`/`postprocess` (the interface of `optx.fixed_point`), which
lets it keep the lowest-residual iterate, count steps against a traced budget and
record a residual trace, for any optimistix root-finder or fixed-point solver.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._misc import (
    accumulation_dtype,
    sample_sq_norm,
    tree_all_finite,
    tree_sub,
    tree_where,
)
from ._solution import RESULTS, first_outcome

Cell = Callable[[PyTree[Array], PyTree], PyTree[Array]]
# loop(cond_fun, body_fun, init_val, *, max_steps): given by the gradient mode.
Loop = Callable[..., Any]
OPTIMISTIX_SOLVERS = (optx.AbstractRootFinder, optx.AbstractFixedPointSolver)


class Forward(eqx.Module):
    """The outcome of a forward solve (no gradients attached)."""

    z: PyTree[Array]
    nfe: Int[Array, "*batch"]
    result: Int[Array, "*batch"]
    trace: Array | None
    original: Any
    # Iterates sampled along the solve (`samples=k`): leaves `(k, *z.shape)`.
    samples: PyTree[Array] | None = None
    # The step at which the returned iterate was evaluated, when it is the
    # lowest-residual one (optimistix backend; per sample in a joint solve).
    best_step: Int[Array, "*batch"] | None = None
    # The solver's final state, when the gradient mode asks for it
    # (`AbstractAdjoint.needs_solver_state`): e.g. Broyden's inverse Jacobian.
    solver_state: PyTree | None = None


class AbstractBackend(eqx.Module):
    """Runs a cell to a fixed point from `z0`.

    Class variables declare what a backend can do beyond the solve:

    - `traced_budget`: a per-call step budget may be a traced integer array (else a
        Python int, which is static).
    - `residual_trace`: records per-iteration residual norms (`trace=True`).
    - `sampled_iterates`: returns iterates sampled along the solve (`samples=k`).
    - `neural_ode`: can also integrate `dz/dt = f(z, x) - z` over `[0, 1]`
        (`integrate`, for `problem_type="ode"`).
    """

    traced_budget: ClassVar[bool]
    residual_trace: ClassVar[bool]
    sampled_iterates: ClassVar[bool]
    neural_ode: ClassVar[bool]

    @abc.abstractmethod
    def solve(
        self,
        f: Cell,
        z0: PyTree[Array],
        args: PyTree,
        budget: Any,
        loop: Loop,
        *,
        max_steps: int,
        batched: bool,
        trace: bool,
        samples: int,
        solver_state: bool = False,
    ) -> Forward:
        """Solve for a fixed point of `f(., args)` from `z0`, at most
        `min(budget, max_steps)` steps, inside `loop`; with `solver_state`, also
        return the solver's final state."""


class _LoopState(eqx.Module):
    """The carry of the optimistix backend's loop."""

    y: PyTree[Array]
    step: Int[Array, ""]
    solver_state: PyTree  # the dynamic (array) part of the solver's state
    best_z: PyTree[Array]  # the evaluated iterate with the lowest residual so far
    best_sq: Float[Array, "*batch"]  # its squared residual norm
    best_step: Int[Array, "*batch"]  # the step that evaluated it
    done: Bool[Array, ""]
    result: optx.RESULTS
    residual_trace: Float[Array, "..."] | None
    sampled: PyTree[Array]


class OptimistixBackend(AbstractBackend):
    """Runs any optimistix root-finder or fixed-point solver to a fixed point."""

    solver: optx.AbstractRootFinder | optx.AbstractFixedPointSolver
    options: tuple[tuple[str, Any], ...] = ()

    traced_budget: ClassVar[bool] = True
    residual_trace: ClassVar[bool] = True
    sampled_iterates: ClassVar[bool] = True
    neural_ode: ClassVar[bool] = False

    def solve(
        self,
        f,
        z0,
        args,
        budget,
        loop,
        *,
        max_steps,
        batched,
        trace,
        samples,
        solver_state=False,
    ) -> Forward:
        """With `samples=k > 0`, also returns `k` iterates at the evenly spaced steps
        `ceil(j * max_steps / k)`, `j = 1..k` (the last iterate where the solve
        stopped earlier), for fixed-point correction losses."""
        solver = self.solver
        options = dict(self.options)
        tags = frozenset()
        is_root = isinstance(solver, optx.AbstractRootFinder)

        def fn(y, fn_args):
            fy = f(y, fn_args)
            r = tree_sub(fy, y)
            # aux describes the evaluation point: the loop keeps the best one seen.
            return (r if is_root else fy), (y, sample_sq_norm(r, batched=batched))

        f_struct, aux_struct = jax.eval_shape(fn, z0, args)
        state = solver.init(fn, z0, args, options, f_struct, aux_struct, tags)
        dynamic_state, static_state = eqx.partition(state, eqx.is_array)
        done, result = solver.terminate(fn, z0, args, options, state, tags)
        best_sq = jnp.full(aux_struct[1].shape, jnp.inf, aux_struct[1].dtype)
        limit = max_steps if budget is None else jnp.minimum(budget, max_steps)
        sample_steps = jnp.asarray(
            np.ceil(np.arange(1, samples + 1) * (max_steps / max(samples, 1))),
            jnp.int32,
        )
        init = _LoopState(
            y=z0,
            step=jnp.array(0, jnp.int32),
            solver_state=dynamic_state,
            best_z=z0,
            best_sq=best_sq,
            best_step=jnp.zeros(best_sq.shape, jnp.int32),
            done=done,
            result=result,
            residual_trace=(
                jnp.full((max_steps, *best_sq.shape), jnp.inf, best_sq.dtype)
                if trace
                else None
            ),
            sampled=jtu.tree_map(
                lambda leaf: jnp.zeros((samples, *leaf.shape), leaf.dtype), z0
            ),
        )

        def cond_fun(c: _LoopState):
            return ~c.done & (c.result == optx.RESULTS.successful) & (c.step < limit)

        def body_fun(c: _LoopState) -> _LoopState:
            state = eqx.combine(c.solver_state, static_state)
            y, state, (y_eval, sq) = solver.step(fn, c.y, args, options, state, tags)
            done, result = solver.terminate(fn, y, args, options, state, tags)
            result = optx.RESULTS.where(
                tree_all_finite(y), result, optx.RESULTS.nonfinite
            )
            better = sq < c.best_sq  # False for NaN: a non-finite iterate is never best
            residual_trace = c.residual_trace
            if residual_trace is not None:
                residual_trace = residual_trace.at[c.step].set(jnp.sqrt(sq))
            sampled = c.sampled
            if samples:
                # Slot j holds the iterate of step min(sample_steps[j], last step).
                pending = sample_steps >= c.step + 1
                sampled = jtu.tree_map(
                    lambda buf, leaf: jnp.where(
                        pending.reshape((-1,) + (1,) * leaf.ndim), leaf[None], buf
                    ),
                    sampled,
                    y,
                )
            return _LoopState(
                y=y,
                step=c.step + 1,
                solver_state=eqx.partition(state, eqx.is_array)[0],
                best_z=tree_where(better, y_eval, c.best_z, batched=batched),
                best_sq=jnp.where(better, sq, c.best_sq),
                best_step=jnp.where(better, c.step, c.best_step),
                done=done,
                result=result,
                residual_trace=residual_trace,
                sampled=sampled,
            )

        c = loop(cond_fun, body_fun, init, max_steps=max_steps)
        state = eqx.combine(c.solver_state, static_state)
        converged = c.done & (c.result == optx.RESULTS.successful)
        ran_out = ~c.done & (c.result == optx.RESULTS.successful)
        y, _, _ = solver.postprocess(
            fn, c.y, (c.best_z, c.best_sq), args, options, state, tags, c.result
        )
        z = tree_where(converged, y, c.best_z)
        code = first_outcome(
            [
                (converged, RESULTS.successful),
                (ran_out, RESULTS.max_steps_reached),
                (c.result == optx.RESULTS.nonfinite, RESULTS.nonfinite),
            ],
            RESULTS.diverged,
        )
        result = optx.RESULTS.where(
            ran_out, optx.RESULTS.nonlinear_max_steps_reached, c.result
        )
        original = optx.Solution(
            value=z, result=result, aux=None, stats={"num_steps": c.step}, state=None
        )
        nfe = c.step
        residual_trace = c.residual_trace
        if batched:
            batch = c.best_sq.shape
            nfe = jnp.broadcast_to(nfe, batch)
            code = jnp.broadcast_to(code, batch)
            if residual_trace is not None:
                residual_trace = residual_trace.T
        sampled = c.sampled if samples else None
        return Forward(
            z,
            nfe,
            code,
            residual_trace,
            original,
            sampled,
            best_step=c.best_step,
            solver_state=state if solver_state else None,
        )


def _diffrax_outcome(sol: diffrax.Solution, z0: PyTree[Array], reached) -> Forward:
    """The state at the last saved time and its outcome code; a non-finite state is
    replaced by `z0` (reported as `nonfinite`), never returned."""
    # (diffrax promotes the state to its time dtype, float64 under x64)
    z = jtu.tree_map(lambda leaf, ref: leaf[0].astype(ref.dtype), sol.ys, z0)
    finite = tree_all_finite(z)
    code = first_outcome(
        [
            (~finite, RESULTS.nonfinite),
            (reached, RESULTS.successful),
            (
                sol.result == diffrax.RESULTS.max_steps_reached,
                RESULTS.max_steps_reached,
            ),
        ],
        RESULTS.diverged,
    )
    z = tree_where(finite, z, z0)
    return Forward(z, sol.stats["num_steps"].astype(jnp.int32), code, None, sol)


class DiffraxBackend(AbstractBackend):
    """Integrates `dz/dt = f(z, x) - z` with a diffrax solver until a steady state
    (`diffrax.steady_state_event`), or over `[0, 1]` for a neural ODE."""

    solver: diffrax.AbstractSolver
    rtol: float = 1e-4
    atol: float = 1e-6
    dt0: float | None = None
    stepsize_controller: diffrax.AbstractStepSizeController | None = None

    # diffrax's step cap is static; its loop is its own (differentiated by diffrax).
    traced_budget: ClassVar[bool] = False
    residual_trace: ClassVar[bool] = False
    sampled_iterates: ClassVar[bool] = False
    neural_ode: ClassVar[bool] = True

    def _controller(self):
        if self.stepsize_controller is not None:
            return self.stepsize_controller
        if isinstance(self.solver, diffrax.AbstractAdaptiveSolver):
            return diffrax.PIDController(rtol=self.rtol, atol=self.atol)
        return diffrax.ConstantStepSize()

    def _dt0(self):
        if self.dt0 is None and not isinstance(
            self._controller(), diffrax.PIDController
        ):
            raise ValueError(
                f"dt0: the diffrax solver {type(self.solver).__name__} with a "
                "constant step size needs an initial step `dt0=...` in the model's "
                "solver options"
            )
        return self.dt0

    def _times(self, z0, t1) -> dict[str, Any]:
        """`t0`, `t1`, `dt0` in the state's (floating, at least float32) dtype, so
        diffrax does not promote a float32 state to float64 under x64."""
        dtype = accumulation_dtype(jtu.tree_leaves(z0)[0].dtype)
        dt0 = self._dt0()
        return {
            "t0": jnp.zeros((), dtype),
            "t1": jnp.asarray(t1, dtype),
            "dt0": None if dt0 is None else jnp.asarray(dt0, dtype),
        }

    def _diffeqsolve(self, f, z0, args, t1, max_steps, event=None):
        """`dz/dt = f(z, args) - z` from `z(0) = z0` to `t1` (or the event), saving
        the last state; failures are reported in the solution, not raised."""
        return diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, z, a: tree_sub(f(z, a), z)),
            self.solver,
            **self._times(z0, t1),
            y0=z0,
            args=args,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=self._controller(),
            event=event,
            max_steps=max_steps,
            throw=False,
        )

    def solve(
        self,
        f,
        z0,
        args,
        budget,
        loop,
        *,
        max_steps,
        batched,
        trace,
        samples,
        solver_state=False,
    ) -> Forward:
        del loop, trace, batched, samples, solver_state  # checked at construction
        if budget is not None:
            if not isinstance(budget, int):
                raise TypeError(
                    "max_steps: a diffrax solver needs a Python int per-call budget "
                    "(diffrax's step cap is static); got a traced array"
                )
            max_steps = min(budget, max_steps)
        event = diffrax.Event(diffrax.steady_state_event(self.rtol, self.atol))
        sol = self._diffeqsolve(f, z0, args, jnp.inf, max_steps, event=event)
        return _diffrax_outcome(sol, z0, diffrax.is_event(sol.result))

    def integrate(self, f: Cell, z0: PyTree[Array], args: PyTree, *, max_steps: int):
        """The neural ODE: `z(1)` of `dz/dt = f(z, x) - z`, `z(0) = z0`,
        differentiated by diffrax's own adjoint."""
        sol = self._diffeqsolve(f, z0, args, 1.0, max_steps)
        out = _diffrax_outcome(sol, z0, diffrax.is_successful(sol.result))
        return out.z, out


_DIFFRAX_OPTIONS = ("rtol", "atol", "dt0", "stepsize_controller")


def make_backend(solver: Any, solver_options: dict[str, Any]):
    """Pick the backend for `solver`, validating `solver_options` against it."""
    if isinstance(solver, str):
        raise TypeError(
            f"solver: expected an optimistix root-finder or fixed-point solver (e.g. "
            f"`jaxdeq.Anderson(rtol=1e-4, atol=1e-6)`) or a diffrax solver (e.g. "
            f"`diffrax.Tsit5()`), got the string {solver!r}"
        )
    if isinstance(solver, type):
        raise TypeError(
            f"solver: expected a solver instance, got the class {solver.__name__}; "
            f"call it, e.g. `{solver.__name__}(...)`"
        )
    if isinstance(solver, OPTIMISTIX_SOLVERS):
        unknown = set(solver_options) - {"options"}
        if unknown:
            raise TypeError(
                f"solver options {sorted(unknown)} are not accepted with the "
                f"optimistix solver {type(solver).__name__}: its tolerances are set "
                "on the solver itself; the only option is `options=` (a dict passed "
                "to the solver's init/step)"
            )
        options = tuple(sorted(dict(solver_options.get("options", {})).items()))
        return OptimistixBackend(solver, options)
    if isinstance(solver, diffrax.AbstractSolver):
        unknown = set(solver_options) - set(_DIFFRAX_OPTIONS)
        if unknown:
            raise TypeError(
                f"solver options {sorted(unknown)} are not accepted with the diffrax "
                f"solver {type(solver).__name__}; expected some of {_DIFFRAX_OPTIONS}"
            )
        return DiffraxBackend(solver, **solver_options)
    raise TypeError(
        "solver: expected an optimistix root-finder or fixed-point solver or a "
        f"diffrax solver, got {type(solver).__name__}"
    )
