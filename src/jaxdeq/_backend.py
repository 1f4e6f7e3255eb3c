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
import difflib
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
from ._solver import Anderson, Broyden, Reversible

Cell = Callable[[PyTree[Array], PyTree], PyTree[Array]]
# loop(cond_fun, body_fun, init_val, *, max_steps): given by the gradient mode.
Loop = Callable[..., Any]
OPTIMISTIX_SOLVERS = (optx.AbstractRootFinder, optx.AbstractFixedPointSolver)
# Solvers whose `terminate` and `postprocess` read only `state.progress`: once a
# sample has stopped, the rest of its state (e.g. Anderson's history) is never read
# again, so a per-sample solve need not freeze it.
_PROGRESS_ONLY = (Anderson, Broyden, Reversible)


class Forward(eqx.Module):
    """The outcome of a forward solve (no gradients attached)."""

    z: PyTree[Array]
    nfe: Int[Array, "*batch"]
    result: Int[Array, "*batch"]
    trace: Array | None
    original: Any
    # Iterates sampled along the solve (`samples=k`): leaves `(k, *z.shape)`.
    samples: PyTree[Array] | None = None
    # Solver (or ODE) steps; `nfe` counts cell evaluations.
    steps: Int[Array, "*batch"] | None = None
    # The step at which the returned iterate was evaluated, when it is the
    # lowest-residual one (optimistix backend; per sample in a joint solve).
    best_step: Int[Array, "*batch"] | None = None
    # The solver's final state, when the gradient mode asks for it
    # (`AbstractAdjoint.needs_solver_state`): e.g. Broyden's inverse Jacobian.
    solver_state: PyTree | None = None
    # What the solve would have returned at each of several budgets (`anytime=`).
    anytime: "AnytimeForward | None" = None
    # Whether the sample's solve was continued by the fallback solver.
    fallback: Bool[Array, "*batch"] | None = None


class AnytimeForward(eqx.Module):
    """What one solve would have returned had it been given each budget `b_j`:
    leaves `(k, *z.shape)` and `(k, *batch)` (equal to separate solves with those
    budgets: the solver's iterates do not depend on its budget)."""

    z: PyTree[Array]
    nfe: Int[Array, "..."]
    steps: Int[Array, "..."]
    result: Int[Array, "..."]


class AbstractBackend(eqx.Module):
    """Runs a cell to a fixed point from `z0`.

    Class variables declare what a backend can do beyond the solve:

    - `traced_budget`: a per-call step budget may be a traced integer array (else a
        Python int, which is static).
    - `residual_trace`: records per-iteration residual norms (`trace=True`).
    - `sampled_iterates`: returns iterates sampled along the solve (`samples=k`).
    - `neural_ode`: can also integrate `dz/dt = f(z, x) - z` over `[0, 1]`
        (`integrate`, for `problem_type="ode"`).
    - `anytime_budgets`: returns what the solve would have returned at several
        budgets (`anytime=(b_1, ..., b_k)`), from one solve.
    - `fallback_solvers`: can continue a failed solve with a second solver
        (`jaxdeq`'s fallback; see `_fallback.py`).
    """

    traced_budget: ClassVar[bool]
    residual_trace: ClassVar[bool]
    sampled_iterates: ClassVar[bool]
    neural_ode: ClassVar[bool]
    anytime_budgets: ClassVar[bool] = False
    fallback_solvers: ClassVar[bool] = False

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
        anytime: tuple[int, ...] = (),
        per_sample: bool = False,
    ) -> Forward:
        """Solve for a fixed point of `f(., args)` from `z0`, at most
        `min(budget, max_steps)` steps, inside `loop`; with `solver_state`, also
        return the solver's final state; with `anytime`, what the solve would
        have returned at each of those budgets. `per_sample`: this call solves one
        sample of a per-sample solve (`jax.vmap` over the batch) whose loop is not
        differentiated, so a backend may batch its loop itself."""


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
    # (anytime=): the returned state and outcome code at each budget reached so far
    anytime_z: PyTree[Array] | None = None
    anytime_code: Int[Array, "k ..."] | None = None


