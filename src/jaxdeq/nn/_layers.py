"""Basic layers: Dense and Conv (thin wrappers around flax.linen), NoOpLayer and
WrappedFunction."""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import flax.linen as linen
import jax.numpy as jnp
from jaxtyping import Array, DTypeLike, PRNGKeyArray

from ._core import AbstractLayer

_PADDING_STRINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_positive_int(name: str, value: Any) -> None:
    if not _is_positive_int(value):
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _int_or_tuple(name: str, value: Any) -> int | tuple[int, ...]:
    """Validates a positive int or a non-empty sequence of them; lists become tuples
    so that the layer stays hashable."""
    if _is_positive_int(value):
        return value
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(_is_positive_int(v) for v in value)
    ):
        return tuple(value)
    raise ValueError(
        f"{name}: expected a positive int or a non-empty sequence of positive ints, "
        f"got {value!r}"
    )


def _check_callable_or_none(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name}: expected callable or None, got {value!r}")


def _check_dtype_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    try:
        dtype = jnp.dtype(value)
    except TypeError as error:
        raise TypeError(f"{name}: expected a dtype or None, got {value!r}") from error
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"{name}: expected a floating or complex dtype, got {dtype}")


def _check_array(x: Any, expected: str) -> None:
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
        raise TypeError(f"x: expected an array of shape {expected}, got {type(x)}")


def _check_features(x: Any, in_features: int, expected: str) -> None:
    _check_array(x, expected)
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected shape {expected} with in_features={in_features} in its "
            f"last axis, got shape {x.shape}"
        )


def _param_dtype(param_dtype: DTypeLike | None, x: Array) -> DTypeLike:
    """`param_dtype=None` means: the dtype of `x` when it is inexact, otherwise JAX's
    default float (float32, or float64 under x64)."""
    if param_dtype is not None:
        return param_dtype
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return x.dtype
    return jnp.result_type(float)


def _initializers(kernel_init: Callable | None, bias_init: Callable | None) -> dict:
    """Only the initializers given are passed, so that flax's defaults apply to the
    others."""
    kwargs = {}
    if kernel_init is not None:
        kwargs["kernel_init"] = kernel_init
    if bias_init is not None:
        kwargs["bias_init"] = bias_init
    return kwargs


def _activate(activation: Callable | None, y: Array) -> Array:
    return y if activation is None else activation(y)


def _check_flax_fields(layer: Any) -> None:
    """The arguments Dense and Conv share with their flax.linen counterparts."""
    _check_positive_int("in_features", layer.in_features)
    _check_positive_int("out_features", layer.out_features)
    _check_callable_or_none("activation", layer.activation)
    if not isinstance(layer.use_bias, bool):
        raise TypeError(f"use_bias: expected a bool, got {layer.use_bias!r}")
    _check_callable_or_none("kernel_init", layer.kernel_init)
    _check_callable_or_none("bias_init", layer.bias_init)
    _check_dtype_or_none("dtype", layer.dtype)
    _check_dtype_or_none("param_dtype", layer.param_dtype)


class Dense(AbstractLayer):
    """A fully connected layer, `y = activation(x @ kernel + bias)`, delegating its
    initialisation and its math to `flax.linen.Dense`.

    **Arguments:**

    - `in_features`: the size of the last axis of the input.
    - `out_features`: the size of the last axis of the output.
    - `activation`: a function applied to the output, or `None` for none.
    - `use_bias`: whether to add a bias.
    - `kernel_init`, `bias_init`: `jax.nn.initializers`-style initializers, or `None`
      for flax's defaults (LeCun normal kernel, zero bias).
    - `dtype`: the dtype of the computation, or `None` to promote the input and the
      parameters (as in flax).
    - `param_dtype`: the dtype of the parameters created by `init`, or `None` (the
      default) for the dtype of the sample input when it is floating (so float64
      inputs under x64 get float64 parameters), and JAX's default float otherwise.

    **Inputs:**

    - `x`: an array of shape `(..., in_features)`, batch first.

    **Returns:**

    - `y`: an array of shape `(..., out_features)`.
    - `st`: the state, unchanged.

    **Parameters:**

    - `kernel`: shape `(in_features, out_features)`.
    - `bias`: shape `(out_features,)`, when `use_bias`.

    **States:**

    - None: `st == {}`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    layer = nn.Dense(3, 2, activation=jnp.tanh)
    x = jnp.ones((5, 3))
    ps, st = layer.init(jax.random.key(0), x)
    y, st = layer.apply(ps, st, x)
    assert y.shape == (5, 2)
    ```
    """

    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    activation: Callable[[Array], Array] | None = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    kernel_init: Callable | None = eqx.field(static=True)
    bias_init: Callable | None = eqx.field(static=True)
    dtype: DTypeLike | None = eqx.field(static=True)
    param_dtype: DTypeLike | None = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: Callable[[Array], Array] | None = None,
        use_bias: bool = True,
        *,
        kernel_init: Callable | None = None,
        bias_init: Callable | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.use_bias = use_bias
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self.dtype = dtype
        self.param_dtype = param_dtype

    def __check_init__(self):
        _check_flax_fields(self)

    def _linen(self, x: Array) -> linen.Dense:
        _check_features(x, self.in_features, "(..., in_features)")
        return linen.Dense(
            self.out_features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=_param_dtype(self.param_dtype, x),
            **_initializers(self.kernel_init, self.bias_init),
        )

    def init(self, key: PRNGKeyArray, x: Array) -> tuple[dict, dict]:
        return self._linen(x).init(key, x)["params"], {}

    def apply(self, ps: dict, st: dict, x: Array) -> tuple[Array, dict]:
        y = self._linen(x).apply({"params": ps}, x)
        return _activate(self.activation, y), st


