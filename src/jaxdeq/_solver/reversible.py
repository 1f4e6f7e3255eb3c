from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, PyTree, Scalar

from .._misc import tree_all_finite, tree_where
from ._common import (
    Aux,
    Progress,
    Termination,
    Y,
    check_common_options,
    scaled_residual_size,
)


class ReversibleState(eqx.Module):
    """The state of [`jaxdeq.Reversible`][]: the two latest iterates of the
    two-step recurrence, which determine every earlier one."""

    previous: PyTree[Array]  # w_{k-1}
    current: PyTree[Array]  # w_k, the iterate the next step evaluates f at
    relaxation: Scalar
    progress: Progress


class Reversible(optx.AbstractFixedPointSolver[Y, Aux, ReversibleState]):
    """The algebraically reversible fixed-point iteration of reversible deep
    equilibrium models (McCallum, Arora & Foster, 2025), for fixed points
    `y = f(y)`.

    The paper's coupled iteration from `y_0 = z_0`,

    `y_{n+1} = (1 - β) y_n + β f(z_n)`,  `z_{n+1} = (1 - β) z_n + β f(y_{n+1})`,

    is run as the two-step recurrence `w_{k+1} = (1 - β) w_{k-1} + β f(w_k)` on the
    interleaved sequence `w = (z_0, y_1, z_1, y_2, ...)` (`w_{-1} = w_0 = z_0`): one
    evaluation of `f` per step, so `nfe` counts evaluations. Each step is inverted
    exactly by `w_{k-1} = (w_{k+1} - β f(w_k)) / (1 - β)`, so the whole trajectory
    is determined by its last two iterates: [`jaxdeq.ReversibleAdjoint`][]
    reconstructs it backwards and differentiates it exactly with memory independent
    of the number of steps. With any other gradient mode it is a plain (relaxed)
    fixed-point solver.

    **Termination** is measured at each evaluated iterate, as for
    [`jaxdeq.Anderson`][]: `norm((f(w) - w) / (atol + rtol |f(w)|)) < 1`
    (`termination="elementwise"`), or `norm(f(w) - w) < atol + rtol norm(f(w))`
    (`"normwise"`).

    **Returned value.** On success, the last iterate (one step past the evaluated
    one that met the tolerance, as in the paper); when `max_steps` runs out or the
    solve diverges, the models return the lowest-residual evaluated iterate.

    **Round-off.** The forward map contracts volume by `(1 - β)^2` per pair of steps
    whatever `f` is, so its inverse expands it: round-off in a reconstructed iterate
    grows with the number of steps reversed, fastest for `β` near 1 and strongly
    contracting `f`. The gradient stays accurate while the cotangents decay as fast
    as the reconstruction errors grow; `jaxdeq.ReversibleAdjoint(callback=...)`
    reports how well the initial state was recovered.

    !!! Example

        ```python
        import jax.numpy as jnp
        import optimistix as optx
        import jaxdeq

        def f(z, x):
            return jnp.tanh(0.5 * z + x)

        x = jnp.linspace(-1.0, 1.0, 8)
        solver = jaxdeq.Reversible(rtol=1e-6, atol=1e-6, relaxation=0.8)
        sol = optx.fixed_point(f, solver, jnp.zeros(8), x, max_steps=200)
        ```
    """

    rtol: float
    atol: float
    relaxation: float = 0.8
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    termination: Termination = eqx.field(static=True, default="elementwise")
    divergence_factor: float = 1e4

    def __check_init__(self):
        if isinstance(self.relaxation, bool) or not isinstance(
            self.relaxation, (int, float)
        ):
            raise TypeError(
                f"Reversible(relaxation=...): expected a float, got {self.relaxation!r}"
            )
        if not (0 < self.relaxation < 2 and self.relaxation != 1):
            raise ValueError(
                "Reversible(relaxation=...): expected a number in (0, 1) or (1, 2) "
                "(the step is inverted by dividing by 1 - relaxation), got "
                f"{self.relaxation}"
            )
        check_common_options(
            "Reversible", self.rtol, self.atol, self.termination, self.divergence_factor
        )

    def init(
        self,
        fn: Callable,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> ReversibleState:
        del fn, args, options, f_struct, tags
        dtype = jnp.result_type(*jtu.tree_leaves(y))
        return ReversibleState(
            previous=y,
            current=y,
            relaxation=jnp.asarray(self.relaxation, dtype),
            progress=Progress.start(y, aux_struct, dtype),
        )

    def step(
        self,
        fn: Callable,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: ReversibleState,
        tags: frozenset[object],
    ) -> tuple[Y, ReversibleState, Aux]:
        del options, tags
        f_y, aux = fn(y, args)
        residual = jtu.tree_map(jnp.subtract, f_y, y)
        with jax.numpy_dtype_promotion("standard"):
            error = scaled_residual_size(
                self.norm, self.termination, self.atol, self.rtol, residual, f_y
            )
            residual_norm = self.norm(residual)
        progress = state.progress.record(y, aux, error, residual_norm)
        beta = state.relaxation
        new_y = jtu.tree_map(
            lambda p, fy: ((1 - beta) * p + beta * fy).astype(fy.dtype),
            state.previous,
            f_y,
        )
        # A non-finite evaluation stops the solve (see `terminate`).
        new_y = tree_where(tree_all_finite(new_y), new_y, progress.best_y)
        new_state = ReversibleState(
            previous=y, current=new_y, relaxation=beta, progress=progress
        )
        return new_y, new_state, aux

    def terminate(
        self,
        fn: Callable,
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: ReversibleState,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        del fn, y, args, options, tags
        return state.progress.terminate(self.divergence_factor)

    def postprocess(
        self,
        fn: Callable,
        y: Y,
        aux: Aux,
        args: PyTree,
        options: dict[str, Any],
        state: ReversibleState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Aux, dict[str, Any]]:
        del fn, args, options, tags, result
        stats = {"residual_norm": state.progress.best_residual_norm}
        return y, aux, stats


Reversible.__init__.__doc__ = """**Arguments:**

- `rtol`: Relative tolerance for terminating the solve (see "Termination" above).
- `atol`: Absolute tolerance for terminating the solve.
- `relaxation`: `β` in `(0, 1)` or `(1, 2)` (default 0.8).
- `norm`: The norm used in the termination criterion, e.g. `optimistix.max_norm`
    (the default), `optimistix.rms_norm` or `optimistix.two_norm`.
- `termination`: `"elementwise"` or `"normwise"`; see "Termination" above.
- `divergence_factor`: Stop with `optimistix.RESULTS.nonlinear_divergence` when the
    residual norm exceeds this multiple of the best one seen.
"""
