"""The benchmark workloads W1/W2/W3 as pure JAX functions, and the JAX measurement.

Every JAX peer (bare loop, banax, jaxdeq) runs the same model: an injection computed
once from the input, a DEQ cell solved to its fixed point by the peer, and a head
(mean over space, then a linear layer to 10 classes). Only the fixed-point solve differs
between peers; see `FixedPointSolve`. `workloads_torch.py` is the PyTorch twin (same
math, same init distributions, NCHW).

Workloads (per-sample shapes; images are NHWC):

- **w1** (mlp): `f(z, x) = tanh(W z + U x + b)`, state 256, input 64, batch 128.
  `W ~ N(0, (0.5/16)^2)`, `U ~ N(0, 1/64)`, `b = 0`; the injection is `U x + b`.
- **w2** (conv): `f(z, x) = gn(relu(z + gn(inj + conv_b(gn(relu(conv_a(z)))))))`,
  `inj = conv_inj(x)` (3 -> 48, no bias, `N(0, 1/27)`), conv_a 48 -> 64 and conv_b
  64 -> 48 (3x3, no bias, `N(0, 0.01^2)`), GroupNorm with 8 groups, no affine,
  eps 1e-5. State 32x32x48, batch 32.
- **w3** (multiscale, MDEQ-style with 2 scales): state `(z0, z1)` with z0 32x32x32 and
  z1 16x16x64. One application of the map, in jaxdeq's multiscale semantics
  (`main_layers`, then `mapping_layers` summed into each scale, then `post_fuse`):
  `m0 = block(z0, inj)` (the w2 cell at scale 0, inner width 32; the input enters
  scale 0 only), `m1 = relu(conv_b1(gn(relu(conv_a1(z1)))))` (a bottleneck without
  residual, so that the input-free coarse scale is driven by the fine one); both
  conv_b branches are multiplied by `W3_BRANCH_SCALE = 0.1` and initialised at
  `N(0, 0.1^2)` (the same function at init as 0.01 without the factor, but Adam's
  steps of about the learning rate per weight no longer make the cell expansive
  within the benchmark's 5 train steps; before this change every peer ran its 30
  steps at the measured parameters, after it ~18, all samples converged); then
  `z0' = gn(m0 + upsample2(conv1x1_up(m1)))` and `z1' = gn(m1 + conv3x3_down(m0))`
  (stride 2). Block convs are bias-free `N(0, 0.01^2)` (conv_b: see above), mapping
  convs bias-free
  `N(0, 1/fan_in)`. Two scales keep a CPU train step within seconds while exercising
  cross-scale mapping and a pytree state; the forward solve converges in ~19
  evaluations at init (W2: ~17). Head: per-scale spatial means, concatenated
  (96 features), then linear.

Heads are `N(0, 1/features)` weights and zero bias. All 3x3 convs pad 1 on each side
(stride 2 included), so the PyTorch twin computes exactly the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

import run_all

Params = dict[str, Any]
State = Any  # an array, or a tuple of arrays (one per scale)

GROUPS = 8
GN_EPS = 1e-5
NUM_CLASSES = 10
LEARNING_RATE = 1e-3


def group_norm(x: jax.Array) -> jax.Array:
    """GroupNorm over (H, W, channels in group), no affine; x is NHWC."""
    b, h, w, c = x.shape
    grouped = x.reshape(b, h, w, GROUPS, c // GROUPS)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(grouped - mean).mean(axis=(1, 2, 4), keepdims=True)
    return ((grouped - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(b, h, w, c)


def conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """NHWC convolution with an HWIO kernel, padding (k - 1) // 2 on each side."""
    pad = (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour upsampling by 2 in H and W."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def conv_block(
    params: Params,
    z: jax.Array,
    injection: jax.Array | float,
    conv_b_scale: float = 1.0,
) -> jax.Array:
    """The w2 residual cell `gn(relu(z + gn(inj + s conv_b(gn(relu(conv_a(z)))))))`
    (`s = conv_b_scale`, 1 in w2)."""
    hidden = group_norm(jax.nn.relu(conv(z, params["conv_a"])))
    branch = conv_b_scale * conv(hidden, params["conv_b"])
    return group_norm(jax.nn.relu(z + group_norm(injection + branch)))


def mlp_cell(params: Params, z: jax.Array, injection: jax.Array) -> jax.Array:
    """w1 cell: `tanh(z W + injection)`, injection = `x U + b`."""
    return jnp.tanh(z @ params["W"] + injection)


