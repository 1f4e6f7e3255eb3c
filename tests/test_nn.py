"""Tests of `jaxdeq.nn`: the ps/st layers, containers and Flax/Equinox adapters."""

import re
import textwrap

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tree_allclose
from jaxdeq import nn


def _assert_same_state_layout(new_st, st):
    """The protocol: `apply` returns `st` with the structure, shapes, dtypes given."""
    assert jax.tree.structure(new_st) == jax.tree.structure(st)
    for new, old in zip(jax.tree.leaves(new_st), jax.tree.leaves(st), strict=True):
        assert new.shape == old.shape
        assert new.dtype == old.dtype


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


class _FlaxBlock(linen.Module):
    @linen.compact
    def __call__(self, x, train):
        x = linen.Dense(4)(x)
        return linen.BatchNorm(use_running_average=not train)(x)


class _EquinoxBlock(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 4, key=key, dtype=jnp.float32)
        self.norm = eqx.nn.BatchNorm(
            4, axis_name="batch", mode="ema", dtype=jnp.float32
        )

    def __call__(self, x, state):
        return self.norm(self.linear(x), state)


def _key(seed=0):
    return jax.random.key(seed)


def _normal(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(_key(seed), shape, dtype)


def _zoo():
    """(name, layer, x) for every kind of layer, with tiny shapes."""
    x = _normal((4, 3))
    image = _normal((2, 5, 5, 2))
    mlp = eqx.nn.MLP(3, 2, width_size=4, depth=1, key=_key(1))
    eqx_block, eqx_state = eqx.nn.make_with_state(_EquinoxBlock)(_key(2))
    return [
        ("dense", nn.Dense(3, 2, activation=jnp.tanh), x),
        ("conv", nn.Conv(3, 2, 3, activation=jax.nn.softplus), image),
        ("noop", nn.NoOpLayer(), x),
        ("wrapped", nn.WrappedFunction(jnp.sin), x),
        ("chain", nn.Chain(nn.Dense(3, 4, activation=jnp.tanh), nn.Dense(4, 2)), x),
        (
            "parallel",
            nn.Parallel(jnp.add, nn.Dense(3, 2), nn.Dense(3, 2, use_bias=False)),
            (x, x + 1),
        ),
        ("branch", nn.BranchLayer(nn.Dense(3, 2), nn.WrappedFunction(jnp.cos)), x),
        ("flax", nn.from_flax(_FlaxBlock(), call_kwargs={"train": True}), x),
        ("nnx", nn.from_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0))), x),
        ("equinox", nn.from_equinox(mlp), x),
        ("equinox_stateful", nn.from_equinox(eqx_block, eqx_state), x),
    ]


_ZOO = _zoo()
_ZOO_IDS = [name for name, _, _ in _ZOO]


#
# Dense and Conv
#


def test_dense_is_affine_map():
    layer = nn.Dense(3, 2)
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    assert ps["kernel"].shape == (3, 2) and ps["bias"].shape == (2,)
    assert st == {}
    y, new_st = layer.apply(ps, st, x)
    assert y.shape == (4, 2)
    assert np.allclose(y, x @ ps["kernel"] + ps["bias"], atol=1e-6)
    assert new_st == {}


def test_dense_activation_and_no_bias():
    layer = nn.Dense(3, 2, activation=jnp.tanh, use_bias=False)
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    assert set(ps) == {"kernel"}
    y, _ = layer.apply(ps, st, x)
    assert np.allclose(y, jnp.tanh(x @ ps["kernel"]), atol=1e-6)


def test_dense_initializers():
    layer = nn.Dense(
        3,
        2,
        kernel_init=jax.nn.initializers.ones,
        bias_init=jax.nn.initializers.constant(0.5),
    )
    ps, _ = layer.init(_key(), jnp.ones((1, 3)))
    assert np.array_equal(ps["kernel"], np.ones((3, 2)))
    assert np.array_equal(ps["bias"], np.full((2,), 0.5))


