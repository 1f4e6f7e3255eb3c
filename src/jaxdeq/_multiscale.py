"""Multiscale DEQs (Bai et al., 2020): the state is a tuple with one array per scale.

One application of the map, as in DeepEquilibriumNetworks.jl:

```
m_0 = main_layers[0]((z_0, x))         # x enters scale 0 only
m_i = main_layers[i](z_i)              # i > 0
z'_j = sum_i mapping_layers[i][j](m_i) # row i: from scale i; column j: to scale j
z'_j = post_fuse_layer[j](z'_j)        # when post_fuse_layer is not None
```

The map is handed to the shared engine (`solve_equilibrium`) as a batched cell on the
tuple state, so every solver, gradient mode and option of the single-scale model
works unchanged.
"""

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray

from ._equilibrium import EquilibriumConfig
from ._model import AbstractEquilibriumModel
from .nn._core import AbstractLayer

_CELL_GROUPS = ("main", "mapping", "post_fuse")
# One layer call in `_fuse`: (group, index, layer, input) -> output.
_LayerCall = Callable[[str, tuple[int, ...], AbstractLayer, Any], Any]


def _check_layer(name: str, layer: Any) -> None:
    if not isinstance(layer, AbstractLayer):
        raise TypeError(
            f"{name}: expected a jaxdeq.nn layer (wrap plain functions in "
            "nn.WrappedFunction, Flax/Equinox modules with nn.from_flax / "
            f"nn.from_equinox), got {type(layer).__name__}"
        )


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _layer_tuple(name: str, layers: Any, length: int | None) -> tuple:
    if not _is_sequence(layers) or isinstance(layers, AbstractLayer):
        raise TypeError(
            f"{name}: expected a tuple of jaxdeq.nn layers, got {type(layers).__name__}"
        )
    if length is not None and len(layers) != length:
        raise ValueError(
            f"{name}: expected one layer per scale ({length}, the length of "
            f"main_layers), got {len(layers)}"
        )
    for i, layer in enumerate(layers):
        _check_layer(f"{name}[{i}]", layer)
    return tuple(layers)


def _mapping_matrix(mapping_layers: Any, n: int) -> tuple[tuple, ...]:
    if not _is_sequence(mapping_layers) or len(mapping_layers) != n:
        length = len(mapping_layers) if _is_sequence(mapping_layers) else "n/a"
        raise ValueError(
            f"mapping_layers: expected an N x N tuple of tuples of layers with N = "
            f"{n} (the number of scales), got {type(mapping_layers).__name__} with "
            f"{length} rows"
        )
    for i, row in enumerate(mapping_layers):
        if not _is_sequence(row) or isinstance(row, AbstractLayer) or len(row) != n:
            length = len(row) if _is_sequence(row) else "n/a"
            raise ValueError(
                f"mapping_layers[{i}]: expected a row of {n} layers (the matrix must "
                f"be N x N with N = {n}), got {type(row).__name__} of length {length}"
            )
        for j, layer in enumerate(row):
            _check_layer(f"mapping_layers[{i}][{j}]", layer)
    return tuple(tuple(row) for row in mapping_layers)


def _scales(scales: Any, n: int) -> tuple[tuple[int, ...], ...]:
    if not _is_sequence(scales):
        raise ValueError(
            "scales: expected a tuple with one shape (a tuple of positive ints, "
            f"without the batch axis) per scale, got {scales!r}"
        )
    if len(scales) != n:
        raise ValueError(
            f"scales: expected one shape per main layer ({n}), got {len(scales)}"
        )
    for i, shape in enumerate(scales):
        if not (
            _is_sequence(shape)
            and all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
            )
        ):
            raise ValueError(
                f"scales[{i}]: expected a tuple of positive ints (the shape of scale "
                f"{i} without the batch axis), got {shape!r}"
            )
    return tuple(tuple(shape) for shape in scales)


def _resolve_init(init: Any, n: int) -> tuple[str, tuple | None]:
    if init is None:
        return "skip_reg", None
    if isinstance(init, str):
        if init != "zeros":
            raise ValueError(
                "init: expected 'zeros', None (skip-reg: z0 = one application of the "
                f"map from zeros) or a tuple of layers, one per scale, got {init!r}"
            )
        return "zeros", None
    return "layer", _layer_tuple("init", init, n)


