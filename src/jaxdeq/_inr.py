"""The zoo's implicit neural representation: a DEQ coordinate network."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._deq import DeepEquilibriumNetwork
from ._zoo import default_solver
from .nn import Chain, Dense, NoOpLayer, Parallel, WrappedFunction


def _fourier_features(
    x: Float[Array, "batch dim"], frequencies: np.ndarray
) -> Float[Array, "batch features"]:
    """`[sin(pi f x), cos(pi f x)]` for every frequency `f` and coordinate axis."""
    angles = jnp.pi * x[..., :, None] * jnp.asarray(frequencies, x.dtype)[None, None]
    # (the trailing size written out: the batch may be empty)
    angles = angles.reshape(*x.shape[:-1], x.shape[-1] * len(frequencies))
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def deq_implicit_representation(
    solver: Any = None,
    *,
    in_features: int = 2,
    out_features: int = 3,
    width: int = 128,
    num_frequencies: int = 16,
    max_frequency: float = 32.0,
    cell_init_scale: float = 0.5,
    **deq_kwargs,
) -> Chain:
    """A DEQ coordinate network, an implicit neural representation as in Huang, Bai
    and Kolter (2021), "(Implicit)^2: Implicit layers for implicit representations":
    coordinates in `[-1, 1]^in_features` to values, e.g. pixel positions to RGB
    colours.

    `x -> Fourier features -> Dense(width) = u -> DEQ[z* = relu(W z* + u)] ->
    Dense(out_features)`, with `num_frequencies` frequencies per axis spaced
    geometrically from 1 to `max_frequency` (features `sin(pi f x)`, `cos(pi f x)`).

    The weight-tied `W` starts at `cell_init_scale / sqrt(width)` standard deviation
    (spectral norm about `2 cell_init_scale`; ReLU is 1-Lipschitz), a contraction at
    initialisation for the default 0.5 or less in practice; add
    `jacobian_regularization="forward"` and `solution.jacobian_loss` to the loss to
    keep it one.

    **Arguments:**

    - `solver`: the DEQ's solver; `None` (default): normwise Anderson, `rtol=1e-3`
        (see [`jaxdeq.mdeq_image_classifier`][]).
    - `in_features`: the coordinates' dimension.
    - `out_features`: the represented values' dimension (3 for RGB).
    - `width`: the DEQ state's width.
    - `num_frequencies`: Fourier frequencies per coordinate axis.
    - `max_frequency`: the highest frequency (in half-periods over `[-1, 1]`).
    - `cell_init_scale`: the init scale of `W`, below 1 for a contraction.
    - `**deq_kwargs`: keyword arguments of [`jaxdeq.DeepEquilibriumNetwork`][]
        (`max_steps`, `adjoint`, `jacobian_regularization`, ...).

    **Returns:** an `nn.Chain` of four layers mapping `(batch, in_features)` to
    `(batch, out_features)`; the DEQ is `model.layers[2]`, its solution
    `model.apply(ps, st, x, return_solution=True)[2][2]`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> model = jaxdeq.deq_implicit_representation(width=32, num_frequencies=4)
    >>> xy = jax.random.uniform(jax.random.key(1), (5, 2), minval=-1, maxval=1)
    >>> ps, st = model.init(jax.random.key(0), xy)
    >>> rgb, st, solutions = model.apply(ps, st, xy, return_solution=True)
    >>> rgb.shape, bool(jnp.all(solutions[2].result == jaxdeq.RESULTS.successful))
    ((5, 3), True)

    ```
    """
    for name, value in (
        ("in_features", in_features),
        ("out_features", out_features),
        ("width", width),
        ("num_frequencies", num_frequencies),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not max_frequency >= 1:
        raise ValueError(f"max_frequency: expected >= 1, got {max_frequency!r}")
    if not cell_init_scale > 0:
        raise ValueError(f"cell_init_scale: expected > 0, got {cell_init_scale!r}")
    frequencies = np.geomspace(1.0, max_frequency, num_frequencies)
    features = WrappedFunction(
        functools.partial(_fourier_features, frequencies=frequencies)
    )
    num_features = 2 * in_features * num_frequencies
    cell = Chain(
        Parallel(
            jnp.add,
            Dense(
                width,
                width,
                use_bias=False,
                kernel_init=jax.nn.initializers.normal(cell_init_scale / width**0.5),
            ),
            NoOpLayer(),
        ),
        WrappedFunction(jax.nn.relu),
    )
    deq = DeepEquilibriumNetwork(
        cell, default_solver() if solver is None else solver, **deq_kwargs
    )
    return Chain(features, Dense(num_features, width), deq, Dense(width, out_features))