class OptimistixBackend(AbstractBackend):
    """Runs any optimistix root-finder or fixed-point solver to a fixed point."""

    solver: optx.AbstractRootFinder | optx.AbstractFixedPointSolver
    options: tuple[tuple[str, Any], ...] = ()

    traced_budget: ClassVar[bool] = True
    residual_trace: ClassVar[bool] = True
    sampled_iterates: ClassVar[bool] = True
    neural_ode: ClassVar[bool] = False
    anytime_budgets: ClassVar[bool] = True
    fallback_solvers: ClassVar[bool] = True

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
        anytime=(),
        per_sample=False,
    ) -> Forward:
        """With `samples=k > 0`, also returns `k` iterates at the evenly spaced steps
        `ceil(j * max_steps / k)`, `j = 1..k` (the last iterate where the solve
        stopped earlier), for fixed-point correction losses. With
        `anytime=(b_1, ..., b_k)`, also what the solve would have returned with
        each budget `b_j`: the returned state and outcome are computed after every
        step (`finish`) and kept at the steps `b_j`.

        With `per_sample`, the loop gets its own batching rule
        (`jax.custom_batching.custom_vmap`): under `jax.vmap` it runs once for the
        batch, while any sample is still running, and its body (the per-sample body,
        vmapped) freezes the samples that have stopped itself. `vmap` of the loop
        would instead select every leaf of the carry each iteration; here a stopped
        sample's `y`, outcome and best iterate are frozen, and of the solver's
        state, for jaxdeq's solvers, only the part that `terminate` and
        `postprocess` read (`state.progress`): the same per-sample semantics, at
        the cost of a whole-batch solve."""
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
        limit = jnp.asarray(
            max_steps if budget is None else jnp.minimum(budget, max_steps), jnp.int32
        )
        sample_steps = jnp.asarray(
            np.ceil(np.arange(1, samples + 1) * (max_steps / max(samples, 1))),
            jnp.int32,
        )
        budgets = jnp.asarray(anytime, jnp.int32)

        def finish(c: _LoopState):
            """The state and outcome code the solve returns if it stops at `c`."""
            state = eqx.combine(c.solver_state, static_state)
            converged = c.done & (c.result == optx.RESULTS.successful)
            ran_out = ~c.done & (c.result == optx.RESULTS.successful)
            y, _, _ = solver.postprocess(
                fn, c.y, (c.best_z, c.best_sq), args, options, state, tags, c.result
            )
            # The solver's answer on success (e.g. the last proposal), unless it
            # is not finite: then the evaluated iterate at which it converged.
            z = tree_where(
                converged & tree_all_finite(y, batched=batched),
                y,
                c.best_z,
                batched=batched,
            )
            code = first_outcome(
                [
                    (converged, RESULTS.successful),
                    (ran_out, RESULTS.max_steps_reached),
                    (c.result == optx.RESULTS.nonfinite, RESULTS.nonfinite),
                ],
                RESULTS.diverged,
            )
            return z, code, ran_out, state

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
            anytime_z=(
                jtu.tree_map(
                    lambda leaf: jnp.zeros((len(anytime), *leaf.shape), leaf.dtype), z0
                )
                if anytime
                else None
            ),
            anytime_code=(jnp.zeros((len(anytime),), jnp.int32) if anytime else None),
        )

        def running(c: _LoopState, limit) -> Bool[Array, ""]:
            return ~c.done & (c.result == optx.RESULTS.successful) & (c.step < limit)

        def body_fun(c: _LoopState, args, limit) -> _LoopState:
            # A per-sample body also runs for samples that have stopped (when it is
            # batched by `batched_loop`); otherwise the loop only runs it while
            # `running`.
            active = running(c, limit) if per_sample else jnp.array(True)
            state = eqx.combine(c.solver_state, static_state)
            y, state, (y_eval, sq) = solver.step(fn, c.y, args, options, state, tags)
            done, result = solver.terminate(fn, y, args, options, state, tags)
            # A non-finite evaluation, or a non-finite proposal (which can't be
            # evaluated), ends the solve as `nonfinite`; a solve that stopped at a
            # finite evaluation keeps its own verdict.
            result = optx.RESULTS.where(
                jnp.all(jnp.isfinite(sq)) & (done | tree_all_finite(y)),
                result,
                optx.RESULTS.nonfinite,
            )
            # False for NaN: a non-finite iterate is never best.
            better = (sq < c.best_sq) & active
            residual_trace = c.residual_trace
            if residual_trace is not None:
                hit = (jnp.arange(max_steps, dtype=c.step.dtype) == c.step) & active
                residual_trace = jnp.where(
                    hit.reshape((-1,) + (1,) * sq.ndim),
                    jnp.sqrt(sq)[None],
                    residual_trace,
                )
            sampled = c.sampled
            if samples:
                # Slot j holds the iterate of step min(sample_steps[j], last step).
                pending = (sample_steps >= c.step + 1) & active
                sampled = _put_where(pending, y, sampled)
            new_state = eqx.partition(state, eqx.is_array)[0]
            if per_sample:
                y = tree_where(active, y, c.y)
                done = jnp.where(active, done, c.done)
                result = optx.RESULTS.where(active, result, c.result)
                if isinstance(solver, _PROGRESS_ONLY) and not solver_state:
                    new_state = eqx.tree_at(
                        lambda s: s.progress,
                        new_state,
                        tree_where(active, new_state.progress, c.solver_state.progress),
                    )
                else:
                    new_state = tree_where(active, new_state, c.solver_state)
            new = _LoopState(
                y=y,
                step=c.step + active.astype(jnp.int32),
                solver_state=new_state,
                best_z=tree_where(better, y_eval, c.best_z, batched=batched),
                best_sq=jnp.where(better, sq, c.best_sq),
                best_step=jnp.where(better, c.step, c.best_step),
                done=done,
                result=result,
                residual_trace=residual_trace,
                sampled=sampled,
                anytime_z=c.anytime_z,
                anytime_code=c.anytime_code,
            )
            if anytime:
                # Slot j holds what a solve with budget b_j returns, once b_j steps
                # have run (slots of budgets the solve never reaches: filled below).
                z_now, code_now, _, _ = finish(new)
                hit = (budgets == new.step) & active
                new = eqx.tree_at(
                    lambda n: (n.anytime_z, n.anytime_code),
                    new,
                    (
                        _put_where(hit, z_now, c.anytime_z),
                        jnp.where(hit, code_now, c.anytime_code),
                    ),
                )
            return new

        def run(init, args, limit):
            return loop(
                lambda c: running(c, limit),
                lambda c: body_fun(c, args, limit),
                init,
                max_steps=max_steps,
            )

        def batched_loop(axis_size, in_batched, init, args, limit):
            """`run` on a batch of samples: one loop while any sample runs."""
            init = jtu.tree_map(
                lambda leaf, b: (
                    leaf if b else jnp.broadcast_to(leaf, (axis_size, *leaf.shape))
                ),
                init,
                in_batched[0],
            )
            axes = [jtu.tree_map(lambda b: 0 if b else None, b) for b in in_batched]
            out = loop(
                lambda c: jnp.any(jax.vmap(running, (0, axes[2]))(c, limit)),
                lambda c: jax.vmap(body_fun, (0, axes[1], axes[2]))(c, args, limit),
                init,
                max_steps=max_steps,
            )
            return out, jtu.tree_map(lambda _: True, out)

        if per_sample:
            run = jax.custom_batching.custom_vmap(run)
            run.def_vmap(batched_loop)
        c = run(init, args, limit)
        z, code, ran_out, state = finish(c)
        result = optx.RESULTS.where(
            ran_out, optx.RESULTS.nonlinear_max_steps_reached, c.result
        )
        original = optx.Solution(
            value=z, result=result, aux=None, stats={"num_steps": c.step}, state=None
        )
        size = sum(leaf.size for leaf in jtu.tree_leaves(z0))
        at_init, per_step = _evaluations_per_step(solver, size)
        steps = c.step
        nfe = (at_init + per_step * steps).astype(jnp.int32)
        residual_trace = c.residual_trace
        anytime_out = None
        if anytime:
            # A budget the solve never reached (it stopped earlier) returns what the
            # solve returned.
            reached = budgets <= steps
            any_steps = jnp.minimum(budgets, steps)
            anytime_out = AnytimeForward(
                z=_put_where(~reached, z, c.anytime_z),
                nfe=(at_init + per_step * any_steps).astype(jnp.int32),
                steps=any_steps,
                result=jnp.where(reached, c.anytime_code, code),
            )
        if batched:
            batch = c.best_sq.shape
            nfe = jnp.broadcast_to(nfe, batch)
            steps = jnp.broadcast_to(steps, batch)
            code = jnp.broadcast_to(code, batch)
            if residual_trace is not None:
                residual_trace = residual_trace.T
            if anytime_out is not None:
                anytime_out = eqx.tree_at(
                    lambda a: (a.nfe, a.steps, a.result),
                    anytime_out,
                    tuple(
                        jnp.broadcast_to(v[:, None], (len(anytime), *batch))
                        for v in (
                            anytime_out.nfe,
                            anytime_out.steps,
                            anytime_out.result,
                        )
                    ),
                )
        sampled = c.sampled if samples else None
        return Forward(
            z,
            nfe,
            code,
            residual_trace,
            original,
            sampled,
            steps,
            best_step=c.best_step,
            solver_state=state if solver_state else None,
            anytime=anytime_out,
        )


