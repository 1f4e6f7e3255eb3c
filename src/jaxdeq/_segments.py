"""Sequences of related inputs: each segment's solve starts from the previous
fixed point."""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .nn._core import AbstractLayer, check_return_solution


def scan_segments(
    model: AbstractLayer,
    ps: PyTree,
    st: PyTree,
    xs: Any,
    *,
    z0: PyTree[Array] | None = None,
    carry_gradient: bool = False,
    max_steps: int | Array | None = None,
    return_solution: bool = False,
):
    """Solve a sequence of related inputs (video frames, the steps of a diffusion or
    ODE sampler, the recurrent segments of a reasoning model) as one `lax.scan`:
    segment `t` starts from the fixed point of segment `t - 1` (a warm start), so
    slowly changing inputs cost few iterations each.

    Each segment's output carries the derivative of the model's gradient mode
    (`adjoint`): build the model with the mode each segment should use, e.g.
    `jaxdeq.OneStepGradient()` for the cheap one-step gradient per segment of
    deep-supervision training, or the default implicit gradient. By default the
    carried state is detached (`carry_gradient=False`): no derivative flows from
    one segment into the next, so memory and backward cost stay per segment.
    `carry_gradient=True` differentiates through the carried state too, which
    only a mode that differentiates its initial state can do
    (`jaxdeq.UnrolledAdjoint`, `jaxdeq.ReversibleAdjoint`, `fixed_depth > 0`).

    **Arguments:**

    - `model`: a DEQ model ([`jaxdeq.DeepEquilibriumNetwork`][],
        [`jaxdeq.MultiScaleDeepEquilibriumNetwork`][], the zoo's
        [`jaxdeq.MDEQImageClassifier`][]).
    - `ps`, `st`: the model's parameters and state (the state is threaded through
        the segments and returned).
    - `xs`: the inputs, segment-first: leaves `(segments, batch, ...)`.
    - `z0`: the first segment's initial state (default: the model's own).
    - `carry_gradient`: see above.
    - `max_steps`: a per-segment step budget, as in `model.apply`.
    - `return_solution`: also return the segments' solutions, stacked
        (leaves `(segments, ...)`).

    **Returns:** `(ys, st)` or `(ys, st, solutions)`: `ys` the outputs, leaves
    `(segments, batch, ...)`.

    **Raises:** `ValueError` for `xs` without a segment axis, or
    `carry_gradient=True` with a gradient mode that gives `z0` no derivative.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Parallel(jnp.add, nn.Dense(4, 4, activation=jnp.tanh), nn.Dense(4, 4))
    >>> solver = jaxdeq.Anderson(rtol=1e-5, atol=1e-6)
    >>> model = jaxdeq.DeepEquilibriumNetwork(cell, solver)
    >>> t = jnp.linspace(0, 1, 6)[:, None, None]
    >>> frames = jnp.sin(3 * t + jnp.arange(8.0).reshape(1, 2, 4))  # (6, 2, 4)
    >>> ps, st = model.init(jax.random.key(0), frames[0])
    >>> ys, st, sols = jaxdeq.scan_segments(model, ps, st, frames, return_solution=True)
    >>> ys.shape, sols.nfe.shape
    ((6, 2, 4), (6, 2))

    ```
    """
    check_return_solution(return_solution)
    if not isinstance(carry_gradient, bool):
        raise TypeError(f"carry_gradient: expected a bool, got {carry_gradient!r}")
    # (DEQ models, and models around one such as the zoo's classifier, say whether
    # their solve differentiates its initial state; containers do not take `z0`.)
    if not hasattr(model, "differentiates_initial_state"):
        raise TypeError(f"model: expected a DEQ model, got {type(model).__name__}")
    if carry_gradient and not model.differentiates_initial_state:
        raise ValueError(
            "carry_gradient: the model's gradient mode gives the initial state no "
            "derivative (the fixed point does not depend on it), so nothing would "
            "flow between segments; use jaxdeq.UnrolledAdjoint or "
            "jaxdeq.ReversibleAdjoint, or leave carry_gradient=False"
        )
    leaves = jtu.tree_leaves(xs)
    if not leaves or any(jnp.ndim(leaf) < 2 for leaf in leaves):
        raise ValueError(
            "xs: expected segment-first inputs, leaves (segments, batch, ...), got "
            f"{jtu.tree_map(jnp.shape, xs)}"
        )
    lengths = {jnp.shape(leaf)[0] for leaf in leaves}
    if 0 in lengths:
        raise ValueError("xs: expected at least one segment, got 0")
    if len(lengths) != 1:
        raise ValueError(
            f"xs: every leaf needs the same number of segments, got {lengths}"
        )
    x_first = jtu.tree_map(lambda leaf: leaf[0], xs)
    batch = jnp.shape(jtu.tree_leaves(x_first)[0])[0]
    # The carry's structure: the model's state for one segment (shapes only).
    state_struct = jax.eval_shape(
        lambda: model.apply(ps, st, x_first, return_solution=True)[2].z_star
    )
    if z0 is None:
        z_init = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), state_struct)
        warm_first = False
    else:
        z_init, warm_first = z0, True

    def segment(carry, x):
        st, z, warm = carry
        y, st, solution = model.apply(
            ps,
            st,
            x,
            max_steps=max_steps,
            return_solution=True,
            z0=z,
            warm=jnp.full((batch,), warm),
        )
        z_next = solution.z_star
        if not carry_gradient:
            z_next = jax.lax.stop_gradient(z_next)
        out = (y, solution) if return_solution else (y, None)
        return (st, z_next, jnp.array(True)), out

    (st, _, _), (ys, solutions) = jax.lax.scan(
        segment, (st, z_init, jnp.array(warm_first)), xs
    )
    if return_solution:
        return ys, st, solutions
    return ys, st