class Conv(AbstractLayer):
    """An N-dimensional convolution over channels-last inputs (NHWC for images),
    delegating its initialisation and its math to `flax.linen.Conv`.

    **Arguments:**

    - `kernel_size`: an int for a square (cubic, ...) kernel whose spatial rank is
      `x.ndim - 2` (one batch axis), or a tuple of ints fixing the rank; with a tuple,
      any number of leading batch axes (including none) is accepted, as in flax.
    - `in_features`: the number of input channels (the last axis of `x`).
    - `out_features`: the number of output channels.
    - `activation`: a function applied to the output, or `None` for none.
    - `stride`: an int or a tuple of ints, one per spatial axis.
    - `padding`: `"SAME"`, `"VALID"`, `"CIRCULAR"`, `"REFLECT"`, `"CAUSAL"` (1D only),
      an int (the same padding on both sides of every spatial axis), or a sequence of
      ints or `(low, high)` pairs, one per spatial axis.
    - `use_bias`: whether to add a bias.
    - `kernel_init`, `bias_init`, `dtype`, `param_dtype`: as in [`jaxdeq.nn.Dense`][].

    **Inputs:**

    - `x`: an array of shape `(batch, *spatial, in_features)`.

    **Returns:**

    - `y`: an array of shape `(batch, *spatial_out, out_features)`; with `"SAME"`
      padding and stride 1, `spatial_out == spatial`.
    - `st`: the state, unchanged.

    **Parameters:**

    - `kernel`: shape `(*kernel_size, in_features, out_features)`.
    - `bias`: shape `(out_features,)`, when `use_bias`.

    **States:**

    - None: `st == {}`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    layer = nn.Conv(3, 1, 4, activation=jax.nn.relu)
    x = jnp.ones((2, 8, 8, 1))  # NHWC
    ps, st = layer.init(jax.random.key(0), x)
    y, st = layer.apply(ps, st, x)
    assert y.shape == (2, 8, 8, 4)
    ```
    """

    kernel_size: int | tuple[int, ...] = eqx.field(static=True)
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    activation: Callable[[Array], Array] | None = eqx.field(static=True)
    stride: int | tuple[int, ...] = eqx.field(static=True)
    padding: str | int | tuple = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    kernel_init: Callable | None = eqx.field(static=True)
    bias_init: Callable | None = eqx.field(static=True)
    dtype: DTypeLike | None = eqx.field(static=True)
    param_dtype: DTypeLike | None = eqx.field(static=True)

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        in_features: int,
        out_features: int,
        activation: Callable[[Array], Array] | None = None,
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int | tuple[int, int]] = "SAME",
        use_bias: bool = True,
        *,
        kernel_init: Callable | None = None,
        bias_init: Callable | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
    ):
        self.kernel_size = _int_or_tuple("kernel_size", kernel_size)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.stride = _int_or_tuple("stride", stride)
        self.padding = _canonical_padding(padding)
        self.use_bias = use_bias
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self.dtype = dtype
        self.param_dtype = param_dtype

    def __check_init__(self):
        _check_flax_fields(self)
        if isinstance(self.kernel_size, tuple):
            _check_rank("stride", self.stride, len(self.kernel_size))
            _check_rank("padding", self.padding, len(self.kernel_size))

    def _linen(self, x: Array) -> linen.Conv:
        if isinstance(self.kernel_size, tuple):
            rank = len(self.kernel_size)
            expected = f"(*batch, {rank} spatial axes, in_features)"
            _check_array(x, expected)
            if x.ndim < rank + 1:
                raise ValueError(
                    f"x: expected shape {expected} for kernel_size="
                    f"{self.kernel_size}, got shape {x.shape}"
                )
            kernel_size = self.kernel_size
        else:
            expected = "(batch, *spatial, in_features) with at least one spatial axis"
            _check_array(x, expected)
            if x.ndim < 3:
                raise ValueError(f"x: expected shape {expected}, got shape {x.shape}")
            rank = x.ndim - 2
            kernel_size = (self.kernel_size,) * rank
        _check_features(x, self.in_features, expected)
        _check_rank("stride", self.stride, rank)
        _check_rank("padding", self.padding, rank)
        return linen.Conv(
            self.out_features,
            kernel_size,
            strides=self.stride,
            padding=self.padding,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=_param_dtype(self.param_dtype, x),
            **_initializers(self.kernel_init, self.bias_init),
        )

    def init(self, key: PRNGKeyArray, x: Array) -> tuple[dict, dict]:
        return self._linen(x).init(key, x)["params"], {}

    def apply(self, ps: dict, st: dict, x: Array) -> tuple[Array, dict]:
        y = self._linen(x).apply({"params": ps}, x)
        return _activate(self.activation, y), st