# w3's conv_b branches (both scales) are scaled by this constant, their kernels
# initialised at 0.01 / W3_BRANCH_SCALE (the same function at init): Adam moves every
# weight by about the learning rate per step, which at a 0.01 scale turned the cell
# into a non-contraction within 4 train steps (every peer then ran its 30 steps).
W3_BRANCH_SCALE = 0.1


def coarse_block(params: Params, z: jax.Array) -> jax.Array:
    """w3 scale-1 main layer: `s relu(conv_b(gn(relu(conv_a(z)))))`,
    `s = W3_BRANCH_SCALE`."""
    hidden = group_norm(jax.nn.relu(conv(z, params["conv_a"])))
    return W3_BRANCH_SCALE * jax.nn.relu(conv(hidden, params["conv_b"]))


def multiscale_cell(params: Params, z: tuple, injection: jax.Array) -> tuple:
    """w3 cell: per-scale main layers, then cross-scale fusion and GroupNorm."""
    z0, z1 = z
    m0 = conv_block(params["block0"], z0, injection, W3_BRANCH_SCALE)
    m1 = coarse_block(params["block1"], z1)
    fused0 = m0 + upsample2(conv(m1, params["up_1to0"]))
    fused1 = m1 + conv(m0, params["down_0to1"], stride=2)
    return group_norm(fused0), group_norm(fused1)


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def _conv_kernel(key: jax.Array, size: int, c_in: int, c_out: int, std=None):
    std = (size * size * c_in) ** -0.5 if std is None else std
    return _normal(key, (size, size, c_in, c_out), std)