def _put_where(
    slots: Bool[Array, " k"], tree: PyTree[Array], buffer: PyTree[Array]
) -> PyTree[Array]:
    """`buffer` (leaves `(k, *leaf.shape)`) with `tree` written into the slots where
    `slots` holds."""
    return jtu.tree_map(
        lambda buf, leaf: jnp.where(
            slots.reshape((-1,) + (1,) * leaf.ndim), leaf[None], buf
        ),
        buffer,
        tree,
    )


def _evaluations_per_step(solver, size: int) -> tuple[int, int]:
    """`(at init, per step)` cell evaluations of an optimistix solver: one per step
    for fixed-point solvers; a root-finder's dense Jacobian (optimistix's default
    linear solve materialises it) counts as `size` evaluations, one forward-mode
    column each: every step for `optx.Newton`, once at the start for `optx.Chord`."""
    if isinstance(solver, optx.Newton):
        return 0, 1 + size
    if isinstance(solver, optx.Chord):
        return size, 1
    return 0, 1


def _diffrax_evaluations(solver: diffrax.AbstractSolver, steps: Array) -> Array:
    """Vector-field evaluations of the stages of `steps` attempted steps: an
    explicit Runge-Kutta method evaluates `len(c) + 1` stages per step, one fewer
    when the last stage is reused (FSAL), which costs one evaluation at the start;
    Euler one. Implicit solvers' inner Newton iterations are not counted."""
    start, per_step = 0, 1
    tableau = getattr(solver, "tableau", None)
    if isinstance(tableau, diffrax.ButcherTableau):
        per_step = len(tableau.c) + 1
        if tableau.fsal:
            start, per_step = 1, per_step - 1
    return (start + per_step * steps).astype(jnp.int32)


