"""The zoo's sequence model: a weight-tied causal transformer block as a DEQ."""

import functools
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._deq import DeepEquilibriumNetwork
from ._zoo import default_solver
from .nn import Chain, Dense, WrappedFunction, from_flax


class _CausalBlock(linen.Module):
    """`h = LN(u + Attn(z))`, `z' = LN(h + MLP(h))`: causal multi-head attention
    over the sequence and a 4x-wide GELU MLP. Both output projections start at
    `init_scale` times their usual (LeCun-normal) size; the state `z` enters only
    through the attention, so the block is a contraction at initialisation."""

    width: int
    num_heads: int
    init_scale: float

    @linen.compact
    def __call__(self, inputs):
        z, u = inputs
        small = jax.nn.initializers.variance_scaling(
            self.init_scale**2, "fan_in", "truncated_normal"
        )
        mask = linen.make_causal_mask(jnp.ones(z.shape[:-1]))
        attention = linen.MultiHeadDotProductAttention(
            num_heads=self.num_heads, out_kernel_init=small
        )(z, mask=mask)
        h = linen.LayerNorm()(u + attention)
        hidden = jax.nn.gelu(linen.Dense(4 * self.width)(h))
        return linen.LayerNorm()(h + linen.Dense(self.width, kernel_init=small)(hidden))


def _embed(
    tokens: Int[Array, "batch time"], vocab_size: int
) -> Float[Array, "batch time vocab"]:
    return jax.nn.one_hot(tokens, vocab_size)


def _add_positions(h: Float[Array, "batch time width"]) -> Array:
    """Adds the sinusoidal position encoding of Vaswani et al. (2017)."""
    time, width = h.shape[-2:]
    position = np.arange(time)[:, None]
    rates = np.exp(-np.log(10_000.0) * np.arange(0, width, 2) / width)
    encoding = np.zeros((time, width))
    encoding[:, 0::2] = np.sin(position * rates)
    encoding[:, 1::2] = np.cos(position * rates[: width // 2])
    encoding = encoding.reshape((1,) * (h.ndim - 2) + encoding.shape)
    return h + jnp.asarray(encoding, h.dtype)


def causal_transformer_block(
    width: int, num_heads: int, init_scale: float = 0.1
) -> Any:
    """The cell of [`jaxdeq.deq_sequence_model`][] as a layer on `(z, u)`, both
    `(batch, time, width)`: `h = LayerNorm(u + CausalAttention(z))`,
    `z' = LayerNorm(h + MLP(h))` (a `flax.linen` module through `nn.from_flax`).
    Stacking two of them, each applied once from `z = 0`, gives the explicit
    2-layer model of the same width.

    **Arguments:**

    - `width`: the model width (divisible by `num_heads`).
    - `num_heads`: attention heads.
    - `init_scale`: the attention's and the MLP's output projections start at this
        times LeCun-normal.

    **Returns:** a `jaxdeq.nn` layer.
    """
    if width % num_heads:
        raise ValueError(
            f"width: expected a multiple of num_heads={num_heads}, got {width}"
        )
    return from_flax(_CausalBlock(width, num_heads, init_scale))


def deq_sequence_model(
    vocab_size: int,
    solver: Any = None,
    *,
    width: int = 64,
    num_heads: int = 4,
    init_scale: float = 0.1,
    **deq_kwargs,
) -> Chain:
    """A DEQ sequence model (Bai et al., 2019, "Deep equilibrium models"): a
    weight-tied causal transformer block solved to its fixed point, with one state
    per token; for character- or token-level language modelling.

    `tokens -> one-hot -> Dense(width) + sinusoidal positions = u ->
    DEQ[z* = LN(h + MLP(h)), h = LN(u + CausalAttention(z*))] -> Dense(vocab_size)`.

    The state enters the block only through the attention, whose output projection
    (like the MLP's) starts at `init_scale` times LeCun-normal: a contraction at
    initialisation. Train with `jacobian_regularization="forward"` and
    `solution.jacobian_loss` in the loss to keep it one.

    **Arguments:**

    - `vocab_size`: the number of token ids (inputs and logits).
    - `solver`: the DEQ's solver; `None` (default): normwise Anderson, `rtol=1e-3`
        (see [`jaxdeq.mdeq_image_classifier`][]).
    - `width`: the per-token state's width (divisible by `num_heads`).
    - `num_heads`: attention heads.
    - `init_scale`: see above.
    - `**deq_kwargs`: keyword arguments of [`jaxdeq.DeepEquilibriumNetwork`][].

    **Returns:** an `nn.Chain` mapping int tokens `(batch, time)` to next-token
    logits `(batch, time, vocab_size)` (position `t` sees tokens `0..t`); the DEQ
    is `model.layers[3]`, its solution
    `model.apply(ps, st, tokens, return_solution=True)[2][3]`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> model = jaxdeq.deq_sequence_model(30, width=16, num_heads=2)
    >>> tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 30)
    >>> ps, st = model.init(jax.random.key(0), tokens)
    >>> logits, st, solutions = model.apply(ps, st, tokens, return_solution=True)
    >>> solution = solutions[3]
    >>> logits.shape, bool(jnp.all(solution.result == jaxdeq.RESULTS.successful))
    ((2, 12, 30), True)

    ```
    """
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    cell = causal_transformer_block(width, num_heads, init_scale)
    deq = DeepEquilibriumNetwork(
        cell, default_solver() if solver is None else solver, **deq_kwargs
    )
    return Chain(
        WrappedFunction(functools.partial(_embed, vocab_size=vocab_size)),
        Dense(vocab_size, width, use_bias=False),
        WrappedFunction(_add_positions),
        deq,
        Dense(width, vocab_size),
    )