def _head(key: jax.Array, features: int) -> Params:
    return {
        "w": _normal(key, (features, NUM_CLASSES), features**-0.5),
        "b": jnp.zeros((NUM_CLASSES,), jnp.float32),
    }


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark workload: `init` gives params `{"inject", "cell", "head"}`."""

    name: str
    sizes: run_all.Sizes
    input_shape: tuple[int, ...]  # per sample
    init: Callable[[jax.Array], Params]
    inject: Callable[[Params, jax.Array], jax.Array]
    cell: Callable[[Params, State, jax.Array], State]
    initial_state: Callable[[jax.Array], State]  # zeros, from the injection
    features: Callable[[State], jax.Array]  # (batch, features) for the head


def _w1(sizes: run_all.Sizes) -> Workload:
    def init(key):
        k_w, k_u, k_head = jax.random.split(key, 3)
        return {
            "inject": {
                "U": _normal(k_u, (sizes.d_in, sizes.d_state), sizes.d_in**-0.5),
                "b": jnp.zeros((sizes.d_state,), jnp.float32),
            },
            "cell": {
                "W": _normal(
                    k_w, (sizes.d_state, sizes.d_state), 0.5 * sizes.d_state**-0.5
                )
            },
            "head": _head(k_head, sizes.d_state),
        }

    return Workload(
        name="w1",
        sizes=sizes,
        input_shape=(sizes.d_in,),
        init=init,
        inject=lambda p, x: x @ p["U"] + p["b"],
        cell=mlp_cell,
        initial_state=jnp.zeros_like,
        features=lambda z: z,
    )


def _w2(sizes: run_all.Sizes) -> Workload:
    (channels,) = sizes.channels

    def init(key):
        k_inj, k_a, k_b, k_head = jax.random.split(key, 4)
        return {
            "inject": {"conv": _conv_kernel(k_inj, 3, 3, channels)},
            "cell": {
                "conv_a": _conv_kernel(k_a, 3, channels, sizes.inner, std=0.01),
                "conv_b": _conv_kernel(k_b, 3, sizes.inner, channels, std=0.01),
            },
            "head": _head(k_head, channels),
        }

    return Workload(
        name="w2",
        sizes=sizes,
        input_shape=(sizes.image, sizes.image, 3),
        init=init,
        inject=lambda p, x: conv(x, p["conv"]),
        cell=conv_block,
        initial_state=jnp.zeros_like,
        features=lambda z: z.mean(axis=(1, 2)),
    )


def _w3(sizes: run_all.Sizes) -> Workload:
    c0, c1 = sizes.channels

    def block(key, channels):
        k_a, k_b = jax.random.split(key)
        return {
            "conv_a": _conv_kernel(k_a, 3, channels, channels, std=0.01),
            "conv_b": _conv_kernel(
                k_b, 3, channels, channels, std=0.01 / W3_BRANCH_SCALE
            ),
        }

    def init(key):
        k_inj, k_b0, k_b1, k_up, k_down, k_head = jax.random.split(key, 6)
        return {
            "inject": {"conv": _conv_kernel(k_inj, 3, 3, c0)},
            "cell": {
                "block0": block(k_b0, c0),
                "block1": block(k_b1, c1),
                "up_1to0": _conv_kernel(k_up, 1, c1, c0),
                "down_0to1": _conv_kernel(k_down, 3, c0, c1),
            },
            "head": _head(k_head, c0 + c1),
        }

    def initial_state(injection):
        b, h, w, _ = injection.shape
        return (
            jnp.zeros((b, h, w, c0), injection.dtype),
            jnp.zeros((b, h // 2, w // 2, c1), injection.dtype),
        )

    return Workload(
        name="w3",
        sizes=sizes,
        input_shape=(sizes.image, sizes.image, 3),
        init=init,
        inject=lambda p, x: conv(x, p["conv"]),
        cell=multiscale_cell,
        initial_state=initial_state,
        features=lambda z: jnp.concatenate([s.mean(axis=(1, 2)) for s in z], axis=1),
    )


def get_workload(name: str, tiny: bool = False) -> Workload:
    """The workload `name` ("w1", "w2", "w3") at full or tiny size."""
    sizes = run_all.workload_sizes(name, tiny)
    return {"w1": _w1, "w2": _w2, "w3": _w3}[name](sizes)


def make_batch(workload: Workload, batch: int, key: jax.Array):
    """Gaussian inputs and uniformly random labels."""
    k_x, k_y = jax.random.split(key)
    x = jax.random.normal(k_x, (batch, *workload.input_shape), jnp.float32)
    labels = jax.random.randint(k_y, (batch,), 0, NUM_CLASSES)
    return x, labels


# ---------------------------------------------------------------------------------
# The peer interface and the JAX measurement protocol.


class FixedPointSolve(Protocol):
    """What a JAX peer provides: the fixed-point solve with its implicit gradient.

    `solve(cell, cell_params, injection, z0)` returns `(z_star, stats)`, where
    `z_star = cell(cell_params, z_star, injection)` (a pytree like `z0`) carries
    gradients to `cell_params` and `injection`, and `stats` is a dict of arrays:
    `"fwd_nfe"` (scalar, cell evaluations on the batch) is required;
    `"fwd_nfe_per_sample"` (batch,), `"rel_residual"` (batch,) and
    `"residual_trace"` (max rel. residual after each evaluation, NaN-padded) are
    optional. It is called inside `jax.jit`.
    """

    def __call__(
        self, cell: Callable, cell_params: Params, injection: jax.Array, z0: State
    ) -> tuple[State, dict[str, jax.Array]]: ...


BackwardNfe = Callable[[Callable, Params, jax.Array, State, State], jax.Array]
"""Optional: `(cell, cell_params, injection, z_star, cotangent) -> iterations` of
the peer's backward solve for that cotangent of `z_star` (called inside `jax.jit`)."""


def logits_and_stats(workload: Workload, solve: FixedPointSolve, params, x):
    """The full model: injection, fixed-point solve, head."""
    injection = workload.inject(params["inject"], x)
    z0 = workload.initial_state(injection)
    z_star, stats = solve(workload.cell, params["cell"], injection, z0)
    head = params["head"]
    return workload.features(z_star) @ head["w"] + head["b"], stats