class DiffraxBackend(AbstractBackend):
    """Integrates `dz/dt = f(z, x) - z` with a diffrax solver until a steady state,
    `norm(f(z) - z) < atol + rtol norm(z)` (`diffrax.steady_state_event`), or over
    `[0, 1]` for a neural ODE.

    The steady-state test uses `rtol`/`atol` when given, else those of the user's
    `stepsize_controller` when it has them, else `1e-4`/`1e-6`; its norm is the
    controller's, else `optx.rms_norm` (diffrax's `PIDController` default). The
    default controller is a `PIDController` with the same tolerances for adaptive
    solvers, a constant step `dt0` otherwise.
    """

    solver: diffrax.AbstractSolver
    rtol: float | None = None
    atol: float | None = None
    dt0: float | None = None
    stepsize_controller: diffrax.AbstractStepSizeController | None = None

    # diffrax's step cap is static; its loop is its own (differentiated by diffrax).
    traced_budget: ClassVar[bool] = False
    residual_trace: ClassVar[bool] = False
    sampled_iterates: ClassVar[bool] = False
    neural_ode: ClassVar[bool] = True

    def __check_init__(self):
        for name in ("rtol", "atol", "dt0"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a real number, got {value!r}")
            if not value >= 0 or (name == "dt0" and value == 0):
                raise ValueError(
                    f"{name}: expected a number {'> 0' if name == 'dt0' else '>= 0'}"
                    f", got {value!r}"
                )
        controller = self.stepsize_controller
        if controller is not None and not isinstance(
            controller, diffrax.AbstractStepSizeController
        ):
            raise TypeError(
                "stepsize_controller: expected a diffrax step-size controller, got "
                f"{type(controller).__name__}"
            )

    def _tolerances(self) -> tuple[float, float, Callable]:
        controller = self.stepsize_controller
        rtol = getattr(controller, "rtol", None) if self.rtol is None else self.rtol
        atol = getattr(controller, "atol", None) if self.atol is None else self.atol
        norm = getattr(controller, "norm", None) or optx.rms_norm
        return (1e-4 if rtol is None else rtol), (1e-6 if atol is None else atol), norm

    def _controller(self):
        if self.stepsize_controller is not None:
            return self.stepsize_controller
        if isinstance(self.solver, diffrax.AbstractAdaptiveSolver):
            rtol, atol, _ = self._tolerances()
            return diffrax.PIDController(rtol=rtol, atol=atol)
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

    def _outcome(self, f, args, sol, z0, reached, evaluations, steady) -> Forward:
        """The state at the last saved time and its outcome code. A failed steady
        state returns the lower-residual of its final and initial states (diffrax
        keeps no best iterate); a non-finite state is never returned. A vector
        field that is non-finite where the solve ended (adaptive solvers reject
        such steps until the budget runs out) is `nonfinite`, not a spent budget."""
        # (diffrax promotes the state to its time dtype, float64 under x64)
        z = jtu.tree_map(lambda leaf, ref: leaf[0].astype(ref.dtype), sol.ys, z0)
        finite = tree_all_finite(z)
        steps = sol.stats["num_steps"].astype(jnp.int32)
        z0_sq = sample_sq_norm(tree_sub(f(z0, args), z0), batched=False)
        if steady:  # (two evaluations, counted)
            z_sq = sample_sq_norm(tree_sub(f(z, args), z), batched=False)
            keep = reached | (finite & (z_sq <= z0_sq))
            end_sq = jnp.where(keep, z_sq, z0_sq)
            nfe = evaluations + 2
        else:  # (one evaluation, counted)
            keep, end_sq, nfe = finite, z0_sq, evaluations + 1
        code = first_outcome(
            [
                (~finite | (~reached & ~jnp.isfinite(end_sq)), RESULTS.nonfinite),
                (reached, RESULTS.successful),
                (
                    sol.result == diffrax.RESULTS.max_steps_reached,
                    RESULTS.max_steps_reached,
                ),
            ],
            RESULTS.diverged,
        )
        z = tree_where(keep, z, z0)
        return Forward(z, nfe, code, None, sol, steps=steps)

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
        anytime=(),
        per_sample=False,
    ) -> Forward:
        del loop, trace, batched, samples, solver_state, anytime, per_sample
        if budget is not None:
            if not isinstance(budget, int):
                raise TypeError(
                    "max_steps: a diffrax solver needs a Python int per-call budget "
                    "(diffrax's step cap is static: each budget compiles once); got "
                    "a traced array"
                )
            max_steps = min(budget, max_steps)
        rtol, atol, norm = self._tolerances()
        event = diffrax.Event(diffrax.steady_state_event(rtol, atol, norm))
        sol = self._diffeqsolve(f, z0, args, jnp.inf, max_steps, event=event)
        steps = sol.stats["num_steps"].astype(jnp.int32)
        # steady_state_event evaluates the vector field at the start and after
        # every step.
        evaluations = _diffrax_evaluations(self.solver, steps) + steps + 1
        return self._outcome(
            f, args, sol, z0, diffrax.is_event(sol.result), evaluations, steady=True
        )

    def integrate(
        self, f: Cell, z0: PyTree[Array], args: PyTree, *, max_steps: int
    ) -> tuple[PyTree[Array], Forward]:
        """The neural ODE: `z(1)` of `dz/dt = f(z, x) - z`, `z(0) = z0`,
        differentiated by diffrax's own adjoint."""
        sol = self._diffeqsolve(f, z0, args, 1.0, max_steps)
        evaluations = _diffrax_evaluations(self.solver, sol.stats["num_steps"])
        out = self._outcome(
            f,
            args,
            sol,
            z0,
            diffrax.is_successful(sol.result),
            evaluations,
            steady=False,
        )
        return out.z, out