def test_conv_equals_lax_conv():
    layer = nn.Conv(3, 2, 4)
    x = _normal((2, 5, 5, 2))
    ps, st = layer.init(_key(), x)
    assert ps["kernel"].shape == (3, 3, 2, 4) and ps["bias"].shape == (4,)
    y, _ = layer.apply(ps, st, x)
    expected = jax.lax.conv_general_dilated(
        x,
        ps["kernel"],
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    assert y.shape == (2, 5, 5, 4)
    assert np.allclose(y, expected + ps["bias"], atol=1e-5)


def test_conv_stride_and_valid_padding():
    layer = nn.Conv((3, 2), 2, 4, stride=2, padding="VALID", use_bias=False)
    x = _normal((2, 7, 6, 2))
    ps, st = layer.init(_key(), x)
    y, _ = layer.apply(ps, st, x)
    expected = jax.lax.conv_general_dilated(
        x,
        ps["kernel"],
        window_strides=(2, 2),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    assert y.shape == (2, 3, 3, 4)
    assert np.allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 3), (1, 3, 3, 3, 3)])
def test_conv_int_kernel_size_takes_rank_from_input(shape):
    layer = nn.Conv(3, 3, 2)
    x = _normal(shape)
    ps, st = layer.init(_key(), x)
    assert ps["kernel"].shape == (3,) * (len(shape) - 2) + (3, 2)
    y, _ = layer.apply(ps, st, x)
    assert y.shape == shape[:-1] + (2,)


#
# The protocol, for every layer: jit, vmap, grad, state layout, hashability
#


@pytest.mark.parametrize("name, layer, x", _ZOO, ids=_ZOO_IDS)
def test_jit_equals_eager(name, layer, x):
    ps, st = layer.init(_key(), x)
    y, new_st = layer.apply(ps, st, x)
    y_jit, new_st_jit = jax.jit(layer.apply)(ps, st, x)
    assert tree_allclose(y, y_jit)
    assert tree_allclose(new_st, new_st_jit)
    _assert_same_state_layout(new_st, st)
    _assert_same_state_layout(new_st_jit, st)


@pytest.mark.parametrize("name, layer, x", _ZOO, ids=_ZOO_IDS)
def test_layer_is_static_configuration(name, layer, x):
    # No array leaves, hashable: usable as a closure or a static argument of jit.
    assert jax.tree.leaves(layer) == []
    hash(layer)
    ps, st = layer.init(_key(), x)
    apply = jax.jit(lambda layer, ps, st, x: layer.apply(ps, st, x), static_argnums=0)
    assert tree_allclose(apply(layer, ps, st, x), layer.apply(ps, st, x))


@pytest.mark.parametrize("name, layer, x", _ZOO, ids=_ZOO_IDS)
def test_vmap_over_stacked_batches(name, layer, x):
    ps, st = layer.init(_key(), x)
    xs = jax.tree.map(lambda leaf: jnp.stack([leaf, 2 * leaf]), x)
    ys, _ = jax.vmap(layer.apply, in_axes=(None, None, 0))(ps, st, xs)
    for i in range(2):
        y_i, _ = layer.apply(ps, st, jax.tree.map(lambda leaf, i=i: leaf[i], xs))
        assert tree_allclose(jax.tree.map(lambda leaf, i=i: leaf[i], ys), y_i)


@pytest.mark.parametrize("name, layer, x", _ZOO, ids=_ZOO_IDS)
def test_grads_finite(name, layer, x):
    ps, st = layer.init(_key(), x)

    def loss(ps, x):
        y, _ = layer.apply(ps, st, x)
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(y))

    grad_ps, grad_x = jax.grad(loss, argnums=(0, 1))(ps, x)
    for leaf in jax.tree.leaves((grad_ps, grad_x)):
        assert np.all(np.isfinite(leaf))
    assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(grad_x))


#
# float64
#


