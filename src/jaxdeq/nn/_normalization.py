"""Weight and spectral normalization of a layer's kernel, computed once per forward.

A DEQ applies its cell at every solver iteration. Normalizing the kernel inside
`apply` would redo the normalization (and, for spectral norm, the power iteration)
at every iteration, although it depends on the parameters only. These wrappers
implement the `prepare` hook instead: a DEQ model calls `prepare` once before the
solve and every iteration reuses the normalized kernel. Called directly, without
`prepare`, `apply` normalizes by itself, so the wrappers are ordinary layers too.

The math is that of `flax.linen.WeightNorm` / `flax.linen.SpectralNorm` (and
`equinox.nn.WeightNorm` / `equinox.nn.SpectralNorm`): the kernel is viewed as a
matrix `(fan_in, out_features)` (all axes but the last, against the last). Those
implementations are not reused because they fuse the normalization into the wrapped
module's call (flax through `map_variables`, equinox on a module holding its
arrays), which is exactly the per-iteration cost this module avoids; their
normalization helpers are private.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ._core import AbstractLayer

_PREPARED = "normalized"  # ps of a prepared wrapper: {"normalized": layer's ps}


def _check_layer(layer: Any) -> None:
    if not isinstance(layer, AbstractLayer):
        raise TypeError(f"layer: expected a jaxdeq layer, got {type(layer)}")


def _kernel(layer_ps: Any, weight_name: str, wrapper: str) -> Array:
    if not isinstance(layer_ps, dict) or weight_name not in layer_ps:
        keys = sorted(layer_ps) if isinstance(layer_ps, dict) else type(layer_ps)
        raise ValueError(
            f"{wrapper}: the wrapped layer's parameters have no {weight_name!r} to "
            f"normalize (got {keys}); wrap a layer such as `nn.Dense` or `nn.Conv`, "
            "or pass `weight_name=`."
        )
    kernel = layer_ps[weight_name]
    if jnp.ndim(kernel) < 2:
        raise ValueError(
            f"{wrapper}: {weight_name!r} must have at least 2 axes (fan-in ..., "
            f"out_features), got shape {jnp.shape(kernel)}"
        )
    return kernel


def _l2_normalize(x: Array, eps: float) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


class WeightNorm(AbstractLayer):
    """Weight normalization (Salimans & Kingma, 2016) of a layer's kernel:
    `kernel = scale * direction / ||direction||`, the norm taken per output feature
    over all other axes (the kernel's last axis is its output axis, as in `nn.Dense`
    and `nn.Conv`).

    The normalized kernel is computed in `prepare`, once per forward pass of a DEQ
    model, not at every solver iteration.

    **Arguments:**

    - `layer`: the wrapped layer; its parameters must be a dict holding `weight_name`.
    - `weight_name`: the parameter to normalize, `"kernel"` by default.

    **Inputs:** those of `layer`.

    **Returns:** those of `layer`.

    **Parameters:** `{"layer": ..., "scale": ...}`: the wrapped layer's parameters
    with `weight_name` holding the direction, and `scale` of shape
    `(out_features,)`, initialized to the norms of the initial kernel (so the
    wrapped layer starts as the unwrapped one).

    **States:** `{"layer": ...}`, the wrapped layer's state.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    layer = nn.WeightNorm(nn.Dense(3, 4))
    x = jnp.ones((2, 3))
    ps, st = layer.init(jax.random.key(0), x)
    y, st = layer.apply(ps, st, x)
    prepared_ps, prepared_st = layer.prepare(ps, st)  # what a DEQ model does
    assert jnp.allclose(layer.apply(prepared_ps, prepared_st, x)[0], y)
    ```
    """

    layer: AbstractLayer
    weight_name: str = eqx.field(default="kernel", static=True)

    def __check_init__(self):
        _check_layer(self.layer)

    def _normalized(self, ps: dict) -> Any:
        direction = _kernel(ps["layer"], self.weight_name, "WeightNorm")
        axes = tuple(range(direction.ndim - 1))
        norm = jnp.sqrt(jnp.sum(jnp.square(direction), axis=axes))
        factor = ps["scale"] / norm  # (out,): broadcast over the kernel's last axis
        kernel = direction * jnp.reshape(factor, (1,) * (direction.ndim - 1) + (-1,))
        return dict(ps["layer"], **{self.weight_name: kernel})

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        layer_ps, layer_st = self.layer.init(key, x)
        kernel = _kernel(layer_ps, self.weight_name, "WeightNorm")
        axes = tuple(range(kernel.ndim - 1))
        scale = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=axes))
        return {"layer": layer_ps, "scale": scale}, {"layer": layer_st}

    def prepare(self, ps: dict, st: dict) -> tuple[dict, dict]:
        if _PREPARED in ps:
            return ps, st
        layer_ps, layer_st = self.layer.prepare(self._normalized(ps), st["layer"])
        return {_PREPARED: layer_ps}, {"layer": layer_st}

    def apply(self, ps: dict, st: dict, x: Any) -> tuple[Any, dict]:
        layer_ps = ps[_PREPARED] if _PREPARED in ps else self._normalized(ps)
        y, layer_st = self.layer.apply(layer_ps, st["layer"], x)
        return y, {"layer": layer_st}


class SpectralNorm(AbstractLayer):
    """Spectral normalization (Miyato et al., 2018) of a layer's kernel:
    `kernel / sigma`, with `sigma` the largest singular value of the kernel viewed as
    a `(fan_in, out_features)` matrix, estimated by power iteration. The power
    iteration's vector persists in the state, so one iteration per forward pass
    suffices in training.

    The normalized kernel (and the power iteration) is computed in `prepare`, once
    per forward pass of a DEQ model, not at every solver iteration.

    **Arguments:**

    - `layer`: the wrapped layer; its parameters must be a dict holding `weight_name`.
    - `n_power_iterations`: power-iteration steps per forward pass (>= 1).
    - `eps`: guards the normalization of the power-iteration vectors.
    - `weight_name`: the parameter to normalize, `"kernel"` by default.
    - `inference`: if `True`, the state's vector is used without iterating or
        updating it (`equinox.nn.inference_mode(model)` sets it on a whole model).

    **Inputs:** those of `layer`.

    **Returns:** those of `layer`.

    **Parameters:** `{"layer": ...}`, the wrapped layer's (unnormalized) parameters.

    **States:** `{"u": ..., "layer": ...}`: the power iteration's right singular
    vector estimate, shape `(out_features,)`, and the wrapped layer's state.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdeq import nn

    layer = nn.SpectralNorm(nn.Dense(4, 4), n_power_iterations=20)
    x = jnp.ones((2, 4))
    ps, st = layer.init(jax.random.key(0), x)
    prepared_ps, prepared_st = layer.prepare(ps, st)
    kernel = prepared_ps["normalized"]["kernel"]
    assert jnp.allclose(jnp.linalg.norm(kernel, ord=2), 1.0, atol=1e-3)
    ```
    """

    layer: AbstractLayer
    n_power_iterations: int = eqx.field(default=1, static=True)
    eps: float = eqx.field(default=1e-12, static=True)
    weight_name: str = eqx.field(default="kernel", static=True)
    inference: bool = False

    def __check_init__(self):
        _check_layer(self.layer)
        n = self.n_power_iterations
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n_power_iterations: expected an int >= 1, got {n!r}")
        if not self.eps > 0:
            raise ValueError(f"eps: expected positive, got {self.eps!r}")

    def _normalized(self, ps: dict, st: dict) -> tuple[Any, Array]:
        kernel = _kernel(ps["layer"], self.weight_name, "SpectralNorm")
        matrix = jax.lax.stop_gradient(kernel.reshape(-1, kernel.shape[-1]))
        u = st["u"]
        if not self.inference:
            for _ in range(self.n_power_iterations):
                v = _l2_normalize(matrix @ u, self.eps)
                u = _l2_normalize(matrix.T @ v, self.eps)
        v = _l2_normalize(matrix @ u, self.eps)
        sigma = v @ kernel.reshape(-1, kernel.shape[-1]) @ u
        return dict(ps["layer"], **{self.weight_name: kernel / sigma}), u

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        layer_key, u_key = jax.random.split(key)
        layer_ps, layer_st = self.layer.init(layer_key, x)
        kernel = _kernel(layer_ps, self.weight_name, "SpectralNorm")
        u = jax.random.normal(u_key, kernel.shape[-1:], kernel.dtype)
        return {"layer": layer_ps}, {"u": _l2_normalize(u, self.eps), "layer": layer_st}

    def prepare(self, ps: dict, st: dict) -> tuple[dict, dict]:
        if _PREPARED in ps:
            return ps, st
        layer_ps, u = self._normalized(ps, st)
        layer_ps, layer_st = self.layer.prepare(layer_ps, st["layer"])
        return {_PREPARED: layer_ps}, {"u": u, "layer": layer_st}

    def apply(self, ps: dict, st: dict, x: Any) -> tuple[Any, dict]:
        if _PREPARED in ps:
            layer_ps, u = ps[_PREPARED], st["u"]
        else:
            layer_ps, u = self._normalized(ps, st)
        y, layer_st = self.layer.apply(layer_ps, st["layer"], x)
        return y, {"u": u, "layer": layer_st}