def _canonical_padding(padding: Any) -> str | int | tuple:
    if isinstance(padding, str):
        if padding not in _PADDING_STRINGS:
            raise ValueError(
                f"padding: expected one of {_PADDING_STRINGS}, an int or a sequence, "
                f"got {padding!r}"
            )
        return padding
    if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
        return padding
    if isinstance(padding, Sequence):
        canonical = []
        for entry in padding:
            if isinstance(entry, int) and not isinstance(entry, bool) and entry >= 0:
                canonical.append(entry)
            elif (
                isinstance(entry, Sequence)
                and len(entry) == 2
                and all(isinstance(p, int) and not isinstance(p, bool) for p in entry)
            ):
                canonical.append(tuple(entry))
            else:
                break
        else:
            return tuple(canonical)
    raise ValueError(
        f"padding: expected one of {_PADDING_STRINGS}, a non-negative int, or a "
        f"sequence of non-negative ints or (low, high) pairs, got {padding!r}"
    )


def _check_rank(name: str, value: Any, rank: int) -> None:
    if isinstance(value, tuple) and len(value) != rank:
        raise ValueError(
            f"{name}: expected one entry per spatial axis ({rank}), got {value!r}"
        )


class NoOpLayer(AbstractLayer):
    """The identity layer, `y = x`. Useful as a placeholder in containers, e.g. on the
    diagonal of a multiscale model's mapping layers.

    **Arguments:**

    None.

    **Inputs:**

    - `x`: any pytree.

    **Returns:**

    - `y`: `x` itself.
    - `st`: the state, unchanged.

    **Parameters:**

    - None: `ps == {}`.

    **States:**

    - None: `st == {}`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    layer = nn.NoOpLayer()
    x = jnp.ones((2, 3))
    ps, st = layer.init(jax.random.key(0), x)
    y, st = layer.apply(ps, st, x)
    assert y is x
    ```
    """

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        return {}, {}

    def apply(self, ps: dict, st: dict, x: Any) -> tuple[Any, dict]:
        return x, st


class WrappedFunction(AbstractLayer):
    """A layer applying a plain function without parameters or state, `y = fn(x)`.

    **Arguments:**

    - `fn`: a function `x -> y` (a JAX-traceable one, for `jit`, `vmap` and `grad`).

    **Inputs:**

    - `x`: whatever `fn` takes.

    **Returns:**

    - `y`: `fn(x)`.
    - `st`: the state, unchanged.

    **Parameters:**

    - None: `ps == {}`.

    **States:**

    - None: `st == {}`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    layer = nn.WrappedFunction(lambda x: x.reshape(x.shape[0], -1))
    x = jnp.ones((2, 3, 4))
    ps, st = layer.init(jax.random.key(0), x)
    y, st = layer.apply(ps, st, x)
    assert y.shape == (2, 12)
    ```
    """

    fn: Callable[[Any], Any] = eqx.field(static=True)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(f"fn: expected callable, got {self.fn!r}")

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        return {}, {}

    def apply(self, ps: dict, st: dict, x: Any) -> tuple[Any, dict]:
        return self.fn(x), st
