"""DEQs inside Flax models: a linen module and an NNX module running a jaxdeq model.

`import jaxdeq.flax` (or `jaxdeq.flax` after `import jaxdeq`); inside this module,
`import flax` is an absolute import of the Flax library, not of this file.
"""

from typing import Any

import flax.linen as linen
import jax
from flax import nnx
from jaxtyping import Array

from ._model import apply_model
from .nn._core import AbstractLayer

__all__ = ["DEQ", "DEQState", "NNXDEQ"]


def _check_model(model: Any) -> None:
    if not isinstance(model, AbstractLayer):
        raise TypeError(
            "model: expected a jaxdeq model such as jaxdeq.DeepEquilibriumNetwork (a "
            f"jaxdeq.nn layer), got {type(model).__name__}"
        )


class DEQ(linen.Module):
    """A jaxdeq model (any [`jaxdeq.DeepEquilibriumNetwork`][], multiscale model or
    other ps/st layer) as a `flax.linen` module, for use inside a larger linen model.

    The model's `ps` are the module's `"params"`, one entry per key of `ps` (a DEQ
    model's `"model"` and, with an init layer, `"init"`), so the usual linen
    `init`/`apply` and optimizers see them. The model's `st` (the cell's own state,
    such as `batch_stats`, and the PRNG key that the model advances; nothing that
    depends on the batch) lives in the collection `state_collection`, again one
    entry per key. Apply with that collection mutable to get the updated state;
    without it the state is read but not written. A call's
    `DeepEquilibriumSolution` is returned on request (`return_solution=True`), like
    any other output of a linen module.

    **Arguments:**

    - `model`: the jaxdeq model; its `ps` and `st` must be dicts, as those of every
      DEQ model are.
    - `state_collection`: the name of the collection holding `st`.

    **Inputs:**

    - `x`: the model's input, batch-first.
    - `max_steps`: (keyword) a per-call iteration budget, passed to the model's
      `apply` (DEQ models only).
    - `return_solution`: (keyword) also return the call's
      [`jaxdeq.DeepEquilibriumSolution`][] (DEQ models only).
    - `z0`, `warm`, `anytime`: (keywords) a warm start, its per-sample mask and
      anytime budgets, as in the model's `apply` (DEQ models only).

    **Returns:** the model's output `z*`, or `(z*, solution)`.

    **Parameters:** `ps`, under `"params"`.

    **States:** `st`, under `state_collection` (default `"deq_state"`).

    **Example:**

    ```python
    import flax.linen as linen
    import jax, jax.numpy as jnp, jaxdeq
    import jaxdeq.flax
    from jaxdeq import nn

    block = jaxdeq.DeepEquilibriumNetwork(
        nn.Chain(nn.Parallel(jnp.add, nn.Dense(8, 8), nn.NoOpLayer()),
                 nn.WrappedFunction(jnp.tanh)),
        jaxdeq.Anderson(rtol=1e-5, atol=1e-5))

    class Classifier(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = linen.Dense(8)(x)
            z, solution = jaxdeq.flax.DEQ(block)(h, return_solution=True)
            return linen.Dense(10)(z), solution

    x = jnp.ones((4, 64))
    variables = Classifier().init(jax.random.key(0), x)
    (logits, solution), updates = Classifier().apply(
        variables, x, mutable=["deq_state"])
    nfe = solution.nfe  # per sample
    variables = {**variables, **updates}
    ```
    """

    model: AbstractLayer
    state_collection: str = "deq_state"

    def __post_init__(self):
        _check_model(self.model)
        if not isinstance(self.state_collection, str) or (
            self.state_collection == "params"
        ):
            raise ValueError(
                "state_collection: expected the name of a collection other than "
                f"'params', got {self.state_collection!r}"
            )
        super().__post_init__()

    @linen.compact
    def __call__(
        self,
        x: Any,
        *,
        max_steps: int | Array | None = None,
        return_solution: bool = False,
        z0: Any = None,
        warm: Array | None = None,
        anytime: Any = None,
    ) -> Any:
        if self.is_initializing():
            ps, st = self.model.init(self.make_rng("params"), x)
            for name, tree in (("ps", ps), ("st", st)):
                if not isinstance(tree, dict):
                    raise TypeError(
                        f"model: jaxdeq.flax.DEQ needs a model whose {name} is a "
                        f"dict (every DEQ model's is), got {type(tree).__name__}"
                    )
            for name, value in ps.items():
                self.param(name, lambda _, value=value: value)
            for name, value in st.items():
                self.variable(self.state_collection, name, lambda value=value: value)
        variables = self.variables
        if self.state_collection not in variables:
            raise ValueError(
                f"jaxdeq.flax.DEQ: the variables lack the {self.state_collection!r} "
                "collection; pass all the variables returned by `init` to `apply`"
            )
        ps = dict(variables.get("params", {}))
        st = dict(variables[self.state_collection])
        z, new_st, solution = apply_model(
            self.model,
            ps,
            st,
            x,
            max_steps,
            return_solution,
            z0=z0,
            warm=warm,
            anytime=anytime,
        )
        if self.is_mutable_collection(self.state_collection):
            for name, value in new_st.items():
                self.put_variable(self.state_collection, name, value)
        return (z, *solution) if return_solution else z


