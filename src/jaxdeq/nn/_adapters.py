"""Adapters turning Flax (linen and NNX) and Equinox modules into ps/st layers.

Each adapter holds the module's configuration as static data (the linen module, the
NNX graphdef, the Equinox skeleton without its arrays), so the layer stays a hashable
`eqx.Module` without array leaves and can be closed over or passed to `jax.jit`.
"""

from collections.abc import Hashable, Mapping
from typing import Any

import equinox as eqx
import flax.linen as linen
import jax
from flax import nnx
from jaxtyping import PRNGKeyArray, PyTree

from ._core import AbstractLayer


class _InitialValues:
    """The arrays of an already-built module (its parameters and state), returned by
    `init`. A plain object, hashed and compared by identity, kept in a static field so
    that these arrays are neither leaves of the layer (no gradients, no copies under
    `eqx.filter_*`) nor hashed by value."""

    __slots__ = ("ps", "st")

    def __init__(self, ps: PyTree, st: PyTree):
        self.ps = ps
        self.st = st


def _freeze_kwargs(call_kwargs: Mapping[str, Any] | None) -> tuple:
    """`call_kwargs` as sorted `(name, value)` pairs, so the layer stays hashable."""
    if call_kwargs is None:
        return ()
    if not isinstance(call_kwargs, Mapping) or not all(
        isinstance(name, str) for name in call_kwargs
    ):
        raise TypeError(
            f"call_kwargs: expected a mapping from keyword names to values, got "
            f"{call_kwargs!r}"
        )
    for name, value in call_kwargs.items():
        if not isinstance(value, Hashable):
            raise TypeError(
                f"call_kwargs[{name!r}]: expected a hashable value (static "
                f"configuration such as `train=True`), got {type(value)}"
            )
    return tuple(sorted(call_kwargs.items()))


def _same_dtypes_as(new_st: PyTree, st: PyTree) -> PyTree:
    """Casts an updated state to the dtypes of the state given, as the protocol
    promises: e.g. float32 running statistics updated from a float64 batch."""
    return jax.tree.map(
        lambda new, old: new if new.dtype == old.dtype else new.astype(old.dtype),
        new_st,
        st,
    )


class _FlaxLayer(AbstractLayer):
    module: linen.Module = eqx.field(static=True)
    call_kwargs: tuple[tuple[str, Hashable], ...] = eqx.field(static=True)

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        variables = dict(self.module.init(key, x, **dict(self.call_kwargs)))
        ps = variables.pop("params", {})
        return ps, variables

    def apply(self, ps: dict, st: dict, x: Any) -> tuple[Any, dict]:
        variables = {**st, "params": ps} if ps else dict(st)
        if not st:
            return self.module.apply(variables, x, **dict(self.call_kwargs)), st
        y, updates = self.module.apply(
            variables, x, mutable=list(st), **dict(self.call_kwargs)
        )
        return y, _same_dtypes_as(dict(updates), st)


def from_flax(
    module: linen.Module, *, call_kwargs: Mapping[str, Any] | None = None
) -> AbstractLayer:
    """Wraps a `flax.linen` module as a ps/st layer.

    `init` calls `module.init(key, x)`; `apply` calls `module.apply` with every
    non-`params` collection mutable, and returns the updated collections as the state.

    **Arguments:**

    - `module`: an unbound `flax.linen.Module`, called as `module(x, **call_kwargs)`.
    - `call_kwargs`: static keyword arguments for every call of the module, e.g.
      `{"train": True}`. Values must be hashable. Make one layer per mode: the
      layers share their `ps` and `st`.

    **In a DEQ**, a cell that normalises with batch statistics (BatchNorm in training
    mode) couples the samples of a batch: build the model with `joint_solve=True`.
    The default per-sample solve calls the cell on batches of one sample, each
    normalised by its own statistics. The new state comes from one call of the cell
    at the fixed point, after the solve; in evaluation mode (running averages) the
    cell no longer couples samples and either mode works.

    **Inputs:**

    - `x`: the module's input.

    **Returns:**

    - `y`: the module's output.
    - `st`: the updated non-`params` collections, with the dtypes of those given.

    **Parameters:**

    - The module's `params` collection (`{}` when it has none).

    **States:**

    - A dict of the module's other collections, e.g. `{"batch_stats": ...}` (`{}` when
      it has none).

    **Example:**

    ```python
    import flax.linen as linen
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    class Block(linen.Module):
        @linen.compact
        def __call__(self, x, train):
            x = linen.Dense(4)(x)
            return linen.BatchNorm(use_running_average=not train)(x)

    layer = nn.from_flax(Block(), call_kwargs={"train": True})
    x = jnp.ones((5, 3))
    ps, st = layer.init(jax.random.key(0), x)
    y, st = layer.apply(ps, st, x)
    assert y.shape == (5, 4) and "batch_stats" in st
    ```
    """
    if not isinstance(module, linen.Module):
        raise TypeError(f"module: expected a flax.linen.Module, got {type(module)}")
    return _FlaxLayer(module, _freeze_kwargs(call_kwargs))


