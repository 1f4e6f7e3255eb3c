"""DEQs inside Equinox models: an `eqx.Module` holding a jaxdeq model with its
`ps` and `st`.

`import jaxdeq.equinox` (or `jaxdeq.equinox` after `import jaxdeq`); inside this
module, `import equinox` is an absolute import of the Equinox library.
"""

from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._model import apply_model
from .nn._core import AbstractLayer

__all__ = ["DEQ"]


class DEQ(eqx.Module):
    """A jaxdeq model with its parameters and state, as an Equinox module.

    `ps` is an ordinary field, so its floating arrays are what `eqx.filter_grad`,
    `eqx.filter_value_and_grad` and `eqx.partition(deq, eqx.is_inexact_array)` see as
    trainable. `st` is a field too, but, as the Equinox FAQ recommends for buffers, a
    call reads it through `jax.lax.stop_gradient`: its gradient is always zero
    (exclude it from weight decay with a filter, e.g. `optax.masked`).

    A call returns `z*`; `deq(x, return_state=True)` returns `(z*, st)`, the model's
    new state (the advanced PRNG key, updated batch statistics: nothing that depends
    on the batch, so `eqx.filter(deq, eqx.is_inexact_array)` and optimizer states
    keep their shapes). Modules are immutable, so keep the new state with
    `eqx.tree_at(lambda d: d.st, deq, st)`; the same pattern as `eqx.nn.State`, where
    layers return their new state. `return_solution=True` appends the call's
    [`jaxdeq.DeepEquilibriumSolution`][] (per-sample nfe, residuals, outcomes; its
    `jacobian_loss` and `u0` carry gradients, for a Jacobian or skip loss).

    The input is batch-first, as everywhere in jaxdeq (the DEQ solves each sample on
    its own, or the batch jointly, itself). Inside a model written for one sample and
    `jax.vmap`ped, call it on `x[None]` and take `[0]`.

    **Arguments:**

    - `model`: the jaxdeq model (a [`jaxdeq.DeepEquilibriumNetwork`][], a multiscale
      model, or any ps/st layer); kept as static configuration.
    - `x`: a sample input, batch-first, for shapes and dtypes.
    - `key`: the PRNG key for `model.init`.

    **Call:** `deq(x, *, max_steps=None, return_state=False,
    return_solution=False)` returns `z*`, `(z*, st)`, `(z*, solution)` or
    `(z*, st, solution)`; `max_steps` is a per-call iteration budget, `z0`/`warm`
    a warm start and its per-sample mask, `anytime` budgets, as in the model's
    `apply` (DEQ models only).

    **Example:**

    ```python
    import equinox as eqx
    import jax, jax.numpy as jnp, jaxdeq
    import jaxdeq.equinox
    from jaxdeq import nn

    block = jaxdeq.DeepEquilibriumNetwork(
        nn.Chain(nn.Parallel(jnp.add, nn.Dense(8, 8), nn.NoOpLayer()),
                 nn.WrappedFunction(jnp.tanh)),
        jaxdeq.Anderson(rtol=1e-5, atol=1e-5))
    x = jnp.ones((4, 8))
    deq = jaxdeq.equinox.DEQ(block, x, key=jax.random.key(0))

    @eqx.filter_value_and_grad(has_aux=True)
    def loss(deq, x):
        z, st, solution = deq(x, return_state=True, return_solution=True)
        return jnp.mean(z**2) + solution.jacobian_loss, st

    (value, st), grads = loss(deq, x)
    deq = eqx.tree_at(lambda d: d.st, deq, st)
    ```
    """

    model: AbstractLayer = eqx.field(static=True)
    ps: PyTree
    st: PyTree

    def __init__(self, model: AbstractLayer, x: Any, *, key: PRNGKeyArray):
        if not isinstance(model, AbstractLayer):
            raise TypeError(
                "model: expected a jaxdeq model such as "
                "jaxdeq.DeepEquilibriumNetwork (a jaxdeq.nn layer), got "
                f"{type(model).__name__}"
            )
        self.model = model
        self.ps, self.st = model.init(key, x)

    def __call__(
        self,
        x: Any,
        *,
        max_steps: int | Array | None = None,
        return_state: bool = False,
        return_solution: bool = False,
        z0: Any = None,
        warm: Array | None = None,
        anytime: Any = None,
    ) -> Any:
        st = jtu.tree_map(
            lambda leaf: (
                jax.lax.stop_gradient(leaf) if eqx.is_inexact_array(leaf) else leaf
            ),
            self.st,
        )
        z, new_st, solution = apply_model(
            self.model,
            self.ps,
            st,
            x,
            max_steps,
            return_solution,
            z0=z0,
            warm=warm,
            anytime=anytime,
        )
        if not (return_state or return_solution):
            return z
        return (z, *((new_st,) if return_state else ()), *solution)
