"""Ready-made models built from jaxdeq's layers (the model zoo)."""

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, PRNGKeyArray

from ._init_program import init_program
from ._multiscale import MultiScaleDeepEquilibriumNetwork
from ._solution import DeepEquilibriumSolution
from ._solver import Anderson
from .nn import Chain, Conv, Dense, NoOpLayer, WrappedFunction, from_flax
from .nn._core import AbstractLayer


def _group_norm(num_groups: int) -> AbstractLayer:
    return from_flax(linen.GroupNorm(num_groups=num_groups))


# The last conv of each block starts at a tenth of LeCun-normal: the block's output
# then depends on `z` only weakly next to the injection (scale 0) or to the other
# scales (coarser scales), so the map is a contraction at initialisation.
_BLOCK_INIT_SCALE = 0.1


def _scaled_lecun_normal(scale: float):
    return jax.nn.initializers.variance_scaling(scale**2, "fan_in", "truncated_normal")


def _upsample(y: Array, factor: int) -> Array:
    """Nearest-neighbour upsampling of NHWC images by an integer factor."""
    return jnp.repeat(jnp.repeat(y, factor, axis=1), factor, axis=2)


def _head_grid(height: int, width: int, grid: int) -> tuple[int, int]:
    return min(grid, height), min(grid, width)


def _pool_and_concatenate(zs: tuple[Array, ...], grid: int) -> Array:
    """Every scale through a ReLU, average-pooled (antialiased resize) to a small
    `grid x grid` map, flattened; the scales' features concatenated. A coarse grid
    rather than global pooling: small models have too few channels for a global
    average to tell classes apart."""
    features = []
    for z in zs:
        batch, height, width, channels = z.shape
        pooled = jax.image.resize(
            jax.nn.relu(z),
            (batch, *_head_grid(height, width, grid), channels),
            method="linear",
        )
        # (the trailing size written out: the batch may be empty)
        features.append(pooled.reshape(batch, math.prod(pooled.shape[1:])))
    return jnp.concatenate(features, axis=-1)


class MDEQBlock(AbstractLayer):
    """The residual block of MDEQ (Bai et al., 2020) for one scale, with 3x3
    convolutions and GroupNorm. With `injection=True` (scale 0):
    `h = relu(GN(conv1(z)))`, `h = GN(conv2(h) + x)`, `y = relu(GN(h + z))`; without
    (the coarser scales, which see no input): `y = relu(conv2(relu(GN(conv1(z)))))`,
    no normalization after `conv2` and no residual, so that the block stays small next
    to what the other scales bring in. `conv2` starts at a tenth of LeCun-normal: the
    model is a contraction at initialisation.

    **Arguments:**

    - `channels`: the number of channels of the scale.
    - `num_groups`: GroupNorm's number of groups (divides `channels`).
    - `injection`: whether the block takes `(z, x)` and adds `x` (scale 0).

    **Inputs:** `z` (NHWC), or `(z, x)` with `injection`, `x` shaped like `z`.

    **Returns:** `y` shaped like `z`, and the state.

    **Parameters:** `{"conv1", "norm1", "conv2", "norm2", "norm3"}` (`"norm2"` and
    `"norm3"` only with `injection`).

    **States:** the same keys, each `{}`.
    """

    channels: int = eqx.field(static=True)
    num_groups: int = eqx.field(static=True)
    injection: bool = eqx.field(static=True)

    def _layers(self) -> dict[str, AbstractLayer]:
        c = self.channels
        small = _scaled_lecun_normal(_BLOCK_INIT_SCALE)
        layers = {
            "conv1": Conv(3, c, c, use_bias=False),
            "norm1": _group_norm(self.num_groups),
            "conv2": Conv(3, c, c, use_bias=False, kernel_init=small),
        }
        if self.injection:
            layers["norm2"] = _group_norm(self.num_groups)
            layers["norm3"] = _group_norm(self.num_groups)
        return layers

    def init(self, key: PRNGKeyArray, x: Any) -> tuple[dict, dict]:
        z = x[0] if self.injection else x
        layers = self._layers()
        keys = jax.random.split(key, len(layers))
        ps, st = {}, {}
        for k, (name, layer) in zip(keys, layers.items(), strict=True):
            ps[name], st[name] = layer.init(k, z)
        return ps, st

    def apply(self, ps: dict, st: dict, x: Any) -> tuple[Array, dict]:
        z, injected = x if self.injection else (x, None)
        layers = self._layers()

        def run(name, inp):
            return layers[name].apply(ps[name], st[name], inp)[0]

        h = jax.nn.relu(run("norm1", run("conv1", z)))
        h = run("conv2", h)
        if injected is None:
            return jax.nn.relu(h), st
        h = run("norm2", h + injected)
        return jax.nn.relu(run("norm3", h + z)), st


