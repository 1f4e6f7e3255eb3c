"""DEQ models on a mesh of 4 simulated CPU devices.

The device count is fixed when JAX starts and this pytest process has started it
already, so the checks run once in a subprocess (this file run as a script, with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` and x64 enabled) that prints
its measurements as JSON; the tests assert on them.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxdeq
from jaxdeq import nn

NUM_DEVICES = 4
BATCH = 8
WIDTH = 4
CASES = (
    "per_sample",
    "joint",
    "shard_map",
    "multiscale",
    "multiscale_shard_map",
    "explicit_mesh",
    "explicit_mesh_multiscale",
)
TOLERANCE = 1e-10  # float64; the sharded programs only reassociate sums

CALLBACK_TARGET = re.compile(r"callback|host", re.IGNORECASE)
HOST_OPS = re.compile(r"\b(outfeed|infeed|send|recv|send-done|recv-done)\(")


def host_transfers(program_text: str) -> list[str]:
    """Host callbacks and host transfers in StableHLO or compiled HLO text."""
    targets = re.findall(r'custom_call_target="([^"]+)"', program_text)
    targets += re.findall(r"stablehlo\.custom_call @([\w.]+)", program_text)
    found = [t for t in targets if CALLBACK_TARGET.search(t)]
    return found + HOST_OPS.findall(program_text)


def _cell(width, scale=0.4):
    return nn.Chain(
        nn.Parallel(
            jnp.add,
            nn.Dense(
                width,
                width,
                use_bias=False,
                kernel_init=initializers.normal(scale / np.sqrt(width)),
            ),
            nn.Dense(width, width),
        ),
        nn.WrappedFunction(jnp.tanh),
    )


def _solver():
    return jaxdeq.Anderson(rtol=1e-10, atol=1e-10)


def _multiscale_model():
    sizes = (3, 2)

    def dense(a, b, **kw):
        return nn.Dense(a, b, kernel_init=initializers.normal(0.4 / np.sqrt(a)), **kw)

    main = (
        nn.Chain(
            nn.Parallel(jnp.add, dense(3, 3, use_bias=False), nn.Dense(3, 3)),
            nn.WrappedFunction(jnp.tanh),
        ),
        dense(2, 2, activation=jnp.tanh),
    )
    mapping = tuple(
        tuple(nn.NoOpLayer() if i == j else dense(a, b) for j, b in enumerate(sizes))
        for i, a in enumerate(sizes)
    )
    return jaxdeq.MultiScaleDeepEquilibriumNetwork(
        main, mapping, None, _solver(), tuple((a,) for a in sizes), max_steps=60
    )


def _max_abs_diff(a, b):
    diffs = jax.tree.map(
        lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v)))), a, b
    )
    return max(jax.tree.leaves(diffs))


def _spec(array):
    sharding = array.sharding
    if not isinstance(sharding, NamedSharding):
        return repr(sharding)
    spec = [list(s) if isinstance(s, tuple) else s for s in sharding.spec]
    while spec and spec[-1] is None:  # P("batch", None) is P("batch")
        spec.pop()
    return spec


def _compare(model, x, mesh, spec, apply=None):
    """Outputs and gradients of `apply` on `x` sharded by `spec`, against
    `model.apply` on one device."""
    apply = model.apply if apply is None else apply
    ps, st = model.init(jax.random.key(0), x)

    def loss(ps, x, apply):
        z, st_new, st_new_solution = apply(ps, st, x, return_solution=True)
        weighted = [
            jnp.sum(jnp.sin(leaf) * jnp.cos(jnp.arange(leaf.size).reshape(leaf.shape)))
            for leaf in jax.tree.leaves(z)
        ]
        return sum(weighted), (z, st_new_solution.nfe)

    def grad_fn(apply):
        return jax.jit(jax.grad(lambda ps, x: loss(ps, x, apply), (0, 1), has_aux=True))

    grads_one, (z_one, nfe_one) = grad_fn(model.apply)(ps, x)
    x_sharded = jax.device_put(x, NamedSharding(mesh, spec))
    lowered = grad_fn(apply).lower(ps, x_sharded)
    compiled = lowered.compile()
    grads, (z, nfe) = compiled(ps, x_sharded)
    z_leaves = jax.tree.leaves(z)
    return {
        "z_diff": _max_abs_diff(z, z_one),
        "grad_diff": _max_abs_diff(grads, grads_one),
        "nfe_equal": bool(np.array_equal(nfe, nfe_one)),
        "nfe_max": int(np.max(nfe)),
        "z_specs": [_spec(leaf) for leaf in z_leaves],
        "z_devices": [len(leaf.sharding.device_set) for leaf in z_leaves],
        "nfe_spec": _spec(nfe),
        "x_grad_spec": _spec(jax.tree.leaves(grads[1])[0]),
        "host_transfers_lowered": host_transfers(lowered.as_text()),
        "host_transfers_compiled": host_transfers(compiled.as_text()),
    }


def _model_parallel(mesh):
    """A wide cell whose kernels are split over the "model" axis of a 2x2 mesh."""
    width = 16
    model = jaxdeq.DeepEquilibriumNetwork(_cell(width), _solver(), max_steps=60)
    x = jax.random.normal(jax.random.key(2), (BATCH, width))
    ps, st = model.init(jax.random.key(0), x)

    def by_model(leaf):
        spec = P(None, "model") if leaf.ndim == 2 else P("model")
        return NamedSharding(mesh, spec)

    ps_sharded = jax.device_put(ps, jax.tree.map(by_model, ps))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch", None)))

    def loss(ps, x):
        z, _ = model.apply(ps, st, x)
        return jnp.sum(jnp.sin(z)), z

    grad = jax.jit(jax.grad(loss, has_aux=True))
    grads_one, z_one = grad(ps, x)
    grads, z = grad(ps_sharded, x_sharded)
    kernels = [leaf for leaf in jax.tree.leaves(grads) if leaf.ndim == 2]
    return {
        "z_diff": _max_abs_diff(z, z_one),
        "grad_diff": _max_abs_diff(grads, grads_one),
        "param_spec": _spec(jax.tree.leaves(ps_sharded)[0]),
        "kernel_grad_specs": [_spec(k) for k in kernels],
        "z_spec": _spec(z),
    }


def _checks() -> dict:
    """Everything the tests assert on, on this process's devices."""
    devices = jax.devices()
    key = jax.random.key(0)
    mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(AxisType.Auto,))
    x = jax.random.normal(jax.random.key(3), (BATCH, WIDTH))
    per_sample = jaxdeq.DeepEquilibriumNetwork(_cell(WIDTH), _solver(), max_steps=60)
    joint = jaxdeq.DeepEquilibriumNetwork(
        _cell(WIDTH), _solver(), max_steps=60, joint_solve=True
    )

    def with_debug_print(ps, x):
        jax.debug.print("{}", x.sum())
        return x

    probe = jax.jit(with_debug_print).lower(None, x).as_text()
    mesh_2x2 = jax.make_mesh(
        (2, 2), ("batch", "model"), axis_types=(AxisType.Auto, AxisType.Auto)
    )
    results = {
        "num_devices": len(devices),
        "x64": bool(jax.config.jax_enable_x64),
        "callback_probe": host_transfers(probe),
        "per_sample": _compare(per_sample, x, mesh, P("batch")),
        "joint": _compare(joint, x, mesh, P("batch")),
        "shard_map": _compare(
            per_sample, x, mesh, P("batch"), jaxdeq.shard_map_apply(per_sample, mesh)
        ),
        "model_parallel": _model_parallel(mesh_2x2),
    }
    try:
        jaxdeq.shard_map_apply(per_sample, mesh)(*per_sample.init(key, x[:6]), x[:6])
    except ValueError as error:
        results["indivisible_batch_error"] = str(error)
    multiscale = _multiscale_model()
    x_multi = jax.random.normal(jax.random.key(4), (BATCH, 3))
    results["multiscale"] = _compare(multiscale, x_multi, mesh, P("batch"))
    # `jax.make_mesh`'s default axes are Explicit: sharding is part of the type.
    explicit = jax.make_mesh((len(devices),), ("batch",))
    results["explicit_axis_types"] = [str(t) for t in explicit.axis_types]
    results["explicit_mesh"] = _compare(per_sample, x, explicit, P("batch"))
    results["explicit_mesh_multiscale"] = _compare(
        multiscale, x_multi, explicit, P("batch")
    )
    results["multiscale_shard_map"] = _compare(
        multiscale,
        x_multi,
        mesh,
        P("batch"),
        jaxdeq.shard_map_apply(multiscale, mesh),
    )
    return results