class _NNXLayer(AbstractLayer):
    graphdef: nnx.GraphDef = eqx.field(static=True)
    initial: _InitialValues = eqx.field(static=True)
    call_kwargs: tuple[tuple[str, Hashable], ...] = eqx.field(static=True)

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        return self.initial.ps, self.initial.st

    def apply(self, ps: dict, st: dict, x: Any) -> tuple[Any, dict]:
        module = nnx.merge(self.graphdef, ps, st)
        y = module(x, **dict(self.call_kwargs))
        _, _, new_st = nnx.split(module, nnx.Param, ...)
        return y, _same_dtypes_as(nnx.to_pure_dict(new_st), st)


def from_nnx(
    module: nnx.Module, *, call_kwargs: Mapping[str, Any] | None = None
) -> AbstractLayer:
    """Wraps a `flax.nnx` module as a ps/st layer.

    The module is split once, when the layer is made, into its graph definition (kept
    as static configuration), its `nnx.Param` variables and everything else. `apply`
    merges them back, calls the module and splits it again, so that whatever the call
    updates (batch statistics, RNG counts) comes back as the new state.

    NNX modules are initialised when built, so `init` returns (a snapshot of) the
    module's own values and ignores `key`; build a new module, with `nnx.Rngs(key)`, for
    new values. Attributes such as `use_running_average` are part of the graph
    definition: make one layer after `module.train()` and one after `module.eval()`;
    they share their `ps` and `st`.

    **Arguments:**

    - `module`: a `flax.nnx.Module`, called as `module(x, **call_kwargs)`.
    - `call_kwargs`: static keyword arguments for every call of the module. Values must
      be hashable.

    **In a DEQ**, a cell that normalises with batch statistics (BatchNorm in training
    mode) couples the samples of a batch: build the model with `joint_solve=True`.
    The default per-sample solve calls the cell on batches of one sample, each
    normalised by its own statistics. The new state comes from one call of the cell
    at the fixed point, after the solve; in evaluation mode (running averages) the
    cell no longer couples samples and either mode works.

    **Inputs:**

    - `x`: the module's input.

    **Returns:**

    - `y`: the module's output.
    - `st`: the updated non-parameter variables, with the dtypes of those given.

    **Parameters:**

    - The module's `nnx.Param` variables, as a pure dict (`nnx.to_pure_dict`).

    **States:**

    - Every other variable (`nnx.BatchStat`, RNG streams, ...), as a pure dict (`{}`
      when there is none).

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from flax import nnx
    from jaxdeq import nn

    layer = nn.from_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    x = jnp.ones((5, 3))
    ps, st = layer.init(jax.random.key(0), x)
    y, st = layer.apply(ps, st, x)
    assert y.shape == (5, 2) and ps["kernel"].shape == (3, 2)
    ```
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module: expected a flax.nnx.Module, got {type(module)}")
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    initial = _InitialValues(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
    return _NNXLayer(graphdef, initial, _freeze_kwargs(call_kwargs))


class _EquinoxLayer(AbstractLayer):
    skeleton: eqx.Module = eqx.field(static=True)
    initial: _InitialValues = eqx.field(static=True)
    stateful: bool = eqx.field(static=True)
    call_kwargs: tuple[tuple[str, Hashable], ...] = eqx.field(static=True)
    batch_axis: int | None = eqx.field(static=True)
    axis_name: Hashable = eqx.field(static=True)

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[eqx.Module, Any]:
        return self.initial.ps, self.initial.st

    def apply(self, ps: eqx.Module, st: Any, x: Any) -> tuple[Any, Any]:
        module = eqx.combine(ps, self.skeleton)
        call_kwargs = dict(self.call_kwargs)

        def call(sample, state):
            if self.stateful:
                return module(sample, state, **call_kwargs)
            return module(sample, **call_kwargs), state

        if self.batch_axis is not None:
            # The state is shared by the batch: stateful Equinox layers (BatchNorm)
            # reduce over `axis_name`, so their new state is the same for every sample.
            call = jax.vmap(
                call,
                in_axes=(self.batch_axis, None),
                out_axes=(self.batch_axis, None),
                axis_name=self.axis_name,
            )
        y, new_st = call(x, st)
        return y, _same_dtypes_as(new_st, st)


def _has_state(module: eqx.Module) -> bool:
    is_index = lambda leaf: isinstance(leaf, eqx.nn.StateIndex)
    return any(is_index(leaf) for leaf in jax.tree.leaves(module, is_leaf=is_index))


def from_equinox(
    module: eqx.Module,
    state: eqx.nn.State | None = None,
    *,
    call_kwargs: Mapping[str, Any] | None = None,
    batch_axis: int | None = 0,
    axis_name: Hashable = "batch",
) -> AbstractLayer:
    """Wraps an Equinox module as a ps/st layer.

    The module is split by `eqx.partition(module, eqx.is_inexact_array)`: its floating
    arrays are the parameters, the rest (the skeleton) is kept as static configuration.
    Equinox modules act on one sample, so by default `apply` maps the module over the
    batch axis with `jax.vmap` (naming it `axis_name`, for `eqx.nn.BatchNorm`).

    Equinox modules are initialised when built, so `init` returns the module's own
    arrays (and `state`) and ignores `key`; build a new module for new values.

    **Arguments:**

    - `module`: an `eqx.Module`, called as `module(sample, **call_kwargs)`, or as
      `module(sample, state, **call_kwargs) -> (y, state)` when `state` is given.
      Non-floating arrays in it are static configuration, so must be hashable.
    - `state`: for a stateful module, its initial `eqx.nn.State`, e.g. from
      `module, state = eqx.nn.make_with_state(Model)(...)`.
    - `call_kwargs`: static keyword arguments for every call of the module, e.g.
      `{"inference": True}`. Values must be hashable.
    - `batch_axis`: the axis of `x` (of every leaf of `x`) mapped over, or `None` to
      call the module once on the whole of `x`.
    - `axis_name`: the name of the mapped axis, as used by the module's collective
      operations (`eqx.nn.BatchNorm(..., axis_name="batch")`).

    **In a DEQ**, a cell that normalises with batch statistics (BatchNorm in training
    mode) couples the samples of a batch: build the model with `joint_solve=True`.
    The default per-sample solve calls the cell on batches of one sample, each
    normalised by its own statistics. The new state comes from one call of the cell
    at the fixed point, after the solve; in evaluation mode (running averages) the
    cell no longer couples samples and either mode works.

    **Inputs:**

    - `x`: a batch of the module's inputs along `batch_axis` (or the module's input,
      when `batch_axis is None`).

    **Returns:**

    - `y`: the module's outputs, batched along `batch_axis`.
    - `st`: the updated `eqx.nn.State`, with the dtypes of the one given (`{}` for a
      stateless module). Under `jax.vmap` it must not depend on the sample, as with
      `eqx.nn.BatchNorm`, which averages over `axis_name`.

    **Parameters:**

    - The module with only its floating arrays (`None` elsewhere), as returned by
      `eqx.partition`; `eqx.combine(ps, skeleton)` rebuilds it.

    **States:**

    - The `eqx.nn.State` given as `state`, or `{}`.

    **Example:**

    ```python
    import equinox as eqx
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    mlp = eqx.nn.MLP(3, 2, width_size=8, depth=1, key=jax.random.key(0))
    layer = nn.from_equinox(mlp)
    x = jnp.ones((5, 3))
    ps, st = layer.init(jax.random.key(1), x)
    y, st = layer.apply(ps, st, x)
    assert y.shape == (5, 2) and jnp.allclose(y, jax.vmap(mlp)(x))
    ```
    """
    if not isinstance(module, eqx.Module):
        raise TypeError(f"module: expected an equinox.Module, got {type(module)}")
    if state is None:
        if _has_state(module):
            raise ValueError(
                "state: expected the eqx.nn.State from eqx.nn.make_with_state (the "
                "module holds eqx.nn.StateIndex state), got None"
            )
    elif not isinstance(state, eqx.nn.State):
        raise TypeError(f"state: expected an eqx.nn.State or None, got {type(state)}")
    if batch_axis is not None and (
        not isinstance(batch_axis, int) or isinstance(batch_axis, bool)
    ):
        raise TypeError(f"batch_axis: expected an int or None, got {batch_axis!r}")
    if not isinstance(axis_name, Hashable):
        raise TypeError(f"axis_name: expected a hashable value, got {axis_name!r}")
    # Initial state values left in the module by building it without
    # `make_with_state` are arrays that must not become parameters.
    module = eqx.nn.delete_init_state(module)
    params, skeleton = eqx.partition(module, eqx.is_inexact_array)
    try:
        hash(skeleton)
    except TypeError as error:
        raise TypeError(
            "module: expected only floating arrays and hashable configuration; "
            f"its non-floating part is not hashable: {error}"
        ) from error
    initial = _InitialValues(params, {} if state is None else state)
    return _EquinoxLayer(
        skeleton,
        initial,
        state is not None,
        _freeze_kwargs(call_kwargs),
        batch_axis,
        axis_name,
    )