def _loss(workload, solve, params, x, labels):
    logits, stats = logits_and_stats(workload, solve, params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, stats


def device_description() -> tuple[str, str]:
    """(platform, human-readable device name) of JAX's default device."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return "cpu", run_all.cpu_model()
    return device.platform, device.device_kind


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def measure_jax_peer(
    lib: str,
    solve: FixedPointSolve,
    workload: Workload,
    batch: int,
    reps: int,
    *,
    stop_rule: str,
    versions: dict[str, str],
    backward_nfe: BackwardNfe | None = None,
) -> dict:
    """Time train step and inference of one JAX peer; returns one JSON record."""
    params = workload.init(jax.random.PRNGKey(0))
    x, labels = make_batch(workload, batch, jax.random.PRNGKey(1))
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state):
        (loss, stats), grads = jax.value_and_grad(
            functools.partial(_loss, workload, solve), has_aux=True
        )(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    infer = jax.jit(functools.partial(logits_and_stats, workload, solve))
    platform_name, device_name = device_description()
    host_memory = run_all.HostPeakMemory()

    start = time.perf_counter()
    params, opt_state, loss = jax.block_until_ready(train_step(params, opt_state))
    compile_s = time.perf_counter() - start
    jax.block_until_ready(infer(params, x))
    for _ in range(run_all.WARMUP_CALLS):
        params, opt_state, loss = jax.block_until_ready(train_step(params, opt_state))

    state = {"params": params, "opt_state": opt_state}

    def one_train_step():
        state["params"], state["opt_state"], _ = jax.block_until_ready(
            train_step(state["params"], state["opt_state"])
        )

    host_memory.start()
    train_step_s = run_all.median_seconds(one_train_step, reps)
    peak_bytes = host_memory.peak_delta_bytes()
    params = state["params"]
    infer_s = run_all.median_seconds(
        lambda: jax.block_until_ready(infer(params, x)), reps
    )
    _, stats = jax.block_until_ready(infer(params, x))

    bwd_nfe = None
    if backward_nfe is not None:
        bwd_nfe = int(
            _measure_backward_nfe(workload, solve, backward_nfe, params, x, labels)
        )

    if platform_name == "cpu":
        memory_kind = "host_rss_delta"
    else:
        peak_bytes, memory_kind = _device_peak_bytes(), "device_peak"
    return run_all.make_record(
        lib=lib,
        device=platform_name,
        device_name=device_name,
        workload=workload.name,
        batch=batch,
        tiny=workload.sizes.tiny,
        reps=reps,
        train_step_s=train_step_s,
        infer_s=infer_s,
        compile_s=compile_s,
        fwd_nfe=int(stats["fwd_nfe"]),
        fwd_nfe_per_sample=_mean_or_none(stats.get("fwd_nfe_per_sample")),
        fwd_stop_rule=stop_rule,
        fwd_rel_residual_max=_max_or_none(stats.get("rel_residual")),
        bwd_nfe=bwd_nfe,
        peak_mem_bytes=peak_bytes,
        memory_kind=memory_kind,
        residual_trace=_trace_or_none(stats.get("residual_trace")),
        versions=versions,
    )


def _measure_backward_nfe(workload, solve, backward_nfe, params, x, labels):
    """Backward iterations for this batch's actual loss cotangent at z*."""

    @jax.jit
    def count(params):
        injection = workload.inject(params["inject"], x)
        z0 = workload.initial_state(injection)
        z_star, _ = solve(workload.cell, params["cell"], injection, z0)
        z_star = jax.lax.stop_gradient(z_star)

        def loss_of_state(z):
            head = params["head"]
            logits = workload.features(z) @ head["w"] + head["b"]
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, labels
            ).mean()

        cotangent = jax.grad(loss_of_state)(z_star)
        return backward_nfe(workload.cell, params["cell"], injection, z_star, cotangent)

    return count(params)


def _mean_or_none(values):
    return None if values is None else float(np.mean(np.asarray(values)))


def _max_or_none(values):
    return None if values is None else float(np.max(np.asarray(values)))


def _trace_or_none(trace):
    if trace is None:
        return None
    return [float(v) for v in np.asarray(trace) if np.isfinite(v)]


def jax_versions(**extra: str) -> dict[str, str]:
    """Versions of Python, jax, jaxlib and optax, plus `extra`."""
    import jaxlib

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        **extra,
    }


def run_jax_peer_cli(
    lib: str,
    solve: FixedPointSolve,
    *,
    stop_rule: str,
    versions: dict[str, str],
    backward_nfe: BackwardNfe | None = None,
    argv: list[str] | None = None,
) -> None:
    """Command line of a JAX bench script: one JSON line per (workload, batch)."""
    args = run_all.bench_arg_parser(lib).parse_args(argv)
    platform_name, _ = device_description()
    for name in args.workloads:
        workload = get_workload(name, tiny=args.tiny)
        for batch in run_all.batches_for(name, platform_name, args.tiny, args.batches):
            record = measure_jax_peer(
                lib,
                solve,
                workload,
                batch,
                run_all.reps_for(name, platform_name, args.tiny, args.reps),
                stop_rule=stop_rule,
                versions=versions,
                backward_nfe=backward_nfe,
            )
            run_all.emit(record)