class DEQState(nnx.Variable):
    """The `st` of a jaxdeq model inside an [`jaxdeq.flax.NNXDEQ`][]: not a
    parameter, so `nnx.Optimizer(..., wrt=nnx.Param)` leaves it alone and
    `nnx.state(module, DEQState)` selects it."""


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


class NNXDEQ(nnx.Module):
    """A jaxdeq model as a `flax.nnx` module, for use inside a larger NNX model.

    Each array of the model's `ps` is an `nnx.Param` (in the pytree structure of
    `ps`), so `nnx.grad`, `nnx.Optimizer(..., wrt=nnx.Param)` and `nnx.split` treat
    them as any NNX parameters. The model's `st` is one [`jaxdeq.flax.DEQState`][]
    variable, updated by every call (NNX modules are stateful); it holds nothing that
    depends on the batch. `module(x, return_solution=True)` returns `(z*, solution)`,
    the call's `DeepEquilibriumSolution`, which carries gradients inside a loss
    function (for a Jacobian or skip loss).

    **Arguments:**

    - `model`: the jaxdeq model.
    - `x`: a sample input, batch-first, for shapes and dtypes.
    - `rngs`: an `nnx.Rngs`; the model is initialised with `rngs.params()`.

    **Inputs:**

    - `x`: the model's input, batch-first.
    - `max_steps`: (keyword) a per-call iteration budget (DEQ models only).
    - `return_solution`: (keyword) also return the call's
      [`jaxdeq.DeepEquilibriumSolution`][] (DEQ models only).
    - `z0`, `warm`, `anytime`: (keywords) a warm start, its per-sample mask and
      anytime budgets, as in the model's `apply` (DEQ models only).

    **Returns:** the model's output `z*`, or `(z*, solution)`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, jaxdeq, optax
    import jaxdeq.flax
    from flax import nnx
    from jaxdeq import nn

    block = jaxdeq.DeepEquilibriumNetwork(
        nn.Chain(nn.Parallel(jnp.add, nn.Dense(8, 8), nn.NoOpLayer()),
                 nn.WrappedFunction(jnp.tanh)),
        jaxdeq.Anderson(rtol=1e-5, atol=1e-5))

    class Classifier(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(64, 8, rngs=rngs)
            self.deq = jaxdeq.flax.NNXDEQ(block, jnp.ones((1, 8)), rngs=rngs)
            self.head = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x):
            return self.head(self.deq(self.embed(x)))

    net = Classifier(nnx.Rngs(0))
    logits = net(jnp.ones((4, 64)))
    z, solution = net.deq(jnp.ones((4, 8)), return_solution=True)
    nfe = solution.nfe  # per sample
    ```
    """

    def __init__(self, model: AbstractLayer, x: Any, *, rngs: nnx.Rngs):
        _check_model(model)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs: expected an nnx.Rngs, got {type(rngs).__name__}")
        ps, st = model.init(rngs.params(), x)
        self.model = nnx.static(model)
        self.ps = nnx.data(jax.tree.map(nnx.Param, ps))
        self.st = DEQState(st)

    def __call__(
        self,
        x: Any,
        *,
        max_steps: int | Array | None = None,
        return_solution: bool = False,
        z0: Any = None,
        warm: Array | None = None,
        anytime: Any = None,
    ) -> Any:
        ps = jax.tree.map(lambda p: p.get_value(), self.ps, is_leaf=_is_variable)
        z, st, solution = apply_model(
            self.model,
            ps,
            self.st.get_value(),
            x,
            max_steps,
            return_solution,
            z0=z0,
            warm=warm,
            anytime=anytime,
        )
        self.st.set_value(st)
        return (z, *solution) if return_solution else z