@pytest.mark.parametrize(
    "layer, shape",
    [(nn.Dense(3, 2, activation=jnp.tanh), (4, 3)), (nn.Conv(2, 2, 3), (2, 4, 4, 2))],
    ids=["dense", "conv"],
)
def test_float64_params_and_finite_differences(x64, layer, shape):
    x = _normal(shape, dtype=jnp.float64)
    ps, st = layer.init(_key(), x)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(ps))

    @jax.jit
    def loss(ps, x):
        y, _ = layer.apply(ps, st, x)
        assert y.dtype == jnp.float64
        return jnp.sum(jnp.sin(y))

    tangent = jax.tree.map(lambda leaf: jnp.ones_like(leaf) / leaf.size, (ps, x))
    _, jvp = jax.jvp(loss, (ps, x), tangent)
    eps = 1e-6
    shifted = [
        jax.tree.map(lambda p, t, sign=sign: p + sign * eps * t, (ps, x), tangent)
        for sign in (1, -1)
    ]
    finite_difference = (loss(*shifted[0]) - loss(*shifted[1])) / (2 * eps)
    assert np.allclose(jvp, finite_difference, rtol=1e-7, atol=1e-9)


def test_explicit_param_dtype_is_kept(x64):
    x = _normal((4, 3), dtype=jnp.float64)
    ps, _ = nn.Dense(3, 2, param_dtype=jnp.float32).init(_key(), x)
    assert ps["kernel"].dtype == jnp.float32


def test_integer_input_gets_default_float_params():
    ps, _ = nn.Dense(3, 2).init(_key(), jnp.ones((4, 3), jnp.int32))
    assert ps["kernel"].dtype == jnp.result_type(float)


def test_flax_state_keeps_its_dtype_under_float64_input(x64):
    layer = nn.from_flax(_FlaxBlock(), call_kwargs={"train": True})
    x = _normal((4, 3), dtype=jnp.float64)
    ps, st = layer.init(_key(), x)
    _, new_st = layer.apply(ps, st, x)
    _assert_same_state_layout(new_st, st)


#
# Containers
#


def test_parallel_tuple_input_is_the_seed_cell():
    cell = nn.Parallel(
        jnp.add, nn.Dense(2, 2, use_bias=False), nn.Dense(2, 2, use_bias=False)
    )
    z, x = _normal((3, 2), seed=1), _normal((3, 2), seed=2)
    ps, st = cell.init(_key(), (z, x))
    assert st == ({}, {})
    y, _ = cell.apply(ps, st, (z, x))
    assert np.allclose(y, z @ ps[0]["kernel"] + x @ ps[1]["kernel"], atol=1e-6)
    assert not np.allclose(ps[0]["kernel"], ps[1]["kernel"])


def test_parallel_non_tuple_input_goes_to_every_layer():
    x = _normal((4, 3))
    layer = nn.Parallel(jnp.multiply, nn.Dense(3, 2), nn.Dense(3, 2), nn.Dense(3, 2))
    ps, st = layer.init(_key(), x)
    y, _ = layer.apply(ps, st, x)
    expected = np.prod([x @ p["kernel"] + p["bias"] for p in ps], axis=0)
    assert np.allclose(y, expected, atol=1e-5)


def test_parallel_without_connection_returns_tuple():
    layer = nn.Parallel(None, nn.Dense(3, 2), nn.WrappedFunction(jnp.sin))
    x, w = _normal((4, 3)), _normal((4, 5), seed=1)
    ps, st = layer.init(_key(), (x, w))
    (y0, y1), _ = layer.apply(ps, st, (x, w))
    assert y0.shape == (4, 2)
    assert np.allclose(y1, jnp.sin(w))


def test_branch_layer():
    layer = nn.BranchLayer(nn.Dense(3, 2), nn.Dense(3, 5), nn.NoOpLayer())
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    assert ps[2] == {} and st == ({}, {}, {})
    (y0, y1, y2), _ = layer.apply(ps, st, x)
    assert y0.shape == (4, 2) and y1.shape == (4, 5) and y2 is x


