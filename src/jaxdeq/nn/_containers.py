"""Containers: Chain, Parallel and BranchLayer. Their `ps` and `st` are tuples of
their children's, by position."""

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from ._core import AbstractLayer, apply_with_solution, check_return_solution


def _check_layers(layers: tuple, *, at_least_one: bool) -> None:
    for i, layer in enumerate(layers):
        if not isinstance(layer, AbstractLayer):
            raise TypeError(
                f"layers[{i}]: expected a jaxdeq layer (an `AbstractLayer`; wrap plain "
                f"functions in `WrappedFunction`, Flax/Equinox modules with "
                f"`from_flax`/`from_nnx`/`from_equinox`), got {type(layer)}"
            )
    if at_least_one and not layers:
        raise ValueError("layers: expected at least one layer, got none.")


def _check_per_layer(name: str, tree: Any, num_layers: int) -> None:
    if not isinstance(tree, tuple) or len(tree) != num_layers:
        raise ValueError(
            f"{name}: expected a tuple with one entry per layer ({num_layers}), as "
            f"returned by `init`, got {type(tree).__name__} of length "
            f"{len(tree) if isinstance(tree, tuple) else 'n/a'}"
        )


def _prepare_children(
    layers: tuple[AbstractLayer, ...], ps: tuple, st: tuple
) -> tuple[tuple, tuple]:
    _check_per_layer("ps", ps, len(layers))
    _check_per_layer("st", st, len(layers))
    prepared = [
        layer.prepare(layer_ps, layer_st)
        for layer, layer_ps, layer_st in zip(layers, ps, st, strict=True)
    ]
    return tuple(p for p, _ in prepared), tuple(s for _, s in prepared)


def _split_key(key: PRNGKeyArray, num_layers: int) -> list[PRNGKeyArray]:
    return list(jax.random.split(key, num_layers)) if num_layers else []


def _apply_children(
    layers: tuple[AbstractLayer, ...], ps: tuple, st: tuple, inputs: tuple
) -> tuple[tuple, tuple, tuple]:
    """Each layer on its input: `(outputs, states, solutions)`, by position.
    (Unused solutions are removed by XLA under `jit`.)"""
    _check_per_layer("ps", ps, len(layers))
    _check_per_layer("st", st, len(layers))
    outputs, new_st, solutions = zip(
        *(
            apply_with_solution(layer, layer_ps, layer_st, layer_x)
            for layer, layer_ps, layer_st, layer_x in zip(
                layers, ps, st, inputs, strict=True
            )
        ),
        strict=True,
    )
    return outputs, new_st, solutions


class Chain(AbstractLayer):
    """Layers applied in sequence, `y = layers[-1](... layers[0](x))`.

    **Arguments:**

    - `*layers`: the layers, applied first to last. No layers make the identity.

    **Inputs:**

    - `x`: the input of `layers[0]`.

    **Returns:**

    - `y`: the output of `layers[-1]`.
    - `st`: the updated state.
    - with `apply(..., return_solution=True)`, also a tuple of the layers'
        solutions by position: a DEQ model's `DeepEquilibriumSolution` (nested
        tuples for nested containers), `None` for a layer without one.

    **Parameters:**

    - A tuple, `ps[i]` the parameters of `layers[i]`.

    **States:**

    - A tuple, `st[i]` the state of `layers[i]`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    mlp = nn.Chain(nn.Dense(3, 8, activation=jnp.tanh), nn.Dense(8, 2))
    x = jnp.ones((5, 3))
    ps, st = mlp.init(jax.random.key(0), x)
    y, st = mlp.apply(ps, st, x)
    assert y.shape == (5, 2) and ps[1]["kernel"].shape == (8, 2)
    ```
    """

    layers: tuple[AbstractLayer, ...]

    def __init__(self, *layers: AbstractLayer):
        self.layers = layers

    def __check_init__(self):
        _check_layers(self.layers, at_least_one=False)

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[tuple, tuple]:
        # Each layer's sample input is the previous layer's output, so `init` runs
        # the chain forward once.
        ps, st = [], []
        for layer, layer_key in zip(
            self.layers, _split_key(key, len(self.layers)), strict=True
        ):
            layer_ps, layer_st = layer.init(layer_key, x)
            x, _ = layer.apply(layer_ps, layer_st, x)
            ps.append(layer_ps)
            st.append(layer_st)
        return tuple(ps), tuple(st)

    def prepare(self, ps: tuple, st: tuple) -> tuple[tuple, tuple]:
        return _prepare_children(self.layers, ps, st)

    returns_solution: ClassVar[bool] = True

    def apply(
        self, ps: tuple, st: tuple, x: Any, *, return_solution: bool = False
    ) -> tuple[Any, tuple] | tuple[Any, tuple, tuple]:
        check_return_solution(return_solution)
        _check_per_layer("ps", ps, len(self.layers))
        _check_per_layer("st", st, len(self.layers))
        new_st, solutions = [], []
        for layer, layer_ps, layer_st in zip(self.layers, ps, st, strict=True):
            if return_solution:
                x, layer_st, solution = apply_with_solution(
                    layer, layer_ps, layer_st, x
                )
                solutions.append(solution)
            else:
                x, layer_st = layer.apply(layer_ps, layer_st, x)
            new_st.append(layer_st)
        if return_solution:
            return x, tuple(new_st), tuple(solutions)
        return x, tuple(new_st)