_DIFFRAX_OPTIONS = ("rtol", "atol", "dt0", "stepsize_controller")


def _known_options(solver) -> tuple[str, ...] | None:
    """The keys of `options=` that an optimistix solver reads (`None`: a solver
    this table does not know, whose options are passed through unchecked)."""
    if isinstance(solver, (optx.Newton, optx.Chord, optx.Bisection)):
        return ("lower", "upper")
    if type(solver) in (Anderson, Broyden, optx.FixedPointIteration):
        return ()
    return None


def _unexpected_keywords(unknown, allowed, model_keywords, accepted_by) -> TypeError:
    """The error for keywords no model or solver option accepts, with the nearest
    accepted name for each ("did you mean")."""
    candidates = tuple(model_keywords) + tuple(allowed)
    lines = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        lines.append(f"unexpected keyword argument {name!r}{hint}")
    keywords = f"; model keywords: {tuple(model_keywords)}" if model_keywords else ""
    return TypeError(
        "; ".join(lines) + f" (accepted by {accepted_by}: {tuple(allowed)}{keywords})"
    )


def make_backend(
    solver: Any, solver_options: dict[str, Any], model_keywords: tuple[str, ...] = ()
):
    """Pick the backend for `solver`, validating `solver_options` against it (a
    misspelt model keyword lands here too, and is named as such)."""
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
    name = type(solver).__name__
    if isinstance(solver, OPTIMISTIX_SOLVERS):
        unknown = set(solver_options) - {"options"}
        if unknown:
            raise _unexpected_keywords(
                unknown,
                ("options",),
                model_keywords,
                f"the optimistix solver {name} (its tolerances are set on the solver)",
            )
        options = solver_options.get("options", {})
        if not isinstance(options, dict):
            raise TypeError(
                f"options: expected a dict of solver options, got {options!r}"
            )
        known = _known_options(solver)
        if known is not None and set(options) - set(known):
            raise _unexpected_keywords(
                set(options) - set(known), known, (), f"options= of {name}"
            )
        return OptimistixBackend(solver, tuple(sorted(options.items())))
    if isinstance(solver, diffrax.AbstractSolver):
        unknown = set(solver_options) - set(_DIFFRAX_OPTIONS)
        if unknown:
            raise _unexpected_keywords(
                unknown, _DIFFRAX_OPTIONS, model_keywords, f"the diffrax solver {name}"
            )
        return DiffraxBackend(solver, **solver_options)
    raise TypeError(
        "solver: expected an optimistix root-finder or fixed-point solver or a "
        f"diffrax solver, got {name}"
    )