def _mapping(i: int, j: int, channels: Sequence[int], num_groups: int):
    """Scale `i` -> scale `j`: identity, strided 3x3 convs (+ GroupNorm) down, or a
    1x1 conv and nearest upsampling up (no normalization: the coarse scale's small
    output must not be scaled up)."""
    if i == j:
        return NoOpLayer()
    c_in, c_out = channels[i], channels[j]
    if i < j:
        steps = []
        for step in range(j - i):
            last = step == j - i - 1
            steps += [
                Conv(3, c_in, c_out if last else c_in, stride=2, use_bias=False),
                _group_norm(num_groups),
            ]
            if not last:
                steps.append(WrappedFunction(jax.nn.relu))
        return Chain(*steps)
    return Chain(
        Conv(1, c_in, c_out, use_bias=False),
        WrappedFunction(functools.partial(_upsample, factor=2 ** (i - j))),
    )


class MDEQImageClassifier(AbstractLayer):
    """An MDEQ-style image classifier (Bai et al., 2020): `stem -> deq -> head`.
    Build it with [`jaxdeq.mdeq_image_classifier`][].

    **Inputs:** images `(batch, height, width, in_channels)`.

    **Returns:** logits `(batch, num_classes)`, and the state.

    **Parameters:** `{"stem": ..., "deq": ..., "head": ...}`.

    **States:** the same keys.

    `apply(ps, st, x, *, max_steps=None, return_solution=False, z0=None, warm=None,
    anytime=None)`: as a DEQ model's (`z0` is a state of the DEQ: its
    `solution.z_star`); with `return_solution=True` it returns
    `(logits, st, solution)`, the DEQ's [`jaxdeq.DeepEquilibriumSolution`][].
    """

    stem: AbstractLayer
    deq: MultiScaleDeepEquilibriumNetwork
    head: AbstractLayer
    returns_solution: ClassVar[bool] = True

    @property
    def differentiates_initial_state(self) -> bool:
        """Whether derivatives flow into the DEQ's initial state (its warm start)."""
        return self.deq.differentiates_initial_state

    def init(self, key: PRNGKeyArray, x: Array) -> tuple[dict, dict]:
        # Sample inputs of the next part are zeros of the right shape: running the
        # solve at init time (as `nn.Chain` would) only costs time, and so would
        # tracing it (the DEQ's output has its state's shapes). Stem and head are
        # initialised as one compiled program each (see `_init_program`; eagerly,
        # the head's pooling and initialisers compile op by op).
        stem_key, deq_key, head_key = jax.random.split(key, 3)
        ps, st = {}, {}
        ps["stem"], st["stem"] = init_program(self.stem.init, stem_key, x)
        h = _zeros_like_output(self.stem, ps["stem"], st["stem"], x)
        ps["deq"], st["deq"] = self.deq.init(deq_key, h)
        z = self.deq._output(self.deq._zeros(h))
        ps["head"], st["head"] = init_program(self.head.init, head_key, z)
        return ps, st

    def apply(
        self,
        ps: dict,
        st: dict,
        x: Array,
        *,
        max_steps: int | Array | None = None,
        return_solution: bool = False,
        z0: Any = None,
        warm: Array | None = None,
        anytime: Any = None,
    ) -> tuple[Array, dict] | tuple[Array, dict, DeepEquilibriumSolution]:
        h, stem_st = self.stem.apply(ps["stem"], st["stem"], x)
        z, deq_st, solution = self.deq.apply(
            ps["deq"],
            st["deq"],
            h,
            max_steps=max_steps,
            return_solution=True,
            z0=z0,
            warm=warm,
            anytime=anytime,
        )
        logits, head_st = self.head.apply(ps["head"], st["head"], z)
        new_st = {"stem": stem_st, "deq": deq_st, "head": head_st}
        if return_solution:
            return logits, new_st, solution
        return logits, new_st


def _zeros_like_output(layer: AbstractLayer, ps, st, x):
    out = jax.eval_shape(lambda: layer.apply(ps, st, x)[0])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out)


def default_solver() -> Anderson:
    """The zoo's solver: Anderson acceleration stopping per sample once
    `||f(z) - z||_2 <= 1e-3 ||f(z)||_2` (+ `1e-6`), the normwise relative rule of DEQ
    practice (a fixed elementwise rule is needlessly strict on near-zero entries)."""
    return Anderson(rtol=1e-3, atol=1e-6, norm=optx.two_norm, termination="normwise")