def test_nested_containers():
    inner = nn.Chain(nn.NoOpLayer(), nn.Dense(4, 2))
    layer = nn.Chain(
        nn.Dense(3, 4, activation=jnp.tanh),
        nn.BranchLayer(inner, nn.WrappedFunction(lambda h: h[:, :2])),
        nn.Parallel(jnp.add, nn.Dense(2, 2), nn.NoOpLayer()),
    )
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    assert jax.tree.structure(st) == jax.tree.structure(({}, (({}, {}), {}), ({}, {})))
    assert ps[1][0][1]["kernel"].shape == (4, 2)
    y, new_st = layer.apply(ps, st, x)
    h = jnp.tanh(x @ ps[0]["kernel"] + ps[0]["bias"])
    branch0 = h @ ps[1][0][1]["kernel"] + ps[1][0][1]["bias"]
    expected = branch0 @ ps[2][0]["kernel"] + ps[2][0]["bias"] + h[:, :2]
    assert np.allclose(y, expected, atol=1e-5)
    _assert_same_state_layout(new_st, st)


def test_containers_carry_child_state():
    eqx_block, eqx_state = eqx.nn.make_with_state(_EquinoxBlock)(_key(2))
    layer = nn.Chain(
        nn.from_equinox(eqx_block, eqx_state),
        nn.Parallel(
            None,
            nn.from_flax(_FlaxBlock(), call_kwargs={"train": True}),
            nn.Dense(4, 1),
        ),
    )
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    _, new_st = jax.jit(layer.apply)(ps, st, x)
    _assert_same_state_layout(new_st, st)
    assert not tree_allclose(new_st[0], st[0])
    assert not tree_allclose(new_st[1][0], st[1][0])


def test_empty_chain_is_identity():
    x = _normal((4, 3))
    ps, st = nn.Chain().init(_key(), x)
    assert ps == () and st == ()
    y, _ = nn.Chain().apply(ps, st, x)
    assert y is x


#
# Adapters: each equals calling the original module on the same parameters
#


def test_from_flax_batch_norm():
    module = _FlaxBlock()
    train = nn.from_flax(module, call_kwargs={"train": True})
    evaluate = nn.from_flax(module, call_kwargs={"train": False})
    x = _normal((4, 3))
    ps, st = train.init(_key(), x)
    variables = module.init(_key(), x, train=True)
    assert tree_allclose(ps, variables["params"])
    assert set(st) == {"batch_stats"}

    y, new_st = train.apply(ps, st, x)
    expected, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert np.allclose(y, expected, atol=1e-6)
    assert tree_allclose(new_st, updates)
    assert not tree_allclose(new_st, st)

    y_eval, eval_st = evaluate.apply(ps, new_st, x)
    expected_eval = module.apply({"params": ps, **new_st}, x, train=False)
    assert np.allclose(y_eval, expected_eval, atol=1e-6)
    assert tree_allclose(eval_st, new_st)


def test_from_flax_without_state():
    module = linen.Dense(2)
    layer = nn.from_flax(module)
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    assert st == {}
    y, _ = layer.apply(ps, st, x)
    assert np.allclose(y, module.apply({"params": ps}, x))


def test_from_nnx_linear():
    module = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    layer = nn.from_nnx(module)
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    assert set(ps) == {"kernel", "bias"} and st == {}
    y, _ = layer.apply(ps, st, x)
    assert np.allclose(y, module(x), atol=1e-6)
    assert np.allclose(y, x @ ps["kernel"] + ps["bias"], atol=1e-6)


def test_from_nnx_batch_norm_updates_state():
    module = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    layer = nn.from_nnx(module)
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    y, new_st = jax.jit(layer.apply)(ps, st, x)
    _assert_same_state_layout(new_st, st)
    assert not tree_allclose(new_st, st)
    assert np.allclose(y, module(x), atol=1e-5)
    assert np.allclose(new_st["mean"], module.mean[...], atol=1e-6)


def test_from_equinox_mlp():
    mlp = eqx.nn.MLP(3, 2, width_size=4, depth=2, key=_key(1))
    layer = nn.from_equinox(mlp)
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    assert st == {}
    assert tree_allclose(ps, eqx.filter(mlp, eqx.is_inexact_array))
    y, _ = layer.apply(ps, st, x)
    assert np.allclose(y, jax.vmap(mlp)(x), atol=1e-6)
    # Gradients flow to the Equinox parameters.
    grads = jax.grad(lambda ps: jnp.sum(layer.apply(ps, st, x)[0]))(ps)
    assert grads.layers[0].weight.shape == mlp.layers[0].weight.shape