def _check_fits(name: str, out: Any, target: Array, scale: int) -> None:
    """`out` must be one array shaped like the state of scale `scale`."""
    if not hasattr(out, "shape") or out.shape != target.shape:
        got = out.shape if hasattr(out, "shape") else type(out).__name__
        raise ValueError(
            f"{name}: its output must fit scale {scale}, shape (batch, *scales"
            f"[{scale}]) = {target.shape}, got {got}"
        )


class MultiScaleDeepEquilibriumNetwork(AbstractEquilibriumModel):
    """Multiscale deep equilibrium network (Bai et al., 2020): a DEQ whose state is a
    tuple of arrays, one per scale, coupled by a matrix of mapping layers.

    One application of the map `f(z, x)`: `m_0 = main_layers[0]((z_0, x))` (the input
    enters scale 0 only), `m_i = main_layers[i](z_i)` for `i > 0`, then
    `z'_j = sum_i mapping_layers[i][j](m_i)`, then `z'_j = post_fuse_layer[j](z'_j)`
    when `post_fuse_layer` is given. The output is the fixed point `z* = f(z*, x)`.

    **Arguments:**

    - `main_layers`: a tuple of `N` layers, one per scale; `main_layers[0]` takes the
        tuple `(z_0, x)`, the others `z_i`.
    - `mapping_layers`: an `N x N` tuple of tuples of layers; `mapping_layers[i][j]`
        maps `m_i` to scale `j` (its output must have shape `(batch, *scales[j])`);
        `nn.NoOpLayer()` on the diagonal.
    - `post_fuse_layer`: `None`, or a tuple of `N` layers applied to the fused state
        of each scale (shape-preserving).
    - `solver`: as in [`jaxdeq.DeepEquilibriumNetwork`][]: an optimistix root-finder
        or fixed-point solver, or a diffrax solver.
    - `scales`: a tuple of `N` shapes, `scales[i]` the shape of scale `i` without the
        batch axis, e.g. `((4,), (3,), (2,), (1,))`.
    - `init`: `"zeros"` (`z0` zeros), `None` (skip-reg: `z0` is one application of the
        map from zeros) or a tuple of `N` layers (Skip DEQ: `z0_i = init[i](x)`).
    - every other keyword argument of [`jaxdeq.DeepEquilibriumNetwork`][]
        (`jacobian_regularization`, `problem_type`, `adjoint`, `max_steps`,
        `fixed_depth`, `joint_solve`, `trace`, `sample_states`, `compute_dtype`,
        `throw`, `fallback`, solver options), with the same meaning on the tuple
        state (norms, residuals and Jacobian estimates span all scales).

    **Inputs:** `x`, batch-first; the input of `main_layers[0]` beside `z_0`.

    **Returns:** `(z*, st)`: `z*` a tuple of arrays of shapes `(batch, *scales[i])`;
    with `apply(..., return_solution=True)` also a
    [`jaxdeq.DeepEquilibriumSolution`][] whose `z_star`, `u0` and `residual` are
    tuples over scales too.

    **Parameters:** `{"main": (...), "mapping": ((...), ...), "post_fuse": (...),
    "init": (...)}`: tuples by position like the layers; `"post_fuse"` only with
    post-fuse layers, `"init"` only with init layers.

    **States:** the same keys, plus `"key"` (advanced by every `apply`: fresh
    Jacobian-regularization probes); nothing shaped by the batch.

    **Example:** the seed's example (batch-first):

    ```python
    >>> import jax, jax.numpy as jnp, optimistix as optx, jaxdeq
    >>> from jaxdeq import nn
    >>> t = jnp.tanh
    >>> main_layers = (
    ...     nn.Parallel(jnp.add, nn.Dense(4, 4, t, use_bias=False),
    ...                 nn.Dense(4, 4, t, use_bias=False)),
    ...     nn.Dense(3, 3, t), nn.Dense(2, 2, t), nn.Dense(1, 1, t))
    >>> sizes = (4, 3, 2, 1)
    >>> mapping_layers = tuple(
    ...     tuple(nn.NoOpLayer() if i == j else nn.Dense(a, b, t)
    ...           for j, b in enumerate(sizes))
    ...     for i, a in enumerate(sizes))
    >>> model = jaxdeq.MultiScaleDeepEquilibriumNetwork(
    ...     main_layers, mapping_layers, None, optx.Newton(rtol=1e-5, atol=1e-5),
    ...     ((4,), (3,), (2,), (1,)))
    >>> x = jnp.ones((12, 4))
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> z, st = model.apply(ps, st, x)
    >>> tuple(zi.shape for zi in z)
    ((12, 4), (12, 3), (12, 2), (12, 1))

    ```
    """

    main_layers: tuple[AbstractLayer, ...]
    mapping_layers: tuple[tuple[AbstractLayer, ...], ...]
    post_fuse_layer: tuple[AbstractLayer, ...] | None
    init_layers: tuple[AbstractLayer, ...] | None
    init_mode: Literal["zeros", "skip_reg", "layer"]
    scales: tuple[tuple[int, ...], ...]
    config: EquilibriumConfig

    def __init__(
        self,
        main_layers: Sequence[AbstractLayer],
        mapping_layers: Sequence[Sequence[AbstractLayer]],
        post_fuse_layer: Sequence[AbstractLayer] | None,
        solver: Any,
        scales: Sequence[Sequence[int]],
        *,
        init: Literal["zeros"] | Sequence[AbstractLayer] | None = "zeros",
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
        self.main_layers = _layer_tuple("main_layers", main_layers, None)
        n = len(self.main_layers)
        if n == 0:
            raise ValueError("main_layers: expected at least one layer (one per scale)")
        self.scales = _scales(scales, n)
        self.mapping_layers = _mapping_matrix(mapping_layers, n)
        self.post_fuse_layer = (
            None
            if post_fuse_layer is None
            else _layer_tuple("post_fuse_layer", post_fuse_layer, n)
        )
        self.init_mode, self.init_layers = _resolve_init(init, n)
        # The solve settings are exactly the single-scale model's, validated there.
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

    cell_name: ClassVar[str] = "main_layers"
    init_in_one_program: ClassVar[bool] = True

    def _fuse(self, z: tuple, x: Any, call: _LayerCall) -> tuple:
        """One application of the map, every layer run through `call`."""
        n = len(self.main_layers)
        m = []
        for i, layer in enumerate(self.main_layers):
            try:
                m.append(call("main", (i,), layer, (z[0], x) if i == 0 else z[i]))
            except (ValueError, TypeError) as error:
                raise type(error)(
                    f"main_layers[{i}]: cannot take the state of scale {i}, shape "
                    f"(batch, *scales[{i}]) = {z[i].shape}"
                    + (f" (with x: {jax.eval_shape(lambda: x)})" if i == 0 else "")
                    + f": {error}"
                ) from error
        fused = []
        for j in range(n):
            total = None
            for i in range(n):
                out = call("mapping", (i, j), self.mapping_layers[i][j], m[i])
                _check_fits(f"mapping_layers[{i}][{j}]", out, z[j], j)
                total = out if total is None else total + out
            fused.append(total)
        if self.post_fuse_layer is not None:
            for j, layer in enumerate(self.post_fuse_layer):
                fused[j] = call("post_fuse", (j,), layer, fused[j])
                _check_fits(f"post_fuse_layer[{j}]", fused[j], z[j], j)
        return tuple(fused)

    def _cell(self, ps, st, z, x):
        """The batched cell for `solve_equilibrium`: `(f(z, x), new cell state)`."""
        new_st = {group: {} for group in st}

        def call(group, index, layer, inp):
            out, new_st[group][index] = layer.apply(
                _at(ps[group], index), _at(st[group], index), inp
            )
            return out

        fz = self._fuse(tuple(z), x, call)
        return fz, self._nest(new_st)

    def _nest(self, records: dict[str, dict[tuple[int, ...], Any]]) -> dict:
        """Per-layer records keyed by `(group, index)` -> the ps/st layout."""
        n = len(self.main_layers)
        nested = {"main": tuple(records["main"][(i,)] for i in range(n))}
        nested["mapping"] = tuple(
            tuple(records["mapping"][(i, j)] for j in range(n)) for i in range(n)
        )
        if self.post_fuse_layer is not None:
            nested["post_fuse"] = tuple(records["post_fuse"][(j,)] for j in range(n))
        return nested

    def _zeros(self, x) -> tuple[Array, ...]:
        leaf = jtu.tree_leaves(x)[0]
        dtype = leaf.dtype
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.result_type(float)
        return tuple(jnp.zeros((leaf.shape[0], *shape), dtype) for shape in self.scales)

    def _init_states(self, ps, st, x, zeros) -> tuple[tuple, Any]:
        """Apply the init layers and check that their outputs fit the scales."""
        z, init_st = [], []
        for i, layer in enumerate(self.init_layers):
            out, layer_st = layer.apply(ps["init"][i], st["init"][i], x)
            _check_fits(f"init[{i}]", out, zeros[i], i)
            z.append(out)
            init_st.append(layer_st)
        return tuple(z), tuple(init_st)

    def _initial_state(self, ps, st, cell_ps, cell_st, x):
        """`(u0, z0, init layers' state)`."""
        zeros = self._zeros(x)
        if self.init_mode == "layer":
            u0, st_init = self._init_states(ps, st, x, zeros)
            return u0, u0, st_init
        if self.init_mode == "zeros":
            return zeros, zeros, None
        u0, _ = self._cell(cell_ps, cell_st, zeros, x)
        return u0, u0, None

    def _indexed_layers(self):
        """`((group, index), layer)` for every layer of the cell."""
        n = len(self.main_layers)
        for i, layer in enumerate(self.main_layers):
            yield ("main", (i,)), layer
        for i in range(n):
            for j in range(n):
                yield ("mapping", (i, j)), self.mapping_layers[i][j]
        for j, layer in enumerate(self.post_fuse_layer or ()):
            yield ("post_fuse", (j,)), layer

    def _prepare(self, ps: dict, st: dict) -> tuple[dict, dict]:
        """Every cell layer's `prepare` (see `AbstractLayer.prepare`), run once per
        forward pass instead of at every solver iteration."""
        new_ps, new_st = {group: {} for group in ps}, {group: {} for group in st}
        for (group, index), layer in self._indexed_layers():
            new_ps[group][index], new_st[group][index] = layer.prepare(
                _at(ps[group], index), _at(st[group], index)
            )
        return self._nest(new_ps), self._nest(new_st)

    def _init_layers(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        # (traced inside `init`'s one program, see `_model.AbstractEquilibriumModel`)
        return self._layers_init(key, x)

    def _cell_part(self, tree: dict) -> dict:
        return _cell_part(tree)

    def _with_cell_state(self, st: dict, cell_st: dict) -> dict:
        return dict(st, **cell_st)

    def _output(self, z) -> tuple[Array, ...]:
        return tuple(z)

    def _layers_init(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        """Every layer's `(ps, st)`, each layer initialised on its sample input."""
        cell_key, init_key = jax.random.split(key)
        ps, st = {}, {}
        z = self._zeros(x)
        if self.init_mode == "layer":
            keys = jax.random.split(init_key, len(self.init_layers))
            pairs = [
                layer.init(k, x)
                for layer, k in zip(self.init_layers, keys, strict=True)
            ]
            ps["init"] = tuple(pair[0] for pair in pairs)
            st["init"] = tuple(pair[1] for pair in pairs)
            z, _ = self._init_states(ps, st, x, z)
        group_keys = dict(
            zip(
                _CELL_GROUPS, jax.random.split(cell_key, len(_CELL_GROUPS)), strict=True
            )
        )
        layer_ps = {group: {} for group in _CELL_GROUPS}
        layer_st = {group: {} for group in _CELL_GROUPS}

        def call(group, index, layer, inp):
            layer_key = group_keys[group]
            for k in index:
                layer_key = jax.random.fold_in(layer_key, k)
            one_ps, one_st = layer.init(layer_key, inp)
            layer_ps[group][index], layer_st[group][index] = one_ps, one_st
            # The next layer's sample input: zeros of the output's shape and dtype,
            # so that only the initialisers are compiled, not the map itself.
            out = jax.eval_shape(lambda: layer.apply(one_ps, one_st, inp)[0])
            return jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out)

        self._fuse(z, x, call)
        return dict(ps, **self._nest(layer_ps)), dict(st, **self._nest(layer_st))


def _at(tree: Any, index: tuple[int, ...]) -> Any:
    for k in index:
        tree = tree[k]
    return tree


def _cell_part(tree: dict) -> dict:
    return {group: tree[group] for group in _CELL_GROUPS if group in tree}


def MultiScaleSkipDeepEquilibriumNetwork(
    main_layers: Sequence[AbstractLayer],
    mapping_layers: Sequence[Sequence[AbstractLayer]],
    post_fuse_layer: Sequence[AbstractLayer] | None,
    init: Sequence[AbstractLayer] | None,
    solver: Any,
    scales: Sequence[Sequence[int]],
    **kwargs,
) -> MultiScaleDeepEquilibriumNetwork:
    """Multiscale Skip DEQ (Pal et al., 2022): a
    [`jaxdeq.MultiScaleDeepEquilibriumNetwork`][] whose initial state is predicted
    from the input, `z0_i = init[i](x)` (one layer per scale, each giving shape
    `(batch, *scales[i])`, trained through skip losses on `solution.u0`); with
    `init=None` it is the skip-reg variant, `z0` one application of the map from
    zeros. Keyword arguments are those of `MultiScaleDeepEquilibriumNetwork`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optimistix as optx, jaxdeq
    >>> from jaxdeq import nn
    >>> main = (nn.Parallel(jnp.add, nn.Dense(3, 3, jnp.tanh), nn.NoOpLayer()),
    ...         nn.Dense(2, 2, jnp.tanh))
    >>> mapping = ((nn.NoOpLayer(), nn.Dense(3, 2)), (nn.Dense(2, 3), nn.NoOpLayer()))
    >>> model = jaxdeq.MultiScaleSkipDeepEquilibriumNetwork(
    ...     main, mapping, None, (nn.Dense(3, 3), nn.Dense(3, 2)),
    ...     optx.Newton(rtol=1e-5, atol=1e-5), ((3,), (2,)))
    >>> ps, st = model.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> sorted(ps)
    ['init', 'main', 'mapping']

    ```
    """
    return MultiScaleDeepEquilibriumNetwork(
        main_layers,
        mapping_layers,
        post_fuse_layer,
        solver,
        scales,
        init=init,
        **kwargs,
    )


def MultiScaleNeuralODE(
    main_layers: Sequence[AbstractLayer],
    mapping_layers: Sequence[Sequence[AbstractLayer]],
    post_fuse_layer: Sequence[AbstractLayer] | None,
    solver: Any,
    scales: Sequence[Sequence[int]],
    **kwargs,
) -> MultiScaleDeepEquilibriumNetwork:
    """Multiscale neural ODE: a [`jaxdeq.MultiScaleDeepEquilibriumNetwork`][] with
    `problem_type="ode"`, integrating `dz/dt = f(z, x) - z` on `t in [0, 1]` with the
    diffrax `solver` and returning `z(1)`, a tuple over scales. Keyword arguments are
    those of `MultiScaleDeepEquilibriumNetwork` (except `problem_type`).

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, diffrax, jaxdeq
    >>> from jaxdeq import nn
    >>> main = (nn.Parallel(jnp.add, nn.Dense(3, 3, jnp.tanh), nn.NoOpLayer()),
    ...         nn.Dense(2, 2, jnp.tanh))
    >>> mapping = ((nn.NoOpLayer(), nn.Dense(3, 2)), (nn.Dense(2, 3), nn.NoOpLayer()))
    >>> model = jaxdeq.MultiScaleNeuralODE(
    ...     main, mapping, None, diffrax.Tsit5(), ((3,), (2,)))
    >>> ps, st = model.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> z, st = model.apply(ps, st, jnp.ones((4, 3)))
    >>> [zi.shape for zi in z]
    [(4, 3), (4, 2)]

    ```
    """
    if "problem_type" in kwargs:
        raise TypeError(
            "problem_type: MultiScaleNeuralODE always integrates an ODE on [0, 1]; "
            "use MultiScaleDeepEquilibriumNetwork to choose the problem type"
        )
    return MultiScaleDeepEquilibriumNetwork(
        main_layers,
        mapping_layers,
        post_fuse_layer,
        solver,
        scales,
        problem_type="ode",
        **kwargs,
    )