@pytest.fixture(scope="module")
def sharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
    ).strip()
    env.update(JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_mesh_has_explicit_axes(sharded):
    assert sharded["explicit_axis_types"] == ["AxisType.Explicit"]


def test_subprocess_has_four_devices(sharded):
    assert sharded["num_devices"] == NUM_DEVICES
    assert sharded["x64"]


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_single_device(sharded, case):
    result = sharded[case]
    assert result["z_diff"] < TOLERANCE
    assert result["grad_diff"] < TOLERANCE
    assert result["nfe_equal"]
    assert result["nfe_max"] > 1


@pytest.mark.parametrize("case", CASES)
def test_outputs_stay_sharded(sharded, case):
    result = sharded[case]
    assert all(spec == ["batch"] for spec in result["z_specs"])
    assert result["z_devices"] == [NUM_DEVICES] * len(result["z_specs"])
    # A joint solve has one nfe for the whole batch, replicated.
    assert result["nfe_spec"] == ([] if case == "joint" else ["batch"])
    assert result["x_grad_spec"] == ["batch"]


@pytest.mark.parametrize("case", CASES)
def test_no_host_callbacks(sharded, case):
    assert sharded["callback_probe"], "the detector must see jax.debug.print"
    assert sharded[case]["host_transfers_lowered"] == []
    assert sharded[case]["host_transfers_compiled"] == []


def test_shard_map_apply_needs_a_divisible_batch(sharded):
    assert "not divisible" in sharded["indivisible_batch_error"]


def test_model_parallel_cell_equals_unsharded(sharded):
    result = sharded["model_parallel"]
    assert result["param_spec"] == [None, "model"]
    assert result["z_diff"] < TOLERANCE
    assert result["grad_diff"] < TOLERANCE
    assert result["z_spec"][0] == "batch"
    assert all(spec == [None, "model"] for spec in result["kernel_grad_specs"])


def test_shard_map_apply_rejects_bad_configuration():
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(AxisType.Auto,))
    joint = jaxdeq.DeepEquilibriumNetwork(_cell(2), _solver(), joint_solve=True)
    with pytest.raises(ValueError, match="joint_solve"):
        jaxdeq.shard_map_apply(joint, mesh)
    per_sample = jaxdeq.DeepEquilibriumNetwork(_cell(2), _solver())
    with pytest.raises(ValueError, match="axis"):
        jaxdeq.shard_map_apply(per_sample, mesh, "data")
    with pytest.raises(TypeError, match="model"):
        jaxdeq.shard_map_apply(nn.Dense(2, 2), mesh)


def test_shard_map_apply_on_one_device_equals_apply():
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(AxisType.Auto,))
    model = jaxdeq.DeepEquilibriumNetwork(_cell(2), _solver())
    x = jnp.ones((3, 2))
    ps, st = model.init(jax.random.key(0), x)
    z, st_new = jax.jit(jaxdeq.shard_map_apply(model, mesh))(ps, st, x)
    z_ref, _ = jax.jit(model.apply)(ps, st, x)
    assert np.allclose(z, z_ref, rtol=0, atol=1e-12)
    assert jax.tree.structure(st_new) == jax.tree.structure(st)


@pytest.mark.slow
def test_data_parallel_example_trains_on_two_devices():
    script = os.path.join(
        os.path.dirname(__file__), "..", "examples", "data_parallel.py"
    )
    env = dict(os.environ, JAX_ENABLE_X64="0")
    done = subprocess.run(
        [sys.executable, script, "--simulate-cpu-devices", "2", "--epochs", "2"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert "2 cpu devices" in done.stdout
    epochs = re.findall(r"test acc (\d\.\d+)", done.stdout)
    assert len(epochs) == 2 and float(epochs[-1]) > 0.5


if __name__ == "__main__":
    print(json.dumps(_checks()))
