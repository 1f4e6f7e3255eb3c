"""Variational dropout: one mask per forward pass, held fixed across solver
iterations."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ._core import AbstractLayer


class VariationalDropout(AbstractLayer):
    """Dropout whose mask stays fixed while a DEQ solves (Gal & Ghahramani, 2016;
    as torchdeq's `VariationalDropout`): a per-sample Bernoulli mask, scaled by
    `1 / (1 - rate)`.

    The mask is drawn from the key in the layer's state, and `apply` returns the
    state with the key advanced. A DEQ model evaluates its cell with one fixed state
    during a solve (the state is not threaded through solver iterations), so every
    iteration of one solve, and its backward pass, sees the same mask; the state the
    model returns carries the advanced key, so the next forward pass draws a new
    mask. In a per-sample solve (the default), each sample's keys are folded with
    its index, so samples get independent masks. Called directly, outside a DEQ,
    each call draws a fresh mask.

    **Arguments:**

    - `rate`: the probability of zeroing an entry, in `[0, 1)`.
    - `broadcast_axes`: axes along which one mask value is shared, e.g. `(1, 2)` on
        NHWC images drops whole channels (torchdeq's `VariationalDropout2d`). The
        batch axis 0 cannot be shared.
    - `inference`: if `True`, the layer is the identity
        (`equinox.nn.inference_mode(model)` sets it on a whole model).

    **Inputs:** `x`, an array, batch first.

    **Returns:** `x * mask`, and the state with its key advanced.

    **Parameters:** none, `ps == {}`.

    **States:** `{"key": ...}`, a typed PRNG key.

    **Example:**

    ```python
    import equinox as eqx, jax, jax.numpy as jnp
    from jaxdeq import nn

    layer = nn.VariationalDropout(0.5)
    x = jnp.ones((2, 8))
    ps, st = layer.init(jax.random.key(0), x)
    y, st = layer.apply(ps, st, x)  # entries are 0 or 2
    y_eval, _ = eqx.nn.inference_mode(layer).apply(ps, st, x)
    assert jnp.array_equal(y_eval, x)
    ```
    """

    rate: float = eqx.field(static=True)
    broadcast_axes: tuple[int, ...] = eqx.field(default=(), static=True)
    inference: bool = False

    def __init__(
        self, rate: float, broadcast_axes: Sequence[int] = (), *, inference=False
    ):
        self.rate = rate
        self.broadcast_axes = tuple(broadcast_axes)
        self.inference = inference

    def __check_init__(self):
        if isinstance(self.rate, bool) or not 0 <= self.rate < 1:
            raise ValueError(f"rate: expected a number in [0, 1), got {self.rate!r}")
        if any(
            isinstance(a, bool) or not isinstance(a, int) for a in self.broadcast_axes
        ):
            raise TypeError(
                "broadcast_axes: expected a sequence of ints, got "
                f"{self.broadcast_axes}"
            )
        if 0 in self.broadcast_axes:
            raise ValueError(
                "`broadcast_axes` cannot hold the batch axis 0: each sample needs its "
                "own mask."
            )

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # typed, so per-sample solves see it
        return {}, {"key": key}

    def apply(self, ps: dict, st: dict, x: Array) -> tuple[Array, dict]:
        if self.inference or self.rate == 0:
            return x, st
        ndim = jnp.ndim(x)
        axes = {a % ndim for a in self.broadcast_axes} if ndim else set()
        if not ndim or any(not -ndim <= a < ndim for a in self.broadcast_axes):
            raise ValueError(
                f"x: expected a batch-first array with the axes "
                f"{self.broadcast_axes}, got shape {jnp.shape(x)}"
            )
        next_key, mask_key = jax.random.split(st["key"])
        shape = tuple(1 if i in axes else n for i, n in enumerate(jnp.shape(x)))
        keep = jax.random.bernoulli(mask_key, 1 - self.rate, shape)
        y = jnp.where(keep, x / (1 - self.rate), jnp.zeros((), x.dtype))
        return y.astype(x.dtype), {"key": next_key}