def test_from_equinox_unbatched_call():
    linear = eqx.nn.Linear(3, 2, key=_key(1))
    layer = nn.from_equinox(linear, batch_axis=None)
    x = _normal((3,))
    ps, st = layer.init(_key(), x)
    y, _ = layer.apply(ps, st, x)
    assert np.allclose(y, linear(x))


def test_from_equinox_batch_norm_state():
    block, state = eqx.nn.make_with_state(_EquinoxBlock)(_key(2))
    layer = nn.from_equinox(block, state)
    x = _normal((4, 3))
    ps, st = layer.init(_key(), x)
    assert st is state
    y, new_st = jax.jit(layer.apply)(ps, st, x)
    expected, expected_st = jax.vmap(
        block, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    assert np.allclose(y, expected, atol=1e-5)
    assert tree_allclose(new_st, expected_st)
    assert not tree_allclose(new_st, st)
    _assert_same_state_layout(new_st, st)


def test_from_equinox_state_from_plain_construction():
    # Built without `make_with_state`: the initial state stays out of the parameters.
    norm = eqx.nn.BatchNorm(3, axis_name="batch", mode="ema", dtype=jnp.float32)
    layer = nn.from_equinox(norm, eqx.nn.State(norm))
    ps, st = layer.init(_key(), _normal((4, 3)))
    assert len(jax.tree.leaves(ps)) == 2  # weight and bias only
    y, _ = layer.apply(ps, st, _normal((4, 3)))
    assert y.shape == (4, 3)


#
# Errors name the argument
#


@pytest.mark.parametrize(
    "make, error, name",
    [
        (lambda: nn.Dense(0, 2), ValueError, "in_features"),
        (lambda: nn.Dense(2, -1), ValueError, "out_features"),
        (lambda: nn.Dense(2.0, 2), ValueError, "in_features"),
        (lambda: nn.Dense(True, 2), ValueError, "in_features"),
        (lambda: nn.Dense(2, 2, activation="relu"), TypeError, "activation"),
        (lambda: nn.Dense(2, 2, use_bias=1), TypeError, "use_bias"),
        (lambda: nn.Dense(2, 2, kernel_init=0.0), TypeError, "kernel_init"),
        (lambda: nn.Dense(2, 2, param_dtype=jnp.int32), TypeError, "param_dtype"),
        (lambda: nn.Dense(2, 2, dtype="no-such-dtype"), TypeError, "dtype"),
        (lambda: nn.Conv(0, 2, 2), ValueError, "kernel_size"),
        (lambda: nn.Conv((3, 0), 2, 2), ValueError, "kernel_size"),
        (lambda: nn.Conv(3, 0, 2), ValueError, "in_features"),
        (lambda: nn.Conv(3, 2, 2, stride=0), ValueError, "stride"),
        (lambda: nn.Conv((3, 3), 2, 2, stride=(1, 1, 1)), ValueError, "stride"),
        (lambda: nn.Conv(3, 2, 2, padding="same-ish"), ValueError, "padding"),
        (lambda: nn.Conv(3, 2, 2, padding=-1), ValueError, "padding"),
        (lambda: nn.Conv((3, 3), 2, 2, padding=(1, 1, 1)), ValueError, "padding"),
        (lambda: nn.Conv(3, 2, 2, activation=1), TypeError, "activation"),
        (lambda: nn.WrappedFunction(3), TypeError, "fn"),
        (lambda: nn.Chain(nn.NoOpLayer(), jnp.sin), TypeError, "layers[1]"),
        (lambda: nn.BranchLayer(), ValueError, "layers"),
        (lambda: nn.BranchLayer(linen.Dense(2)), TypeError, "layers[0]"),
        (lambda: nn.Parallel(jnp.add), ValueError, "layers"),
        (lambda: nn.Parallel(3, nn.NoOpLayer()), TypeError, "connection"),
        (lambda: nn.Parallel(jnp.add, nn.NoOpLayer(), "x"), TypeError, "layers[1]"),
        (lambda: nn.from_flax(nnx.Linear(2, 2, rngs=nnx.Rngs(0))), TypeError, "module"),
        (
            lambda: nn.from_flax(linen.Dense(2), call_kwargs={"mask": [1]}),
            TypeError,
            "call_kwargs['mask']",
        ),
        (
            lambda: nn.from_flax(linen.Dense(2), call_kwargs=[1]),
            TypeError,
            "call_kwargs",
        ),
        (lambda: nn.from_nnx(linen.Dense(2)), TypeError, "module"),
        (lambda: nn.from_equinox(linen.Dense(2)), TypeError, "module"),
        (
            lambda: nn.from_equinox(eqx.nn.BatchNorm(3, axis_name="batch", mode="ema")),
            ValueError,
            "state",
        ),
        (
            lambda: nn.from_equinox(eqx.nn.Identity(), state={}),
            TypeError,
            "state",
        ),
        (
            lambda: nn.from_equinox(eqx.nn.Identity(), batch_axis="0"),
            TypeError,
            "batch_axis",
        ),
    ],
)
def test_bad_configuration(make, error, name):
    with pytest.raises(error, match=re.escape(f"{name}: ")):
        make()


@pytest.mark.parametrize(
    "layer, x, name",
    [
        (nn.Dense(3, 2), jnp.ones((4, 2)), "x"),
        (nn.Dense(3, 2), jnp.ones(()), "x"),
        (nn.Dense(3, 2), (jnp.ones((4, 3)),), "x"),
        (nn.Conv(3, 2, 2), jnp.ones((4, 5, 5, 3)), "x"),
        (nn.Conv(3, 2, 2), jnp.ones((4, 2)), "x"),
        (nn.Conv((3, 3), 2, 2), jnp.ones((4, 2)), "x"),
        (nn.Conv(3, 2, 2, stride=(1, 1)), jnp.ones((4, 5, 2)), "stride"),
        (nn.Parallel(jnp.add, nn.NoOpLayer(), nn.NoOpLayer()), (jnp.ones(2),) * 3, "x"),
    ],
)
def test_bad_input(layer, x, name):
    with pytest.raises((ValueError, TypeError), match=re.escape(f"{name}: ")):
        layer.init(_key(), x)


def test_bad_input_message_says_what_was_expected():
    layer = nn.Dense(3, 2)
    ps, st = layer.init(_key(), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"x: .*in_features=3.*\(4, 2\)"):
        jax.jit(layer.apply)(ps, st, jnp.ones((4, 2)))


@pytest.mark.parametrize(
    "layer",
    [
        nn.Chain(nn.Dense(3, 2)),
        nn.Parallel(jnp.add, nn.Dense(3, 2)),
        nn.BranchLayer(nn.Dense(3, 2)),
    ],
    ids=["chain", "parallel", "branch"],
)
def test_container_rejects_foreign_params(layer):
    x = jnp.ones((4, 3))
    ps, st = layer.init(_key(), x)
    with pytest.raises(ValueError, match="ps: "):
        layer.apply(ps[0], st, x)
    with pytest.raises(ValueError, match="st: "):
        layer.apply(ps, st + ({},), x)


#
# Docstrings
#


@pytest.mark.parametrize(
    "name",
    [
        "Dense",
        "Conv",
        "NoOpLayer",
        "WrappedFunction",
        "Chain",
        "Parallel",
        "BranchLayer",
        "from_flax",
        "from_nnx",
        "from_equinox",
    ],
)
def test_docstring_sections_and_example(name):
    doc = getattr(nn, name).__doc__
    for section in ("Arguments", "Inputs", "Returns", "Parameters", "States"):
        assert f"**{section}:**" in doc
    examples = re.findall(r"```python\n(.*?)```", doc, re.DOTALL)
    assert examples
    for example in examples:
        exec(textwrap.dedent(example), {})