class Parallel(AbstractLayer):
    """Layers applied side by side, their outputs folded by `connection`.

    Layer `i` gets element `i` of a tuple input, or the same input when the input is
    not a tuple. With `connection=jnp.add`, `Parallel(jnp.add, Dense(...), Dense(...))`
    maps `(z, x)` to `W1 z + W2 x`, the cell of the seed's first DEQ.

    **Arguments:**

    - `connection`: a binary function folding the outputs left to right,
      `connection(connection(y0, y1), y2)...` (`jnp.add` sums them), or `None` to
      return the tuple of outputs.
    - `*layers`: at least one layer.

    **Inputs:**

    - `x`: a tuple with one element per layer, or any other input, given to every
      layer.

    **Returns:**

    - `y`: the folded outputs, or the tuple of outputs when `connection is None`.
    - `st`: the updated state.
    - with `apply(..., return_solution=True)`, also a tuple of the layers'
        solutions by position: a DEQ model's `DeepEquilibriumSolution` (nested
        tuples for nested containers), `None` for a layer without one.

    **Parameters:**

    - A tuple, `ps[i]` the parameters of `layers[i]`.

    **States:**

    - A tuple, `st[i]` the state of `layers[i]`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    cell = nn.Parallel(
        jnp.add, nn.Dense(2, 2, use_bias=False), nn.Dense(2, 2, use_bias=False)
    )
    z, x = jnp.zeros((1, 2)), jnp.ones((1, 2))
    ps, st = cell.init(jax.random.key(0), (z, x))
    y, st = cell.apply(ps, st, (z, x))
    assert jnp.allclose(y, z @ ps[0]["kernel"] + x @ ps[1]["kernel"])
    ```
    """

    connection: Callable[[Any, Any], Any] | None = eqx.field(static=True)
    layers: tuple[AbstractLayer, ...]

    def __init__(
        self, connection: Callable[[Any, Any], Any] | None, *layers: AbstractLayer
    ):
        self.connection = connection
        self.layers = layers

    def __check_init__(self):
        if self.connection is not None and not callable(self.connection):
            raise TypeError(
                f"connection: expected a binary function or None, got "
                f"{self.connection!r}"
            )
        _check_layers(self.layers, at_least_one=True)

    def _inputs(self, x: Any) -> tuple:
        if not isinstance(x, tuple):
            return (x,) * len(self.layers)
        if len(x) != len(self.layers):
            raise ValueError(
                f"x: expected a tuple with one input per layer ({len(self.layers)}) "
                f"or a non-tuple input for every layer, got a tuple of length {len(x)}"
            )
        return x

    def _connect(self, outputs: tuple) -> Any:
        if self.connection is None:
            return outputs
        return functools.reduce(self.connection, outputs)

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[tuple, tuple]:
        inputs = self._inputs(x)
        keys = _split_key(key, len(self.layers))
        ps, st = zip(
            *(
                layer.init(layer_key, layer_x)
                for layer, layer_key, layer_x in zip(
                    self.layers, keys, inputs, strict=True
                )
            ),
            strict=True,
        )
        return ps, st

    def prepare(self, ps: tuple, st: tuple) -> tuple[tuple, tuple]:
        return _prepare_children(self.layers, ps, st)

    returns_solution: ClassVar[bool] = True

    def apply(
        self, ps: tuple, st: tuple, x: Any, *, return_solution: bool = False
    ) -> tuple[Any, tuple] | tuple[Any, tuple, tuple]:
        check_return_solution(return_solution)
        outputs, new_st, solutions = _apply_children(
            self.layers, ps, st, self._inputs(x)
        )
        if return_solution:
            return self._connect(outputs), new_st, solutions
        return self._connect(outputs), new_st


class BranchLayer(AbstractLayer):
    """The same input given to several layers, their outputs returned as a tuple.

    **Arguments:**

    - `*layers`: at least one layer.

    **Inputs:**

    - `x`: the input of every layer.

    **Returns:**

    - `y`: a tuple, `y[i]` the output of `layers[i]`.
    - `st`: the updated state.
    - with `apply(..., return_solution=True)`, also a tuple of the layers'
        solutions by position: a DEQ model's `DeepEquilibriumSolution` (nested
        tuples for nested containers), `None` for a layer without one.

    **Parameters:**

    - A tuple, `ps[i]` the parameters of `layers[i]`.

    **States:**

    - A tuple, `st[i]` the state of `layers[i]`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    branch = nn.BranchLayer(nn.Dense(3, 2), nn.NoOpLayer())
    x = jnp.ones((5, 3))
    ps, st = branch.init(jax.random.key(0), x)
    (y0, y1), st = branch.apply(ps, st, x)
    assert y0.shape == (5, 2) and y1 is x
    ```
    """

    layers: tuple[AbstractLayer, ...]

    def __init__(self, *layers: AbstractLayer):
        self.layers = layers

    def __check_init__(self):
        _check_layers(self.layers, at_least_one=True)

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[tuple, tuple]:
        keys = _split_key(key, len(self.layers))
        ps, st = zip(
            *(
                layer.init(layer_key, x)
                for layer, layer_key in zip(self.layers, keys, strict=True)
            ),
            strict=True,
        )
        return ps, st

    def prepare(self, ps: tuple, st: tuple) -> tuple[tuple, tuple]:
        return _prepare_children(self.layers, ps, st)

    returns_solution: ClassVar[bool] = True

    def apply(
        self, ps: tuple, st: tuple, x: Any, *, return_solution: bool = False
    ) -> tuple[tuple, tuple] | tuple[tuple, tuple, tuple]:
        check_return_solution(return_solution)
        outputs, new_st, solutions = _apply_children(
            self.layers, ps, st, (x,) * len(self.layers)
        )
        if return_solution:
            return outputs, new_st, solutions
        return outputs, new_st
