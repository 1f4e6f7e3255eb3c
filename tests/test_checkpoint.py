"""Checkpoints: `ps`, `st` and optimizer states round-trip through orbax exactly."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdeq
import jaxdeq.equinox
import jaxdeq.flax
from helpers import dense_cell
from jaxdeq import nn

WIDTH = 3


def _model(**kwargs):
    return jaxdeq.DeepEquilibriumNetwork(
        dense_cell(WIDTH),
        jaxdeq.Anderson(rtol=1e-6, atol=1e-6),
        jacobian_regularization="reverse",
        **kwargs,
    )


def _assert_bit_identical(a, b):
    leaves_a, treedef_a = jax.tree.flatten(a)
    leaves_b, treedef_b = jax.tree.flatten(b)
    assert treedef_a == treedef_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert type(x) is type(y)
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _train_step(model, optimizer):
    @jax.jit
    def step(ps, st, opt_state, x):
        def loss(ps):
            z, new_st, solution = model.apply(ps, st, x, return_solution=True)
            return jnp.mean(z**2) + solution.jacobian_loss, new_st

        (_, st), grads = jax.value_and_grad(loss, has_aux=True)(ps)
        updates, opt_state = optimizer.update(grads, opt_state, ps)
        return optax.apply_updates(ps, updates), st, opt_state

    return step


@pytest.mark.parametrize(
    "dtype", [jnp.float32, pytest.param(jnp.float64, marks=pytest.mark.slow)]
)
def test_round_trip_is_exact_and_training_continues_identically(tmp_path, dtype):
    model = _model()
    x = jax.random.normal(jax.random.key(0), (4, WIDTH), dtype)
    optimizer = optax.adamw(1e-2)
    step = _train_step(model, optimizer)
    ps, st = model.init(jax.random.key(1), x)
    opt_state = optimizer.init(ps)
    ps, st, opt_state = step(ps, st, opt_state, x)
    tree = {"ps": ps, "st": st, "opt_state": opt_state}

    jaxdeq.save_checkpoint(tmp_path / "ckpt", tree)
    # `like` only gives the structure: fresh values, another key.
    fresh_ps, fresh_st = model.init(jax.random.key(7), x)
    like = {"ps": fresh_ps, "st": fresh_st, "opt_state": optimizer.init(fresh_ps)}
    restored = jaxdeq.load_checkpoint(tmp_path / "ckpt", like)
    _assert_bit_identical(restored, tree)

    # The same outputs, the same next training step.
    z, new_st = model.apply(ps, st, x)
    z_restored, new_st_restored = model.apply(restored["ps"], restored["st"], x)
    _assert_bit_identical((z, new_st), (z_restored, new_st_restored))
    _assert_bit_identical(
        step(ps, st, opt_state, x),
        step(restored["ps"], restored["st"], restored["opt_state"], x),
    )


def test_round_trip_of_wrapped_models(tmp_path):
    x = jax.random.normal(jax.random.key(0), (4, WIDTH))
    model = _model()
    deq = jaxdeq.equinox.DEQ(model, x, key=jax.random.key(1))
    _, st = deq(x, return_state=True)
    deq = eqx.tree_at(lambda d: d.st, deq, st)
    variables = jaxdeq.flax.DEQ(model).init(jax.random.key(2), x)
    tree = {"equinox": deq, "linen": variables}
    jaxdeq.save_checkpoint(tmp_path / "ckpt", tree)
    like = {
        "equinox": jaxdeq.equinox.DEQ(model, x, key=jax.random.key(3)),
        "linen": jaxdeq.flax.DEQ(model).init(jax.random.key(4), x),
    }
    restored = jaxdeq.load_checkpoint(tmp_path / "ckpt", like)
    _assert_bit_identical(restored, tree)
    _assert_bit_identical(restored["equinox"](x), deq(x))


def test_stateful_cell_and_other_leaves(tmp_path):
    block, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        WIDTH, axis_name="batch", mode="batch"
    )
    layer = nn.from_equinox(block, state)
    x = jax.random.normal(jax.random.key(0), (4, WIDTH))
    ps, st = layer.init(jax.random.key(0), x)
    _, st = layer.apply(ps, st, x)
    tree = {
        "ps": ps,
        "st": st,
        "keys": jax.random.split(jax.random.key(5, impl="rbg"), 3),
        "step": 3,
        "rate": 0.5,
        "flags": np.array([True, False]),
        "counts": jnp.arange(3, dtype=jnp.int32),
    }
    jaxdeq.save_checkpoint(tmp_path / "ckpt", tree)
    like = dict(
        tree,
        ps=layer.init(jax.random.key(1), x)[0],
        keys=jax.random.split(jax.random.key(0, impl="rbg"), 3),
        step=0,
        rate=0.0,
    )
    _assert_bit_identical(jaxdeq.load_checkpoint(tmp_path / "ckpt", like), tree)


def test_overwrite(tmp_path):
    path = tmp_path / "ckpt"
    jaxdeq.save_checkpoint(path, {"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="exist"):
        jaxdeq.save_checkpoint(path, {"a": jnp.ones(2)})
    jaxdeq.save_checkpoint(path, {"a": jnp.ones(2)}, overwrite=True)
    restored = jaxdeq.load_checkpoint(path, {"a": jnp.zeros(2)})
    np.testing.assert_array_equal(restored["a"], jnp.ones(2))


def test_mismatched_like_is_reported(tmp_path):
    path = tmp_path / "ckpt"
    jaxdeq.save_checkpoint(path, {"a": jnp.zeros(2), "key": jax.random.key(0)})
    with pytest.raises(ValueError, match=r"like: .*\['b'\]"):
        jaxdeq.load_checkpoint(path, {"b": jnp.zeros(2), "key": jax.random.key(0)})
    with pytest.raises(ValueError, match=r"like: the leaf \['key'\]"):
        jaxdeq.load_checkpoint(path, {"a": jnp.zeros(2), "key": jnp.zeros(2)})


def test_unsupported_leaf_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="tree: .*str"):
        jaxdeq.save_checkpoint(tmp_path / "ckpt", {"name": "deq"})


def test_template_of_another_batch_size_restores_and_mismatch_is_reported(tmp_path):
    model = _model()
    x = jax.random.normal(jax.random.key(0), (4, WIDTH))
    ps, st = model.init(jax.random.key(1), x)
    _, st = model.apply(ps, st, x)
    jaxdeq.save_checkpoint(tmp_path / "ckpt", {"ps": ps, "st": st})
    # `st` holds nothing shaped by the batch: a template from batch 1 restores it.
    like_ps, like_st = model.init(jax.random.key(2), x[:1])
    restored = jaxdeq.load_checkpoint(tmp_path / "ckpt", {"ps": like_ps, "st": like_st})
    _assert_bit_identical(restored, {"ps": ps, "st": st})
    wide = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(2 * WIDTH), jaxdeq.Anderson(rtol=1e-6, atol=1e-6)
    )
    wide_ps, _ = wide.init(jax.random.key(1), jnp.ones((4, 2 * WIDTH)))
    with pytest.raises(ValueError, match=r"like: the leaf \['ps'\]"):
        jaxdeq.load_checkpoint(tmp_path / "ckpt", {"ps": wide_ps, "st": like_st})


def test_round_trip_of_nnx_state(tmp_path):
    model = _model()
    x = jax.random.normal(jax.random.key(0), (4, WIDTH))
    module = jaxdeq.flax.NNXDEQ(model, x, rngs=nnx.Rngs(0))
    module(x)
    jaxdeq.save_checkpoint(tmp_path / "ckpt", nnx.state(module))
    fresh = jaxdeq.flax.NNXDEQ(model, x, rngs=nnx.Rngs(1))
    nnx.update(fresh, jaxdeq.load_checkpoint(tmp_path / "ckpt", nnx.state(fresh)))
    _assert_bit_identical(nnx.state(fresh), nnx.state(module))
    _assert_bit_identical(fresh(x), module(x))