def mdeq_image_classifier(
    solver: Any = None,
    *,
    num_classes: int = 10,
    image_size: int | tuple[int, int] = 32,
    in_channels: int = 3,
    channels: Sequence[int] = (8, 16, 32),
    num_groups: int = 4,
    head_grid: int = 4,
    **deq_kwargs,
) -> MDEQImageClassifier:
    """An MDEQ-style image classifier (Bai et al., 2020), small by default:
    `stem -> deq -> head`.

    - stem: 3x3 conv to `channels[0]`, GroupNorm, ReLU;
    - deq: a [`jaxdeq.MultiScaleDeepEquilibriumNetwork`][] with one scale per entry of
        `channels`, scale `i` at resolution `image_size / 2**i`: an `MDEQBlock`
        per scale (the stem's features injected at scale 0), strided 3x3 convs
        (+ GroupNorm) to go down, 1x1 conv + nearest upsampling to go up, and
        GroupNorm after fusing;
    - head: every scale through a ReLU, average-pooled to a `head_grid x head_grid`
        map, flattened and concatenated, a linear layer to the logits.

    **Arguments:**

    - `solver`: the DEQ's solver; `None` (default): `jaxdeq.Anderson(rtol=1e-3,
        atol=1e-6, norm=optx.two_norm, termination="normwise")`, which stops each
        sample once `||f(z) - z|| <= 1e-3 ||f(z)||`.
    - `num_classes`: the number of logits.
    - `image_size`: the input's `(height, width)` (or one int for square images),
        divisible by `2**(len(channels) - 1)`.
    - `in_channels`: the input's channels (NHWC).
    - `channels`: the channels of each scale, each divisible by `num_groups`.
    - `num_groups`: GroupNorm's number of groups.
    - `head_grid`: the side of the grid each scale is pooled to for the head
        (`1`: global average pooling).
    - `**deq_kwargs`: keyword arguments of `MultiScaleDeepEquilibriumNetwork`
        (`max_steps`, `adjoint`, `jacobian_regularization`, `init`, ...).

    At initialisation the model is a contraction (the last conv of each block starts
    at a tenth of LeCun-normal; the coarser scales' blocks have no residual; the
    upsampling maps have no normalization; fusing ends in GroupNorm alone), so with
    the default solver (nearly) every sample of digits converges, in 7 to 15 steps.
    Keep it converging through training with `jacobian_regularization="forward"` and
    `solution.jacobian_loss` in the loss.

    **Returns:** an `MDEQImageClassifier`; its `apply` maps images
    `(batch, height, width, in_channels)` to logits `(batch, num_classes)`. The DEQ is
    `model.deq`, its parameters `ps["deq"]`; `model.apply(ps, st, x,
    return_solution=True)` also returns its solution.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> model = jaxdeq.mdeq_image_classifier(
    ...     image_size=8, in_channels=1, channels=(4, 8), num_groups=2)
    >>> x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> logits, st, solution = model.apply(ps, st, x, return_solution=True)
    >>> logits.shape, [z.shape for z in solution.z_star]
    ((2, 10), [(2, 8, 8, 4), (2, 4, 4, 8)])
    >>> bool(jnp.all(solution.result == jaxdeq.RESULTS.successful))
    True

    ```
    """
    height, width = (
        (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size))
    )
    channels = tuple(channels)
    n = len(channels)
    if n == 0:
        raise ValueError("channels: expected at least one scale, got ()")
    if height % 2 ** (n - 1) or width % 2 ** (n - 1):
        raise ValueError(
            f"image_size: expected height and width divisible by 2**(len(channels) "
            f"- 1) = {2 ** (n - 1)}, got {(height, width)}"
        )
    for i, c in enumerate(channels):
        if c % num_groups:
            raise ValueError(
                f"channels[{i}]: expected a multiple of num_groups={num_groups}, "
                f"got {c}"
            )
    stem = Chain(
        Conv(3, in_channels, channels[0], use_bias=False),
        _group_norm(num_groups),
        WrappedFunction(jax.nn.relu),
    )
    main_layers = tuple(
        MDEQBlock(c, num_groups, injection=i == 0) for i, c in enumerate(channels)
    )
    mapping_layers = tuple(
        tuple(_mapping(i, j, channels, num_groups) for j in range(n)) for i in range(n)
    )
    # GroupNorm alone after fusing: MDEQ's ReLU and 1x1 conv before it would, through
    # the normalization, amplify some directions of the state about 2x at init.
    post_fuse_layer = tuple(_group_norm(num_groups) for _ in channels)
    if solver is None:
        solver = default_solver()
    scales = tuple((height // 2**i, width // 2**i, c) for i, c in enumerate(channels))
    deq = MultiScaleDeepEquilibriumNetwork(
        main_layers, mapping_layers, post_fuse_layer, solver, scales, **deq_kwargs
    )
    num_features = sum(
        c * h * w
        for (height_i, width_i, c) in scales
        for h, w in [_head_grid(height_i, width_i, head_grid)]
    )
    head = Chain(
        WrappedFunction(functools.partial(_pool_and_concatenate, grid=head_grid)),
        Dense(num_features, num_classes),
    )
    return MDEQImageClassifier(stem, deq, head)
